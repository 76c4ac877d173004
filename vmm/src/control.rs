//! The control socket: the one way the command line talks to a running VMM process.
//!
//! # Where
//! Every VMM process listens on a unix stream socket in its VM's state directory
//! (`<state root>/<name>/`, the root being `$SSI_VMM_STATE_DIR` or `/run/ssi-vmm`):
//! `control.sock` for `ssi-vmm run --name NAME`, `host-<i>.sock` for host `i` of a cluster
//! (`ssi-vmm host`, the directory comes with the job from `ssi-vmm up`). The socket is created
//! with mode 0600 (it is bound, made 0600, and only then listened on, so nobody can connect
//! while it has wider permissions) and removed when the process exits. A process refuses to
//! start when the path exists and is not a stale socket (a socket whose connect is refused is
//! stale and removed; a live one belongs to another VM).
//!
//! # Protocol (version [`VERSION`])
//! One JSON object per line (at most [`MAX_REQUEST`] bytes including the newline), answered by
//! one JSON object per line; a connection may carry several requests, served in order, and one
//! connection is served at a time.
//!
//! Requests: `{"version":1,"op":OP}` with OP one of
//! - `"pause"`: every local vCPU leaves guest mode and stays out; answered once all have
//!   acknowledged (or with an error after a timeout, the vCPUs then running again);
//! - `"resume"`: every local vCPU runs again;
//! - `"status"`: the VM's state and each local vCPU's;
//! - `"snapshot"` with `"dir"` (an absolute path that must not exist), `"stop"` (bool,
//!   default false) and optionally `"parent"` (an absolute path: an incremental snapshot on
//!   top of that one, recording only the pages that differ from it): pauses the VM (if it is not paused), writes a complete snapshot to `dir`
//!   (see the `snapshot` crate), then resumes it, or stops it when `stop` is true (a VM that
//!   was paused before stays paused). A failure leaves no snapshot and the VM as it was.
//!   Answered once the snapshot is committed, with `"dir"`; a client waits up to
//!   [`SNAPSHOT_TIMEOUT`]. `run` VMs only: a cluster host refuses it;
//! - the three steps `ssi-vmm snapshot` drives on every host of a cluster (see
//!   `vmm::cluster::snapshot`): `"quiesce"` (on a paused host: no DSM transaction in flight
//!   here, and one ping round trip to every peer so that everything sent before was handled),
//!   `"save"` with `"dir"` and optionally `"parent"` (the snapshot's partial directory: the vCPUs save their state and
//!   the host writes its memory file, states and disk copies there; answered with `"parts"`,
//!   what it wrote), and `"stop"` with `"dir"` (the VM stops as snapshotted, exit status 0).
//!
//! Unknown fields are ignored. Responses:
//! - success: `{"ok":true,"version":1,"state":"running"|"paused"|"stopping","vcpus":[...]}`
//!   (`vcpus` for `status` only: `{"index":0,"state":"running"|"halted"|"waiting-for-sipi"|
//!   "paused"|"starting"|"stopped","exits":N}`, `exits` counting that vCPU's `KVM_RUN` exits);
//! - failure: `{"ok":false,"version":1,"error":"..."}`: malformed JSON, a missing or other
//!   version, an unknown op, an over-long line, or the operation failing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::vm::{Controller, VcpuStatus, VmStatus, ACK_TIMEOUT};

/// Protocol version.
pub const VERSION: u64 = 1;

/// Longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;

/// Socket file of a VM started by `ssi-vmm run`.
pub const RUN_SOCKET: &str = "control.sock";

/// Socket file of host `i` of a cluster.
pub fn host_socket(i: usize) -> String {
    format!("host-{i}.sock")
}

