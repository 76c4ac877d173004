//! Fix-ups for hosts whose KVM cannot run everything the guest kernel does.
//!
//! On the project's machines `/dev/kvm` is a nested hypervisor without VMX that runs guest
//! kernel code through KVM's instruction emulator. Some instructions come back as
//! `KVM_EXIT_INTERNAL_ERROR` (emulation failure) and a user-mode `SYSCALL` does not switch to
//! the kernel's CS/SS. Everything needed to run Linux anyway lives in this module; on hardware
//! with VMX none of it triggers. Every fix-up is counted per kind and logged with RIP and the
//! instruction bytes; an instruction we do not know stops the VM with a report.
//!
//! | bytes | instruction | fix-up |
//! |---|---|---|
//! | `cc` | int3 | RIP += 1, inject #BP |
//! | `0f 01 ca` / `0f 01 cb` | clac / stac | flip RFLAGS.AC (clac first checks for a broken SYSCALL) |
//! | `9b` | fwait | no-op |
//! | `f3 0f b8` | popcnt | computed here |
//! | `0f ae /2`, `0f ae /3` | ldmxcsr / stmxcsr | through `KVM_GET_FPU`/`KVM_SET_FPU` |
//! | `0f ae /4 /5 /6` | xsave / xrstor / xsaveopt | through `KVM_GET_XSAVE`/`KVM_SET_XSAVE` ([`super::xsave`]) |
//! | `0f 01 d0` | xgetbv | from `KVM_GET_XCRS` |
//!
//! An emulated memory access to an unmapped guest address injects the page fault the CPU
//! would have raised (the kernel's exception tables handle it, e.g. for signal frames).
//!
//! **Broken SYSCALL**: the CPU loads RIP = LSTAR but keeps the user CS/SS, so fetching the
//! supervisor-only entry code page-faults. The page-fault entry starts with `clac`, which exits
//! here; if the exception frame shows a user-mode instruction fetch fault at LSTAR (or CSTAR),
//! the VMM abandons the fault and completes the SYSCALL: kernel CS/SS from STAR, RIP = LSTAR,
//! RSP and RFLAGS as the SYSCALL left them (RCX and R11 were already set by the CPU).

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::decode::{self, Operand};
use crate::boot::cpu::msr;

/// Errors from the fix-up path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An emulation failure on an instruction this module does not handle.
    #[error("unhandled emulation failure at RIP {rip:#x} (CPL {cpl}): bytes [{bytes}]")]
    Unknown {
        /// Linear RIP.
        rip: u64,
        /// Current privilege level.
        cpl: u8,
        /// Instruction bytes (hex).
        bytes: String,
    },
    /// A KVM ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory at a virtual address is not mapped or not RAM.
    #[error("cannot read guest virtual address {0:#x}")]
    GuestRead(u64),
    /// A form of an instruction this module does not emulate.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A fix-up kind, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fixup {
    /// int3 turned into an injected #BP.
    Int3,
    /// clac emulated.
    Clac,
    /// stac emulated.
    Stac,
    /// fwait skipped.
    Fwait,
    /// popcnt computed.
    Popcnt,
    /// ldmxcsr emulated.
    Ldmxcsr,
    /// stmxcsr emulated.
    Stmxcsr,
    /// A user SYSCALL completed by the VMM.
    Syscall,
    /// xsave / xsaveopt emulated.
    Xsave,
    /// xrstor emulated.
    Xrstor,
    /// xgetbv emulated.
    Xgetbv,
    /// A page fault injected because an emulated instruction's memory operand was not mapped.
    PageFault,
}

impl Fixup {
    /// Name used in logs and statistics.
    pub fn name(self) -> &'static str {
        match self {
            Fixup::Int3 => "int3 (cc)",
            Fixup::Clac => "clac (0f 01 ca)",
            Fixup::Stac => "stac (0f 01 cb)",
            Fixup::Fwait => "fwait (9b)",
            Fixup::Popcnt => "popcnt (f3 0f b8)",
            Fixup::Ldmxcsr => "ldmxcsr (0f ae /2)",
            Fixup::Stmxcsr => "stmxcsr (0f ae /3)",
            Fixup::Syscall => "user SYSCALL completed",
            Fixup::Xsave => "xsave/xsaveopt (0f ae /4 /6)",
            Fixup::Xrstor => "xrstor (0f ae /5)",
            Fixup::Xgetbv => "xgetbv (0f 01 d0)",
            Fixup::PageFault => "#PF injected for an emulated access",
        }
    }
}

/// Fix-up sites (kind, RIP) already logged at info level.
type SiteSet = std::collections::HashSet<(Fixup, u64)>;

