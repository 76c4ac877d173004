//! The pure half of the emulation fix-ups: which instruction the bytes at RIP are
//! ([`decode`]) and the arithmetic of the ones computed here ([`popcnt`], [`with_ac`]). No
//! ioctls; [`super::handle_emulation_failure`] executes the result.

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::vcpu::decode::{self, Operand, Prefixes};

/// RFLAGS.AC (alignment check / SMAP override).
const RFLAGS_AC: u64 = 1 << 18;
/// RFLAGS.ZF.
const RFLAGS_ZF: u64 = 1 << 6;
/// OF, SF, ZF, AF, PF, CF: the flags POPCNT writes.
const POPCNT_FLAGS: u64 = 0x8d5;

/// An instruction the fix-ups handle, with its operands resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Insn {
    /// `cc`.
    Int3,
    /// `0f 01 ca`.
    Clac,
    /// `0f 01 cb`.
    Stac,
    /// `9b`.
    Fwait,
    /// `f3 0f b8 /r` (64-bit mode): `dst` = popcount of the low `width` (2, 4 or 8) bytes of
    /// `src`.
    Popcnt {
        /// Destination register number.
        dst: u8,
        /// Source register or memory (linear address).
        src: Operand,
        /// Operand size in bytes.
        width: usize,
    },
    /// `0f 01 d0`.
    Xgetbv,
    /// `0f ae /4 /5 /6` with a memory operand (64-bit mode): XSAVE / XSAVEOPT, or XRSTOR if
    /// `restore`.
    Xsave {
        /// XRSTOR (`/5`).
        restore: bool,
        /// Linear address of the area.
        addr: u64,
    },
    /// `0f ae /2 /3` with a memory operand (64-bit mode): LDMXCSR if `load`, else STMXCSR.
    Mxcsr {
        /// LDMXCSR (`/2`).
        load: bool,
        /// Linear address of the 32-bit operand.
        addr: u64,
    },
}

/// A decoded instruction and the number of bytes RIP advances past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Decoded {
    /// The instruction.
    pub insn: Insn,
    /// Its length (int3: always 1; see [`decode`]).
    pub len: usize,
}

fn seg_base(p: &Prefixes, s: &kvm_sregs) -> u64 {
    match p.seg {
        Some(0x64) => s.fs.base,
        Some(0x65) => s.gs.base,
        _ => 0,
    }
}

