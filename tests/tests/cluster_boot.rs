//! One guest across several `ssi-vmm` host processes on this machine (`ssi-vmm up --local N`):
//! the lean kernel boots with one vCPU per host, the guest sees every host's CPU, the in-guest
//! SMP checker (vector registers across context switches, TLB shootdowns, locks, shared rings,
//! cross-CPU memory verification, threads pinned to CPUs on different hosts) finds no mismatch, and a clean poweroff ends every host process. Killing a
//! host stops the others within seconds.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ssi_tests::{debugfs_cat, initramfs, lean_kernel, make_ext4_image, run_vmm, vmm_bin};

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

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
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

/// Boots the lean kernel on `hosts` local hosts with `append`, asserts a clean run on every
/// host, and returns the console and the state directory.
fn boot(name: &str, hosts: usize, append: &str) -> (String, PathBuf) {
    boot_with(name, hosts, append, &[])
}

/// [`boot`] with more `up` arguments.
fn boot_with(name: &str, hosts: usize, append: &str, extra: &[&str]) -> (String, PathBuf) {
    let dir = state_dir(name);
    // The test binary runs its tests one at a time; the variable only reaches our children.
    std::env::set_var("SSI_VMM_STATE_DIR", &dir);
    let n = hosts.to_string();
    let mut args = up_args(name, hosts, append);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_vmm(
        &args,
        &["SSI-VMM-USERSPACE-UP", "SSI-VMM-TEST-EXIT"],
        DEADLINE,
    );
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
    run.assert_clean_exit();
    for h in 0..hosts {
        assert!(
            run.stderr.contains(&format!("host {h}: exit 0")),
            "host {h} did not exit cleanly: {}",
            run.stderr
        );
    }
    for pid in pids(&dir, name) {
        assert!(!alive(pid), "host process {pid} is still there");
    }
    assert_eq!(
        run.value("SSI-VMM-NPROC").as_deref(),
        Some(n.as_str()),
        "{}",
        run.console
    );
    (run.console, dir)
}

fn check_console(console: &str, hosts: usize) {
    let line = console
        .lines()
        .find(|l| l.starts_with("SSI-CHECK:"))
        .unwrap_or_else(|| panic!("no checker result:\n{console}"));
    assert!(line.contains(&format!("cpus={hosts}")), "{line}");
    assert!(line.ends_with("mismatches=0"), "{console}");
    assert!(console.contains("SSI-VMM-CHECK-OK"), "{console}");
    assert!(console.contains("ssi-check: pinned=yes"), "{console}");
    let vector = console
        .lines()
        .find(|l| l.starts_with("SSI-CHECK-VECTOR:"))
        .unwrap_or_else(|| panic!("no vector-register result:\n{console}"));
    assert!(vector.ends_with("mismatches=0"), "{vector}");
    // TLB shootdowns: mprotect() on one CPU with the mm live on the others' hosts completes
    // (a lost IPI would hang it) and readers never see a torn value.
    let tlb = console
        .lines()
        .find(|l| l.starts_with("SSI-CHECK-TLB:"))
        .unwrap_or_else(|| panic!("no TLB-shootdown result:\n{console}"));
    assert!(
        tlb.contains(&format!("cpus={hosts}")) && tlb.ends_with("mismatches=0"),
        "{tlb}"
    );
    assert!(!tlb.contains("flips=0 "), "{tlb}");
    let crashes = console.matches("segfault at").count();
    assert_eq!(crashes, 0, "guest user processes crashed:\n{console}");
}

/// Two hosts: the checker passes, and then the guest fills and verifies `AGGR_MB` MiB, each
/// half from a CPU on another host, while neither host ends up holding all of it (memory
/// aggregation: the guest uses more memory than any one host has).
#[test]
fn two_hosts_boot_pass_the_smp_checker_and_aggregate_memory() {
    const AGGR_MB: u64 = 160;
    let (console, dir) = boot(
        "two",
        2,
        &format!("ssi.test=check ssi.check_seconds=20 ssi.check_mem=16 ssi.check_aggr={AGGR_MB}"),
    );
    check_console(&console, 2);
    // The default: the guest runs its APICs in x2APIC mode (MSR interface, 32-bit IDs).
    assert!(
        console.contains("x2apic enabled") && console.contains("physical x2apic"),
        "{console}"
    );
    let aggr = console
        .lines()
        .find(|l| l.starts_with("SSI-CHECK-AGGR:"))
        .unwrap_or_else(|| panic!("no aggregation result:\n{console}"));
    assert!(aggr.ends_with("mismatches=0"), "{aggr}");
    let status = std::fs::read_to_string(dir.join("two").join("status.json"))
        .expect("host 0 wrote the cluster status");
    let resident: Vec<u64> = status
        .lines()
        .filter(|l| l.contains("\"resident_pages\""))
        .filter_map(|l| {
            l.split(':')
                .nth(1)?
                .trim()
                .trim_end_matches(',')
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(resident.len(), 2, "{status}");
    let verified = AGGR_MB << 8;
    for (h, r) in resident.iter().enumerate() {
        eprintln!("host {h}: {r} resident pages; the guest verified {verified} pages");
        assert!(
            *r < verified,
            "host {h} holds {r} pages: no aggregation\n{status}"
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
    let (console, _) = boot_with(
        "three",
        3,
        &format!(
            "nox2apic ssi.test=check,disk ssi.check_seconds=20 ssi.check_mem=16 ssi.token={token}"
        ),
        &["--disk", &disk],
    );
    check_console(&console, 3);
    assert!(!console.contains("x2apic enabled"), "{console}");
    assert_eq!(
        value(&console, "SSI-VMM-DISK-READ").as_deref(),
        Some(probe.as_str()),
        "{console}"
    );
    assert!(console.contains("SSI-VMM-DISK-OK"), "{console}");
    assert_eq!(debugfs_cat(&image, "ssi-vmm-written").trim(), token);
    let _ = std::fs::remove_file(image);
}

fn value(console: &str, key: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

#[test]
fn killing_a_host_stops_the_others() {
    let name = "kill";
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
            Ok(l) => seen = l.contains("smp: Brought up") || l.contains("SSI-VMM-USERSPACE-UP"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    assert!(seen, "the guest never brought up its second CPU");
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
