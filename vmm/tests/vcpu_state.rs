//! vCPU state save/restore on real KVM: a real-mode guest counting in a register and in
//! memory stops at an `out`, its vCPU state (with XMM/AVX/AVX-512 state, MSRs and debug
//! registers set beforehand) is saved, serialized, and restored into a vCPU of a second VM
//! over a copy of the memory, where the guest carries on from the same instruction.

use kvm_bindings::{
    kvm_msr_entry, kvm_userspace_memory_region, kvm_xcrs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::boot::cpu;
use vmm::vcpu::state::{self, Error, Msr, RestoreLimits, StateError, VcpuState, MSRS};

/// A guest at 0x1000 counting in BX and in the word (real mode) or quadword (long mode) at
/// 0x3000, and writing the memory counter's low byte to port 0x10 on each pass.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// ```text
    /// 1000: mov ax, [0x3000]
    /// 1003: inc ax
    /// 1004: mov [0x3000], ax
    /// 1007: inc bx
    /// 1008: out 0x10, al
    /// 100a: jmp 1000
    /// ```
    Real,
    /// The same in 64-bit mode (the boot protocol's GDT and identity page tables):
    /// ```text
    /// 1000: mov rax, [0x3000]
    /// 1008: inc rax
    /// 100b: mov [0x3000], rax
    /// 1013: inc rbx
    /// 1016: out 0x10, al
    /// 1018: jmp 1000
    /// ```
    Long,
}

impl Mode {
    fn code(self) -> &'static [u8] {
        match self {
            Mode::Real => &[
                0xa1, 0x00, 0x30, 0x40, 0xa3, 0x00, 0x30, 0x43, 0xe6, 0x10, 0xeb, 0xf4,
            ],
            Mode::Long => &[
                0x48, 0x8b, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0x48, 0xff, 0xc0, 0x48, 0x89, 0x04,
                0x25, 0x00, 0x30, 0x00, 0x00, 0x48, 0xff, 0xc3, 0xe6, 0x10, 0xeb, 0xe6,
            ],
        }
    }

    /// RIP after the `out`.
    fn after_out(self) -> u64 {
        match self {
            Mode::Real => 0x100a,
            Mode::Long => 0x1018,
        }
    }
}

const CODE_ADDR: u64 = 0x1000;
const COUNTER: u64 = 0x3000;
const PORT: u16 = 0x10;
const MEM_SIZE: usize = 0x10000;

/// MSR values the guest "had" (guest-writable MSRs a Linux kernel sets).
const MSR_VALUES: &[(u32, u64)] = &[
    (0x174, 0x10),                        // SYSENTER_CS
    (0x175, 0xffff_fe00_0000_5000),       // SYSENTER_ESP
    (0x176, 0xffff_ffff_81a0_1230),       // SYSENTER_EIP
    (0xc000_0081, 0x0023_0010_0000_0000), // STAR
    (0xc000_0082, 0xffff_ffff_81a0_0080), // LSTAR
    (0xc000_0083, 0xffff_ffff_81a0_1340), // CSTAR
    (0xc000_0084, 0x4_7700),              // SYSCALL_MASK
    (0xc000_0102, 0xffff_8880_3fc0_0000), // KERNEL_GS_BASE
    (0x277, 0x0007_0106_0007_0406),       // PAT (Linux's)
    (0xc000_0103, 3),                     // TSC_AUX (CPU number)
    (0x2ff, 0xc06),                       // MTRRdefType: enabled, write-back
];
/// The guest TSC set before running: far from what a new vCPU starts with (0).
const TSC: u64 = 1 << 40;

fn open_kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        // A machine without KVM must not pass these tests silently; opt out explicitly.
        Err(e) if std::env::var_os("SSI_SKIP_KVM_TESTS").is_some() => {
            eprintln!("no /dev/kvm ({e}): skipped because SSI_SKIP_KVM_TESTS is set");
            None
        }
        Err(e) => panic!("cannot open /dev/kvm: {e} (set SSI_SKIP_KVM_TESTS=1 to skip)"),
    }
}

/// A VM with one vCPU (CPUID set) over `mem`. Fields drop in order: vCPU, VM, then memory.
struct Machine {
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMemoryMmap,
}

fn machine(kvm: &Kvm, cpuid: &CpuId, mem: GuestMemoryMmap) -> Machine {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping belongs to `mem`, which the Machine keeps and drops after the VM.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(cpuid).unwrap();
    Machine { vcpu, _vm: vm, mem }
}

