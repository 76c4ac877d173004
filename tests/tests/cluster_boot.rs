//! One guest across several `ssi-vmm` host processes on this machine (`ssi-vmm up --local N`):
//! the lean kernel boots with one vCPU per host, the guest sees every host's CPU, the in-guest
//! SMP checker (vector registers across context switches, TLB shootdowns, locks, shared rings,
//! cross-CPU memory verification, threads pinned to CPUs on different hosts) finds no mismatch, and a clean poweroff ends every host process. Killing a
//! host stops the others within seconds; SIGINT to `up` stops every host cleanly (exit 130),
//! and kill -9 of `up` makes the hosts stop by themselves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ssi_tests::{
    alive, assert_clean_cluster, debugfs_cat, field, initramfs, lean_kernel, line_starting,
    line_value, make_ext4_image, run_vmm_with, vmm_bin,
};

const DEADLINE: Duration = Duration::from_secs(2400);

fn state_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssi-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn pids(dir: &Path, name: &str) -> Vec<u32> {
    std::fs::read_to_string(dir.join(name).join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

/// `ssi-vmm up --local` arguments for the lean kernel and the test initramfs.
fn up_args(name: &str, hosts: usize, append: &str) -> Vec<String> {
    let (kernel, initrd) = (lean_kernel(), initramfs());
    [
        "up",
        "--local",
        &hosts.to_string(),
        "--name",
        name,
        "--kernel",
        kernel.to_str().unwrap_or_default(),
        "--initrd",
        initrd.to_str().unwrap_or_default(),
        "--memory",
        "512M",
        "--append",
        append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Boots the lean kernel on `hosts` local hosts with `append` (and `extra` `up` arguments),
/// asserts a clean run on every host (exit 0, no DSM protocol or send error, no `ERROR` in any
/// log, no host killed), and returns the console and the parsed `status.json`.
/// With `snapshot = Some((marker, dir))`, `ssi-vmm snapshot NAME DIR` (the VM goes on) runs
/// when `marker` appears on the console; it must succeed.
fn boot_with(
    name: &str,
    hosts: usize,
    append: &str,
    extra: &[&str],
    snapshot: Option<(&str, &Path)>,
) -> (String, serde_json::Value) {
    let dir = state_dir(name);
    // The test binary runs its tests one at a time; the variable only reaches our children.
    std::env::set_var("SSI_VMM_STATE_DIR", &dir);
    let n = hosts.to_string();
    let mut args = up_args(name, hosts, append);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut markers = vec!["SSI-VMM-USERSPACE-UP", "SSI-VMM-TEST-EXIT"];
    if let Some((m, _)) = snapshot {
        markers.push(m);
    }
    let mut took = None;
    let run = run_vmm_with(&args, &[], &markers, DEADLINE, &mut |m, _| {
        let Some((at, snap)) = snapshot.filter(|(at, _)| *at == m) else {
            return;
        };
        let _ = at;
        let out = Command::new(vmm_bin())
            .args(["snapshot", name])
            .arg(snap)
            .output();
        took = Some(out.map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        }));
    });
    if let Some((_, snap)) = snapshot {
        let (ok, err) = match took {
            Some(Ok(x)) => x,
            other => panic!("no snapshot taken: {other:?}\n{}", run.stderr),
        };
        eprintln!("snapshot while the checker ran: {err}");
        assert!(ok && err.contains("resumed"), "{err}");
        assert!(snap.join("manifest.json").exists());
    }
    let up = run.mark("SSI-VMM-USERSPACE-UP");
    eprintln!(
        "{hosts} hosts: userspace after {up:?}, total {:?}",
        run.elapsed
    );
    for h in 1..hosts {
        let log = std::fs::read_to_string(dir.join(name).join(format!("host-{h}.log")))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        eprintln!(
            "--- host {h} log tail ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let status = assert_clean_cluster(&run, &dir, name, hosts);
    assert_eq!(
        line_value(&run.console, "SSI-VMM-NPROC").as_deref(),
        Some(n.as_str()),
        "{}",
        run.console
    );
    (run.console, status)
}

/// The result line starting with `prefix`, which must end in `mismatches=0`.
fn result_line<'a>(console: &'a str, prefix: &str) -> &'a str {
    let line = line_starting(console, prefix)
        .unwrap_or_else(|| panic!("no {prefix} result line:\n{console}"));
    assert!(line.ends_with(" mismatches=0"), "{line}\n{console}");
    line
}

/// `key=N` of `line`, which must be present and > 0.
fn positive(line: &str, key: &str) -> u64 {
    let v = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line}"));
    assert!(v > 0, "{key} is 0: {line}");
    v
}

/// The in-guest checker's results: every check ran, did work and found no mismatch.
fn check_console(console: &str, hosts: usize) {
    let cpus = format!("cpus={hosts}");
    let line = result_line(console, "SSI-CHECK:");
    assert!(line.contains(&cpus), "{line}");
    positive(line, "ops");
    assert!(console.contains("SSI-VMM-CHECK-OK"), "{console}");
    // Every worker stayed on the CPU it was pinned to (CPUs on different hosts).
    assert!(console.contains("ssi-check: pinned=yes"), "{console}");
    assert!(!console.contains("pinned=no"), "{console}");
    for phase in ["mutex-counters", "spin-counters"] {
        let l = line_starting(console, &format!("ssi-check: phase {phase}:"))
            .unwrap_or_else(|| panic!("no {phase} phase:\n{console}"));
        positive(l, "ops");
    }
    let rings = line_starting(console, "ssi-check: phase rings:")
        .unwrap_or_else(|| panic!("no rings phase:\n{console}"));
    positive(rings, "messages");
    let mem = line_starting(console, "ssi-check: phase memory:")
        .unwrap_or_else(|| panic!("no memory phase:\n{console}"));
    positive(mem, "pages-verified");
    // Vector registers (xmm/ymm/zmm, opmasks, x87 control word, MXCSR) survive context switches.
    let vector = result_line(console, "SSI-CHECK-VECTOR:");
    positive(vector, "rounds");
    // TLB shootdowns: mprotect() on one CPU with the mm live on the others' hosts completes
    // (a lost IPI would hang it), readers never see a torn value, and every write tried while
    // the page is read-only faults (a missed shootdown would let it land).
    let tlb = result_line(console, "SSI-CHECK-TLB:");
    assert!(tlb.contains(&cpus), "{tlb}");
    positive(tlb, "flips");
    positive(tlb, "reads");
    let probes = positive(tlb, "probes");
    assert_eq!(field(tlb, "faults"), Some(probes), "{tlb}");
    let crashes = console.matches("segfault at").count();
    assert_eq!(crashes, 0, "guest user processes crashed:\n{console}");
}

/// `key` of host `h` in `status.json`.
fn host_stat(status: &serde_json::Value, h: u64, key: &str) -> u64 {
    status["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["host"].as_u64() == Some(h))
        .and_then(|x| x[key].as_u64())
        .unwrap_or_else(|| panic!("no {key} for host {h} in {status}"))
}

/// Two hosts: the checker passes, and then the guest fills and verifies `AGGR_MB` MiB, each
/// half from a CPU on another host, while neither host ends up holding all of it (memory
/// aggregation: the guest uses more memory than any one host has).
#[test]
fn two_hosts_boot_pass_the_smp_checker_and_aggregate_memory() {
    const AGGR_MB: u64 = 160;
    // A cluster snapshot in the middle of the vector-register check: every vCPU of both hosts
    // pauses, saves and resumes, and every check must still pass.
    let snap = state_dir("two-snap").join("snap");
    let _ = std::fs::create_dir_all(snap.parent().unwrap_or(Path::new("/tmp")));
    let (console, status) = boot_with(
        "two",
        2,
        &format!("ssi.test=check ssi.check_seconds=20 ssi.check_mem=16 ssi.check_aggr={AGGR_MB}"),
        &[],
        Some(("ssi-check: vector:", &snap)),
    );
    check_console(&console, 2);
    let out = Command::new(vmm_bin())
        .args(["snapshot", "inspect"])
        .arg(&snap)
        .output()
        .expect("snapshot inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    for f in ["memory-h0", "memory-h1", "state-h0-vcpus", "state-h1-vcpus"] {
        assert!(text.contains(f), "{f} in:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&snap);
    // The default: the guest runs its APICs in x2APIC mode (MSR interface, 32-bit IDs).
    assert!(
        console.contains("x2apic enabled") && console.contains("physical x2apic"),
        "{console}"
    );
    let aggr = result_line(&console, "SSI-CHECK-AGGR:");
    let verified = AGGR_MB << 8;
    positive(aggr, "ops");
    let resident: Vec<u64> = (0..2)
        .map(|h| host_stat(&status, h, "resident_pages"))
        .collect();
    eprintln!("resident pages per host: {resident:?}; the guest verified {verified} pages");
    // Together the hosts hold at least the verified buffer, and neither holds most of it: each
    // half lives on the host of the CPU that wrote it.
    let sum: u64 = resident.iter().sum();
    assert!(
        sum >= verified,
        "resident {resident:?} < {verified}\n{status}"
    );
    for (h, r) in resident.iter().enumerate() {
        assert!(
            *r <= verified * 3 / 4,
            "host {h} holds {r} pages, more than 3/4 of the {verified} verified: no aggregation\n{status}"
        );
    }
}

/// Three hosts, with the guest in xAPIC mode (`nox2apic`: logical flat IPIs; the two-host
/// test runs the default x2APIC mode) and a virtio-blk disk homed on host 2: its MMIO is
/// forwarded there from the other hosts, its interrupts travel to host 0's IOAPIC, the guest
/// reads a file put in the image and writes one that is in the image after poweroff.
#[test]
fn three_hosts_boot_and_pass_the_smp_checker_with_a_disk_on_host_2() {
    let image = std::env::temp_dir().join(format!("ssi-cluster-disk-{}.img", std::process::id()));
    let probe = format!("probe-{}", std::process::id());
    let token = format!("token-{}", std::process::id());
    make_ext4_image(&image, &probe);
    let disk = format!("{},host=2", image.display());
    let (console, status) = boot_with(
        "three",
        3,
        &format!(
            "nox2apic ssi.test=check,disk ssi.check_seconds=20 ssi.check_mem=16 ssi.token={token}"
        ),
        &["--disk", &disk],
        None,
    );
    check_console(&console, 3);
    assert!(!console.contains("x2apic enabled"), "{console}");
    assert_eq!(
        line_value(&console, "SSI-VMM-DISK-READ").as_deref(),
        Some(probe.as_str()),
        "{console}"
    );
    assert!(console.contains("SSI-VMM-DISK-OK"), "{console}");
    assert_eq!(debugfs_cat(&image, "ssi-vmm-written").trim(), token);
    // The disk's MMIO really crossed hosts: host 0 (the boot CPU, which probes the device)
    // forwarded accesses, and host 2, the disk's home, served them.
    let (fwd, served) = (
        host_stat(&status, 0, "io_forwarded"),
        host_stat(&status, 2, "io_served"),
    );
    eprintln!("forwarded I/O: host 0 sent {fwd}, host 2 served {served}");
    assert!(fwd > 0 && served > 0, "no forwarded I/O:\n{status}");
    let _ = std::fs::remove_file(image);
}

/// Starts `up --local 2` (cluster `name`, `ssi.test=boot`) and waits until the guest runs on
/// both hosts (the AP on host 1 is online). Returns `up` and the state root.
fn start_two_hosts(name: &str) -> (std::process::Child, PathBuf) {
    let dir = state_dir(name);
    let mut up = Command::new(vmm_bin())
        .args(up_args(name, 2, "ssi.test=boot"))
        .env("SSI_VMM_STATE_DIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssi-vmm up");
    let stdout = up.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // Wait until the guest runs on both hosts (the AP on host 1 is online).
    let start = Instant::now();
    let mut seen = false;
    while start.elapsed() < DEADLINE && !seen {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => seen = l.contains("smp: Brought up") && l.contains(" 2 CPUs"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    assert!(seen, "the guest never brought up its second CPU");
    // Keep draining the console.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (up, dir)
}

/// Waits up to `limit` for `up` to exit; kills it after that. Returns its status (None if it
/// had to be killed), its stderr and how long it took.
fn wait_up(
    mut up: std::process::Child,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, Duration) {
    let t = Instant::now();
    let mut status = None;
    while t.elapsed() < limit {
        if let Ok(Some(s)) = up.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    if status.is_none() {
        let _ = up.kill();
    }
    let out = up.wait_with_output().expect("up output");
    (
        status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    )
}

/// Waits up to `limit` for every process of `pids` to be gone.
fn all_gone(pids: &[u32], limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !pids.iter().any(|&p| alive(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// `ssi-vmm status --json` entry of cluster `name` under `dir`.
fn status_of(dir: &Path, name: &str) -> serde_json::Value {
    let out = Command::new(vmm_bin())
        .args(["status", "--json", "--state-dir"])
        .arg(dir)
        .output()
        .expect("run ssi-vmm status");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all.as_array()
        .into_iter()
        .flatten()
        .find(|e| e["status"]["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in status --json: {all}"))
}

/// SIGINT to `up` (foreground, `up --local 2`) stops the VM on every host: `up` exits with 130
/// within seconds after every host reported, no host process is left, and `status` says
/// stopped, by SIGINT. (SIGTERM and SIGHUP take the same path; their exit codes are unit
/// tested.)
#[test]
fn signals_stop_every_host() {
    let name = "sigint";
    let (up, dir) = start_two_hosts(name);
    let ps = pids(&dir, name);
    assert_eq!(ps.len(), 2, "pids of the host processes");
    let st = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    let (status, err, took) = wait_up(up, Duration::from_secs(30));
    eprintln!("`up` exited {took:?} after SIGINT: {status:?}\n{err}");
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(err.contains("stopped on SIGINT (exit 130)"), "{err}");
    for h in 0..2 {
        assert!(
            err.contains(&format!("host {h}: exit ")),
            "no report of host {h}: {err}"
        );
    }
    assert!(
        !err.contains("killing"),
        "the hosts had to be killed: {err}"
    );
    assert!(
        all_gone(&ps, Duration::from_secs(2)),
        "host processes left: {ps:?}"
    );
    let me = status_of(&dir, name);
    assert_eq!(me["liveness"], "stopped", "{me}");
    let reason = me["status"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("SIGINT"), "{me}");
}

/// kill -9 of `up`: the host daemons see their job connection end and stop by themselves.
#[test]
fn killing_up_stops_every_host() {
    let name = "killup";
    let (mut up, dir) = start_two_hosts(name);
    let ps = pids(&dir, name);
    assert_eq!(ps.len(), 2, "pids of the host processes");
    let st = Command::new("kill")
        .args(["-9", &up.id().to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    // Only reap it: host 0 still holds its stderr.
    let _ = up.wait();
    let t = Instant::now();
    assert!(
        all_gone(&ps, Duration::from_secs(20)),
        "host processes left 20 s after `up` was killed: {ps:?}"
    );
    eprintln!("hosts gone {:?} after kill -9 of `up`", t.elapsed());
    let me = status_of(&dir, name);
    assert_eq!(me["liveness"], "stopped", "{me}");
    let reason = me["status"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("went away"), "{me}");
}

#[test]
fn killing_a_host_stops_the_others() {
    let name = "kill";
    let (mut up, dir) = start_two_hosts(name);
    let ps = pids(&dir, name);
    assert_eq!(ps.len(), 2, "pids of the host processes");
    let killed = Instant::now();
    // SAFETY-free: plain kill(1) of our own child's child.
    let st = Command::new("kill")
        .args(["-9", &ps[1].to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    let mut status = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(s)) = up.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    if status.is_none() {
        let _ = up.kill();
    }
    let out = up.wait_with_output().expect("up output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some(),
        "`up` still running 30 s after a host was killed: {err}"
    );
    assert!(
        !out.status.success(),
        "a killed host must fail the run: {err}"
    );
    assert!(
        err.contains("host 1 died or became unreachable"),
        "host 0 names the dead host: {err}"
    );
    eprintln!("stopped {took:?} after the kill");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    std::thread::sleep(Duration::from_millis(200));
    for pid in ps {
        assert!(!alive(pid), "host process {pid} is still there");
    }
}
