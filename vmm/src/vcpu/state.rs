//! Saved KVM state of one vCPU ([`VcpuState`]): plain serde data, apart from the live
//! [`VcpuFd`], saved with [`save`] and loaded into a fresh vCPU with [`restore`] after
//! [`VcpuState::validate`] has checked it as untrusted input.
//!
//! # What is saved
//!
//! Everything KVM keeps for a vCPU of this VMM, as plain fields. No `kvm-bindings` type is
//! serialized: its `serde` feature stores byte images of the kernel structures (padding and
//! unions included), which would make the kernel ABI our format and leave nothing to validate
//! field by field.
//! - general registers (`KVM_GET_REGS`) and special registers (`KVM_GET_SREGS`: segments,
//!   descriptor tables, CR0/2/3/4/8, EFER, KVM's copy of the APIC base, interrupt bitmap);
//! - the XSAVE area (`KVM_GET_XSAVE`, standard non-compacted layout, 4096 bytes: x87, SSE, AVX,
//!   and the AVX-512 components the guest kernel saves and restores through the VMM's XSAVE
//!   emulation, [`super::xsave`]) and XCR0 (`KVM_GET_XCRS`);
//! - debug registers (`KVM_GET_DEBUGREGS`);
//! - vCPU events (`KVM_GET_VCPU_EVENTS`): the injected exception, interrupt or NMI, KVM's queue
//!   of NMIs, NMI masking, the interrupt shadow (STI / MOV SS), SMM state;
//! - KVM's MP state (`KVM_GET_MP_STATE`);
//! - the MSRs of [`MSRS`] that KVM reads on this host (TSC, SYSENTER/SYSCALL, KERNEL_GS_BASE,
//!   PAT, MISC_ENABLE, and where available TSC_ADJUST, TSC_AUX, SPEC_CTRL, MTRRs, kvmclock).
//!
//! What is *not* here, because the VMM's local APIC (`irqchip::LapicState`) owns it: the
//! INIT/SIPI run state and the SIPI vector (KVM's MP state is always RUNNABLE without an
//! in-kernel APIC), an NMI accepted by the APIC and not yet handed to KVM, `IA32_APIC_BASE`,
//! `IA32_TSC_DEADLINE` and the x2APIC MSRs (sent to the VMM by the MSR filter, see
//! `vm::run_on`). FS_BASE, GS_BASE and EFER are in the special registers, not in the MSR list.
//! CPUID is not saved either: the VMM sets it when it creates the vCPU, before [`restore`].
//!
//! # Order
//!
//! Saving (as Firecracker's `save_state`): MP state first (`KVM_GET_MP_STATE` may process
//! pending APIC events), then registers, special registers, XSAVE, XCRs, debug registers,
//! MSRs, and vCPU events last (the other GET ioctls may change them). Before that, the last
//! exit must be complete ([`complete_pending_io`]): after an `in` exit on this host, RIP still
//! points at the `in` and AL lacks the value until the next `KVM_RUN`.
//!
//! Restoring, into a vCPU whose CPUID is already set (KVM checks XCR0, CR4 and several MSRs
//! against the guest CPUID):
//! 1. MP state;
//! 2. general registers: `KVM_SET_REGS` drops a pending exception, so it goes before the
//!    events;
//! 3. special registers (CPU mode: CR0/CR4/EFER, segments; `KVM_SET_SREGS` also queues the
//!    interrupt of the interrupt bitmap);
//! 4. XSAVE, then XCR0 (KVM checks the XSAVE header against the guest's permitted features,
//!    not XCR0, so both orders work; Firecracker and QEMU do XSAVE first);
//! 5. debug registers;
//! 6. MSRs, in one `KVM_SET_MSRS` in the order of [`MSRS`]: the TSC first (kvmclock and every
//!    TSC-relative value derive from it), the kvmclock MSRs last; after the special registers
//!    (EFER, mode) on which some MSR checks depend;
//! 7. vCPU events last, overriding what the earlier ioctls queued or dropped;
//! 8. `KVM_KVMCLOCK_CTRL` when the guest uses kvmclock (best effort), so that its watchdogs
//!    forgive the pause.
//!
//! The TSC-deadline timer is the one ordering constraint across components: the VMM's local
//! APIC keeps its deadline in guest-TSC time and reads the guest TSC when the vCPU thread
//! starts (`Vcpu::run_loop`), so the vCPU state must be restored before the APIC is
//! attached to a running vCPU thread. The guest TSC is restored to the saved value: guest time
//! does not advance across a snapshot, as in Firecracker. The VM-wide kvmclock
//! (`KVM_SET_CLOCK`) is the VM's business, not this module's.
//!
//! # Why free functions and not `snapshot::Persist`
//!
//! The live object is a [`VcpuFd`] that the VM creates (with its CPUID) and the vCPU thread
//! owns; restoring loads state into it rather than constructing it, and needs the host's
//! [`RestoreLimits`]. So the API is [`save`], [`restore`] and [`VcpuState::validate`], which
//! a `Persist` impl of the VMM's whole vCPU (this state + `LapicState`) can compose.
//!
//! # Validation
//!
//! [`VcpuState::validate`] runs before any ioctl and rejects, naming the field: a wrong XSAVE
//! length or header, XCR0 combinations the architecture forbids or the host does not support,
//! inconsistent CR0/CR4/EFER, reserved bits, insane segments, RFLAGS reserved bits, a
//! non-canonical RIP or base, an interrupt bitmap that disagrees with the events, invalid
//! events, and any MSR outside [`MSRS`] (a forged state must not write MSRs the guest could not,
//! nor bypass the MSR filter). A restore that fails *after* validation (KVM refusing a value)
//! leaves the vCPU partly written: discard it.

use std::fmt;

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_PAYLOAD, KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Size of the XSAVE area (`struct kvm_xsave`, without the `KVM_GET_XSAVE2` extension).
pub const XSAVE_SIZE: usize = 4096;

/// Saved KVM state of one vCPU. See the module documentation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers.
    pub regs: Regs,
    /// Special registers.
    pub sregs: Sregs,
    /// The XSAVE area, standard (non-compacted) layout, [`XSAVE_SIZE`] bytes.
    pub xsave: Vec<u8>,
    /// XCR0 (XFEATURE_ENABLED_MASK), the only XCR KVM has.
    pub xcr0: u64,
    /// Debug registers.
    pub debug_regs: DebugRegs,
    /// Pending and injected events.
    pub events: VcpuEvents,
    /// KVM's multiprocessing state.
    pub mp_state: MpState,
    /// MSRs, each at most once, all from [`MSRS`].
    pub msrs: Vec<Msr>,
}

/// General registers.
#[allow(missing_docs)]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Special registers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sregs {
    /// Code segment.
    pub cs: Segment,
    /// Data segment.
    pub ds: Segment,
    /// Extra segment.
    pub es: Segment,
    /// FS (its base is IA32_FS_BASE).
    pub fs: Segment,
    /// GS (its base is IA32_GS_BASE).
    pub gs: Segment,
    /// Stack segment.
    pub ss: Segment,
    /// Task register.
    pub tr: Segment,
    /// Local descriptor table register.
    pub ldt: Segment,
    /// Global descriptor table register.
    pub gdt: DescriptorTable,
    /// Interrupt descriptor table register.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2 (page-fault address).
    pub cr2: u64,
    /// CR3 (page-table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority, 0-15).
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// KVM's copy of IA32_APIC_BASE (the VMM's local APIC has the one the guest sees).
    pub apic_base: u64,
    /// The external interrupt being injected: at most one bit, vector `v` is bit `v % 64` of
    /// word `v / 64`.
    pub interrupt_bitmap: [u64; 4],
}

/// A segment register (the cached descriptor KVM reports).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (granularity already applied).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub seg_type: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level (0-3).
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code or data segment (S), as opposed to a system segment.
    pub s: bool,
    /// 64-bit code segment (L).
    pub l: bool,
    /// Granularity (G): 4 KiB units.
    pub g: bool,
    /// Available for software (AVL).
    pub avl: bool,
    /// Unusable (a null selector was loaded).
    pub unusable: bool,
}

/// GDTR or IDTR.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u16,
}

/// Debug registers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugRegs {
    /// DR0-DR3, breakpoint addresses.
    pub db: [u64; 4],
    /// DR6, debug status.
    pub dr6: u64,
    /// DR7, debug control.
    pub dr7: u64,
}

