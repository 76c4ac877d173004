//! Keeping KVM's shadow page tables honest when another host rewrites a guest page table.
//!
//! On hosts without two-dimensional paging (this machine's `kvm_pvm` is shadow-paging only),
//! KVM builds shadow page tables from the guest's page tables and keeps them in sync by
//! write-protecting every guest page it shadows: a guest store to such a page traps and KVM
//! updates or drops the shadow. A page that the DSM replaces with another host's newer contents
//! changes *behind* that tracking (invalidate with `MADV_DONTNEED`, later `UFFDIO_COPY`), so
//! KVM keeps translating through the old entries: a process forked or exec'd on one host then
//! runs on another host with the previous owner's mappings of its page-table pages (seen here
//! as freshly exec'd programs reading their TLS as zeros and crashing).
//!
//! Userspace cannot drop the shadow pages of one guest frame, but deleting and re-adding the
//! memory slots makes KVM discard all of them. So: when this host drops its copy of a page that
//! looks like a page table (present entries with plausible frame numbers inside guest memory,
//! no reserved bits; the accessed bit is *not* required: fork makes the child's PTEs "old" and
//! KVM sets it only on the entries it walked), every local vCPU is kicked out of `KVM_RUN` and the first to re-enter
//! reloads the memory slots while no vCPU of this host is inside `KVM_RUN`. Data pages do not
//! cause this (their shadow entries are zapped by KVM's MMU notifier on `MADV_DONTNEED`). With
//! EPT/NPT the guest's page tables are walked by hardware and none of this is needed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::irq::lapic::LocalApic;

/// Drops KVM's shadow page tables of this host when needed.
pub struct ShadowZap {
    needed: AtomicBool,
    gate: RwLock<()>,
    vm: Arc<VmFd>,
    slots: Vec<kvm_userspace_memory_region>,
    lapics: Vec<Arc<LocalApic>>,
    max_pfn: u64,
    zaps: AtomicU64,
    requests: AtomicU64,
    every_discard: bool,
}

/// Whether `page` looks like an x86-64 page table with at least one present entry.
pub fn looks_like_page_table(page: &[u8; 4096], max_pfn: u64) -> bool {
    let mut present = 0;
    for e in page.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let v = u64::from_le_bytes(b);
        if v & 1 == 0 {
            continue;
        }
        let reserved = (v >> 52) & 0x3f != 0;
        let pfn = (v >> 12) & ((1 << 40) - 1);
        let large = v & (1 << 7) != 0;
        if reserved || pfn >= max_pfn || (pfn == 0 && !large) {
            return false;
        }
        present += 1;
    }
    present > 0
}

impl ShadowZap {
    /// A zapper for `vm` with memory `slots`, kicking `lapics` (this host's vCPUs).
    pub fn new(
        vm: Arc<VmFd>,
        slots: Vec<kvm_userspace_memory_region>,
        lapics: Vec<Arc<LocalApic>>,
    ) -> Self {
        let top = slots
            .iter()
            .map(|s| (s.guest_phys_addr + s.memory_size) >> 12)
            .max()
            .unwrap_or(0);
        ShadowZap {
            needed: AtomicBool::new(false),
            gate: RwLock::new(()),
            vm,
            slots,
            lapics,
            // Page tables also map MMIO below 4 GiB (APICs, virtio windows).
            max_pfn: top.max(1 << 20),
            zaps: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            // Diagnostics: treat every dropped page as a page table.
            every_discard: std::env::var_os("SSI_VMM_ZAP_EVERY_DISCARD").is_some(),
        }
    }

    /// DSM hook: this host is dropping its copy of `page`.
    pub fn on_discard(&self, _gpa: u64, page: &[u8; 4096]) {
        if self.every_discard || looks_like_page_table(page, self.max_pfn) {
            self.requests.fetch_add(1, Ordering::Relaxed);
            if !self.needed.swap(true, Ordering::AcqRel) {
                for l in &self.lapics {
                    l.wake();
                }
            }
        }
    }

    /// Called by a vCPU thread before `KVM_RUN`: reloads the slots if asked to, then returns
    /// the guard to hold while inside `KVM_RUN`.
    pub fn enter(&self) -> RwLockReadGuard<'_, ()> {
        if self.needed.load(Ordering::Acquire) {
            let _w = self.gate.write().unwrap_or_else(|p| p.into_inner());
            if self.needed.swap(false, Ordering::AcqRel) {
                self.zap();
            }
        }
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn zap(&self) {
        for s in &self.slots {
            let gone = kvm_userspace_memory_region {
                memory_size: 0,
                ..*s
            };
            // SAFETY: deleting and re-adding a slot over the same live mapping (owned by the
            // VM's RAM, which outlives the VM); no vCPU of this host is inside KVM_RUN (the
            // write half of `gate` is held).
            let r = unsafe { self.vm.set_user_memory_region(gone) }
                // SAFETY: as above.
                .and_then(|_| unsafe { self.vm.set_user_memory_region(*s) });
            if let Err(e) = r {
                log::error!("reloading memory slot {}: {e}", s.slot);
            }
        }
        let n = self.zaps.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_power_of_two() {
            log::info!(
                "shadow page tables dropped {n} time(s) (page-table pages invalidated: {})",
                self.requests.load(Ordering::Relaxed)
            );
        }
    }

    /// How many times the shadow page tables were dropped.
    pub fn zaps(&self) -> u64 {
        self.zaps.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(entries: &[u64]) -> [u8; 4096] {
        let mut p = [0u8; 4096];
        for (i, e) in entries.iter().enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        p
    }

    #[test]
    fn page_table_heuristic() {
        let max = 1 << 20;
        // Linux kernel PTE: present, RW, accessed, dirty, global, NX.
        assert!(looks_like_page_table(&page(&[0x8000_0000_1234_5163]), max));
        // PDE pointing to a page table (_KERNPG_TABLE).
        assert!(looks_like_page_table(
            &page(&[0, 0x0000_0000_0222_3063]),
            max
        ));
        // Large page mapping frame 0.
        assert!(looks_like_page_table(&page(&[0xe3]), max));
        // A fork child's COW PTEs: present, user, read-only, NX, accessed bit clear ("old"),
        // next to one KVM has walked (accessed): still a page table.
        assert!(looks_like_page_table(
            &page(&[0x8000_0000_1234_5005, 0x8000_0000_1234_6025]),
            max
        ));
        // Zeros, kernel pointers, small counters, text: data.
        assert!(!looks_like_page_table(&page(&[]), max));
        assert!(!looks_like_page_table(&page(&[0xffff_8880_0123_4567]), max));
        assert!(!looks_like_page_table(&page(&[1, 3, 5]), max));
        assert!(!looks_like_page_table(&page(&[0x6f6c_6c65_6821]), max));
        // Frame beyond guest memory.
        assert!(!looks_like_page_table(&page(&[0x0000_0100_0000_0063]), max));
        // One bad entry spoils the page.
        assert!(!looks_like_page_table(&page(&[0x1234_5063, 0x21]), max));
    }
}