/// Counts of fix-ups by kind, and the sites already logged at info level.
#[derive(Default)]
pub struct FixupStats {
    inner: Mutex<(BTreeMap<Fixup, u64>, SiteSet)>,
}

impl FixupStats {
    fn record(&self, f: Fixup, rip: u64, bytes: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *g.0.entry(f).or_default() += 1;
        let hex = hex(bytes);
        if g.1.insert((f, rip)) {
            log::info!(
                "fix-up {} at RIP {rip:#x}: bytes [{hex}] (first at this site)",
                f.name()
            );
        } else {
            log::debug!("fix-up {} at RIP {rip:#x}: bytes [{hex}]", f.name());
        }
    }

    /// Counts by kind.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.iter().map(|(k, v)| (k.name(), *v)).collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Walks `len` bytes of guest virtual memory from `gva` page by page through the vCPU's page
/// tables (`KVM_TRANSLATE`), calling `f(offset, length, guest physical address)` per piece.
fn for_each_phys(
    vcpu: &VcpuFd,
    gva: u64,
    len: usize,
    need_write: bool,
    mut f: impl FnMut(usize, usize, GuestAddress) -> Result<(), ()>,
) -> Result<(), Error> {
    let mut done = 0;
    while done < len {
        let va = gva.wrapping_add(done as u64);
        let t = vcpu
            .translate_gva(va)
            .map_err(|e| Error::Kvm("TRANSLATE", e))?;
        if t.valid == 0 || (need_write && t.writeable == 0) {
            return Err(Error::GuestRead(va));
        }
        let n = (4096 - (va & 0xfff) as usize).min(len - done);
        f(done, n, GuestAddress(t.physical_address)).map_err(|_| Error::GuestRead(va))?;
        done += n;
    }
    Ok(())
}

/// Reads guest virtual memory through the vCPU's page tables.
pub(super) fn read_virt(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    for_each_phys(vcpu, gva, buf.len(), false, |off, n, gpa| {
        mem.read_slice(&mut buf[off..off + n], gpa).map_err(|_| ())
    })
}

/// Writes guest virtual memory through the vCPU's page tables (the page must be writable).
pub(super) fn write_virt(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    gva: u64,
    data: &[u8],
) -> Result<(), Error> {
    for_each_phys(vcpu, gva, data.len(), true, |off, n, gpa| {
        mem.write_slice(&data[off..off + n], gpa).map_err(|_| ())
    })
}

fn fetch(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    // Read byte by byte backwards from 15 so a fetch that ends at an unmapped page still
    // yields the bytes that exist.
    let mut buf = [0u8; 15];
    for len in (1..=15).rev() {
        if read_virt(vcpu, mem, rip, &mut buf[..len]).is_ok() {
            return buf[..len].to_vec();
        }
    }
    Vec::new()
}

fn get_msrs(vcpu: &VcpuFd, idx: &[u32]) -> Result<Vec<u64>, Error> {
    let entries: Vec<kvm_msr_entry> = idx
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut m = Msrs::from_entries(&entries)
        .map_err(|_| Error::Kvm("GET_MSRS", kvm_ioctls::Error::new(libc::EINVAL)))?;
    vcpu.get_msrs(&mut m)
        .map_err(|e| Error::Kvm("GET_MSRS", e))?;
    Ok(m.as_slice().iter().map(|e| e.data).collect())
}

/// Reads the guest TSC (for the TSC-deadline timer).
pub fn guest_tsc(vcpu: &VcpuFd) -> Result<u64, Error> {
    Ok(get_msrs(vcpu, &[msr::IA32_TSC])?
        .first()
        .copied()
        .unwrap_or(0))
}

const RFLAGS_AC: u64 = 1 << 18;

/// If the vCPU is at a `clac` at the very start of a page-fault entry caused by a broken
/// user-mode SYSCALL, completes the SYSCALL and returns true.
fn complete_broken_syscall(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
) -> Result<bool, Error> {
    if sregs.cs.selector & 3 != 0 {
        return Ok(false);
    }
    // Hardware exception frame: error code, RIP, CS, RFLAGS, RSP, SS.
    let mut raw = [0u8; 48];
    if read_virt(vcpu, mem, regs.rsp, &mut raw).is_err() {
        return Ok(false);
    }
    let f: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let (err, rip, cs, rflags, rsp) = (f[0], f[1], f[2], f[3], f[4]);
    // A user-mode (bit 2) instruction-fetch (bit 4) page fault whose address is the frame RIP.
    if cs & 3 != 3 || err & 0x14 != 0x14 || sregs.cr2 != rip {
        return Ok(false);
    }
    let m = get_msrs(
        vcpu,
        &[
            msr::STAR,
            msr::LSTAR,
            msr::CSTAR,
            msr::FS_BASE,
            msr::GS_BASE,
            msr::SYSCALL_MASK,
        ],
    )?;
    let (star, lstar, cstar, fs_base, gs_base, sfmask) = (m[0], m[1], m[2], m[3], m[4], m[5]);
    if rip != lstar && rip != cstar {
        return Ok(false);
    }
    // KVM_SET_SREGS rewrites every segment. On the emulating host the FS/GS bases reported by
    // KVM_GET_SREGS can lag behind the MSRs (a user process then lost its TLS pointer after a
    // completed SYSCALL), so take the bases from the MSRs.
    if sregs.fs.base != fs_base || sregs.gs.base != gs_base {
        log::debug!(
            "SYSCALL fix-up: sregs FS/GS base {:#x}/{:#x} differ from MSRs {fs_base:#x}/{gs_base:#x}",
            sregs.fs.base,
            sregs.gs.base
        );
    }
    sregs.fs.base = fs_base;
    sregs.gs.base = gs_base;
    let kcs = ((star >> 32) & 0xfffc) as u16;
    let seg = |selector, type_, l, db| kvm_segment {
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
    };
    sregs.cs = seg(kcs, 0xb, 1, 0);
    sregs.ss = seg(kcs.wrapping_add(8), 0x3, 0, 1);
    // SYSCALL clears the RFLAGS bits in SFMASK (IF, TF, DF, AC for Linux) and RF. Whether or not
    // the broken SYSCALL did, the completed one must: with IF still set, an interrupt injected
    // at the entry point (before the stack switch) would be pushed onto the user stack.
    if rflags & sfmask != 0 {
        log::debug!(
            "SYSCALL fix-up: RFLAGS {rflags:#x} had SFMASK bits {:#x} set",
            rflags & sfmask
        );
    }
    regs.rip = rip;
    regs.rsp = rsp;
    regs.rflags = (rflags & !sfmask & !(1 << 16)) | 2;
    vcpu.set_sregs(sregs)
        .map_err(|e| Error::Kvm("SET_SREGS", e))?;
    Ok(true)
}

/// Handles a `KVM_EXIT_INTERNAL_ERROR` / emulation failure. On success the vCPU state is fixed
/// and the guest can be resumed.
pub fn handle_emulation_failure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    stats: &FixupStats,
) -> Result<Fixup, Error> {
    let mut regs = vcpu.get_regs().map_err(|e| Error::Kvm("GET_REGS", e))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
    let long = sregs.cs.l == 1;
    let rip = if long {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip)
    };
    let bytes = fetch(vcpu, mem, rip);
    let unknown = || Error::Unknown {
        rip,
        cpl: (sregs.cs.selector & 3) as u8,
        bytes: hex(&bytes),
    };
    let p = decode::prefixes(&bytes);
    let op = &bytes[p.len.min(bytes.len())..];
    let (fix, len) = match op {
        [0xcc, ..] => {
            regs.rip = regs.rip.wrapping_add(1);
            vcpu.set_regs(&regs)
                .map_err(|e| Error::Kvm("SET_REGS", e))?;
            let mut ev = vcpu
                .get_vcpu_events()
                .map_err(|e| Error::Kvm("GET_VCPU_EVENTS", e))?;
            ev.exception.injected = 1;
            ev.exception.nr = 3;
            ev.exception.has_error_code = 0;
            vcpu.set_vcpu_events(&ev)
                .map_err(|e| Error::Kvm("SET_VCPU_EVENTS", e))?;
            stats.record(Fixup::Int3, rip, &bytes[..1]);
            return Ok(Fixup::Int3);
        }
        [0x0f, 0x01, 0xca, ..] => {
            if complete_broken_syscall(vcpu, mem, &mut regs, &mut sregs)? {
                vcpu.set_regs(&regs)
                    .map_err(|e| Error::Kvm("SET_REGS", e))?;
                stats.record(Fixup::Syscall, regs.rip, &bytes[..p.len + 3]);
                return Ok(Fixup::Syscall);
            }
            regs.rflags &= !RFLAGS_AC;
            (Fixup::Clac, p.len + 3)
        }
        [0x0f, 0x01, 0xcb, ..] => {
            regs.rflags |= RFLAGS_AC;
            (Fixup::Stac, p.len + 3)
        }
        [0x9b, ..] => (Fixup::Fwait, p.len + 1),
        [0x0f, 0xb8, rest @ ..] if p.rep && long => {
            let seg = seg_base(&p, &sregs);
            let (dst, src, n) =
                decode::modrm(rest, &p, &regs, seg, p.len + 2, 0).ok_or_else(unknown)?;
            let width = if p.w() {
                8
            } else if p.opsize {
                2
            } else {
                4
            };
            let v = match src {
                Operand::Reg(r) => decode::reg(&regs, r),
                Operand::Mem(a) => {
                    let mut b = [0u8; 8];
                    read_virt(vcpu, mem, a, &mut b[..width])?;
                    u64::from_le_bytes(b)
                }
            };
            let v = if width == 8 {
                v
            } else {
                v & ((1u64 << (width * 8)) - 1)
            };
            let count = u64::from(v.count_ones());
            let old = decode::reg(&regs, dst);
            let new = if width == 2 {
                (old & !0xffff) | count
            } else {
                count
            };
            decode::set_reg(&mut regs, dst, new);
            // OF, SF, ZF, AF, CF, PF cleared; ZF set when the source is zero.
            regs.rflags &= !0x8d5;
            if v == 0 {
                regs.rflags |= 0x40;
            }
            (Fixup::Popcnt, p.len + 2 + n)
        }
        [0x0f, 0x01, 0xd0, ..] => {
            let v = super::xsave::xgetbv(vcpu, regs.rcx as u32)?;
            regs.rax = v & 0xffff_ffff;
            regs.rdx = v >> 32;
            (Fixup::Xgetbv, p.len + 3)
        }
        [0x0f, 0xae, rest @ ..]
            if long
                && rest
                    .first()
                    .is_some_and(|m| m >> 6 != 3 && matches!((m >> 3) & 7, 4..=6)) =>
        {
            let seg = seg_base(&p, &sregs);
            let (r, opnd, n) =
                decode::modrm(rest, &p, &regs, seg, p.len + 2, 0).ok_or_else(unknown)?;
            let Operand::Mem(addr) = opnd else {
                return Err(unknown());
            };
            let restore = r & 7 == 5;
            let mask = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            match super::xsave::emulate(vcpu, mem, addr, mask, restore) {
                Ok(()) => {}
                Err(Error::GuestRead(va)) => {
                    inject_page_fault(vcpu, va, !restore)?;
                    stats.record(
                        Fixup::PageFault,
                        rip,
                        &bytes[..(p.len + 2 + n).min(bytes.len())],
                    );
                    return Ok(Fixup::PageFault);
                }
                Err(e) => return Err(e),
            }
            let fix = if restore { Fixup::Xrstor } else { Fixup::Xsave };
            (fix, p.len + 2 + n)
        }
        [0x0f, 0xae, rest @ ..]
            if long
                && rest
                    .first()
                    .is_some_and(|m| m >> 6 != 3 && matches!((m >> 3) & 7, 2 | 3)) =>
        {
            let seg = seg_base(&p, &sregs);
            let (r, opnd, n) =
                decode::modrm(rest, &p, &regs, seg, p.len + 2, 0).ok_or_else(unknown)?;
            let Operand::Mem(addr) = opnd else {
                return Err(unknown());
            };
            let mut fpu = vcpu.get_fpu().map_err(|e| Error::Kvm("GET_FPU", e))?;
            let fix = if r & 7 == 2 {
                let mut b = [0u8; 4];
                read_virt(vcpu, mem, addr, &mut b)?;
                fpu.mxcsr = u32::from_le_bytes(b);
                vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("SET_FPU", e))?;
                Fixup::Ldmxcsr
            } else {
                write_virt(vcpu, mem, addr, &fpu.mxcsr.to_le_bytes())?;
                Fixup::Stmxcsr
            };
            (fix, p.len + 2 + n)
        }
        _ => return Err(unknown()),
    };
    regs.rip = regs.rip.wrapping_add(len as u64);
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("SET_REGS", e))?;
    stats.record(fix, rip, &bytes[..len.min(bytes.len())]);
    Ok(fix)
}

/// Injects the page fault a supervisor access to `va` raises (CR2 = `va`).
fn inject_page_fault(vcpu: &VcpuFd, va: u64, write: bool) -> Result<(), Error> {
    let present = vcpu
        .translate_gva(va)
        .map(|t| t.valid != 0)
        .unwrap_or(false);
    let mut sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
    sregs.cr2 = va;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("SET_SREGS", e))?;
    let mut ev = vcpu
        .get_vcpu_events()
        .map_err(|e| Error::Kvm("GET_VCPU_EVENTS", e))?;
    ev.exception.injected = 1;
    ev.exception.nr = 14;
    ev.exception.has_error_code = 1;
    ev.exception.error_code = u32::from(present) | (u32::from(write) << 1);
    vcpu.set_vcpu_events(&ev)
        .map_err(|e| Error::Kvm("SET_VCPU_EVENTS", e))
}

fn seg_base(p: &decode::Prefixes, s: &kvm_sregs) -> u64 {
    match p.seg {
        Some(0x64) => s.fs.base,
        Some(0x65) => s.gs.base,
        _ => 0,
    }
}