/// vCPU events (`struct kvm_vcpu_events`). The SIPI vector is not here: it is in the local
/// APIC's run state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuEvents {
    /// Exception.
    pub exception: ExceptionEvent,
    /// External interrupt and interrupt shadow.
    pub interrupt: InterruptEvent,
    /// NMI.
    pub nmi: NmiEvent,
    /// System management mode.
    pub smi: SmiEvent,
    /// A triple fault pending (KVM_CAP_X86_TRIPLE_FAULT_EVENT; never enabled by this VMM).
    pub triple_fault_pending: bool,
}

/// The exception being injected (or, with KVM_CAP_EXCEPTION_PAYLOAD, pending).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionEvent {
    /// Being injected.
    pub injected: bool,
    /// Pending, not yet injected (only with KVM_CAP_EXCEPTION_PAYLOAD, never enabled by this
    /// VMM: KVM then reports a pending exception as injected).
    pub pending: bool,
    /// Vector (meaningful when injected or pending).
    pub vector: u8,
    /// Whether it pushes an error code.
    pub has_error_code: bool,
    /// The error code.
    pub error_code: u32,
    /// Whether `payload` is valid (KVM_CAP_EXCEPTION_PAYLOAD only).
    pub has_payload: bool,
    /// CR2 of a #PF or DR6 bits of a #DB not yet delivered (KVM_CAP_EXCEPTION_PAYLOAD only).
    pub payload: u64,
}

/// The external interrupt being injected, and the interrupt shadow.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterruptEvent {
    /// Being injected (then `sregs.interrupt_bitmap` has exactly bit `vector`).
    pub injected: bool,
    /// Vector (meaningful when injected).
    pub vector: u8,
    /// A software interrupt (KVM never reports one).
    pub soft: bool,
    /// Interrupt shadow: bit 0 after MOV SS / POP SS, bit 1 after STI.
    pub shadow: u8,
}

/// NMI state inside KVM (an NMI still in the local APIC is in `LapicState`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NmiEvent {
    /// An NMI being injected.
    pub injected: bool,
    /// NMIs queued in KVM (`KVM_NMI`), at most 2.
    pub pending: u8,
    /// NMIs blocked (inside an NMI handler, until IRET).
    pub masked: bool,
}

/// System management mode state (this VMM has no SMM: all false).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmiEvent {
    /// In SMM.
    pub smm: bool,
    /// An SMI pending.
    pub pending: bool,
    /// SMM entered from inside an NMI handler.
    pub smm_inside_nmi: bool,
    /// An INIT latched while in SMM.
    pub latched_init: bool,
}

/// KVM's multiprocessing state (x86 values).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MpState {
    /// Running (the only state KVM accepts without an in-kernel local APIC).
    #[default]
    Runnable,
    /// Waiting for INIT.
    Uninitialized,
    /// INIT received, waiting for SIPI.
    InitReceived,
    /// Halted, waiting for an interrupt.
    Halted,
    /// SIPI received.
    SipiReceived,
}

impl MpState {
    fn from_kvm(v: u32) -> Option<MpState> {
        Some(match v {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            KVM_MP_STATE_HALTED => MpState::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            _ => return None,
        })
    }

    fn to_kvm(self) -> u32 {
        match self {
            MpState::Runnable => KVM_MP_STATE_RUNNABLE,
            MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
            MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
            MpState::Halted => KVM_MP_STATE_HALTED,
            MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
        }
    }
}

/// One MSR value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msr {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub value: u64,
}

/// An MSR a vCPU state may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrSpec {
    /// MSR index.
    pub index: u32,
    /// Name, for messages.
    pub name: &'static str,
    /// A Linux guest cannot go on without it: saving fails if KVM cannot read it, restoring
    /// fails if the state lacks it.
    pub required: bool,
    /// What its value must look like.
    pub check: MsrCheck,
}

/// Value checks of [`MsrSpec`] (those KVM would otherwise fail half-way through
/// `KVM_SET_MSRS`, or that keep forged values out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrCheck {
    /// Any value.
    Any,
    /// A canonical address.
    Canonical,
    /// Bits 32-63 clear.
    Low32,
    /// IA32_PAT: eight valid memory types (0, 1, 4, 5, 6, 7).
    Pat,
    /// MTRRdefType: type (0, 1, 4, 5, 6) in bits 0-7, FE (10), E (11), nothing else.
    MtrrDefType,
    /// Fixed-range MTRR: eight valid MTRR memory types (0, 1, 4, 5, 6).
    MtrrFixed,
    /// Variable-range MTRR base: type in bits 0-7, bits 8-11 clear, address below 2^52.
    MtrrPhysBase,
    /// Variable-range MTRR mask: bits 0-10 clear, address below 2^52.
    MtrrPhysMask,
    /// A guest-physical address (below 2^52), bit 0 = enable (kvmclock).
    GuestPhys,
}

const fn msr(index: u32, name: &'static str, required: bool, check: MsrCheck) -> MsrSpec {
    MsrSpec {
        index,
        name,
        required,
        check,
    }
}

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_APIC_BASE`: the VMM's local APIC's (MSR filter).
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;
/// `IA32_TSC_DEADLINE`: the VMM's local APIC's (MSR filter).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// `MSR_KVM_SYSTEM_TIME_NEW` (kvmclock).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `MSR_KVM_SYSTEM_TIME` (kvmclock, old).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// The MSRs a vCPU state may hold, in restore order: the TSC first, kvmclock last. Saving
/// reads each one (KVM skips those it does not know on this host, unless required);
/// restoring accepts nothing else.
pub const MSRS: &[MsrSpec] = {
    use MsrCheck::*;
    &[
        msr(MSR_IA32_TSC, "IA32_TSC", true, Any),
        msr(0x3b, "IA32_TSC_ADJUST", false, Any),
        msr(0xc000_0103, "IA32_TSC_AUX", false, Low32),
        msr(0x174, "IA32_SYSENTER_CS", true, Any),
        msr(0x175, "IA32_SYSENTER_ESP", true, Canonical),
        msr(0x176, "IA32_SYSENTER_EIP", true, Canonical),
        msr(0xc000_0081, "STAR", true, Any),
        msr(0xc000_0082, "LSTAR", true, Canonical),
        msr(0xc000_0083, "CSTAR", true, Canonical),
        msr(0xc000_0084, "SYSCALL_MASK", true, Low32),
        msr(0xc000_0102, "KERNEL_GS_BASE", true, Canonical),
        msr(0x277, "IA32_PAT", true, Pat),
        msr(0x1a0, "IA32_MISC_ENABLE", true, Any),
        msr(0x48, "IA32_SPEC_CTRL", false, Any),
        msr(0x2ff, "MTRRdefType", false, MtrrDefType),
        msr(0x250, "MTRRfix64K_00000", false, MtrrFixed),
        msr(0x258, "MTRRfix16K_80000", false, MtrrFixed),
        msr(0x259, "MTRRfix16K_A0000", false, MtrrFixed),
        msr(0x268, "MTRRfix4K_C0000", false, MtrrFixed),
        msr(0x269, "MTRRfix4K_C8000", false, MtrrFixed),
        msr(0x26a, "MTRRfix4K_D0000", false, MtrrFixed),
        msr(0x26b, "MTRRfix4K_D8000", false, MtrrFixed),
        msr(0x26c, "MTRRfix4K_E0000", false, MtrrFixed),
        msr(0x26d, "MTRRfix4K_E8000", false, MtrrFixed),
        msr(0x26e, "MTRRfix4K_F0000", false, MtrrFixed),
        msr(0x26f, "MTRRfix4K_F8000", false, MtrrFixed),
        msr(0x200, "MTRRphysBase0", false, MtrrPhysBase),
        msr(0x201, "MTRRphysMask0", false, MtrrPhysMask),
        msr(0x202, "MTRRphysBase1", false, MtrrPhysBase),
        msr(0x203, "MTRRphysMask1", false, MtrrPhysMask),
        msr(0x204, "MTRRphysBase2", false, MtrrPhysBase),
        msr(0x205, "MTRRphysMask2", false, MtrrPhysMask),
        msr(0x206, "MTRRphysBase3", false, MtrrPhysBase),
        msr(0x207, "MTRRphysMask3", false, MtrrPhysMask),
        msr(0x208, "MTRRphysBase4", false, MtrrPhysBase),
        msr(0x209, "MTRRphysMask4", false, MtrrPhysMask),
        msr(0x20a, "MTRRphysBase5", false, MtrrPhysBase),
        msr(0x20b, "MTRRphysMask5", false, MtrrPhysMask),
        msr(0x20c, "MTRRphysBase6", false, MtrrPhysBase),
        msr(0x20d, "MTRRphysMask6", false, MtrrPhysMask),
        msr(0x20e, "MTRRphysBase7", false, MtrrPhysBase),
        msr(0x20f, "MTRRphysMask7", false, MtrrPhysMask),
        msr(0x11, "MSR_KVM_WALL_CLOCK", false, GuestPhys),
        msr(0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW", false, GuestPhys),
        msr(MSR_KVM_SYSTEM_TIME, "MSR_KVM_SYSTEM_TIME", false, GuestPhys),
        msr(
            MSR_KVM_SYSTEM_TIME_NEW,
            "MSR_KVM_SYSTEM_TIME_NEW",
            false,
            GuestPhys,
        ),
    ]
};

/// The entry of [`MSRS`] for `index`, and its position.
pub fn msr_spec(index: u32) -> Option<(usize, &'static MsrSpec)> {
    MSRS.iter().enumerate().find(|(_, m)| m.index == index)
}

/// What the host accepts, for [`VcpuState::validate`] and [`restore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreLimits {
    /// XCR0 bits KVM supports (`KVM_GET_SUPPORTED_CPUID` leaf 0xd subleaf 0, EDX:EAX).
    pub supported_xcr0: u64,
    /// Bytes `KVM_SET_XSAVE` reads (`KVM_CAP_XSAVE2`, at least 4096); restoring needs exactly
    /// [`XSAVE_SIZE`] (no dynamically enabled XSTATE feature such as AMX).
    pub kvm_xsave_size: usize,
}

