//! Messages exchanged after the handshake, and their binary encoding.
//!
//! A message is one tag byte followed by its fields, little-endian, fixed layout per tag (see
//! the table in the crate documentation). Decoding rejects unknown tags, out-of-domain enum
//! values, short input and trailing bytes.

use crate::codec::{Error, Reader, Writer};
use crate::PAGE_SIZE;
use std::fmt;

/// Longest string carried in a message (reasons, error texts).
pub const MAX_STRING: usize = 1024;

/// Guest page frame number: guest-physical address >> 12.
pub type Pfn = u64;

/// The contents of one 4 KiB guest page.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBuf(pub Box<[u8; PAGE_SIZE]>);

impl PageBuf {
    /// A page of zeros.
    pub fn zeroed() -> Self {
        PageBuf(Box::new([0u8; PAGE_SIZE]))
    }
    /// A page holding a copy of `data` (exactly one page).
    pub fn from_slice(data: &[u8; PAGE_SIZE]) -> Self {
        PageBuf(Box::new(*data))
    }
}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nonzero = self.0.iter().filter(|b| **b != 0).count();
        write!(f, "PageBuf({nonzero} nonzero bytes)")
    }
}

/// What a home asks of a page holder in [`Message::Fetch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchMode {
    /// Send a copy; the holder keeps its read-only copy.
    Copy = 0,
    /// The holder owns the page writable: write-protect it, keep a read-only copy, send a copy.
    Downgrade = 1,
    /// Write-protect, send the data, then drop the local copy.
    Invalidate = 2,
}

/// Access a request or a grant is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read-only (shared) copy.
    Read = 0,
    /// Exclusive, writable ownership.
    Write = 1,
}

/// Page contents carried by a [`Message::Grant`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// The page was never written anywhere: install zeros (no page bytes on the wire).
    Zero,
    /// The requester already holds a valid copy: only the access changes.
    Keep,
    /// The page's current data.
    Data(PageBuf),
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackReason {
    /// The page is outside guest RAM.
    OutOfRange = 0,
    /// The receiver is not the page's home.
    NotHome = 1,
    /// The receiver does not hold the page it was asked for (protocol invariant broken).
    NotHeld = 2,
    /// The receiver cannot serve DSM requests (shutting down, no handler).
    Unavailable = 3,
}

/// Which subsystem of the receiving host handles a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// Distributed shared memory (page coherence).
    Dsm,
    /// Remote vCPU operations (IPIs).
    Vcpu,
    /// Forwarded device I/O (MMIO, PIO).
    Io,
    /// Cluster control and errors.
    Control,
}

