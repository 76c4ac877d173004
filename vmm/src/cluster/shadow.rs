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
//! no reserved bits, and on each present entry the user or the accessed bit: the accessed bit
//! alone is *not* required, since fork makes the child's user PTEs "old" and KVM sets it only
//! on the entries it walked, but Linux sets it itself on every kernel entry; this keeps data
//! pages such as the one holding `jiffies` from passing for page tables), every local vCPU is
//! kicked out of `KVM_RUN` and the first to re-enter
//! reloads the memory slots while no vCPU of this host is inside `KVM_RUN`. Data pages do not
//! cause this (their shadow entries are zapped by KVM's MMU notifier on `MADV_DONTNEED`). With
//! EPT/NPT the guest's page tables are walked by hardware and none of this is needed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use irqchip::LocalApic;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Drops KVM's shadow page tables of this host when needed.
pub struct ShadowZap {
    needed: AtomicBool,
    gate: RwLock<()>,
    vm: Arc<VmFd>,
    slots: Vec<kvm_userspace_memory_region>,
    lapics: Vec<Arc<LocalApic>>,
    frames: Frames,
    zaps: AtomicU64,
    requests: AtomicU64,
    deferred: AtomicU64,
    every_discard: bool,
}

/// How often a vCPU waiting to reload the shadow tables kicks the other local vCPUs again.
const REKICK: Duration = Duration::from_millis(5);
/// How long it waits for them before deferring the reload.
const DEFER_AFTER: Duration = Duration::from_millis(200);

/// The guest-physical frames a page-table entry of this guest can map: its RAM and the device
/// windows the VMM emulates (virtio-mmio slots, IOAPIC, local APIC).
#[derive(Debug, Clone)]
pub struct Frames {
    /// Frame ranges, start inclusive, end exclusive.
    ranges: Vec<(u64, u64)>,
}

impl Frames {
    /// The frames of RAM `slots` plus the device windows of `crate::layout`.
    pub fn new(slots: &[kvm_userspace_memory_region]) -> Self {
        use crate::layout::{
            APIC_WINDOW, IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_IRQS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
        };
        let virtio_end = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * VIRTIO_IRQS.len() as u64;
        let mut ranges: Vec<(u64, u64)> = slots
            .iter()
            .map(|s| {
                (
                    s.guest_phys_addr >> 12,
                    (s.guest_phys_addr + s.memory_size) >> 12,
                )
            })
            .collect();
        ranges.extend([
            (VIRTIO_MMIO_BASE >> 12, virtio_end.div_ceil(4096)),
            (
                IOAPIC_ADDR >> 12,
                (IOAPIC_ADDR + APIC_WINDOW).div_ceil(4096),
            ),
            (LAPIC_ADDR >> 12, (LAPIC_ADDR + APIC_WINDOW).div_ceil(4096)),
        ]);
        Frames { ranges }
    }

    fn contains(&self, pfn: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| (a..b).contains(&pfn))
    }
}