impl RestoreLimits {
    /// The limits of this host's KVM.
    pub fn from_kvm(kvm: &Kvm) -> Result<RestoreLimits, Error> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("GET_SUPPORTED_CPUID", e))?;
        let size = kvm.check_extension_int(Cap::Xsave2);
        Ok(RestoreLimits {
            supported_xcr0: supported_xcr0(&cpuid),
            kvm_xsave_size: usize::try_from(size).unwrap_or(0).max(XSAVE_SIZE),
        })
    }
}

/// XCR0 bits of a (supported or guest) CPUID: leaf 0xd subleaf 0, EDX:EAX.
pub fn supported_xcr0(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(XFEATURE_X87)
}

/// Why a vCPU state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// KVM did not read or write an MSR.
    #[error("KVM refused to {op} MSR {index:#x} ({name})")]
    MsrRefused {
        /// "read" or "write".
        op: &'static str,
        /// The MSR.
        index: u32,
        /// Its name.
        name: &'static str,
    },
    /// KVM reported no XCR0.
    #[error("KVM_GET_XCRS reported no XCR0")]
    NoXcr0,
    /// KVM reported an MP state this VMM does not know.
    #[error("KVM reported MP state {0}, unknown to this VMM")]
    UnknownMpState(u32),
    /// The host's XSAVE area is larger than `struct kvm_xsave`.
    #[error("KVM's XSAVE area is {0} bytes (KVM_GET_XSAVE2 is not supported, only {XSAVE_SIZE})")]
    XsaveTooLarge(usize),
    /// Completing the last exit made KVM exit again (see [`complete_pending_io`]).
    #[error("KVM exited again while completing the last exit: {0}")]
    PendingExit(String),
    /// Building an MSR list failed.
    #[error("MSR list: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
    /// The state is invalid.
    #[error("invalid vCPU state: {0}")]
    Invalid(#[from] StateError),
}

/// Why a [`VcpuState`] is invalid; each names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A field has a value it must not have.
    #[error("{field} = {value:#x}: {reason}")]
    Field {
        /// The field, e.g. `sregs.cr0`.
        field: String,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The XSAVE area has the wrong size.
    #[error("xsave: {0} bytes, expected {XSAVE_SIZE}")]
    XsaveLength(usize),
    /// An MSR outside [`MSRS`].
    #[error("msrs: MSR {0:#x} may not be set from a saved state")]
    MsrNotAllowed(u32),
    /// An MSR the VMM's local APIC handles (its value belongs in `LapicState`).
    #[error("msrs: MSR {0:#x} belongs to the VMM's local APIC, not to KVM")]
    MsrOfLapic(u32),
    /// An MSR given twice.
    #[error("msrs: MSR {0:#x} appears twice")]
    MsrDuplicate(u32),
    /// A required MSR is missing.
    #[error("msrs: required MSR {index:#x} ({name}) is missing")]
    MsrMissing {
        /// The MSR.
        index: u32,
        /// Its name.
        name: &'static str,
    },
}

fn bad(field: impl fmt::Display, value: u64, reason: &'static str) -> StateError {
    StateError::Field {
        field: field.to_string(),
        value,
        reason,
    }
}

// Architectural bits.
const RFLAGS_FIXED1: u64 = 1 << 1;
/// Defined RFLAGS bits: CF, 1, PF, AF, ZF, SF, TF, IF, DF, OF, IOPL, NT, RF, VM, AC, VIF,
/// VIP, ID.
const RFLAGS_DEFINED: u64 = 0x003f_7fd7;
const RFLAGS_VM: u64 = 1 << 17;
const CR0_PE: u64 = 1 << 0;
const CR0_WP: u64 = 1 << 16;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// PE, MP, EM, TS, ET, NE, WP, AM, NW, CD, PG.
const CR0_DEFINED: u64 = 0xe005_003f;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_CET: u64 = 1 << 23;
/// VME..LA57 (0-12), FSGSBASE, PCIDE, OSXSAVE (16-18), SMEP, SMAP, PKE, CET, PKS (20-24).
/// Not VMXE/SMXE (no nested virtualization), KL, UINTR, LAM, FRED.
const CR4_ALLOWED: u64 = 0x01f7_1fff;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const EFER_ALLOWED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
/// CR3: bits 52-60 and 63 are reserved (61/62 are LAM's).
const CR3_RESERVED: u64 = 0x9ff0_0000_0000_0000;
/// IA32_APIC_BASE: bits 0-7 and 9 reserved, address below 2^52.
const APIC_BASE_RESERVED: u64 = 0xfff0_0000_0000_02ff;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;

const XFEATURE_X87: u64 = 1 << 0;
const XFEATURE_SSE: u64 = 1 << 1;
const XFEATURE_AVX: u64 = 1 << 2;
const XFEATURE_MPX: u64 = (1 << 3) | (1 << 4);
const XFEATURE_AVX512: u64 = (1 << 5) | (1 << 6) | (1 << 7);
const XFEATURE_AMX: u64 = (1 << 17) | (1 << 18);

// XSAVE area offsets (standard format).
const XSAVE_MXCSR: usize = 24;
const XSAVE_XSTATE_BV: usize = 512;
const XSAVE_XCOMP_BV: usize = 520;
const XSAVE_HEADER_RESERVED: std::ops::Range<usize> = 528..576;

/// Exceptions that push an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX.
const EXC_WITH_ERROR_CODE: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);
const NMI_VECTOR: u8 = 2;

/// Canonical with 57-bit linear addresses (the loosest form: also accepts 48-bit canonical).
fn canonical(v: u64) -> bool {
    ((v << 7) as i64 >> 7) as u64 == v
}

impl VcpuState {
    /// Checks the state as untrusted input, before any ioctl.
    pub fn validate(&self, limits: &RestoreLimits) -> Result<(), StateError> {
        let long = self.sregs.efer & EFER_LMA != 0;
        self.validate_sregs()?;
        self.validate_regs(long)?;
        self.validate_xsave(limits)?;
        self.validate_debug_regs()?;
        self.validate_events()?;
        if self.mp_state != MpState::Runnable {
            return Err(bad(
                "mp_state",
                u64::from(self.mp_state.to_kvm()),
                "must be Runnable: without an in-kernel APIC the INIT/SIPI/halt state is the \
                 local APIC's",
            ));
        }
        self.validate_msrs()
    }

    fn validate_regs(&self, long: bool) -> Result<(), StateError> {
        let f = self.regs.rflags;
        if f & RFLAGS_FIXED1 == 0 {
            return Err(bad("regs.rflags", f, "bit 1 must be set"));
        }
        if f & !RFLAGS_DEFINED != 0 {
            return Err(bad("regs.rflags", f, "reserved bits set"));
        }
        if long && f & RFLAGS_VM != 0 {
            return Err(bad("regs.rflags", f, "VM (virtual-8086) set in long mode"));
        }
        let rip = self.regs.rip;
        if long && self.sregs.cs.l {
            if !canonical(rip) {
                return Err(bad("regs.rip", rip, "not canonical"));
            }
        } else if rip >> 32 != 0 {
            return Err(bad("regs.rip", rip, "bits 32-63 set outside 64-bit code"));
        }
        Ok(())
    }

