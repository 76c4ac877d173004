//! Parsing of virtio-blk descriptor chains into requests.
//!
//! A request is a 16-byte device-readable header (`type: le32, reserved: le32, sector: le64`),
//! optional data, and a one-byte device-writable status at the very end. The parser makes no
//! assumption about how these are split into descriptors (virtio 1.x, 2.6.4): the header is
//! the first 16 device-readable bytes, `OUT` data the remaining readable bytes, `IN` data the
//! writable bytes before the status byte, which is the last byte of the last descriptor.
//!
//! Every buffer is checked against guest memory before any data moves.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Size of the request header.
pub const HEADER_SIZE: u32 = 16;

/// Reasons a descriptor chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The head index is out of range or its descriptor is unreadable.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// A `next` link is out of range, loops, or the chain is longer than the queue.
    #[error("descriptor chain is broken, loops or is longer than the queue")]
    BrokenChain,
    /// The last descriptor is not device-writable or has length zero.
    #[error("no device-writable status byte at the end of the chain")]
    MissingStatus,
    /// A buffer is not entirely inside guest memory.
    #[error("buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes.
    #[error("request header has only {0} device-readable bytes")]
    ShortHeader(u64),
}

/// A guest buffer, known to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// Request types the device knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read sectors into the guest.
    In,
    /// `VIRTIO_BLK_T_OUT`: write sectors from the guest.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`: make previous writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: return the serial number.
    GetId,
    /// Anything else; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request type from the header.
    pub request_type: RequestType,
    /// First sector (512 bytes) of the transfer.
    pub sector: u64,
    /// Device-readable buffers after the header.
    pub data_out: Vec<Segment>,
    /// Device-writable buffers before the status byte.
    pub data_in: Vec<Segment>,
}

/// Outcome of parsing one chain.
#[derive(Debug)]
pub struct Parsed {
    /// Where to write the status byte, if the chain has a usable one.
    pub status: Option<GuestAddress>,
    /// The request, or why the chain is malformed.
    pub request: Result<Request, Error>,
}

impl Parsed {
    fn failed(status: Option<GuestAddress>, error: Error) -> Self {
        Parsed {
            status,
            request: Err(error),
        }
    }
}

/// Parses `chain`, whose buffers live in `mem`.
pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Parsed
where
    M: Deref,
    M::Target: GuestMemory,
{
    // The chain iterator stops silently at an invalid link, an unreadable descriptor or after
    // `queue size` descriptors; a last descriptor that still has NEXT set reveals that.
    let descriptors: Vec<Descriptor> = chain.collect();
    let Some(last) = descriptors.last() else {
        return Parsed::failed(None, Error::EmptyChain);
    };
    if last.has_next() {
        return Parsed::failed(None, Error::BrokenChain);
    }
    let status = status_byte(last, mem);
    let request = match status {
        Some(_) => build(&descriptors, mem),
        None => Err(Error::MissingStatus),
    };
    Parsed { status, request }
}

fn status_byte(last: &Descriptor, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().0.checked_add(u64::from(last.len()) - 1)?;
    GuestMemory::check_range(mem, GuestAddress(addr), 1, Permissions::Write)
        .then_some(GuestAddress(addr))
}

fn build(descriptors: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Request, Error> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for desc in descriptors {
        let (list, access) = if desc.is_write_only() {
            (&mut writable, Permissions::Write)
        } else if writable.is_empty() {
            (&mut readable, Permissions::Read)
        } else {
            return Err(Error::ReadableAfterWritable);
        };
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if segment.len == 0 {
            continue;
        }
        let in_memory = usize::try_from(segment.len)
            .is_ok_and(|len| GuestMemory::check_range(mem, segment.addr, len, access));
        if !in_memory {
            return Err(Error::OutsideMemory {
                addr: segment.addr.0,
                len: segment.len,
            });
        }
        list.push(segment);
    }
    // Drop the status byte: the last byte of the last (writable, non-empty) descriptor.
    if let Some(last) = writable.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            writable.pop();
        }
    }

    let data_out = split_off(&mut readable, HEADER_SIZE);
    let header_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    if header_len < u64::from(HEADER_SIZE) {
        return Err(Error::ShortHeader(header_len));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    let mut filled = 0;
    for segment in &readable {
        let end = filled + segment.len as usize;
        let dst = header.get_mut(filled..end).ok_or(Error::ShortHeader(0))?;
        mem.read_slice(dst, segment.addr)
            .map_err(|_| Error::OutsideMemory {
                addr: segment.addr.0,
                len: segment.len,
            })?;
        filled = end;
    }
    let mut request_type = [0u8; 4];
    request_type.copy_from_slice(&header[0..4]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok(Request {
        request_type: RequestType::from(u32::from_le_bytes(request_type)),
        sector: u64::from_le_bytes(sector),
        data_out,
        data_in: writable,
    })
}

/// Keeps the first `at` bytes in `segments` and returns the rest.
fn split_off(segments: &mut Vec<Segment>, at: u32) -> Vec<Segment> {
    let mut remaining = at;
    for index in 0..segments.len() {
        let segment = segments[index];
        if remaining >= segment.len {
            remaining -= segment.len;
            continue;
        }
        let mut rest = segments.split_off(index);
        if remaining > 0 {
            // Split this segment: `remaining` bytes stay, the rest moves on.
            segments.push(Segment {
                addr: segment.addr,
                len: remaining,
            });
            rest[0] = Segment {
                addr: GuestAddress(segment.addr.0 + u64::from(remaining)),
                len: segment.len - remaining,
            };
        }
        return rest;
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_off_cases() {
        let mut v = vec![seg(0x100, 16), seg(0x200, 512)];
        assert_eq!(split_off(&mut v, 16), vec![seg(0x200, 512)]);
        assert_eq!(v, vec![seg(0x100, 16)]);

        let mut v = vec![seg(0x100, 8), seg(0x200, 520)];
        assert_eq!(split_off(&mut v, 16), vec![seg(0x208, 512)]);
        assert_eq!(v, vec![seg(0x100, 8), seg(0x200, 8)]);

        let mut v = vec![seg(0x100, 4), seg(0x200, 4)];
        assert!(split_off(&mut v, 16).is_empty());
        assert_eq!(v.len(), 2);

        let mut v = vec![seg(0x100, 528)];
        assert_eq!(split_off(&mut v, 16), vec![seg(0x110, 512)]);
        assert_eq!(v, vec![seg(0x100, 16)]);
    }

    #[test]
    fn request_types() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Unsupported(11));
    }
}
