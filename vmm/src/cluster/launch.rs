//! Starting a cluster: the `host` daemon, `up`, and the job hand-off between them.
//!
//! `ssi-vmm host --listen ADDR --key-file K` binds ADDR and waits for a job. `ssi-vmm up`
//! (with a cluster TOML file, or `--local N`, which first starts N daemons on loopback) sends
//! every host its job over a plain TCP connection to that address, then waits for every host's
//! exit report on the same connection. After accepting its job, a daemon hands its listening
//! socket to the cluster transport, where the other hosts then connect (authenticated with the
//! same key).
//!
//! ```text
//!  up                                   host i (daemon on ADDR_i)
//!   |-- "SSI-VMM-JOB 1\n" --------------->|
//!   |-- len u32 | job JSON | HMAC-SHA256(key, JSON) -->|  verify, parse, check ADDR_i
//!   |<-- "OK\n"  (or "ERR <why>\n") ------|  joins the cluster, boots its vCPUs
//!   |            ... guest runs ...       |
//!   |<-- "EXIT " exit-report JSON "\n" ---|  VM stopped; the daemon exits with its code
//! ```
//!
//! The exit report ([`ExitReport`]) carries the exit code, the stop reason and the host's DSM
//! error counters (protocol errors, send errors): a run whose guest powered off cleanly but
//! whose page protocol saw a violation is not a clean run, and `up` says so.
//!
//! While the VM runs, `up` keeps the job connection open: a daemon whose job connection
//! reaches its end (`up` was killed, or its machine went away) stops its VM ("the controlling
//! `up` went away"), and `up` asks every host to stop by sending `STOP <why>\n` and closing
//! its side (on SIGINT, SIGTERM or SIGHUP; see [`UpControl`]). The daemon then reports as
//! usual. A daemon itself stops its VM on those signals too (exits at once before a job).
//!
//! The job JSON carries the cluster file (TOML text), the host's index, the guest-clock epoch
//! and the state directory (the status home, host 0 by default, writes there); the key itself
//! never travels. A job whose MAC does not verify
//! is refused and logged, and the daemon keeps waiting.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::spec::ClusterFile;
use super::{status, timesync};

const MAGIC: &[u8] = b"SSI-VMM-JOB 2\n";
const MAX_JOB: usize = 1 << 20;
/// Shortest cluster key accepted.
pub const MIN_KEY: usize = 16;
/// How long `up` keeps trying to reach a host daemon.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `up` waits for the hosts' exit reports after a stop signal before it kills the
/// local daemons and gives up on remote ones.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// The signals that stop a cluster cleanly (a second one forces).
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// Stop reason of a daemon whose job connection ended while its VM ran.
pub const UP_WENT_AWAY: &str = "the controlling `up` went away";