/// How long a connection may stay silent, and a client waits for an answer (more than a
/// pause may take).
const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a client waits for a snapshot to be written (guest RAM and disks are copied).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(900);

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The socket path is too long for a unix socket address.
    #[error("control socket path {0} is too long (at most 107 bytes)")]
    PathTooLong(PathBuf),
    /// A live socket is there: another VM of that name runs.
    #[error("{0} is in use: another VM with this name is running")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotSocket(PathBuf),
    /// A VM name that cannot be a directory name.
    #[error("invalid VM name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not starting with '.')")]
    BadName(String),
    /// No state directory of that name.
    #[error("no VM named {name:?} (no {dir})")]
    NoSuchVm {
        /// The name asked for.
        name: String,
        /// The directory looked for.
        dir: PathBuf,
    },
    /// The state directory holds no socket.
    #[error("VM {name:?} has no control socket in {dir}: it has exited")]
    NoSocket {
        /// The name asked for.
        name: String,
        /// Its state directory.
        dir: PathBuf,
    },
    /// The socket is there but nobody listens.
    #[error("{0}: the VM has exited (stale control socket)")]
    Exited(PathBuf),
    /// The socket vanished between listing and connecting.
    #[error("{0}: the control socket is gone (the VM exited)")]
    Gone(PathBuf),
    /// Not allowed to connect.
    #[error("{0}: permission denied (the control socket is only for the VM's owner)")]
    Permission(PathBuf),
    /// The answer was not a valid response.
    #[error("{path}: bad response: {detail}")]
    BadResponse {
        /// Socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The VMM answered with an error.
    #[error("{0}")]
    Refused(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a VM name used as a state directory name.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// A control operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Pause every local vCPU.
    Pause,
    /// Resume every local vCPU.
    Resume,
    /// Report the state.
    Status,
    /// Write a snapshot to `dir` (absolute, must not exist), then resume, or stop if `stop`.
    Snapshot {
        /// Where the snapshot goes.
        dir: PathBuf,
        /// Stop the VM once the snapshot is committed.
        stop: bool,
        /// Incremental: record only the pages that differ from this snapshot (chain).
        parent: Option<PathBuf>,
    },
    /// Cluster snapshot, on a paused host: settle the DSM and flush the links.
    Quiesce,
    /// Cluster snapshot, on a paused, quiesced host: save the vCPUs and write this host's
    /// files into `dir` (the snapshot's partial directory).
    Save {
        /// The partial directory (absolute, existing).
        dir: PathBuf,
        /// Incremental: write only the pages that differ from this snapshot (chain).
        parent: Option<PathBuf>,
    },
    /// Stop the VM because it was snapshotted into `dir` (exit status 0).
    Stop {
        /// The committed snapshot.
        dir: PathBuf,
    },
}

impl Op {
    /// Its name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Status => "status",
            Op::Snapshot { .. } => "snapshot",
            Op::Quiesce => "quiesce",
            Op::Save { .. } => "save",
            Op::Stop { .. } => "stop",
        }
    }

    /// The request line (without newline).
    pub fn request(&self) -> String {
        match self {
            Op::Snapshot { dir, stop, parent } => {
                let mut v = serde_json::json!({
                    "version": VERSION,
                    "op": self.name(),
                    "dir": dir.to_string_lossy(),
                    "stop": stop,
                });
                if let Some(p) = parent {
                    v["parent"] = p.to_string_lossy().into();
                }
                v.to_string()
            }
            Op::Save { dir, parent } => {
                let mut v = serde_json::json!({
                    "version": VERSION,
                    "op": self.name(),
                    "dir": dir.to_string_lossy(),
                });
                if let Some(p) = parent {
                    v["parent"] = p.to_string_lossy().into();
                }
                v.to_string()
            }
            Op::Stop { dir } => serde_json::json!({
                "version": VERSION,
                "op": self.name(),
                "dir": dir.to_string_lossy(),
            })
            .to_string(),
            _ => serde_json::json!({ "version": VERSION, "op": self.name() }).to_string(),
        }
    }
}

