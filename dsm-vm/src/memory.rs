//! [`DsmMemory`]: one host's guest RAM, kept coherent with the other hosts'.

use crate::engine::{Engine, Net, PageOps, MAX_HOSTS};
use crate::ram::{self, GuestRam, HomePolicy, Layout};
use crate::stats::{DsmStats, Stats};
use crate::uffd::{self, Uffd};
use log::{debug, error};
use proto::{HostId, Message, Pfn, Service, PAGE_SIZE};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use transport::{Handler, PeerEvent, Responder, Transport};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Errors creating or using a [`DsmMemory`].
#[derive(Debug, Error)]
pub enum Error {
    /// Inconsistent configuration.
    #[error("invalid DSM configuration: {0}")]
    Config(String),
    /// Layout or mapping failure.
    #[error(transparent)]
    Ram(#[from] ram::Error),
    /// userfaultfd failure.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    /// Wrapping the mapping in vm-memory failed.
    #[error("vm-memory: {0}")]
    GuestMemory(String),
    /// Thread or eventfd creation failed.
    #[error("cannot start the fault handler: {0}")]
    Thread(io::Error),
}

/// What a host needs to take part in the DSM (plain serde data, for the VMM's configuration).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DsmConfig {
    /// This host.
    pub local: HostId,
    /// Every host of the cluster, this one included (at most 64).
    pub hosts: Vec<HostId>,
    /// Guest RAM regions (guest-physical start, length); identical on every host.
    pub regions: Vec<(u64, u64)>,
    /// Where each page's directory lives; identical on every host.
    pub home: HomePolicy,
    /// A restore: requests for this host's home pages wait until it has preloaded them
    /// ([`DsmMemory::preload`], then [`DsmMemory::finish_loading`]).
    #[serde(default)]
    pub loading: bool,
}

/// One guest RAM region as mapped on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the mapping (for `KVM_SET_USER_MEMORY_REGION`).
    pub host_addr: u64,
}

/// Called with a page's guest-physical address and last contents just before this host's copy
/// is dropped because another host is about to change it.
pub type DiscardHook = Box<dyn Fn(u64, &[u8; PAGE_SIZE]) + Send + Sync>;

