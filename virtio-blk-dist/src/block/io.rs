//! Execution of parsed requests against the disk backend.
//!
//! Data moves through a bounce buffer in chunks, so no host pointer into guest memory is
//! ever handed to the backend, and all bounds checks happen before the first byte moves.

use std::io;

use log::warn;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::backend::{BlockBackend, SERIAL_LEN};
use super::request::{Request, RequestType, Segment};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Maximum number of data segments per request (config `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Maximum size of one data segment (config `size_max`).
pub const SIZE_MAX: u32 = 256 * 1024;
/// Largest data transfer accepted in one request: `SEG_MAX * SIZE_MAX` (32 MiB).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Size of the bounce buffer.
const CHUNK: usize = 128 * 1024;

/// Reasons a well-formed request fails with `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transfer is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The transfer exceeds [`MAX_REQUEST_BYTES`].
    #[error("data length {0} exceeds the per-request limit")]
    TooLong(u64),
    /// The transfer does not fit on the disk.
    #[error("{len} bytes at sector {sector} are past the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Transfer length in bytes.
        len: u64,
    },
    /// Buffers in the wrong direction for the request type.
    #[error("request carries data buffers in the wrong direction")]
    WrongDirection,
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The backend failed.
    #[error("disk i/o failed: {0}")]
    Backend(#[source] io::Error),
    /// Guest memory could not be accessed.
    #[error("guest memory access failed: {0}")]
    Memory(#[source] GuestMemoryError),
}

/// Runs requests against a backend.
pub struct Executor {
    backend: Box<dyn BlockBackend>,
    /// Serial number `GET_ID` returns: the backend's, or the one a restored snapshot recorded.
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
}

impl Executor {
    /// Wraps `backend`.
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        Executor {
            serial: backend.serial(),
            backend,
            bounce: vec![0; CHUNK],
        }
    }

    /// The serial number the device reports.
    pub fn serial(&self) -> [u8; SERIAL_LEN] {
        self.serial
    }

    /// Reports `serial` instead of the backend's (the guest keeps seeing the serial it saw
    /// before a snapshot, even on a copy of the image).
    pub fn set_serial(&mut self, serial: [u8; SERIAL_LEN]) {
        self.serial = serial;
    }

    /// The backend.
    pub fn backend(&self) -> &dyn BlockBackend {
        self.backend.as_ref()
    }

    /// Disk capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    /// Executes `request`; returns the status byte and the number of bytes written to guest
    /// data buffers (excluding the status byte).
    pub fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> (u8, u32) {
        let mut written = 0;
        let result = match request.request_type {
            RequestType::In => self.read(mem, request, &mut written),
            RequestType::Out => self.write(mem, request),
            RequestType::Flush => self.backend.flush().map_err(Error::Backend),
            RequestType::GetId => self.get_id(mem, request, &mut written),
            RequestType::Unsupported(kind) => {
                warn!("virtio-blk: unsupported request type {kind}");
                return (VIRTIO_BLK_S_UNSUPP as u8, 0);
            }
        };
        match result {
            Ok(()) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                warn!(
                    "virtio-blk: {:?} request at sector {} failed: {e}",
                    request.request_type, request.sector
                );
                (VIRTIO_BLK_S_IOERR as u8, written)
            }
        }
    }

    /// Checks a transfer of the segments' total length at `sector`; returns the byte offset.
    fn check_transfer(&self, sector: u64, segments: &[Segment]) -> Result<u64, Error> {
        let len: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        if len > MAX_REQUEST_BYTES {
            return Err(Error::TooLong(len));
        }
        if len % SECTOR_SIZE != 0 {
            return Err(Error::UnalignedLength(len));
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|offset| {
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= self.capacity() * SECTOR_SIZE)
            })
            .ok_or(Error::OutOfRange { sector, len })?;
        Ok(offset)
    }

    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        request: &Request,
        written: &mut u32,
    ) -> Result<(), Error> {
        if !request.data_out.is_empty() {
            return Err(Error::WrongDirection);
        }
        let mut offset = self.check_transfer(request.sector, &request.data_in)?;
        for segment in &request.data_in {
            let mut done = 0u32;
            while done < segment.len {
                let n = (segment.len - done).min(CHUNK as u32);
                let buf = &mut self.bounce[..n as usize];
                self.backend.read_at(buf, offset).map_err(Error::Backend)?;
                mem.write_slice(buf, at(segment, done))
                    .map_err(Error::Memory)?;
                done += n;
                offset += u64::from(n);
                *written += n;
            }
        }
        Ok(())
    }

    fn write(&mut self, mem: &GuestMemoryMmap, request: &Request) -> Result<(), Error> {
        if !request.data_in.is_empty() {
            return Err(Error::WrongDirection);
        }
        if self.backend.read_only() {
            return Err(Error::ReadOnly);
        }
        let mut offset = self.check_transfer(request.sector, &request.data_out)?;
        for segment in &request.data_out {
            let mut done = 0u32;
            while done < segment.len {
                let n = (segment.len - done).min(CHUNK as u32);
                let buf = &mut self.bounce[..n as usize];
                mem.read_slice(buf, at(segment, done))
                    .map_err(Error::Memory)?;
                self.backend.write_at(buf, offset).map_err(Error::Backend)?;
                done += n;
                offset += u64::from(n);
            }
        }
        Ok(())
    }

    fn get_id(
        &mut self,
        mem: &GuestMemoryMmap,
        request: &Request,
        written: &mut u32,
    ) -> Result<(), Error> {
        let serial = self.serial;
        let mut rest: &[u8] = &serial;
        for segment in &request.data_in {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(segment.len as usize);
            mem.write_slice(&rest[..n], segment.addr)
                .map_err(Error::Memory)?;
            rest = &rest[n..];
            *written += n as u32;
        }
        debug_assert!(*written as usize <= SERIAL_LEN);
        Ok(())
    }
}

/// `offset` bytes into `segment`, which is known to lie in guest memory (so this cannot wrap).
fn at(segment: &Segment, offset: u32) -> GuestAddress {
    GuestAddress(segment.addr.0.wrapping_add(u64::from(offset)))
}
