//! Distributed shared guest memory for ssi-vmm.
//!
//! Every host maps the whole guest-physical RAM as anonymous memory registered with
//! userfaultfd (missing + write-protect modes, kernel faults included, so KVM's accesses for
//! the guest and the VMM's own accesses fault alike). Pages are kept coherent across hosts at
//! 4 KiB granularity with a single-writer / multiple-reader protocol whose directory lives at
//! each page's home host (see the [`proto`] crate documentation for the messages and sequence
//! diagrams):
//!
//! - read fault: the home fetches a copy from the owner (downgrading it to read-only) or a
//!   sharer, and the requester installs it write-protected (`UFFDIO_COPY` + `MODE_WP`);
//! - write fault: the home invalidates every other copy (`MADV_DONTNEED` there), moves the
//!   data from the current holder if the requester has none, and the requester installs it
//!   writable (or clears write protection in place: `UFFDIO_WRITEPROTECT` mode 0);
//! - never-touched pages are granted as zero pages without moving page data.
//!
//! The home serializes all transitions of a page (one transaction at a time, closed by the
//! requester's acknowledgement), so two hosts faulting on one page, a fault racing an
//! invalidation, or stale fault reports are all ordered by it. Every store happens on the only
//! present copy of its page, which gives sequential consistency per page (and x86-TSO for the
//! guest, since an access never completes on a stale copy).
//!
//! [`DsmMemory`] is the entry point; it talks to other hosts only through
//! [`transport::Transport`].

mod engine;
pub mod memory;
pub mod ram;
#[cfg(test)]
mod sim;
pub mod stats;
pub mod uffd;

pub use engine::Backing;
pub use memory::{DiscardHook, DsmConfig, DsmHandle, DsmMemory, Error, RegionInfo};
pub use proto::HostId;
pub use ram::HomePolicy;
pub use stats::DsmStats;
