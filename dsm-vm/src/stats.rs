//! DSM counters of one host (for `ssi-vmm status` and the benchmarks).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters, updated by the engine.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A snapshot of [`Stats`]: plain serde data.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct DsmStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> DsmStats {
                DsmStats {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Pages present in this host's mapping (read-only or writable).
    resident_pages,
    /// Pages this host holds writable (exclusive owner).
    owned_pages,
    /// Read faults taken (guest or VMM).
    read_faults,
    /// Write faults on missing pages.
    write_faults,
    /// Write-protect faults (upgrade of a read-only copy).
    wp_faults,
    /// Faults already satisfied when handled (woken again, nothing sent).
    spurious_faults,
    /// Faults on a page that already had a request outstanding.
    merged_faults,
    /// Requests sent to a remote home.
    remote_requests,
    /// Requests served by the local home.
    local_requests,
    /// Grants installed.
    grants,
    /// Page contents received over the network (grants with data, fetched data).
    pages_in,
    /// Page contents sent over the network.
    pages_out,
    /// Page bytes received over the network.
    bytes_in,
    /// Page bytes sent over the network.
    bytes_out,
    /// Messages sent over the network.
    messages_out,
    /// Messages handled locally (home and requester on this host).
    messages_local,
    /// Copies of ours dropped on invalidation.
    invalidated,
    /// Writable copies of ours downgraded to read-only.
    downgraded,
    /// Transactions run by this host as home.
    home_transactions,
    /// Requests that had to wait for another transaction on the same page.
    home_queued,
    /// Pages this host is home of that some host has touched.
    directory_entries,
    /// Lazy restore: home pages first granted (or streamed in) from the snapshot.
    pages_backed,
    /// Protocol invariant violations or malformed requests seen (should stay 0).
    protocol_errors,
    /// Transport send failures.
    send_errors,
    /// Peers reported dead.
    peer_downs,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Subtracts `n` from a gauge.
    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_plain_serde_data() {
        let s = Stats::default();
        Stats::add(&s.read_faults, 3);
        Stats::add(&s.resident_pages, 2);
        Stats::sub(&s.resident_pages, 1);
        let snap = s.snapshot();
        assert_eq!(snap.read_faults, 3);
        assert_eq!(snap.resident_pages, 1);
        let json = serde_json::to_string(&snap).unwrap();
        let back: DsmStats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
    }
}
