//! Helpers for the tests in `tests/tests/`: locating the `ssi-vmm` binary and the cached guest
//! artifacts (built on demand by the repository's scripts), and running a guest while watching
//! its console for markers, with a deadline.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `ssi-vmm` binary: `$SSI_VMM_BIN`, else target/release, else target/debug (built first
/// with `cargo build` if missing).
pub fn vmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SSI_VMM_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("ssi-vmm");
        if p.exists() {
            return p;
        }
    }
    let st = Command::new(env!("CARGO"))
        .args(["build", "-p", "vmm", "--bin", "ssi-vmm"])
        .current_dir(repo_root())
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build of ssi-vmm failed");
    target.join("debug").join("ssi-vmm")
}

/// Runs one of the repository's artifact scripts (cached builds) and returns the paths it
/// prints on stdout.
pub fn artifact(script: &str) -> Vec<PathBuf> {
    let out = Command::new("bash")
        .arg(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The lean guest kernel (ELF vmlinux).
pub fn lean_kernel() -> PathBuf {
    artifact("guest-kernel-config/build.sh")
        .pop()
        .expect("kernel path")
}

/// The busybox test initramfs.
pub fn initramfs() -> PathBuf {
    artifact("images/build-initramfs.sh")
        .pop()
        .expect("initramfs path")
}

/// What a finished guest run produced.
pub struct Run {
    /// Everything the guest printed on the console.
    pub console: String,
    /// The VMM's stderr.
    pub stderr: String,
    /// Exit status (None if it was killed at the deadline).
    pub status: Option<ExitStatus>,
    /// Wall time.
    pub elapsed: Duration,
    /// When each watched marker first appeared, relative to the start.
    pub marks: Vec<(String, Duration)>,
}

impl Run {
    /// The value after `KEY=` on the console, if printed.
    pub fn value(&self, key: &str) -> Option<String> {
        let k = format!("{key}=");
        self.console
            .lines()
            .find_map(|l| l.find(&k).map(|i| l[i + k.len()..].trim().to_string()))
    }

    /// Time at which `marker` first appeared.
    pub fn mark(&self, marker: &str) -> Option<Duration> {
        self.marks
            .iter()
            .find(|(m, _)| m == marker)
            .map(|(_, d)| *d)
    }

    /// Panics with the console tail unless the VMM exited with status 0.
    pub fn assert_clean_exit(&self) {
        let tail: String = self
            .console
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            self.status.is_some_and(|s| s.success()),
            "ssi-vmm did not exit cleanly ({:?}) after {:?}\n--- console tail ---\n{tail}\n--- stderr ---\n{}",
            self.status,
            self.elapsed,
            self.stderr
        );
    }
}

/// The number after `key=` in a `key=value key=value` result line (`SSI-CHECK-TLB: flips=3 ...`).
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The first console line that starts with `prefix`.
pub fn line_starting<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().find(|l| l.starts_with(prefix))
}

