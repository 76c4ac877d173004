//! vCPU threads: the `KVM_RUN` loop with interrupt injection from the userspace local APIC,
//! HLT handled in the VMM, exits dispatched to devices, and each APIC's timer thread.

pub mod control;
pub mod decode;
pub mod quirks;
pub mod ram_exit;
pub mod state;
pub mod xsave;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use irqchip::lapic::{timer_register, X2APIC_MSR_BASE, X2APIC_MSR_LAST};
use irqchip::{GuestClock, IrqChip, LocalApic, RunState};
use kvm_bindings::kvm_interrupt;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::boot::cpu::{self, msr};
use crate::devices::Devices;
use crate::irq::Kicker;
use crate::layout::{APIC_WINDOW, IOAPIC_ADDR, LAPIC_ADDR};
use crate::stats::{Exit, Stats};
use crate::stop::{StopReason, Stopper};
use control::{Activity, AfterEvents, VcpuControl};

ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);

/// Errors that end a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("vCPU {0}: KVM {1} failed: {2}")]
    Kvm(usize, &'static str, kvm_ioctls::Error),
    /// Application processor start-up failed.
    #[error("vCPU {0}: {1}")]
    Start(usize, cpu::Error),
    /// An emulation failure that could not be fixed up.
    #[error("vCPU {0}: {1}")]
    Quirk(usize, quirks::Error),
    /// An exit the VMM does not handle.
    #[error("vCPU {0}: unexpected exit {1}")]
    UnexpectedExit(usize, String),
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// vCPU index (= APIC ID).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its local APIC.
    pub lapic: Arc<LocalApic>,
    /// The machine's interrupt fabric.
    pub chip: Arc<IrqChip>,
    /// Devices.
    pub devices: Arc<Devices>,
    /// Guest memory (for fix-ups that read instructions and operands).
    pub mem: GuestMemoryMmap,
    /// Stop flag.
    pub stop: Arc<Stopper>,
    /// Exit statistics.
    pub stats: Arc<Stats>,
    /// Fix-up statistics.
    pub fixups: Arc<quirks::FixupStats>,
    /// Guest TSC frequency.
    pub tsc_khz: u64,
    /// Shadow page-table invalidation (cluster hosts without two-dimensional paging).
    pub zap: Option<Arc<crate::cluster::shadow::ShadowZap>>,
    /// Pause / resume / stop requests from the VM ([`control`]).
    pub control: VcpuControl,
    /// Start parked on HLT (a vCPU restored from a snapshot taken while it was halted).
    pub halted: bool,
}

/// The vCPU thread's side of pause and save ([`control::PauseHooks`]).
struct Hooks<'a> {
    fd: &'a mut VcpuFd,
    index: usize,
    halted: bool,
    tsc_khz: u64,
}

impl control::PauseHooks for Hooks<'_> {
    fn on_pause(&mut self) {
        // Tell a paravirtual-clock guest it was paused (no soft-lockup reports).
        if let Err(e) = self.fd.kvmclock_ctrl() {
            log::debug!("vCPU {}: KVMCLOCK_CTRL: {e}", self.index);
        }
    }

    fn save(&mut self) -> Result<control::SavedVcpu, String> {
        let err = |e: state::Error| format!("vCPU {}: {e}", self.index);
        state::complete_pending_io(self.fd).map_err(err)?;
        let kvm = state::save(self.fd).map_err(err)?;
        Ok(control::SavedVcpu {
            index: self.index,
            kvm,
            halted: self.halted,
            tsc_khz: self.tsc_khz,
        })
    }
}

/// Why a wait outside `KVM_RUN` ended.
#[derive(Debug, PartialEq, Eq)]
enum Woken {
    /// Go on into the guest.
    Run,
    /// The VM stops.
    Stop,
    /// A control event is pending: handle it first.
    Event,
}

