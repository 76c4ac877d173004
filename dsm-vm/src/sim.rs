//! Randomized simulation of the protocol engine (tests only).
//!
//! Several engines over in-memory pages exchange messages that are delivered in a random
//! order (no FIFO between any pair of hosts), while simulated vCPUs read and write pages;
//! faults reach the engine after a random delay (stale faults included), like userfaultfd
//! messages read late. After every step the coherence invariants are checked: at most one
//! writable copy and then no other copy, every present copy equal to the last value written.
//! At the end the system must be quiescent and the directories must match the hosts' states.
//!
//! Write grants are held back as in production ([`Engine::set_hold`]): every engine reads a
//! virtual clock that the schedule advances by random steps, and "release the held
//! acknowledgements that are due" is one more random step (the production timer thread).
//!
//! The fixed seeds run in every `cargo test`; `SSI_DSM_SIM_SEEDS=N` adds N random schedules
//! (default 20) from a base seed that is printed, or taken from `SSI_DSM_SIM_SEED` to replay
//! one; a failing schedule names its seed. A long soak: `SSI_DSM_SIM_SEEDS=100000 cargo test
//! --release -p dsm-vm --lib sim`.

use crate::engine::{Clock, Engine, Local, Net, PageOps};
use crate::ram::{HomePolicy, Layout};
use crate::stats::Stats;
use proto::{HostId, Message, Pfn, PAGE_SIZE};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Page = Box<[u8; PAGE_SIZE]>;

#[derive(Default)]
struct FakeMem {
    pages: RefCell<HashMap<Pfn, (Page, bool)>>,
    woken: RefCell<HashSet<Pfn>>,
    /// A deliberately broken host: invalidations keep the stale copy (the checks must notice).
    keep_stale: std::cell::Cell<bool>,
}

impl PageOps for Rc<FakeMem> {
    fn install(
        &self,
        pfn: Pfn,
        data: Option<&[u8; PAGE_SIZE]>,
        writable: bool,
    ) -> Result<(), String> {
        let mut p = self.pages.borrow_mut();
        if p.contains_key(&pfn) {
            return Err("EEXIST".into());
        }
        let page = Box::new(data.copied().unwrap_or([0; PAGE_SIZE]));
        p.insert(pfn, (page, writable));
        self.woken.borrow_mut().insert(pfn);
        Ok(())
    }
    fn protect(&self, pfn: Pfn) -> Result<(), String> {
        let mut p = self.pages.borrow_mut();
        p.get_mut(&pfn).ok_or("protect: absent")?.1 = false;
        Ok(())
    }
    fn unprotect(&self, pfn: Pfn) -> Result<(), String> {
        let mut p = self.pages.borrow_mut();
        p.get_mut(&pfn).ok_or("unprotect: absent")?.1 = true;
        self.woken.borrow_mut().insert(pfn);
        Ok(())
    }
    fn read(&self, pfn: Pfn, out: &mut [u8; PAGE_SIZE]) {
        let p = self.pages.borrow();
        // The real engine would deadlock here: it must never read an absent page.
        out.copy_from_slice(&p.get(&pfn).expect("engine read an absent page").0[..]);
    }
    fn discard(&self, pfn: Pfn) -> Result<(), String> {
        if self.keep_stale.get() {
            return Ok(());
        }
        self.pages.borrow_mut().remove(&pfn);
        Ok(())
    }
    fn wake(&self, pfn: Pfn) -> Result<(), String> {
        self.woken.borrow_mut().insert(pfn);
        Ok(())
    }
}

type Wire = Rc<RefCell<Vec<(HostId, HostId, Message)>>>;

struct FakeNet {
    me: HostId,
    wire: Wire,
}

