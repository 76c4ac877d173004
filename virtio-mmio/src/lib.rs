//! Device-agnostic virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! A virtio-mmio device is a 4 KiB window of 32-bit registers followed by the device-specific
//! configuration space at offset 0x100, plus one interrupt line. This crate implements the
//! register file and the device life cycle; device models plug in through [`VirtioDevice`].
//!
//! # Wiring it into a VMM
//!
//! ```text
//! let line: Arc<dyn InterruptLine> = ...;               // raises the device's IOAPIC pin
//! let mut transport = MmioTransport::new(Box::new(device), guest_mem.clone(), line)?;
//! // KVM_EXIT_MMIO inside [base, base + MMIO_WINDOW_SIZE):
//! if is_write { transport.write(addr - base, data) } else { transport.read(addr - base, data) }
//! ```
//!
//! The guest finds the device through the kernel command line
//! (`virtio_mmio.device=4K@0xd0000000:5`) or firmware tables.
//!
//! # Life cycle
//!
//! 1. The driver resets the device (`Status` = 0), sets `ACKNOWLEDGE` and `DRIVER`, reads
//!    `DeviceFeatures` through `DeviceFeaturesSel` and writes the subset it wants to
//!    `DriverFeatures`.
//! 2. The driver sets `FEATURES_OK`; the transport keeps the bit only if the driver features
//!    are a subset of the offered ones and include `VIRTIO_F_VERSION_1`, and then calls
//!    [`VirtioDevice::ack_features`].
//! 3. For each queue: `QueueSel`, `QueueNum`, the ring addresses, then `QueueReady` = 1. The
//!    transport validates size, alignment and that the rings lie in guest memory.
//! 4. The driver sets `DRIVER_OK`: the transport builds `virtio_queue::Queue`s and calls
//!    [`VirtioDevice::activate`].
//! 5. `QueueNotify` writes call [`VirtioDevice::process_queue`] synchronously; the device adds
//!    used buffers and calls [`Interrupt::signal_used_queue`], which sets `InterruptStatus`
//!    bit 0 and then triggers the [`InterruptLine`].
//!
//! # Snapshots
//!
//! [`MmioTransport`] implements [`snapshot::Persist`] with [`MmioTransportState`]: the register
//! file, one [`MmioQueueState`] per queue (registers and ring positions) and the device's own
//! state as JSON ([`VirtioDevice::save_state`]). A restore rebuilds the device first (its own
//! `Persist`, from [`MmioTransportState::device_state`]), then the transport, which validates
//! everything as untrusted input and re-activates a running device where it stopped.
//!
//! Nothing the guest writes can make the transport panic: malformed accesses are ignored
//! with a warning, and invalid queue configuration or a device failure sets
//! `DEVICE_NEEDS_RESET` (with a configuration-change interrupt once `DRIVER_OK` is set) and
//! stops queue processing until the driver resets the device.

#![deny(missing_docs)]

mod device;
mod interrupt;
mod layout;
mod transport;

pub use device::{DeviceError, VirtioDevice};
pub use interrupt::{Interrupt, InterruptLine, INT_CONFIG_CHANGE, INT_USED_BUFFER};
pub use layout::{regs, status, MAGIC_VALUE, MMIO_VERSION, MMIO_WINDOW_SIZE, VENDOR_ID};
pub use transport::{
    Error, MmioQueueState, MmioTransport, MmioTransportArgs, MmioTransportState, StateError,
};

/// Re-exported so device models use the same version as the transport.
pub use virtio_queue;
/// Re-exported so device models use the same version as the transport.
pub use vm_memory;