/// Errors of the launch path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Key file problems.
    #[error("key file {path:?}: {detail}")]
    Key {
        /// File.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Socket problems.
    #[error("{0}")]
    Io(String),
    /// The cluster file is invalid.
    #[error(transparent)]
    Spec(#[from] super::spec::Error),
    /// A host refused or never answered.
    #[error("host {host} at {addr}: {detail}")]
    Host {
        /// Host index.
        host: usize,
        /// Its address.
        addr: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// A job message is malformed or not authentic.
    #[error("bad job: {0}")]
    BadJob(String),
    /// A cluster peer's transport handshake reached the daemon before its job did (the peer
    /// redials; harmless).
    #[error("a cluster peer dialed before this host received its job")]
    EarlyPeer,
    /// The VM failed on this host.
    #[error(transparent)]
    Vm(#[from] Box<crate::vm::Error>),
    /// The control socket could not be set up.
    #[error("control socket: {0}")]
    Control(#[from] crate::control::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// `up` got a stop signal before every host had its job.
    #[error("interrupted by {0} while starting the cluster")]
    Interrupted(String),
}

/// The name of a stop signal ("SIGINT", ...).
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// The exit code of a process stopped by signal `sig` (the shell's 128 + number).
pub fn signal_exit_code(sig: i32) -> i32 {
    128 + sig
}

/// What `up` shares with its signal thread: the job connections and local daemon pids, and
/// the first stop signal received. The first SIGINT/SIGTERM/SIGHUP asks every host to stop
/// (`STOP <signal>` on its job connection, then the end of `up`'s writes); the hosts report
/// and exit as after any stop. A second signal, or [`STOP_GRACE`] without every report, kills
/// the local daemons and closes the job connections.
#[derive(Default)]
pub struct UpControl {
    signal: AtomicI32,
    streams: Mutex<Vec<TcpStream>>,
    pids: Mutex<Vec<u32>>,
    done: AtomicBool,
}

impl UpControl {
    /// A control with no signal handlers (tests; `install` adds them).
    pub fn new() -> Arc<UpControl> {
        Arc::new(UpControl::default())
    }

    /// Installs the SIGINT/SIGTERM/SIGHUP handlers and their thread.
    pub fn install(self: &Arc<Self>) -> Result<(), Error> {
        let mut signals =
            signal_hook::iterator::Signals::new(STOP_SIGNALS).map_err(Error::Signals)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    me.on_signal(sig);
                }
            })
            .map_err(Error::Signals)?;
        Ok(())
    }

    /// Handles one stop signal (the first stops the hosts, the next forces).
    pub fn on_signal(self: &Arc<Self>, sig: i32) {
        let name = signal_name(sig);
        if self
            .signal
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            eprintln!("ssi-vmm: {name}: stopping the VM on every host (again to force)");
            self.stop_all(&name);
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name("stop-grace".into())
                .spawn(move || {
                    std::thread::sleep(STOP_GRACE);
                    if !me.done.load(Ordering::SeqCst) {
                        eprintln!(
                            "ssi-vmm: the hosts did not stop within {} s; killing the local ones",
                            STOP_GRACE.as_secs()
                        );
                        me.force();
                    }
                });
        } else {
            eprintln!("ssi-vmm: {name} again: killing the local host processes");
            self.force();
        }
    }

    /// The first stop signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    fn add_stream(&self, s: &TcpStream) {
        let Ok(c) = s.try_clone() else {
            return;
        };
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sig) = self.signal() {
            send_stop(&c, &signal_name(sig));
        }
        streams.push(c);
    }

    fn add_pids(&self, pids: &[u32]) {
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(pids);
    }

    fn stop_all(&self, why: &str) {
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            send_stop(s, why);
        }
    }

    /// Kills the local daemons and closes every job connection.
    fn force(&self) {
        for &pid in self.pids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) takes plain integers and touches no memory of ours. `pid` is a
            // daemon this process started; `up_local` forgets the pids once it has reaped them.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.close_streams();
    }

    fn close_streams(&self) {
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

fn send_stop(mut s: &TcpStream, why: &str) {
    let _ = s.write_all(format!("STOP {why}\n").as_bytes());
    let _ = s.shutdown(Shutdown::Write);
}

/// What a daemon's watch of its job connection saw: `up` asked for a stop, or went away.
fn watch_up(stream: TcpStream, done: &AtomicBool) -> Option<String> {
    let _ = stream.set_read_timeout(None);
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let why = match r.read_line(&mut line) {
        Ok(n) if n > 0 => match line.trim_end().strip_prefix("STOP ") {
            Some(sig) => format!("stopped by `up` ({sig})"),
            None => format!("unexpected message from `up`: {:?}", line.trim_end()),
        },
        _ => UP_WENT_AWAY.to_string(),
    };
    (!done.load(Ordering::SeqCst)).then_some(why)
}

/// The daemon's signal handling: before a job, a stop signal ends the process; with a VM, the
/// first stops it (the other hosts follow), a second ends the process.
fn daemon_signals(vm: Arc<Mutex<Option<Arc<crate::vm::Controller>>>>) -> Result<(), Error> {
    let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS).map_err(Error::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stopping = false;
            for sig in signals.forever() {
                let ctl = vm.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match ctl {
                    Some(c) if !stopping => {
                        stopping = true;
                        log::warn!("{}: stopping the VM", signal_name(sig));
                        c.stop_with(crate::stop::StopReason::Error(format!(
                            "stopped by {}",
                            signal_name(sig)
                        )));
                    }
                    _ => std::process::exit(signal_exit_code(sig)),
                }
            }
        })
        .map_err(Error::Signals)?;
    Ok(())
}