    fn validate_sregs(&self) -> Result<(), StateError> {
        let s = &self.sregs;
        let (cr0, cr4, efer) = (s.cr0, s.cr4, s.efer);
        if cr0 & !CR0_DEFINED != 0 {
            return Err(bad("sregs.cr0", cr0, "reserved bits set"));
        }
        if cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0 {
            return Err(bad("sregs.cr0", cr0, "PG without PE"));
        }
        if cr0 & CR0_NW != 0 && cr0 & CR0_CD == 0 {
            return Err(bad("sregs.cr0", cr0, "NW without CD"));
        }
        if cr4 & !CR4_ALLOWED != 0 {
            return Err(bad("sregs.cr4", cr4, "reserved or unsupported bits set"));
        }
        if cr4 & CR4_CET != 0 && cr0 & CR0_WP == 0 {
            return Err(bad("sregs.cr4", cr4, "CET without CR0.WP"));
        }
        if efer & !EFER_ALLOWED != 0 {
            return Err(bad("sregs.efer", efer, "reserved or unsupported bits set"));
        }
        let long = efer & EFER_LMA != 0;
        if efer & EFER_LME != 0 && cr0 & CR0_PG != 0 {
            if cr4 & CR4_PAE == 0 {
                return Err(bad(
                    "sregs.cr4",
                    cr4,
                    "long mode (EFER.LME, CR0.PG) without PAE",
                ));
            }
            if !long {
                return Err(bad("sregs.efer", efer, "LME and CR0.PG without LMA"));
            }
        } else {
            if long {
                return Err(bad("sregs.efer", efer, "LMA without LME and CR0.PG"));
            }
            if s.cs.l {
                return Err(bad(
                    "sregs.cs.l",
                    1,
                    "64-bit code segment outside long mode",
                ));
            }
        }
        if cr4 & CR4_PCIDE != 0 && !long {
            return Err(bad("sregs.cr4", cr4, "PCIDE outside long mode"));
        }
        if s.cr3 & CR3_RESERVED != 0 {
            return Err(bad("sregs.cr3", s.cr3, "reserved bits set"));
        }
        if s.cr8 > 15 {
            return Err(bad("sregs.cr8", s.cr8, "task priority above 15"));
        }
        let ab = s.apic_base;
        if ab & APIC_BASE_RESERVED != 0 {
            return Err(bad("sregs.apic_base", ab, "reserved bits set"));
        }
        if ab & APIC_BASE_EXTD != 0 && ab & APIC_BASE_EN == 0 {
            return Err(bad("sregs.apic_base", ab, "x2APIC mode without enable"));
        }
        for (name, seg) in [
            ("cs", &s.cs),
            ("ds", &s.ds),
            ("es", &s.es),
            ("fs", &s.fs),
            ("gs", &s.gs),
            ("ss", &s.ss),
            ("tr", &s.tr),
            ("ldt", &s.ldt),
        ] {
            validate_segment(name, seg, long)?;
        }
        for (name, t) in [("gdt", &s.gdt), ("idt", &s.idt)] {
            if !canonical(t.base) {
                return Err(bad(
                    format_args!("sregs.{name}.base"),
                    t.base,
                    "not canonical",
                ));
            }
        }
        let bits: u32 = s.interrupt_bitmap.iter().map(|w| w.count_ones()).sum();
        let first = s
            .interrupt_bitmap
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| i as u32 * 64 + w.trailing_zeros());
        let irq = &self.events.interrupt;
        let expected = irq.injected.then_some(u32::from(irq.vector));
        if bits > 1 || first != expected {
            return Err(bad(
                "sregs.interrupt_bitmap",
                u64::from(first.unwrap_or(0)),
                "must hold exactly the injected interrupt of events.interrupt, or nothing",
            ));
        }
        Ok(())
    }

    fn validate_xsave(&self, limits: &RestoreLimits) -> Result<(), StateError> {
        let x = &self.xsave;
        if x.len() != XSAVE_SIZE {
            return Err(StateError::XsaveLength(x.len()));
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&x[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let xcr0 = self.xcr0;
        if xcr0 & XFEATURE_X87 == 0 {
            return Err(bad("xcr0", xcr0, "x87 (bit 0) must be set"));
        }
        if xcr0 & XFEATURE_AVX != 0 && xcr0 & XFEATURE_SSE == 0 {
            return Err(bad("xcr0", xcr0, "AVX without SSE"));
        }
        let avx512 = xcr0 & XFEATURE_AVX512;
        if avx512 != 0 && (avx512 != XFEATURE_AVX512 || xcr0 & XFEATURE_AVX == 0) {
            return Err(bad(
                "xcr0",
                xcr0,
                "AVX-512 needs opmask, ZMM_Hi256 and Hi16_ZMM together, and AVX",
            ));
        }
        for (group, why) in [
            (XFEATURE_MPX, "MPX needs BNDREGS and BNDCSR together"),
            (XFEATURE_AMX, "AMX needs XTILECFG and XTILEDATA together"),
        ] {
            let g = xcr0 & group;
            if g != 0 && g != group {
                return Err(bad("xcr0", xcr0, why));
            }
        }
        if xcr0 & !limits.supported_xcr0 != 0 {
            return Err(bad("xcr0", xcr0, "bits the host does not support"));
        }
        let xstate_bv = u64_at(XSAVE_XSTATE_BV);
        if xstate_bv & !(limits.supported_xcr0 | XFEATURE_X87 | XFEATURE_SSE) != 0 {
            return Err(bad(
                "xsave.xstate_bv",
                xstate_bv,
                "components the host does not support",
            ));
        }
        let xcomp_bv = u64_at(XSAVE_XCOMP_BV);
        if xcomp_bv != 0 {
            return Err(bad(
                "xsave.xcomp_bv",
                xcomp_bv,
                "must be 0 (standard format)",
            ));
        }
        if let Some(i) = XSAVE_HEADER_RESERVED.clone().find(|&i| x[i] != 0) {
            return Err(bad(
                format_args!("xsave[{i}]"),
                u64::from(x[i]),
                "XSAVE header reserved bytes must be 0",
            ));
        }
        let mxcsr = u32::from_le_bytes([
            x[XSAVE_MXCSR],
            x[XSAVE_MXCSR + 1],
            x[XSAVE_MXCSR + 2],
            x[XSAVE_MXCSR + 3],
        ]);
        if mxcsr >> 16 != 0 {
            return Err(bad("xsave.mxcsr", u64::from(mxcsr), "reserved bits set"));
        }
        Ok(())
    }

    fn validate_debug_regs(&self) -> Result<(), StateError> {
        let d = &self.debug_regs;
        for (i, a) in d.db.iter().enumerate() {
            if !canonical(*a) {
                return Err(bad(format_args!("debug_regs.db[{i}]"), *a, "not canonical"));
            }
        }
        if d.dr6 >> 32 != 0 {
            return Err(bad("debug_regs.dr6", d.dr6, "bits 32-63 set"));
        }
        if d.dr7 >> 32 != 0 {
            return Err(bad("debug_regs.dr7", d.dr7, "bits 32-63 set"));
        }
        Ok(())
    }

    fn validate_events(&self) -> Result<(), StateError> {
        let e = &self.events;
        let x = &e.exception;
        const NO_PAYLOAD_CAP: &str =
            "needs KVM_CAP_EXCEPTION_PAYLOAD, which this VMM does not enable";
        if x.pending {
            return Err(bad("events.exception.pending", 1, NO_PAYLOAD_CAP));
        }
        if x.has_payload {
            return Err(bad("events.exception.has_payload", 1, NO_PAYLOAD_CAP));
        }
        if x.injected {
            if x.vector >= 32 || x.vector == NMI_VECTOR {
                return Err(bad(
                    "events.exception.vector",
                    u64::from(x.vector),
                    "not an exception vector (0-31 except NMI)",
                ));
            }
            if x.has_error_code != (EXC_WITH_ERROR_CODE & (1 << x.vector) != 0) {
                return Err(bad(
                    "events.exception.has_error_code",
                    u64::from(x.has_error_code),
                    "does not match the exception vector",
                ));
            }
        }
        let i = &e.interrupt;
        if i.soft {
            return Err(bad("events.interrupt.soft", 1, "KVM never reports one"));
        }
        if i.shadow & !3 != 0 {
            return Err(bad(
                "events.interrupt.shadow",
                u64::from(i.shadow),
                "only MOV SS (1) and STI (2)",
            ));
        }
        let injected = u8::from(x.injected) + u8::from(i.injected) + u8::from(e.nmi.injected);
        if injected > 1 {
            return Err(bad(
                "events",
                u64::from(injected),
                "more than one of exception, interrupt and NMI being injected",
            ));
        }
        if e.nmi.pending > 2 {
            return Err(bad(
                "events.nmi.pending",
                u64::from(e.nmi.pending),
                "KVM queues at most 2 NMIs",
            ));
        }
        let smi = &e.smi;
        if smi.smm || smi.pending || smi.smm_inside_nmi || smi.latched_init {
            return Err(bad("events.smi", 1, "this VMM has no SMM"));
        }
        if e.triple_fault_pending {
            return Err(bad(
                "events.triple_fault_pending",
                1,
                "needs KVM_CAP_X86_TRIPLE_FAULT_EVENT, which this VMM does not enable",
            ));
        }
        Ok(())
    }

    fn validate_msrs(&self) -> Result<(), StateError> {
        let mut seen = vec![false; MSRS.len()];
        for m in &self.msrs {
            let Some((pos, spec)) = msr_spec(m.index) else {
                let lapic = m.index == MSR_IA32_APIC_BASE
                    || m.index == MSR_IA32_TSC_DEADLINE
                    || (0x800..=0x8ff).contains(&m.index);
                return Err(if lapic {
                    StateError::MsrOfLapic(m.index)
                } else {
                    StateError::MsrNotAllowed(m.index)
                });
            };
            if std::mem::replace(&mut seen[pos], true) {
                return Err(StateError::MsrDuplicate(m.index));
            }
            check_msr_value(spec, m.value)?;
        }
        if let Some((_, spec)) = MSRS
            .iter()
            .zip(&seen)
            .map(|(s, seen)| (seen, s))
            .find(|(seen, s)| s.required && !**seen)
        {
            return Err(StateError::MsrMissing {
                index: spec.index,
                name: spec.name,
            });
        }
        Ok(())
    }
}

fn validate_segment(name: &str, seg: &Segment, long: bool) -> Result<(), StateError> {
    let field = |f: &str| format!("sregs.{name}.{f}");
    if seg.seg_type > 15 {
        return Err(bad(field("seg_type"), u64::from(seg.seg_type), "above 15"));
    }
    if seg.dpl > 3 {
        return Err(bad(field("dpl"), u64::from(seg.dpl), "above 3"));
    }
    // Bases: FS, GS, TR, LDTR are canonical whether usable or not (MSR-written bases).
    if matches!(name, "fs" | "gs" | "tr" | "ldt") && !canonical(seg.base) {
        return Err(bad(field("base"), seg.base, "not canonical"));
    }
    if seg.unusable || !seg.present {
        return Ok(());
    }
    if matches!(name, "cs" | "ss" | "ds" | "es") && seg.base >> 32 != 0 {
        return Err(bad(field("base"), seg.base, "bits 32-63 set"));
    }
    let limit = u64::from(seg.limit);
    if seg.limit & 0xfff != 0xfff && seg.g {
        return Err(bad(
            field("limit"),
            limit,
            "4 KiB granularity with a byte limit",
        ));
    }
    if seg.limit > 0xf_ffff && !seg.g {
        return Err(bad(
            field("limit"),
            limit,
            "above 1 MiB without 4 KiB granularity",
        ));
    }
    let t = seg.seg_type;
    let code = t & 8 != 0;
    let (ok, why) = match name {
        "cs" => (seg.s && code, "must be a code segment"),
        "ss" => (
            seg.s && !code && t & 2 != 0,
            "must be a writable data segment",
        ),
        "tr" => (
            !seg.s && (t == 11 || (t == 3 && !long)),
            "must be a busy TSS (a 16-bit one only outside long mode)",
        ),
        "ldt" => (!seg.s && t == 2, "must be an LDT descriptor"),
        _ => (
            seg.s && (!code || t & 2 != 0),
            "must be a data or readable code segment",
        ),
    };
    if !ok {
        return Err(bad(field("seg_type"), u64::from(t), why));
    }
    if name == "cs" && long && seg.l && seg.db {
        return Err(bad(field("db"), 1, "L and D/B both set"));
    }
    if matches!(name, "tr" | "ldt") && seg.selector & 4 != 0 {
        return Err(bad(
            field("selector"),
            u64::from(seg.selector),
            "must select from the GDT",
        ));
    }
    Ok(())
}

fn check_msr_value(spec: &MsrSpec, v: u64) -> Result<(), StateError> {
    use MsrCheck::*;
    const PAT_TYPES: u8 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7);
    const MTRR_TYPES: u8 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6);
    let types_ok =
        |allowed: u8, bytes: &[u8]| bytes.iter().all(|b| *b < 8 && allowed & (1 << b) != 0);
    let ok = match spec.check {
        Any => true,
        Canonical => canonical(v),
        Low32 => v >> 32 == 0,
        Pat => types_ok(PAT_TYPES, &v.to_le_bytes()),
        MtrrDefType => v & !0xcff == 0 && types_ok(MTRR_TYPES, &[v as u8]),
        MtrrFixed => types_ok(MTRR_TYPES, &v.to_le_bytes()),
        MtrrPhysBase => v >> 52 == 0 && v & 0xf00 == 0 && types_ok(MTRR_TYPES, &[v as u8]),
        MtrrPhysMask => v >> 52 == 0 && v & 0x7ff == 0,
        GuestPhys => v >> 52 == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(bad(
            format_args!("msrs[{:#x}] ({})", spec.index, spec.name),
            v,
            "invalid value",
        ))
    }
}