/// Parses and validates one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Op, String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "malformed request: not a JSON object".to_string())?;
    match obj.get("version") {
        None => return Err("missing \"version\"".into()),
        Some(ver) if ver.as_u64() == Some(VERSION) => {}
        Some(ver) => {
            return Err(format!(
                "unsupported protocol version {ver} (this VMM speaks {VERSION})"
            ))
        }
    }
    let dir_of = |op: &str| -> Result<PathBuf, String> {
        let dir = obj
            .get("dir")
            .and_then(|d| d.as_str())
            .ok_or(format!("{op}: missing or non-string \"dir\""))?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(format!(
                "{op}: \"dir\" must be an absolute path, not {}",
                dir.display()
            ));
        }
        Ok(dir)
    };
    let parent_of = |op: &str| -> Result<Option<PathBuf>, String> {
        match obj.get("parent") {
            None => Ok(None),
            Some(p) => {
                let p = PathBuf::from(
                    p.as_str()
                        .ok_or(format!("{op}: \"parent\" must be a string"))?,
                );
                if !p.is_absolute() {
                    return Err(format!(
                        "{op}: \"parent\" must be an absolute path, not {}",
                        p.display()
                    ));
                }
                Ok(Some(p))
            }
        }
    };
    match obj.get("op").and_then(|o| o.as_str()) {
        Some("pause") => Ok(Op::Pause),
        Some("quiesce") => Ok(Op::Quiesce),
        Some("save") => Ok(Op::Save {
            dir: dir_of("save")?,
            parent: parent_of("save")?,
        }),
        Some("stop") => Ok(Op::Stop {
            dir: dir_of("stop")?,
        }),
        Some("resume") => Ok(Op::Resume),
        Some("status") => Ok(Op::Status),
        Some("snapshot") => {
            let dir = dir_of("snapshot")?;
            let stop = match obj.get("stop") {
                None => false,
                Some(v) => v.as_bool().ok_or("snapshot: \"stop\" must be a boolean")?,
            };
            Ok(Op::Snapshot {
                dir,
                stop,
                parent: parent_of("snapshot")?,
            })
        }
        Some(other) => Err(format!(
            "unknown op {other:?} (expected pause, resume, status, snapshot, quiesce, save or stop)"
        )),
        None => Err("missing or non-string \"op\"".into()),
    }
}

/// One response line (plain serde data).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Protocol version.
    pub version: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VM's state after the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// The local vCPUs (`status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<Vec<VcpuStatus>>,
    /// The snapshot written (`snapshot`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// What this host wrote (`save`: the VMM's `HostParts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts: Option<serde_json::Value>,
}

impl Response {
    fn error(e: impl Into<String>) -> Response {
        Response {
            ok: false,
            version: VERSION,
            error: Some(e.into()),
            state: None,
            vcpus: None,
            dir: None,
            parts: None,
        }
    }

    fn ok(state: &'static str, vcpus: Option<Vec<VcpuStatus>>) -> Response {
        Response {
            ok: true,
            version: VERSION,
            error: None,
            state: Some(state),
            vcpus,
            dir: None,
            parts: None,
        }
    }

    /// The response as one line (with newline).
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"ok":false,"version":1,"error":"cannot encode the response"}"#.into()
        });
        s.push('\n');
        s
    }
}

/// What the socket controls (the VM's [`Controller`]; a fake in tests).
pub trait Target: Send + Sync {
    /// Pauses every local vCPU.
    fn pause(&self) -> Result<(), String>;
    /// Resumes every local vCPU.
    fn resume(&self) -> Result<(), String>;
    /// The current state.
    fn status(&self) -> VmStatus;
    /// Writes a snapshot to `dir`, then resumes (or stops, if `stop`). Returns the directory.
    fn snapshot(&self, dir: &Path, stop: bool, parent: Option<&Path>) -> Result<PathBuf, String> {
        let _ = (dir, stop, parent);
        Err("this VM cannot be snapshotted".into())
    }
    /// Cluster snapshot: settles the DSM and flushes the links of a paused host.
    fn quiesce(&self) -> Result<(), String> {
        Err("this VM cannot be snapshotted".into())
    }
    /// Cluster snapshot: writes this host's part into the partial directory `dir`.
    fn save(&self, dir: &Path, parent: Option<&Path>) -> Result<serde_json::Value, String> {
        let _ = (dir, parent);
        Err("this VM cannot be snapshotted".into())
    }
    /// Stops the VM, snapshotted into `dir`.
    fn stop_snapshotted(&self, dir: &Path) -> Result<(), String> {
        let _ = dir;
        Err("this VM cannot be stopped here".into())
    }
}

