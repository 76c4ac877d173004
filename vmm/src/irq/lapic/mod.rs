//! A local APIC emulated in the VMM: the xAPIC MMIO interface, the x2APIC MSR interface
//! (`0x800..=0x8ff`, entered through `IA32_APIC_BASE`; in [`x2apic`]), and the TSC-deadline
//! MSR.
//!
//! KVM's in-kernel irqchip is deliberately not used: an IPI or a device interrupt for a vCPU on
//! another host must pass through the VMM, so every APIC lives here. A [`LocalApic`] is shared by
//! its vCPU thread (register accesses, interrupt acceptance), by every sender of interrupts
//! (other vCPUs, the IOAPIC) and by its timer thread. Senders set IRR and then *kick* the vCPU
//! (see [`Kicker`]) so that a running `KVM_RUN` returns and the vCPU loop injects.

mod x2apic;

pub use x2apic::{X2APIC_BROADCAST, X2APIC_MSR_BASE, X2APIC_MSR_LAST};

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use x2apic::{APIC_BASE_ADDR, BASE_BSP, BASE_EN, BASE_EXTD};

/// Register offsets inside the 4 KiB APIC window.
mod reg {
    pub const ID: u64 = 0x20;
    pub const VERSION: u64 = 0x30;
    pub const TPR: u64 = 0x80;
    pub const APR: u64 = 0x90;
    pub const PPR: u64 = 0xa0;
    pub const EOI: u64 = 0xb0;
    pub const LDR: u64 = 0xd0;
    pub const DFR: u64 = 0xe0;
    pub const SVR: u64 = 0xf0;
    pub const ISR: u64 = 0x100;
    pub const TMR: u64 = 0x180;
    pub const IRR: u64 = 0x200;
    pub const ESR: u64 = 0x280;
    pub const ICR_LO: u64 = 0x300;
    pub const ICR_HI: u64 = 0x310;
    pub const LVT_TIMER: u64 = 0x320;
    pub const LVT_ERROR: u64 = 0x370;
    pub const TIMER_INIT: u64 = 0x380;
    pub const TIMER_CUR: u64 = 0x390;
    pub const TIMER_DIV: u64 = 0x3e0;
}

/// Nominal APIC bus clock for the counting timer modes (Linux uses TSC-deadline mode here).
const BUS_HZ: u64 = 1_000_000_000;
const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLED: u32 = 1 << 8;

/// How an interrupt message is delivered (ICR / redirection entry bits 8-10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Fixed vector.
    Fixed,
    /// Lowest priority among the destinations (we pick the first).
    LowestPriority,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT: park the processor until a SIPI.
    Init,
    /// Start-up IPI: start a parked processor at vector << 12.
    StartUp,
    /// SMI, ExtINT and reserved modes: logged and dropped.
    Other(u8),
}

impl DeliveryMode {
    /// The 3-bit delivery-mode field.
    pub fn to_bits(self) -> u8 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::Other(x) => x & 7,
        }
    }

    /// Decodes the 3-bit delivery-mode field.
    pub fn from_bits(b: u32) -> Self {
        match b & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            x => Self::Other(x as u8),
        }
    }
}

/// ICR destination shorthand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// Only the sender.
    SelfOnly,
    /// Every APIC including the sender.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// An interrupt message on the (virtual) APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// Vector (meaningful for fixed, lowest-priority and start-up).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Level-triggered (sets TMR; EOI is then broadcast to the IOAPIC).
    pub level: bool,
    /// Destination APIC ID or logical destination (8 bits in xAPIC format, 32 in x2APIC).
    pub dest: u32,
    /// Logical destination mode.
    pub logical: bool,
    /// Shorthand (IPIs only).
    pub shorthand: Shorthand,
    /// The destination is in x2APIC format (sent by an APIC in x2APIC mode): 32-bit IDs,
    /// `0xffff_ffff` is the broadcast, logical = cluster (bits 31-16) + 16-bit member mask.
    pub x2apic: bool,
}

