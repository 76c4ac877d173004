//! ACPI tables for a hardware-reduced ACPI machine: RSDP, XSDT, FADT, DSDT and MADT.
//!
//! The MADT lists one local APIC per vCPU of the whole (possibly multi-host) machine and the
//! IOAPIC; the FADT points at a sleep control register on an I/O port, so a guest `poweroff`
//! becomes a write the VMM turns into a clean exit. Tables are written at
//! [`ACPI_START`](crate::layout::ACPI_START), where the kernel also looks for the RSDP.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR,
};

/// Errors while writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(usize),
    /// Guest memory write failed.
    #[error("cannot write ACPI tables into guest memory")]
    GuestWrite,
}

/// SLP_TYP value the DSDT's `\_S5_` object announces; the guest writes it back on poweroff.
pub const S5_SLP_TYP: u8 = 5;
/// SLP_EN bit in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;

const OEM_ID: &[u8; 6] = b"SSIVMM";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table under construction.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(sig: &[u8; 4], revision: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(sig);
        v.extend_from_slice(&[0; 4]); // length, patched in finish()
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(b"SSIVMM  ");
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(b"SSIV");
        v.extend_from_slice(&1u32.to_le_bytes());
        Sdt(v)
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// Generic address structure for a one-byte I/O port register.
fn gas_io8(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut body = [0u8; 276 - 36];
    let at = |off: usize| off - 36;
    body[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: no VGA, no MSI, no CMOS RTC; no legacy devices and no 8042 advertised.
    let boot_arch: u16 = (1 << 2) | (1 << 3) | (1 << 5);
    body[at(109)..at(111)].copy_from_slice(&boot_arch.to_le_bytes());
    // Flags: WBINVD, power and sleep buttons absent, HW_REDUCED_ACPI.
    let flags: u32 = 1 | (1 << 4) | (1 << 5) | (1 << 20);
    body[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    body[at(131)] = 5; // FADT minor version
    body[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    body[at(244)..at(256)].copy_from_slice(&gas_io8(ACPI_SLEEP_CONTROL_PORT));
    body[at(256)..at(268)].copy_from_slice(&gas_io8(ACPI_SLEEP_STATUS_PORT));
    body[at(268)..at(276)].copy_from_slice(b"SSI-VMM\0");
    let mut t = Sdt::new(b"FACP", 6);
    t.bytes(&body);
    t.finish()
}

/// A virtio-mmio device to describe in the DSDT: window base and GSI.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    /// Base of the 4 KiB register window.
    pub base: u64,
    /// IOAPIC input (GSI).
    pub gsi: u32,
}

fn dsdt(virtio: &[MmioDevice]) -> Vec<u8> {
    use super::aml::{self, res};
    // Hardware-reduced ACPI has no legacy PIC: the guest maps only the interrupts that devices
    // announce here, so COM1 and every virtio-mmio window are described with their GSIs.
    let mut devices = vec![aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0501")),
            aml::name("_UID", &aml::integer(0)),
            aml::crs(&[
                res::io(0x3f8, 8),
                res::irq_noflags(crate::layout::SERIAL_IRQ as u8),
            ]),
        ],
    )];
    for (i, d) in virtio.iter().enumerate() {
        devices.push(aml::device(
            &format!("VR{i:02X}"),
            &[
                aml::name("_HID", &aml::string("LNRO0005")),
                aml::name("_UID", &aml::integer(i as u64)),
                aml::crs(&[
                    res::memory32(d.base as u32, crate::layout::VIRTIO_MMIO_SIZE as u32),
                    res::interrupt_edge(d.gsi),
                ]),
            ],
        ));
    }
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&aml::name(
        "_S5_",
        &aml::package(&[aml::integer(u64::from(S5_SLP_TYP)), aml::integer(0)]),
    ));
    t.bytes(&aml::scope_root("_SB_", &devices));
    t.finish()
}

fn madt(apic_ids: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 5);
    t.bytes(&(LAPIC_ADDR as u32).to_le_bytes());
    t.bytes(&1u32.to_le_bytes()); // PCAT_COMPAT: (inert) dual 8259 present
    for (uid, id) in apic_ids.iter().enumerate() {
        // Processor local APIC: type 0, length 8, processor UID, APIC ID, flags = enabled.
        t.bytes(&[0, 8, uid as u8, *id, 1, 0, 0, 0]);
    }
    // IOAPIC: type 1, length 12, id, reserved, address, GSI base 0.
    let ioapic_id = apic_ids.len() as u8;
    t.bytes(&[1, 12, ioapic_id, 0]);
    t.bytes(&(IOAPIC_ADDR as u32).to_le_bytes());
    t.bytes(&0u32.to_le_bytes());
    // Local APIC NMI on LINT1 for all processors: type 4, length 6, UID 0xff, flags, LINT#.
    t.bytes(&[4, 6, 0xff, 0, 0, 1]);
    t.finish()
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Builds all tables for the given APIC IDs (index = ACPI processor UID) and writes them at
/// [`ACPI_START`]. Returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    apic_ids: &[u8],
    virtio: &[MmioDevice],
) -> Result<u64, Error> {
    let align = |x: u64| x.next_multiple_of(16);
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + 36);
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let dsdt_addr = align(fadt_addr + 276);
    let dsdt = dsdt(virtio);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = madt(apic_ids);
    let end = madt_addr + madt.len() as u64;
    if end > BIOS_END {
        return Err(Error::TooLarge((end - ACPI_START) as usize));
    }
    let mut xsdt = Sdt::new(b"XSDT", 1);
    xsdt.bytes(&fadt_addr.to_le_bytes())
        .bytes(&madt_addr.to_le_bytes());
    let tables = [
        (rsdp_addr, rsdp(xsdt_addr)),
        (xsdt_addr, xsdt.finish()),
        (fadt_addr, fadt(dsdt_addr)),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
    ];
    for (addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| Error::GuestWrite)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_checksum_to_zero() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let ids: Vec<u8> = (0..255).collect();
        let rsdp = write_tables(
            &mem,
            &ids,
            &[MmioDevice {
                base: 0xd000_0000,
                gsi: 5,
            }],
        )
        .unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        for t in [fadt(0x1000), dsdt(&[]), madt(&ids)] {
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        }
        assert_eq!(madt(&ids).len(), 44 + 255 * 8 + 12 + 6);
        assert_eq!(fadt(0).len(), 276);
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&sig, b"XSDT");
    }
}