/// How many times in a row an emulation failure at one RIP that the fix-ups do not know is run
/// again before it stops the VM.
const UNKNOWN_RETRIES: u32 = 8;

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs the no-op handler for the kick signal (without SA_RESTART, so KVM_RUN returns EINTR).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set a handler that does nothing and is
    // async-signal-safe, and check the return value.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(crate::irq::kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Vcpu {
    /// Runs the vCPU until the VM stops. Any error stops the whole VM.
    pub fn run(mut self) {
        let result = self.run_loop();
        self.lapic.set_kicker(None);
        self.control.shared.set_activity(Activity::Stopped);
        if let Err(e) = result {
            log::error!("{e}");
            self.stop.request(StopReason::Error(e.to_string()));
        }
        self.devices
            .serial()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
    }

    fn kvm<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
        r.map_err(|e| Error::Kvm(self.index, what, e))
    }

    fn run_loop(&mut self) -> Result<(), Error> {
        let ie: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: `ie` points into this vCPU's kvm_run mapping, which lives as long as `self.fd`;
        // the VM joins this thread (and stops all kicking) before dropping the VcpuFd.
        self.lapic
            .set_kicker(Some(Box::new(unsafe { Kicker::for_current_thread(ie) })));
        // The APIC timer keeps its deadlines in guest-TSC time: give it this vCPU's TSC (only
        // saved counting-mode deadlines depend on it; TSC-deadline writes bring their own).
        match quirks::guest_tsc(&self.fd) {
            Ok(tsc) => {
                self.lapic
                    .lock()
                    .set_clock(GuestClock::new(tsc, self.tsc_khz, Instant::now()))
            }
            Err(e) => log::warn!(
                "vCPU {}: guest TSC unknown for the APIC timer: {e}",
                self.index
            ),
        }
        // Parked on HLT (kept across a pause, so a halted vCPU does not wake up spuriously).
        let mut halted = self.halted;
        let mut exits: u64 = 0;
        // The last unknown emulation failure: (RIP, times run again in a row).
        let mut unknown: Option<(u64, u32)> = None;
        self.control.shared.set_activity(Activity::Running);
        loop {
            if self.stop.stopped() {
                return Ok(());
            }
            // The only control check on the hot path: one relaxed load.
            if self.control.shared.pending() {
                let stop = self.stop.clone();
                let mut hooks = Hooks {
                    fd: &mut self.fd,
                    index: self.index,
                    halted,
                    tsc_khz: self.tsc_khz,
                };
                let r = self.control.handle_events(&|| stop.stopped(), &mut hooks);
                if r == AfterEvents::Stop {
                    return Ok(());
                }
                continue;
            }
            if halted {
                match self.halt() {
                    // Woken by an interrupt, an NMI or INIT (then the SIPI wait below).
                    Woken::Run => halted = false,
                    Woken::Stop => return Ok(()),
                    Woken::Event => continue,
                }
            }
            match self.wait_until_running()? {
                Woken::Run => {}
                Woken::Stop => return Ok(()),
                Woken::Event => continue,
            }
            self.inject()?;
            let gate = self.zap.as_ref().map(|z| z.enter());
            let exit = self.fd.run();
            drop(gate);
            exits += 1;
            self.control.shared.set_exits(exits);
            let idx = self.index;
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.stats.count(Exit::Pio);
                    self.devices.pio_read(port, data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.stats.count(Exit::Pio);
                    self.devices.pio_write(port, data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) if ram_exit::is_ram(&self.mem, addr) => {
                    ram_exit::log_count(idx, addr, self.stats.count(Exit::RamAccess));
                    if let Err(e) = ram_exit::read(&self.mem, addr, data) {
                        log::warn!("vCPU {idx}: {e}");
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) if ram_exit::is_ram(&self.mem, addr) => {
                    ram_exit::log_count(idx, addr, self.stats.count(Exit::RamAccess));
                    if let Err(e) = ram_exit::write(&self.mem, addr, data, self.zap.as_deref()) {
                        log::warn!("vCPU {idx}: {e}");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.stats.count(mmio_kind(addr));
                    self.devices.mmio_read(idx, addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.stats.count(mmio_kind(addr));
                    self.devices.mmio_write(idx, addr, data);
                }
                Ok(VcpuExit::Hlt) => {
                    self.stats.count(Exit::Hlt);
                    halted = true;
                }
                Ok(VcpuExit::IrqWindowOpen) => {
                    self.stats.count(Exit::IrqWindow);
                }
                Ok(VcpuExit::X86Rdmsr(m)) => {
                    self.stats.count(Exit::Msr);
                    match read_apic_msr(&self.lapic, m.index) {
                        Some(v) => *m.data = v,
                        None => {
                            log::debug!("vCPU {idx}: RDMSR {:#x} -> #GP", m.index);
                            *m.error = 1;
                        }
                    }
                }
                Ok(VcpuExit::X86Wrmsr(m)) => {
                    self.stats.count(Exit::Msr);
                    let (index, value) = (m.index, m.data);
                    if index == msr::IA32_TSC_DEADLINE {
                        self.write_tsc_deadline(value)?;
                    } else if !write_apic_msr(&self.lapic, &self.chip, idx, index, value) {
                        log::debug!("vCPU {idx}: WRMSR {index:#x}={value:#x} -> #GP");
                        *m.error = 1;
                    }
                }
                Ok(VcpuExit::InternalError) => {
                    self.stats.count(Exit::EmulationFailure);
                    let run = self.fd.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active union member.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        return Err(Error::UnexpectedExit(
                            idx,
                            format!("KVM internal error, suberror {suberror}"),
                        ));
                    }
                    match quirks::handle_emulation_failure(&self.fd, &self.mem, &self.fixups) {
                        Ok(_) => unknown = None,
                        // KVM's emulator also fails when a guest memory access of its own
                        // (a locked compare-exchange, an instruction fetch) was cut short by a
                        // signal while waiting for the DSM (see `ram_exit`): nothing of the
                        // instruction was done, so running it again is safe. Only the same
                        // failure over and over is an instruction nobody can run.
                        Err(quirks::Error::Unknown { rip, .. })
                            if unknown.is_none_or(|(at, n)| at != rip || n < UNKNOWN_RETRIES) =>
                        {
                            let n = match unknown {
                                Some((at, n)) if at == rip => n + 1,
                                _ => 1,
                            };
                            unknown = Some((rip, n));
                            let all = self.stats.count(Exit::EmulationRetry);
                            if all.is_power_of_two() {
                                log::info!(
                                    "vCPU {idx}: unknown emulation failure at {rip:#x} run again \
                                     ({n} in a row here, {all} in all)"
                                );
                            }
                        }
                        Err(e) => return Err(Error::Quirk(idx, e)),
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    log::warn!("vCPU {idx}: triple fault");
                    self.stop.request(StopReason::TripleFault);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    log::info!("vCPU {idx}: system event {kind}");
                    self.stop
                        .request(if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                            StopReason::PowerOff
                        } else {
                            StopReason::Reset
                        });
                }
                Ok(other) => {
                    self.stats.count(Exit::Other);
                    return Err(Error::UnexpectedExit(idx, format!("{other:?}")));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.stats.count(Exit::Kick);
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return Err(Error::Kvm(idx, "RUN", e)),
            }
        }
    }

    /// Blocks an application processor until SIPI; loads its start state. Also ends when the
    /// VM stops or a control event is pending.
    fn wait_until_running(&mut self) -> Result<Woken, Error> {
        let mut st = self.lapic.lock();
        loop {
            if self.stop.stopped() {
                return Ok(Woken::Stop);
            }
            if self.control.shared.pending() {
                return Ok(Woken::Event);
            }
            match st.run_state {
                RunState::Running => return Ok(Woken::Run),
                RunState::Starting(vector) => {
                    st.run_state = RunState::Running;
                    drop(st);
                    log::info!(
                        "vCPU {} started by SIPI at {:#x}",
                        self.index,
                        u32::from(vector) << 12
                    );
                    cpu::start_ap(&self.fd, vector).map_err(|e| Error::Start(self.index, e))?;
                    self.control.shared.set_activity(Activity::Running);
                    return Ok(Woken::Run);
                }
                RunState::WaitForSipi => {
                    self.control.shared.set_activity(Activity::WaitingForSipi);
                    st = self
                        .lapic
                        .changed
                        .wait(st)
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Injects the highest deliverable interrupt if the guest can take it, else asks for an
    /// interrupt window.
    fn inject(&mut self) -> Result<(), Error> {
        let fd = self.fd.as_raw_fd();
        let mut st = self.lapic.lock();
        if st.nmi_pending {
            st.nmi_pending = false;
            self.kvm("NMI", self.fd.nmi())?;
        }
        let run = self.fd.get_kvm_run();
        match st.deliverable() {
            Some(v) if run.ready_for_interrupt_injection != 0 => {
                st.ack(v);
                let irq = kvm_interrupt { irq: u32::from(v) };
                // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from a valid reference on a vCPU
                // fd we own; the return value is checked.
                let ret = unsafe { ioctl_with_ref(&RawFd(fd), KVM_INTERRUPT(), &irq) };
                if ret < 0 {
                    return Err(Error::Kvm(
                        self.index,
                        "INTERRUPT",
                        kvm_ioctls::Error::last(),
                    ));
                }
                self.stats
                    .injected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                run.request_interrupt_window = u8::from(st.deliverable().is_some());
            }
            Some(_) => run.request_interrupt_window = 1,
            None => run.request_interrupt_window = 0,
        }
        Ok(())
    }

    /// HLT: sleep until an interrupt is deliverable, an NMI or INIT arrives ([`Woken::Run`]),
    /// the VM stops, or a control event is pending (the vCPU stays halted).
    fn halt(&self) -> Woken {
        let mut st = self.lapic.lock();
        self.control.shared.set_activity(Activity::Halted);
        let woken = loop {
            if self.stop.stopped() {
                break Woken::Stop;
            }
            if self.control.shared.pending() {
                break Woken::Event;
            }
            if st.deliverable().is_some() || st.nmi_pending || st.run_state != RunState::Running {
                break Woken::Run;
            }
            st = self
                .lapic
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        };
        if woken == Woken::Run {
            self.control.shared.set_activity(Activity::Running);
        }
        woken
    }

    fn write_tsc_deadline(&mut self, value: u64) -> Result<(), Error> {
        let tsc = quirks::guest_tsc(&self.fd).map_err(|e| Error::Quirk(self.index, e))?;
        self.lapic
            .lock()
            .set_tsc_deadline(value, tsc, self.tsc_khz, Instant::now());
        self.lapic.changed.notify_all();
        Ok(())
    }
}

/// An `RDMSR` the MSR filter sent to the VMM (local APIC MSRs); None means #GP.
fn read_apic_msr(lapic: &LocalApic, index: u32) -> Option<u64> {
    let st = lapic.lock();
    match index {
        msr::IA32_TSC_DEADLINE => Some(st.tsc_deadline()),
        msr::IA32_APICBASE => Some(st.apic_base()),
        X2APIC_MSR_BASE..=X2APIC_MSR_LAST => st.msr_read(index, Instant::now()).ok(),
        _ => None,
    }
}

/// A `WRMSR` of `IA32_APIC_BASE` or an x2APIC register by vCPU `cpu`; false means #GP.
fn write_apic_msr(lapic: &LocalApic, chip: &IrqChip, cpu: usize, index: u32, value: u64) -> bool {
    match index {
        msr::IA32_APICBASE => {
            let ok = lapic.lock().set_apic_base(value).is_ok();
            log::debug!("vCPU {cpu}: IA32_APIC_BASE = {value:#x} (accepted: {ok})");
            ok
        }
        X2APIC_MSR_BASE..=X2APIC_MSR_LAST => {
            let r = lapic.lock().msr_write(index, value, Instant::now());
            let Ok(effect) = r else { return false };
            if let Some(e) = effect {
                chip.apply(e, cpu);
            }
            // Timer registers may have moved the deadline (LVT timer, initial count, divide):
            // let the timer thread re-evaluate.
            if timer_register(u64::from(index - X2APIC_MSR_BASE) << 4) {
                lapic.changed.notify_all();
            }
            true
        }
        _ => false,
    }
}

struct RawFd(i32);
impl AsRawFd for RawFd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

fn mmio_kind(addr: u64) -> Exit {
    if (LAPIC_ADDR..LAPIC_ADDR + APIC_WINDOW).contains(&addr) {
        Exit::LapicMmio
    } else if (IOAPIC_ADDR..IOAPIC_ADDR + APIC_WINDOW).contains(&addr) {
        Exit::IoapicMmio
    } else {
        Exit::DeviceMmio
    }
}

/// The timer thread of one local APIC: fires its deadline and wakes the vCPU.
pub fn timer_thread(lapic: Arc<LocalApic>, stop: Arc<Stopper>) {
    let mut st = lapic.lock();
    loop {
        if stop.stopped() {
            return;
        }
        let now = Instant::now();
        if st.poll_timer(now) {
            drop(st);
            lapic.wake();
            st = lapic.lock();
            continue;
        }
        st = match st.deadline() {
            Some(d) => {
                lapic
                    .changed
                    .wait_timeout(st, d.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => lapic.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
        };
    }
}
