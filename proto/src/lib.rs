//! The ssi-vmm host-to-host wire protocol, version [`PROTOCOL_VERSION`].
//!
//! Every pair of hosts shares one persistent, ordered byte stream (TCP today, an RDMA queue
//! pair later). A connection starts with the [`handshake`] (protocol version, cluster id, host
//! ids, capabilities, cipher offer, and an HMAC-SHA256 challenge/response over fresh nonces in
//! both directions that proves both ends hold the cluster key). Only after `Welcome` do
//! [`frame`]s flow. All integers are little-endian. Decoding never panics: peer input that is
//! short, too long, of an unknown tag or version, or out of domain is a [`codec::Error`].
//!
//! # Frames
//!
//! ```text
//! | len: u32 | kind: u8 | id: u64 | tag: u8 | fields ... |
//!   kind: 0 one-way, 1 request, 2 response (same id as its request), 3 heartbeat (no message)
//!   len <= MAX_FRAME (1 MiB); the writer coalesces queued frames into one send (batching)
//! ```
//!
//! # Messages
//!
//! | tag  | message         | direction            | fields (after the tag)                   | bytes |
//! |------|-----------------|----------------------|------------------------------------------|-------|
//! | 0x10 | `ReadReq`       | requester -> home    | pfn u64                                  | 9     |
//! | 0x11 | `WriteReq`      | requester -> home    | pfn u64                                  | 9     |
//! | 0x12 | `Fetch`         | home -> holder       | pfn u64, txn u64, mode u8 (copy/downgrade/invalidate) | 18 |
//! | 0x13 | `PageData`      | holder -> home       | pfn u64, txn u64, 4096 data bytes        | 4113  |
//! | 0x14 | `Invalidate`    | home -> sharer       | pfn u64, txn u64                         | 17    |
//! | 0x15 | `InvalidateAck` | sharer -> home       | pfn u64, txn u64                         | 17    |
//! | 0x16 | `Grant`         | home -> requester    | pfn, txn, access u8, content u8 (0 zero, 1 keep, 2 data + 4096 bytes) | 19 or 4115 |
//! | 0x17 | `GrantAck`      | requester -> home    | pfn u64, txn u64                         | 17    |
//! | 0x18 | `Nack`          | any -> requester     | pfn u64, txn u64, reason u8              | 18    |
//! | 0x30 | `Ipi`           | sender host -> vCPU host | dest u32, vector u8, delivery u8, level u8, flags u8 (logical, shorthand, x2APIC), source u32 | 13 |
//! | 0x31 | `Eoi`           | vCPU host -> IOAPIC host | vector u8 (level-triggered EOI)          | 2     |
//! | 0x32 | `IrqPulse`      | device host -> IOAPIC host | pin u8 (edge on an IOAPIC input)       | 2     |
//! | 0x40 | `Mmio`          | vCPU host -> device host | addr u64, size u8, write u8, data u64 | 19    |
//! | 0x41 | `Pio`           | vCPU host -> device host | port u16, size u8, write u8, data u32 | 9     |
//! | 0x42 | `IoReply`       | device host -> vCPU host | data u64                             | 9     |
//! | 0x50 | `Ping` / 0x51 `Pong` | any             | nonce u64                                | 9     |
//! | 0x52 | `Stop`          | any -> all           | reason (u16 len + UTF-8, <= 1024)        | var   |
//! | 0x53 | `Status`        | host -> status home  | JSON text (u16 len + UTF-8, <= 1024)     | var   |
//! | 0x5f | `Error`         | responder -> requester | code u16, message (u16 len + UTF-8)    | var   |
//!
//! Version 2 added the `Ipi` flags/source fields, `Eoi` and `Status`; version 3 the x2APIC
//! destination format flag of `Ipi` (32-bit destinations) and `IrqPulse` (devices homed on
//! other hosts than the IOAPIC's).
//!
//! # DSM coherence (single writer / multiple readers, home-based directory)
//!
//! Each guest page frame (`pfn` = guest-physical address >> 12) has a fixed *home* host (a
//! function of the pfn known to every host) that keeps its directory entry: the exclusive
//! owner, or the set of hosts holding read-only copies, or nothing (never touched: zero, no data
//! anywhere). The home runs **one transaction per page at a time**; requests arriving meanwhile
//! wait in a FIFO queue. A transaction ends when the requester's `GrantAck` arrives, so no
//! message about a page can overtake a grant in flight. A requester has at most one request
//! outstanding per page. When the home itself is requester or holder, the same messages are
//! delivered locally without touching the network.
//!
//! Read fault on host R, page owned writable by host O (home H):
//!
//! ```text
//!  R (vCPU blocked in uffd)        H (home of pfn)                 O (exclusive owner)
//!   |--- ReadReq{pfn} ------------->|  entry busy? -> queue          |
//!   |                               |--- Fetch{pfn,txn,Downgrade} -->|  UFFDIO_WRITEPROTECT(WP)
//!   |                               |<-- PageData{pfn,txn,4 KiB} ----|  copy stays, read-only
//!   |<-- Grant{pfn,txn,Read,Data} --|  entry = shared {O, R}         |
//!   | UFFDIO_COPY(MODE_WP): vCPU resumes                             |
//!   |--- GrantAck{pfn,txn} -------->|  next queued request for pfn   |
//! ```
//!
//! Write fault on host W, page shared by S1, S2 (W has no copy):
//!
//! ```text
//!  W                         H (home)                      S1               S2
//!   |--- WriteReq{pfn} ----->|                              |                |
//!   |                        |--- Fetch{txn,Invalidate} --->|                |
//!   |                        |--- Invalidate{txn} ---------------------------->|
//!   |                        |<-- PageData{txn,data} -------| MADV_DONTNEED  |
//!   |                        |<-- InvalidateAck{txn} --------------------------| MADV_DONTNEED
//!   |<-- Grant{Write,Data} --|  all acks in: entry = owner W                   |
//!   | UFFDIO_COPY (writable)  |                              |                |
//!   |--- GrantAck{txn} ----->|                              |                |
//! ```
//!
//! If W already holds a read-only copy (write-protect fault), the home only invalidates the
//! other sharers and grants `Content::Keep`; W clears the write protection in place
//! (`UFFDIO_WRITEPROTECT` mode 0). A page nobody has touched is granted as `Content::Zero`
//! (no page bytes move). The first `Fetch` to an exclusive owner for a read is a downgrade: the
//! owner write-protects its copy before reading it, so no store can slip in between the copy and
//! the grant. For an invalidation the holder write-protects, copies, then drops the page.

pub mod codec;
pub mod frame;
pub mod handshake;
pub mod message;

pub use codec::Error;
pub use frame::{Frame, FrameKind, MAX_FRAME};
pub use handshake::{Handshake, Hello, RejectReason};
pub use message::{Access, Content, FetchMode, Message, NackReason, PageBuf, Pfn, Service};
pub use message::{IPI_FROM_DEVICE, IPI_LOGICAL, IPI_X2APIC};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of the wire protocol spoken by this build. Peers must match exactly.
pub const PROTOCOL_VERSION: u16 = 3;

/// Size of a guest page moved by the DSM.
pub const PAGE_SIZE: usize = 4096;

/// Identifies one ssi-vmm host (one VMM process) in the cluster.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct HostId(pub u16);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host{}", self.0)
    }
}
