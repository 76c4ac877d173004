//! XSAVE / XSAVEOPT / XRSTOR (standard format) and XGETBV for guest kernel code that the host
//! cannot emulate (part of [`super::quirks`]).
//!
//! Why the guest must use them: user code runs natively and sees the host CPU's AVX / AVX-512
//! (CPUID and XGETBV are not virtualized for it). A guest kernel booted with `noxsave` saves
//! only the FXSAVE state (x87, XMM0-15) at a context switch, so the upper halves of YMM/ZMM,
//! ZMM16-31 and the mask registers of one process leak into another: glibc's AVX-512 `memcpy`
//! then copies garbage (measured with `ssi-check --vector`). With XSAVE enabled, the guest
//! kernel switches the whole state, and this module performs the instructions through
//! `KVM_GET_XSAVE` / `KVM_SET_XSAVE` (whose buffer has the standard, non-compacted layout).
//! The compacted forms (XSAVEC, XSAVES, XRSTORS) are turned off on the guest command line.

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::quirks::{read_virt, write_virt, Error};

const LEGACY: usize = 512;
const HEADER: usize = 64;
const AREA_MAX: usize = 4096;

/// (offset, size) of extended component `i` (≥ 2) in the standard XSAVE layout.
fn component(i: u32) -> (usize, usize) {
    let r = core::arch::x86_64::__cpuid_count(0xd, i);
    (r.ebx as usize, r.eax as usize)
}

fn xcr0(vcpu: &VcpuFd) -> Result<u64, Error> {
    xgetbv(vcpu, 0)
}

fn to_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> kvm_xsave {
    let mut x = kvm_xsave::default();
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    x
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Byte ranges of component `i` (x87 and SSE share the legacy region; MXCSR goes with either
/// SSE or AVX and is handled by the callers).
fn ranges(i: u32) -> Vec<(usize, usize)> {
    match i {
        0 => vec![(0, 24), (32, 160)],
        1 => vec![(160, 416)],
        _ => {
            let (off, size) = component(i);
            vec![(off, off + size)]
        }
    }
}

/// Size of the area the requested-feature bitmap touches.
fn area_len(rfbm: u64) -> usize {
    (2..64u32)
        .filter(|i| rfbm & (1 << i) != 0)
        .map(|i| {
            let (o, s) = component(i);
            o + s
        })
        .max()
        .unwrap_or(0)
        .max(LEGACY + HEADER)
}

/// Emulates XSAVE/XSAVEOPT (`restore == false`) or XRSTOR of the area at guest virtual `addr`
/// with the instruction mask EDX:EAX = `mask`.
pub fn emulate(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    addr: u64,
    mask: u64,
    restore: bool,
) -> Result<(), Error> {
    let rfbm = xcr0(vcpu)? & mask;
    let len = area_len(rfbm);
    if len > AREA_MAX {
        return Err(Error::Unsupported(format!("XSAVE area of {len} bytes")));
    }
    let cur = to_bytes(&vcpu.get_xsave().map_err(|e| Error::Kvm("GET_XSAVE", e))?);
    let mut area = vec![0u8; len];
    read_virt(vcpu, mem, addr, &mut area)?;
    let cur_bv = u64_at(&cur, LEGACY);
    let mem_bv = u64_at(&area, LEGACY);
    if restore {
        if u64_at(&area, LEGACY + 8) & (1 << 63) != 0 {
            return Err(Error::Unsupported("XRSTOR of a compacted area".into()));
        }
        let mut new = cur.clone();
        for i in (0..64u32).filter(|i| rfbm & mem_bv & (1 << i) != 0) {
            for (a, b) in ranges(i) {
                new[a..b].copy_from_slice(&area[a..b]);
            }
        }
        if rfbm & 6 != 0 {
            new[24..28].copy_from_slice(&area[24..28]);
        }
        let bv = (cur_bv & !rfbm) | (mem_bv & rfbm);
        new[LEGACY..LEGACY + 8].copy_from_slice(&bv.to_le_bytes());
        new[LEGACY + 8..LEGACY + 16].fill(0);
        let x = from_bytes(&new);
        // SAFETY: no XSTATE feature is enabled dynamically (no arch_prctl(ARCH_REQ_XCOMP_*)),
        // so KVM reads exactly the 4096-byte `kvm_xsave` we pass.
        unsafe { vcpu.set_xsave(&x) }.map_err(|e| Error::Kvm("SET_XSAVE", e))?;
    } else {
        for i in (0..64u32).filter(|i| rfbm & (1 << i) != 0) {
            for (a, b) in ranges(i) {
                area[a..b].copy_from_slice(&cur[a..b]);
            }
        }
        if rfbm & 6 != 0 {
            area[24..32].copy_from_slice(&cur[24..32]);
        }
        let bv = (mem_bv & !rfbm) | (cur_bv & rfbm);
        area[LEGACY..LEGACY + 8].copy_from_slice(&bv.to_le_bytes());
        write_virt(vcpu, mem, addr, &area)?;
    }
    Ok(())
}

/// XGETBV: the value of XCR `index`.
pub fn xgetbv(vcpu: &VcpuFd, index: u32) -> Result<u64, Error> {
    let x = vcpu.get_xcrs().map_err(|e| Error::Kvm("GET_XCRS", e))?;
    let n = (x.nr_xcrs as usize).min(x.xcrs.len());
    x.xcrs[..n]
        .iter()
        .find(|c| c.xcr == index)
        .map(|c| c.value)
        .ok_or_else(|| Error::Unsupported(format!("XGETBV of XCR{index}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_sane() {
        // AVX (component 2) sits right after the header in the standard layout.
        let (off, size) = component(2);
        if size > 0 {
            assert_eq!(off, LEGACY + HEADER);
            assert_eq!(size, 256);
        }
        assert_eq!(area_len(3), LEGACY + HEADER);
        let x = from_bytes(&[7u8; 4096]);
        assert_eq!(to_bytes(&x), vec![7u8; 4096]);
    }
}
