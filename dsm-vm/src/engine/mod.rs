//! The coherence protocol engine of one host, in its three roles:
//!
//! - **requester**: turns a fault into a `ReadReq`/`WriteReq` to the page's home (at most one
//!   outstanding per page) and installs the `Grant`;
//! - **holder**: answers `Fetch` (copy, downgrade, invalidate) and `Invalidate` for pages it has;
//! - **home**: keeps the directory of its pages and runs one transaction per page at a time,
//!   queueing the others, until the requester's `GrantAck`.
//!
//! The engine is a state machine behind one lock; it never blocks and never touches a page
//! that is not present (only holders read pages, and a holder's copy stays present until the
//! engine itself drops it). Memory and network are behind [`PageOps`] and [`Net`] so the same
//! code runs over userfaultfd + a transport, or over the in-memory simulator of the tests.
//! Messages to itself go through a local queue, drained before the engine returns.

use crate::ram::{home_of, HomePolicy, Layout};
use crate::stats::Stats;
use log::{error, trace, warn};
use proto::{Access, Content, FetchMode, HostId, Message, NackReason, PageBuf, Pfn, PAGE_SIZE};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod home;
use home::DirEntry;

/// Page operations on this host's mapping. Errors are strings for the log.
pub(crate) trait PageOps {
    /// Installs a missing page (zeros when `data` is `None`), writable or write-protected,
    /// and wakes the threads waiting on it.
    fn install(
        &self,
        pfn: Pfn,
        data: Option<&[u8; PAGE_SIZE]>,
        writable: bool,
    ) -> Result<(), String>;
    /// Write-protects a present page.
    fn protect(&self, pfn: Pfn) -> Result<(), String>;
    /// Makes a present page writable and wakes its waiters.
    fn unprotect(&self, pfn: Pfn) -> Result<(), String>;
    /// Copies a present page.
    fn read(&self, pfn: Pfn, out: &mut [u8; PAGE_SIZE]);
    /// Drops a present page (the next access faults as missing).
    fn discard(&self, pfn: Pfn) -> Result<(), String>;
    /// Wakes the threads waiting on a page.
    fn wake(&self, pfn: Pfn) -> Result<(), String>;
}

/// Sends a message to another host.
pub(crate) trait Net {
    /// Queues `msg` for `to`.
    fn send(&self, to: HostId, msg: Message) -> Result<(), String>;
}

/// This host's access to a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Local {
    /// Not present.
    Invalid,
    /// Present, write-protected.
    Shared,
    /// Present, writable (this host is the owner).
    Exclusive,
}

/// Where a lazy restore's pages come from: the saved contents of a page homed here, read when
/// the page is first asked for (`Ok(None)`: a zero or never-touched page). An error is
/// reported by the VMM (which stops the VM) and the page is granted as zero.
pub type Backing = Box<dyn Fn(Pfn) -> Result<Option<PageBuf>, String> + Send>;

/// Largest cluster the directory's host bit sets can describe.
pub(crate) const MAX_HOSTS: usize = 64;

/// Where the engine reads the time (the hold of write grants); a virtual clock in the simulator.
pub(crate) type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

pub(crate) struct Engine<P, N> {
    me: HostId,
    hosts: Vec<HostId>,
    policy: HomePolicy,
    layout: Layout,
    local: Vec<Local>,
    pending: HashMap<Pfn, Access>,
    dir: HashMap<Pfn, DirEntry>,
    next_txn: u64,
    inbox: VecDeque<(HostId, Message)>,
    /// Grant acknowledgements held back until the given instant (see [`Engine::set_hold`]).
    held: VecDeque<(Instant, HostId, Message)>,
    hold: Duration,
    clock: Clock,
    pages: P,
    net: N,
    stats: Arc<Stats>,
    /// Restoring: the home pages are being preloaded ([`Engine::preload`]); requests for them
    /// wait in `deferred` until [`Engine::finish_loading`].
    loading: bool,
    deferred: Vec<(HostId, Pfn, Access)>,
    /// Lazy restore: the saved contents of home pages nobody has touched yet.
    backing: Option<Backing>,
}

