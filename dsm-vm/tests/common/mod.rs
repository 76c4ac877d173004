//! A cluster of DsmMemory instances in one process, connected by TcpTransport on 127.0.0.1.

#![allow(dead_code)]

use dsm_vm::{DsmConfig, DsmMemory, HomePolicy, HostId};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use transport::{TcpConfig, TcpTransport};

pub const PAGE: u64 = 4096;
/// Two regions around a hole, like the VMM's layout (small).
pub const REGIONS: [(u64, u64); 2] = [(0, 256 * PAGE), (0x1_0000_0000, 256 * PAGE)];
/// Guest-physical address of page `n` of the first region.
pub fn page(n: u64) -> u64 {
    n * PAGE
}
/// Guest-physical address of page `n` of the high region.
pub fn high_page(n: u64) -> u64 {
    0x1_0000_0000 + n * PAGE
}

pub struct Host {
    pub transport: Arc<TcpTransport>,
    pub mem: DsmMemory,
}

impl Host {
    pub fn a64(&self, gpa: u64) -> &AtomicU64 {
        let p = self.mem.ptr(gpa).expect("guest RAM");
        assert_eq!(p as usize % 8, 0);
        // SAFETY: `p` points into this host's guest RAM mapping, aligned, valid while `self`
        // lives; all accesses in the tests are atomic.
        unsafe { &*(p as *const AtomicU64) }
    }
    pub fn a32(&self, gpa: u64) -> &AtomicU32 {
        let p = self.mem.ptr(gpa).expect("guest RAM");
        // SAFETY: as in `a64`.
        unsafe { &*(p as *const AtomicU32) }
    }
    pub fn read(&self, gpa: u64) -> u64 {
        let p = self.mem.ptr(gpa).expect("guest RAM");
        // SAFETY: a volatile read of guest RAM owned by this host's mapping (may fault).
        unsafe { std::ptr::read_volatile(p as *const u64) }
    }
    pub fn write(&self, gpa: u64, v: u64) {
        let p = self.mem.ptr(gpa).expect("guest RAM");
        // SAFETY: a volatile write of guest RAM owned by this host's mapping (may fault).
        unsafe { std::ptr::write_volatile(p as *mut u64, v) }
    }
}

pub fn cluster_with(n: usize, regions: &[(u64, u64)], chunk_pages: u64) -> Vec<Host> {
    let _ = env_logger::builder().is_test(true).try_init();
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let hosts: Vec<HostId> = (0..n as u16).map(HostId).collect();
    let transports: Vec<Arc<TcpTransport>> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let peers = (0..n)
                .filter(|j| *j != i)
                .map(|j| (HostId(j as u16), addrs[j]))
                .collect();
            let cfg = TcpConfig::new(HostId(i as u16), peers, 0xd5, b"dsm-test-cluster-key");
            TcpTransport::start(cfg, l).unwrap()
        })
        .collect();
    for t in &transports {
        t.wait_connected(Duration::from_secs(10)).unwrap();
    }
    transports
        .into_iter()
        .enumerate()
        .map(|(i, transport)| {
            let cfg = DsmConfig {
                local: HostId(i as u16),
                hosts: hosts.clone(),
                regions: regions.to_vec(),
                home: HomePolicy::Interleave { chunk_pages },
                loading: false,
            };
            let mem = DsmMemory::new(cfg, transport.clone()).unwrap();
            Host { transport, mem }
        })
        .collect()
}

/// Waits until no page is in flight anywhere (stats are final), and checks no host saw a
/// protocol error.
pub fn settle(c: &[Host]) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !c.iter().all(|h| h.mem.is_idle()) {
        assert!(std::time::Instant::now() < end, "cluster never became idle");
        std::thread::sleep(Duration::from_millis(2));
    }
    for h in c {
        let s = h.mem.stats();
        assert_eq!(s.protocol_errors + s.send_errors, 0, "{s:?}");
    }
}

pub fn cluster(n: usize) -> Vec<Host> {
    cluster_with(n, &REGIONS, 1)
}