/// A snapshot for `up` to restore instead of booting.
#[derive(Clone, Debug)]
pub struct Restore {
    /// The snapshot directory (absolute; readable by every host).
    pub dir: PathBuf,
    /// Lazy restore.
    pub lazy: bool,
}

/// What `up` sends each host (plain serde data).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// The cluster file, TOML.
    pub cluster: String,
    /// The receiving host's index.
    pub host: usize,
    /// Guest clock epoch (CLOCK_REALTIME ns).
    pub epoch_ns: u64,
    /// Where the status home (host 0 by default) writes the status.
    pub state_dir: Option<PathBuf>,
    /// Restore the VM from this snapshot instead of booting it (the cluster file then
    /// describes the snapshot's machine; the directory must be readable by every host).
    #[serde(default)]
    pub restore: Option<PathBuf>,
    /// With `restore`: start the vCPUs before guest RAM is loaded (lazy restore).
    #[serde(default)]
    pub lazy: bool,
}

/// Reads a cluster key (the file's bytes, surrounding whitespace removed).
pub fn read_key(path: &Path) -> Result<Vec<u8>, Error> {
    let err = |detail: String| Error::Key {
        path: path.to_path_buf(),
        detail,
    };
    let raw = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let key = raw.trim_ascii().to_vec();
    if key.len() < MIN_KEY {
        return Err(err(format!("the key must be at least {MIN_KEY} bytes")));
    }
    Ok(key)
}

/// Writes a fresh random key (64 hex characters, mode 0600).
pub fn generate_key(path: &Path) -> Result<Vec<u8>, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |detail: String| Error::Key {
        path: path.to_path_buf(),
        detail,
    };
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| err(e.to_string()))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .map_err(|e| err(e.to_string()))?;
    Ok(hex.into_bytes())
}

fn mac(key: &[u8], data: &[u8]) -> Result<[u8; 32], Error> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|e| Error::BadJob(format!("cluster key: {e}")))?;
    m.update(data);
    Ok(m.finalize().into_bytes().into())
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io(format!("{what}: {e}"))
}

/// Encodes a job for the wire.
pub fn encode_job(job: &Job, key: &[u8]) -> Result<Vec<u8>, Error> {
    let json = serde_json::to_vec(job).map_err(|e| Error::BadJob(e.to_string()))?;
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&mac(key, &json)?);
    Ok(out)
}

/// Reads and authenticates one job from `r`.
pub fn read_job(r: &mut impl Read, key: &[u8]) -> Result<Job, Error> {
    let bad = |s: String| Error::BadJob(s);
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|e| bad(e.to_string()))?;
    if magic != MAGIC {
        // A transport handshake frame: u32 length, kind 1 (Hello), then the protocol magic.
        if magic[4] == 1 && magic[5..9] == proto::handshake::MAGIC {
            return Err(Error::EarlyPeer);
        }
        return Err(bad("not an ssi-vmm job (wrong magic or version)".into()));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_JOB {
        return Err(bad(format!("job of {len} bytes is too large")));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json).map_err(|e| bad(e.to_string()))?;
    let mut tag = [0u8; 32];
    r.read_exact(&mut tag).map_err(|e| bad(e.to_string()))?;
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| bad(e.to_string()))?;
    m.update(&json);
    m.verify_slice(&tag).map_err(|_| {
        bad("authentication failed: the sender does not hold the cluster key".into())
    })?;
    serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))
}

