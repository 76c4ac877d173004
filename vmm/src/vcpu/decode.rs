//! Just enough x86-64 instruction decoding for the emulation fix-ups in [`super::quirks`]:
//! legacy/REX prefixes and ModRM/SIB/displacement operands.

use kvm_bindings::kvm_regs;

/// Operand named by a ModRM byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// General-purpose register number (0 = RAX ... 15 = R15).
    Reg(u8),
    /// Memory at this linear address (segment base already added).
    Mem(u64),
}

/// A decoded instruction prefix set and the position of the opcode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefixes {
    /// 0x66 operand-size override.
    pub opsize: bool,
    /// 0xf3 (REP / mandatory prefix).
    pub rep: bool,
    /// 0xf2.
    pub repne: bool,
    /// REX byte (0 if none).
    pub rex: u8,
    /// 0x64 (FS) or 0x65 (GS) segment override.
    pub seg: Option<u8>,
    /// Bytes consumed.
    pub len: usize,
}

impl Prefixes {
    /// REX.W.
    pub fn w(&self) -> bool {
        self.rex & 8 != 0
    }
}

/// Parses legacy prefixes and an optional REX prefix.
pub fn prefixes(b: &[u8]) -> Prefixes {
    let mut p = Prefixes::default();
    while let Some(&x) = b.get(p.len) {
        match x {
            0x66 => p.opsize = true,
            0xf3 => p.rep = true,
            0xf2 => p.repne = true,
            0x64 | 0x65 => p.seg = Some(x),
            0x26 | 0x2e | 0x36 | 0x3e | 0x67 | 0xf0 => {}
            _ => break,
        }
        p.len += 1;
    }
    if let Some(&x) = b.get(p.len) {
        if x & 0xf0 == 0x40 {
            p.rex = x;
            p.len += 1;
        }
    }
    p
}

/// Reads general-purpose register `n`.
pub fn reg(r: &kvm_regs, n: u8) -> u64 {
    match n & 15 {
        0 => r.rax,
        1 => r.rcx,
        2 => r.rdx,
        3 => r.rbx,
        4 => r.rsp,
        5 => r.rbp,
        6 => r.rsi,
        7 => r.rdi,
        8 => r.r8,
        9 => r.r9,
        10 => r.r10,
        11 => r.r11,
        12 => r.r12,
        13 => r.r13,
        14 => r.r14,
        _ => r.r15,
    }
}

/// Writes general-purpose register `n`.
pub fn set_reg(r: &mut kvm_regs, n: u8, v: u64) {
    let slot = match n & 15 {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => &mut r.rsp,
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        _ => &mut r.r15,
    };
    *slot = v;
}

/// Decodes the ModRM operand starting at `b[0]` (the ModRM byte) in 64-bit mode.
/// `insn_end_extra` is the number of immediate bytes following the operand (for RIP-relative
/// addressing); `rip` is the address of the instruction's first byte and `start` the offset of
/// the ModRM byte within it. Returns (reg field, operand, bytes consumed) or None if truncated.
pub fn modrm(
    b: &[u8],
    p: &Prefixes,
    regs: &kvm_regs,
    seg_base: u64,
    start: usize,
    insn_end_extra: usize,
) -> Option<(u8, Operand, usize)> {
    let m = *b.first()?;
    let md = m >> 6;
    let regf = ((m >> 3) & 7) | ((p.rex & 4) << 1);
    let rm = m & 7;
    if md == 3 {
        return Some((regf, Operand::Reg(rm | ((p.rex & 1) << 3)), 1));
    }
    let mut len = 1;
    let mut addr: u64;
    let mut rip_relative = false;
    if rm == 4 {
        let s = *b.get(1)?;
        len += 1;
        let scale = s >> 6;
        let index = ((s >> 3) & 7) | ((p.rex & 2) << 2);
        let base = (s & 7) | ((p.rex & 1) << 3);
        addr = if index == 4 {
            0
        } else {
            reg(regs, index) << scale
        };
        if s & 7 == 5 && md == 0 {
            let d = i32::from_le_bytes(b.get(len..len + 4)?.try_into().ok()?);
            len += 4;
            addr = addr.wrapping_add(d as i64 as u64);
        } else {
            addr = addr.wrapping_add(reg(regs, base));
        }
    } else if rm == 5 && md == 0 {
        rip_relative = true;
        let d = i32::from_le_bytes(b.get(1..5)?.try_into().ok()?);
        len += 4;
        addr = d as i64 as u64;
    } else {
        addr = reg(regs, rm | ((p.rex & 1) << 3));
    }
    match md {
        1 => {
            addr = addr.wrapping_add(*b.get(len)? as i8 as i64 as u64);
            len += 1;
        }
        2 => {
            let d = i32::from_le_bytes(b.get(len..len + 4)?.try_into().ok()?);
            addr = addr.wrapping_add(d as i64 as u64);
            len += 4;
        }
        _ => {}
    }
    if rip_relative {
        let next = regs.rip.wrapping_add((start + len + insn_end_extra) as u64);
        addr = addr.wrapping_add(next);
    }
    Some((regf, Operand::Mem(addr.wrapping_add(seg_base)), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_rex() {
        let p = prefixes(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]);
        assert!(p.rep && p.w());
        assert_eq!(p.len, 2);
        let p = prefixes(&[0x65, 0x0f, 0xae, 0x10]);
        assert_eq!(p.seg, Some(0x65));
    }

    #[test]
    fn modrm_forms() {
        let mut r = kvm_regs {
            rax: 0x1000,
            rbx: 0x20,
            rbp: 0x5000,
            rip: 0xffff_0000,
            ..Default::default()
        };
        let p = Prefixes::default();
        // [rax]
        assert_eq!(
            modrm(&[0x10], &p, &r, 0, 2, 0),
            Some((2, Operand::Mem(0x1000), 1))
        );
        // [rbp - 8]
        assert_eq!(
            modrm(&[0x55, 0xf8], &p, &r, 0, 2, 0),
            Some((2, Operand::Mem(0x4ff8), 2))
        );
        // [rax + rbx*4 + 0x10]
        assert_eq!(
            modrm(&[0x54, 0x98, 0x10], &p, &r, 0, 2, 0),
            Some((2, Operand::Mem(0x1000 + 0x80 + 0x10), 3))
        );
        // [rip + 0x100]: instruction is 2 opcode bytes + modrm + disp32 = 7 bytes.
        assert_eq!(
            modrm(&[0x15, 0, 1, 0, 0], &p, &r, 0, 2, 0),
            Some((2, Operand::Mem(0xffff_0000 + 7 + 0x100), 5))
        );
        // register form with REX.B and REX.R
        let p = Prefixes {
            rex: 0x4d,
            ..Default::default()
        };
        assert_eq!(
            modrm(&[0xc7], &p, &r, 0, 3, 0),
            Some((8, Operand::Reg(15), 1))
        );
        set_reg(&mut r, 15, 7);
        assert_eq!(reg(&r, 15), 7);
        // truncated
        assert_eq!(modrm(&[0x15, 0], &Prefixes::default(), &r, 0, 2, 0), None);
    }
}
