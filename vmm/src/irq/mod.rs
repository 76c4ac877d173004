//! Glue between the `irqchip` crate (local APICs, IOAPIC, router: no KVM, no threads) and this
//! VMM: the [`Kicker`] that gets a vCPU thread out of `KVM_RUN`, and [`IrqLine`], an IOAPIC
//! input handed to a device.

use std::sync::Arc;

use irqchip::IrqChip;

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
}

impl irqchip::Kick for Kicker {
    /// Makes the vCPU leave (or not enter) `KVM_RUN`.
    fn kick(&self) {
        // SAFETY: the pointer is valid for the kicker's lifetime (constructor contract).
        unsafe { std::ptr::write_volatile(self.immediate_exit, 1) };
        // SAFETY: the thread id came from pthread_self of a vCPU thread that is joined only after
        // the VM stops kicking; the signal has a no-op handler installed at start-up.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// One IOAPIC input line, handed to a device.
#[derive(Clone)]
pub struct IrqLine {
    chip: Arc<IrqChip>,
    pin: u32,
}

impl IrqLine {
    /// Line `pin` of `chip`.
    pub fn new(chip: Arc<IrqChip>, pin: u32) -> Self {
        IrqLine { chip, pin }
    }

    /// Raises an edge.
    pub fn pulse(&self) {
        self.chip.pulse(self.pin);
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.pulse();
        Ok(())
    }
}
