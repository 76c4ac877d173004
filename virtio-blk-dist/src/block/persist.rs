//! Saved state of the block device: [`BlockState`] through [`snapshot::Persist`].
//!
//! The device's own state is small: what the guest was told about the disk (capacity,
//! read-only flag, offered features, serial number) and which image file backed it. The
//! negotiated features and the queue (registers and ring positions) belong to the transport's
//! state (`virtio_mmio::MmioTransportState`), which replays `ack_features` and `activate`.
//!
//! # Precondition: no request in flight
//!
//! [`Block`] completes every request it pops before `process_queue` returns, so a paused
//! device (no `process_queue` running) never has one in flight and `save` cannot fail. The
//! restored device refuses, at `activate`, a queue whose positions show chains popped and
//! never returned (`next_avail != next_used`): no such state can come from this device.
//!
//! # The disk image
//!
//! Copying the image for the snapshot is done elsewhere. The restore opens the image named in
//! [`BlockRestoreArgs`] and compares it with the saved [`DiskIdentity`] as [`DiskCheck`] says:
//! restoring onto another file, or onto the same file written since the snapshot, would show
//! the guest a disk that disagrees with its page cache and file system journal.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use super::backend::{self, BlockBackend, DiskIdentity, FileBackend, SERIAL_LEN};
use super::Block;

/// Saved state of a virtio-blk device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    /// Capacity in 512-byte sectors (the configuration space's `capacity`).
    pub capacity: u64,
    /// Whether the disk is read-only (`VIRTIO_BLK_F_RO` offered).
    pub read_only: bool,
    /// Features the device offered.
    pub avail_features: u64,
    /// Serial number the device reports (`VIRTIO_BLK_T_GET_ID`); the restored device reports
    /// the same, whatever file it is restored onto.
    pub serial: [u8; SERIAL_LEN],
    /// Identity of the image when saved; `None` if the backend cannot tell.
    pub disk: Option<DiskIdentity>,
}

/// How strictly a restore compares the image it opens with the snapshot's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskCheck {
    /// The very image the snapshot was taken from, not written since: device, inode, size and
    /// modification time must match (the path may differ).
    #[default]
    SameFile,
    /// A copy of the disk the caller vouches for (e.g. the snapshot's own copy, checked
    /// against its checksum): only the capacity must match.
    SizeOnly,
}

/// What [`Block::restore`] needs: the image to open and how to check it.
#[derive(Clone, Debug)]
pub struct BlockRestoreArgs {
    /// Raw image to open (read-only if the saved device was).
    pub path: PathBuf,
    /// How to compare it with the saved identity.
    pub check: DiskCheck,
}

/// Why a saved block device state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The image cannot be opened.
    #[error(transparent)]
    Open(#[from] backend::Error),
    /// The backend's read-only flag differs from the saved one.
    #[error("saved read-only flag {saved}, the backend's is {backend}")]
    ReadOnly {
        /// Saved `read_only`.
        saved: bool,
        /// The backend's.
        backend: bool,
    },
    /// The disk has another capacity.
    #[error("saved capacity {saved} sectors, the disk has {disk}")]
    Capacity {
        /// Saved `capacity`.
        saved: u64,
        /// The disk's capacity in sectors.
        disk: u64,
    },
    /// The device would offer other features than the driver negotiated against.
    #[error("saved features {saved:#x}, the device offers {device:#x}")]
    Features {
        /// Saved `avail_features`.
        saved: u64,
        /// What the restored device offers.
        device: u64,
    },
    /// [`DiskCheck::SameFile`], but the snapshot recorded no identity.
    #[error("the snapshot records no disk identity to compare the image with")]
    NoSavedIdentity,
    /// [`DiskCheck::SameFile`], but the backend cannot tell its identity.
    #[error("the disk backend cannot tell its identity")]
    NoDiskIdentity,
    /// [`DiskCheck::SameFile`], and the image is another file or was modified since.
    #[error(
        "disk image {} is not the snapshot's {} as it was ({what} differs): another file, or \
         written since the snapshot",
        .found.path, .saved.path
    )]
    DiskChanged {
        /// The first differing field.
        what: &'static str,
        /// Saved identity.
        saved: Box<DiskIdentity>,
        /// The opened image's identity.
        found: Box<DiskIdentity>,
    },
}

impl Block {
    /// Restores a block device on top of any backend: the [`Persist::restore`] checks without
    /// opening a file.
    pub fn restore_backend(
        backend: Box<dyn BlockBackend>,
        state: &BlockState,
        check: DiskCheck,
    ) -> Result<Self, StateError> {
        if backend.read_only() != state.read_only {
            return Err(StateError::ReadOnly {
                saved: state.read_only,
                backend: backend.read_only(),
            });
        }
        let found = backend.identity();
        let mut block = Block::with_backend(backend);
        if block.capacity() != state.capacity {
            return Err(StateError::Capacity {
                saved: state.capacity,
                disk: block.capacity(),
            });
        }
        if block.avail_features != state.avail_features {
            return Err(StateError::Features {
                saved: state.avail_features,
                device: block.avail_features,
            });
        }
        if check == DiskCheck::SameFile {
            let saved = state.disk.as_ref().ok_or(StateError::NoSavedIdentity)?;
            let found = found.ok_or(StateError::NoDiskIdentity)?;
            if let Some(what) = saved.differs_from(&found) {
                return Err(StateError::DiskChanged {
                    what,
                    saved: Box::new(saved.clone()),
                    found: Box::new(found),
                });
            }
        }
        block.executor.set_serial(state.serial);
        Ok(block)
    }
}

/// Restore checks the image against the state: same read-only flag, same capacity, the same
/// offered features (the driver negotiated against them), and the identity [`DiskCheck`] asks
/// for. The serial number is taken as saved (any 20 bytes are a valid serial).
impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockRestoreArgs;
    type Error = StateError;

    /// Saves a paused device (see the module documentation: nothing is ever in flight).
    fn save(&self) -> BlockState {
        BlockState {
            capacity: self.capacity(),
            read_only: self.read_only(),
            avail_features: self.avail_features,
            serial: self.executor.serial(),
            disk: self.executor.backend().identity(),
        }
    }

    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Self, StateError> {
        let backend = FileBackend::open(&args.path, state.read_only)?;
        Block::restore_backend(Box::new(backend), state, args.check)
    }
}
