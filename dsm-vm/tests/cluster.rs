//! Real userfaultfd + TCP loopback: several DsmMemory instances in one process, test threads
//! playing the vCPUs.

mod common;

use common::*;
use std::sync::atomic::{AtomicU32, Ordering::*};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn untouched_pages_read_zero_without_page_traffic() {
    let c = cluster(2);
    let n = 64;
    for p in 0..n {
        assert_eq!(c[0].read(page(p)), 0);
        assert_eq!(c[0].read(high_page(p) + 8), 0);
    }
    settle(&c);
    let (a, b) = (c[0].mem.stats(), c[1].mem.stats());
    assert_eq!(
        a.pages_in + a.pages_out + b.pages_in + b.pages_out,
        0,
        "{a:?} {b:?}"
    );
    // Interleaved homes: half the pages are homed here and cost no message at all.
    assert_eq!(a.local_requests, n);
    assert_eq!(a.remote_requests, n);
    assert_eq!(a.messages_out, 2 * n, "ReadReq + GrantAck per remote page");
    assert_eq!(a.resident_pages, 2 * n);
    assert_eq!(a.read_faults, 2 * n);
    assert_eq!(b.resident_pages, 0);
    assert_eq!(b.directory_entries, n);
    assert_eq!(a.protocol_errors + b.protocol_errors, 0);
}

#[test]
fn write_on_one_host_is_read_on_the_others() {
    let c = cluster(3);
    for p in 0..30 {
        c[0].write(page(p), 0xabc0_0000 + p);
        c[0].write(high_page(p) + 4088, !p);
    }
    for h in [1, 2] {
        for p in 0..30 {
            assert_eq!(c[h].read(page(p)), 0xabc0_0000 + p, "host {h} page {p}");
            assert_eq!(c[h].read(high_page(p) + 4088), !p);
        }
    }
    // Now host 2 writes and everybody (the old writer included) sees it.
    for p in 0..30 {
        c[2].write(page(p), p);
    }
    for h in [0, 1, 2] {
        for p in 0..30 {
            assert_eq!(c[h].read(page(p)), p, "host {h} page {p}");
        }
    }
    settle(&c);
    let s: Vec<_> = c.iter().map(|h| h.mem.stats()).collect();
    assert!(s[1].pages_in >= 40, "{:?}", s[1]);
    assert!(s[0].downgraded > 0 && s[0].invalidated > 0, "{:?}", s[0]);
    assert!(s.iter().all(|s| s.protocol_errors == 0));
}

#[test]
fn ping_pong_writes() {
    let c = cluster(2);
    let rounds = 200u64;
    let x = page(7); // homed on host 1
    thread::scope(|s| {
        for (i, h) in c.iter().enumerate() {
            s.spawn(move || {
                let v = h.a64(x);
                for r in 0..rounds {
                    let want = 2 * r + i as u64;
                    while v.load(Acquire) != want {
                        thread::yield_now();
                    }
                    v.store(want + 1, Release);
                }
            });
        }
    });
    assert_eq!(c[0].a64(x).load(SeqCst), 2 * rounds);
    settle(&c);
    let s0 = c[0].mem.stats();
    assert!(s0.wp_faults + s0.write_faults >= rounds, "{s0:?}");
}

fn ticket_lock(next: &AtomicU32, serving: &AtomicU32) -> u32 {
    let t = next.fetch_add(1, SeqCst);
    while serving.load(Acquire) != t {
        thread::yield_now();
    }
    t
}

#[test]
fn ticket_lock_counters_lose_no_update() {
    let c = cluster(3);
    let (threads, iters) = (2u64, 60u64);
    let (next, serving, counter) = (page(0), page(1), high_page(2));
    thread::scope(|s| {
        for h in &c {
            for t in 0..threads {
                s.spawn(move || {
                    let slot = page(3) + 8 * (u64::from(h.mem.local().0) * threads + t);
                    for _ in 0..iters {
                        ticket_lock(h.a32(next), h.a32(serving));
                        // Plain (non-atomic) read-modify-write under the lock.
                        h.write(counter, h.read(counter) + 1);
                        h.write(slot, h.read(slot) + 1);
                        h.a32(serving).fetch_add(1, Release);
                    }
                });
            }
        }
    });
    let total = 3 * threads * iters;
    for h in &c {
        assert_eq!(h.read(counter), total);
        assert_eq!(u64::from(h.a32(next).load(SeqCst)), total);
        for i in 0..3 * threads {
            assert_eq!(h.read(page(3) + 8 * i), iters);
        }
    }
    settle(&c);
}

