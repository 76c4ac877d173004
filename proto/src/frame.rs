//! Length framing of messages on a byte stream.
//!
//! ```text
//! +----------+---------+----------+------------------------------+
//! | len: u32 | kind:u8 | id: u64  | message (tag + fields)       |
//! +----------+---------+----------+------------------------------+
//!   len = bytes after the len field (9 + message length), at most MAX_FRAME
//! ```
//!
//! `kind` says how the frame relates to others: a one-way message, a request expecting a
//! response with the same `id`, that response, or a heartbeat (no message, `id` 0).

use crate::codec::{Error, Reader, Writer};
use crate::message::Message;
use std::io::{self, Read};

/// Largest frame body accepted (leaves room for batched pages later).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the fixed part after the length: kind + id.
pub const FRAME_HEADER: usize = 1 + 8;

/// How a frame relates to other frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A message that expects no answer.
    OneWay = 0,
    /// A request; the peer answers with a `Response` frame carrying the same id.
    Request = 1,
    /// The answer to the `Request` with the same id.
    Response = 2,
    /// Keeps the connection alive; carries no message.
    Heartbeat = 3,
}

/// One framed unit on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Kind.
    pub kind: FrameKind,
    /// Request id (requests and responses), 0 otherwise.
    pub id: u64,
    /// The message (`None` only for heartbeats).
    pub msg: Option<Message>,
}

impl Frame {
    /// A one-way message.
    pub fn one_way(msg: Message) -> Frame {
        Frame {
            kind: FrameKind::OneWay,
            id: 0,
            msg: Some(msg),
        }
    }
    /// A request with id `id`.
    pub fn request(id: u64, msg: Message) -> Frame {
        Frame {
            kind: FrameKind::Request,
            id,
            msg: Some(msg),
        }
    }
    /// The response to request `id`.
    pub fn response(id: u64, msg: Message) -> Frame {
        Frame {
            kind: FrameKind::Response,
            id,
            msg: Some(msg),
        }
    }
    /// A heartbeat.
    pub fn heartbeat() -> Frame {
        Frame {
            kind: FrameKind::Heartbeat,
            id: 0,
            msg: None,
        }
    }

    /// Appends the frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer::new(out);
        w.u8(self.kind as u8);
        w.u64(self.id);
        if let Some(m) = &self.msg {
            m.encode(out);
        }
        let len = out.len() - start - 4;
        // Frames we build are far below 4 GiB: one message holds at most a page or two strings.
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    }

    /// Decodes a frame body (everything after the length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Frame, Error> {
        if body.len() < FRAME_HEADER {
            return Err(Error::TooShort {
                len: body.len(),
                min: FRAME_HEADER,
            });
        }
        let mut r = Reader::new(body);
        let kind = match r.u8("frame kind")? {
            0 => FrameKind::OneWay,
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Heartbeat,
            t => {
                return Err(Error::UnknownTag {
                    what: "frame kind",
                    tag: t,
                })
            }
        };
        let id = r.u64("frame id")?;
        let rest = r.take("message", r.remaining())?;
        let msg = if kind == FrameKind::Heartbeat {
            if !rest.is_empty() {
                return Err(Error::TrailingBytes(rest.len()));
            }
            None
        } else {
            Some(Message::decode(rest)?)
        };
        Ok(Frame { kind, id, msg })
    }
}

/// Reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed or ended (`UnexpectedEof` at a clean end).
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that do not decode.
    #[error("malformed frame: {0}")]
    Decode(#[from] Error),
}

/// Reads a u32 length prefix and checks it against `max` before allocating.
pub fn read_length_prefixed<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, ReadError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(Error::TooLong {
            what: "frame",
            len,
            max,
        }
        .into());
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Reads one frame (length prefix, body) from a stream.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ReadError> {
    let body = read_length_prefixed(r, MAX_FRAME)?;
    Ok(Frame::decode_body(&body)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::message::tests::samples;

    #[test]
    fn frames_round_trip_through_a_stream() {
        let mut wire = Vec::new();
        let mut frames = vec![Frame::heartbeat()];
        for (i, m) in samples().into_iter().enumerate() {
            frames.push(match i % 3 {
                0 => Frame::one_way(m),
                1 => Frame::request(i as u64, m),
                _ => Frame::response(i as u64, m),
            });
        }
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut cur = io::Cursor::new(wire);
        for f in &frames {
            assert_eq!(&read_frame(&mut cur).unwrap(), f);
        }
        assert!(matches!(read_frame(&mut cur), Err(ReadError::Io(_))));
    }

    #[test]
    fn oversized_and_short_frames_are_refused_before_allocation() {
        let mut cur = io::Cursor::new(u32::MAX.to_le_bytes().to_vec());
        assert!(matches!(
            read_frame(&mut cur),
            Err(ReadError::Decode(Error::TooLong { .. }))
        ));
        assert!(matches!(
            Frame::decode_body(&[0, 1, 2]),
            Err(Error::TooShort { len: 3, .. })
        ));
        assert!(matches!(
            Frame::decode_body(&[7, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]),
            Err(Error::UnknownTag { tag: 7, .. })
        ));
        assert!(matches!(
            Frame::decode_body(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]),
            Err(Error::TrailingBytes(1))
        ));
    }

    /// xorshift64*: deterministic pseudo-random bytes for the fuzz-ish tests.
    pub(crate) fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut decoded = 0;
        for _ in 0..200_000 {
            let len = (rng(&mut seed) % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            // Bias towards valid kinds and tags so decoding goes deep into the fields.
            if len > 0 {
                b[0] %= 4;
            }
            if len > 9 {
                b[9] = [0x10, 0x12, 0x13, 0x16, 0x18, 0x30, 0x52, 0x5f][b[9] as usize % 8];
            }
            if Frame::decode_body(&b).is_ok() {
                decoded += 1;
            }
            let _ = Message::decode(&b);
        }
        assert!(decoded > 0, "bias should produce some valid frames");
    }

    #[test]
    fn mutated_valid_frames_never_panic() {
        let mut seed = 42u64;
        for m in samples() {
            let mut wire = Vec::new();
            Frame::request(1, m).encode(&mut wire);
            for _ in 0..2000 {
                let mut b = wire.clone();
                for _ in 0..(1 + rng(&mut seed) % 4) {
                    let i = (rng(&mut seed) as usize) % b.len();
                    b[i] = rng(&mut seed) as u8;
                }
                let cut = (rng(&mut seed) as usize) % (b.len() + 1);
                let _ = read_frame(&mut io::Cursor::new(&b[..cut]));
            }
        }
    }
}