// Conversions to and from the KVM structures.

impl From<&kvm_regs> for Regs {
    fn from(r: &kvm_regs) -> Regs {
        Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl Regs {
    /// The KVM structure.
    pub fn to_kvm(&self) -> kvm_regs {
        kvm_regs {
            rax: self.rax,
            rbx: self.rbx,
            rcx: self.rcx,
            rdx: self.rdx,
            rsi: self.rsi,
            rdi: self.rdi,
            rsp: self.rsp,
            rbp: self.rbp,
            r8: self.r8,
            r9: self.r9,
            r10: self.r10,
            r11: self.r11,
            r12: self.r12,
            r13: self.r13,
            r14: self.r14,
            r15: self.r15,
            rip: self.rip,
            rflags: self.rflags,
        }
    }
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Segment {
        Segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            seg_type: s.type_,
            present: s.present != 0,
            dpl: s.dpl,
            db: s.db != 0,
            s: s.s != 0,
            l: s.l != 0,
            g: s.g != 0,
            avl: s.avl != 0,
            unusable: s.unusable != 0,
        }
    }
}

impl Segment {
    /// The KVM structure.
    pub fn to_kvm(&self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.seg_type,
            present: u8::from(self.present),
            dpl: self.dpl,
            db: u8::from(self.db),
            s: u8::from(self.s),
            l: u8::from(self.l),
            g: u8::from(self.g),
            avl: u8::from(self.avl),
            unusable: u8::from(self.unusable),
            padding: 0,
        }
    }
}