/// The value of a `KEY=value` line (the line must start with `KEY=`: the kernel's echo of its
/// command line, which may hold the same text, does not count).
pub fn line_value(console: &str, key: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

/// Asserts that a finished `ssi-vmm up --local` run of cluster `name` (state in `dir/name`) was
/// clean on every one of its `hosts` hosts: every host reported exit 0 with no DSM protocol or
/// send error, its status in `status.json` agrees, no host logged an `ERROR`, no host had to be
/// killed, and every host process is gone. Returns the parsed `status.json`.
pub fn assert_clean_cluster(run: &Run, dir: &Path, name: &str, hosts: usize) -> serde_json::Value {
    let state = dir.join(name);
    run.assert_clean_exit();
    for h in 0..hosts {
        let want = format!("host {h}: exit 0: ");
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(&want))
            .unwrap_or_else(|| panic!("host {h} did not exit cleanly:\n{}", run.stderr));
        assert!(
            line.contains("(DSM: 0 protocol errors, 0 send errors)"),
            "host {h}: {line}"
        );
    }
    assert!(
        !run.stderr.contains("did not exit; killing it"),
        "{}",
        run.stderr
    );
    let mut logs = vec![("host 0 (stderr)".to_string(), run.stderr.clone())];
    for h in 1..hosts {
        let path = state.join(format!("host-{h}.log"));
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        logs.push((format!("host {h}"), log));
    }
    for (who, log) in &logs {
        let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(
            errors.is_empty(),
            "{who} logged errors:\n{}",
            errors.join("\n")
        );
    }
    // A normal start is quiet: the first dials race the peers' listeners, which is expected.
    for (who, log) in &logs {
        let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        if !warns.is_empty() {
            eprintln!("{who} warnings:\n{}", warns.join("\n"));
        }
        let dial: Vec<&&str> = warns
            .iter()
            .filter(|l| l.contains("handshake") || l.contains("dial "))
            .collect();
        assert!(
            dial.is_empty(),
            "{who} warned about dialing on a normal start: {dial:?}"
        );
    }
    // `ssi-vmm status` says the cluster stopped, and why.
    let out = Command::new(vmm_bin())
        .args(["status", "--json", "--state-dir"])
        .arg(dir)
        .output()
        .expect("run ssi-vmm status");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let me = all
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["status"]["name"] == name)
        .unwrap_or_else(|| panic!("cluster {name} not in status --json: {all}"));
    assert_eq!(me["liveness"], "stopped", "{me}");
    assert_eq!(me["status"]["reason"], "PowerOff", "{me}");
    let pids: Vec<u32> = std::fs::read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(pids.len(), hosts, "one process per host: {pids:?}");
    for pid in pids {
        assert!(!alive(pid), "host process {pid} is still there");
    }
    let text =
        std::fs::read_to_string(state.join("status.json")).expect("host 0 wrote status.json");
    let status: serde_json::Value = serde_json::from_str(&text).expect("status.json parses");
    let reported = status["hosts"].as_array().map_or(0, Vec::len);
    assert_eq!(reported, hosts, "every host reported its status:\n{text}");
    for h in status["hosts"].as_array().into_iter().flatten() {
        for key in ["protocol_errors", "send_errors"] {
            assert_eq!(
                h[key].as_u64(),
                Some(0),
                "{key} of host {}:\n{text}",
                h["host"]
            );
        }
    }
    status
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Makes a 64 MiB ext4 image at `path` holding `/ssi-vmm-probe` with the line `probe`.
pub fn make_ext4_image(path: &Path, probe: &str) {
    let dir = path.with_extension("d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("ssi-vmm-probe"), format!("{probe}\n")).expect("probe");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&dir)
        .arg(path)
        .arg("64M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(st.success(), "mkfs.ext4 failed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The contents of `/file` in the ext4 image `image` (debugfs; empty if absent).
pub fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{file}")])
        .arg(image)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `ssi-vmm` with `args`, records when each of `markers` shows up on the console, and
/// kills it at `deadline`.
pub fn run_vmm(args: &[&str], markers: &[&str], deadline: Duration) -> Run {
    run_vmm_with(args, &[], markers, deadline, &mut |_, _| {})
}

/// Console lines with the time the test read each from the VMM's stdout (shared with the
/// callback of [`run_vmm_with`], which runs while later lines keep arriving).
#[derive(Clone, Default)]
pub struct Arrivals(Arc<Mutex<Vec<(Instant, String)>>>);

impl Arrivals {
    /// The lines read at or after `t`.
    pub fn since(&self, t: Instant) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// [`run_vmm`] with extra environment variables, calling `on_mark(marker, arrivals)` when a
/// marker first appears (the VMM keeps running meanwhile; its console lines are still
/// recorded, with their arrival times, in `arrivals`). The callback should not panic: the VMM
/// would be left running.
pub fn run_vmm_with(
    args: &[&str],
    envs: &[(&str, &Path)],
    markers: &[&str],
    deadline: Duration,
    on_mark: &mut dyn FnMut(&str, &Arrivals),
) -> Run {
    let start = Instant::now();
    let arrivals = Arrivals::default();
    let mut child: Child = Command::new(vmm_bin())
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssi-vmm");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let arrived = arrivals.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            arrived
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), line.clone()));
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut console = String::new();
    // SSI_CONSOLE_LOG=FILE: also append the console to FILE as it arrives (to watch long boots).
    let mut tee = std::env::var_os("SSI_CONSOLE_LOG").and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let mut marks = Vec::new();
    let mut status = None;
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                for m in markers {
                    if line.contains(m) && !marks.iter().any(|(x, _): &(String, Duration)| x == m) {
                        marks.push((m.to_string(), start.elapsed()));
                        on_mark(m, &arrivals);
                    }
                }
                if let Some(f) = tee.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                status = child.wait().ok();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if start.elapsed() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    Run {
        console,
        stderr,
        status,
        elapsed: start.elapsed(),
        marks,
    }
}
