//! Initial CPU state: CPUID, MSRs, the identity-mapped page tables and GDT of the 64-bit entry,
//! and the boot processor's registers. Application processors start in real mode and are
//! started by the guest with INIT/SIPI through the userspace local APIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Writing page tables or the GDT failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
    /// Building an MSR list failed.
    #[error("cannot build MSR list")]
    Msrs,
}

/// MSR numbers the VMM programs or emulates.
pub mod msr {
    /// Time-stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// APIC base address and enable bit.
    pub const IA32_APICBASE: u32 = 0x1b;
    /// SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// Default memory type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// Local APIC timer deadline in TSC-deadline mode; emulated by the VMM's local APIC.
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// SYSCALL target selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL entry point.
    pub const CSTAR: u32 = 0xc000_0083;
    /// RFLAGS mask applied by SYSCALL.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// FS base.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// GS base.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// Swapped GS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// APIC base MSR enable bit.
pub const APICBASE_ENABLE: u64 = 1 << 11;
/// APIC base MSR boot-processor bit.
pub const APICBASE_BSP: u64 = 1 << 8;

// CPUID leaf 1 ECX bits.
const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_PDCM: u32 = 1 << 15;
const ECX_PCID: u32 = 1 << 17;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_CX16: u32 = 1 << 13;
const EDX_APIC: u32 = 1 << 9;

/// KVM paravirtual features that stay visible: kvmclock (both MSR sets), NOP_IO_DELAY and the
/// stable-clock bit. Everything hypercall based (PV_UNHALT, PV_SEND_IPI, PV_SCHED_YIELD, ...)
/// and everything that needs KVM's in-kernel local APIC (PV_EOI, async PF) is hidden: VMCALL
/// never completes on emulating hosts and the local APIC lives in the VMM.
const KVM_PV_FEATURES_KEPT: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

/// Adjusts KVM's supported CPUID for vCPU `index` with local APIC `apic_id` in a machine of
/// `ncpus` vCPUs.
pub fn patch_cpuid(cpuid: &mut CpuId, apic_id: u8, ncpus: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (u32::from(ncpus) << 16);
                e.ecx &= !(ECX_MONITOR | ECX_VMX | ECX_PDCM | ECX_PCID | ECX_CX16);
                // x2APIC: the userspace local APIC implements the MSR interface.
                e.ecx |= ECX_TSC_DEADLINE | ECX_HYPERVISOR | ECX_X2APIC;
                e.edx |= EDX_APIC | (1 << 28); // APIC, HTT (multiple logical CPUs)
            }
            // Always-running APIC timer, so no PIT is needed to keep time.
            6 => e.eax |= 1 << 2,
            // Architectural PMU: none.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Extended topology: one thread per core, one core per vCPU.
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = 8;
                        e.ebx = u32::from(ncpus);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = u32::from(apic_id);
            }
            0x4000_0001 => e.eax &= KVM_PV_FEATURES_KEPT,
            _ => {}
        }
    }
}

/// Writes the GDT, an empty IDT and identity page tables covering the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let w64 = |v: u64, a: u64, what| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| Error::GuestWrite(what))
    };
    for (i, entry) in gdt().iter().enumerate() {
        w64(*entry, GDT_ADDR + 8 * i as u64, "GDT")?;
    }
    w64(0, IDT_ADDR, "IDT")?;
    // Present, writable, accessed (set up front as Linux does for its own entries: the
    // cluster's page-table detector expects it, see `cluster/shadow.rs`); 2 MiB pages.
    w64(PDPT_ADDR | 0x23, PML4_ADDR, "PML4")?;
    for pd in 0..4u64 {
        w64((PD_ADDR + pd * 0x1000) | 0x23, PDPT_ADDR + pd * 8, "PDPT")?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            w64(phys | 0xa3, PD_ADDR + pd * 0x1000 + i * 8, "page directory")?;
        }
    }
    Ok(())
}

/// GDT of the boot protocol: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18).
fn gdt() -> [u64; 4] {
    [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
}

fn segment(selector: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot processor in 64-bit mode at `entry` with `boot_params` in RSI.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
    let g = gdt();
    let code = segment(0x10, g[2]);
    let data = segment(0x18, g[3]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&g) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| Error::Kvm("SET_REGS", e))
}

/// FPU and MSR state every vCPU starts with.
pub fn setup_fpu_msrs(vcpu: &VcpuFd, bsp: bool) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("SET_FPU", e))?;
    let apicbase = LAPIC_ADDR | APICBASE_ENABLE | if bsp { APICBASE_BSP } else { 0 };
    let entries = [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_MISC_ENABLE, 1),          // fast strings
        (msr::MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs enabled, write-back default
        (msr::IA32_APICBASE, apicbase),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| Error::Msrs)?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("SET_MSRS", e))?;
    if n != list.len() {
        log::warn!(
            "KVM accepted only {n} of {} boot MSRs (first refused: {:#x})",
            list.len(),
            list[n].index
        );
    }
    Ok(())
}

/// Starts an application processor at the SIPI vector (real mode, CS = vector << 8, IP = 0).
pub fn start_ap(vcpu: &VcpuFd, vector: u8) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
    sregs.cs.selector = u16::from(vector) << 8;
    sregs.cs.base = u64::from(vector) << 12;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("SET_SREGS", e))?;
    let mut regs = vcpu.get_regs().map_err(|e| Error::Kvm("GET_REGS", e))?;
    regs.rip = 0;
    vcpu.set_regs(&regs).map_err(|e| Error::Kvm("SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let g = gdt();
        let cs = segment(0x10, g[2]);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
        let ds = segment(0x18, g[3]);
        assert_eq!((ds.l, ds.db, ds.present, ds.type_), (0, 1, 1, 0x3));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(pde, 0xffe0_0000 | 0xa3);
    }
}