/// Fault injection (`FAILPOINTS=dsm-invalidate-keep-stale-copy=return`, feature
/// `failpoints`): an invalidated copy stays mapped, which the checks must catch.
fn keep_stale_copy() -> bool {
    fail::fail_point!("dsm-invalidate-keep-stale-copy", |_| true);
    false
}

fn bits(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if set == 0 {
            None
        } else {
            let i = set.trailing_zeros() as usize;
            set &= set - 1;
            Some(i)
        }
    })
}

impl<P: PageOps, N: Net> Engine<P, N> {
    /// `hosts` must be sorted, unique, at most [`MAX_HOSTS`], and contain `me`.
    pub(crate) fn new(
        me: HostId,
        hosts: Vec<HostId>,
        policy: HomePolicy,
        layout: Layout,
        pages: P,
        net: N,
        stats: Arc<Stats>,
    ) -> Self {
        Engine {
            me,
            hosts,
            policy,
            local: vec![Local::Invalid; layout.pages()],
            layout,
            pending: HashMap::new(),
            dir: HashMap::new(),
            next_txn: 1,
            inbox: VecDeque::new(),
            held: VecDeque::new(),
            hold: Duration::ZERO,
            clock: Arc::new(Instant::now),
            pages,
            net,
            stats,
            loading: false,
            deferred: Vec::new(),
            backing: None,
        }
    }

    /// Lazy restore: the first request for a home page nobody has touched since the restore
    /// is granted `backing`'s contents instead of zeros.
    pub(crate) fn set_backing(&mut self, backing: Backing) {
        self.backing = Some(backing);
    }

    /// The saved contents of untouched home page `pfn`, if there is a backing and it has data.
    fn backed(&self, pfn: Pfn) -> Option<PageBuf> {
        let b = self.backing.as_ref()?;
        match b(pfn) {
            Ok(page) => {
                if page.is_some() {
                    Stats::add(&self.stats.pages_backed, 1);
                }
                page
            }
            Err(e) => {
                self.fail(format_args!("saved contents of pfn {pfn:#x}: {e}"));
                None
            }
        }
    }

    /// Lazy restore, streaming behind the guest: loads home page `pfn` from the backing and
    /// installs it here as its owner, unless somebody touched it already. Returns whether it
    /// installed data.
    pub(crate) fn prefetch(&mut self, pfn: Pfn) -> Result<bool, String> {
        let Some(i) = self.layout.index(pfn) else {
            return Err(format!("pfn {pfn:#x} is not guest RAM"));
        };
        if self.home(pfn) != self.me
            || self.loading
            || self.dir.contains_key(&pfn)
            || self.local[i] != Local::Invalid
            || self.pending.contains_key(&pfn)
        {
            return Ok(false);
        }
        let Some(page) = self.backed(pfn) else {
            return Ok(false);
        };
        self.pages.install(pfn, Some(&page.0), true)?;
        self.set_local(i, Local::Exclusive);
        let me = self.idx(self.me);
        Stats::add(&self.stats.directory_entries, 1);
        self.dir.insert(
            pfn,
            DirEntry {
                owner: me,
                ..DirEntry::default()
            },
        );
        Ok(true)
    }

    /// Starts a restore: until [`Engine::finish_loading`], requests for pages homed here are
    /// held (not answered), so no host is granted a page before its saved contents are in.
    pub(crate) fn begin_loading(&mut self) {
        self.loading = true;
    }