impl From<&kvm_sregs> for Sregs {
    fn from(s: &kvm_sregs) -> Sregs {
        let dt = |t: &kvm_dtable| DescriptorTable {
            base: t.base,
            limit: t.limit,
        };
        Sregs {
            cs: (&s.cs).into(),
            ds: (&s.ds).into(),
            es: (&s.es).into(),
            fs: (&s.fs).into(),
            gs: (&s.gs).into(),
            ss: (&s.ss).into(),
            tr: (&s.tr).into(),
            ldt: (&s.ldt).into(),
            gdt: dt(&s.gdt),
            idt: dt(&s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl Sregs {
    /// The KVM structure.
    pub fn to_kvm(&self) -> kvm_sregs {
        let dt = |t: &DescriptorTable| kvm_dtable {
            base: t.base,
            limit: t.limit,
            padding: [0; 3],
        };
        kvm_sregs {
            cs: self.cs.to_kvm(),
            ds: self.ds.to_kvm(),
            es: self.es.to_kvm(),
            fs: self.fs.to_kvm(),
            gs: self.gs.to_kvm(),
            ss: self.ss.to_kvm(),
            tr: self.tr.to_kvm(),
            ldt: self.ldt.to_kvm(),
            gdt: dt(&self.gdt),
            idt: dt(&self.idt),
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
            interrupt_bitmap: self.interrupt_bitmap,
        }
    }
}

impl From<&kvm_vcpu_events> for VcpuEvents {
    fn from(e: &kvm_vcpu_events) -> VcpuEvents {
        let payload = e.flags & KVM_VCPUEVENT_VALID_PAYLOAD != 0;
        let smm = e.flags & KVM_VCPUEVENT_VALID_SMM != 0;
        VcpuEvents {
            exception: ExceptionEvent {
                injected: e.exception.injected != 0,
                pending: payload && e.exception.pending != 0,
                vector: e.exception.nr,
                has_error_code: e.exception.has_error_code != 0,
                error_code: e.exception.error_code,
                has_payload: payload && e.exception_has_payload != 0,
                payload: if payload { e.exception_payload } else { 0 },
            },
            interrupt: InterruptEvent {
                injected: e.interrupt.injected != 0,
                vector: e.interrupt.nr,
                soft: e.interrupt.soft != 0,
                shadow: if e.flags & KVM_VCPUEVENT_VALID_SHADOW != 0 {
                    e.interrupt.shadow
                } else {
                    0
                },
            },
            nmi: NmiEvent {
                injected: e.nmi.injected != 0,
                pending: if e.flags & KVM_VCPUEVENT_VALID_NMI_PENDING != 0 {
                    e.nmi.pending
                } else {
                    0
                },
                masked: e.nmi.masked != 0,
            },
            smi: SmiEvent {
                smm: smm && e.smi.smm != 0,
                pending: smm && e.smi.pending != 0,
                smm_inside_nmi: smm && e.smi.smm_inside_nmi != 0,
                latched_init: smm && e.smi.latched_init != 0,
            },
            triple_fault_pending: e.flags & KVM_VCPUEVENT_VALID_TRIPLE_FAULT != 0
                && e.triple_fault.pending != 0,
        }
    }
}

impl VcpuEvents {
    /// The KVM structure, for a validated state (no payload, SMM or triple fault: their flags
    /// stay clear, so KVM leaves those parts of the fresh vCPU alone).
    pub fn to_kvm(&self) -> kvm_vcpu_events {
        let mut e = kvm_vcpu_events {
            flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
            ..Default::default()
        };
        e.exception.injected = u8::from(self.exception.injected);
        e.exception.nr = self.exception.vector;
        e.exception.has_error_code = u8::from(self.exception.has_error_code);
        e.exception.error_code = self.exception.error_code;
        e.interrupt.injected = u8::from(self.interrupt.injected);
        e.interrupt.nr = self.interrupt.vector;
        e.interrupt.soft = u8::from(self.interrupt.soft);
        e.interrupt.shadow = self.interrupt.shadow;
        e.nmi.injected = u8::from(self.nmi.injected);
        e.nmi.pending = self.nmi.pending;
        e.nmi.masked = u8::from(self.nmi.masked);
        e
    }
}

fn xsave_to_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn xsave_from_bytes(b: &[u8]) -> kvm_xsave {
    let mut x = kvm_xsave::default();
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    x
}

/// Reads every MSR of [`MSRS`] that KVM knows: `KVM_GET_MSRS` stops at the first MSR it
/// cannot read, which is skipped unless required.
fn save_msrs(fd: &VcpuFd) -> Result<Vec<Msr>, Error> {
    let mut todo: &[MsrSpec] = MSRS;
    let mut out = Vec::with_capacity(MSRS.len());
    while !todo.is_empty() {
        let entries: Vec<kvm_msr_entry> = todo
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(Error::Fam)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::Kvm("GET_MSRS", e))?
            .min(todo.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| Msr {
            index: e.index,
            value: e.data,
        }));
        let Some(refused) = todo.get(n) else { break };
        if refused.required {
            return Err(Error::MsrRefused {
                op: "read",
                index: refused.index,
                name: refused.name,
            });
        }
        log::debug!(
            "MSR {:#x} ({}) not saved: KVM cannot read it",
            refused.index,
            refused.name
        );
        todo = &todo[n + 1..];
    }
    Ok(out)
}

/// Finishes the operation of the last exit without running guest code: after an I/O or MMIO
/// exit (and a few others) KVM completes the instruction only at the next `KVM_RUN`, and that
/// pending work is in no state KVM reports (`Documentation/virt/kvm/api.rst`, "KVM_RUN"). So a
/// vCPU whose last exit was one of those must go through this before [`save`]. It runs
/// `KVM_RUN` with `immediate_exit` set, which returns `EINTR` once the operation is complete,
/// and clears `immediate_exit` again (call it on a pausing vCPU: a kick arriving meanwhile
/// is lost). If KVM exits again instead (a string I/O instruction with more to do), the exit
/// must be handled and this called again.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), Error> {
    fd.set_kvm_immediate_exit(1);
    let r = fd.run().map(|exit| format!("{exit:?}"));
    fd.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(Error::Kvm("RUN (immediate exit)", e)),
        Ok(exit) => Err(Error::PendingExit(exit)),
    }
}

/// Saves the KVM state of a vCPU that is not running (called on its own thread between two
/// `KVM_RUN`s, or while the VM is paused) and whose last exit is complete (see
/// [`complete_pending_io`]).
pub fn save(fd: &VcpuFd) -> Result<VcpuState, Error> {
    let mp = fd
        .get_mp_state()
        .map_err(|e| Error::Kvm("GET_MP_STATE", e))?;
    let mp_state = MpState::from_kvm(mp.mp_state).ok_or(Error::UnknownMpState(mp.mp_state))?;
    let regs = fd.get_regs().map_err(|e| Error::Kvm("GET_REGS", e))?;
    let sregs = fd.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
    // KVM_GET_XSAVE fails (EINVAL) rather than truncate a larger area.
    let xsave = fd.get_xsave().map_err(|e| Error::Kvm("GET_XSAVE", e))?;
    let xcrs = fd.get_xcrs().map_err(|e| Error::Kvm("GET_XCRS", e))?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    let xcr0 = xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map(|x| x.value)
        .ok_or(Error::NoXcr0)?;
    let dr = fd
        .get_debug_regs()
        .map_err(|e| Error::Kvm("GET_DEBUGREGS", e))?;
    let msrs = save_msrs(fd)?;
    let events = fd
        .get_vcpu_events()
        .map_err(|e| Error::Kvm("GET_VCPU_EVENTS", e))?;
    Ok(VcpuState {
        regs: (&regs).into(),
        sregs: (&sregs).into(),
        xsave: xsave_to_bytes(&xsave),
        xcr0,
        debug_regs: DebugRegs {
            db: dr.db,
            dr6: dr.dr6,
            dr7: dr.dr7,
        },
        events: (&events).into(),
        mp_state,
        msrs,
    })
}

