//! Little-endian primitive encoding and a bounds-checked reader.
//!
//! Every read of peer input goes through [`Reader`], which returns [`enum@Error`] instead of panicking
//! on short input, and checks declared lengths against the bytes actually present before
//! allocating anything.

use thiserror::Error;

/// Errors decoding bytes received from a peer. Never a panic: every malformed input maps here.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input ended before a field was complete.
    #[error("truncated input: {field} needs {need} bytes, {have} left")]
    Truncated {
        /// Field being decoded.
        field: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A frame or string declares a length above the limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A frame is shorter than its fixed header.
    #[error("frame of {len} bytes is shorter than the {min}-byte header")]
    TooShort {
        /// Declared length.
        len: usize,
        /// Minimum length.
        min: usize,
    },
    /// A message tag this version does not know.
    #[error("unknown {what} tag {tag:#04x}")]
    UnknownTag {
        /// Which tag space (message, frame kind, handshake).
        what: &'static str,
        /// The tag.
        tag: u8,
    },
    /// A field holds a value outside its domain (enum discriminant, bool, ...).
    #[error("invalid value {value} for {field}")]
    BadValue {
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// Bytes left over after a complete message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The handshake does not start with the protocol magic.
    #[error("bad magic {0:02x?}: not an ssi-vmm peer")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {theirs}, we speak {ours}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A string field is not UTF-8.
    #[error("string field {0} is not UTF-8")]
    Utf8(&'static str),
}

/// Appends little-endian primitives to a byte vector.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    fn buf(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf().push(v);
    }
    /// Appends a bool as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf().extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf().extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf().extend_from_slice(&v.to_le_bytes());
    }
    /// Appends raw bytes (fixed-size fields).
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf().extend_from_slice(v);
    }
    /// Appends a string as u16 length + UTF-8 bytes, truncated to `max` bytes on a char boundary.
    pub fn str(&mut self, v: &str, max: usize) {
        let mut end = v.len().min(max).min(usize::from(u16::MAX));
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        // `end` <= u16::MAX by the min above.
        self.u16(end as u16);
        self.bytes(&v.as_bytes()[..end]);
    }
}

/// A bounds-checked cursor over received bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::Truncated {
                field,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }
    /// Reads one byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, Error> {
        Ok(self.array::<1>(field)?[0])
    }
    /// Reads a bool (only 0 or 1 accepted).
    pub fn bool(&mut self, field: &'static str) -> Result<bool, Error> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::BadValue {
                field,
                value: u64::from(v),
            }),
        }
    }
    /// Reads a u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// Reads a u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// Reads a u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// Reads a u16-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, field: &'static str, max: usize) -> Result<String, Error> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(Error::TooLong {
                what: field,
                len,
                max,
            });
        }
        let b = self.take(field, len)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Utf8(field))
    }
    /// Fails if any byte is left.
    pub fn finish(self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip() {
        let mut v = Vec::new();
        let mut w = Writer::new(&mut v);
        w.u8(7);
        w.bool(true);
        w.u16(0xbeef);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.str("héllo", 100);
        let mut r = Reader::new(&v);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert!(r.bool("b").unwrap());
        assert_eq!(r.u16("c").unwrap(), 0xbeef);
        assert_eq!(r.u32("d").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("e").unwrap(), u64::MAX - 1);
        assert_eq!(r.str("f", 100).unwrap(), "héllo");
        r.finish().unwrap();
    }

    #[test]
    fn str_truncates_on_char_boundary() {
        let mut v = Vec::new();
        Writer::new(&mut v).str("aé", 2);
        assert_eq!(Reader::new(&v).str("s", 10).unwrap(), "a");
    }

    #[test]
    fn short_and_bad_inputs_are_errors() {
        assert!(matches!(
            Reader::new(&[1, 2]).u32("x"),
            Err(Error::Truncated {
                need: 4,
                have: 2,
                ..
            })
        ));
        assert!(matches!(
            Reader::new(&[2]).bool("x"),
            Err(Error::BadValue { value: 2, .. })
        ));
        assert!(matches!(
            Reader::new(&[200, 0, b'a']).str("s", 100),
            Err(Error::TooLong { len: 200, .. })
        ));
        assert!(matches!(
            Reader::new(&[5, 0, b'a']).str("s", 100),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Reader::new(&[2, 0, 0xff, 0xfe]).str("s", 100),
            Err(Error::Utf8(_))
        ));
        assert_eq!(Reader::new(&[1]).finish(), Err(Error::TrailingBytes(1)));
    }
}
