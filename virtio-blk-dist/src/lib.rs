//! The virtio-blk device of ssi-vmm, served over the [`virtio_mmio`] transport.
//!
//! "dist" because a disk has a home host: later, requests issued by vCPUs running elsewhere
//! will be forwarded there through a [`BlockBackend`]. For now every backend is local
//! ([`FileBackend`], a raw image file).
//!
//! # The device
//!
//! [`Block`] implements [`virtio_mmio::VirtioDevice`]: device ID 2, one queue of
//! [`QUEUE_SIZE`] entries, and the features `VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`,
//! `VIRTIO_BLK_F_FLUSH`, `VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_SIZE_MAX`,
//! `VIRTIO_BLK_F_BLK_SIZE` and, for read-only images, `VIRTIO_BLK_F_RO`. The configuration
//! space holds `capacity` (512-byte sectors), `size_max`, `seg_max` and `blk_size` (512).
//!
//! # Request path
//!
//! 1. The guest writes the queue index to `QueueNotify`; the VMM forwards the MMIO exit to
//!    [`virtio_mmio::MmioTransport::write`], which calls [`Block`]'s `process_queue`.
//! 2. With guest notifications suppressed, the device pops every available descriptor chain.
//!    The chain is collected (at most the queue size, so loops end) and checked: every
//!    buffer must lie in guest memory, device-readable buffers come first, the first 16
//!    readable bytes are the header (`type`, `sector`), the last byte of the last,
//!    device-writable descriptor is the status.
//! 3. The request runs against the backend through a bounce buffer: `IN` reads sectors into
//!    the writable buffers, `OUT` writes the readable ones, `FLUSH` calls `fdatasync`,
//!    `GET_ID` returns a 20-byte serial derived from the image path and inode, anything else
//!    gets `VIRTIO_BLK_S_UNSUPP`. Unaligned, oversized (over [`MAX_REQUEST_BYTES`]) or
//!    out-of-disk transfers and writes to read-only disks get `VIRTIO_BLK_S_IOERR` before
//!    any data moves.
//! 4. The status byte is written and the chain is returned in the used ring with the number
//!    of bytes written into guest buffers (data + status). A malformed chain with a
//!    writable status byte gets `VIRTIO_BLK_S_IOERR`; one without is returned with length 0.
//! 5. Notifications are re-enabled (updating `avail_event` with EVENT_IDX) and, if the driver
//!    wants one (`needs_notification`), `InterruptStatus` bit 0 is set and the interrupt line
//!    is triggered.
//!
//! # Snapshots
//!
//! [`Block`] implements [`snapshot::Persist`] with [`BlockState`]: capacity, read-only flag,
//! offered features, the serial number the guest saw and the image's [`DiskIdentity`]. The
//! restore opens the image named in [`BlockRestoreArgs`] and refuses a disk of another size
//! and, with [`DiskCheck::SameFile`], another file or one modified since the snapshot. The
//! transport saves the ring positions and the negotiated features; since the device completes
//! every request before `process_queue` returns, a paused device has no request in flight.
//!
//! A queue that cannot be processed at all (available index beyond the ring, head index out
//! of range, unreadable rings) makes `process_queue` fail: the device stops and the transport
//! sets `DEVICE_NEEDS_RESET` instead of spinning. Nothing the guest puts in the queue can
//! make the device panic or touch memory outside guest RAM.

pub mod block;

pub use block::{
    Block, BlockBackend, BlockRestoreArgs, BlockState, DiskCheck, DiskIdentity, Error, FileBackend,
    StateError, BLOCK_SIZE, MAX_REQUEST_BYTES, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SERIAL_LEN,
    SIZE_MAX,
};
/// The transport this device plugs into, re-exported for the VMM.
pub use virtio_mmio;