/// A message after the handshake. Tags are listed in the crate documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Requester -> home: I need a read-only copy.
    ReadReq {
        /// Page.
        pfn: Pfn,
    },
    /// Requester -> home: I need exclusive write access.
    WriteReq {
        /// Page.
        pfn: Pfn,
    },
    /// Home -> holder: send the page data (and downgrade or drop per `mode`).
    Fetch {
        /// Page.
        pfn: Pfn,
        /// Home's transaction id.
        txn: u64,
        /// What the holder does with its own copy.
        mode: FetchMode,
    },
    /// Holder -> home: the data asked for by a `Fetch`.
    PageData {
        /// Page.
        pfn: Pfn,
        /// Transaction id from the `Fetch`.
        txn: u64,
        /// Contents.
        data: PageBuf,
    },
    /// Home -> sharer: drop your read-only copy.
    Invalidate {
        /// Page.
        pfn: Pfn,
        /// Home's transaction id.
        txn: u64,
    },
    /// Sharer -> home: copy dropped.
    InvalidateAck {
        /// Page.
        pfn: Pfn,
        /// Transaction id from the `Invalidate`.
        txn: u64,
    },
    /// Home -> requester: access granted (with data when the requester has none).
    Grant {
        /// Page.
        pfn: Pfn,
        /// Home's transaction id.
        txn: u64,
        /// Access granted.
        access: Access,
        /// Data to install.
        content: Content,
    },
    /// Requester -> home: grant installed; the home may start the page's next transaction.
    GrantAck {
        /// Page.
        pfn: Pfn,
        /// Transaction id from the `Grant`.
        txn: u64,
    },
    /// Refusal of a DSM request (`txn` 0 when answering a `ReadReq`/`WriteReq`).
    Nack {
        /// Page.
        pfn: Pfn,
        /// Transaction id, if any.
        txn: u64,
        /// Why.
        reason: NackReason,
    },
    /// An interrupt message (IPI or IOAPIC message) for the local APICs of the receiving host;
    /// the receiver matches it against its own vCPUs' APICs.
    Ipi {
        /// Destination field (APIC ID, or logical mask when `flags & IPI_LOGICAL`).
        dest_apic: u32,
        /// Vector.
        vector: u8,
        /// Delivery mode (fixed, NMI, INIT, SIPI...), APIC ICR encoding.
        delivery: u8,
        /// Level-triggered?
        level: bool,
        /// `IPI_LOGICAL` | shorthand << 1 (0 none, 1 self, 2 all, 3 all but self).
        flags: u8,
        /// Sending vCPU index, or `IPI_FROM_DEVICE`.
        source: u32,
    },
    /// End of interrupt for a level-triggered vector, for the IOAPIC's host.
    Eoi {
        /// Vector.
        vector: u8,
    },
    /// An edge on an IOAPIC input, raised by a device on another host than the IOAPIC's.
    IrqPulse {
        /// IOAPIC pin (GSI).
        pin: u8,
    },
    /// Periodic status of a host, sent to the status home (host 0 by default; JSON text).
    Status {
        /// JSON object.
        json: String,
    },
    /// MMIO access forwarded to the host that emulates the device (reserved).
    Mmio {
        /// Guest-physical address.
        addr: u64,
        /// Access size in bytes (1, 2, 4 or 8).
        size: u8,
        /// Write (true) or read.
        write: bool,
        /// Data written (little-endian), 0 for reads.
        data: u64,
    },
    /// Port I/O forwarded to the host that emulates the device (reserved).
    Pio {
        /// Port.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
        /// Write (true) or read.
        write: bool,
        /// Data written, 0 for reads.
        data: u32,
    },
    /// Reply to `Mmio`/`Pio` carrying the value read (0 for writes).
    IoReply {
        /// Value read.
        data: u64,
    },
    /// Liveness / latency probe.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Reply to `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Ask every host to stop the virtual machine.
    Stop {
        /// Why.
        reason: String,
    },
    /// Error reply to a request (no handler, refused...).
    Error {
        /// Error code (see [`Message::ERR_NO_HANDLER`] and friends).
        code: u16,
        /// Human-readable detail.
        message: String,
    },
}

const FETCH_MODES: [FetchMode; 3] = [FetchMode::Copy, FetchMode::Downgrade, FetchMode::Invalidate];
const NACK_REASONS: [NackReason; 4] = [
    NackReason::OutOfRange,
    NackReason::NotHome,
    NackReason::NotHeld,
    NackReason::Unavailable,
];

fn enum_from<T: Copy>(table: &[T], field: &'static str, v: u8) -> Result<T, Error> {
    table.get(usize::from(v)).copied().ok_or(Error::BadValue {
        field,
        value: u64::from(v),
    })
}

fn access_from(v: u8) -> Result<Access, Error> {
    enum_from(&[Access::Read, Access::Write], "access", v)
}

/// `Ipi` flag: the destination is a logical APIC mask.
pub const IPI_LOGICAL: u8 = 1;
/// `Ipi` flag: the destination is in x2APIC format (32-bit; sender in x2APIC mode). Bits 1-2
/// of the flags hold the shorthand.
pub const IPI_X2APIC: u8 = 1 << 3;
/// `Ipi` source of a device (IOAPIC) message.
pub const IPI_FROM_DEVICE: u32 = u32::MAX;

/// Message tags (first byte of an encoded message).
pub mod tag {
    /// `ReadReq`.
    pub const READ_REQ: u8 = 0x10;
    /// `WriteReq`.
    pub const WRITE_REQ: u8 = 0x11;
    /// `Fetch`.
    pub const FETCH: u8 = 0x12;
    /// `PageData`.
    pub const PAGE_DATA: u8 = 0x13;
    /// `Invalidate`.
    pub const INVALIDATE: u8 = 0x14;
    /// `InvalidateAck`.
    pub const INVALIDATE_ACK: u8 = 0x15;
    /// `Grant`.
    pub const GRANT: u8 = 0x16;
    /// `GrantAck`.
    pub const GRANT_ACK: u8 = 0x17;
    /// `Nack`.
    pub const NACK: u8 = 0x18;
    /// `Ipi`.
    pub const IPI: u8 = 0x30;
    /// `Eoi`.
    pub const EOI: u8 = 0x31;
    /// `IrqPulse`.
    pub const IRQ_PULSE: u8 = 0x32;
    /// `Mmio`.
    pub const MMIO: u8 = 0x40;
    /// `Pio`.
    pub const PIO: u8 = 0x41;
    /// `IoReply`.
    pub const IO_REPLY: u8 = 0x42;
    /// `Ping`.
    pub const PING: u8 = 0x50;
    /// `Pong`.
    pub const PONG: u8 = 0x51;
    /// `Stop`.
    pub const STOP: u8 = 0x52;
    /// `Status`.
    pub const STATUS: u8 = 0x53;
    /// `Error`.
    pub const ERROR: u8 = 0x5f;
}