/// The `host` daemon: waits on `listen` for a valid job, runs it, and returns the exit code.
pub fn host_daemon(listen: SocketAddr, key_file: &Path) -> Result<i32, Error> {
    let key = read_key(key_file)?;
    let listener = TcpListener::bind(listen).map_err(io(&format!("bind {listen}")))?;
    let local = listener.local_addr().map_err(io("listener"))?;
    let running: Arc<Mutex<Option<Arc<crate::vm::Controller>>>> = Arc::default();
    daemon_signals(running.clone())?;
    log::info!("host daemon listening on {local}; waiting for a job from `ssi-vmm up`");
    loop {
        let (mut stream, peer) = listener.accept().map_err(io("accept"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut job_restore = None;
        let mut job_lazy = false;
        let accepted = read_job(&mut stream, &key).and_then(|job| {
            job_restore = job.restore.clone();
            job_lazy = job.lazy;
            let file = ClusterFile::parse(&job.cluster)?;
            let spec = file.spec(job.host, key.clone(), job.epoch_ns, job.state_dir.clone())?;
            let cfg = file.vm_config()?;
            let mine = spec.hosts[spec.me].addr;
            if mine.port() != local.port() {
                return Err(Error::BadJob(format!(
                    "job is for host {} at {mine}, but this daemon listens on {local}",
                    spec.me
                )));
            }
            // The control socket before accepting: a name clash is reported to `up`.
            let control = match &spec.state_dir {
                Some(dir) => {
                    std::fs::create_dir_all(dir).map_err(io(&dir.display().to_string()))?;
                    Some(crate::control::Listener::bind(
                        &dir.join(crate::control::host_socket(spec.me)),
                    )?)
                }
                None => None,
            };
            Ok((spec, cfg, control))
        });
        let (spec, cfg, control) = match accepted {
            Ok(x) => x,
            Err(Error::EarlyPeer) => {
                log::debug!("{peer}: a cluster peer dialed before our job arrived; it will retry");
                continue;
            }
            Err(e) => {
                log::error!("refused a job from {peer}: {e}");
                let _ = writeln!(stream, "ERR {e}");
                continue;
            }
        };
        let _ = writeln!(stream, "OK");
        let me = spec.me;
        log::info!("host {me}: job from {peer} accepted");
        let state = spec
            .state_dir
            .clone()
            .filter(|_| usize::from(spec.placement.status_home) == me);
        let done = Arc::new(AtomicBool::new(false));
        let watch = stream.try_clone();
        let started = match &job_restore {
            None => crate::vm::Vm::start(&cfg, Some((spec, listener))),
            Some(dir) => crate::vm::snap::load(dir, false)
                .map_err(crate::vm::Error::from)
                .and_then(|mut r| {
                    r.lazy = job_lazy;
                    crate::vm::Vm::restore_cluster(&cfg, (spec, listener), &r)
                }),
        };
        let result = started.map(|vm| {
            let ctl = vm.controller();
            *running.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctl.clone());
            match watch {
                Ok(w) => {
                    let done = done.clone();
                    let r = std::thread::Builder::new()
                        .name("watch-up".into())
                        .spawn(move || {
                            if let Some(why) = watch_up(w, &done) {
                                if why == UP_WENT_AWAY {
                                    log::warn!("host {me}: {why}; stopping the VM");
                                } else {
                                    log::info!("host {me}: {why}; stopping the VM");
                                }
                                ctl.stop_with(crate::stop::StopReason::Error(why));
                            }
                        });
                    if let Err(e) = r {
                        log::error!("host {me}: cannot watch the job connection: {e}");
                    }
                }
                Err(e) => log::error!("host {me}: cannot watch the job connection: {e}"),
            }
            let _server = control.and_then(|l| {
                crate::control::Server::start(l, vm.controller())
                    .map_err(|e| log::error!("host {me}: no control socket: {e}"))
                    .ok()
            });
            let r = vm.wait();
            done.store(true, Ordering::SeqCst);
            r
        });
        done.store(true, Ordering::SeqCst);
        let report = match &result {
            Ok(r) => ExitReport {
                code: r.exit_code,
                reason: r.stop.clone(),
                protocol_errors: r.dsm_protocol_errors,
                send_errors: r.dsm_send_errors,
            },
            Err(e) => ExitReport {
                code: 1,
                reason: e.to_string(),
                ..Default::default()
            },
        };
        if report.protocol_errors > 0 || report.send_errors > 0 {
            log::error!(
                "host {me}: DSM saw {} protocol error(s) and {} send error(s)",
                report.protocol_errors,
                report.send_errors
            );
        }
        if let Some(dir) = &state {
            if let Err(e) = status::mark_stopped(dir, &report.reason) {
                log::warn!(
                    "host {me}: cannot record the stop in {}: {e}",
                    dir.display()
                );
            }
        }
        let json = serde_json::to_string(&report).unwrap_or_default();
        let _ = writeln!(stream, "EXIT {json}");
        return match result {
            Ok(r) => Ok(r.exit_code),
            Err(e) => Err(Error::Vm(Box::new(e))),
        };
    }
}

/// What a host daemon reports to `up` when its part of the VM has stopped (plain serde data,
/// one JSON line after `EXIT `).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Exit code.
    pub code: i32,
    /// Why the VM stopped, or what went wrong.
    pub reason: String,
    /// DSM protocol violations or malformed requests this host saw.
    pub protocol_errors: u64,
    /// DSM messages this host could not send.
    pub send_errors: u64,
}

