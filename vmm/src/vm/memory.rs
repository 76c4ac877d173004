//! Guest RAM: plain anonymous memory on a single host, or the cluster's distributed memory
//! (DSM), and its registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use proto::HostId;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::build::Net;
use super::Error;
use crate::cluster::Placement;
use crate::layout::ram_regions;

/// Guest RAM: its mapping, and the (guest address, size, host address) of each region.
pub(super) struct Ram {
    pub(super) mem: GuestMemoryMmap,
    pub(super) slots: Vec<(u64, u64, u64)>,
}

/// Plain anonymous memory of `size` bytes.
pub(super) fn local_ram(size: u64) -> Result<Ram, Error> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory {
        size,
        detail: e.to_string(),
    })?;
    let mut slots = Vec::new();
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory {
                size,
                detail: e.to_string(),
            })?;
        slots.push((region.start_addr().0, region.len(), host as u64));
    }
    Ok(Ram { mem, slots })
}

/// The cluster's distributed memory of `size` bytes, and a view of it as guest RAM.
///
/// The returned [`dsm_vm::DsmMemory`] must outlive every holder of the view (devices, vCPUs,
/// loaders): the VM drops it last, or leaks it when a vCPU thread cannot be joined.
pub(super) fn dsm_ram(
    net: &Net,
    size: u64,
    placement: &Placement,
    loading: bool,
) -> Result<(dsm_vm::DsmMemory, Ram), Error> {
    let d = dsm_vm::DsmMemory::new(
        dsm_vm::DsmConfig {
            local: HostId(net.spec.me as u16),
            hosts: (0..net.spec.hosts.len())
                .map(|h| HostId(h as u16))
                .collect(),
            regions: ram_regions(size),
            home: placement.home_policy(),
            loading,
        },
        net.transport.clone(),
    )?;
    // SAFETY: the caller keeps `d` alive longer than every holder of this view (see above).
    let mem = unsafe { d.guest_memory() }?;
    let slots = d
        .regions()
        .iter()
        .map(|r| (r.guest_addr, r.size, r.host_addr))
        .collect();
    Ok((d, Ram { mem, slots }))
}

/// Registers every region of `ram` with KVM; returns the slots (for shadow-page zapping).
///
/// # Safety
/// The mappings behind `ram.slots` must stay valid until the VM's vCPU threads have been
/// joined (the [`super::Vm`] owns them and drops them after joining, or leaks them).
pub(super) unsafe fn register(
    vm: &VmFd,
    ram: &Ram,
) -> Result<Vec<kvm_userspace_memory_region>, Error> {
    let mut kvm_slots = Vec::new();
    for (slot, (guest, size, host)) in ram.slots.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: *guest,
            memory_size: *size,
            userspace_addr: *host,
        };
        // SAFETY: the region is a live mapping that outlives the vCPU threads (this
        // function's contract).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::KvmIoctl("SET_USER_MEMORY_REGION", e))?;
        kvm_slots.push(r);
    }
    Ok(kvm_slots)
}