    /// Installs the saved contents of a page homed here, writable, with this host as its
    /// owner (only while loading, once per page, before anybody touched it).
    pub(crate) fn preload(&mut self, pfn: Pfn, data: &[u8; PAGE_SIZE]) -> Result<(), String> {
        let Some(i) = self.layout.index(pfn) else {
            return Err(format!("pfn {pfn:#x} is not guest RAM"));
        };
        if !self.loading {
            return Err("not loading".into());
        }
        if self.home(pfn) != self.me {
            return Err(format!("pfn {pfn:#x} is homed on {}", self.home(pfn)));
        }
        if self.local[i] != Local::Invalid || self.dir.contains_key(&pfn) {
            return Err(format!("pfn {pfn:#x} loaded twice"));
        }
        self.pages.install(pfn, Some(data), true)?;
        self.set_local(i, Local::Exclusive);
        let me = self.idx(self.me);
        let stats = self.stats.clone();
        Stats::add(&stats.directory_entries, 1);
        self.dir.insert(
            pfn,
            DirEntry {
                owner: me,
                ..DirEntry::default()
            },
        );
        Ok(())
    }

    /// Ends the loading: the held requests are served in the order they came.
    pub(crate) fn finish_loading(&mut self) {
        self.loading = false;
        for (from, pfn, access) in std::mem::take(&mut self.deferred) {
            self.home_request(from, pfn, access);
        }
        self.pump();
    }