/// One host's outcome as `up` saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostOutcome {
    /// Host index.
    pub host: usize,
    /// Its report (code 1 if the host vanished without one).
    pub report: ExitReport,
}

impl HostOutcome {
    fn failed(host: usize, reason: &str) -> HostOutcome {
        HostOutcome {
            host,
            report: ExitReport {
                code: 1,
                reason: reason.into(),
                ..Default::default()
            },
        }
    }
}

fn connect_retry(
    addr: SocketAddr,
    deadline: Instant,
    ctl: &UpControl,
) -> std::io::Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline || ctl.signal().is_some() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Sends every host its job and waits until all have reported. Returns each host's outcome.
/// `ctl` stops the hosts on a signal (see [`UpControl`]).
pub fn up(
    file: &ClusterFile,
    key: &[u8],
    state_dir: Option<PathBuf>,
    restore: Option<Restore>,
    ctl: &Arc<UpControl>,
) -> Result<Vec<HostOutcome>, Error> {
    let r = up_inner(file, key, state_dir, restore, ctl);
    if r.is_err() {
        // The hosts that accepted their jobs see their job connection end and stop.
        ctl.close_streams();
    }
    ctl.finish();
    r
}

fn up_inner(
    file: &ClusterFile,
    key: &[u8],
    state_dir: Option<PathBuf>,
    restore: Option<Restore>,
    ctl: &Arc<UpControl>,
) -> Result<Vec<HostOutcome>, Error> {
    let addrs = file.addrs()?;
    let epoch_ns = timesync::now_ns();
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut streams = Vec::new();
    for (host, addr) in addrs.iter().enumerate() {
        if let Some(sig) = ctl.signal() {
            return Err(Error::Interrupted(signal_name(sig)));
        }
        let host_err = |detail: String| Error::Host {
            host,
            addr: *addr,
            detail,
        };
        let connected = connect_retry(*addr, deadline, ctl);
        if let Some(sig) = ctl.signal() {
            return Err(Error::Interrupted(signal_name(sig)));
        }
        let mut s = connected.map_err(|e| host_err(format!("unreachable: {e}")))?;
        let job = Job {
            cluster: file.to_toml()?,
            host,
            epoch_ns,
            state_dir: state_dir.clone(),
            restore: restore.as_ref().map(|r| r.dir.clone()),
            lazy: restore.as_ref().is_some_and(|r| r.lazy),
        };
        s.write_all(&encode_job(&job, key)?)
            .map_err(|e| host_err(format!("sending the job: {e}")))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| host_err(format!("no answer to the job: {e}")))?;
        match line.trim_end() {
            "OK" => {}
            other => {
                let why = other.strip_prefix("ERR ").unwrap_or(other);
                return Err(host_err(format!("refused the job: {why}")));
            }
        }
        let _ = r.get_ref().set_read_timeout(None);
        ctl.add_stream(r.get_ref());
        streams.push(r);
    }
    log::info!("all {} hosts accepted their jobs", streams.len());
    let waiters: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(host, mut r)| {
            std::thread::spawn(move || {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(n) if n > 0 => parse_exit(host, line.trim_end()),
                    _ => HostOutcome::failed(
                        host,
                        "the host process ended without a report (killed?)",
                    ),
                }
            })
        })
        .collect();
    Ok(waiters
        .into_iter()
        .enumerate()
        .map(|(host, w)| {
            w.join()
                .unwrap_or_else(|_| HostOutcome::failed(host, "waiter panicked"))
        })
        .collect())
}

fn parse_exit(host: usize, line: &str) -> HostOutcome {
    match line
        .strip_prefix("EXIT ")
        .map(serde_json::from_str::<ExitReport>)
    {
        Some(Ok(report)) => HostOutcome { host, report },
        _ => HostOutcome::failed(host, &format!("malformed report {line:?}")),
    }
}