#[test]
fn concurrent_faults_on_one_page_from_all_hosts() {
    let c = cluster(3);
    let per = 300u64;
    let hot = high_page(5);
    thread::scope(|s| {
        for h in &c {
            for t in 0..2u64 {
                s.spawn(move || {
                    // Everyone hammers one atomic and its own word of the same page.
                    let mine = hot + 64 + 8 * (u64::from(h.mem.local().0) * 2 + t);
                    for _ in 0..per {
                        h.a64(hot).fetch_add(1, SeqCst);
                        h.write(mine, h.read(mine) + 1);
                    }
                });
            }
        }
    });
    for h in &c {
        assert_eq!(h.a64(hot).load(SeqCst), 6 * per);
        for i in 0..6 {
            assert_eq!(h.read(hot + 64 + 8 * i), per, "false-shared word {i}");
        }
    }
    settle(&c);
    let queued: u64 = c.iter().map(|h| h.mem.stats().home_queued).sum();
    eprintln!("{queued} requests waited for another transaction on the page");
}

#[test]
fn readers_never_see_a_value_go_back_while_invalidations_race_faults() {
    let c = cluster(3);
    let x = page(10);
    let last = 400u64;
    thread::scope(|s| {
        let w = &c[0];
        s.spawn(move || {
            for v in 1..=last {
                w.a64(x).store(v, Release);
                if v % 4 == 0 {
                    thread::yield_now();
                }
            }
        });
        for h in &c[1..] {
            for _ in 0..2 {
                s.spawn(move || {
                    let mut seen = 0;
                    let end = Instant::now() + Duration::from_secs(60);
                    while seen < last {
                        let v = h.a64(x).load(Acquire);
                        assert!(v >= seen, "went back from {seen} to {v}");
                        seen = v;
                        assert!(Instant::now() < end, "writer never finished");
                    }
                });
            }
        }
        // A second writer on another word of the same page keeps invalidating copies too.
        let z = &c[2];
        s.spawn(move || {
            for v in 0..200 {
                z.a64(x + 8).store(v, Relaxed);
            }
        });
    });
    settle(&c);
    let inv: u64 = c.iter().map(|h| h.mem.stats().invalidated).sum();
    assert!(inv > 0, "{inv} invalidations");
}

#[test]
fn cluster_holds_more_than_any_host_has_resident() {
    let c = cluster(3);
    let per_host = 150u64;
    // Each host writes its own third of the pages (homes interleaved independently of that).
    for (i, h) in c.iter().enumerate() {
        for k in 0..per_host {
            let p = k * 3 + i as u64;
            let gpa = if p < 256 { page(p) } else { high_page(p - 256) };
            h.write(gpa, 0x1000 + p);
        }
    }
    settle(&c);
    let stats: Vec<_> = c.iter().map(|h| h.mem.stats()).collect();
    let total = 3 * per_host;
    for s in &stats {
        assert_eq!(s.resident_pages, per_host, "{s:?}");
        assert_eq!(s.owned_pages, per_host);
    }
    assert!(total > stats.iter().map(|s| s.resident_pages).max().unwrap());
    // Every page is still reachable from anywhere.
    for p in (0..total).step_by(7) {
        let gpa = if p < 256 { page(p) } else { high_page(p - 256) };
        assert_eq!(c[(p % 3 + 1) as usize % 3].read(gpa), 0x1000 + p);
    }
}

#[test]
fn vm_memory_view_faults_like_the_guest() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    let c = cluster(2);
    // SAFETY: the views are dropped at the end of this test, before the cluster.
    let (m0, m1) = unsafe {
        (
            c[0].mem.guest_memory().unwrap(),
            c[1].mem.guest_memory().unwrap(),
        )
    };
    assert_eq!(m0.num_regions(), 2);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    // Crosses page boundaries (and homes), like a loader writing a kernel image.
    m0.write_slice(&data, GuestAddress(0x1_0000_0000 + 100))
        .unwrap();
    let mut back = vec![0u8; data.len()];
    m1.read_slice(&mut back, GuestAddress(0x1_0000_0000 + 100))
        .unwrap();
    assert_eq!(back, data);
    m1.write_obj(0xfeed_u64, GuestAddress(0x2000)).unwrap();
    assert_eq!(m0.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0xfeed);
    let r = c[0].mem.regions();
    assert_eq!(r[1].guest_addr, 0x1_0000_0000);
    assert_eq!(
        m0.get_host_address(GuestAddress(0x1_0000_0000)).unwrap() as u64,
        r[1].host_addr
    );
    settle(&c);
}

#[test]
fn dead_peer_is_counted() {
    let mut c = cluster(2);
    let gone = c.pop().unwrap();
    gone.transport.shutdown();
    let end = Instant::now() + Duration::from_secs(5);
    while c[0].mem.stats().peer_downs == 0 {
        assert!(Instant::now() < end, "peer death not reported");
        thread::sleep(Duration::from_millis(10));
    }
}