fn new_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn copy_memory(from: &GuestMemoryMmap) -> GuestMemoryMmap {
    let mut buf = vec![0u8; MEM_SIZE];
    from.read_slice(&mut buf, GuestAddress(0)).unwrap();
    let to = new_memory();
    to.write_slice(&buf, GuestAddress(0)).unwrap();
    to
}

fn counter(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(COUNTER)).unwrap()
}

/// Runs until the guest's `out`, returns the byte written, and completes the exit.
fn run_to_out(vcpu: &mut VcpuFd) -> u8 {
    let value = match vcpu.run().unwrap() {
        VcpuExit::IoOut(PORT, data) => data[0],
        e => panic!("unexpected exit {e:?}"),
    };
    let rip = vcpu.get_regs().unwrap().rip;
    state::complete_pending_io(vcpu).unwrap();
    let done = vcpu.get_regs().unwrap().rip;
    if rip != done {
        eprintln!("RIP {rip:#x} at the exit, {done:#x} once the out is complete");
    }
    value
}

/// (offset, size) of XSAVE component `i` (≥ 2) in the standard layout.
fn component(cpuid: &CpuId, i: u32) -> (usize, usize) {
    let e = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == i)
        .unwrap_or_else(|| panic!("no CPUID 0xd.{i}"));
    (e.ebx as usize, e.eax as usize)
}

/// Byte ranges of the XSAVE area filled with a pattern: XMM0-15 and the extended components
/// of `xcr0` (AVX upper halves, opmask, ZMM_Hi256, Hi16_ZMM).
fn pattern_ranges(cpuid: &CpuId, xcr0: u64) -> Vec<(usize, usize)> {
    let mut r = vec![(160, 256)];
    for i in [2, 5, 6, 7] {
        if xcr0 & (1 << i) != 0 {
            r.push(component(cpuid, i));
        }
    }
    r
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7) | 1
}

fn set_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) {
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let n = vcpu
        .set_msrs(&Msrs::from_entries(&entries).unwrap())
        .unwrap();
    assert_eq!(n, entries.len(), "KVM refused MSR {:#x}", entries[n].index);
}

fn msr(s: &VcpuState, index: u32) -> Option<u64> {
    s.msrs.iter().find(|m| m.index == index).map(|m| m.value)
}

/// Starts the guest of `mode` at CODE_ADDR with `rbx`. Long mode: the boot protocol's GDT,
/// page tables and registers, plus OSFXSR, OSXMMEXCPT and OSXSAVE as a Linux kernel has them.
fn start(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mode: Mode, rbx: u64) {
    mem.write_slice(mode.code(), GuestAddress(CODE_ADDR))
        .unwrap();
    match mode {
        Mode::Real => {
            let mut sregs = vcpu.get_sregs().unwrap();
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            sregs.ds.base = 0;
            sregs.ds.selector = 0;
            vcpu.set_sregs(&sregs).unwrap();
        }
        Mode::Long => {
            cpu::write_boot_tables(mem).unwrap();
            cpu::setup_boot_cpu(vcpu, CODE_ADDR).unwrap();
            let mut sregs = vcpu.get_sregs().unwrap();
            sregs.cr4 |= (1 << 9) | (1 << 10) | (1 << 18);
            vcpu.set_sregs(&sregs).unwrap();
        }
    }
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    regs.rbx = rbx;
    vcpu.set_regs(&regs).unwrap();
}

#[test]
fn real_mode_guest_continues_after_restore_on_a_second_vm() {
    continues_after_restore(Mode::Real);
}

#[test]
fn long_mode_guest_continues_after_restore_on_a_second_vm() {
    continues_after_restore(Mode::Long);
}