/// A local cluster: N daemons on loopback started by `up --local`.
pub struct LocalCluster {
    /// The generated cluster file.
    pub file: ClusterFile,
    /// Its key.
    pub key: Vec<u8>,
    /// Where logs, the key and the status live.
    pub dir: PathBuf,
    children: Vec<Child>,
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind 127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(io("listener"))?.port())
}

impl LocalCluster {
    /// Starts `hosts` daemons of this executable, the console home (host 0 by default) on our
    /// stdio, the others logging to
    /// `<dir>/host-<i>.log`. `file` gives the machine; its host list is replaced.
    pub fn start(mut file: ClusterFile, cpus: &[u32], dir: PathBuf) -> Result<LocalCluster, Error> {
        std::fs::create_dir_all(&dir).map_err(io(&dir.display().to_string()))?;
        let key_path = dir.join("key");
        let key = generate_key(&key_path)?;
        file.hosts = cpus
            .iter()
            .map(|&cpus| {
                Ok(super::spec::HostEntry {
                    addr: format!("127.0.0.1:{}", free_port()?),
                    cpus,
                })
            })
            .collect::<Result<_, Error>>()?;
        let file = ClusterFile::parse(&file.to_toml()?)?;
        std::fs::write(dir.join("cluster.toml"), file.to_toml()?)
            .map_err(io("writing cluster.toml"))?;
        let exe = std::env::current_exe().map_err(io("current executable"))?;
        let console = usize::from(file.placement()?.console_home);
        let mut children = Vec::new();
        for (i, h) in file.hosts.iter().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.arg("host")
                .arg("--listen")
                .arg(&h.addr)
                .arg("--key-file")
                .arg(&key_path);
            if i != console {
                let log = std::fs::File::create(dir.join(format!("host-{i}.log")))
                    .map_err(io("host log"))?;
                let log2 = log.try_clone().map_err(io("host log"))?;
                cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
            }
            match cmd.spawn() {
                Ok(c) => children.push(c),
                Err(e) => {
                    for mut c in children {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(Error::Io(format!("starting host {i}: {e}")));
                }
            }
        }
        let pids: String = children
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} {}\n", c.id()))
            .collect();
        if let Err(e) = std::fs::write(dir.join("pids"), pids) {
            log::warn!("cannot write {}/pids: {e}", dir.display());
        }
        Ok(LocalCluster {
            file,
            key,
            dir,
            children,
        })
    }

    /// Process ids of the host daemons, in host order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// Waits for every daemon to exit (killing any still there after `grace`).
    pub fn reap(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for (i, c) in self.children.iter_mut().enumerate() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        log::warn!("host {i} (pid {}) did not exit; killing it", c.id());
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// `up --local N` (host `i` running `cpus[i]` vCPUs; `restore --local N` with the snapshot to
/// restore): starts the daemons, runs the job, reaps them; returns the outcomes.
pub fn up_local(
    file: ClusterFile,
    cpus: &[u32],
    restore: Option<Restore>,
    ctl: &Arc<UpControl>,
) -> Result<Vec<HostOutcome>, Error> {
    let hosts = cpus.len();
    let dir = status::state_root().join(&file.name);
    let cluster = LocalCluster::start(file, cpus, dir.clone())?;
    ctl.add_pids(&cluster.pids());
    eprintln!(
        "ssi-vmm: local cluster {:?}: {} host processes (pids {:?}), logs in {}",
        cluster.file.name,
        hosts,
        cluster.pids(),
        dir.display()
    );
    let result = up(&cluster.file, &cluster.key, Some(dir), restore, ctl);
    // After a failed start, daemons still waiting for a job would never exit.
    let grace = if result.is_ok() {
        STOP_GRACE
    } else {
        Duration::from_secs(5)
    };
    cluster.reap(grace);
    ctl.pids.lock().unwrap_or_else(|p| p.into_inner()).clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            cluster: "name = \"x\"".into(),
            host: 1,
            epoch_ns: 5,
            state_dir: None,
            restore: None,
            lazy: false,
        }
    }

    #[test]
    fn jobs_are_authenticated() {
        let key = b"0123456789abcdef0123";
        let wire = encode_job(&job(), key).unwrap();
        let got = read_job(&mut &wire[..], key).unwrap();
        assert_eq!(got.host, 1);
        let e = read_job(&mut &wire[..], b"another key of 16 bytes").unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        let mut tampered = wire.clone();
        let n = MAGIC.len() + 10;
        tampered[n] ^= 1;
        assert!(read_job(&mut &tampered[..], key).is_err());
        assert!(read_job(&mut &b"GET / HTTP/1.0\r\n\r\n"[..], key).is_err());
        let mut hello = vec![0, 0, 0, 0, 1];
        hello.extend_from_slice(&proto::handshake::MAGIC);
        hello.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_job(&mut &hello[..], key),
            Err(Error::EarlyPeer)
        ));
        assert!(read_job(&mut &wire[..wire.len() - 1], key).is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_job(&mut &huge[..], key)
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }

    #[test]
    fn exit_reports() {
        let r = ExitReport {
            code: 0,
            reason: "Error(\"x y\")".into(),
            protocol_errors: 3,
            send_errors: 1,
        };
        let line = format!("EXIT {}", serde_json::to_string(&r).unwrap());
        let o = parse_exit(2, &line);
        assert_eq!((o.host, o.report), (2, r));
        assert_eq!(parse_exit(2, "garbage").report.code, 1);
        assert_eq!(parse_exit(2, "EXIT 0 PowerOff").report.code, 1);
        assert!(parse_exit(2, "EXIT {\"code\":0}")
            .report
            .reason
            .contains("malformed"));
    }

    #[test]
    fn stop_signals_map_to_exit_codes() {
        let got: Vec<(String, i32)> = STOP_SIGNALS
            .iter()
            .map(|&s| (signal_name(s), signal_exit_code(s)))
            .collect();
        let want = [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)];
        let want: Vec<(String, i32)> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        assert_eq!(got, want);
        assert_eq!(
            signal_name(libc::SIGUSR1),
            format!("signal {}", libc::SIGUSR1)
        );
    }

    /// A connected pair: (the `up` side, the daemon side).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (daemon, _) = l.accept().unwrap();
        (up, daemon)
    }

    #[test]
    fn a_daemon_sees_stop_requests_and_a_vanished_up() {
        let done = AtomicBool::new(false);
        // `up` asks for a stop on a signal: the daemon names it.
        let (up, daemon) = pair();
        let ctl = UpControl::new();
        ctl.add_stream(&up);
        ctl.on_signal(libc::SIGTERM);
        assert_eq!(ctl.signal(), Some(libc::SIGTERM));
        assert_eq!(
            watch_up(daemon.try_clone().unwrap(), &done).as_deref(),
            Some("stopped by `up` (SIGTERM)")
        );
        // The connection stays readable for the exit report.
        writeln!(&daemon, "EXIT {{}}").unwrap();
        let mut r = BufReader::new(up);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "EXIT {}\n");
        // A stream added after the signal is told at once.
        let (up2, daemon2) = pair();
        ctl.add_stream(&up2);
        assert_eq!(
            watch_up(daemon2, &done).as_deref(),
            Some("stopped by `up` (SIGTERM)")
        );
        // `up` killed: its end of the connection closes.
        let (up3, daemon3) = pair();
        drop(up3);
        assert_eq!(watch_up(daemon3, &done).as_deref(), Some(UP_WENT_AWAY));
        // A second signal forces: the job connections are closed both ways (the daemon is
        // still connected, but `up` reads its end).
        ctl.on_signal(libc::SIGINT);
        assert_eq!(ctl.signal(), Some(libc::SIGTERM));
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap_or(0), 0, "{line:?}");
        // After the VM stopped, the end of the connection is no news.
        let (up4, daemon4) = pair();
        drop(up4);
        done.store(true, Ordering::SeqCst);
        assert_eq!(watch_up(daemon4, &done), None);
        drop(daemon);
    }

    #[test]
    fn short_keys_are_refused() {
        let p = std::env::temp_dir().join(format!("ssi-key-{}", std::process::id()));
        std::fs::write(&p, "short\n").unwrap();
        assert!(read_key(&p).unwrap_err().to_string().contains("at least"));
        let k = generate_key(&p).unwrap();
        assert_eq!(read_key(&p).unwrap(), k);
        std::fs::remove_file(&p).unwrap();
    }
}
