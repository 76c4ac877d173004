//! A very small AML (ACPI Machine Language) encoder: just what the DSDT needs to describe the
//! sleep state and the devices of a hardware-reduced machine (names, integers, strings, devices
//! and resource templates). Hardware-reduced ACPI has no legacy PIC, so every device interrupt
//! must be announced here for the guest to map its GSI.

/// Encodes a package length (the length counts its own encoding bytes).
pub fn pkg_length(body_len: usize) -> Vec<u8> {
    // One byte holds up to 63; otherwise 1-3 extra bytes of 8 bits after a 4-bit nibble.
    for extra in 0..4usize {
        let total = body_len + 1 + extra;
        if extra == 0 && total < 0x40 {
            return vec![total as u8];
        }
        if extra > 0 && total < (1usize << (4 + 8 * extra)) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // Larger than 256 MiB: never produced by this VMM.
    vec![0]
}

/// A 4-character name segment, padded with '_'.
pub fn name_seg(name: &str) -> [u8; 4] {
    let mut s = [b'_'; 4];
    for (i, b) in name.bytes().take(4).enumerate() {
        s[i] = b;
    }
    s
}

/// Integer constant with the shortest encoding.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, v as u8],
        0x100..=0xffff => {
            let mut o = vec![0x0b];
            o.extend_from_slice(&(v as u16).to_le_bytes());
            o
        }
        0x1_0000..=0xffff_ffff => {
            let mut o = vec![0x0c];
            o.extend_from_slice(&(v as u32).to_le_bytes());
            o
        }
        _ => {
            let mut o = vec![0x0e];
            o.extend_from_slice(&v.to_le_bytes());
            o
        }
    }
}

/// String constant.
pub fn string(s: &str) -> Vec<u8> {
    let mut o = vec![0x0d];
    o.extend_from_slice(s.as_bytes());
    o.push(0);
    o
}

/// Compressed EISA ID (e.g. "PNP0501") as an integer.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    if b.len() != 7 {
        return integer(0);
    }
    let c = |x: u8| u32::from(x.wrapping_sub(b'@') & 0x1f);
    let h = |x: u8| (x as char).to_digit(16).unwrap_or(0);
    let v: u32 = (c(b[0]) << 26)
        | (c(b[1]) << 21)
        | (c(b[2]) << 16)
        | (h(b[3]) << 12)
        | (h(b[4]) << 8)
        | (h(b[5]) << 4)
        | h(b[6]);
    // Stored big-endian in the AML integer.
    integer(u64::from(v.swap_bytes()))
}

/// `Name (NAME, value)`.
pub fn name(n: &str, value: &[u8]) -> Vec<u8> {
    let mut o = vec![0x08];
    o.extend_from_slice(&name_seg(n));
    o.extend_from_slice(value);
    o
}

/// `Package () { elements }`.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend_from_slice(e);
    }
    let mut o = vec![0x12];
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

/// `Buffer () { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    let mut o = vec![0x11];
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

/// `Device (NAME) { body }`.
pub fn device(n: &str, body: &[Vec<u8>]) -> Vec<u8> {
    let mut inner = name_seg(n).to_vec();
    for b in body {
        inner.extend_from_slice(b);
    }
    let mut o = vec![0x5b, 0x82];
    o.extend(pkg_length(inner.len()));
    o.extend(inner);
    o
}

/// `Scope (\NAME) { body }`.
pub fn scope_root(n: &str, body: &[Vec<u8>]) -> Vec<u8> {
    let mut inner = vec![b'\\'];
    inner.extend_from_slice(&name_seg(n));
    for b in body {
        inner.extend_from_slice(b);
    }
    let mut o = vec![0x10];
    o.extend(pkg_length(inner.len()));
    o.extend(inner);
    o
}

/// Resource template items.
pub mod res {
    /// `IO (Decode16, base, base, 1, len)`.
    pub fn io(base: u16, len: u8) -> Vec<u8> {
        let b = base.to_le_bytes();
        vec![0x47, 0x01, b[0], b[1], b[0], b[1], 0x01, len]
    }

    /// `IRQNoFlags () { irq }` (ISA: edge, active high).
    pub fn irq_noflags(irq: u8) -> Vec<u8> {
        let m = (1u16 << (irq & 15)).to_le_bytes();
        vec![0x22, m[0], m[1]]
    }

    /// `Memory32Fixed (ReadWrite, base, len)`.
    pub fn memory32(base: u32, len: u32) -> Vec<u8> {
        let mut o = vec![0x86, 0x09, 0x00, 0x01];
        o.extend_from_slice(&base.to_le_bytes());
        o.extend_from_slice(&len.to_le_bytes());
        o
    }

    /// `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
    pub fn interrupt_edge(gsi: u32) -> Vec<u8> {
        let mut o = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        o.extend_from_slice(&gsi.to_le_bytes());
        o
    }

    /// Ends a template (checksum 0 = not checked).
    pub fn end() -> Vec<u8> {
        vec![0x79, 0x00]
    }
}

/// `Name (_CRS, ResourceTemplate () { items })`.
pub fn crs(items: &[Vec<u8>]) -> Vec<u8> {
    let mut t: Vec<u8> = items.iter().flatten().copied().collect();
    t.extend(res::end());
    name("_CRS", &buffer(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(pkg_length(4), vec![5]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 + 2 = 65 = 0x41: two bytes, low nibble 1, then 0x04.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x1234), vec![0x0b, 0x34, 0x12]);
        // EisaId("PNP0501") is 0x0105D041 stored little-endian.
        assert_eq!(eisa_id("PNP0501"), vec![0x0c, 0x41, 0xd0, 0x05, 0x01]);
        // Name (_S5_, Package () { 5, 0 }) as in every firmware.
        assert_eq!(
            name("_S5_", &package(&[integer(5), integer(0)])),
            vec![0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        );
        let d = device("COM1", &[name("_UID", &integer(0))]);
        assert_eq!(&d[..3], &[0x5b, 0x82, (d.len() - 2) as u8]);
    }
}