struct UffdPages {
    uffd: Arc<Uffd>,
    ram: Arc<GuestRam>,
    on_discard: Arc<OnceLock<DiscardHook>>,
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl UffdPages {
    fn addr(&self, pfn: Pfn) -> Result<u64, String> {
        pfn.checked_mul(PAGE_SIZE as u64)
            .and_then(|gpa| self.ram.host_addr(gpa))
            .ok_or_else(|| format!("pfn {pfn:#x} is not mapped"))
    }
}

impl PageOps for UffdPages {
    fn install(
        &self,
        pfn: Pfn,
        data: Option<&[u8; PAGE_SIZE]>,
        writable: bool,
    ) -> Result<(), String> {
        let a = self.addr(pfn)?;
        let r = match (data, writable) {
            (Some(d), w) => self.uffd.copy(a, d, w),
            // Exclusive: the shared zero page is fine, the first store allocates silently.
            (None, true) => self.uffd.zeropage(a),
            // Read-only: a real page, so that a later write-protect fault is reported.
            (None, false) => self.uffd.copy(a, &ZERO_PAGE, false),
        };
        r.map_err(|e| e.to_string())
    }
    fn protect(&self, pfn: Pfn) -> Result<(), String> {
        self.uffd
            .write_protect(self.addr(pfn)?, true)
            .map_err(|e| e.to_string())
    }
    fn unprotect(&self, pfn: Pfn) -> Result<(), String> {
        self.uffd
            .write_protect(self.addr(pfn)?, false)
            .map_err(|e| e.to_string())
    }
    fn read(&self, pfn: Pfn, out: &mut [u8; PAGE_SIZE]) {
        match self.addr(pfn) {
            // SAFETY: the engine only reads pages this host holds, which are present (it
            // never faults here) and write-protected or owned by the engine's caller under
            // the engine lock; the mapping lives as long as `self.ram`.
            Ok(a) => unsafe {
                std::ptr::copy_nonoverlapping(a as *const u8, out.as_mut_ptr(), PAGE_SIZE)
            },
            Err(e) => error!("dsm read: {e}"),
        }
    }
    fn discard(&self, pfn: Pfn) -> Result<(), String> {
        if let Some(hook) = self.on_discard.get() {
            let mut page = [0u8; PAGE_SIZE];
            self.read(pfn, &mut page);
            hook(pfn * PAGE_SIZE as u64, &page);
        }
        uffd::discard(self.addr(pfn)?).map_err(|e| e.to_string())
    }
    fn wake(&self, pfn: Pfn) -> Result<(), String> {
        self.uffd.wake(self.addr(pfn)?).map_err(|e| e.to_string())
    }
}

struct TransportNet(Arc<dyn Transport>);

impl Net for TransportNet {
    fn send(&self, to: HostId, msg: Message) -> Result<(), String> {
        self.0.send(to, msg).map_err(|e| e.to_string())
    }
}

type RealEngine = Engine<UffdPages, TransportNet>;

struct Inner {
    /// Written when the engine holds back an acknowledgement, so the fault thread re-arms
    /// its timer.
    kick: OwnedFd,
    engine: Mutex<RealEngine>,
    stats: Arc<Stats>,
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    on_discard: Arc<OnceLock<DiscardHook>>,
    /// Tells whether the VM is stopping (peers going away is then expected).
    stopping: OnceLock<StoppingProbe>,
}

/// Answers whether the VM is stopping (see [`DsmMemory::set_stopping_probe`]).
pub type StoppingProbe = Box<dyn Fn() -> bool + Send + Sync>;

impl Inner {
    fn engine(&self) -> MutexGuard<'_, RealEngine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to our eventfd; a full counter only means a kick
        // is already pending.
        let _ = unsafe {
            libc::write(
                self.kick.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl Handler for Inner {
    fn on_message(&self, from: HostId, msg: Message, responder: Option<Responder>) {
        if responder.is_some() {
            debug!("dsm: request from {from} answered with an error: DSM is one-way");
        }
        let held = {
            let mut e = self.engine();
            e.on_message(from, msg);
            e.release_held(Instant::now())
        };
        if held.is_some() {
            self.kick();
        }
    }
    fn on_peer_event(&self, event: &PeerEvent) {
        if let PeerEvent::Down { peer, reason } = event {
            let expected = self.stopping.get().is_some_and(|p| p());
            self.engine().on_peer_down(*peer, reason, expected);
        }
    }
}

/// This host's share of the distributed guest RAM.
///
/// Owns an anonymous mapping of every guest RAM region, registered with userfaultfd (missing +
/// write-protect), a fault-handler thread and the coherence engine, which also serves the other
/// hosts' requests arriving through the transport. Any thread of the process (vCPU inside
/// `KVM_RUN`, device emulation, loader) may access the mapping; absent or write-protected pages
/// block that thread until the page is granted.
pub struct DsmMemory {
    inner: Arc<Inner>,
    transport: Arc<dyn Transport>,
    local: HostId,
    hosts: Vec<HostId>,
    policy: HomePolicy,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl DsmMemory {
    /// Maps guest RAM, registers it with userfaultfd, starts the fault handler and registers
    /// the DSM service on `transport`. Every host must use the same regions, hosts and policy.
    pub fn new(cfg: DsmConfig, transport: Arc<dyn Transport>) -> Result<DsmMemory, Error> {
        let mut hosts = cfg.hosts.clone();
        hosts.sort();
        hosts.dedup();
        let bad = |s: String| Err(Error::Config(s));
        if hosts.len() != cfg.hosts.len() || hosts.len() > MAX_HOSTS {
            return bad(format!("hosts must be unique and at most {MAX_HOSTS}"));
        }
        if !hosts.contains(&cfg.local) || transport.local() != cfg.local {
            return bad(format!(
                "{} must be in hosts and be the transport's host",
                cfg.local
            ));
        }
        let peers = transport.peers();
        if let Some(h) = hosts
            .iter()
            .find(|h| **h != cfg.local && !peers.contains(h))
        {
            return bad(format!("{h} is not a peer of the transport"));
        }
        let layout = Layout::new(&cfg.regions)?;
        if let Err(e) = cfg.home.check(&hosts, &layout) {
            return bad(e);
        }
        let ram = Arc::new(GuestRam::map(&cfg.regions)?);
        let uffd = Arc::new(Uffd::new()?);
        for (_, len, host) in ram.regions() {
            uffd.register(host, len)?;
        }
        let stats = Arc::new(Stats::default());
        let on_discard = Arc::new(OnceLock::new());
        let pages = UffdPages {
            uffd: uffd.clone(),
            ram: ram.clone(),
            on_discard: on_discard.clone(),
        };
        let net = TransportNet(transport.clone());
        let engine = Engine::new(
            cfg.local,
            hosts.clone(),
            cfg.home.clone(),
            layout,
            pages,
            net,
            stats.clone(),
        );
        // SAFETY: plain syscall; the result is checked and owned below.
        let kfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if kfd < 0 {
            return Err(Error::Thread(io::Error::last_os_error()));
        }
        // SAFETY: `kfd` is a fresh descriptor we own.
        let kick = unsafe { OwnedFd::from_raw_fd(kfd) };
        let mut engine = engine;
        engine.set_hold(hold_from_env());
        if cfg.loading {
            engine.begin_loading();
        }
        let inner = Arc::new(Inner {
            kick,
            engine: Mutex::new(engine),
            stats,
            ram,
            uffd,
            on_discard,
            stopping: OnceLock::new(),
        });
        // SAFETY: plain syscall; the result is checked and owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::Thread(io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh descriptor we own.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let (i2, sfd) = (inner.clone(), stop.as_raw_fd());
        let thread = std::thread::Builder::new()
            .name(format!("dsm-fault-{}", cfg.local.0))
            .spawn(move || fault_loop(&i2, sfd))
            .map_err(Error::Thread)?;
        transport.register(Service::Dsm, inner.clone());
        Ok(DsmMemory {
            inner,
            transport,
            local: cfg.local,
            hosts,
            policy: cfg.home,
            stop,
            thread: Some(thread),
        })
    }

    /// This host.
    pub fn local(&self) -> HostId {
        self.local
    }

    /// The home host of the page holding guest-physical `gpa`.
    pub fn home_of(&self, gpa: u64) -> HostId {
        ram::home_of(&self.policy, &self.hosts, gpa / PAGE_SIZE as u64)
    }

    /// The regions as mapped here (register these with KVM).
    pub fn regions(&self) -> Vec<RegionInfo> {
        let mut v: Vec<RegionInfo> = self
            .inner
            .ram
            .regions()
            .map(|(guest_addr, size, host_addr)| RegionInfo {
                guest_addr,
                size,
                host_addr,
            })
            .collect();
        v.sort_by_key(|r| r.guest_addr);
        v
    }

    /// Host pointer to guest-physical `gpa`, if it is guest RAM. Accessing it may block on a
    /// fault until the page arrives; never do that on a transport receive thread.
    pub fn ptr(&self, gpa: u64) -> Option<*mut u8> {
        self.inner.ram.host_addr(gpa).map(|a| a as *mut u8)
    }

    /// A `vm_memory` view of the mapping for the VMM's loaders and devices.
    ///
    /// # Safety
    /// The returned memory does not own the mapping: it (and every clone of it, and every
    /// device holding one) must be dropped before this `DsmMemory`.
    pub unsafe fn guest_memory(&self) -> Result<GuestMemoryMmap, Error> {
        let mut regions = Vec::new();
        for r in self.regions() {
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            // SAFETY: `host_addr..+size` is a live mapping owned by `self.inner.ram`, created
            // with exactly these protections and flags; the caller keeps `self` alive longer
            // than the returned regions (this function's contract).
            let m = unsafe {
                MmapRegion::<()>::build_raw(r.host_addr as *mut u8, r.size as usize, prot, flags)
            }
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
            let g = GuestRegionMmap::new(m, GuestAddress(r.guest_addr))
                .ok_or_else(|| Error::GuestMemory("region wraps around".into()))?;
            regions.push(g);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| Error::GuestMemory(e.to_string()))
    }

    /// Whether this host has no request outstanding and runs no transaction as home (a
    /// cluster where every host is idle has no page in flight).
    pub fn is_idle(&self) -> bool {
        self.inner.engine().is_quiescent()
    }

    /// Installs the saved contents of the page at `gpa` (page aligned, homed here) during a
    /// restore (a [`DsmConfig::loading`] memory): this host becomes its owner. No thread may
    /// touch the page before.
    pub fn preload(&self, gpa: u64, data: &[u8; PAGE_SIZE]) -> Result<(), Error> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Error::Config(format!("preload at unaligned {gpa:#x}")));
        }
        self.inner
            .engine()
            .preload(gpa / PAGE_SIZE as u64, data)
            .map_err(|e| Error::Config(format!("preload at {gpa:#x}: {e}")))
    }

    /// Lazy restore (on a [`DsmConfig::loading`] memory, before [`DsmMemory::finish_loading`]):
    /// home pages nobody has touched are granted `backing`'s contents when first asked for.
    pub fn set_backing(&self, backing: crate::engine::Backing) {
        self.inner.engine().set_backing(backing);
    }

    /// Ends a restore's loading: the requests held meanwhile are served.
    pub fn finish_loading(&self) {
        let held = {
            let mut e = self.inner.engine();
            e.finish_loading();
            e.release_held(Instant::now())
        };
        if held.is_some() {
            self.inner.kick();
        }
    }

    /// A handle for the snapshot writer (it outlives nothing: the `DsmMemory` must live).
    pub fn handle(&self) -> DsmHandle {
        DsmHandle {
            inner: self.inner.clone(),
        }
    }

    /// Installs (once) the hook called before a copy of a page is dropped on invalidation. The
    /// VMM uses it to learn that KVM's shadow page tables built from that page may be stale.
    /// The hook runs under the DSM lock: it must be quick and must not touch guest RAM.
    pub fn set_discard_hook(&self, hook: DiscardHook) {
        let _ = self.inner.on_discard.set(hook);
    }

    /// Installs (once) the probe that tells whether the VM is stopping: a peer that goes away
    /// then is an expected part of the stop (logged at info), not a failure.
    pub fn set_stopping_probe(&self, probe: StoppingProbe) {
        let _ = self.inner.stopping.set(probe);
    }

    /// The live counters, for a reporter thread.
    pub fn stats_source(&self) -> Arc<crate::stats::Stats> {
        self.inner.stats.clone()
    }

    /// A snapshot of this host's counters.
    pub fn stats(&self) -> DsmStats {
        self.inner.stats.snapshot()
    }

    /// Stops the fault handler and leaves the cluster's DSM service (idempotent). Threads
    /// still faulting on guest RAM stay blocked until this value is dropped, which closes the
    /// userfaultfd (they then see plain anonymous memory): stop vCPUs and devices first.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let one = 1u64;
            // SAFETY: writes 8 bytes from `one` to our eventfd.
            let _ = unsafe {
                libc::write(
                    self.stop.as_raw_fd(),
                    (&raw const one).cast::<libc::c_void>(),
                    8,
                )
            };
            let _ = t.join();
            self.transport.unregister(Service::Dsm);
        }
    }
}

