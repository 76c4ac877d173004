//! Interrupt plumbing between a device, its transport and the VMM's interrupt controller.
//!
//! The virtio-mmio device has a single interrupt line and an `InterruptStatus` register telling
//! the driver why the line was raised (bit 0: used buffer, bit 1: configuration change). The
//! device sets the bit first and then raises the line; the driver reads the register and clears
//! the bits it handled with `InterruptACK`.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// `InterruptStatus` bit: the device used a buffer in at least one virtqueue.
pub const INT_USED_BUFFER: u32 = VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: the device configuration (or device status) changed.
pub const INT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

/// The device's interrupt line, implemented by the VMM.
///
/// The line is edge-triggered: every call to [`InterruptLine::trigger`] must deliver one
/// interrupt to the guest (for ssi-vmm, an edge on the device's pin of the userspace IOAPIC).
/// It may be called from any thread that processes a queue.
pub trait InterruptLine: Send + Sync {
    /// Raises the device's interrupt line once.
    fn trigger(&self);
}

struct Shared {
    status: AtomicU32,
    config_generation: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

/// Handle a device uses to interrupt the driver; cheap to clone.
///
/// It owns the transport's `InterruptStatus` and `ConfigGeneration` registers, so that the
/// status bit is always set before the line is raised.
#[derive(Clone)]
pub struct Interrupt {
    shared: Arc<Shared>,
}

impl Interrupt {
    /// Creates the interrupt state of one device, delivering through `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Interrupt {
            shared: Arc::new(Shared {
                status: AtomicU32::new(0),
                config_generation: AtomicU32::new(0),
                line,
            }),
        }
    }

    /// Tells the driver that used buffers were added: sets `InterruptStatus` bit 0 and raises
    /// the line.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_BUFFER);
    }

    /// Tells the driver that the device configuration space changed: bumps `ConfigGeneration`,
    /// sets `InterruptStatus` bit 1 and raises the line.
    pub fn signal_config_change(&self) {
        self.shared.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG_CHANGE);
    }

    /// Current value of the `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.shared.status.load(Ordering::SeqCst)
    }

    /// Current value of the `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.shared.config_generation.load(Ordering::SeqCst)
    }

    /// Signals a device status change (`DEVICE_NEEDS_RESET`): sets bit 1 without touching the
    /// configuration generation.
    pub(crate) fn signal_status_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    /// Handles a write of `bits` to `InterruptACK`.
    pub(crate) fn ack(&self, bits: u32) {
        self.shared.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets both registers to saved values on restore, without raising the line: an interrupt
    /// the saved state shows pending was delivered before the snapshot.
    pub(crate) fn restore(&self, status: u32, config_generation: u32) {
        self.shared.status.store(status, Ordering::SeqCst);
        self.shared
            .config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// Clears `InterruptStatus` on device reset.
    pub(crate) fn clear(&self) {
        self.shared.status.store(0, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.shared.status.fetch_or(bit, Ordering::SeqCst);
        self.shared.line.trigger();
    }
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl InterruptLine for Counter {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn status_bits_set_before_trigger_and_acked() {
        let line = Arc::new(Counter::default());
        let irq = Interrupt::new(line.clone());
        assert_eq!(irq.status(), 0);

        irq.signal_used_queue();
        assert_eq!(irq.status(), INT_USED_BUFFER);
        assert_eq!(line.0.load(Ordering::SeqCst), 1);

        irq.signal_config_change();
        assert_eq!(irq.status(), INT_USED_BUFFER | INT_CONFIG_CHANGE);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(line.0.load(Ordering::SeqCst), 2);

        irq.ack(INT_USED_BUFFER);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
        irq.signal_status_change();
        assert_eq!(irq.config_generation(), 1);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
