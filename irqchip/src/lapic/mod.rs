//! A local APIC: the xAPIC MMIO interface (`regs.rs`), the x2APIC MSR interface
//! (`0x800..=0x8ff`, entered through `IA32_APIC_BASE`; `x2apic.rs`), the timer with the
//! TSC-deadline MSR, kept in guest-TSC time (`timer.rs`), and its saved state (`persist.rs`).
//!
//! KVM's in-kernel irqchip is deliberately not used: an IPI or a device interrupt for a vCPU on
//! another host must pass through the VMM, so every APIC lives there. A [`LocalApic`] is shared
//! by its vCPU thread (register accesses, interrupt acceptance), by every sender of interrupts
//! (other vCPUs, the IOAPIC) and by its timer thread. Senders set IRR and then wake the vCPU:
//! [`LocalApic::changed`] for a thread waiting in the VMM (HLT, INIT/SIPI), and the [`Kick`]
//! the vCPU thread installed for one running guest code.

mod persist;
mod regs;
mod timer;
mod x2apic;

pub use persist::{LapicArgs, LapicStateError};
pub use regs::timer_register;
pub use timer::GuestClock;
pub use x2apic::{X2APIC_MSR_BASE, X2APIC_MSR_LAST};

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::bus::{DeliveryMode, Effect, Message, Shorthand};
use regs::{LVT_MASKED, SVR_ENABLED};
use timer::Timer;
use x2apic::{APIC_BASE_ADDR, BASE_BSP, BASE_EN, BASE_EXTD};

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

/// Makes a vCPU thread that may be running guest code come back to the VMM (implemented by the
/// VMM: `kvm_run.immediate_exit` and a signal).
pub trait Kick: Send + Sync {
    /// Makes the vCPU leave (or not enter) guest mode soon.
    fn kick(&self);
}

/// The live model of one local APIC: registers, timer, and the vCPU-facing INIT/SIPI and NMI
/// state. Shared through [`LocalApic`], whose lock guards it.
#[derive(Debug)]
pub struct Apic {
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
    /// LVT timer, thermal, performance counters, LINT0, LINT1, error (register order).
    lvt: [u32; 6],
    timer: Timer,
    /// An NMI waits for injection.
    pub nmi_pending: bool,
    /// INIT/SIPI state.
    pub run_state: RunState,
    /// Timer interrupts raised (statistics; not saved).
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

impl Apic {
    /// A powered-on APIC with ID `id`: `bsp` runs, the others wait for INIT/SIPI.
    pub fn new(id: u8, bsp: bool) -> Self {
        Apic {
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
            timer: Timer::default(),
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

    /// Moves `vector` from IRR to ISR: the vCPU loop is injecting it (a vector
    /// [`Apic::deliverable`] returned).
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
        let shorthand = Shorthand::from_bits(lo >> 18);
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
}

/// One local APIC shared between its vCPU thread, interrupt senders and its timer thread.
pub struct LocalApic {
    /// APIC ID.
    pub id: u8,
    state: Mutex<Apic>,
    /// Signalled on every change that may wake the vCPU or move the timer.
    pub changed: Condvar,
    kicker: Mutex<Option<Box<dyn Kick>>>,
}

impl LocalApic {
    /// A powered-on APIC; `bsp` starts running, the others wait for INIT/SIPI.
    pub fn new(id: u8, bsp: bool) -> Self {
        Self::from_apic(Apic::new(id, bsp))
    }

    fn from_apic(apic: Apic) -> Self {
        LocalApic {
            id: apic.id,
            state: Mutex::new(apic),
            changed: Condvar::new(),
            kicker: Mutex::new(None),
        }
    }

    /// Locks the state (a poisoned lock is recovered: the state stays consistent per access).
    pub fn lock(&self) -> MutexGuard<'_, Apic> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the kicker of the vCPU thread when it starts, and removes it (None) before the
    /// thread ends, so nobody kicks a finished thread.
    pub fn set_kicker(&self, k: Option<Box<dyn Kick>>) {
        *self.kicker.lock().unwrap_or_else(|p| p.into_inner()) = k;
    }

    /// Wakes the vCPU: out of a wait on [`LocalApic::changed`] and out of guest mode.
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
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use super::regs::reg;
    use super::*;

    pub(crate) fn enabled() -> Apic {
        let mut s = Apic::new(0, true);
        s.write(reg::SVR, 0x1ff, Instant::now());
        s
    }

    pub(crate) fn fixed(vector: u8) -> Message {
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

    pub(crate) fn dest(dest: u32, logical: bool, x2apic: bool) -> Message {
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
        let mut s = Apic::new(0, true);
        assert!(!s.accept(&fixed(0x40)));
        assert_eq!(s.deliverable(), None);
    }

    #[test]
    fn init_sipi_starts_ap() {
        let mut s = Apic::new(1, false);
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

    struct CountKicks(Arc<AtomicUsize>);
    impl Kick for CountKicks {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn delivery_kicks_the_vcpu_until_the_kicker_is_removed() {
        let l = LocalApic::new(0, true);
        l.lock().write(reg::SVR, 0x1ff, Instant::now());
        let kicks = Arc::new(AtomicUsize::new(0));
        l.set_kicker(Some(Box::new(CountKicks(kicks.clone()))));
        l.deliver(&fixed(0x41));
        // A dropped message (SMI, ExtINT, reserved modes) does not wake the vCPU.
        l.deliver(&Message {
            mode: DeliveryMode::Other(7),
            ..fixed(0x42)
        });
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        l.set_kicker(None);
        l.deliver(&fixed(0x43));
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        assert_eq!(l.lock().deliverable(), Some(0x43));
    }
}
