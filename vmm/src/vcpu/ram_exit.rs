//! Guest RAM accesses that KVM hands to the VMM as MMIO exits.
//!
//! KVM's instruction emulator (all guest kernel code on a shadow-paging host like this one)
//! reads and writes guest memory with `copy_from_user`/`copy_to_user` on the VMM's mapping.
//! When the page is missing or write-protected there (the DSM keeps it on another host), the
//! copy waits in userfaultfd; a signal to the vCPU thread (a kick: an interrupt, an IPI, a
//! pause, a shadow-table reload) ends that wait early, the copy fails, and KVM then takes the
//! access for MMIO: `KVM_RUN` returns `KVM_EXIT_MMIO` at a RAM address. The VMM answered
//! those as unclaimed MMIO (reads of all-ones, writes dropped), which corrupted guest memory
//! now and then: the guest livelocks seen on 2-host VMs with two vCPUs on one host (more local
//! kicks, more interrupted waits). Here the VMM performs the access on its own mapping instead:
//! the fault this raises in the vCPU thread is resolved by the DSM like any other, and the
//! instruction completes with the right data. A write can land on a page the guest uses as a
//! page table, which KVM's shadow tables did not see (its own writes go through its
//! write-tracking): such a write asks the shadow zapper to drop them, as a DSM discard does.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::cluster::shadow::ShadowZap;

/// Errors of a RAM access made for the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The access is not entirely inside guest RAM.
    #[error("guest RAM access of {len} bytes at {addr:#x}")]
    Access {
        /// Guest-physical address.
        addr: u64,
        /// Length.
        len: usize,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Whether `addr` is guest RAM (then an MMIO exit there is an interrupted RAM access).
pub fn is_ram(mem: &GuestMemoryMmap, addr: u64) -> bool {
    mem.address_in_range(GuestAddress(addr))
}

/// Logs the `n`-th RAM access handed to the VMM (the first ones and then every power of two).
pub fn log_count(vcpu: usize, gpa: u64, n: u64) {
    if n.is_power_of_two() {
        log::info!("vCPU {vcpu}: RAM access at {gpa:#x} handed to the VMM as MMIO ({n} so far)");
    }
}

/// Reads `data.len()` bytes of guest RAM at `addr` for the guest.
pub fn read(mem: &GuestMemoryMmap, addr: u64, data: &mut [u8]) -> Result<(), Error> {
    mem.read_slice(data, GuestAddress(addr))
        .map_err(|source| Error::Access {
            addr,
            len: data.len(),
            source,
        })
}

/// Writes `data` to guest RAM at `addr` for the guest; tells `zap` when the page it changed
/// looks like a page table.
pub fn write(
    mem: &GuestMemoryMmap,
    addr: u64,
    data: &[u8],
    zap: Option<&ShadowZap>,
) -> Result<(), Error> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| Error::Access {
            addr,
            len: data.len(),
            source,
        })?;
    if let Some(z) = zap {
        let last = addr + data.len().saturating_sub(1) as u64;
        // The access is at most 8 bytes: one page, or two across a boundary.
        for page in (addr & !0xfff..=last & !0xfff).step_by(4096) {
            let mut buf = [0u8; 4096];
            if mem.read_slice(&mut buf, GuestAddress(page)).is_ok() {
                z.on_changed_behind_kvm(page, &buf);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_accesses_are_served_and_others_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        assert!(is_ram(&mem, 0x1ffc));
        assert!(!is_ram(&mem, 0x2000));
        assert!(!is_ram(&mem, 0xfee0_0000));
        // Across the page boundary.
        write(&mem, 0xffc, &[1, 2, 3, 4, 5, 6, 7, 8], None).unwrap();
        let mut b = [0u8; 8];
        read(&mem, 0xffc, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Running off the end of RAM is an error, not a panic.
        let e = read(&mem, 0x1ffc, &mut b).unwrap_err();
        assert!(e.to_string().contains("0x1ffc"), "{e}");
        assert!(write(&mem, 0x1ffc, &b, None).is_err());
    }
}
