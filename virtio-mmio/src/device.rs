//! The interface between the transport and a virtio device model.

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;

use crate::Interrupt;

/// Errors a device reports to its transport.
///
/// Any error returned by [`VirtioDevice::activate`] or [`VirtioDevice::process_queue`] makes the
/// transport set `DEVICE_NEEDS_RESET` in the device status; the device stays unusable until the
/// driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device was given the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Number of queues the device needs.
        expected: usize,
        /// Number of queues it was given.
        got: usize,
    },
    /// A queue the device needs was not enabled by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(u16),
    /// The driver notified a queue the device does not have.
    #[error("queue {0} does not exist")]
    InvalidQueueIndex(u16),
    /// The device was notified before it was activated, or after it failed.
    #[error("device is not activated")]
    NotActivated,
    /// The device model failed; the device needs a reset.
    #[error("device failure: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device model driven by a transport such as [`crate::MmioTransport`].
///
/// The transport owns everything generic (feature selection windows, queue registers, device
/// status, interrupt status); the device only sees the results: the negotiated features, the
/// validated queues at activation, and queue notifications.
///
/// Life cycle: `avail_features` → `ack_features` (when the driver sets `FEATURES_OK`) →
/// `activate` (when the driver sets `DRIVER_OK`) → `process_queue` on every `QueueNotify` →
/// `reset` (when the driver writes 0 to `Status`; may also be called on a never-activated
/// device). None of these methods may panic on guest-controlled input.
///
/// # Snapshots
///
/// A device model has two parts in a snapshot (see `MmioTransportState`): its own typed state,
/// handed to the transport as JSON by [`save_state`](Self::save_state) and restored by the
/// device's own [`snapshot::Persist`] implementation before the transport is restored; and the
/// ring positions of its live queues, reported by [`queue_states`](Self::queue_states). On
/// restore the transport replays [`ack_features`](Self::ack_features) and
/// [`activate`](Self::activate) with queues that carry the saved positions, so `activate` is
/// also the resume point: a device must accept queues whose `next_avail`/`next_used` are not
/// zero (and may refuse positions it could not have left, such as requests in flight).
pub trait VirtioDevice: Send {
    /// Virtio device ID (`VIRTIO_ID_*`), e.g. 2 for a block device.
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length of the slice is the number of queues. Every size
    /// must be a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;

    /// Records the features the driver accepted: always a subset of
    /// [`avail_features`](Self::avail_features) containing `VIRTIO_F_VERSION_1`.
    fn ack_features(&mut self, features: u64);

    /// Reads `data.len()` bytes of the device configuration space at `offset`. Bytes past the
    /// end of the configuration space must read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes `data` to the device configuration space at `offset`; read-only or unknown
    /// fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device. `queues` has one entry per [`queue_max_sizes`](Self::queue_max_sizes)
    /// element, in order; queues the driver enabled are `ready()`, lie inside `mem`, and have
    /// `VIRTIO_RING_F_EVENT_IDX` set according to the negotiated features. Queues the driver
    /// left disabled are not ready.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), DeviceError>;

    /// Processes the buffers the driver made available in queue `queue_index`, adds used
    /// buffers and interrupts the driver through the [`Interrupt`] given at activation. An
    /// error means the queue is corrupted beyond recovery.
    fn process_queue(&mut self, queue_index: u16) -> Result<(), DeviceError>;

    /// Returns the device to its initial, non-activated state, dropping queues and memory.
    fn reset(&mut self);

    /// The device-specific saved state (configuration, backend identity, ...): the device's
    /// typed `Persist::State` converted with `serde_json::to_value`, or `Value::Null` for a
    /// device without state of its own. Called on a paused device with no request in flight;
    /// the transport stores it in `MmioTransportState::device`.
    fn save_state(&self) -> serde_json::Value;

    /// The state of each queue given to [`activate`](Self::activate), in order, as
    /// `Queue::state()` returns it; empty while the device is not activated. The transport
    /// saves the ring positions (`next_avail`, `next_used`) from it.
    fn queue_states(&self) -> Vec<QueueState>;
}
