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
//!
//! The merges are pure functions over byte buffers (`save_merge`, `restore_merge`) with the
//! component layout passed in (`Layout`, the host's from CPUID leaf 0xd), unit-tested against a
//! model; [`emulate`] does the ioctls and guest memory accesses around them.
//!
//! Fault injection (feature `failpoints`): `xsave-restore-drop-hi16-zmm` leaves component 7
//! (ZMM16-31) out of every XRSTOR, so a process sees another's zmm16-31.

use std::ops::Range;
use std::sync::OnceLock;

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::quirks::{read_virt, write_virt, Error};

/// Legacy region (FXSAVE image) at the start of the area.
const LEGACY: usize = 512;
/// XSAVE header after the legacy region.
const HEADER: usize = 64;
/// XSTATE_BV: which components the area holds (the others are in their initial state).
const XSTATE_BV: usize = LEGACY;
/// XCOMP_BV: bit 63 set marks the compacted format.
const XCOMP_BV: usize = LEGACY + 8;
/// Size of `kvm_xsave` (the largest area emulated).
const AREA_MAX: usize = 4096;
/// MXCSR in the legacy region (loaded and saved with SSE or AVX).
const MXCSR: Range<usize> = 24..28;
/// MXCSR and MXCSR_MASK (XSAVE stores both, XRSTOR loads only MXCSR).
const MXCSR_AND_MASK: Range<usize> = 24..32;
/// Component bits of SSE and AVX: either one makes MXCSR part of the operation.
const SSE_OR_AVX: u64 = (1 << 1) | (1 << 2);
/// Component 7: ZMM16-31 (Hi16_ZMM).
const HI16_ZMM: u32 = 7;

/// Offset and size of each extended component (≥ 2) in the standard (non-compacted) XSAVE
/// layout; components 0 (x87) and 1 (SSE) live in the legacy region at fixed places.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    comp: [(usize, usize); 64],
}

impl Layout {
    /// The host CPU's layout (CPUID leaf 0xd, the layout of the `KVM_GET_XSAVE` buffer), read
    /// once.
    fn host() -> &'static Layout {
        static HOST: OnceLock<Layout> = OnceLock::new();
        HOST.get_or_init(|| {
            Layout::from_fn(|i| {
                let r = core::arch::x86_64::__cpuid_count(0xd, i);
                (r.ebx as usize, r.eax as usize)
            })
        })
    }

    /// A layout with `f(i)` = (offset, size) of component `i` for `i` in 2..64.
    fn from_fn(f: impl Fn(u32) -> (usize, usize)) -> Layout {
        let mut comp = [(0, 0); 64];
        for i in 2..64u32 {
            comp[i as usize] = f(i);
        }
        Layout { comp }
    }

    /// (offset, size) of extended component `i` (0..64; (0, 0) for 0 and 1).
    fn component(&self, i: u32) -> (usize, usize) {
        self.comp.get(i as usize).copied().unwrap_or((0, 0))
    }

    /// Byte ranges of component `i` (x87 and SSE share the legacy region; MXCSR goes with
    /// either SSE or AVX and is handled by the merges).
    fn ranges(&self, i: u32) -> [Range<usize>; 2] {
        match i {
            0 => [0..24, 32..160],
            1 => [160..416, 0..0],
            _ => {
                let (off, size) = self.component(i);
                [off..off.saturating_add(size), 0..0]
            }
        }
    }

    /// Size of the area the requested-feature bitmap touches.
    fn area_len(&self, rfbm: u64) -> usize {
        (2..64u32)
            .filter(|i| rfbm & (1 << i) != 0)
            .map(|i| {
                let (o, s) = self.component(i);
                o.saturating_add(s)
            })
            .max()
            .unwrap_or(0)
            .max(LEGACY + HEADER)
    }

    /// [`Self::area_len`], refused beyond the 4096 bytes of `kvm_xsave`.
    fn checked_area_len(&self, rfbm: u64) -> Result<usize, Error> {
        let len = self.area_len(rfbm);
        if len > AREA_MAX {
            return Err(Error::Unsupported(format!("XSAVE area of {len} bytes")));
        }
        Ok(len)
    }
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