fn continues_after_restore(mode: Mode) {
    let Some(kvm) = open_kvm() else { return };
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let limits = RestoreLimits::from_kvm(&kvm).unwrap();
    let mut m1 = machine(&kvm, &cpuid, new_memory());
    start(&m1.vcpu, &m1.mem, mode, 100);

    // Vector state: XCR0 with AVX and (where the host has it) AVX-512, a pattern in XMM0-15
    // and in every enabled extended component.
    let xcr0 = limits.supported_xcr0 & 0xe7;
    assert_eq!(
        xcr0 & 7,
        7,
        "host without AVX: {:#x}",
        limits.supported_xcr0
    );
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].value = xcr0;
    m1.vcpu.set_xcrs(&xcrs).unwrap();
    let mut xsave = m1.vcpu.get_xsave().unwrap();
    let ranges = pattern_ranges(&cpuid, xcr0);
    {
        let mut bytes: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        for &(off, len) in &ranges {
            for (i, b) in bytes[off..off + len].iter_mut().enumerate() {
                *b = pattern(off + i);
            }
        }
        bytes[512..520].copy_from_slice(&xcr0.to_le_bytes()); // XSTATE_BV
        for (w, c) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes(c.try_into().unwrap());
        }
    }
    // SAFETY: no XSTATE feature is enabled dynamically: KVM reads the 4096-byte kvm_xsave.
    unsafe { m1.vcpu.set_xsave(&xsave) }.unwrap();

    // MSRs and debug registers.
    let mut msr_values = MSR_VALUES.to_vec();
    msr_values.push((0x10, TSC));
    set_msrs(&m1.vcpu, &msr_values);
    let mut dregs = m1.vcpu.get_debug_regs().unwrap();
    dregs.db = [0x1000, 0xffff_ffff_8100_0000, 0x7fff_0000_1000, 0x3000];
    m1.vcpu.set_debug_regs(&dregs).unwrap();

    // First pass of the loop.
    assert_eq!(run_to_out(&mut m1.vcpu), 1);
    let regs = m1.vcpu.get_regs().unwrap();
    assert_eq!(regs.rip, mode.after_out(), "RIP after a completed out");
    assert_eq!(regs.rbx, 101);
    assert_eq!(counter(&m1.mem), 1);

    let saved = state::save(&m1.vcpu).unwrap();
    saved.validate(&limits).unwrap();
    assert_eq!(saved.regs.rip, mode.after_out());
    assert_eq!(saved.regs.rbx, 101);
    assert_eq!(saved.regs.rax & 0xffff, 1);
    assert_eq!(saved.xcr0, xcr0);
    assert_eq!(saved.debug_regs.db, dregs.db);
    for &(off, len) in &ranges {
        for i in off..off + len {
            assert_eq!(saved.xsave[i], pattern(i), "saved xsave byte {i}");
        }
    }
    for &(index, value) in MSR_VALUES {
        assert_eq!(msr(&saved, index), Some(value), "saved MSR {index:#x}");
    }
    let tsc = msr(&saved, 0x10).unwrap();
    assert!(tsc >= TSC, "saved TSC {tsc:#x}");

    // Through JSON, as a snapshot would store it.
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, saved);

    // A second VM over a copy of the memory; its vCPU starts in the reset state.
    let mut m2 = machine(&kvm, &cpuid, copy_memory(&m1.mem));
    state::restore(&m2.vcpu, &loaded, &limits).unwrap();

    // Everything reads back as saved; the TSC went on from the saved value, not from 0.
    let again = state::save(&m2.vcpu).unwrap();
    let tsc2 = msr(&again, 0x10).unwrap();
    let khz = u64::from(m2.vcpu.get_tsc_khz().unwrap_or(10_000_000));
    assert!(
        tsc2 >= tsc && tsc2 - tsc < 10 * 1000 * khz,
        "restored TSC {tsc2:#x}, saved {tsc:#x}"
    );
    let strip_tsc = |s: &VcpuState| {
        let mut s = s.clone();
        s.msrs.retain(|m| m.index != 0x10);
        s
    };
    assert_eq!(strip_tsc(&again), strip_tsc(&saved));

    // The guest continues where it stopped: the next pass writes 2, BX goes on from 101.
    assert_eq!(run_to_out(&mut m2.vcpu), 2);
    let regs2 = m2.vcpu.get_regs().unwrap();
    assert_eq!(regs2.rip, mode.after_out());
    assert_eq!(regs2.rbx, 102);
    assert_eq!(counter(&m2.mem), 2);
    assert_eq!(counter(&m1.mem), 1, "the first VM's memory is its own");
    // The vector state survived the guest running on the new vCPU too.
    let x2 = state::save(&m2.vcpu).unwrap();
    for &(off, len) in &ranges {
        for i in off..off + len {
            assert_eq!(x2.xsave[i], pattern(i), "restored xsave byte {i}");
        }
    }
    assert_eq!(x2.xcr0, xcr0);

    // And the original keeps going in step.
    assert_eq!(run_to_out(&mut m1.vcpu), 2);
    assert_eq!(m1.vcpu.get_regs().unwrap().rbx, 102);
}

/// A change that makes a state invalid.
type Forgery = fn(&mut VcpuState);

