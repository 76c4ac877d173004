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
//!
//! Structure: [`handle_emulation_failure`] fetches the bytes at RIP, `insn::decode` (pure)
//! says which instruction they are with its operands and length, and `execute` performs it with
//! the ioctls; the arithmetic (`insn::popcnt`, `insn::with_ac`) and the broken-SYSCALL check and
//! transition (`syscall::complete`) are pure functions, unit-tested without `/dev/kvm`.

mod insn;
mod syscall;

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use self::insn::{Decoded, Insn};
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

/// Handles a `KVM_EXIT_INTERNAL_ERROR` / emulation failure. On success the vCPU state is fixed
/// and the guest can be resumed.
pub fn handle_emulation_failure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    stats: &FixupStats,
) -> Result<Fixup, Error> {
    let regs = vcpu.get_regs().map_err(|e| Error::Kvm("GET_REGS", e))?;
    let sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
    let long = sregs.cs.l == 1;
    let rip = if long {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip)
    };
    let bytes = fetch(vcpu, mem, rip);
    let Some(d) = insn::decode(&bytes, long, &regs, &sregs) else {
        return Err(Error::Unknown {
            rip,
            cpl: (sregs.cs.selector & 3) as u8,
            bytes: hex(&bytes),
        });
    };
    let (fix, at) = execute(vcpu, mem, d, rip, regs, sregs)?;
    stats.record(fix, at, &bytes[..d.len.min(bytes.len())]);
    Ok(fix)
}

/// Performs decoded instruction `d` (at linear `rip`) on the vCPU whose registers were `regs`
/// and `sregs`. Returns the fix-up and the RIP to log it at (the completed SYSCALL's for
/// [`Fixup::Syscall`], else `rip`).
fn execute(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    d: Decoded,
    rip: u64,
    mut regs: kvm_regs,
    mut sregs: kvm_sregs,
) -> Result<(Fixup, u64), Error> {
    let set_regs = |regs: &kvm_regs| vcpu.set_regs(regs).map_err(|e| Error::Kvm("SET_REGS", e));
    let fix = match d.insn {
        Insn::Int3 => {
            regs.rip = regs.rip.wrapping_add(d.len as u64);
            set_regs(&regs)?;
            let mut ev = vcpu
                .get_vcpu_events()
                .map_err(|e| Error::Kvm("GET_VCPU_EVENTS", e))?;
            ev.exception.injected = 1;
            ev.exception.nr = 3;
            ev.exception.has_error_code = 0;
            vcpu.set_vcpu_events(&ev)
                .map_err(|e| Error::Kvm("SET_VCPU_EVENTS", e))?;
            return Ok((Fixup::Int3, rip));
        }
        Insn::Clac => {
            if syscall::complete_broken_syscall(vcpu, mem, &mut regs, &mut sregs)? {
                set_regs(&regs)?;
                return Ok((Fixup::Syscall, regs.rip));
            }
            regs.rflags = insn::with_ac(regs.rflags, false);
            Fixup::Clac
        }
        Insn::Stac => {
            regs.rflags = insn::with_ac(regs.rflags, true);
            Fixup::Stac
        }
        Insn::Fwait => Fixup::Fwait,
        Insn::Popcnt { dst, src, width } => {
            let v = match src {
                Operand::Reg(r) => decode::reg(&regs, r),
                Operand::Mem(a) => {
                    let mut b = [0u8; 8];
                    read_virt(vcpu, mem, a, &mut b[..width.min(8)])?;
                    u64::from_le_bytes(b)
                }
            };
            let (new, rflags) = insn::popcnt(v, width, decode::reg(&regs, dst), regs.rflags);
            decode::set_reg(&mut regs, dst, new);
            regs.rflags = rflags;
            Fixup::Popcnt
        }
        Insn::Xgetbv => {
            let v = super::xsave::xgetbv(vcpu, regs.rcx as u32)?;
            regs.rax = v & 0xffff_ffff;
            regs.rdx = v >> 32;
            Fixup::Xgetbv
        }
        Insn::Xsave { restore, addr } => {
            let mask = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
            match super::xsave::emulate(vcpu, mem, addr, mask, restore) {
                Ok(()) => {}
                Err(Error::GuestRead(va)) => {
                    inject_page_fault(vcpu, va, !restore)?;
                    return Ok((Fixup::PageFault, rip));
                }
                Err(e) => return Err(e),
            }
            if restore {
                Fixup::Xrstor
            } else {
                Fixup::Xsave
            }
        }
        Insn::Mxcsr { load, addr } => {
            let mut fpu = vcpu.get_fpu().map_err(|e| Error::Kvm("GET_FPU", e))?;
            if load {
                let mut b = [0u8; 4];
                read_virt(vcpu, mem, addr, &mut b)?;
                fpu.mxcsr = u32::from_le_bytes(b);
                vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("SET_FPU", e))?;
                Fixup::Ldmxcsr
            } else {
                write_virt(vcpu, mem, addr, &fpu.mxcsr.to_le_bytes())?;
                Fixup::Stmxcsr
            }
        }
    };
    regs.rip = regs.rip.wrapping_add(d.len as u64);
    set_regs(&regs)?;
    Ok((fix, rip))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_by_kind() {
        let s = FixupStats::default();
        s.record(Fixup::Clac, 0x1000, &[0x0f, 0x01, 0xca]);
        s.record(Fixup::Clac, 0x1000, &[0x0f, 0x01, 0xca]);
        s.record(Fixup::Xrstor, 0x2000, &[0x0f, 0xae, 0x2f]);
        let c = s.counts();
        assert_eq!(c.get("clac (0f 01 ca)"), Some(&2));
        assert_eq!(c.get("xrstor (0f ae /5)"), Some(&1));
        assert_eq!(c.len(), 2);
        assert_eq!(hex(&[0x0f, 0xae, 0x2f]), "0f ae 2f");
        assert_eq!(hex(&[]), "");
    }
}