/// (XSTATE_BV, XCOMP_BV) of an XSAVE image.
fn header(b: &[u8]) -> Result<(u64, u64), Error> {
    let word = |off: usize| {
        b.get(off..off + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| Error::Unsupported(format!("XSAVE image of {} bytes", b.len())))
    };
    Ok((word(XSTATE_BV)?, word(XCOMP_BV)?))
}

/// Copies bytes `r` of `src` to `dst`.
fn copy(dst: &mut [u8], src: &[u8], r: Range<usize>) -> Result<(), Error> {
    match (dst.get_mut(r.clone()), src.get(r.clone())) {
        (Some(d), Some(s)) => {
            d.copy_from_slice(s);
            Ok(())
        }
        _ => Err(Error::Unsupported(format!(
            "XSAVE component at bytes {}..{} beyond the buffer",
            r.start, r.end
        ))),
    }
}

/// XRSTOR in standard format: the vCPU's new XSAVE image from its current one (`cur`) and the
/// guest's area. Each component in `rfbm` whose XSTATE_BV bit is set in the area is loaded from
/// it; one whose bit is clear keeps its bytes but gets its XSTATE_BV bit cleared, which makes
/// KVM put it in its initial state; components outside `rfbm` are untouched. MXCSR is loaded
/// if SSE or AVX is in `rfbm`. XCOMP_BV is zeroed; a compacted area is refused.
fn restore_merge(cur: &[u8], area: &[u8], rfbm: u64, layout: &Layout) -> Result<Vec<u8>, Error> {
    let (cur_bv, _) = header(cur)?;
    let (mem_bv, mem_comp) = header(area)?;
    if mem_comp & (1 << 63) != 0 {
        return Err(Error::Unsupported("XRSTOR of a compacted area".into()));
    }
    let mut new = cur.to_vec();
    for i in (0..64u32).filter(|i| rfbm & mem_bv & (1 << i) != 0) {
        for r in layout.ranges(i) {
            copy(&mut new, area, r)?;
        }
    }
    if rfbm & SSE_OR_AVX != 0 {
        copy(&mut new, area, MXCSR)?;
    }
    let bv = (cur_bv & !rfbm) | (mem_bv & rfbm);
    new[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    new[XCOMP_BV..XCOMP_BV + 8].fill(0);
    Ok(new)
}

/// XSAVE / XSAVEOPT in standard format: stores each component in `rfbm` from the vCPU's XSAVE
/// image `cur` into the guest's `area`, with MXCSR and MXCSR_MASK if SSE or AVX is in `rfbm`,
/// and sets the area's XSTATE_BV bits in `rfbm` from `cur`; everything else in the area is
/// untouched.
fn save_merge(cur: &[u8], area: &mut [u8], rfbm: u64, layout: &Layout) -> Result<(), Error> {
    let (cur_bv, _) = header(cur)?;
    let (mem_bv, _) = header(area)?;
    for i in (0..64u32).filter(|i| rfbm & (1 << i) != 0) {
        for r in layout.ranges(i) {
            copy(area, cur, r)?;
        }
    }
    if rfbm & SSE_OR_AVX != 0 {
        copy(area, cur, MXCSR_AND_MASK)?;
    }
    let bv = (mem_bv & !rfbm) | (cur_bv & rfbm);
    area[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    Ok(())
}

/// The components XRSTOR loads: `rfbm`, without ZMM16-31 while the fail point
/// `xsave-restore-drop-hi16-zmm` is on.
fn restore_mask(rfbm: u64) -> u64 {
    if drop_hi16_zmm() {
        rfbm & !(1 << HI16_ZMM)
    } else {
        rfbm
    }
}

fn drop_hi16_zmm() -> bool {
    fail::fail_point!("xsave-restore-drop-hi16-zmm", |_| true);
    false
}

fn xcr0(vcpu: &VcpuFd) -> Result<u64, Error> {
    xgetbv(vcpu, 0)
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
    let layout = Layout::host();
    let rfbm = xcr0(vcpu)? & mask;
    let len = layout.checked_area_len(rfbm)?;
    let cur = to_bytes(&vcpu.get_xsave().map_err(|e| Error::Kvm("GET_XSAVE", e))?);
    let mut area = vec![0u8; len];
    read_virt(vcpu, mem, addr, &mut area)?;
    if restore {
        let new = restore_merge(&cur, &area, restore_mask(rfbm), layout)?;
        let x = from_bytes(&new);
        // SAFETY: no XSTATE feature is enabled dynamically (no arch_prctl(ARCH_REQ_XCOMP_*)),
        // so KVM reads exactly the 4096-byte `kvm_xsave` we pass.
        unsafe { vcpu.set_xsave(&x) }.map_err(|e| Error::Kvm("SET_XSAVE", e))?;
    } else {
        save_merge(&cur, &mut area, rfbm, layout)?;
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

    /// The standard layout of components 2..=7 and 9 (AVX, MPX BNDREGS, MPX BNDCSR, opmask,
    /// ZMM_Hi256, Hi16_ZMM, PKRU).
    const STANDARD: &[(u32, usize, usize)] = &[
        (2, 576, 256),
        (3, 960, 64),
        (4, 1024, 64),
        (5, 1088, 64),
        (6, 1152, 512),
        (7, 1664, 1024),
        (9, 2688, 8),
    ];

    /// Made-up offsets, out of component order and with gaps, for code that would assume
    /// the standard order.
    const SHUFFLED: &[(u32, usize, usize)] = &[
        (7, 600, 1024),
        (2, 1700, 256),
        (5, 1960, 64),
        (6, 2048, 512),
        (9, 2600, 8),
        (3, 3000, 64),
        (4, 3100, 64),
    ];

    fn layout_of(spec: &[(u32, usize, usize)]) -> Layout {
        Layout::from_fn(|i| {
            spec.iter()
                .find(|c| c.0 == i)
                .map(|c| (c.1, c.2))
                .unwrap_or((0, 0))
        })
    }

    /// Components 0 and 1 and those of `spec`.
    fn supported(spec: &[(u32, usize, usize)]) -> u64 {
        spec.iter().fold(3, |m, c| m | (1 << c.0))
    }

    /// The host's user components that fit in `kvm_xsave`, read from CPUID independently of
    /// `Layout`.
    fn host_spec() -> Vec<(u32, usize, usize)> {
        let l0 = core::arch::x86_64::__cpuid_count(0xd, 0);
        let xcr0_bits = u64::from(l0.eax) | (u64::from(l0.edx) << 32);
        (2..64u32)
            .filter(|i| xcr0_bits & (1 << i) != 0)
            .map(|i| {
                let r = core::arch::x86_64::__cpuid_count(0xd, i);
                (i, r.ebx as usize, r.eax as usize)
            })
            .filter(|c| c.2 > 0 && c.1 + c.2 <= AREA_MAX)
            .collect()
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// 0..n
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn set_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn get_u64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    // ---- An independent model of XSAVE / XRSTOR (standard form), byte by byte. ----

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Owner {
        Component(u32),
        Mxcsr,
        MxcsrMask,
        XstateBv(usize),
        XcompBv,
        Nobody,
    }

    /// What byte `b` of a standard-format image belongs to.
    fn owner(spec: &[(u32, usize, usize)], b: usize) -> Owner {
        match b {
            0..=23 | 32..=159 => Owner::Component(0),
            24..=27 => Owner::Mxcsr,
            28..=31 => Owner::MxcsrMask,
            160..=415 => Owner::Component(1),
            512..=519 => Owner::XstateBv(b - 512),
            520..=527 => Owner::XcompBv,
            _ => spec
                .iter()
                .find(|c| c.1 <= b && b < c.1 + c.2)
                .map_or(Owner::Nobody, |c| Owner::Component(c.0)),
        }
    }

    fn bit(v: u64, i: u32) -> bool {
        (v >> i) & 1 == 1
    }

    /// XSTATE_BV after the operation: bit `i` from `inside` if `i` is requested, else from
    /// `outside`.
    fn model_bv(rfbm: u64, inside: u64, outside: u64) -> u64 {
        (0..64u32)
            .filter(|&i| {
                if bit(rfbm, i) {
                    bit(inside, i)
                } else {
                    bit(outside, i)
                }
            })
            .fold(0, |v, i| v | (1 << i))
    }

    fn model_restore(spec: &[(u32, usize, usize)], cur: &[u8], area: &[u8], rfbm: u64) -> Vec<u8> {
        let mem_bv = get_u64(area, 512);
        let bv = model_bv(rfbm, mem_bv, get_u64(cur, 512)).to_le_bytes();
        let mxcsr = bit(rfbm, 1) || bit(rfbm, 2);
        (0..cur.len())
            .map(|b| match owner(spec, b) {
                Owner::Component(i) if bit(rfbm, i) && bit(mem_bv, i) => area[b],
                Owner::Mxcsr if mxcsr => area[b],
                Owner::XstateBv(k) => bv[k],
                Owner::XcompBv => 0,
                _ => cur[b],
            })
            .collect()
    }

    fn model_save(spec: &[(u32, usize, usize)], cur: &[u8], area: &[u8], rfbm: u64) -> Vec<u8> {
        let bv = model_bv(rfbm, get_u64(cur, 512), get_u64(area, 512)).to_le_bytes();
        let mxcsr = bit(rfbm, 1) || bit(rfbm, 2);
        (0..area.len())
            .map(|b| match owner(spec, b) {
                Owner::Component(i) if bit(rfbm, i) => cur[b],
                Owner::Mxcsr | Owner::MxcsrMask if mxcsr => cur[b],
                Owner::XstateBv(k) => bv[k],
                _ => area[b],
            })
            .collect()
    }

    /// Random vCPU image, area and RFBM (within `supported`, plus bits of components the
    /// layout does not have); runs both merges against the model.
    fn check_against_model(spec: &[(u32, usize, usize)], seed: u64, rounds: usize) {
        let layout = layout_of(spec);
        let sup = supported(spec);
        let mut rng = XorShift(seed);
        for round in 0..rounds {
            // Mostly "everything", sometimes a random subset, sometimes a random subset plus
            // bits of absent components.
            let rfbm = match rng.below(4) {
                0 => sup,
                1 => rng.next() & sup,
                2 => rng.next() & (sup | (1 << 8) | (1 << 16) | (1 << 40)),
                _ => rng.next() & sup & !3,
            };
            let len = layout.checked_area_len(rfbm).unwrap();
            let mut cur = rng.bytes(AREA_MAX);
            let mut area = rng.bytes(len);
            // XSTATE_BV: all set, or random.
            if rng.below(3) == 0 {
                set_u64(&mut area, XSTATE_BV, u64::MAX);
            }
            if rng.below(3) == 0 {
                set_u64(&mut cur, XSTATE_BV, u64::MAX);
            }
            let comp = rng.next() & !(1 << 63);
            set_u64(
                &mut area,
                XCOMP_BV,
                if rng.below(2) == 0 { 0 } else { comp },
            );
            let ctx = format!("seed {seed} round {round} rfbm {rfbm:#x}");

            let got = restore_merge(&cur, &area, rfbm, &layout).unwrap();
            assert_eq!(got.len(), cur.len(), "{ctx}");
            let want = model_restore(spec, &cur, &area, rfbm);
            if let Some(b) = (0..got.len()).find(|&b| got[b] != want[b]) {
                panic!("restore: {ctx}: byte {b} ({:?}) differs", owner(spec, b));
            }

            let mut saved = area.clone();
            save_merge(&cur, &mut saved, rfbm, &layout).unwrap();
            let want = model_save(spec, &cur, &area, rfbm);
            if let Some(b) = (0..saved.len()).find(|&b| saved[b] != want[b]) {
                panic!("save: {ctx}: byte {b} ({:?}) differs", owner(spec, b));
            }
        }
    }

    #[test]
    fn model_standard_layout() {
        for seed in [1, 0x9e37_79b9_7f4a_7c15, 0xdead_beef] {
            check_against_model(STANDARD, seed, 200);
        }
    }

    #[test]
    fn model_shuffled_layout() {
        for seed in [7, 0x1234_5678_9abc_def1] {
            check_against_model(SHUFFLED, seed, 200);
        }
    }

    #[test]
    fn model_host_layout() {
        let spec = &host_spec()[..];
        // The merges on the host layout must agree with the model built from raw CPUID.
        for &(i, off, size) in spec {
            assert_eq!(Layout::host().component(i), (off, size), "component {i}");
        }
        for seed in [3, 0x5555_aaaa_0f0f_f0f0] {
            check_against_model(spec, seed, 200);
        }
    }

    /// XSAVE from one image into an area, then XRSTOR of that area into another image.
    fn round_trip(spec: &[(u32, usize, usize)], layout: &Layout, seed: u64) {
        let sup = supported(spec);
        let mut rng = XorShift(seed);
        for _ in 0..50 {
            let rfbm = if rng.below(2) == 0 {
                sup
            } else {
                rng.next() & sup
            };
            let len = layout.checked_area_len(rfbm).unwrap();
            let mut a = rng.bytes(AREA_MAX);
            let a_bv = if rng.below(2) == 0 {
                u64::MAX
            } else {
                rng.next()
            };
            set_u64(&mut a, XSTATE_BV, a_bv);
            let mut area = rng.bytes(len);
            set_u64(&mut area, XCOMP_BV, 0);
            save_merge(&a, &mut area, rfbm, layout).unwrap();
            let b = rng.bytes(AREA_MAX);
            let got = restore_merge(&b, &area, rfbm, layout).unwrap();

            let got_bv = get_u64(&got, XSTATE_BV);
            assert_eq!(
                got_bv,
                (get_u64(&b, XSTATE_BV) & !rfbm) | (a_bv & rfbm),
                "rfbm {rfbm:#x}"
            );
            for i in (0..64u32).filter(|&i| bit(rfbm, i)) {
                for r in layout.ranges(i) {
                    // Restored byte-exactly where the state was in use, otherwise left for
                    // KVM to initialize (bit clear).
                    let from = if bit(a_bv, i) { &a } else { &b };
                    assert_eq!(got[r.clone()], from[r.clone()], "component {i} {r:?}");
                }
            }
            for i in (0..64u32).filter(|&i| bit(sup & !rfbm, i)) {
                for r in layout.ranges(i) {
                    assert_eq!(got[r.clone()], b[r.clone()], "component {i} {r:?}");
                }
            }
            let mx = if rfbm & SSE_OR_AVX != 0 { &a } else { &b };
            assert_eq!(got[MXCSR], mx[MXCSR]);
            assert_eq!(got[28..32], b[28..32], "MXCSR_MASK is not loaded");
        }
    }

    #[test]
    fn round_trip_standard_shuffled_and_host_layouts() {
        round_trip(STANDARD, &layout_of(STANDARD), 11);
        round_trip(SHUFFLED, &layout_of(SHUFFLED), 12);
        round_trip(&host_spec(), Layout::host(), 13);
    }

    /// Images whose every component byte is `fill + component number`.
    fn painted(spec: &[(u32, usize, usize)], len: usize, fill: u8, bv: u64) -> Vec<u8> {
        let mut b: Vec<u8> = (0..len)
            .map(|x| match owner(spec, x) {
                Owner::Component(i) => fill.wrapping_add(i as u8),
                Owner::Mxcsr => fill.wrapping_add(0x40),
                Owner::MxcsrMask => fill.wrapping_add(0x50),
                _ => fill.wrapping_add(0x60),
            })
            .collect();
        set_u64(&mut b, XSTATE_BV, bv);
        set_u64(&mut b, XCOMP_BV, 0);
        b
    }

    #[test]
    fn restore_loads_requested_components_in_use() {
        let l = layout_of(STANDARD);
        let cur = painted(STANDARD, AREA_MAX, 0x00, 0x2ff);
        let area = painted(STANDARD, 2696, 0x80, 0x2ff & !(1 << 6));
        // Requested: x87, AVX, ZMM_Hi256 (clear in the area's XSTATE_BV), Hi16_ZMM.
        let rfbm = 1 | (1 << 2) | (1 << 6) | (1 << 7);
        let new = restore_merge(&cur, &area, rfbm, &l).unwrap();
        assert!(new[0..24].iter().all(|&x| x == 0x80));
        assert!(new[32..160].iter().all(|&x| x == 0x80));
        assert!(
            new[160..416].iter().all(|&x| x == 0x01),
            "SSE not requested"
        );
        assert_eq!(new[24..28], [0xc0; 4], "MXCSR goes with AVX");
        assert_eq!(new[28..32], [0x50; 4], "MXCSR_MASK is never loaded");
        assert!(new[416..512].iter().all(|&x| x == 0x60));
        assert!(new[576..832].iter().all(|&x| x == 0x82));
        assert!(new[960..1152].iter().all(|&x| x == 3 || x == 4 || x == 5));
        assert!(
            new[1152..1664].iter().all(|&x| x == 0x06),
            "bit clear in the area: left for KVM to initialize"
        );
        assert!(new[1664..2688].iter().all(|&x| x == 0x87));
        assert_eq!(new[2688..2696], [0x09; 8]);
        assert!(new[2696..].iter().all(|&x| x == 0x60));
        let bv = get_u64(&new, XSTATE_BV);
        assert_eq!(bv, 0x2ff & !(1 << 6));
        assert_eq!(new[528..576], cur[528..576], "rest of the header kept");
    }

    #[test]
    fn save_stores_requested_components() {
        let l = layout_of(STANDARD);
        let cur = painted(STANDARD, AREA_MAX, 0x00, 0x0f);
        let mut area = painted(STANDARD, 2696, 0x80, 0xf0);
        // Requested: SSE, AVX (in use), opmask (not in use: stored anyway, bit cleared).
        let rfbm = (1 << 1) | (1 << 2) | (1 << 5);
        save_merge(&cur, &mut area, rfbm, &l).unwrap();
        assert!(area[0..24].iter().all(|&x| x == 0x80), "x87 not requested");
        assert_eq!(
            area[24..32],
            [0x40, 0x40, 0x40, 0x40, 0x50, 0x50, 0x50, 0x50]
        );
        assert!(area[160..416].iter().all(|&x| x == 0x01));
        assert!(area[576..832].iter().all(|&x| x == 0x02));
        assert!(area[1088..1152].iter().all(|&x| x == 0x05));
        assert!(area[1152..2688].iter().all(|&x| x == 0x86 || x == 0x87));
        assert_eq!(get_u64(&area, XSTATE_BV), (0xf0 & !rfbm) | (0x0f & rfbm));
        assert_eq!(area.len(), 2696);
    }

    #[test]
    fn xstate_bv_merge_rules() {
        let l = layout_of(STANDARD);
        for (cur_bv, mem_bv, rfbm) in [
            (0u64, u64::MAX, 0xe7u64),
            (u64::MAX, 0, 0xe7),
            (0x2e7, 0x0a5, 0x0ff),
            (0x003, 0x2ff, 0x207),
            (0x0ff, 0x000, 0x000),
        ] {
            let mut cur = vec![0u8; AREA_MAX];
            set_u64(&mut cur, XSTATE_BV, cur_bv);
            let mut area = vec![0u8; l.area_len(rfbm)];
            set_u64(&mut area, XSTATE_BV, mem_bv);
            let new = restore_merge(&cur, &area, rfbm, &l).unwrap();
            assert_eq!(get_u64(&new, XSTATE_BV), (cur_bv & !rfbm) | (mem_bv & rfbm));
            save_merge(&cur, &mut area, rfbm, &l).unwrap();
            assert_eq!(
                get_u64(&area, XSTATE_BV),
                (mem_bv & !rfbm) | (cur_bv & rfbm)
            );
        }
    }

    #[test]
    fn mxcsr_with_sse_or_avx_only() {
        let l = layout_of(STANDARD);
        let cur = painted(STANDARD, AREA_MAX, 0x00, u64::MAX);
        let area = painted(STANDARD, 2696, 0x80, u64::MAX);
        for rfbm in [0u64, 1, 2, 4, 6, 1 | 0xe0, 0xe0] {
            let loaded = rfbm & 6 != 0;
            let new = restore_merge(&cur, &area, rfbm, &l).unwrap();
            assert_eq!(
                new[24..28],
                [if loaded { 0xc0 } else { 0x40 }; 4],
                "{rfbm:#x}"
            );
            assert_eq!(new[28..32], [0x50; 4], "{rfbm:#x}");
            let mut saved = area.clone();
            save_merge(&cur, &mut saved, rfbm, &l).unwrap();
            let (m, k) = if loaded { (0x40, 0x50) } else { (0xc0, 0xd0) };
            assert_eq!(saved[24..28], [m; 4], "{rfbm:#x}");
            assert_eq!(saved[28..32], [k; 4], "{rfbm:#x}");
        }
    }

    #[test]
    fn legacy_region_ranges() {
        let l = layout_of(STANDARD);
        assert_eq!(l.ranges(0), [0..24, 32..160]);
        assert_eq!(l.ranges(1), [160..416, 0..0]);
        assert_eq!(l.ranges(7), [1664..2688, 0..0]);
        assert_eq!(l.ranges(8), [0..0, 0..0]);
        // x87 alone touches 0..24 and 32..160; SSE alone 160..416 (+ MXCSR); never 416..512.
        let cur = vec![0x11u8; AREA_MAX];
        let mut area = vec![0x22u8; 576];
        set_u64(&mut area, XSTATE_BV, 3);
        set_u64(&mut area, XCOMP_BV, 0);
        let new = restore_merge(&cur, &area, 1, &l).unwrap();
        let changed: Vec<usize> = (0..512).filter(|&b| new[b] == 0x22).collect();
        assert_eq!(changed, (0..24).chain(32..160).collect::<Vec<_>>());
        let new = restore_merge(&cur, &area, 2, &l).unwrap();
        let changed: Vec<usize> = (0..512).filter(|&b| new[b] == 0x22).collect();
        assert_eq!(changed, (24..28).chain(160..416).collect::<Vec<_>>());
    }

    #[test]
    fn restore_zeroes_xcomp_bv() {
        let l = layout_of(STANDARD);
        let mut cur = vec![0u8; AREA_MAX];
        set_u64(&mut cur, XCOMP_BV, 0x8000_0000_0000_00ff);
        let mut area = vec![0u8; 576];
        set_u64(&mut area, XCOMP_BV, 0x0ff);
        let new = restore_merge(&cur, &area, 3, &l).unwrap();
        assert_eq!(get_u64(&new, XCOMP_BV), 0);
    }

    #[test]
    fn compacted_area_refused() {
        let l = layout_of(STANDARD);
        let cur = vec![0u8; AREA_MAX];
        let mut area = vec![0u8; 576];
        set_u64(&mut area, XCOMP_BV, (1 << 63) | 3);
        let e = restore_merge(&cur, &area, 3, &l).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("compacted")),
            "{e}"
        );
    }

    #[test]
    fn area_len_and_limit() {
        let l = layout_of(STANDARD);
        assert_eq!(l.area_len(0), 576);
        assert_eq!(l.area_len(3), 576, "legacy region and header");
        assert_eq!(l.area_len(1 << 2), 832);
        assert_eq!(l.area_len(0xe7), 2688);
        assert_eq!(l.area_len(0x2e7), 2696);
        assert_eq!(l.area_len(1 << 8), 576, "absent component");
        let s = layout_of(SHUFFLED);
        assert_eq!(
            s.area_len(1 << 7),
            1624,
            "not the highest-numbered component"
        );
        let big = Layout::from_fn(|i| if i == 17 { (2752, 64) } else { (4000, 200) });
        assert!(big.checked_area_len(1 << 17).is_ok());
        let e = big.checked_area_len(1 << 18).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("4200")),
            "{e}"
        );
        let edge = Layout::from_fn(|_| (4000, 96));
        assert_eq!(edge.checked_area_len(1 << 2).unwrap(), AREA_MAX);
    }

    #[test]
    fn short_buffers_are_errors_not_panics() {
        let l = layout_of(STANDARD);
        let cur = vec![0u8; AREA_MAX];
        // Shorter than the header.
        assert!(restore_merge(&cur, &[0u8; 100], 3, &l).is_err());
        assert!(save_merge(&[0u8; 100], &mut vec![0u8; 576], 3, &l).is_err());
        // A requested component beyond the area.
        let mut area = vec![0u8; 600];
        set_u64(&mut area, XSTATE_BV, 4);
        assert!(restore_merge(&cur, &area, 4, &l).is_err());
        assert!(save_merge(&cur, &mut area, 4, &l).is_err());
    }

    #[test]
    fn host_layout_is_sane() {
        let l = Layout::host();
        // AVX (component 2) sits right after the header in the standard layout.
        let (off, size) = l.component(2);
        if size > 0 {
            assert_eq!(off, LEGACY + HEADER);
            assert_eq!(size, 256);
        }
        // Where present, AVX-512's three components have their sizes, in order, without
        // overlapping (Intel puts them at 1088/1152/1664; AMD Zen 4, without MPX, at
        // 832/896/1408: the offsets come from CPUID, not from a table).
        if l.component(7).1 > 0 {
            let (k, zh, z16) = (l.component(5), l.component(6), l.component(7));
            assert_eq!((k.1, zh.1, z16.1), (64, 512, 1024));
            assert!(k.0 >= LEGACY + HEADER + 256, "{k:?}");
            assert!(
                k.0 + k.1 <= zh.0 && zh.0 + zh.1 <= z16.0,
                "{k:?} {zh:?} {z16:?}"
            );
        }
        assert_eq!(l.area_len(3), LEGACY + HEADER);
        let x = from_bytes(&[7u8; 4096]);
        assert_eq!(to_bytes(&x), vec![7u8; 4096]);
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(to_bytes(&from_bytes(&bytes)), bytes);
    }

    #[test]
    fn fail_point_drops_only_hi16_zmm() {
        assert_eq!(restore_mask(0xe7), 0xe7);
        #[cfg(feature = "failpoints")]
        {
            fail::cfg("xsave-restore-drop-hi16-zmm", "return").unwrap();
            let dropped = restore_mask(0xe7);
            fail::remove("xsave-restore-drop-hi16-zmm");
            assert_eq!(dropped, 0x67);
            // With component 7 dropped, the vCPU keeps its own ZMM16-31.
            let l = layout_of(STANDARD);
            let cur = painted(STANDARD, AREA_MAX, 0x00, 0xe7);
            let area = painted(STANDARD, 2688, 0x80, 0xe7);
            let new = restore_merge(&cur, &area, dropped, &l).unwrap();
            assert!(new[1664..2688].iter().all(|&x| x == 0x07));
            assert!(new[1152..1664].iter().all(|&x| x == 0x86));
        }
    }
}