impl Target for Controller {
    fn pause(&self) -> Result<(), String> {
        Controller::pause(self, ACK_TIMEOUT).map_err(|e| e.to_string())
    }
    fn resume(&self) -> Result<(), String> {
        Controller::resume(self, ACK_TIMEOUT).map_err(|e| e.to_string())
    }
    fn status(&self) -> VmStatus {
        Controller::status(self)
    }
    fn snapshot(&self, dir: &Path, stop: bool, parent: Option<&Path>) -> Result<PathBuf, String> {
        Controller::snapshot(self, dir, stop, parent).map_err(|e| e.to_string())
    }
    fn quiesce(&self) -> Result<(), String> {
        Controller::quiesce(self, ACK_TIMEOUT).map_err(|e| e.to_string())
    }
    fn save(&self, dir: &Path, parent: Option<&Path>) -> Result<serde_json::Value, String> {
        let parts = Controller::save_parts(self, dir, parent).map_err(|e| e.to_string())?;
        serde_json::to_value(parts).map_err(|e| e.to_string())
    }
    fn stop_snapshotted(&self, dir: &Path) -> Result<(), String> {
        self.stop_with(crate::stop::StopReason::Snapshotted(
            dir.display().to_string(),
        ));
        Ok(())
    }
}

/// Answers one request line.
pub fn handle(target: &dyn Target, line: &[u8]) -> Response {
    let op = match parse_request(line) {
        Ok(op) => op,
        Err(e) => return Response::error(e),
    };
    let done = match &op {
        Op::Pause => target.pause(),
        Op::Resume => target.resume(),
        Op::Status => {
            let st = target.status();
            return Response::ok(st.state, Some(st.vcpus));
        }
        Op::Snapshot { dir, stop, parent } => {
            match target.snapshot(dir, *stop, parent.as_deref()) {
                Ok(d) => {
                    let mut r = Response::ok(target.status().state, None);
                    r.dir = Some(d.display().to_string());
                    return r;
                }
                Err(e) => Err(e),
            }
        }
        Op::Quiesce => target.quiesce(),
        Op::Save { dir, parent } => match target.save(dir, parent.as_deref()) {
            Ok(parts) => {
                let mut r = Response::ok(target.status().state, None);
                r.parts = Some(parts);
                return r;
            }
            Err(e) => Err(e),
        },
        Op::Stop { dir } => target.stop_snapshotted(dir),
    };
    match done {
        Ok(()) => Response::ok(target.status().state, None),
        Err(e) => Response::error(format!("{} failed: {e}", op.name())),
    }
}

/// A bound, listening control socket with mode 0600; the file is removed on drop (if it is
/// still this socket's).
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    id: (u64, u64),
}