    /// The pages this host writes into a snapshot, so that every page that holds data is
    /// written by exactly one host (call on a quiescent cluster): the pages it owns, and the
    /// pages homed here that are only shared (no owner; the home reads one of the copies).
    /// Pages nobody holds were never touched: zero.
    pub(crate) fn snapshot_duty(&self) -> Vec<Pfn> {
        let mut out: Vec<Pfn> = Vec::new();
        let mut i = 0usize;
        for (first, n) in self.layout.regions() {
            for k in 0..n {
                if self.local[i] == Local::Exclusive {
                    out.push(first + k);
                }
                i += 1;
            }
        }
        out.extend(
            self.dir
                .iter()
                .filter(|(_, e)| e.owner.is_none() && e.sharers != 0)
                .map(|(pfn, _)| *pfn),
        );
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Minimum time a host keeps a page it was just granted for writing before the home may move
    /// it again
    /// (the `GrantAck` that ends the transaction is held back that long). Without it, a vCPU
    /// woken by a write grant can lose the page to a queued read before it retried its store,
    /// and hosts spinning on one page livelock (seen as a 3-host boot stuck in stop_machine).
    pub(crate) fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    /// Reads the time from `clock` instead of [`Instant::now`] (the simulator's virtual clock).
    #[cfg(test)]
    pub(crate) fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// Sends the held acknowledgements that are due; returns when the next one is.
    pub(crate) fn release_held(&mut self, now: Instant) -> Option<Instant> {
        while let Some((due, _, _)) = self.held.front() {
            if *due > now {
                break;
            }
            if let Some((_, to, msg)) = self.held.pop_front() {
                self.deliver(to, msg);
            }
        }
        self.pump();
        self.held.front().map(|h| h.0)
    }

    /// Whether acknowledgements are held back (the simulator's termination check).
    #[cfg(test)]
    pub(crate) fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub(crate) fn home(&self, pfn: Pfn) -> HostId {
        home_of(&self.policy, &self.hosts, pfn)
    }

    fn idx(&self, h: HostId) -> Option<usize> {
        self.hosts.binary_search(&h).ok()
    }

    fn bit(&self, h: HostId) -> u64 {
        self.idx(h).map_or(0, |i| 1 << i)
    }

    #[cfg(test)]
    pub(crate) fn local_state(&self, pfn: Pfn) -> Option<Local> {
        self.layout.index(pfn).map(|i| self.local[i])
    }

    /// No request outstanding here and no transaction running at this home.
    pub(crate) fn is_quiescent(&self) -> bool {
        self.deferred.is_empty()
            && self.pending.is_empty()
            && self.inbox.is_empty()
            && self.held.is_empty()
            && self
                .dir
                .values()
                .all(|e| e.busy.is_none() && e.queue.is_empty())
    }

    /// (owner, sharers) of a page homed here.
    #[cfg(test)]
    pub(crate) fn dir_state(&self, pfn: Pfn) -> (Option<HostId>, Vec<HostId>) {
        match self.dir.get(&pfn) {
            None => (None, Vec::new()),
            Some(e) => (
                e.owner.map(|o| self.hosts[o]),
                bits(e.sharers).map(|i| self.hosts[i]).collect(),
            ),
        }
    }

    fn set_local(&mut self, i: usize, new: Local) {
        let old = std::mem::replace(&mut self.local[i], new);
        let s = &self.stats;
        let present = |l: Local| l != Local::Invalid;
        match (present(old), present(new)) {
            (false, true) => Stats::add(&s.resident_pages, 1),
            (true, false) => Stats::sub(&s.resident_pages, 1),
            _ => {}
        }
        match (old == Local::Exclusive, new == Local::Exclusive) {
            (false, true) => Stats::add(&s.owned_pages, 1),
            (true, false) => Stats::sub(&s.owned_pages, 1),
            _ => {}
        }
    }

    fn fail(&self, what: std::fmt::Arguments<'_>) {
        Stats::add(&self.stats.protocol_errors, 1);
        error!("dsm {}: {what}", self.me);
    }

    fn op(&self, r: Result<(), String>) {
        if let Err(e) = r {
            self.fail(format_args!("page operation failed: {e}"));
        }
    }

    fn deliver(&mut self, to: HostId, msg: Message) {
        if to == self.me {
            Stats::add(&self.stats.messages_local, 1);
            self.inbox.push_back((to, msg));
            return;
        }
        Stats::add(&self.stats.messages_out, 1);
        if matches!(
            msg,
            Message::PageData { .. }
                | Message::Grant {
                    content: Content::Data(_),
                    ..
                }
        ) {
            Stats::add(&self.stats.pages_out, 1);
            Stats::add(&self.stats.bytes_out, PAGE_SIZE as u64);
        }
        if let Err(e) = self.net.send(to, msg) {
            Stats::add(&self.stats.send_errors, 1);
            error!("dsm {}: send to {to} failed: {e}", self.me);
        }
    }

    fn pump(&mut self) {
        while let Some((from, msg)) = self.inbox.pop_front() {
            self.handle(from, msg);
        }
    }

    /// A thread faulted on `pfn` (`write`: a store; `wp`: the page is present read-only).
    pub(crate) fn on_fault(&mut self, pfn: Pfn, write: bool, wp: bool) {
        let Some(i) = self.layout.index(pfn) else {
            self.fail(format_args!("fault outside guest RAM at pfn {pfn:#x}"));
            return;
        };
        let s = self.stats.clone();
        Stats::add(
            match (write, wp) {
                (_, true) => &s.wp_faults,
                (true, false) => &s.write_faults,
                (false, false) => &s.read_faults,
            },
            1,
        );
        let need = if write || wp {
            Access::Write
        } else {
            Access::Read
        };
        match (self.local[i], need) {
            (Local::Exclusive, _) | (Local::Shared, Access::Read) => {
                // Already granted since the fault was queued: let the thread retry.
                Stats::add(&s.spurious_faults, 1);
                let r = self.pages.wake(pfn);
                self.op(r);
                return;
            }
            _ => {}
        }
        if self.pending.contains_key(&pfn) {
            // The grant will wake this thread too; if it needs more, it faults again.
            Stats::add(&s.merged_faults, 1);
            return;
        }
        self.pending.insert(pfn, need);
        let home = self.home(pfn);
        trace!("dsm {}: fault pfn {pfn:#x} {need:?} wp={wp}", self.me);
        Stats::add(
            if home == self.me {
                &s.local_requests
            } else {
                &s.remote_requests
            },
            1,
        );
        let msg = match need {
            Access::Read => Message::ReadReq { pfn },
            Access::Write => Message::WriteReq { pfn },
        };
        self.deliver(home, msg);
        self.pump();
    }

    /// A DSM message arrived from `from` (another host; local ones never come here).
    pub(crate) fn on_message(&mut self, from: HostId, msg: Message) {
        if self.idx(from).is_none() || from == self.me {
            self.fail(format_args!("{} from unexpected host {from}", msg.name()));
            return;
        }
        if let Message::PageData { .. }
        | Message::Grant {
            content: Content::Data(_),
            ..
        } = &msg
        {
            Stats::add(&self.stats.pages_in, 1);
            Stats::add(&self.stats.bytes_in, PAGE_SIZE as u64);
        }
        self.handle(from, msg);
        self.pump();
    }

    /// A peer died: nothing can complete that needs it. Reported loudly unless `expected` (the
    /// VM is stopping and the hosts are leaving); the VMM stops the VM.
    pub(crate) fn on_peer_down(&mut self, peer: HostId, reason: &str, expected: bool) {
        Stats::add(&self.stats.peer_downs, 1);
        let homed = self.dir.len();
        let level = if expected {
            log::Level::Info
        } else {
            log::Level::Error
        };
        log::log!(
            level,
            "dsm {}: {peer} is down ({reason}); its pages are unreachable, {} requests \
             outstanding, {homed} directory entries here",
            self.me,
            self.pending.len()
        );
    }

    fn handle(&mut self, from: HostId, msg: Message) {
        match msg {
            Message::ReadReq { pfn } => self.home_request(from, pfn, Access::Read),
            Message::WriteReq { pfn } => self.home_request(from, pfn, Access::Write),
            Message::Fetch { pfn, txn, mode } => self.holder_fetch(from, pfn, txn, mode),
            Message::Invalidate { pfn, txn } => self.holder_invalidate(from, pfn, txn),
            Message::PageData { pfn, txn, data } => self.home_reply(from, pfn, txn, Some(data)),
            Message::InvalidateAck { pfn, txn } => self.home_reply(from, pfn, txn, None),
            Message::Grant {
                pfn,
                txn,
                access,
                content,
            } => self.requester_grant(from, pfn, txn, access, content),
            Message::GrantAck { pfn, txn } => self.home_ack(from, pfn, txn),
            Message::Nack { pfn, txn, reason } => self.fail(format_args!(
                "{from} refused pfn {pfn:#x} (txn {txn}): {reason:?}"
            )),
            other => warn!("dsm {}: ignoring non-DSM {}", self.me, other.name()),
        }
    }

    // ---- holder role ----

    fn check_home(&self, from: HostId, pfn: Pfn, what: &str) -> Option<usize> {
        match self.layout.index(pfn) {
            Some(i) if self.home(pfn) == from => Some(i),
            _ => {
                self.fail(format_args!("{what} for pfn {pfn:#x} from non-home {from}"));
                None
            }
        }
    }

    fn holder_fetch(&mut self, from: HostId, pfn: Pfn, txn: u64, mode: FetchMode) {
        let Some(i) = self.check_home(from, pfn, "Fetch") else {
            return;
        };
        let st = self.local[i];
        if st == Local::Invalid {
            self.fail(format_args!("Fetch for pfn {pfn:#x} we do not hold"));
            let reason = NackReason::NotHeld;
            self.deliver(from, Message::Nack { pfn, txn, reason });
            return;
        }
        if st == Local::Exclusive {
            // No store may land after the copy is taken.
            let r = self.pages.protect(pfn);
            self.op(r);
        }
        let mut data = PageBuf::zeroed();
        self.pages.read(pfn, &mut data.0);
        match mode {
            FetchMode::Copy => {}
            FetchMode::Downgrade => {
                if st == Local::Exclusive {
                    Stats::add(&self.stats.downgraded, 1);
                }
                self.set_local(i, Local::Shared);
            }
            FetchMode::Invalidate => {
                // Fault injection: keep the stale copy mapped (the checks must catch it).
                if !keep_stale_copy() {
                    let r = self.pages.discard(pfn);
                    self.op(r);
                }
                Stats::add(&self.stats.invalidated, 1);
                self.set_local(i, Local::Invalid);
            }
        }
        self.deliver(from, Message::PageData { pfn, txn, data });
    }

    fn holder_invalidate(&mut self, from: HostId, pfn: Pfn, txn: u64) {
        let Some(i) = self.check_home(from, pfn, "Invalidate") else {
            return;
        };
        match self.local[i] {
            Local::Invalid => warn!("dsm {}: Invalidate of absent pfn {pfn:#x}", self.me),
            st => {
                if st == Local::Exclusive {
                    self.fail(format_args!("plain Invalidate of owned pfn {pfn:#x}"));
                }
                // Fault injection: keep the stale copy mapped (the checks must catch it).
                if !keep_stale_copy() {
                    let r = self.pages.discard(pfn);
                    self.op(r);
                }
                Stats::add(&self.stats.invalidated, 1);
                self.set_local(i, Local::Invalid);
            }
        }
        self.deliver(from, Message::InvalidateAck { pfn, txn });
    }

    // ---- requester role ----

    fn requester_grant(
        &mut self,
        from: HostId,
        pfn: Pfn,
        txn: u64,
        access: Access,
        content: Content,
    ) {
        let Some(i) = self.check_home(from, pfn, "Grant") else {
            return;
        };
        if self.pending.remove(&pfn).is_none() {
            self.fail(format_args!("Grant for pfn {pfn:#x} nobody asked for"));
        }
        Stats::add(&self.stats.grants, 1);
        let st = self.local[i];
        // What to do to the mapping; the state (and counters) change before the operation,
        // which wakes the faulting threads.
        enum Act {
            Wake,
            Install(Option<PageBuf>, bool),
            Unprotect,
        }
        let (act, new) = match (access, content) {
            (Access::Read, _) if st != Local::Invalid => (Act::Wake, st),
            (Access::Read, Content::Data(d)) => (Act::Install(Some(d), false), Local::Shared),
            (Access::Read, Content::Zero) => (Act::Install(None, false), Local::Shared),
            (Access::Read, Content::Keep) => {
                self.fail(format_args!("read Grant keeps absent pfn {pfn:#x}"));
                (Act::Wake, st)
            }
            (Access::Write, Content::Keep) => match st {
                Local::Shared => (Act::Unprotect, Local::Exclusive),
                Local::Exclusive => (Act::Wake, st),
                Local::Invalid => {
                    self.fail(format_args!("write Grant keeps absent pfn {pfn:#x}"));
                    (Act::Wake, st)
                }
            },
            (Access::Write, c) => {
                if st != Local::Invalid {
                    let r = self.pages.discard(pfn);
                    self.op(r);
                }
                let data = match c {
                    Content::Data(d) => Some(d),
                    _ => None,
                };
                (Act::Install(data, true), Local::Exclusive)
            }
        };
        self.set_local(i, new);
        let r = match act {
            Act::Wake => self.pages.wake(pfn),
            Act::Unprotect => self.pages.unprotect(pfn),
            Act::Install(data, writable) => {
                self.pages
                    .install(pfn, data.as_ref().map(|d| &*d.0), writable)
            }
        };
        self.op(r);
        let ack = Message::GrantAck { pfn, txn };
        // Only writers need the hold: a reader that loses its copy early re-faults while the
        // writer that took it makes progress, but a writer that loses the page before its
        // store completes can starve.
        if self.hold.is_zero() || access == Access::Read {
            self.deliver(from, ack);
        } else {
            self.held.push_back(((self.clock)() + self.hold, from, ack));
        }
    }
}