#[test]
fn forged_states_are_refused_before_any_ioctl() {
    let Some(kvm) = open_kvm() else { return };
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let limits = RestoreLimits::from_kvm(&kvm).unwrap();
    let m = machine(&kvm, &cpuid, new_memory());
    start(&m.vcpu, &m.mem, Mode::Long, 0);
    let mut regs = m.vcpu.get_regs().unwrap();
    regs.rax = 0xdead;
    m.vcpu.set_regs(&regs).unwrap();
    let mut good = state::save(&m.vcpu).unwrap();
    good.validate(&limits).unwrap();
    // Any forged state carries another RAX: had restore written the registers, it would show.
    good.regs.rax = 0xbad;

    let forged: [(&str, Forgery); 7] = [
        ("CR0.PG without PE", |s| s.sregs.cr0 = 0x8000_0000),
        ("IA32_TSC_DEADLINE (the VMM's LAPIC's)", |s| {
            s.msrs.push(Msr {
                index: 0x6e0,
                value: 1,
            })
        }),
        ("IA32_FEATURE_CONTROL (not in the list)", |s| {
            s.msrs.push(Msr {
                index: 0x3a,
                value: 5,
            })
        }),
        ("LSTAR not canonical", |s| {
            for m in s.msrs.iter_mut().filter(|m| m.index == 0xc000_0082) {
                m.value = 1 << 60;
            }
        }),
        ("short XSAVE area", |s| s.xsave.truncate(512)),
        ("XCR0 without x87", |s| s.xcr0 = 6),
        ("RFLAGS bit 1 clear", |s| s.regs.rflags = 0),
    ];
    for (what, change) in &forged {
        let mut s = good.clone();
        change(&mut s);
        match state::restore(&m.vcpu, &s, &limits) {
            Err(Error::Invalid(e)) => eprintln!("{what}: refused: {e}"),
            r => panic!("{what}: {r:?}"),
        }
        assert_eq!(
            m.vcpu.get_regs().unwrap().rax,
            0xdead,
            "{what}: registers written"
        );
    }
    assert!(matches!(
        state::restore(
            &m.vcpu,
            &{
                let mut s = good.clone();
                s.msrs.push(Msr {
                    index: 0x1b,
                    value: 0xfee0_0d00,
                });
                s
            },
            &limits
        ),
        Err(Error::Invalid(StateError::MsrOfLapic(0x1b)))
    ));

    // The unforged state restores.
    state::restore(&m.vcpu, &good, &limits).unwrap();
    assert_eq!(m.vcpu.get_regs().unwrap().rax, 0xbad);
}

#[test]
fn fresh_vcpu_state_is_valid_and_msrs_are_listed() {
    let Some(kvm) = open_kvm() else { return };
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let limits = RestoreLimits::from_kvm(&kvm).unwrap();
    let m = machine(&kvm, &cpuid, new_memory());
    let s = state::save(&m.vcpu).unwrap();
    s.validate(&limits).unwrap();
    let missing: Vec<String> = MSRS
        .iter()
        .filter(|spec| msr(&s, spec.index).is_none())
        .map(|spec| format!("{:#x} {}", spec.index, spec.name))
        .collect();
    eprintln!(
        "supported XCR0 {:#x}, KVM xsave size {}; MSRs KVM did not read: {missing:?}",
        limits.supported_xcr0, limits.kvm_xsave_size
    );
    let list = kvm.get_msr_index_list().unwrap();
    let unlisted: Vec<String> = s
        .msrs
        .iter()
        .filter(|m| !list.as_slice().contains(&m.index))
        .map(|m| format!("{:#x}", m.index))
        .collect();
    eprintln!("saved MSRs not in KVM_GET_MSR_INDEX_LIST: {unlisted:?}");
    assert!(MSRS
        .iter()
        .filter(|spec| spec.required)
        .all(|spec| msr(&s, spec.index).is_some()));
}

#[test]
fn an_in_exit_is_completed_before_saving() {
    let Some(kvm) = open_kvm() else { return };
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let limits = RestoreLimits::from_kvm(&kvm).unwrap();
    let mut m = machine(&kvm, &cpuid, new_memory());
    start(&m.vcpu, &m.mem, Mode::Real, 0);
    // 1000: in al, 0x11; 1002: hlt
    m.mem
        .write_slice(&[0xe4, 0x11, 0xf4], GuestAddress(CODE_ADDR))
        .unwrap();
    match m.vcpu.run().unwrap() {
        VcpuExit::IoIn(0x11, data) => data[0] = 0x5a,
        e => panic!("unexpected exit {e:?}"),
    }
    let before = m.vcpu.get_regs().unwrap();
    eprintln!(
        "at the exit: RIP {:#x}, AL {:#x}",
        before.rip,
        before.rax & 0xff
    );
    state::complete_pending_io(&mut m.vcpu).unwrap();
    let s = state::save(&m.vcpu).unwrap();
    s.validate(&limits).unwrap();
    assert_eq!(s.regs.rax & 0xff, 0x5a, "the value read is in the saved AL");
    assert_eq!(
        s.regs.rip,
        CODE_ADDR + 2,
        "stopped after the in, before the hlt"
    );
}