impl Net for FakeNet {
    fn send(&self, to: HostId, msg: Message) -> Result<(), String> {
        self.wire.borrow_mut().push((self.me, to, msg));
        Ok(())
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vcpu {
    Ready,
    Waiting(Pfn),
    Done,
}

struct Sim {
    engines: Vec<Engine<Rc<FakeMem>, FakeNet>>,
    mems: Vec<Rc<FakeMem>>,
    wire: Wire,
    faults: Vec<Vec<(Pfn, bool, bool)>>,
    truth: HashMap<Pfn, u64>,
    next_value: u64,
    pages: u64,
    /// Virtual time in ns since the clock's base, advanced by the schedule.
    now_ns: Arc<AtomicU64>,
    /// The virtual clock every engine reads.
    clock: Clock,
    hold: Duration,
}

impl Sim {
    fn new(hosts: u16, pages: u64, chunk: u64) -> Sim {
        Sim::with_hold(hosts, pages, chunk, Duration::ZERO)
    }

    /// A simulation whose engines hold write grants for `hold` of virtual time.
    fn with_hold(hosts: u16, pages: u64, chunk: u64, hold: Duration) -> Sim {
        let now_ns = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let t = now_ns.clone();
        let clock: Clock = Arc::new(move || base + Duration::from_nanos(t.load(Ordering::Relaxed)));
        let ids: Vec<HostId> = (0..hosts).map(HostId).collect();
        let wire: Wire = Rc::default();
        let layout = Layout::new(&[(0, pages * PAGE_SIZE as u64)]).unwrap();
        let mut engines = Vec::new();
        let mut mems = Vec::new();
        for &h in &ids {
            let mem = Rc::new(FakeMem::default());
            let net = FakeNet {
                me: h,
                wire: wire.clone(),
            };
            let policy = HomePolicy::Interleave { chunk_pages: chunk };
            let stats = Arc::new(Stats::default());
            let mut e = Engine::new(
                h,
                ids.clone(),
                policy,
                layout.clone(),
                mem.clone(),
                net,
                stats,
            );
            e.set_clock(clock.clone());
            e.set_hold(hold);
            engines.push(e);
            mems.push(mem);
        }
        Sim {
            engines,
            mems,
            wire,
            faults: vec![Vec::new(); hosts as usize],
            truth: HashMap::new(),
            next_value: 1,
            pages,
            now_ns,
            clock,
            hold,
        }
    }

    /// Tries one access; returns whether it completed.
    fn access(&mut self, h: usize, pfn: Pfn, write: bool) -> bool {
        let mut pages = self.mems[h].pages.borrow_mut();
        match pages.get_mut(&pfn) {
            Some((page, writable)) if !write || *writable => {
                let v = u64::from_le_bytes(page[..8].try_into().unwrap());
                assert_eq!(v, self.truth.get(&pfn).copied().unwrap_or(0), "stale read");
                if write {
                    page[..8].copy_from_slice(&self.next_value.to_le_bytes());
                    self.truth.insert(pfn, self.next_value);
                    self.next_value += 1;
                }
                true
            }
            present => {
                let wp = present.is_some();
                self.faults[h].push((pfn, write, wp));
                false
            }
        }
    }

    fn check(&self) {
        for pfn in 0..self.pages {
            let mut present = 0;
            let mut writable = 0;
            for m in &self.mems {
                if let Some((page, w)) = m.pages.borrow().get(&pfn) {
                    present += 1;
                    writable += usize::from(*w);
                    let v = u64::from_le_bytes(page[..8].try_into().unwrap());
                    assert_eq!(v, self.truth.get(&pfn).copied().unwrap_or(0), "stale copy");
                }
            }
            assert!(writable <= 1, "pfn {pfn}: {writable} writable copies");
            assert!(
                writable == 0 || present == 1,
                "pfn {pfn}: writer with readers"
            );
        }
    }

    fn run(&mut self, seed: u64, vcpus_per_host: usize, ops: usize) {
        let mut rng = Rng(seed | 1);
        let hosts = self.engines.len();
        let mut vcpus: Vec<(usize, Vcpu, usize, (Pfn, bool))> = Vec::new();
        for h in 0..hosts {
            for _ in 0..vcpus_per_host {
                vcpus.push((h, Vcpu::Ready, 0, (u64::MAX, false)));
            }
        }
        let mut steps = 0u64;
        loop {
            steps += 1;
            assert!(steps < 2_000_000, "no progress");
            let ready: Vec<usize> = (0..vcpus.len())
                .filter(|&i| vcpus[i].1 == Vcpu::Ready)
                .collect();
            let inflight = self.wire.borrow().len();
            let fault_hosts: Vec<usize> =
                (0..hosts).filter(|&h| !self.faults[h].is_empty()).collect();
            let held = self.engines.iter().any(|e| e.has_held());
            if ready.is_empty() && inflight == 0 && fault_hosts.is_empty() && !held {
                let stuck: Vec<_> = vcpus.iter().filter(|v| v.1 != Vcpu::Done).collect();
                assert!(stuck.is_empty(), "deadlock: {stuck:?}");
                break;
            }
            match rng.below(5) {
                0 if !ready.is_empty() => {
                    let i = ready[rng.below(ready.len())];
                    let (h, _, _, op) = &mut vcpus[i];
                    let h = *h;
                    if op.0 == u64::MAX {
                        *op = (rng.below(self.pages as usize) as u64, rng.below(2) == 0);
                    }
                    let (pfn, write) = *op;
                    if self.access(h, pfn, write) {
                        let v = &mut vcpus[i];
                        v.2 += 1;
                        v.3 = (u64::MAX, false);
                        v.1 = if v.2 >= ops { Vcpu::Done } else { Vcpu::Ready };
                    } else {
                        vcpus[i].1 = Vcpu::Waiting(pfn);
                    }
                }
                1 if inflight > 0 => {
                    let (from, to, msg) = self.wire.borrow_mut().swap_remove(rng.below(inflight));
                    self.engines[usize::from(to.0)].on_message(from, msg);
                }
                2 if !fault_hosts.is_empty() => {
                    let h = fault_hosts[rng.below(fault_hosts.len())];
                    let k = rng.below(self.faults[h].len());
                    let (pfn, w, wp) = self.faults[h].remove(k);
                    self.engines[h].on_fault(pfn, w, wp);
                }
                // Virtual time passes: up to two holds at once, so acknowledgements fall due
                // both before and after other steps.
                3 => {
                    let max = (2 * self.hold.as_nanos() as u64).max(1);
                    let step = rng.next() % (max + 1);
                    self.now_ns.fetch_add(step, Ordering::Relaxed);
                    continue;
                }
                // One host's timer releases its due acknowledgements.
                4 => {
                    let h = rng.below(hosts);
                    let now = (self.clock)();
                    self.engines[h].release_held(now);
                }
                _ => continue,
            }
            for (h, m) in self.mems.iter().enumerate() {
                let woken: Vec<Pfn> = m.woken.borrow_mut().drain().collect();
                for v in vcpus.iter_mut().filter(|v| v.0 == h) {
                    if let Vcpu::Waiting(p) = v.1 {
                        if woken.contains(&p) {
                            v.1 = Vcpu::Ready;
                        }
                    }
                }
            }
            self.check();
        }
        self.check_directories();
    }

    fn stats(&self) -> (u64, u64) {
        let mut txns = 0;
        for e in &self.engines {
            let s = e.stats().snapshot();
            assert_eq!(s.protocol_errors, 0, "{s:?}");
            txns += s.home_transactions;
        }
        (txns, self.next_value - 1)
    }

    fn check_directories(&self) {
        for pfn in 0..self.pages {
            let states: Vec<Local> = self
                .engines
                .iter()
                .map(|e| e.local_state(pfn).unwrap())
                .collect();
            for (h, m) in self.mems.iter().enumerate() {
                let present = m.pages.borrow().get(&pfn).map(|p| p.1);
                let want = match states[h] {
                    Local::Invalid => None,
                    Local::Shared => Some(false),
                    Local::Exclusive => Some(true),
                };
                assert_eq!(present, want, "host {h} pfn {pfn}: mapping vs state");
            }
        }
        for e in &self.engines {
            assert!(e.is_quiescent(), "engine not quiescent at the end");
        }
        for pfn in 0..self.pages {
            let home = self.engines[0].home(pfn);
            let (owner, sharers) = self.engines[usize::from(home.0)].dir_state(pfn);
            for (h, e) in self.engines.iter().enumerate() {
                let id = HostId(h as u16);
                let want = if owner == Some(id) {
                    Local::Exclusive
                } else if sharers.contains(&id) {
                    Local::Shared
                } else {
                    Local::Invalid
                };
                assert_eq!(
                    e.local_state(pfn),
                    Some(want),
                    "pfn {pfn} host {h} vs directory"
                );
            }
        }
    }
}

/// One schedule from `seed`: 2-4 hosts, a few pages, holds of 0-3 ms of virtual time. A failure
/// names the seed (replay: `SSI_DSM_SIM_SEED=<seed> SSI_DSM_SIM_SEEDS=1`).
fn run_seed(seed: u64) -> (u64, u64) {
    let r = std::panic::catch_unwind(|| {
        let mix = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let hosts = 2 + (seed % 3) as u16;
        let hold = Duration::from_micros(mix % 4 * 1000);
        let mut sim = Sim::with_hold(hosts, 3, 1 + seed % 2, hold);
        sim.run(mix, 2, 30);
        sim.stats()
    });
    match r {
        Ok(x) => x,
        Err(e) => {
            eprintln!("dsm sim: schedule with seed {seed} failed");
            std::panic::resume_unwind(e)
        }
    }
}

#[test]
fn random_schedules_keep_pages_coherent() {
    let (mut txns, mut writes) = (0, 0);
    for seed in 1..=300u64 {
        let (t, w) = run_seed(seed);
        txns += t;
        writes += w;
    }
    assert!(
        txns > 10_000 && writes > 10_000,
        "{txns} transactions, {writes} writes"
    );
}

/// More schedules from a random (printed) or given base seed: `SSI_DSM_SIM_SEEDS=N` (default
/// 20), `SSI_DSM_SIM_SEED=S`.
#[test]
fn random_seeds_keep_pages_coherent() {
    let count: u64 = std::env::var("SSI_DSM_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base: u64 = std::env::var("SSI_DSM_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ u64::from(std::process::id()) << 32
        });
    eprintln!("dsm sim: {count} schedules from base seed {base} (SSI_DSM_SIM_SEED={base} replays)");
    for i in 0..count {
        run_seed(base.wrapping_add(i));
    }
}

/// The simulator's checks can fail: a host whose invalidations keep the stale copy is caught.
#[test]
fn a_host_that_keeps_invalidated_copies_is_caught() {
    let caught = (1..=20u64).all(|seed| {
        std::panic::catch_unwind(|| {
            let mut sim = Sim::with_hold(3, 2, 1, Duration::from_millis(1));
            sim.mems[1].keep_stale.set(true);
            sim.run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 2, 30);
        })
        .is_err()
    });
    assert!(caught, "a stale copy went unnoticed");
}

