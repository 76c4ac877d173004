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
//! The job JSON carries the cluster file (TOML text), the host's index, the guest-clock epoch
//! and the state directory (the status home, host 0 by default, writes there); the key itself
//! never travels. A job whose MAC does not verify
//! is refused and logged, and the daemon keeps waiting.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    log::info!("host daemon listening on {local}; waiting for a job from `ssi-vmm up`");
    loop {
        let (mut stream, peer) = listener.accept().map_err(io("accept"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let accepted = read_job(&mut stream, &key).and_then(|job| {
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
        let result = crate::vm::Vm::start(&cfg, Some((spec, listener))).map(|vm| {
            let _server = control.and_then(|l| {
                crate::control::Server::start(l, vm.controller())
                    .map_err(|e| log::error!("host {me}: no control socket: {e}"))
                    .ok()
            });
            vm.wait()
        });
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

fn connect_retry(addr: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Sends every host its job and waits until all have reported. Returns each host's outcome.
pub fn up(
    file: &ClusterFile,
    key: &[u8],
    state_dir: Option<PathBuf>,
) -> Result<Vec<HostOutcome>, Error> {
    let addrs = file.addrs()?;
    let epoch_ns = timesync::now_ns();
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut streams = Vec::new();
    for (host, addr) in addrs.iter().enumerate() {
        let host_err = |detail: String| Error::Host {
            host,
            addr: *addr,
            detail,
        };
        let mut s =
            connect_retry(*addr, deadline).map_err(|e| host_err(format!("unreachable: {e}")))?;
        let job = Job {
            cluster: file.to_toml()?,
            host,
            epoch_ns,
            state_dir: state_dir.clone(),
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
    pub fn start(
        mut file: ClusterFile,
        hosts: usize,
        cpus_per_host: u32,
        dir: PathBuf,
    ) -> Result<LocalCluster, Error> {
        std::fs::create_dir_all(&dir).map_err(io(&dir.display().to_string()))?;
        let key_path = dir.join("key");
        let key = generate_key(&key_path)?;
        file.hosts = (0..hosts)
            .map(|_| {
                Ok(super::spec::HostEntry {
                    addr: format!("127.0.0.1:{}", free_port()?),
                    cpus: cpus_per_host,
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

/// `up --local N`: starts the daemons, runs the job, reaps them; returns the outcomes.
pub fn up_local(
    file: ClusterFile,
    hosts: usize,
    cpus_per_host: u32,
) -> Result<Vec<HostOutcome>, Error> {
    let dir = status::state_root().join(&file.name);
    let cluster = LocalCluster::start(file, hosts, cpus_per_host, dir.clone())?;
    eprintln!(
        "ssi-vmm: local cluster {:?}: {} host processes (pids {:?}), logs in {}",
        cluster.file.name,
        hosts,
        cluster.pids(),
        dir.display()
    );
    let result = up(&cluster.file, &cluster.key, Some(dir));
    cluster.reap(Duration::from_secs(10));
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
    fn short_keys_are_refused() {
        let p = std::env::temp_dir().join(format!("ssi-key-{}", std::process::id()));
        std::fs::write(&p, "short\n").unwrap();
        assert!(read_key(&p).unwrap_err().to_string().contains("at least"));
        let k = generate_key(&p).unwrap();
        assert_eq!(read_key(&p).unwrap(), k);
        std::fs::remove_file(&p).unwrap();
    }
}
