//! DSM latency and throughput, in one run:
//!
//! 1. local userfaultfd floor: MADV_DONTNEED + touch + UFFDIO_COPY round trip, no network;
//! 2. transport round trip (request/response ping over TCP loopback);
//! 3. DSM read fault and write fault latency (p50/p99) between two DsmMemory instances over
//!    TCP loopback, for each placement of the page's home;
//! 4. pages moved per second by one thread reading (or writing) pages owned by the other host.
//!
//! `cargo bench -p dsm-vm --bench dsm` (add `-- --quick` for a short run).

use dsm_vm::uffd::{self, Uffd, PAGE};
use dsm_vm::{DsmConfig, DsmMemory, HomePolicy, HostId};
use proto::{Message, Service};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use transport::{Handler, Responder, TcpConfig, TcpTransport, Transport};

fn pct(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = v.len();
    (us(v[n / 2]), us(v[n * 99 / 100]), us(v[n - 1]))
}

fn row(name: &str, v: Vec<Duration>) {
    let n = v.len();
    let (p50, p99, max) = pct(v);
    println!("| {name} | {n} | {p50:.1} | {p99:.1} | {max:.0} |");
}

fn touch(p: *const u8) -> u8 {
    // SAFETY: `p` points into a live mapping owned by the caller; a volatile read may fault.
    unsafe { p.read_volatile() }
}

fn poke(p: *mut u8, v: u8) {
    // SAFETY: as in `touch`, for a write.
    unsafe { p.write_volatile(v) }
}

/// MADV_DONTNEED + read + userfaultfd round trip + UFFDIO_COPY, with a handler thread.
fn local_floor(iters: usize) -> Vec<Duration> {
    let u = Arc::new(Uffd::new().expect("userfaultfd"));
    // SAFETY: a fresh private anonymous mapping of one page, unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let a = base as u64;
    u.register(a, PAGE as u64).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (u2, s2) = (u.clone(), stop.clone());
    let h = thread::spawn(move || {
        let src = [7u8; PAGE];
        let mut f = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: u2.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 50) };
            f.clear();
            if u2.read_faults(&mut f).unwrap() > 0 {
                u2.copy(a, &src, false).unwrap();
            }
        }
    });
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        uffd::discard(a).unwrap();
        let t = Instant::now();
        assert_eq!(touch(a as *const u8), 7);
        v.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    // SAFETY: the handler thread is gone; nothing uses the mapping any more.
    unsafe { libc::munmap(base, PAGE) };
    v
}

struct Pong;
impl Handler for Pong {
    fn on_message(&self, _: HostId, m: Message, r: Option<Responder>) {
        if let (Message::Ping { nonce }, Some(r)) = (m, r) {
            let _ = r.reply(Message::Pong { nonce });
        }
    }
}

fn two_hosts(pages: u64) -> (Vec<Arc<TcpTransport>>, Vec<DsmMemory>) {
    let ls: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let ts: Vec<Arc<TcpTransport>> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let peer = (HostId(1 - i as u16), addrs[1 - i]);
            let cfg = TcpConfig::new(HostId(i as u16), vec![peer], 1, b"benchmark-cluster-key");
            TcpTransport::start(cfg, l).unwrap()
        })
        .collect();
    for t in &ts {
        t.wait_connected(Duration::from_secs(10)).unwrap();
    }
    let mems = ts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let cfg = DsmConfig {
                local: HostId(i as u16),
                hosts: vec![HostId(0), HostId(1)],
                regions: vec![(0, pages * PAGE as u64)],
                home: HomePolicy::Interleave { chunk_pages: 1 },
                loading: false,
            };
            DsmMemory::new(cfg, t.clone()).unwrap()
        })
        .collect();
    (ts, mems)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 400 } else { 4000 };
    let bulk = if quick { 2000u64 } else { 16384 };
    let pages = 4 * n as u64 + 2 * bulk + 16;

    println!("| measurement | samples | p50 µs | p99 µs | max µs |");
    println!("|---|---|---|---|---|");
    row(
        "local userfaultfd floor (DONTNEED + read + COPY)",
        local_floor(n),
    );

    let (ts, m) = two_hosts(pages);
    ts[1].register(Service::Control, Arc::new(Pong));
    let rtt: Vec<Duration> = (0..n as u64)
        .map(|i| {
            let t = Instant::now();
            let r = ts[0].request(
                HostId(1),
                Message::Ping { nonce: i },
                Duration::from_secs(5),
            );
            assert_eq!(r, Ok(Message::Pong { nonce: i }));
            t.elapsed()
        })
        .collect();
    row("transport request/response (TCP loopback)", rtt);

    let ptr = |h: usize, pfn: u64| m[h].ptr(pfn * PAGE as u64).unwrap();
    // Host 1 owns pages [0, 2n) (written there), host 0 faults on them.
    for pfn in 0..2 * n as u64 {
        poke(ptr(1, pfn), 1);
    }
    let mut read = [Vec::new(), Vec::new()];
    for pfn in 0..n as u64 {
        let t = Instant::now();
        assert_eq!(touch(ptr(0, pfn)), 1);
        read[(pfn % 2) as usize].push(t.elapsed());
    }
    let mut write = [Vec::new(), Vec::new()];
    for pfn in n as u64..2 * n as u64 {
        let t = Instant::now();
        poke(ptr(0, pfn), 2);
        write[(pfn % 2) as usize].push(t.elapsed());
    }
    // Upgrade: both hosts hold read-only copies (the reads above), host 0 writes.
    let mut upgrade = Vec::new();
    for pfn in 0..n as u64 {
        touch(ptr(1, pfn));
    }
    for pfn in 0..n as u64 {
        let t = Instant::now();
        poke(ptr(0, pfn), 3);
        upgrade.push(t.elapsed());
    }
    let [r_local_home, r_remote_home] = read;
    let [w_local_home, w_remote_home] = write;
    row(
        "DSM read fault, owner remote, home = requester",
        r_local_home,
    );
    row("DSM read fault, owner remote, home = owner", r_remote_home);
    row(
        "DSM write fault, owner remote (data moves), home = requester",
        w_local_home,
    );
    row(
        "DSM write fault, owner remote (data moves), home = owner",
        w_remote_home,
    );
    row(
        "DSM write upgrade (WP fault, 1 remote sharer invalidated)",
        upgrade,
    );

    // Throughput: one thread streams over pages owned by the other host.
    let base = 2 * n as u64 + 16;
    for pfn in base..base + 2 * bulk {
        poke(ptr(1, pfn), 4);
    }
    let s0 = m[0].stats();
    let t = Instant::now();
    for pfn in base..base + bulk {
        touch(ptr(0, pfn));
    }
    let rd = t.elapsed();
    let t = Instant::now();
    for pfn in base + bulk..base + 2 * bulk {
        poke(ptr(0, pfn), 5);
    }
    let wr = t.elapsed();
    let s1 = m[0].stats();
    let rate = |d: Duration| bulk as f64 / d.as_secs_f64();
    println!();
    println!("| throughput (1 thread, pages owned by the other host) | pages/s | MiB/s |");
    println!("|---|---|---|");
    for (name, d) in [("sequential reads", rd), ("sequential writes", wr)] {
        let r = rate(d);
        println!(
            "| {name} | {r:.0} | {:.1} |",
            r * PAGE as f64 / (1 << 20) as f64
        );
    }
    println!();
    println!(
        "host 0 during the throughput run: {} pages in, {} messages out; transport: {:?}",
        s1.pages_in - s0.pages_in,
        s1.messages_out - s0.messages_out,
        ts[0].stats()
    );
    drop(m);
}
