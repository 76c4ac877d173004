//! Disk backends: where the sectors of a virtio-blk device live.
//!
//! The device only needs positioned reads and writes, a flush, the size and a serial number,
//! which keeps the door open for a backend that forwards requests to the disk's home host.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Length of a virtio-blk serial number (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = 20;

/// Errors opening a disk backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("cannot open disk image {}: {source}", .path.display())]
    Open {
        /// Image path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The size or identity of the image could not be determined.
    #[error("cannot inspect disk image {}: {source}", .path.display())]
    Inspect {
        /// Image path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
}

/// Storage behind a block device. Offsets and lengths are in bytes; the device guarantees
/// that every access lies within `[0, size())`.
pub trait BlockBackend: Send {
    /// Size of the disk in bytes (only whole 512-byte sectors are exposed).
    fn size(&self) -> u64;
    /// Whether writes are refused (the device then offers `VIRTIO_BLK_F_RO`).
    fn read_only(&self) -> bool;
    /// Fills `buf` from the disk at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` to the disk at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Serial number reported by `VIRTIO_BLK_T_GET_ID`; unused trailing bytes are zero.
    fn serial(&self) -> [u8; SERIAL_LEN];
    /// What identifies the storage right now, for a snapshot to tell whether it is restored
    /// onto the same, unmodified disk; `None` if the backend cannot tell.
    fn identity(&self) -> Option<DiskIdentity> {
        None
    }
}

/// Identity of a disk image file at one moment: which file (device and inode), how large,
/// and when its data last changed. Two identities are equal only for the same file, not
/// written in between (up to the file system's timestamp granularity).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskIdentity {
    /// Path of the image when it was opened (canonical if possible, lossy UTF-8), for messages.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// ID of the device holding the file (`st_dev`).
    pub dev: u64,
    /// Inode number (`st_ino`).
    pub ino: u64,
    /// Last data modification, seconds since the epoch (`st_mtime`).
    pub mtime_sec: i64,
    /// Nanoseconds part of the last data modification (`st_mtime_nsec`).
    pub mtime_nsec: i64,
}

impl DiskIdentity {
    /// The first field in which `self` and `other` differ, ignoring the path (the same file
    /// may be reached through another path).
    pub fn differs_from(&self, other: &DiskIdentity) -> Option<&'static str> {
        if self.dev != other.dev {
            Some("device")
        } else if self.ino != other.ino {
            Some("inode")
        } else if self.size != other.size {
            Some("size")
        } else if (self.mtime_sec, self.mtime_nsec) != (other.mtime_sec, other.mtime_nsec) {
            Some("modification time")
        } else {
            None
        }
    }
}

/// A raw disk image in a local file (or a host block device).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// Canonical path (as given if it cannot be canonicalized).
    path: PathBuf,
    size: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
}

impl FileBackend {
    /// Opens the raw image at `path`, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let inspect = |source| Error::Inspect {
            path: path.to_owned(),
            source,
        };
        // Seeking to the end also works for block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(inspect)?;
        let meta = file.metadata().map_err(inspect)?;
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        let serial = derive_serial(&canonical, meta.dev(), meta.ino());
        Ok(FileBackend {
            file,
            path: canonical,
            size,
            read_only,
            serial,
        })
    }
}

/// `ssi-` followed by 16 hex digits of an FNV-1a hash of the image's path, device and inode:
/// stable for a given image, distinct between images.
fn derive_serial(path: &Path, dev: u64, ino: u64) -> [u8; SERIAL_LEN] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = path.as_os_str().as_encoded_bytes().iter();
    for &b in bytes.chain(&dev.to_le_bytes()).chain(&ino.to_le_bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut serial = [0u8; SERIAL_LEN];
    let text = format!("ssi-{hash:016x}");
    for (dst, src) in serial.iter_mut().zip(text.bytes()) {
        *dst = src;
    }
    serial
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn serial(&self) -> [u8; SERIAL_LEN] {
        self.serial
    }

    fn identity(&self) -> Option<DiskIdentity> {
        let meta = self.file.metadata().ok()?;
        Some(DiskIdentity {
            path: self.path.to_string_lossy().into_owned(),
            size: self.size,
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_printable_and_path_dependent() {
        let a = derive_serial(Path::new("/images/a.img"), 1, 2);
        let b = derive_serial(Path::new("/images/b.img"), 1, 2);
        let c = derive_serial(Path::new("/images/a.img"), 1, 3);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, derive_serial(Path::new("/images/a.img"), 1, 2));
        assert!(a.starts_with(b"ssi-"));
        assert!(a.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-'));
    }

    #[test]
    fn missing_image_is_an_error() {
        let err = FileBackend::open(Path::new("/nonexistent/ssi-vmm/disk.img"), true).unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/ssi-vmm/disk.img"));
    }
}
