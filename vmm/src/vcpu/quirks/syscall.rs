//! The broken user-mode SYSCALL (see [`super`]): recognising it from the page-fault exception
//! frame at the `clac` that starts the page-fault entry ([`complete`], pure) and completing it
//! on the vCPU ([`complete_broken_syscall`]).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::{get_msrs, read_virt, Error};
use crate::boot::cpu::msr;

/// RFLAGS.RF (cleared by SYSCALL).
const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS bit 1 (always set).
const RFLAGS_FIXED: u64 = 1 << 1;
/// Page-fault error code: user-mode access (bit 2) and instruction fetch (bit 4).
const PF_USER_FETCH: u64 = 0x14;

/// The hardware exception frame on the kernel stack (the page-fault error code first; SS
/// follows RSP and is not needed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Frame {
    /// Page-fault error code.
    pub error_code: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// CS at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// RSP at the fault.
    pub rsp: u64,
}

impl Frame {
    /// Bytes read from the stack pointer, in memory order.
    const LEN: usize = 48;

    fn from_bytes(raw: &[u8; Self::LEN]) -> Frame {
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Frame {
            error_code: w(0),
            rip: w(1),
            cs: w(2),
            rflags: w(3),
            rsp: w(4),
        }
    }
}

/// The MSRs that SYSCALL reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SyscallMsrs {
    /// STAR (kernel CS in bits 47:32).
    pub star: u64,
    /// LSTAR (64-bit entry point).
    pub lstar: u64,
    /// CSTAR (compatibility-mode entry point).
    pub cstar: u64,
    /// FS base.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// SFMASK (RFLAGS bits SYSCALL clears).
    pub sfmask: u64,
}

impl SyscallMsrs {
    const INDICES: [u32; 6] = [
        msr::STAR,
        msr::LSTAR,
        msr::CSTAR,
        msr::FS_BASE,
        msr::GS_BASE,
        msr::SYSCALL_MASK,
    ];

    fn read(vcpu: &VcpuFd) -> Result<SyscallMsrs, Error> {
        let m = get_msrs(vcpu, &Self::INDICES)?;
        let v = |i: usize| m.get(i).copied().unwrap_or(0);
        Ok(SyscallMsrs {
            star: v(0),
            lstar: v(1),
            cstar: v(2),
            fs_base: v(3),
            gs_base: v(4),
            sfmask: v(5),
        })
    }
}

/// The checks that need no MSR: the vCPU runs kernel code (CS RPL 0) and the frame is a
/// user-mode instruction-fetch page fault at the frame's RIP (CR2 = RIP).
pub(super) fn is_user_fetch_fault(frame: &Frame, sregs: &kvm_sregs) -> bool {
    sregs.cs.selector & 3 == 0
        && frame.cs & 3 == 3
        && frame.error_code & PF_USER_FETCH == PF_USER_FETCH
        && sregs.cr2 == frame.rip
}