#[test]
fn hot_single_page_with_many_vcpus() {
    for seed in 1..=50u64 {
        let hold = Duration::from_millis(seed % 2);
        let mut sim = Sim::with_hold(3, 1, 1, hold);
        sim.run(seed.wrapping_mul(0xd1b5_4a32_d192_ed03), 3, 40);
        sim.stats();
    }
}

#[test]
fn untouched_pages_cost_no_page_transfer() {
    let mut sim = Sim::new(2, 4, 1);
    // Host 0 reads every page once: pages homed on host 1 cost a request, never page data.
    for pfn in 0..4 {
        assert!(!sim.access(0, pfn, false));
        let (p, w, wp) = sim.faults[0].pop().unwrap();
        sim.engines[0].on_fault(p, w, wp);
        loop {
            let next = sim.wire.borrow_mut().pop();
            let Some((from, to, msg)) = next else { break };
            assert!(!matches!(msg, Message::PageData { .. }), "{msg:?}");
            sim.engines[usize::from(to.0)].on_message(from, msg);
        }
        assert!(sim.access(0, pfn, false));
    }
}

#[test]
fn a_second_queued_request_from_one_host_is_refused_and_the_first_still_served() {
    let mut sim = Sim::new(3, 1, 1);
    let fault = |sim: &mut Sim, h: usize| {
        let (p, w, wp) = sim.faults[h].pop().unwrap();
        sim.engines[h].on_fault(p, w, wp);
    };
    let take = |sim: &Sim, to: u16| {
        let mut wire = sim.wire.borrow_mut();
        let i = wire.iter().position(|(_, t, _)| t.0 == to).unwrap();
        wire.remove(i)
    };
    // Host 1 writes the page (homed on host 0): granted, its acknowledgement kept back, so the
    // home stays busy on the page.
    assert!(!sim.access(1, 0, true));
    fault(&mut sim, 1);
    let (from, _, req) = take(&sim, 0);
    sim.engines[0].on_message(from, req);
    let (from, _, grant) = take(&sim, 1);
    sim.engines[1].on_message(from, grant);
    assert!(sim.access(1, 0, true));
    let ack = take(&sim, 0);
    // Host 2 reads it: queued behind the busy transaction.
    assert!(!sim.access(2, 0, false));
    fault(&mut sim, 2);
    let (from, _, req) = take(&sim, 0);
    sim.engines[0].on_message(from, req.clone());
    assert!(sim.wire.borrow().is_empty(), "the first request is queued");
    // The same request again (a hostile or broken peer): refused, not queued.
    sim.engines[0].on_message(from, req);
    let (_, to, nack) = take(&sim, 2);
    assert_eq!(to, HostId(2));
    assert!(matches!(nack, Message::Nack { .. }), "{nack:?}");
    assert!(sim.wire.borrow().is_empty());
    // The queued request is served once the first transaction ends.
    sim.engines[0].on_message(ack.0, ack.2);
    loop {
        let next = sim.wire.borrow_mut().pop();
        let Some((from, to, msg)) = next else { break };
        sim.engines[usize::from(to.0)].on_message(from, msg);
    }
    assert!(sim.access(2, 0, false));
    sim.check();
}