impl Message {
    /// Broadcast: `0xff` physical in xAPIC format; `0xffff_ffff` in x2APIC format, physical
    /// or logical (SDM 11.12.9).
    pub fn is_broadcast(&self) -> bool {
        (self.x2apic && self.dest == X2APIC_BROADCAST)
            || (!self.x2apic && !self.logical && self.dest == 0xff)
    }
}

/// An APIC register access the architecture answers with #GP (the vCPU loop injects it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("general protection fault")]
pub struct GeneralProtection;

/// What a register write asks of the rest of the machine, done after the APIC lock is dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send an IPI.
    Ipi(Message),
    /// EOI of a level-triggered vector: tell the IOAPIC.
    LevelEoi(u8),
}

/// Run state of the vCPU behind this APIC (INIT/SIPI protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Waiting for INIT + SIPI (application processors at power-on).
    WaitForSipi,
    /// SIPI received with this vector; the vCPU thread must load the real-mode start state.
    Starting(u8),
    /// Running guest code.
    Running,
}

/// Interrupts a vCPU thread that may be inside `KVM_RUN`.
///
/// It sets `kvm_run.immediate_exit` (so a `KVM_RUN` about to start returns at once) and then
/// signals the thread (so a running one returns with `EINTR`).
pub struct Kicker {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: `immediate_exit` points into the vCPU's `kvm_run` mapping, which lives as long as the
// VcpuFd; the VM keeps every VcpuFd alive until all kickers are gone (vCPU threads are joined
// before the VM is dropped). The byte is only written, and a racy write of 1 is what KVM's API
// intends; `pthread_t` is a plain thread id.
unsafe impl Send for Kicker {}
// SAFETY: see `Send`; `kick` only performs a single-byte volatile store and `pthread_kill`.
unsafe impl Sync for Kicker {}

/// Real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

impl Kicker {
    /// Creates a kicker for the calling thread.
    ///
    /// # Safety
    /// `immediate_exit` must point at the `immediate_exit` byte of a `kvm_run` mapping that
    /// outlives the kicker.
    pub unsafe fn for_current_thread(immediate_exit: *mut u8) -> Self {
        Kicker {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            immediate_exit,
        }
    }

    /// Makes the vCPU leave (or not enter) `KVM_RUN`.
    pub fn kick(&self) {
        // SAFETY: the pointer is valid for the kicker's lifetime (constructor contract).
        unsafe { std::ptr::write_volatile(self.immediate_exit, 1) };
        // SAFETY: the thread id came from pthread_self of a vCPU thread that is joined only after
        // the VM stops kicking; the signal has a no-op handler installed at start-up.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// The mutable state of one local APIC.
#[derive(Debug)]
pub struct State {
    id: u8,
    apic_base: u64,
    irr: [u32; 8],
    isr: [u32; 8],
    tmr: [u32; 8],
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    esr: u32,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; 6],
    timer_init: u32,
    timer_div: u32,
    tsc_deadline: u64,
    /// When the timer fires next.
    deadline: Option<Instant>,
    /// Period of the periodic mode.
    period: Option<Duration>,
    /// An NMI waits for injection.
    pub nmi_pending: bool,
    /// INIT/SIPI state.
    pub run_state: RunState,
    /// Timer interrupts raised (statistics).
    pub timer_fires: u64,
}

fn bit(v: u8) -> (usize, u32) {
    (usize::from(v >> 5), 1 << (v & 31))
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8)
}

impl State {
    fn new(id: u8, bsp: bool) -> Self {
        State {
            id,
            apic_base: APIC_BASE_ADDR | BASE_EN | if bsp { BASE_BSP } else { 0 },
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            esr: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; 6],
            timer_init: 0,
            timer_div: 0,
            tsc_deadline: 0,
            deadline: None,
            period: None,
            nmi_pending: false,
            run_state: if bsp {
                RunState::Running
            } else {
                RunState::WaitForSipi
            },
            timer_fires: 0,
        }
    }

    fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The highest pending vector that may be delivered now (above the processor priority).
    pub fn deliverable(&self) -> Option<u8> {
        let v = highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// Moves `vector` from IRR to ISR: the vCPU loop is injecting it.
    pub fn ack(&mut self, vector: u8) {
        let (i, m) = bit(vector);
        self.irr[i] &= !m;
        self.isr[i] |= m;
    }

    /// Whether this APIC is in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.apic_base & BASE_EXTD != 0
    }

    /// Whether this APIC matches the destination of `msg` (shorthands aside).
    pub fn matches(&self, msg: &Message) -> bool {
        if msg.is_broadcast() {
            return true;
        }
        let dest = msg.dest;
        if self.x2apic() {
            // An xAPIC-format message (IOAPIC) reaches x2APIC-mode APICs with its 8-bit
            // destination read as an x2APIC one (cluster 0), as KVM does.
            if !msg.logical {
                return dest == u32::from(self.id);
            }
            return (self.ldr >> 16) == (dest >> 16) && (self.ldr & dest & 0xffff) != 0;
        }
        if !msg.logical {
            return dest == u32::from(self.id);
        }
        let dest = dest as u8;
        let ldr = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            ldr & dest != 0
        } else {
            (ldr >> 4) == (dest >> 4) && (ldr & dest & 0xf) != 0
        }
    }

    /// The IPI an ICR write (low half `lo`, destination already in `icr_hi`) sends.
    fn icr_message(&mut self, lo: u32) -> Option<Effect> {
        self.icr_lo = lo & !(1 << 12);
        let shorthand = match (lo >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        let mode = DeliveryMode::from_bits(lo >> 8);
        // INIT level de-assert only synchronises arbitration IDs: nothing to deliver.
        if mode == DeliveryMode::Init && lo & (1 << 14) == 0 && lo & (1 << 15) != 0 {
            return None;
        }
        let x2apic = self.x2apic();
        Some(Effect::Ipi(Message {
            vector: lo as u8,
            mode,
            level: false,
            dest: if x2apic {
                self.icr_hi
            } else {
                self.icr_hi >> 24
            },
            logical: lo & (1 << 11) != 0,
            shorthand,
            x2apic,
        }))
    }

    fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLED != 0
    }

    /// Accepts a message addressed to this APIC. Returns true if the vCPU must be woken.
    pub fn accept(&mut self, msg: &Message) -> bool {
        match msg.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !self.software_enabled() {
                    return false;
                }
                let (i, m) = bit(msg.vector);
                self.irr[i] |= m;
                if msg.level {
                    self.tmr[i] |= m;
                } else {
                    self.tmr[i] &= !m;
                }
                true
            }
            DeliveryMode::Nmi => {
                self.nmi_pending = true;
                true
            }
            DeliveryMode::Init => {
                if msg.level || !matches!(self.run_state, RunState::Running) {
                    if self.run_state == RunState::Running {
                        log::warn!("INIT to running vCPU with APIC ID {} ignored", self.id);
                    } else {
                        self.run_state = RunState::WaitForSipi;
                    }
                }
                false
            }
            DeliveryMode::StartUp => {
                if self.run_state == RunState::WaitForSipi {
                    self.run_state = RunState::Starting(msg.vector);
                    true
                } else {
                    false
                }
            }
            DeliveryMode::Other(m) => {
                log::warn!(
                    "dropping interrupt with delivery mode {m} to APIC ID {}",
                    self.id
                );
                false
            }
        }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[0] >> 17) & 3
    }

    fn divisor(&self) -> u64 {
        let v = (self.timer_div & 3) | ((self.timer_div & 8) >> 1);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn arm_counter(&mut self, now: Instant) {
        if self.timer_init == 0 {
            self.deadline = None;
            self.period = None;
            return;
        }
        // u128: a guest-chosen count x divisor must not overflow (at most ~2^39 ns anyway).
        let ns = (u128::from(self.timer_init) * u128::from(self.divisor()) * 1_000_000_000
            / u128::from(BUS_HZ)) as u64;
        let d = Duration::from_nanos(ns.max(1000));
        self.deadline = Some(now + d);
        self.period = (self.timer_mode() == 1).then_some(d);
    }

    /// Fires the timer if due. Returns true if an interrupt was raised.
    pub fn poll_timer(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return false,
        }
        self.deadline = self.period.map(|p| {
            let mut next = now + p;
            if let Some(d) = self.deadline {
                if d + p > now {
                    next = d + p;
                }
            }
            next
        });
        if self.timer_mode() == 2 {
            self.tsc_deadline = 0;
        }
        let lvt = self.lvt[0];
        if lvt & LVT_MASKED != 0 || !self.software_enabled() {
            return false;
        }
        let (i, m) = bit(lvt as u8);
        self.irr[i] |= m;
        self.tmr[i] &= !m;
        self.timer_fires += 1;
        true
    }

    /// Next timer expiry.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Handles a read of the APIC window.
    pub fn read(&self, offset: u64, now: Instant) -> u32 {
        let arr = |a: &[u32; 8]| a[((offset - (offset & !0x7f)) >> 4) as usize & 7];
        match offset {
            reg::ID => u32::from(self.id) << 24,
            reg::VERSION => 0x0005_0014, // version 0x14, 6 LVT entries
            reg::TPR => self.tpr,
            reg::APR => 0,
            reg::PPR => self.ppr(),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            o if (reg::ISR..reg::ISR + 0x80).contains(&o) => arr(&self.isr),
            o if (reg::TMR..reg::TMR + 0x80).contains(&o) => arr(&self.tmr),
            o if (reg::IRR..reg::IRR + 0x80).contains(&o) => arr(&self.irr),
            reg::ESR => self.esr,
            reg::ICR_LO => self.icr_lo, // delivery status: always idle
            reg::ICR_HI => self.icr_hi,
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) && o % 16 == 0 => {
                self.lvt[((o - reg::LVT_TIMER) >> 4) as usize]
            }
            reg::TIMER_INIT => self.timer_init,
            reg::TIMER_CUR => match (self.deadline, self.timer_mode()) {
                (Some(d), 0 | 1) => {
                    let left = d.saturating_duration_since(now).as_nanos();
                    (left * u128::from(BUS_HZ) / 1_000_000_000 / u128::from(self.divisor()))
                        .min(u128::from(u32::MAX)) as u32
                }
                _ => 0,
            },
            reg::TIMER_DIV => self.timer_div,
            _ => 0,
        }
    }

    /// Handles a write to the APIC window.
    pub fn write(&mut self, offset: u64, value: u32, now: Instant) -> Option<Effect> {
        match offset {
            reg::TPR => self.tpr = value & 0xff,
            reg::EOI => {
                if let Some(v) = highest(&self.isr) {
                    let (i, m) = bit(v);
                    self.isr[i] &= !m;
                    if self.tmr[i] & m != 0 {
                        return Some(Effect::LevelEoi(v));
                    }
                }
            }
            reg::LDR => self.ldr = value & 0xff00_0000,
            reg::DFR => self.dfr = value | 0x0fff_ffff,
            reg::SVR => {
                self.svr = value & 0x13ff;
                if !self.software_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => self.esr = 0,
            reg::ICR_HI => self.icr_hi = value & 0xff00_0000,
            reg::ICR_LO => return self.icr_message(value),
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) && o % 16 == 0 => {
                let i = ((o - reg::LVT_TIMER) >> 4) as usize;
                let old_mode = self.timer_mode();
                self.lvt[i] = if self.software_enabled() {
                    value
                } else {
                    value | LVT_MASKED
                };
                if i == 0 && self.timer_mode() != old_mode {
                    self.deadline = None;
                    self.period = None;
                    self.timer_init = 0;
                    self.tsc_deadline = 0;
                }
            }
            reg::TIMER_INIT if self.timer_mode() != 2 => {
                self.timer_init = value;
                self.arm_counter(now);
            }
            reg::TIMER_DIV => self.timer_div = value & 0xb,
            _ => {}
        }
        None
    }

    /// `RDMSR IA32_TSC_DEADLINE`.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == 2 {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// `WRMSR IA32_TSC_DEADLINE`: `guest_tsc` is the guest's TSC now, `tsc_khz` its rate.
    pub fn set_tsc_deadline(&mut self, value: u64, guest_tsc: u64, tsc_khz: u64, now: Instant) {
        if self.timer_mode() != 2 {
            return;
        }
        self.tsc_deadline = value;
        self.period = None;
        if value == 0 {
            self.deadline = None;
            return;
        }
        let cycles = value.saturating_sub(guest_tsc);
        let ns = (u128::from(cycles) * 1_000_000 / u128::from(tsc_khz.max(1)))
            .min(u128::from(u64::MAX)) as u64;
        self.deadline = Some(now + Duration::from_nanos(ns));
    }
}

