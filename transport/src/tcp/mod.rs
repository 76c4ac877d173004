//! [`Transport`] over TCP: one persistent connection per host pair.
//!
//! The host with the lower id dials, the higher one accepts; a dialer whose connection dies
//! dials again with exponential backoff (up to `max_backoff`), forever, until shutdown. Each
//! connection has a reader thread (decodes frames, dispatches them) and a writer thread (drains
//! a queue, coalescing every frame already queued into one `write` — the batching — and sends a
//! heartbeat after `heartbeat` of silence). A peer is declared down on EOF, on a read or write
//! error, on a malformed frame, or when nothing (not even a heartbeat) arrived for
//! `dead_after`; every handler gets [`crate::PeerEvent::Down`] and requests waiting on it fail.

use crate::auth::{self, Params, MIN_KEY_LEN};
use crate::dispatch::{Dispatcher, ResponseSink};
use crate::{Error, Handler, Transport};
use log::{debug, error, info, warn};
use proto::frame::Frame;
use proto::{HostId, Message, Service};
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod conn;

/// Configuration of one host's TCP transport.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// This host.
    pub local: HostId,
    /// Every other host and the address it listens on.
    pub peers: Vec<(HostId, SocketAddr)>,
    /// Cluster id; peers with another id are refused.
    pub cluster_id: u64,
    /// Shared cluster key (at least 16 bytes).
    pub key: Vec<u8>,
    /// Silence after which the writer sends a heartbeat.
    pub heartbeat: Duration,
    /// Silence after which a peer is declared dead.
    pub dead_after: Duration,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
    /// Longest wait between two dial attempts.
    pub max_backoff: Duration,
    /// How long dials may fail with I/O errors (a peer still starting) before a warning.
    pub dial_quiet: Duration,
}

impl TcpConfig {
    /// A configuration with default timings (heartbeat 250 ms, dead after 2 s).
    pub fn new(
        local: HostId,
        peers: Vec<(HostId, SocketAddr)>,
        cluster_id: u64,
        key: &[u8],
    ) -> Self {
        TcpConfig {
            local,
            peers,
            cluster_id,
            key: key.to_vec(),
            heartbeat: Duration::from_millis(250),
            dead_after: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(1),
            dial_quiet: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |s: String| Err(Error::Config(s));
        if self.key.len() < MIN_KEY_LEN {
            return bad(format!("cluster key must be at least {MIN_KEY_LEN} bytes"));
        }
        let mut ids: Vec<HostId> = self.peers.iter().map(|p| p.0).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != self.peers.len() {
            return bad("a peer is listed twice".into());
        }
        if ids.contains(&self.local) {
            return bad(format!("{} is listed as its own peer", self.local));
        }
        if self.heartbeat.is_zero() || self.heartbeat >= self.dead_after {
            return bad("heartbeat must be non-zero and shorter than dead_after".into());
        }
        Ok(())
    }
}

/// Counters of one transport.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Frames written (heartbeats included).
    pub frames_sent: u64,
    /// Frames read.
    pub frames_received: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// `write` calls (frames_sent / writes = batching factor).
    pub writes: u64,
    /// Bytes read.
    pub bytes_received: u64,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Handshakes that failed because a side could not prove the key.
    pub auth_failures: u64,
    /// Other failed handshakes (version, cluster, host id, I/O).
    pub handshake_failures: u64,
    /// Connections lost.
    pub peer_downs: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_sent: AtomicU64,
    writes: AtomicU64,
    bytes_received: AtomicU64,
    handshakes: AtomicU64,
    auth_failures: AtomicU64,
    handshake_failures: AtomicU64,
    peer_downs: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Conn {
    gen: u64,
    tx: mpsc::Sender<Frame>,
    stream: TcpStream,
}

struct Slot {
    addr: SocketAddr,
    conn: Option<Arc<Conn>>,
    last_error: String,
}

struct Shared {
    cfg: TcpConfig,
    params: Params,
    local_addr: SocketAddr,
    me: Weak<Shared>,
    dispatcher: Dispatcher,
    slots: Mutex<HashMap<HostId, Slot>>,
    changed: Condvar,
    stop: AtomicBool,
    next_gen: AtomicU64,
    counters: Counters,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// TCP implementation of [`Transport`].
pub struct TcpTransport {
    shared: Arc<Shared>,
}

impl TcpTransport {
    /// Binds `addr` and starts (see [`TcpTransport::start`]).
    pub fn bind(cfg: TcpConfig, addr: SocketAddr) -> Result<Arc<TcpTransport>, Error> {
        let l = TcpListener::bind(addr).map_err(|e| Error::Io(format!("bind {addr}: {e}")))?;
        Self::start(cfg, l)
    }