impl Drop for DsmMemory {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the snapshot writer asks the DSM of a paused cluster.
#[derive(Clone)]
pub struct DsmHandle {
    inner: Arc<Inner>,
}

impl DsmHandle {
    /// Whether this host has no request outstanding and runs no transaction as home.
    pub fn is_idle(&self) -> bool {
        self.inner.engine().is_quiescent()
    }

    /// Lazy restore, behind the guest: loads home page `gpa` from the backing and installs it
    /// here (this host its owner) unless some host touched it already. Returns whether data
    /// was installed.
    pub fn prefetch(&self, gpa: u64) -> Result<bool, Error> {
        self.inner
            .engine()
            .prefetch(gpa / PAGE_SIZE as u64)
            .map_err(|e| Error::Config(format!("prefetch at {gpa:#x}: {e}")))
    }

    /// The home host of the page holding guest-physical `gpa`.
    pub fn home_of(&self, gpa: u64) -> HostId {
        self.inner.engine().home(gpa / PAGE_SIZE as u64)
    }

    /// The guest-physical addresses of the pages this host writes into a snapshot of the
    /// paused, quiescent cluster: the pages it owns, and those homed here that are only
    /// shared (reading one may fetch a copy). Every page that holds data is in exactly one
    /// host's list; the others were never touched.
    pub fn snapshot_pages(&self) -> Vec<u64> {
        self.inner
            .engine()
            .snapshot_duty()
            .into_iter()
            .map(|pfn| pfn * PAGE_SIZE as u64)
            .collect()
    }
}

/// Default time a host keeps a page it was just granted (see `Engine::set_hold`); overridden
/// by `SSI_VMM_DSM_HOLD_US`.
pub const DEFAULT_HOLD: Duration = Duration::from_micros(500);

/// Longest hold `SSI_VMM_DSM_HOLD_US` may ask for (longer would stall every write transfer).
pub const MAX_HOLD: Duration = Duration::from_millis(100);

fn hold_from_env() -> Duration {
    let hold = std::env::var("SSI_VMM_DSM_HOLD_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_micros)
        .unwrap_or(DEFAULT_HOLD);
    if hold > MAX_HOLD {
        log::warn!("SSI_VMM_DSM_HOLD_US above {MAX_HOLD:?}; using {MAX_HOLD:?}");
        return MAX_HOLD;
    }
    hold
}

fn fault_loop(inner: &Inner, stop: i32) {
    let mut faults = Vec::with_capacity(64);
    let mut next: Option<Instant> = None;
    loop {
        let timeout = next.map(|t| {
            let d = t.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
            }
        });
        let mut fds = [
            libc::pollfd {
                fd: inner.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: inner.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let tp = timeout
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `fds` is a valid array of three pollfd and `tp` null or a valid timespec for
        // the duration of the call.
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 3, tp, std::ptr::null()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("dsm fault handler: poll: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[2].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v` from our non-blocking eventfd.
            let _ = unsafe {
                libc::read(
                    inner.kick.as_raw_fd(),
                    (&mut v as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
        faults.clear();
        if fds[0].revents != 0 {
            if let Err(e) = inner.uffd.read_faults(&mut faults) {
                error!("dsm fault handler: {e}");
                return;
            }
        }
        let mut engine = inner.engine();
        for f in &faults {
            match inner.ram.guest_addr(f.addr) {
                Some(gpa) => engine.on_fault(gpa / PAGE_SIZE as u64, f.write, f.wp),
                None => error!("dsm: fault at {:#x} outside guest RAM", f.addr),
            }
        }
        next = engine.release_held(Instant::now());
    }
}