fn first_word(page: &[u8; PAGE_SIZE]) -> u64 {
    u64::from_le_bytes(page[..8].try_into().unwrap())
}

/// A quiescent cluster's snapshot duties give every page that holds data to exactly one
/// host, and a restore that preloads those pages at their homes, under another host count and
/// another home interleave, serves the same values to random accesses afterwards.
#[test]
fn snapshot_duties_partition_the_pages_and_a_preloaded_restore_reads_them_back() {
    for seed in 1..=100u64 {
        let mix = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let hosts = 2 + (seed % 3) as u16;
        let mut sim = Sim::with_hold(hosts, 6, 1 + seed % 2, Duration::from_millis(seed % 2));
        sim.run(mix, 2, 30);
        let mut saved: HashMap<Pfn, u64> = HashMap::new();
        for e in &sim.engines {
            for pfn in e.snapshot_duty() {
                let v = sim
                    .mems
                    .iter()
                    .find_map(|m| m.pages.borrow().get(&pfn).map(|p| first_word(&p.0)))
                    .unwrap_or_else(|| panic!("seed {seed}: duty pfn {pfn} is held nowhere"));
                assert!(
                    saved.insert(pfn, v).is_none(),
                    "seed {seed}: pfn {pfn} twice"
                );
            }
        }
        for (pfn, v) in &sim.truth {
            assert_eq!(saved.get(pfn), Some(v), "seed {seed}: written pfn {pfn}");
        }
        for m in &sim.mems {
            for pfn in m.pages.borrow().keys() {
                assert!(
                    saved.contains_key(pfn),
                    "seed {seed}: held pfn {pfn} not saved"
                );
            }
        }

        let saved_copy = saved.clone();
        let hosts2 = 1 + (seed % 4) as u16;
        let mut r = Sim::with_hold(hosts2, 6, 1 + seed % 3, Duration::from_millis(seed % 2));
        for e in &mut r.engines {
            e.begin_loading();
        }
        for (&pfn, &v) in &saved {
            let home = usize::from(r.engines[0].home(pfn).0);
            let mut page = [0u8; PAGE_SIZE];
            page[..8].copy_from_slice(&v.to_le_bytes());
            r.engines[home].preload(pfn, &page).unwrap();
            assert!(r.engines[home].preload(pfn, &page).is_err(), "loaded twice");
        }
        r.truth = saved.into_iter().filter(|(_, v)| *v != 0).collect();
        r.next_value = sim.next_value;
        for e in &mut r.engines {
            e.finish_loading();
        }
        r.check();
        r.run(mix ^ 0x5555, 2, 30);
        r.stats();

        // The same restore, lazily: nothing preloaded, each home serves its pages from the
        // saved contents on first request, and streams in (prefetches) some of them.
        let mut l = Sim::with_hold(hosts2, 6, 1 + seed % 3, Duration::from_millis(seed % 2));
        for e in &mut l.engines {
            e.begin_loading();
            let saved = saved_copy.clone();
            e.set_backing(Box::new(move |pfn| {
                Ok(saved.get(&pfn).filter(|v| **v != 0).map(|v| {
                    let mut b = proto::PageBuf::zeroed();
                    b.0[..8].copy_from_slice(&v.to_le_bytes());
                    b
                }))
            }));
        }
        l.truth = saved_copy
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(p, v)| (*p, *v))
            .collect();
        l.next_value = sim.next_value;
        for e in &mut l.engines {
            e.finish_loading();
        }
        for pfn in (0..6).filter(|p| p % 2 == seed % 2) {
            let home = usize::from(l.engines[0].home(pfn).0);
            l.engines[home].prefetch(pfn).unwrap();
        }
        l.check();
        l.run(mix ^ 0xaaaa, 2, 30);
        l.stats();
    }
}