fn flat_segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// If the vCPU (`regs`, `sregs`) is at the page-fault entry with exception frame `frame` for a
/// broken SYSCALL (a user instruction-fetch fault at LSTAR or CSTAR), the registers of the
/// completed SYSCALL: kernel CS = STAR[47:32] & 0xfffc and SS = CS + 8 (flat, 64-bit code),
/// RIP and RSP from the frame, RFLAGS from the frame with the SFMASK bits and RF cleared, and
/// the FS/GS bases from the MSRs. Everything else is kept. None if it is not a broken SYSCALL.
pub(super) fn complete(
    frame: &Frame,
    msrs: &SyscallMsrs,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Option<(kvm_regs, kvm_sregs)> {
    if !is_user_fetch_fault(frame, sregs) || (frame.rip != msrs.lstar && frame.rip != msrs.cstar) {
        return None;
    }
    let mut sregs = *sregs;
    let mut regs = *regs;
    // KVM_SET_SREGS rewrites every segment. On the emulating host the FS/GS bases reported by
    // KVM_GET_SREGS can lag behind the MSRs (a user process then lost its TLS pointer after a
    // completed SYSCALL), so take the bases from the MSRs.
    if sregs.fs.base != msrs.fs_base || sregs.gs.base != msrs.gs_base {
        log::debug!(
            "SYSCALL fix-up: sregs FS/GS base {:#x}/{:#x} differ from MSRs {:#x}/{:#x}",
            sregs.fs.base,
            sregs.gs.base,
            msrs.fs_base,
            msrs.gs_base
        );
    }
    sregs.fs.base = msrs.fs_base;
    sregs.gs.base = msrs.gs_base;
    let kcs = ((msrs.star >> 32) & 0xfffc) as u16;
    sregs.cs = flat_segment(kcs, 0xb, 1, 0);
    sregs.ss = flat_segment(kcs.wrapping_add(8), 0x3, 0, 1);
    // SYSCALL clears the RFLAGS bits in SFMASK (IF, TF, DF, AC for Linux) and RF. Whether or not
    // the broken SYSCALL did, the completed one must: with IF still set, an interrupt injected
    // at the entry point (before the stack switch) would be pushed onto the user stack.
    if frame.rflags & msrs.sfmask != 0 {
        log::debug!(
            "SYSCALL fix-up: RFLAGS {:#x} had SFMASK bits {:#x} set",
            frame.rflags,
            frame.rflags & msrs.sfmask
        );
    }
    regs.rip = frame.rip;
    regs.rsp = frame.rsp;
    regs.rflags = (frame.rflags & !msrs.sfmask & !RFLAGS_RF) | RFLAGS_FIXED;
    Some((regs, sregs))
}

/// If the vCPU is at a `clac` at the very start of a page-fault entry caused by a broken
/// user-mode SYSCALL, completes the SYSCALL (`KVM_SET_SREGS`; the caller sets `regs`) and
/// returns true.
pub(super) fn complete_broken_syscall(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
) -> Result<bool, Error> {
    if sregs.cs.selector & 3 != 0 {
        return Ok(false);
    }
    let mut raw = [0u8; Frame::LEN];
    if read_virt(vcpu, mem, regs.rsp, &mut raw).is_err() {
        return Ok(false);
    }
    let frame = Frame::from_bytes(&raw);
    if !is_user_fetch_fault(&frame, sregs) {
        return Ok(false);
    }
    let msrs = SyscallMsrs::read(vcpu)?;
    let Some((new_regs, new_sregs)) = complete(&frame, &msrs, regs, sregs) else {
        return Ok(false);
    };
    *regs = new_regs;
    *sregs = new_sregs;
    vcpu.set_sregs(sregs)
        .map_err(|e| Error::Kvm("SET_SREGS", e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSTAR: u64 = 0xffff_ffff_8180_0080;
    const CSTAR: u64 = 0xffff_ffff_8180_1200;
    /// Linux: IF, TF, DF, IOPL, AC, NT.
    const SFMASK: u64 = 0x4_7700;

    fn msrs() -> SyscallMsrs {
        SyscallMsrs {
            // User base 0x23 in 63:48, kernel CS 0x10 in 47:32 (with RPL bits to be masked).
            star: 0x0023_0013_0000_0000,
            lstar: LSTAR,
            cstar: CSTAR,
            fs_base: 0x7f12_3456_7000,
            gs_base: 0xffff_8880_7fc0_0000,
            sfmask: SFMASK,
        }
    }

    /// A user process's SYSCALL that kept user CS/SS; RIP = LSTAR faulted.
    fn frame() -> Frame {
        Frame {
            error_code: 0x15, // present, user, instruction fetch
            rip: LSTAR,
            cs: 0x33,
            rflags: 0x24_0246 | (1 << 8) | (1 << 10) | RFLAGS_RF, // AC, ID, IF, ZF, PF, TF, DF, RF
            rsp: 0x7ffc_dead_bee0,
        }
    }

    /// The vCPU at the page-fault entry's `clac`.
    fn vcpu() -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8180_0a00,
            rsp: 0xffff_fe00_0000_1f58,
            rflags: 0x2 | (1 << 18),
            rcx: 0x4011_2233,
            r11: 0x246,
            rax: 39,
            ..Default::default()
        };
        let seg = |selector, base| kvm_segment {
            selector,
            base,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cs: flat_segment(0x10, 0xb, 1, 0),
            ss: flat_segment(0x18, 0x3, 0, 1),
            ds: seg(0x2b, 0),
            fs: seg(0, 0x1111),
            gs: seg(0, 0x2222),
            cr2: LSTAR,
            cr3: 0x1234_5000,
            efer: 0xd01,
            ..Default::default()
        };
        (regs, sregs)
    }

    #[test]
    fn completes_at_lstar_and_cstar() {
        for entry in [LSTAR, CSTAR] {
            let (regs, sregs) = vcpu();
            let sregs = kvm_sregs {
                cr2: entry,
                ..sregs
            };
            let f = Frame {
                rip: entry,
                ..frame()
            };
            let (r, s) = complete(&f, &msrs(), &regs, &sregs).expect("a broken SYSCALL");
            assert_eq!(r.rip, entry);
            assert_eq!(r.rsp, f.rsp);
            assert_eq!(r.rflags, (f.rflags & !SFMASK & !RFLAGS_RF) | 2);
            assert_eq!(r.rflags, 0x20_0046, "ID, ZF, PF and bit 1");
            // Registers SYSCALL does not write (RCX/R11 were already set by the CPU) are kept.
            assert_eq!(
                kvm_regs {
                    rip: regs.rip,
                    rsp: regs.rsp,
                    rflags: regs.rflags,
                    ..r
                },
                regs
            );
            assert_eq!(s.cs.selector, 0x10, "STAR[47:32] & 0xfffc");
            assert_eq!((s.cs.type_, s.cs.l, s.cs.db, s.cs.dpl), (0xb, 1, 0, 0));
            assert_eq!(s.ss.selector, 0x18, "CS + 8");
            assert_eq!((s.ss.type_, s.ss.l, s.ss.db, s.ss.dpl), (0x3, 0, 1, 0));
            for seg in [s.cs, s.ss] {
                assert_eq!(
                    (seg.base, seg.limit, seg.present, seg.s, seg.g),
                    (0, !0, 1, 1, 1)
                );
                assert_eq!(seg.unusable, 0);
            }
            assert_eq!(s.fs.base, msrs().fs_base);
            assert_eq!(s.gs.base, msrs().gs_base);
            // Everything else in sregs is kept.
            let mut expect = sregs;
            expect.cs = s.cs;
            expect.ss = s.ss;
            expect.fs.base = s.fs.base;
            expect.gs.base = s.gs.base;
            assert_eq!(s, expect);
        }
    }

    #[test]
    fn rflags_bit1_and_masking() {
        let (regs, sregs) = vcpu();
        for (rflags, sfmask, want) in [
            (0x0u64, 0u64, 0x2u64),
            (0x1_0000, 0, 0x2),               // RF cleared
            (0x5_7fd7, 0, 0x4_7fd7),          // RF cleared, nothing masked
            (0x4_7fd7, SFMASK, 0x8d7),        // only the arithmetic flags and bit 1 survive
            (0x202, 0x200, 0x2),              // IF masked
            (0x200, 0x200, 0x2),              // bit 1 set
            (0x2c_0cc5, 0x4_0000, 0x28_0cc7), // only AC masked
        ] {
            let f = Frame { rflags, ..frame() };
            let m = SyscallMsrs { sfmask, ..msrs() };
            let (r, _) = complete(&f, &m, &regs, &sregs).unwrap();
            assert_eq!(r.rflags, want, "{rflags:#x}/{sfmask:#x}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let (regs, sregs) = vcpu();
        let m = msrs();
        let no = |f: Frame, s: kvm_sregs, m: SyscallMsrs, why: &str| {
            assert_eq!(complete(&f, &m, &regs, &s), None, "{why}");
        };
        no(
            Frame {
                error_code: 0x11,
                ..frame()
            },
            sregs,
            m,
            "supervisor fetch (bit 2 clear)",
        );
        no(
            Frame {
                error_code: 0x07,
                ..frame()
            },
            sregs,
            m,
            "user write, not a fetch (bit 4 clear)",
        );
        no(
            Frame {
                error_code: 0,
                ..frame()
            },
            sregs,
            m,
            "no error code bits",
        );
        no(
            Frame {
                cs: 0x10,
                ..frame()
            },
            sregs,
            m,
            "fault in kernel mode",
        );
        no(
            frame(),
            kvm_sregs {
                cr2: LSTAR + 1,
                ..sregs
            },
            m,
            "CR2 differs from RIP",
        );
        no(
            Frame {
                rip: LSTAR + 0x10,
                ..frame()
            },
            kvm_sregs {
                cr2: LSTAR + 0x10,
                ..sregs
            },
            m,
            "RIP neither LSTAR nor CSTAR",
        );
        let mut user = sregs;
        user.cs.selector = 0x33;
        no(frame(), user, m, "vCPU not in the kernel");
        no(
            frame(),
            sregs,
            SyscallMsrs { lstar: 0, ..m },
            "LSTAR elsewhere",
        );
        // The check without MSRs agrees.
        assert!(is_user_fetch_fault(&frame(), &sregs));
        assert!(!is_user_fetch_fault(&frame(), &user));
    }

    #[test]
    fn frame_from_stack_bytes() {
        let mut raw = [0u8; Frame::LEN];
        for (i, w) in [0x15u64, LSTAR, 0x33, 0x246, 0x7ffc_0000_0010, 0x2b]
            .iter()
            .enumerate()
        {
            raw[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(
            Frame::from_bytes(&raw),
            Frame {
                error_code: 0x15,
                rip: LSTAR,
                cs: 0x33,
                rflags: 0x246,
                rsp: 0x7ffc_0000_0010,
            }
        );
    }
}