/// `Content` discriminants inside a `Grant`.
const CONTENT_ZERO: u8 = 0;
const CONTENT_KEEP: u8 = 1;
const CONTENT_DATA: u8 = 2;

impl Message {
    /// `Error` code: the receiver has no handler for the message's service.
    pub const ERR_NO_HANDLER: u16 = 1;
    /// `Error` code: the handler dropped the request without replying.
    pub const ERR_NO_REPLY: u16 = 2;
    /// `Error` code: the receiver's queue for this kind of request is full.
    pub const ERR_BUSY: u16 = 3;

    /// The subsystem that handles this message on the receiving host.
    pub fn service(&self) -> Service {
        use Message::*;
        match self {
            ReadReq { .. }
            | WriteReq { .. }
            | Fetch { .. }
            | PageData { .. }
            | Invalidate { .. }
            | InvalidateAck { .. }
            | Grant { .. }
            | GrantAck { .. }
            | Nack { .. } => Service::Dsm,
            Ipi { .. } => Service::Vcpu,
            Mmio { .. } | Pio { .. } | IoReply { .. } | Eoi { .. } | IrqPulse { .. } => Service::Io,
            Ping { .. } | Pong { .. } | Stop { .. } | Status { .. } | Error { .. } => {
                Service::Control
            }
        }
    }