/// Decodes the instruction `bytes` (fetched at RIP) for a vCPU in 64-bit mode if `long`, with
/// memory operands resolved against `regs` and the FS/GS bases in `sregs`. None if it is not one
/// the fix-ups handle (or is truncated). Register forms of `0f ae` (LFENCE, MFENCE, SFENCE,
/// RDFSBASE, ...) are not taken for their memory forms. `cc` is one byte long even after
/// prefixes (RIP advances by 1, as it always did here).
pub(super) fn decode(
    bytes: &[u8],
    long: bool,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Option<Decoded> {
    let p = decode::prefixes(bytes);
    let op = bytes.get(p.len..)?;
    // ModRM operand of a two-byte (`0f xx`) opcode.
    let modrm = |rest: &[u8]| decode::modrm(rest, &p, regs, seg_base(&p, sregs), p.len + 2, 0);
    // Memory forms of `0f ae` with a ModRM reg field in `regs`.
    let group15_mem = |rest: &[u8], wanted: &[u8]| {
        long && rest
            .first()
            .is_some_and(|m| m >> 6 != 3 && wanted.contains(&((m >> 3) & 7)))
    };
    let (insn, len) = match op {
        [0xcc, ..] => (Insn::Int3, 1),
        [0x0f, 0x01, 0xca, ..] => (Insn::Clac, p.len + 3),
        [0x0f, 0x01, 0xcb, ..] => (Insn::Stac, p.len + 3),
        [0x9b, ..] => (Insn::Fwait, p.len + 1),
        [0x0f, 0xb8, rest @ ..] if p.rep && long => {
            let (dst, src, n) = modrm(rest)?;
            let width = if p.w() {
                8
            } else if p.opsize {
                2
            } else {
                4
            };
            (Insn::Popcnt { dst, src, width }, p.len + 2 + n)
        }
        [0x0f, 0x01, 0xd0, ..] => (Insn::Xgetbv, p.len + 3),
        // With a 66/f3/f2 mandatory prefix, group 15 memory forms are other instructions
        // (CLWB, CLFLUSHOPT, PTWRITE, ...): never emulate those as XSAVE or LDMXCSR.
        [0x0f, 0xae, ..] if p.opsize || p.rep || p.repne => return None,
        [0x0f, 0xae, rest @ ..] if group15_mem(rest, &[4, 5, 6]) => {
            let (r, Operand::Mem(addr), n) = modrm(rest)? else {
                return None;
            };
            let restore = r & 7 == 5;
            (Insn::Xsave { restore, addr }, p.len + 2 + n)
        }
        [0x0f, 0xae, rest @ ..] if group15_mem(rest, &[2, 3]) => {
            let (r, Operand::Mem(addr), n) = modrm(rest)? else {
                return None;
            };
            let load = r & 7 == 2;
            (Insn::Mxcsr { load, addr }, p.len + 2 + n)
        }
        _ => return None,
    };
    Some(Decoded { insn, len })
}

/// POPCNT of the low `width` (2, 4 or 8) bytes of `src` into a destination register holding
/// `old_dst`, with RFLAGS `rflags`: returns the destination's new value (a 16-bit destination
/// keeps bits 63:16, a 32-bit one is zero-extended) and the new RFLAGS (OF, SF, ZF, AF, PF, CF
/// cleared, then ZF set if the source is zero).
pub(super) fn popcnt(src: u64, width: usize, old_dst: u64, rflags: u64) -> (u64, u64) {
    let v = if width >= 8 {
        src
    } else {
        src & ((1u64 << (width * 8)) - 1)
    };
    let count = u64::from(v.count_ones());
    let dst = if width == 2 {
        (old_dst & !0xffff) | count
    } else {
        count
    };
    let mut flags = rflags & !POPCNT_FLAGS;
    if v == 0 {
        flags |= RFLAGS_ZF;
    }
    (dst, flags)
}

/// RFLAGS with AC set (STAC) or cleared (CLAC).
pub(super) fn with_ac(rflags: u64, set: bool) -> u64 {
    if set {
        rflags | RFLAGS_AC
    } else {
        rflags & !RFLAGS_AC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rax: 0x1000,
            rcx: 0x0123_4567_89ab_cdef,
            rsp: 0xffff_c900_0001_0000,
            rdi: 0xffff_8880_0200_0000,
            r9: 0x99,
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        }
    }

    fn sregs() -> kvm_sregs {
        let mut s = kvm_sregs::default();
        s.fs.base = 0x7f00_0000_0000;
        s.gs.base = 0xffff_8880_7fc0_0000;
        s
    }

    fn dec(bytes: &[u8], long: bool) -> Option<(Insn, usize)> {
        decode(bytes, long, &regs(), &sregs()).map(|d| (d.insn, d.len))
    }

    #[test]
    fn simple_instructions() {
        let cases: &[(&[u8], Insn, usize)] = &[
            (&[0xcc], Insn::Int3, 1),
            (&[0xcc, 0x90, 0x90], Insn::Int3, 1),
            // Prefixed int3: RIP still advances by 1 (unchanged behaviour).
            (&[0x66, 0xcc], Insn::Int3, 1),
            (&[0x0f, 0x01, 0xca], Insn::Clac, 3),
            (&[0x0f, 0x01, 0xca, 0x0f, 0x01, 0xcb], Insn::Clac, 3),
            (&[0x0f, 0x01, 0xcb], Insn::Stac, 3),
            (&[0x66, 0x0f, 0x01, 0xcb], Insn::Stac, 4),
            (&[0x9b], Insn::Fwait, 1),
            // `finit` is fwait + fninit: only the fwait is skipped.
            (&[0x9b, 0xdb, 0xe3], Insn::Fwait, 1),
            (&[0x0f, 0x01, 0xd0], Insn::Xgetbv, 3),
            (&[0x0f, 0x01, 0xd0, 0xc3], Insn::Xgetbv, 3),
        ];
        for &(bytes, insn, len) in cases {
            for long in [true, false] {
                assert_eq!(
                    dec(bytes, long),
                    Some((insn, len)),
                    "{bytes:02x?} long {long}"
                );
            }
        }
    }

    #[test]
    fn popcnt_forms() {
        let r = regs();
        let s = sregs();
        let pop = |dst, src, width| Insn::Popcnt { dst, src, width };
        let cases: &[(&[u8], Insn, usize)] = &[
            // popcnt eax, ecx
            (&[0xf3, 0x0f, 0xb8, 0xc1], pop(0, Operand::Reg(1), 4), 4),
            // popcnt rax, rcx
            (
                &[0xf3, 0x48, 0x0f, 0xb8, 0xc1],
                pop(0, Operand::Reg(1), 8),
                5,
            ),
            // popcnt ax, cx
            (
                &[0x66, 0xf3, 0x0f, 0xb8, 0xc1],
                pop(0, Operand::Reg(1), 2),
                5,
            ),
            // popcnt r8, rcx (REX.WR)
            (
                &[0xf3, 0x4c, 0x0f, 0xb8, 0xc1],
                pop(8, Operand::Reg(1), 8),
                5,
            ),
            // popcnt eax, r9d (REX.B)
            (
                &[0xf3, 0x41, 0x0f, 0xb8, 0xc1],
                pop(0, Operand::Reg(9), 4),
                5,
            ),
            // popcnt edx, [rdi]
            (&[0xf3, 0x0f, 0xb8, 0x17], pop(2, Operand::Mem(r.rdi), 4), 4),
            // popcnt rax, gs:[0x10]
            (
                &[0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x10, 0, 0, 0],
                pop(0, Operand::Mem(s.gs.base + 0x10), 8),
                11,
            ),
            // popcnt rax, [rip + 0x10]: 9 bytes long
            (
                &[0xf3, 0x48, 0x0f, 0xb8, 0x05, 0x10, 0, 0, 0],
                pop(0, Operand::Mem(r.rip + 9 + 0x10), 8),
                9,
            ),
            // popcnt ecx, [rax + 8] with a DS override (ignored)
            (
                &[0x3e, 0xf3, 0x0f, 0xb8, 0x48, 0x08],
                pop(1, Operand::Mem(r.rax + 8), 4),
                6,
            ),
        ];
        for &(bytes, insn, len) in cases {
            assert_eq!(dec(bytes, true), Some((insn, len)), "{bytes:02x?}");
            // Only emulated in 64-bit mode.
            assert_eq!(dec(bytes, false), None, "{bytes:02x?}");
        }
        // Without the mandatory f3 (JMPE), or truncated.
        assert_eq!(dec(&[0x0f, 0xb8, 0xc1], true), None);
        assert_eq!(dec(&[0xf3, 0x0f, 0xb8], true), None);
        assert_eq!(dec(&[0xf3, 0x0f, 0xb8, 0x05, 0x10], true), None);
    }

    #[test]
    fn group15_memory_forms() {
        let r = regs();
        let s = sregs();
        let xs = |restore, addr| Insn::Xsave { restore, addr };
        let mx = |load, addr| Insn::Mxcsr { load, addr };
        let cases: &[(&[u8], Insn, usize)] = &[
            // xsave [rdi]
            (&[0x0f, 0xae, 0x27], xs(false, r.rdi), 3),
            // xrstor [rdi]
            (&[0x0f, 0xae, 0x2f], xs(true, r.rdi), 3),
            // xsaveopt [rdi]
            (&[0x0f, 0xae, 0x37], xs(false, r.rdi), 3),
            // xsave64 [rdi], xrstor64 [rdi + 0x40]
            (&[0x48, 0x0f, 0xae, 0x27], xs(false, r.rdi), 4),
            (&[0x48, 0x0f, 0xae, 0x6f, 0x40], xs(true, r.rdi + 0x40), 5),
            // xrstor64 [r9] (REX.WB)
            (&[0x49, 0x0f, 0xae, 0x29], xs(true, 0x99), 4),
            // xsave fs:[rax]
            (&[0x64, 0x0f, 0xae, 0x20], xs(false, s.fs.base + r.rax), 4),
            // ldmxcsr [rdi], stmxcsr [rdi]
            (&[0x0f, 0xae, 0x17], mx(true, r.rdi), 3),
            (&[0x0f, 0xae, 0x1f], mx(false, r.rdi), 3),
            // ldmxcsr [rsp + 8]
            (&[0x0f, 0xae, 0x54, 0x24, 0x08], mx(true, r.rsp + 8), 5),
            // stmxcsr gs:[0x20]
            (
                &[0x65, 0x0f, 0xae, 0x1c, 0x25, 0x20, 0, 0, 0],
                mx(false, s.gs.base + 0x20),
                9,
            ),
            // ldmxcsr [rip - 4]
            (
                &[0x0f, 0xae, 0x15, 0xfc, 0xff, 0xff, 0xff],
                mx(true, r.rip + 7 - 4),
                7,
            ),
        ];
        for &(bytes, insn, len) in cases {
            assert_eq!(dec(bytes, true), Some((insn, len)), "{bytes:02x?}");
            assert_eq!(dec(bytes, false), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn group15_register_and_other_forms_are_unknown() {
        for bytes in [
            &[0x0f, 0xae, 0xe8][..],         // lfence
            &[0x0f, 0xae, 0xf0],             // mfence
            &[0x0f, 0xae, 0xf8],             // sfence
            &[0x0f, 0xae, 0xe0],             // mod 3, reg 4
            &[0x0f, 0xae, 0xd0],             // mod 3, reg 2
            &[0xf3, 0x0f, 0xae, 0xd0],       // wrfsbase eax
            &[0xf3, 0x48, 0x0f, 0xae, 0xc0], // rdfsbase rax
            &[0x0f, 0xae, 0x07],             // fxsave [rdi]
            &[0x0f, 0xae, 0x0f],             // fxrstor [rdi]
            &[0x0f, 0xae, 0x3f],             // clflush [rdi]
            &[0x0f, 0xae, 0x24],             // truncated SIB
            &[0x0f, 0xae, 0x6f],             // truncated disp8
            &[0x0f, 0xae],                   // truncated ModRM
            &[0x66, 0x0f, 0xae, 0x37],       // clwb [rdi] (not xsaveopt)
            &[0x66, 0x0f, 0xae, 0x3f],       // clflushopt [rdi]
            &[0xf3, 0x0f, 0xae, 0x27],       // ptwrite [rdi] (not xsave)
            &[0x66, 0x0f, 0xae, 0x17],       // 66-prefixed ldmxcsr form
        ] {
            assert_eq!(dec(bytes, true), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn unknown_bytes() {
        for bytes in [
            &[][..],
            &[0x90],
            &[0x0f, 0x0b],       // ud2
            &[0x0f, 0x01],       // truncated
            &[0x0f, 0x01, 0xcc], // not clac/stac/xgetbv
            &[0x0f, 0x01, 0xd1], // xsetbv
            &[0x66, 0xf3],       // prefixes only
            &[0x48],             // REX only
            &[0xf3, 0x48, 0x0f, 0xc7, 0xf8],
        ] {
            for long in [true, false] {
                assert_eq!(dec(bytes, long), None, "{bytes:02x?}");
            }
        }
    }

    /// Population count and flags, computed bit by bit.
    fn model_popcnt(src: u64, width: usize, old: u64, rflags: u64) -> (u64, u64) {
        let bits = width * 8;
        let count = (0..bits).filter(|&b| (src >> b) & 1 == 1).count() as u64;
        let dst = match width {
            2 => (old & 0xffff_ffff_ffff_0000) | count,
            _ => count,
        };
        // CF 0, PF 2, AF 4, ZF 6, SF 7, OF 11.
        let mut f = rflags;
        for b in [0, 2, 4, 6, 7, 11] {
            f &= !(1u64 << b);
        }
        if count == 0 {
            f |= 1 << 6;
        }
        (dst, f)
    }

    #[test]
    fn popcnt_results_and_flags() {
        let all_flags = 0x0000_0000_003f_0fd7u64;
        let cases: &[(u64, usize, u64, u64, u64)] = &[
            // (src, width, old dst, dst, ZF)
            (0, 8, 0xffff_ffff_ffff_ffff, 0, 1),
            (0, 4, 0xffff_ffff_ffff_ffff, 0, 1),
            (0, 2, 0xffff_ffff_ffff_ffff, 0xffff_ffff_ffff_0000, 1),
            (u64::MAX, 8, 0, 64, 0),
            (u64::MAX, 4, 0x1234_5678_9abc_def0, 32, 0),
            (u64::MAX, 2, 0x1234_5678_9abc_def0, 0x1234_5678_9abc_0010, 0),
            // Bits above the operand size do not count; the source is zero at that size.
            (0xffff_ffff_0000_0000, 4, 7, 0, 1),
            (
                0xffff_0000,
                2,
                0xaaaa_bbbb_cccc_dddd,
                0xaaaa_bbbb_cccc_0000,
                1,
            ),
            (0x8000_0000_0000_0001, 8, 0, 2, 0),
            (0x0f0f, 2, 0, 8, 0),
        ];
        for &(src, width, old, dst, zf) in cases {
            for rflags in [0x2u64, all_flags] {
                let (d, f) = popcnt(src, width, old, rflags);
                assert_eq!(d, dst, "{src:#x}/{width}");
                assert_eq!(f & 0x40, zf << 6, "ZF {src:#x}/{width}");
                assert_eq!(f & 0x895, 0, "OF SF AF PF CF cleared");
                assert_eq!(f & !0x8d5, rflags & !0x8d5, "other flags kept");
                assert_eq!((d, f), model_popcnt(src, width, old, rflags));
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let width = [2, 4, 8][(x % 3) as usize];
            let src = x.rotate_left(17) & x.rotate_left(31);
            let rflags = (x.rotate_left(5) & all_flags) | 2;
            assert_eq!(
                popcnt(src, width, !x, rflags),
                model_popcnt(src, width, !x, rflags)
            );
        }
    }

    #[test]
    fn clac_stac_flip_only_ac() {
        for rflags in [0x2u64, 0x246, 0x4_0246, 0x3f_7fd7, 0x2 | (1 << 18)] {
            assert_eq!(with_ac(rflags, true), rflags | 0x4_0000);
            assert_eq!(with_ac(rflags, false), rflags & !0x4_0000);
            assert_eq!(
                with_ac(rflags, true) ^ rflags,
                (rflags & 0x4_0000) ^ 0x4_0000
            );
        }
    }
}