/// One local APIC shared between its vCPU thread, interrupt senders and its timer thread.
pub struct LocalApic {
    /// APIC ID.
    pub id: u8,
    state: Mutex<State>,
    /// Signalled on every change that may wake the vCPU or move the timer.
    pub changed: Condvar,
    kicker: Mutex<Option<Kicker>>,
}

impl LocalApic {
    /// A powered-on APIC; `bsp` starts running, the others wait for INIT/SIPI.
    pub fn new(id: u8, bsp: bool) -> Self {
        LocalApic {
            id,
            state: Mutex::new(State::new(id, bsp)),
            changed: Condvar::new(),
            kicker: Mutex::new(None),
        }
    }

    /// Locks the state (a poisoned lock is recovered: the state stays consistent per access).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the kicker of the vCPU thread when it starts, and removes it (None) before the
    /// thread ends, so nobody signals a finished thread or writes to an unmapped `kvm_run`.
    pub fn set_kicker(&self, k: Option<Kicker>) {
        *self.kicker.lock().unwrap_or_else(|p| p.into_inner()) = k;
    }

    /// Wakes the vCPU: out of a halt wait and out of `KVM_RUN`.
    pub fn wake(&self) {
        self.changed.notify_all();
        if let Some(k) = &*self.kicker.lock().unwrap_or_else(|p| p.into_inner()) {
            k.kick();
        }
    }