    /// Short name for logs and counters.
    pub fn name(&self) -> &'static str {
        use Message::*;
        match self {
            ReadReq { .. } => "ReadReq",
            WriteReq { .. } => "WriteReq",
            Fetch { .. } => "Fetch",
            PageData { .. } => "PageData",
            Invalidate { .. } => "Invalidate",
            InvalidateAck { .. } => "InvalidateAck",
            Grant { .. } => "Grant",
            GrantAck { .. } => "GrantAck",
            Nack { .. } => "Nack",
            Ipi { .. } => "Ipi",
            Eoi { .. } => "Eoi",
            IrqPulse { .. } => "IrqPulse",
            Status { .. } => "Status",
            Mmio { .. } => "Mmio",
            Pio { .. } => "Pio",
            IoReply { .. } => "IoReply",
            Ping { .. } => "Ping",
            Pong { .. } => "Pong",
            Stop { .. } => "Stop",
            Error { .. } => "Error",
        }
    }

    /// Appends the encoding (tag + fields) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use Message::*;
        let mut w = Writer::new(out);
        match self {
            ReadReq { pfn } => {
                w.u8(tag::READ_REQ);
                w.u64(*pfn);
            }
            WriteReq { pfn } => {
                w.u8(tag::WRITE_REQ);
                w.u64(*pfn);
            }
            Fetch { pfn, txn, mode } => {
                w.u8(tag::FETCH);
                w.u64(*pfn);
                w.u64(*txn);
                w.u8(*mode as u8);
            }
            PageData { pfn, txn, data } => {
                w.u8(tag::PAGE_DATA);
                w.u64(*pfn);
                w.u64(*txn);
                w.bytes(&data.0[..]);
            }
            Invalidate { pfn, txn } => {
                w.u8(tag::INVALIDATE);
                w.u64(*pfn);
                w.u64(*txn);
            }
            InvalidateAck { pfn, txn } => {
                w.u8(tag::INVALIDATE_ACK);
                w.u64(*pfn);
                w.u64(*txn);
            }
            Grant {
                pfn,
                txn,
                access,
                content,
            } => {
                w.u8(tag::GRANT);
                w.u64(*pfn);
                w.u64(*txn);
                w.u8(*access as u8);
                match content {
                    Content::Zero => w.u8(CONTENT_ZERO),
                    Content::Keep => w.u8(CONTENT_KEEP),
                    Content::Data(d) => {
                        w.u8(CONTENT_DATA);
                        w.bytes(&d.0[..]);
                    }
                }
            }
            GrantAck { pfn, txn } => {
                w.u8(tag::GRANT_ACK);
                w.u64(*pfn);
                w.u64(*txn);
            }
            Nack { pfn, txn, reason } => {
                w.u8(tag::NACK);
                w.u64(*pfn);
                w.u64(*txn);
                w.u8(*reason as u8);
            }
            Ipi {
                dest_apic,
                vector,
                delivery,
                level,
                flags,
                source,
            } => {
                w.u8(tag::IPI);
                w.u32(*dest_apic);
                w.u8(*vector);
                w.u8(*delivery);
                w.bool(*level);
                w.u8(*flags);
                w.u32(*source);
            }
            Eoi { vector } => {
                w.u8(tag::EOI);
                w.u8(*vector);
            }
            IrqPulse { pin } => {
                w.u8(tag::IRQ_PULSE);
                w.u8(*pin);
            }
            Status { json } => {
                w.u8(tag::STATUS);
                w.str(json, MAX_STRING);
            }
            Mmio {
                addr,
                size,
                write,
                data,
            } => {
                w.u8(tag::MMIO);
                w.u64(*addr);
                w.u8(*size);
                w.bool(*write);
                w.u64(*data);
            }
            Pio {
                port,
                size,
                write,
                data,
            } => {
                w.u8(tag::PIO);
                w.u16(*port);
                w.u8(*size);
                w.bool(*write);
                w.u32(*data);
            }
            IoReply { data } => {
                w.u8(tag::IO_REPLY);
                w.u64(*data);
            }
            Ping { nonce } => {
                w.u8(tag::PING);
                w.u64(*nonce);
            }
            Pong { nonce } => {
                w.u8(tag::PONG);
                w.u64(*nonce);
            }
            Stop { reason } => {
                w.u8(tag::STOP);
                w.str(reason, MAX_STRING);
            }
            Error { code, message } => {
                w.u8(tag::ERROR);
                w.u16(*code);
                w.str(message, MAX_STRING);
            }
        }
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes exactly one message from `buf` (no trailing bytes allowed).
    pub fn decode(buf: &[u8]) -> Result<Message, Error> {
        let mut r = Reader::new(buf);
        let m = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(m)
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Message, Error> {
        use Message::*;
        let t = r.u8("tag")?;
        Ok(match t {
            tag::READ_REQ => ReadReq { pfn: r.u64("pfn")? },
            tag::WRITE_REQ => WriteReq { pfn: r.u64("pfn")? },
            tag::FETCH => Fetch {
                pfn: r.u64("pfn")?,
                txn: r.u64("txn")?,
                mode: enum_from(&FETCH_MODES, "fetch mode", r.u8("mode")?)?,
            },
            tag::PAGE_DATA => PageData {
                pfn: r.u64("pfn")?,
                txn: r.u64("txn")?,
                data: PageBuf(Box::new(r.array("page data")?)),
            },
            tag::INVALIDATE => Invalidate {
                pfn: r.u64("pfn")?,
                txn: r.u64("txn")?,
            },
            tag::INVALIDATE_ACK => InvalidateAck {
                pfn: r.u64("pfn")?,
                txn: r.u64("txn")?,
            },
            tag::GRANT => {
                let pfn = r.u64("pfn")?;
                let txn = r.u64("txn")?;
                let access = access_from(r.u8("access")?)?;
                let content = match r.u8("content")? {
                    CONTENT_ZERO => Content::Zero,
                    CONTENT_KEEP => Content::Keep,
                    CONTENT_DATA => Content::Data(PageBuf(Box::new(r.array("page data")?))),
                    v => {
                        return Err(self::Error::BadValue {
                            field: "content",
                            value: u64::from(v),
                        })
                    }
                };
                Grant {
                    pfn,
                    txn,
                    access,
                    content,
                }
            }
            tag::GRANT_ACK => GrantAck {
                pfn: r.u64("pfn")?,
                txn: r.u64("txn")?,
            },
            tag::NACK => Nack {
                pfn: r.u64("pfn")?,
                txn: r.u64("txn")?,
                reason: enum_from(&NACK_REASONS, "nack reason", r.u8("reason")?)?,
            },
            tag::IPI => Ipi {
                dest_apic: r.u32("dest_apic")?,
                vector: r.u8("vector")?,
                delivery: r.u8("delivery")?,
                level: r.bool("level")?,
                flags: r.u8("flags")?,
                source: r.u32("source")?,
            },
            tag::EOI => Eoi {
                vector: r.u8("vector")?,
            },
            tag::IRQ_PULSE => IrqPulse { pin: r.u8("pin")? },
            tag::STATUS => Status {
                json: r.str("json", MAX_STRING)?,
            },
            tag::MMIO => Mmio {
                addr: r.u64("addr")?,
                size: r.u8("size")?,
                write: r.bool("write")?,
                data: r.u64("data")?,
            },
            tag::PIO => Pio {
                port: r.u16("port")?,
                size: r.u8("size")?,
                write: r.bool("write")?,
                data: r.u32("data")?,
            },
            tag::IO_REPLY => IoReply {
                data: r.u64("data")?,
            },
            tag::PING => Ping {
                nonce: r.u64("nonce")?,
            },
            tag::PONG => Pong {
                nonce: r.u64("nonce")?,
            },
            tag::STOP => Stop {
                reason: r.str("reason", MAX_STRING)?,
            },
            tag::ERROR => Error {
                code: r.u16("code")?,
                message: r.str("message", MAX_STRING)?,
            },
            t => {
                return Err(self::Error::UnknownTag {
                    what: "message",
                    tag: t,
                })
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn page(seed: u8) -> PageBuf {
        let mut p = PageBuf::zeroed();
        for (i, b) in p.0.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        p
    }

    /// One instance of every message variant.
    pub(crate) fn samples() -> Vec<Message> {
        use Message::*;
        vec![
            ReadReq { pfn: 1 },
            WriteReq { pfn: u64::MAX },
            Fetch {
                pfn: 2,
                txn: 3,
                mode: FetchMode::Copy,
            },
            Fetch {
                pfn: 2,
                txn: 3,
                mode: FetchMode::Downgrade,
            },
            Fetch {
                pfn: 2,
                txn: 3,
                mode: FetchMode::Invalidate,
            },
            PageData {
                pfn: 4,
                txn: 5,
                data: page(9),
            },
            Invalidate { pfn: 6, txn: 7 },
            InvalidateAck { pfn: 6, txn: 7 },
            Grant {
                pfn: 8,
                txn: 9,
                access: Access::Read,
                content: Content::Data(page(1)),
            },
            Grant {
                pfn: 8,
                txn: 9,
                access: Access::Write,
                content: Content::Zero,
            },
            Grant {
                pfn: 8,
                txn: 9,
                access: Access::Write,
                content: Content::Keep,
            },
            GrantAck { pfn: 8, txn: 9 },
            Nack {
                pfn: 1,
                txn: 0,
                reason: NackReason::NotHome,
            },
            Ipi {
                dest_apic: 3,
                vector: 0xfd,
                delivery: 0,
                level: true,
                flags: IPI_LOGICAL | (3 << 1),
                source: 1,
            },
            Eoi { vector: 0x31 },
            IrqPulse { pin: 5 },
            Status {
                json: "{\"host\":1}".into(),
            },
            Mmio {
                addr: 0xd000_0050,
                size: 4,
                write: true,
                data: 1,
            },
            Pio {
                port: 0x3f8,
                size: 1,
                write: false,
                data: 0,
            },
            IoReply { data: 42 },
            Ping { nonce: 5 },
            Pong { nonce: 5 },
            Stop {
                reason: "guest halted".into(),
            },
            Error {
                code: Message::ERR_NO_HANDLER,
                message: "no handler".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let b = m.to_bytes();
            assert_eq!(Message::decode(&b).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn page_messages_carry_exactly_one_page() {
        let b = Message::PageData {
            pfn: 0,
            txn: 0,
            data: page(0),
        }
        .to_bytes();
        assert_eq!(b.len(), 1 + 8 + 8 + PAGE_SIZE);
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in samples() {
            let b = m.to_bytes();
            for n in 0..b.len() {
                assert!(Message::decode(&b[..n]).is_err(), "{} cut at {n}", m.name());
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(Message::decode(&long), Err(Error::TrailingBytes(1)));
        }
    }

    #[test]
    fn bad_tags_and_values_are_errors() {
        assert!(matches!(
            Message::decode(&[0xee]),
            Err(Error::UnknownTag { tag: 0xee, .. })
        ));
        let mut b = Message::Fetch {
            pfn: 1,
            txn: 1,
            mode: FetchMode::Copy,
        }
        .to_bytes();
        *b.last_mut().unwrap() = 9;
        assert!(matches!(
            Message::decode(&b),
            Err(Error::BadValue {
                field: "fetch mode",
                ..
            })
        ));
        let mut g = Message::Grant {
            pfn: 1,
            txn: 1,
            access: Access::Read,
            content: Content::Zero,
        }
        .to_bytes();
        *g.last_mut().unwrap() = 3;
        assert!(Message::decode(&g).is_err());
    }

    #[test]
    fn services() {
        assert_eq!(Message::ReadReq { pfn: 0 }.service(), Service::Dsm);
        assert_eq!(Message::IoReply { data: 0 }.service(), Service::Io);
        assert_eq!(Message::Ping { nonce: 0 }.service(), Service::Control);
    }
}
