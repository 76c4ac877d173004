//! Guest-physical memory layout of an ssi-vmm machine (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x000e_0000  RSDP + ACPI tables (reserved)
//! 0x0000_0520  IDT (empty)              0x0010_0000  bzImage protected-mode kernel
//! 0x0000_7000  boot_params (zero page)  0x0100_0000  ELF vmlinux (its own physical addresses)
//! 0x0000_8ff0  boot stack top           ...          initrd (top of low RAM, below 2 GiB)
//! 0x0000_9000  PML4                     0xc000_0000  32-bit hole start (no RAM up to 4 GiB)
//! 0x0000_a000  PDPT                     0xd000_0000  virtio-mmio windows, 4 KiB each
//! 0x0000_b000  4 page directories       0xfec0_0000  IOAPIC
//! 0x0002_0000  kernel command line      0xfee0_0000  local APIC (one per vCPU, same address)
//! ```

/// Global descriptor table used for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// An empty interrupt descriptor table; the kernel installs its own at once.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Level-4 page table of the identity map used for the 64-bit entry.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages, 4 GiB identity mapped).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional memory below the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the BIOS area where the ACPI RSDP is searched for.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Start of high memory; the bzImage protected-mode code is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest address an initrd may end at.
pub const INITRD_MAX_END: u64 = 0x8000_0000;
/// RAM below 4 GiB ends here; the rest of RAM continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// virtio-mmio device windows.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC register window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Size of an APIC register window.
pub const APIC_WINDOW: u64 = 0x1000;
/// Smallest guest RAM we accept: kernel, initrd and page structures must fit.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Identity-mapped TSS address KVM needs on Intel hosts (above the IOAPIC, below 4 GiB).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Guest RAM regions for `size` bytes of memory: low RAM up to the 32-bit hole, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, size - MMIO_HOLE_START),
        ]
    }
}

/// IRQ (IOAPIC pin) of the serial port.
pub const SERIAL_IRQ: u32 = 4;
/// IRQs available to virtio-mmio devices, in order.
pub const VIRTIO_IRQS: [u32; 8] = [5, 6, 7, 9, 10, 11, 12, 13];

/// I/O port of the ACPI sleep control register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// I/O port of the ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_regions(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }
}