/// Whether `page` looks like an x86-64 page table with at least one present entry, every one
/// mapping a frame of `frames`.
pub fn looks_like_page_table(page: &[u8; 4096], frames: &Frames) -> bool {
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
        // Linux sets the accessed bit itself on every kernel mapping and table entry
        // (`__PAGE_KERNEL*`, `_KERNPG_TABLE`, `_PAGE_TABLE`); the only present entries without
        // it are user leaves made "old" (fork, reclaim), and those have the user bit.
        let user_or_accessed = v & (1 << 2 | 1 << 5) != 0;
        if reserved || !frames.contains(pfn) || (pfn == 0 && !large) || !user_or_accessed {
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
        let frames = Frames::new(&slots);
        ShadowZap {
            needed: AtomicBool::new(false),
            gate: RwLock::new(()),
            vm,
            slots,
            lapics,
            frames,
            zaps: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            // Diagnostics: treat every dropped page as a page table.
            every_discard: std::env::var_os("SSI_VMM_ZAP_EVERY_DISCARD").is_some(),
        }
    }

    /// `page` changes behind KVM's write tracking: the DSM drops this host's copy (its
    /// contents are the old ones), or the VMM wrote it for the guest (`vcpu::ram_exit`, the
    /// new ones). Asks for the shadow tables to go if it looks like a page table.
    pub fn on_changed_behind_kvm(&self, gpa: u64, page: &[u8; 4096]) {
        if self.every_discard || looks_like_page_table(page, &self.frames) {
            log::trace!("page-table page {gpa:#x} changed: shadow page tables to go");
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
    ///
    /// The reload waits for the other local vCPUs to leave `KVM_RUN`, kicking them again every
    /// [`REKICK`], but never longer than [`DEFER_AFTER`]: a vCPU can stay inside `KVM_RUN`
    /// although kicked (seen here: a guest CPU spinning for an answer from the vCPU that waits
    /// here, its thread at 100 % system time and deaf to signals), and waiting for it forever
    /// was a deadlock of the whole VM. Then the reload is deferred (`needed` stays set, the
    /// next entry of any local vCPU tries again) and this vCPU runs: that lets the guest go
    /// on, and the other vCPU leaves `KVM_RUN` once it has its answer.
    pub fn enter(&self) -> RwLockReadGuard<'_, ()> {
        if self.needed.load(Ordering::Acquire) {
            if let Some(_w) = self.write_within(DEFER_AFTER) {
                if self.needed.swap(false, Ordering::AcqRel) {
                    self.zap();
                }
            } else {
                let n = self.deferred.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_power_of_two() {
                    log::warn!(
                        "shadow page-table reload deferred {n} time(s): a local vCPU stayed in \
                         KVM_RUN for {DEFER_AFTER:?} although kicked"
                    );
                }
            }
        }
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The write half of the gate once no local vCPU is inside `KVM_RUN`, kicking them while
    /// waiting; `None` after `limit`.
    fn write_within(&self, limit: Duration) -> Option<RwLockWriteGuard<'_, ()>> {
        let start = Instant::now();
        let mut kicked = start;
        loop {
            match self.gate.try_write() {
                Ok(w) => return Some(w),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            let now = Instant::now();
            if now.duration_since(start) >= limit {
                return None;
            }
            if now.duration_since(kicked) >= REKICK {
                for l in &self.lapics {
                    l.wake();
                }
                kicked = now;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
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

    /// How many times a reload was deferred (a local vCPU did not leave `KVM_RUN` in time).
    pub fn deferred(&self) -> u64 {
        self.deferred.load(Ordering::Relaxed)
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
        // 1 GiB of RAM at 0.
        let max = &Frames::new(&[kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 1 << 30,
            userspace_addr: 0,
        }]);
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
        // The local APIC and a virtio-mmio window mapped by the kernel (ioremap: uncached).
        assert!(looks_like_page_table(
            &page(&[0x8000_0000_fee0_017b, 0x8000_0000_d000_117b]),
            max
        ));
        // `jiffies` early on (it starts at 0xffff8ad0): a frame just below 4 GiB, where this
        // machine has nothing, even with the user and accessed bits set.
        assert!(!looks_like_page_table(&page(&[0xffff_8af5]), max));
        // Frame beyond guest memory.
        assert!(!looks_like_page_table(&page(&[0x0000_0100_0000_0063]), max));
        // Odd counters that fall inside guest memory as frame numbers (`jiffies` starts at
        // 0xffff8ad0 and ticks through odd values), with neither the user nor the accessed bit.
        assert!(!looks_like_page_table(&page(&[0xffff_8ad1]), max));
        assert!(!looks_like_page_table(
            &page(&[0x0010_0009, 0, 0x2_0001]),
            max
        ));
        // A kernel entry without the accessed bit is not one Linux writes.
        assert!(!looks_like_page_table(&page(&[0x8000_0000_1234_5143]), max));
        // One bad entry spoils the page.
        assert!(!looks_like_page_table(&page(&[0x1234_5063, 0x21]), max));
    }
}