    /// Starts accepting on `listener` and dialing every peer with a higher id. Returns at once;
    /// use [`TcpTransport::wait_connected`] to wait for the peers.
    pub fn start(cfg: TcpConfig, listener: TcpListener) -> Result<Arc<TcpTransport>, Error> {
        cfg.validate()?;
        let io = |e: io::Error| Error::Io(format!("listener: {e}"));
        let local_addr = listener.local_addr().map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let slots = cfg
            .peers
            .iter()
            .map(|(h, a)| {
                let slot = Slot {
                    addr: *a,
                    conn: None,
                    last_error: "not connected yet".into(),
                };
                (*h, slot)
            })
            .collect();
        let params = Params {
            local: cfg.local,
            cluster_id: cfg.cluster_id,
            key: cfg.key.clone(),
        };
        let shared = Arc::new_cyclic(|me| Shared {
            cfg,
            params,
            local_addr,
            me: me.clone(),
            dispatcher: Dispatcher::default(),
            slots: Mutex::new(slots),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            next_gen: AtomicU64::new(1),
            counters: Counters::default(),
            threads: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        shared.spawn("tcp-accept", move || sh.accept_loop(listener))?;
        for (peer, _) in shared.cfg.peers.clone() {
            if peer > shared.cfg.local {
                let sh = shared.clone();
                shared.spawn(&format!("tcp-dial-{}", peer.0), move || sh.dial_loop(peer))?;
            }
        }
        Ok(Arc::new(TcpTransport { shared }))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Waits until every peer is connected, or fails listing those that are not and why.
    pub fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut slots = lock(&self.shared.slots);
        loop {
            let missing: Vec<(HostId, String)> = slots
                .iter()
                .filter(|(_, s)| s.conn.is_none())
                .map(|(h, s)| (*h, s.last_error.clone()))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline || self.shared.stopping() {
                let mut missing = missing;
                missing.sort();
                return Err(Error::NotConnected(missing));
            }
            slots = match self.shared.changed.wait_timeout(slots, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TcpStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TcpStats {
            frames_sent: g(&c.frames_sent),
            frames_received: g(&c.frames_received),
            bytes_sent: g(&c.bytes_sent),
            writes: g(&c.writes),
            bytes_received: g(&c.bytes_received),
            handshakes: g(&c.handshakes),
            auth_failures: g(&c.auth_failures),
            handshake_failures: g(&c.handshake_failures),
            peer_downs: g(&c.peer_downs),
        }
    }

    /// Closes every connection and stops every thread (no `Down` events are reported for
    /// our own shutdown). Idempotent. Must not be called from a handler.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

impl Transport for TcpTransport {
    fn local(&self) -> HostId {
        self.shared.cfg.local
    }
    fn peers(&self) -> Vec<HostId> {
        self.shared.cfg.peers.iter().map(|p| p.0).collect()
    }
    fn send(&self, to: HostId, msg: Message) -> Result<(), Error> {
        self.shared.send_frame(to, Frame::one_way(msg))
    }
    fn request(&self, to: HostId, msg: Message, timeout: Duration) -> Result<Message, Error> {
        let d = &self.shared.dispatcher;
        let (id, rx) = d.new_request(to);
        if let Err(e) = self.shared.send_frame(to, Frame::request(id, msg)) {
            d.cancel(id);
            return Err(e);
        }
        d.wait(id, to, rx, timeout)
    }
    fn register(&self, service: Service, handler: Arc<dyn Handler>) {
        self.shared.dispatcher.register(service, handler);
    }
    fn unregister(&self, service: Service) {
        self.shared.dispatcher.unregister(service);
    }
    fn is_up(&self, peer: HostId) -> bool {
        lock(&self.shared.slots)
            .get(&peer)
            .is_some_and(|s| s.conn.is_some())
    }
}

impl ResponseSink for Shared {
    fn send_response(&self, to: HostId, id: u64, msg: Message) -> Result<(), Error> {
        self.send_frame(to, Frame::response(id, msg))
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        let h = thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| Error::Io(format!("spawn {name}: {e}")))?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(h);
        Ok(())
    }

    fn send_frame(&self, to: HostId, frame: Frame) -> Result<(), Error> {
        if to == self.cfg.local {
            return Err(Error::SelfSend(to));
        }
        if self.stopping() {
            return Err(Error::Shutdown);
        }
        let conn = {
            let slots = lock(&self.slots);
            let slot = slots.get(&to).ok_or(Error::UnknownPeer(to))?;
            slot.conn.clone().ok_or(Error::PeerDown(to))?
        };
        conn.tx.send(frame).map_err(|_| Error::PeerDown(to))
    }

    /// Sleeps up to `d`, waking early on shutdown.
    fn pause(&self, d: Duration) {
        let slots = lock(&self.slots);
        if !self.stopping() {
            let _ = self.changed.wait_timeout(slots, d);
        }
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        while !self.stopping() {
            match listener.accept() {
                Ok((stream, addr)) => {
                    let sh = self.clone();
                    let r = self.spawn("tcp-conn", move || sh.serve_incoming(stream, addr));
                    if let Err(e) = r {
                        error!("cannot serve connection from {addr}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    warn!("accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn prepare(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.cfg.handshake_timeout))?;
        stream.set_write_timeout(Some(self.cfg.handshake_timeout))
    }

    fn handshake_failed(&self, who: &str, e: &auth::Error) {
        if e.is_auth_failure() {
            bump(&self.counters.auth_failures, 1);
            error!("{who}: authentication failed, connection closed: {e}");
        } else {
            bump(&self.counters.handshake_failures, 1);
            warn!("{who}: handshake failed, connection closed: {e}");
        }
    }

    fn serve_incoming(self: Arc<Self>, mut stream: TcpStream, addr: SocketAddr) {
        if let Err(e) = self.prepare(&stream) {
            warn!("connection from {addr}: {e}");
            return;
        }
        let local = self.cfg.local;
        let allowed = |h: HostId| h < local && self.cfg.peers.iter().any(|p| p.0 == h);
        match auth::accept(&mut stream, &self.params, allowed) {
            Ok(session) => self.run_connection(stream, session),
            Err(e) => {
                self.handshake_failed(&format!("incoming connection from {addr}"), &e);
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }

    fn dial_loop(self: Arc<Self>, peer: HostId) {
        let Some(addr) = lock(&self.slots).get(&peer).map(|s| s.addr) else {
            return;
        };
        let mut backoff = Duration::from_millis(20);
        // Start of the current run of failed dials, and whether it was reported.
        let mut failing: Option<Instant> = None;
        let mut warned = false;
        while !self.stopping() {
            let r = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .map_err(auth::Error::Io)
                .and_then(|mut s| {
                    self.prepare(&s)?;
                    auth::connect(&mut s, &self.params, peer).map(|sess| (s, sess))
                });
            match r {
                Ok((stream, session)) => {
                    backoff = Duration::from_millis(20);
                    if warned {
                        info!("dial {peer} at {addr}: connected");
                    }
                    failing = None;
                    warned = false;
                    self.run_connection(stream, session);
                }
                Err(e) => {
                    if let Some(s) = lock(&self.slots).get_mut(&peer) {
                        s.last_error = e.to_string();
                    }
                    self.changed.notify_all();
                    // A peer that is still starting refuses, or (before it has its job) reads
                    // our hello on its job socket and closes: I/O errors are expected for a
                    // while and are reported only once they last.
                    let since = *failing.get_or_insert_with(Instant::now);
                    if matches!(e, auth::Error::Io(_)) {
                        if !warned && since.elapsed() >= self.cfg.dial_quiet {
                            warned = true;
                            warn!(
                                "dial {peer} at {addr}: still failing after {} s: {e}",
                                since.elapsed().as_secs()
                            );
                        } else {
                            debug!("dial {peer} at {addr}: {e}");
                        }
                    } else {
                        self.handshake_failed(&format!("dial {peer} at {addr}"), &e);
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(self.cfg.max_backoff);
                }
            }
        }
    }

    fn shutdown(&self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        let conns: Vec<Arc<Conn>> = {
            let mut slots = lock(&self.slots);
            slots.values_mut().filter_map(|s| s.conn.take()).collect()
        };
        for c in conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        let me = thread::current().id();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}