    /// Accepts a message and wakes the vCPU if needed.
    pub fn deliver(&self, msg: &Message) {
        let wake = self.lock().accept(msg);
        if wake {
            self.wake();
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn enabled() -> State {
        let mut s = State::new(0, true);
        s.write(reg::SVR, 0x1ff, Instant::now());
        s
    }

    pub(super) fn fixed(vector: u8) -> Message {
        Message {
            vector,
            mode: DeliveryMode::Fixed,
            level: false,
            dest: 0,
            logical: false,
            shorthand: Shorthand::None,
            x2apic: false,
        }
    }

    pub(super) fn dest(dest: u32, logical: bool, x2apic: bool) -> Message {
        Message {
            dest,
            logical,
            x2apic,
            ..fixed(0x40)
        }
    }

    #[test]
    fn priority_and_eoi() {
        let mut s = enabled();
        let now = Instant::now();
        assert!(s.accept(&fixed(0x31)));
        assert!(s.accept(&fixed(0x51)));
        assert_eq!(s.deliverable(), Some(0x51));
        s.ack(0x51);
        // 0x31 is below the in-service class 0x50.
        assert_eq!(s.deliverable(), None);
        assert_eq!(s.read(reg::ISR + 0x20, now), 1 << 17);
        s.write(reg::EOI, 0, now);
        assert_eq!(s.deliverable(), Some(0x31));
        s.write(reg::TPR, 0x40, now);
        assert_eq!(s.deliverable(), None);
    }

    #[test]
    fn disabled_apic_drops_fixed() {
        let mut s = State::new(0, true);
        assert!(!s.accept(&fixed(0x40)));
        assert_eq!(s.deliverable(), None);
    }

    #[test]
    fn init_sipi_starts_ap() {
        let mut s = State::new(1, false);
        let mut m = fixed(0);
        m.mode = DeliveryMode::Init;
        m.level = true;
        s.accept(&m);
        assert_eq!(s.run_state, RunState::WaitForSipi);
        m.mode = DeliveryMode::StartUp;
        m.vector = 0x9a;
        assert!(s.accept(&m));
        assert_eq!(s.run_state, RunState::Starting(0x9a));
        // A second SIPI is ignored.
        assert!(!s.accept(&m));
    }

    #[test]
    fn icr_write_makes_ipi() {
        let mut s = enabled();
        let now = Instant::now();
        s.write(reg::ICR_HI, 3 << 24, now);
        let e = s.write(reg::ICR_LO, 0x4000 | (4 << 8) | 0xfd, now);
        let Some(Effect::Ipi(m)) = e else {
            panic!("no ipi")
        };
        assert_eq!((m.dest, m.mode, m.vector), (3, DeliveryMode::Nmi, 0xfd));
        let e = s.write(reg::ICR_LO, (3 << 18) | 0xf0, now);
        assert!(matches!(
            e,
            Some(Effect::Ipi(Message {
                shorthand: Shorthand::AllExcludingSelf,
                ..
            }))
        ));
    }

    #[test]
    fn logical_destinations() {
        let mut s = enabled();
        let now = Instant::now();
        s.write(reg::LDR, 0x0400_0000, now);
        assert!(s.matches(&dest(0x04, true, false)));
        assert!(s.matches(&dest(0x0c, true, false)));
        assert!(!s.matches(&dest(0x02, true, false)));
        s.write(reg::DFR, 0x0fff_ffff, now); // cluster model
        s.write(reg::LDR, 0x2100_0000, now);
        assert!(s.matches(&dest(0x23, true, false)));
        assert!(!s.matches(&dest(0x13, true, false)));
        assert!(s.matches(&dest(0, false, false)));
        assert!(s.matches(&dest(0xff, false, false)));
        assert!(!s.matches(&dest(0x100, false, true)));
    }

    #[test]
    fn huge_timer_count_does_not_overflow() {
        let mut s = enabled();
        let now = Instant::now();
        s.write(reg::TIMER_DIV, 0xa, now); // divide by 128
        s.write(reg::LVT_TIMER, 0xec | (1 << 17), now);
        s.write(reg::TIMER_INIT, u32::MAX, now);
        let d = s.deadline().unwrap() - now;
        assert_eq!(d, Duration::from_nanos(u64::from(u32::MAX) * 128));
        assert_eq!(s.read(reg::TIMER_CUR, now), u32::MAX);
    }

    #[test]
    fn timers() {
        let mut s = enabled();
        let now = Instant::now();
        // One-shot: 1000 ticks at divide-by-1.
        s.write(reg::TIMER_DIV, 0xb, now);
        s.write(reg::LVT_TIMER, 0xec, now);
        s.write(reg::TIMER_INIT, 1000, now);
        assert!(!s.poll_timer(now));
        assert!(s.poll_timer(now + Duration::from_millis(1)));
        assert_eq!(s.deliverable(), Some(0xec));
        assert!(s.deadline().is_none());
        // TSC deadline: 1 MHz TSC, deadline 1000 cycles ahead = 1 ms.
        s.write(reg::LVT_TIMER, 0xec | (2 << 17), now);
        s.set_tsc_deadline(6000, 5000, 1000, now);
        assert_eq!(s.tsc_deadline(), 6000);
        let d = s.deadline().unwrap() - now;
        assert_eq!(d, Duration::from_millis(1));
        assert!(s.poll_timer(now + d));
        assert_eq!(s.tsc_deadline(), 0);
        // Periodic re-arms.
        s.write(reg::LVT_TIMER, 0xec | (1 << 17), now);
        s.write(reg::TIMER_INIT, 1_000_000, now);
        assert!(s.poll_timer(now + Duration::from_millis(1)));
        assert!(s.deadline().is_some());
    }
}