/// While a restore is loading, a request for a page that is not loaded yet waits: it is
/// granted, with the saved data, only once the home has finished loading.
#[test]
fn requests_wait_until_the_home_has_loaded() {
    let mut sim = Sim::new(2, 2, 1);
    for e in &mut sim.engines {
        e.begin_loading();
    }
    // Page 0 is homed on host 0; host 1 reads it first.
    assert!(!sim.access(1, 0, false));
    let (p, w, wp) = sim.faults[1].pop().unwrap();
    sim.engines[1].on_fault(p, w, wp);
    let (from, to, req) = sim.wire.borrow_mut().pop().unwrap();
    assert_eq!(to, HostId(0));
    sim.engines[0].on_message(from, req);
    assert!(sim.wire.borrow().is_empty(), "no grant while loading");
    let mut page = [0u8; PAGE_SIZE];
    page[..8].copy_from_slice(&42u64.to_le_bytes());
    sim.engines[0].preload(0, &page).unwrap();
    // A page homed elsewhere cannot be preloaded here.
    assert!(sim.engines[0].preload(1, &page).is_err());
    sim.truth.insert(0, 42);
    sim.engines[0].finish_loading();
    loop {
        let next = sim.wire.borrow_mut().pop();
        let Some((from, to, msg)) = next else { break };
        sim.engines[usize::from(to.0)].on_message(from, msg);
    }
    assert!(sim.access(1, 0, false), "granted after the load");
    sim.check();
    sim.engines[1].finish_loading();
    assert!(sim.engines.iter().all(|e| e.is_quiescent()));
}