/// Validates `state` and loads it into `fd`, a vCPU whose CPUID is set and which has not run
/// (or whose state may be overwritten), in the order of the module documentation. Nothing is
/// written if the state is invalid; a KVM failure later leaves the vCPU partly restored.
pub fn restore(fd: &VcpuFd, state: &VcpuState, limits: &RestoreLimits) -> Result<(), Error> {
    state.validate(limits)?;
    if limits.kvm_xsave_size > XSAVE_SIZE {
        return Err(Error::XsaveTooLarge(limits.kvm_xsave_size));
    }
    let mut msrs: Vec<(usize, &Msr)> = state
        .msrs
        .iter()
        .map(|m| (msr_spec(m.index).map_or(usize::MAX, |(pos, _)| pos), m))
        .collect();
    msrs.sort_by_key(|(pos, _)| *pos);
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|(_, m)| kvm_msr_entry {
            index: m.index,
            data: m.value,
            ..Default::default()
        })
        .collect();
    let kvm_msrs = Msrs::from_entries(&entries).map_err(Error::Fam)?;

    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state.to_kvm(),
    })
    .map_err(|e| Error::Kvm("SET_MP_STATE", e))?;
    fd.set_regs(&state.regs.to_kvm())
        .map_err(|e| Error::Kvm("SET_REGS", e))?;
    fd.set_sregs(&state.sregs.to_kvm())
        .map_err(|e| Error::Kvm("SET_SREGS", e))?;
    let xsave = xsave_from_bytes(&state.xsave);
    // SAFETY: KVM_SET_XSAVE reads KVM_CAP_XSAVE2 bytes, checked above to be the 4096 of
    // `kvm_xsave` (no XSTATE feature is enabled dynamically in this process).
    unsafe { fd.set_xsave(&xsave) }.map_err(|e| Error::Kvm("SET_XSAVE", e))?;
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: 0,
        reserved: 0,
        value: state.xcr0,
    };
    fd.set_xcrs(&xcrs).map_err(|e| Error::Kvm("SET_XCRS", e))?;
    let d = &state.debug_regs;
    fd.set_debug_regs(&kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        ..Default::default()
    })
    .map_err(|e| Error::Kvm("SET_DEBUGREGS", e))?;
    let n = fd
        .set_msrs(&kvm_msrs)
        .map_err(|e| Error::Kvm("SET_MSRS", e))?;
    if let Some(e) = entries.get(n) {
        return Err(Error::MsrRefused {
            op: "write",
            index: e.index,
            name: msr_spec(e.index).map_or("?", |(_, s)| s.name),
        });
    }
    fd.set_vcpu_events(&state.events.to_kvm())
        .map_err(|e| Error::Kvm("SET_VCPU_EVENTS", e))?;
    let kvmclock = state.msrs.iter().any(|m| {
        (m.index == MSR_KVM_SYSTEM_TIME_NEW || m.index == MSR_KVM_SYSTEM_TIME) && m.value & 1 != 0
    });
    if kvmclock {
        if let Err(e) = fd.kvmclock_ctrl() {
            log::warn!("KVM_KVMCLOCK_CTRL after restore: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RestoreLimits = RestoreLimits {
        supported_xcr0: 0xe7,
        kvm_xsave_size: XSAVE_SIZE,
    };

    fn seg(selector: u16, seg_type: u8, l: bool, db: bool) -> Segment {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            seg_type,
            present: true,
            dpl: 0,
            db,
            s: true,
            l,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    fn null_seg() -> Segment {
        Segment {
            unusable: true,
            present: false,
            ..Default::default()
        }
    }

    /// A plausible state of a 64-bit Linux kernel.
    fn sample() -> VcpuState {
        let mut xsave = vec![0u8; XSAVE_SIZE];
        xsave[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        xsave[XSAVE_XSTATE_BV..XSAVE_XSTATE_BV + 8].copy_from_slice(&0xe7u64.to_le_bytes());
        let msrs = MSRS
            .iter()
            .filter(|m| m.required)
            .map(|m| Msr {
                index: m.index,
                value: match m.index {
                    0x277 => 0x0007_0406_0007_0406,
                    0xc000_0082 => 0xffff_ffff_8160_0000,
                    0x10 => 123_456_789,
                    _ => 0,
                },
            })
            .chain([Msr {
                index: MSR_KVM_SYSTEM_TIME_NEW,
                value: 0x1_2345_6001,
            }])
            .collect();
        VcpuState {
            regs: Regs {
                rip: 0xffff_ffff_8100_0000,
                rsp: 0xffff_c900_0000_3f00,
                rflags: 0x246,
                ..Default::default()
            },
            sregs: Sregs {
                cs: seg(0x10, 11, true, false),
                ss: seg(0x18, 3, false, true),
                ds: null_seg(),
                es: null_seg(),
                fs: null_seg(),
                gs: Segment {
                    base: 0xffff_8880_3fc0_0000,
                    ..null_seg()
                },
                tr: Segment {
                    base: 0xffff_fe00_0000_3000,
                    limit: 0x4087,
                    selector: 0x40,
                    seg_type: 11,
                    present: true,
                    ..Default::default()
                },
                ldt: null_seg(),
                gdt: DescriptorTable {
                    base: 0xffff_fe00_0000_1000,
                    limit: 0x7f,
                },
                idt: DescriptorTable {
                    base: 0xffff_fe00_0000_0000,
                    limit: 0xfff,
                },
                cr0: 0x8005_0033,
                cr2: 0,
                cr3: 0x0260_a000,
                cr4: 0x0035_06f0,
                cr8: 0,
                efer: 0xd01,
                apic_base: 0xfee0_0900,
                interrupt_bitmap: [0; 4],
            },
            xsave,
            xcr0: 0xe7,
            debug_regs: DebugRegs {
                db: [0; 4],
                dr6: 0xffff_0ff0,
                dr7: 0x400,
            },
            events: VcpuEvents::default(),
            mp_state: MpState::Runnable,
            msrs,
        }
    }

    /// `change` makes the sample invalid: validation fails with a message containing `what`.
    fn rejects(what: &str, change: impl FnOnce(&mut VcpuState)) {
        let mut s = sample();
        change(&mut s);
        match s.validate(&LIMITS) {
            Ok(()) => panic!("accepted a state with a bad {what}"),
            Err(e) => assert!(e.to_string().contains(what), "{what}: got {e}"),
        }
    }

    #[test]
    fn sample_is_valid() {
        sample().validate(&LIMITS).unwrap();
    }

    #[test]
    fn serde_json_round_trip() {
        let mut s = sample();
        s.events.interrupt = InterruptEvent {
            injected: true,
            vector: 0xec,
            soft: false,
            shadow: 1,
        };
        s.sregs.interrupt_bitmap[3] = 1 << (0xec - 192);
        s.xsave[600] = 0x5a;
        let json = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        back.validate(&LIMITS).unwrap();
    }

    #[test]
    fn serde_rejects_unknown_mp_state() {
        let json = serde_json::to_string(&sample())
            .unwrap()
            .replace("\"Runnable\"", "\"Stopped\"");
        assert!(serde_json::from_str::<VcpuState>(&json).is_err());
    }

    #[test]
    fn rejects_bad_rflags_and_rip() {
        rejects("regs.rflags", |s| s.regs.rflags = 0x200);
        rejects("regs.rflags", |s| s.regs.rflags = 0x202 | (1 << 3));
        rejects("regs.rflags", |s| s.regs.rflags = 0x202 | (1 << 40));
        rejects("regs.rflags", |s| s.regs.rflags = 0x202 | RFLAGS_VM);
        rejects("regs.rip", |s| s.regs.rip = 0x0100_0000_0000_0000);
        rejects("regs.rip", |s| {
            s.sregs.cs.l = false;
            s.sregs.cs.db = true;
            s.regs.rip = 0x1_0000_0000;
        });
    }

    #[test]
    fn rejects_bad_control_registers() {
        rejects("sregs.cr0", |s| s.sregs.cr0 = 0x8000_0000);
        rejects("sregs.cr0", |s| s.sregs.cr0 |= 1 << 40);
        rejects("sregs.cr0", |s| s.sregs.cr0 |= 1 << 7);
        rejects("sregs.cr0", |s| s.sregs.cr0 |= CR0_NW);
        rejects("sregs.cr4", |s| s.sregs.cr4 &= !CR4_PAE);
        rejects("sregs.cr4", |s| s.sregs.cr4 |= 1 << 13); // VMXE
        rejects("sregs.cr4", |s| s.sregs.cr4 |= 1 << 40);
        rejects("sregs.efer", |s| s.sregs.efer &= !EFER_LMA);
        rejects("sregs.efer", |s| s.sregs.efer |= 1 << 12); // SVME
        rejects("sregs.efer", |s| {
            s.sregs.cr0 &= !CR0_PG;
        });
        rejects("sregs.cr3", |s| s.sregs.cr3 |= 1 << 63);
        rejects("sregs.cr8", |s| s.sregs.cr8 = 16);
        rejects("sregs.apic_base", |s| s.sregs.apic_base |= 1);
        rejects("sregs.apic_base", |s| s.sregs.apic_base = 0xfee0_0400);
    }

    #[test]
    fn cet_needs_wp() {
        rejects("sregs.cr4", |s| {
            s.sregs.cr4 |= CR4_CET;
            s.sregs.cr0 &= !CR0_WP;
        });
    }

    #[test]
    fn rejects_bad_segments() {
        rejects("sregs.cs.seg_type", |s| s.sregs.cs.seg_type = 3);
        rejects("sregs.cs.seg_type", |s| s.sregs.cs.seg_type = 16);
        rejects("sregs.cs.dpl", |s| s.sregs.cs.dpl = 4);
        rejects("sregs.cs.db", |s| s.sregs.cs.db = true);
        rejects("sregs.ss.seg_type", |s| s.sregs.ss.seg_type = 1);
        rejects("sregs.ds.seg_type", |s| {
            s.sregs.ds = seg(0x18, 8, false, true); // execute-only code
        });
        rejects("sregs.ss.limit", |s| s.sregs.ss.limit = 0xffff_f000);
        rejects("sregs.ss.limit", |s| s.sregs.ss.g = false);
        rejects("sregs.ss.base", |s| s.sregs.ss.base = 1 << 32);
        rejects("sregs.gs.base", |s| s.sregs.gs.base = 1 << 60);
        rejects("sregs.tr.seg_type", |s| s.sregs.tr.seg_type = 9);
        rejects("sregs.tr.selector", |s| s.sregs.tr.selector = 0x44);
        rejects("sregs.ldt.seg_type", |s| {
            s.sregs.ldt = Segment {
                seg_type: 3,
                present: true,
                limit: 0xff,
                ..Default::default()
            };
        });
        rejects("sregs.cs.l", |s| {
            s.sregs.efer = 0;
            s.sregs.cr0 = 0x11;
            s.sregs.cr4 = 0;
        });
        rejects("sregs.idt.base", |s| {
            s.sregs.idt.base = 0x0100_0000_0000_0000
        });
    }

    #[test]
    fn rejects_bad_interrupt_bitmap() {
        rejects("sregs.interrupt_bitmap", |s| {
            s.sregs.interrupt_bitmap[1] = 1
        });
        rejects("sregs.interrupt_bitmap", |s| {
            s.events.interrupt.injected = true;
            s.events.interrupt.vector = 0x30;
        });
        rejects("sregs.interrupt_bitmap", |s| {
            s.events.interrupt.injected = true;
            s.events.interrupt.vector = 0x30;
            s.sregs.interrupt_bitmap[0] = (1 << 0x30) | 1;
        });
    }

    #[test]
    fn rejects_bad_xsave_and_xcr0() {
        rejects("xsave: 4095 bytes", |s| s.xsave.truncate(4095));
        rejects("xsave: 4100 bytes", |s| s.xsave.resize(4100, 0));
        rejects("xcr0", |s| s.xcr0 = 0x6);
        rejects("xcr0", |s| s.xcr0 = 0x5);
        rejects("xcr0", |s| s.xcr0 = 0x67); // AVX-512 without Hi16_ZMM
        rejects("xcr0", |s| s.xcr0 = 0xe3); // AVX-512 without AVX
        rejects("xcr0", |s| s.xcr0 = 0x0b); // half of MPX
        rejects("xcr0", |s| s.xcr0 = 0x7 | (1 << 17)); // half of AMX
        rejects("xcr0", |s| s.xcr0 = 0x7 | (3 << 17)); // not supported here
        rejects("xcr0", |s| s.xcr0 = 0x2e7); // PKRU, not supported here
        rejects("xsave.xstate_bv", |s| s.xsave[XSAVE_XSTATE_BV + 2] = 0x06);
        rejects("xsave.xcomp_bv", |s| s.xsave[XSAVE_XCOMP_BV + 7] = 0x80);
        rejects("xsave[540]", |s| s.xsave[540] = 1);
        rejects("xsave.mxcsr", |s| s.xsave[XSAVE_MXCSR + 2] = 1);
    }

    #[test]
    fn rejects_bad_debug_regs() {
        rejects("debug_regs.db[2]", |s| {
            s.debug_regs.db[2] = 0x0100_0000_0000_0000
        });
        rejects("debug_regs.dr6", |s| s.debug_regs.dr6 |= 1 << 32);
        rejects("debug_regs.dr7", |s| s.debug_regs.dr7 |= 1 << 40);
    }

    #[test]
    fn rejects_bad_events() {
        rejects("events.exception.vector", |s| {
            s.events.exception.injected = true;
            s.events.exception.vector = 32;
        });
        rejects("events.exception.vector", |s| {
            s.events.exception.injected = true;
            s.events.exception.vector = NMI_VECTOR;
        });
        rejects("events.exception.has_error_code", |s| {
            s.events.exception.injected = true;
            s.events.exception.vector = 6; // #UD
            s.events.exception.has_error_code = true;
        });
        rejects("events.exception.has_error_code", |s| {
            s.events.exception.injected = true;
            s.events.exception.vector = 14; // #PF
        });
        rejects("events.exception.pending", |s| {
            s.events.exception.pending = true
        });
        rejects("events.exception.has_payload", |s| {
            s.events.exception.has_payload = true
        });
        rejects("events.interrupt.soft", |s| s.events.interrupt.soft = true);
        rejects("events.interrupt.shadow", |s| s.events.interrupt.shadow = 4);
        rejects("more than one", |s| {
            s.events.exception.injected = true;
            s.events.exception.vector = 13;
            s.events.exception.has_error_code = true;
            s.events.nmi.injected = true;
        });
        rejects("events.nmi.pending", |s| s.events.nmi.pending = 3);
        rejects("events.smi", |s| s.events.smi.smm = true);
        rejects("events.smi", |s| s.events.smi.latched_init = true);
        rejects("events.triple_fault_pending", |s| {
            s.events.triple_fault_pending = true
        });
        rejects("mp_state", |s| s.mp_state = MpState::Halted);
    }

    #[test]
    fn accepts_valid_events() {
        let mut s = sample();
        s.events.exception.injected = true;
        s.events.exception.vector = 14;
        s.events.exception.has_error_code = true;
        s.events.exception.error_code = 2;
        s.events.nmi.pending = 2;
        s.events.nmi.masked = true;
        s.events.interrupt.shadow = 2;
        s.validate(&LIMITS).unwrap();
    }

    #[test]
    fn rejects_bad_msrs() {
        let lapic = [MSR_IA32_TSC_DEADLINE, MSR_IA32_APIC_BASE, 0x80b, 0x838];
        for index in lapic {
            let mut s = sample();
            s.msrs.push(Msr { index, value: 0 });
            assert_eq!(s.validate(&LIMITS), Err(StateError::MsrOfLapic(index)));
        }
        // EFER (in sregs), an MSR filter range, microcode, SMBASE, an unknown one.
        for index in [0xc000_0080, 0xc000_0100, 0x79, 0x9e, 0x4000_0000, 0xdead] {
            let mut s = sample();
            s.msrs.push(Msr { index, value: 0 });
            assert_eq!(s.validate(&LIMITS), Err(StateError::MsrNotAllowed(index)));
        }
        let mut s = sample();
        s.msrs.push(s.msrs[3]);
        assert_eq!(
            s.validate(&LIMITS),
            Err(StateError::MsrDuplicate(s.msrs[3].index))
        );
        let mut s = sample();
        s.msrs.retain(|m| m.index != MSR_IA32_TSC);
        assert!(matches!(
            s.validate(&LIMITS),
            Err(StateError::MsrMissing {
                index: MSR_IA32_TSC,
                ..
            })
        ));
        let set = |index: u32, value: u64| {
            move |s: &mut VcpuState| match s.msrs.iter_mut().find(|m| m.index == index) {
                Some(m) => m.value = value,
                None => s.msrs.push(Msr { index, value }),
            }
        };
        rejects(
            "msrs[0xc0000082] (LSTAR)",
            set(0xc000_0082, 0x0100_0000_0000_0000),
        );
        rejects("msrs[0x277] (IA32_PAT)", set(0x277, 0x0007_0406_0007_0403));
        rejects("msrs[0xc0000103]", set(0xc000_0103, 1 << 32));
        rejects("msrs[0x2ff]", set(0x2ff, 0x1006));
        rejects("msrs[0x2ff]", set(0x2ff, 0x802));
        rejects("msrs[0x250]", set(0x250, 0x0606_0606_0606_0607));
        rejects("msrs[0x200]", set(0x200, 0x106));
        rejects("msrs[0x201]", set(0x201, 0x801));
        rejects("msrs[0x4b564d01]", set(MSR_KVM_SYSTEM_TIME_NEW, 1 << 60));
        // Optional MSRs with good values are fine.
        let mut s = sample();
        set(0x2ff, 0xc06)(&mut s);
        set(0x200, 0x8000_0006)(&mut s);
        set(0x201, 0xf_8000_0800)(&mut s);
        set(0x3b, u64::MAX)(&mut s);
        s.validate(&LIMITS).unwrap();
    }

    #[test]
    fn msr_table_is_consistent() {
        for (i, m) in MSRS.iter().enumerate() {
            assert_eq!(msr_spec(m.index).unwrap().0, i, "{} listed twice", m.name);
            assert_ne!(m.index, MSR_IA32_TSC_DEADLINE);
            assert_ne!(m.index, MSR_IA32_APIC_BASE);
        }
        assert_eq!(MSRS[0].index, MSR_IA32_TSC, "the TSC is restored first");
    }

    #[test]
    fn canonical_forms() {
        assert!(canonical(0));
        assert!(canonical(0x0000_7fff_ffff_ffff));
        assert!(canonical(0xffff_8000_0000_0000));
        assert!(canonical(0x00ff_ffff_ffff_ffff));
        assert!(!canonical(0x0100_0000_0000_0000));
        assert!(!canonical(0x8000_0000_0000_0000));
    }

    #[test]
    fn conversions_round_trip() {
        let s = sample();
        assert_eq!(Regs::from(&s.regs.to_kvm()), s.regs);
        assert_eq!(Sregs::from(&s.sregs.to_kvm()), s.sregs);
        let mut ev = VcpuEvents::default();
        ev.exception.injected = true;
        ev.exception.vector = 13;
        ev.exception.has_error_code = true;
        ev.exception.error_code = 0x18;
        ev.nmi.pending = 1;
        ev.nmi.masked = true;
        ev.interrupt.shadow = 3;
        assert_eq!(VcpuEvents::from(&ev.to_kvm()), ev);
        assert_eq!(xsave_to_bytes(&xsave_from_bytes(&s.xsave)), s.xsave);
    }
}