impl Listener {
    /// Binds `path` (its directory must exist). A stale socket there is removed first.
    pub fn bind(path: &Path) -> Result<Listener, Error> {
        clear_stale(path)?;
        let listener = bind_0600(path)?;
        let m = std::fs::symlink_metadata(path).map_err(io("stat", path))?;
        Ok(Listener {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only our own socket: a later VM of the same name may have replaced a stale one.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Removes a stale socket at `path`; refuses a live socket or anything else.
fn clear_stale(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("stat", path)(e)),
        Ok(m) if !m.file_type().is_socket() => Err(Error::NotSocket(path.to_path_buf())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(Error::InUse(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                log::info!("removing stale control socket {}", path.display());
                std::fs::remove_file(path).map_err(io("remove stale socket", path))
            }
            Err(e) => Err(io("probe", path)(e)),
        },
    }
}

/// socket + bind + chmod 0600 + listen: nobody can connect before the mode is set.
fn bind_0600(path: &Path) -> Result<UnixListener, Error> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::PathTooLong(path.to_path_buf()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io("socket for", path)(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is an initialized sockaddr_un and the length passed is its size; the
    // descriptor is valid; the result is checked.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io("bind", path)(std::io::Error::last_os_error()));
    }
    let listen = || -> Result<(), Error> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod", path))?;
        // SAFETY: listen(2) on a valid, bound socket descriptor; the result is checked.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(io("listen", path)(std::io::Error::last_os_error()));
        }
        Ok(())
    };
    if let Err(e) = listen() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Serves a [`Listener`] on one thread until dropped (which removes the socket).
pub struct Server {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Server {
    /// Starts serving `listener` for `target`.
    pub fn start(listener: Listener, target: Arc<dyn Target>) -> Result<Server, Error> {
        let done = Arc::new(AtomicBool::new(false));
        let path = listener.path.clone();
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, &*target, &d))
            .map_err(io("spawn the server thread of", &path))?;
        log::info!("control socket {}", path.display());
        Ok(Server {
            done,
            thread: Some(thread),
            path,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        // Wake the accept; the thread then drops the listener, which removes the file.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: Listener, target: &dyn Target, done: &AtomicBool) {
    for conn in listener.listener.incoming() {
        if done.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(s) => {
                if let Err(e) = serve_connection(s, target) {
                    log::debug!("control connection: {e}");
                }
            }
            Err(e) => {
                log::warn!("control socket accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one line of at most [`MAX_REQUEST`] bytes. Ok(None) at end of input; Err(true) for an
/// over-long line.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Result<Option<Vec<u8>>, ()>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_REQUEST as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(Ok(None));
    }
    if line.last() != Some(&b'\n') {
        if n >= MAX_REQUEST {
            return Ok(Err(()));
        }
        // The last line without a newline: take it as it is.
        return Ok(Ok(Some(line)));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Ok(Some(line)))
}

fn serve_connection(s: UnixStream, target: &dyn Target) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        match read_line(&mut r)? {
            Ok(None) => return Ok(()),
            Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(line)) => w.write_all(handle(target, &line).line().as_bytes())?,
            Err(()) => {
                let e = Response::error(format!("request longer than {MAX_REQUEST} bytes"));
                // The rest of the line cannot be told from a next request: close.
                return w.write_all(e.line().as_bytes());
            }
        }
    }
}

/// One control socket of a VM: the `run` process's, or a cluster host's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// "vm" or "host N".
    pub label: String,
    /// Socket path.
    pub path: PathBuf,
}

/// The control sockets of VM `name` under `root`: `control.sock`, else every `host-<i>.sock`
/// in host order.
pub fn endpoints(root: &Path, name: &str) -> Result<Vec<Endpoint>, Error> {
    validate_name(name)?;
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(Error::NoSuchVm {
            name: name.into(),
            dir,
        });
    }
    let run = dir.join(RUN_SOCKET);
    if std::fs::symlink_metadata(&run).is_ok() {
        return Ok(vec![Endpoint {
            label: "vm".into(),
            path: run,
        }]);
    }
    let mut hosts: Vec<(usize, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(io("read", &dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name();
            let i = n
                .to_str()?
                .strip_prefix("host-")?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((i, e.path()))
        })
        .collect();
    if hosts.is_empty() {
        return Err(Error::NoSocket {
            name: name.into(),
            dir,
        });
    }
    hosts.sort();
    Ok(hosts
        .into_iter()
        .map(|(i, path)| Endpoint {
            label: format!("host {i}"),
            path,
        })
        .collect())
}

/// Sends `op` to the socket at `path`; an `ok:false` answer is [`Error::Refused`]. Returns the
/// response object.
pub fn request(path: &Path, op: Op) -> Result<serde_json::Value, Error> {
    let timeout = match op {
        Op::Snapshot { .. } | Op::Save { .. } => SNAPSHOT_TIMEOUT,
        _ => IO_TIMEOUT,
    };
    let s = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Gone(path.to_path_buf()),
        std::io::ErrorKind::ConnectionRefused => Error::Exited(path.to_path_buf()),
        std::io::ErrorKind::PermissionDenied => Error::Permission(path.to_path_buf()),
        _ => io("connect to", path)(e),
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("configure", path))?;
    let mut w = s.try_clone().map_err(io("configure", path))?;
    w.write_all(format!("{}\n", op.request()).as_bytes())
        .map_err(io("write to", path))?;
    let mut line = String::new();
    BufReader::new(s)
        .take(1 << 20)
        .read_line(&mut line)
        .map_err(io("read from", path))?;
    let bad = |detail: String| Error::BadResponse {
        path: path.to_path_buf(),
        detail,
    };
    if line.is_empty() {
        return Err(bad("the VMM closed the connection without answering".into()));
    }
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
    match v.get("ok").and_then(|o| o.as_bool()) {
        Some(true) => Ok(v),
        Some(false) => Err(Error::Refused(
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unspecified error")
                .to_string(),
        )),
        None => Err(bad(format!("no \"ok\" in {}", line.trim_end()))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Fake {
        paused: Mutex<bool>,
        fail: bool,
    }

    impl Target for Fake {
        fn pause(&self) -> Result<(), String> {
            if self.fail {
                return Err("vCPU(s) [1] did not acknowledge pause".into());
            }
            *self.paused.lock().unwrap() = true;
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            *self.paused.lock().unwrap() = false;
            Ok(())
        }
        fn status(&self) -> VmStatus {
            let p = *self.paused.lock().unwrap();
            VmStatus {
                state: if p { "paused" } else { "running" },
                vcpus: vec![VcpuStatus {
                    index: 0,
                    state: if p { "paused" } else { "running" },
                    exits: 7,
                }],
            }
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            paused: Mutex::new(false),
            fail: false,
        })
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ssi-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn snapshot_requests_are_validated() {
        let op = Op::Snapshot {
            dir: PathBuf::from("/srv/snap 1"),
            stop: true,
            parent: Some(PathBuf::from("/srv/snap 0")),
        };
        assert_eq!(parse_request(op.request().as_bytes()), Ok(op));
        assert_eq!(
            parse_request(br#"{"version":1,"op":"snapshot","dir":"/s"}"#),
            Ok(Op::Snapshot {
                dir: PathBuf::from("/s"),
                stop: false,
                parent: None,
            })
        );
        for (line, needle) in [
            (&br#"{"version":1,"op":"snapshot"}"#[..], "\"dir\""),
            (
                br#"{"version":1,"op":"snapshot","dir":"rel/dir"}"#,
                "absolute",
            ),
            (
                br#"{"version":1,"op":"snapshot","dir":"/s","stop":1}"#,
                "boolean",
            ),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        // The default answer of a target that cannot snapshot.
        let f = Fake {
            paused: Mutex::new(false),
            fail: false,
        };
        let r = handle(&f, br#"{"version":1,"op":"snapshot","dir":"/s"}"#);
        assert!(!r.ok && r.error.unwrap().contains("cannot be snapshotted"));
    }

    #[test]
    fn cluster_snapshot_steps_are_validated() {
        for op in [
            Op::Quiesce,
            Op::Save {
                dir: PathBuf::from("/srv/snap.tmp-7"),
                parent: None,
            },
            Op::Save {
                dir: PathBuf::from("/srv/snap.tmp-7"),
                parent: Some(PathBuf::from("/srv/snap-0")),
            },
            Op::Stop {
                dir: PathBuf::from("/srv/snap"),
            },
        ] {
            assert_eq!(parse_request(op.request().as_bytes()), Ok(op));
        }
        for (line, needle) in [
            (&br#"{"version":1,"op":"save"}"#[..], "\"dir\""),
            (br#"{"version":1,"op":"save","dir":"x"}"#, "absolute"),
            (br#"{"version":1,"op":"stop","dir":7}"#, "\"dir\""),
            (
                br#"{"version":1,"op":"save","dir":"/s","parent":"p"}"#,
                "absolute",
            ),
            (
                br#"{"version":1,"op":"snapshot","dir":"/s","parent":3}"#,
                "string",
            ),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        // A target that cannot snapshot refuses each step, saying so.
        let f = Fake {
            paused: Mutex::new(false),
            fail: false,
        };
        for line in [
            &br#"{"version":1,"op":"quiesce"}"#[..],
            br#"{"version":1,"op":"save","dir":"/s"}"#,
        ] {
            let r = handle(&f, line);
            assert!(!r.ok && r.error.unwrap().contains("cannot be snapshotted"));
            assert!(r.parts.is_none());
        }
    }

    #[test]
    fn requests_are_validated() {
        assert_eq!(
            parse_request(br#"{"version":1,"op":"pause"}"#),
            Ok(Op::Pause)
        );
        assert_eq!(
            parse_request(br#"{"op":"resume","version":1,"x":[1]}"#),
            Ok(Op::Resume)
        );
        assert_eq!(
            parse_request(br#"{"version":1,"op":"status"}"#),
            Ok(Op::Status)
        );
        for (bad, needle) in [
            (&b"{garbage"[..], "malformed"),
            (b"", "malformed"),
            (b"[1,2]", "not a JSON object"),
            (b"\"pause\"", "not a JSON object"),
            (br#"{"op":"pause"}"#, "missing \"version\""),
            (
                br#"{"version":2,"op":"pause"}"#,
                "unsupported protocol version 2",
            ),
            (
                br#"{"version":"1","op":"pause"}"#,
                "unsupported protocol version",
            ),
            (
                br#"{"version":-1,"op":"pause"}"#,
                "unsupported protocol version",
            ),
            (br#"{"version":1,"op":"reboot"}"#, "unknown op \"reboot\""),
            (br#"{"version":1,"op":3}"#, "missing or non-string"),
            (br#"{"version":1}"#, "missing or non-string"),
            (&[0xff, 0xfe, 0x00][..], "malformed"),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn responses_are_one_json_line() {
        let f = fake();
        let r = handle(&*f, br#"{"version":1,"op":"pause"}"#);
        assert_eq!(
            r.line(),
            "{\"ok\":true,\"version\":1,\"state\":\"paused\"}\n"
        );
        let r = handle(&*f, br#"{"version":1,"op":"status"}"#).line();
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["vcpus"][0]["state"], "paused");
        assert_eq!(v["vcpus"][0]["exits"], 7);
        let r = handle(&*f, b"nope").line();
        assert!(r.starts_with("{\"ok\":false,\"version\":1,\"error\":\"malformed request"));
        assert!(r.ends_with("}\n") && r.matches('\n').count() == 1);
        let failing = Fake {
            paused: Mutex::new(false),
            fail: true,
        };
        let r = handle(&failing, br#"{"version":1,"op":"pause"}"#);
        assert!(!r.ok);
        assert!(r.error.unwrap().starts_with("pause failed: vCPU(s) [1]"));
    }

    #[test]
    fn names_are_checked() {
        for good in ["run-1", "a", "demo_2.x", &"n".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"n".repeat(65), "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_lifecycle() {
        let dir = tmpdir("life");
        let path = dir.join(RUN_SOCKET);
        let f = fake();
        let server = Server::start(Listener::bind(&path).unwrap(), f.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        // A second VM of the same name is refused while the first runs.
        assert!(matches!(Listener::bind(&path), Err(Error::InUse(_))));

        let v = request(&path, Op::Pause).unwrap();
        assert_eq!(v["state"], "paused");
        let v = request(&path, Op::Status).unwrap();
        assert_eq!(v["vcpus"][0]["state"], "paused");
        request(&path, Op::Resume).unwrap();

        // Malformed and over-long requests get error answers, and the server goes on.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"version\":1,\"op\":\"fly\"}\n{oops\n\n{\"version\":7}\n")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].contains("unknown op"), "{out}");
        assert!(lines[1].contains("malformed"), "{out}");
        assert!(lines[2].contains("unsupported protocol version 7"), "{out}");
        let mut s = UnixStream::connect(&path).unwrap();
        let _ = s.write_all(&vec![b'x'; MAX_REQUEST * 4]);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.contains("longer than"), "{out}");
        assert_eq!(request(&path, Op::Status).unwrap()["ok"], true);

        drop(server);
        assert!(!path.exists(), "socket removed on exit");
        assert!(matches!(request(&path, Op::Status), Err(Error::Gone(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_sockets_are_replaced_and_other_files_refused() {
        let dir = tmpdir("stale");
        let path = dir.join(host_socket(1));
        // A socket nobody listens on any more (its process died without cleaning up).
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(matches!(request(&path, Op::Status), Err(Error::Exited(_))));
        let l = Listener::bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(l);
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(Listener::bind(&path), Err(Error::NotSocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        let long = dir.join("x".repeat(120));
        assert!(matches!(Listener::bind(&long), Err(Error::PathTooLong(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn endpoints_of_runs_and_clusters() {
        let root = tmpdir("ep");
        assert!(matches!(
            endpoints(&root, "nosuch"),
            Err(Error::NoSuchVm { .. })
        ));
        assert!(matches!(endpoints(&root, "../x"), Err(Error::BadName(_))));
        std::fs::create_dir_all(root.join("c")).unwrap();
        assert!(matches!(endpoints(&root, "c"), Err(Error::NoSocket { .. })));
        for i in [10, 2, 0] {
            std::fs::write(root.join("c").join(host_socket(i)), b"").unwrap();
        }
        std::fs::write(root.join("c/host-x.sock"), b"").unwrap();
        let e = endpoints(&root, "c").unwrap();
        let labels: Vec<&str> = e.iter().map(|e| e.label.as_str()).collect();
        assert_eq!(labels, ["host 0", "host 2", "host 10"]);
        std::fs::create_dir_all(root.join("r")).unwrap();
        std::fs::write(root.join("r").join(RUN_SOCKET), b"").unwrap();
        assert_eq!(endpoints(&root, "r").unwrap()[0].label, "vm");
        let _ = std::fs::remove_dir_all(&root);
    }
}
