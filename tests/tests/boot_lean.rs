//! The lean guest kernel + busybox initramfs boots to userspace through the real path (userspace
//! LAPIC/IOAPIC, ACPI, serial) and powers off cleanly. With 2 vCPUs the guest must see both:
//! the application processor was started by INIT/SIPI through the VMM's local APIC.
//! The 1-vCPU boot is also paused for 3 s once userspace is up (`ssi-vmm pause NAME`, over the
//! control socket) and resumed: nothing runs meanwhile, and the guest then finishes as usual.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ssi_tests::{initramfs, lean_kernel, run_vmm_with, vmm_bin, Arrivals};

const DEADLINE: Duration = Duration::from_secs(900);

/// How long the guest stays paused.
const PAUSE: Duration = Duration::from_secs(3);

/// `ssi-vmm VERB NAME` with the test's state root; Err(stderr) on failure.
fn control_cli(root: &Path, verb: &str, name: &str) -> Result<(), String> {
    let out = Command::new(vmm_bin())
        .args([verb, name])
        .env("SSI_VMM_STATE_DIR", root)
        .output()
        .map_err(|e| format!("cannot run ssi-vmm {verb}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ssi-vmm {verb} {name}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The `status` op on the control socket, parsed.
fn status(sock: &Path) -> Result<serde_json::Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"{\"version\":1,\"op\":\"status\"}\n")
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))
}

/// Pauses the VM for [`PAUSE`], checking that it is paused and does nothing, then resumes it.
/// Returns what went wrong (the VMM is still running here: no panics).
fn pause_and_resume(root: &Path, name: &str, console: &Arrivals) -> Vec<String> {
    let mut problems = Vec::new();
    let sock = root.join(name).join("control.sock");
    if let Err(e) = control_cli(root, "pause", name) {
        problems.push(e);
        return problems;
    }
    // Console output written before the pause was acknowledged may still be in the pipe.
    std::thread::sleep(Duration::from_millis(200));
    let quiet_from = Instant::now();
    let before = status(&sock);
    std::thread::sleep(PAUSE);
    let after = status(&sock);
    let printed = console.since(quiet_from);
    match (&before, &after) {
        (Ok(b), Ok(a)) => {
            for st in [b, a] {
                if st["ok"] != true || st["state"] != "paused" {
                    problems.push(format!("status while paused: {st}"));
                }
                let vcpus = st["vcpus"].as_array().cloned().unwrap_or_default();
                if vcpus.is_empty() || vcpus.iter().any(|v| v["state"] != "paused") {
                    problems.push(format!("every vCPU must be paused: {st}"));
                }
            }
            if b["vcpus"] != a["vcpus"] {
                problems.push(format!("exit counts moved while paused: {b} -> {a}"));
            }
        }
        _ => problems.push(format!("status: {before:?} / {after:?}")),
    }
    if !printed.is_empty() {
        problems.push(format!("the guest printed while paused: {printed:?}"));
    }
    if let Err(e) = control_cli(root, "resume", name) {
        problems.push(e);
    }
    match status(&sock) {
        Ok(st) if st["state"] == "running" => {}
        other => problems.push(format!("status after resume: {other:?}")),
    }
    eprintln!("paused for {PAUSE:?}: {} problem(s)", problems.len());
    problems
}

/// Boots with `cpus` vCPUs, checks what must hold, and returns the console. With `pause`, the
/// guest is paused for a while once userspace is up (see [`pause_and_resume`]).
fn boot(cpus: u32, pause: bool) -> String {
    let root =
        std::env::temp_dir().join(format!("ssi-boot-lean-state-{cpus}-{}", std::process::id()));
    let name = format!("boot-lean-{cpus}");
    let _ = std::fs::remove_dir_all(&root);
    let kernel = lean_kernel();
    let initrd = initramfs();
    let cpus_s = cpus.to_string();
    let stats =
        std::env::temp_dir().join(format!("ssi-boot-lean-{cpus}-{}.json", std::process::id()));
    let cl = String::from("ssi.test=boot");
    let mut paused = None;
    let run = run_vmm_with(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--memory",
            "512M",
            "--cpus",
            &cpus_s,
            "--append",
            &cl,
            "--stats-json",
            stats.to_str().unwrap_or_default(),
            "--name",
            &name,
        ],
        &[("SSI_VMM_STATE_DIR", root.as_path())],
        &["SSI-VMM-USERSPACE-UP", "SSI-VMM-TEST-EXIT"],
        DEADLINE,
        &mut |m, console| {
            if pause && m == "SSI-VMM-USERSPACE-UP" {
                paused = Some(pause_and_resume(&root, &name, console));
            }
        },
    );
    run.assert_clean_exit();
    if pause {
        let problems = paused.expect("the guest reached userspace and was paused");
        assert!(problems.is_empty(), "pause/resume: {problems:#?}");
    }
    assert!(
        !root.join(&name).exists(),
        "the control socket and state directory are removed on exit"
    );
    let _ = std::fs::remove_dir_all(&root);
    let up = run
        .mark("SSI-VMM-USERSPACE-UP")
        .expect("guest reached userspace");
    eprintln!(
        "lean kernel, {cpus} vCPU(s): userspace after {up:?}, total {:?}",
        run.elapsed
    );
    assert_eq!(
        run.value("SSI-VMM-NPROC").as_deref(),
        Some(cpus_s.as_str()),
        "{}",
        run.console
    );
    // No user process may crash (this caught the AVX-512 state leak of `noxsave`, see
    // docs/ARCHITECTURE.md "Host quirks"), and vector registers survive context switches.
    assert!(
        !run.console.contains("segfault at"),
        "a guest process crashed:\n{}",
        run.console
    );
    assert!(
        run.console
            .lines()
            .any(|l| l.starts_with("SSI-CHECK-VECTOR:") && l.ends_with("mismatches=0")),
        "vector registers must survive context switches:\n{}",
        run.console
    );
    assert!(run.console.contains("SSI-VMM-BOOT-OK"), "{}", run.console);
    assert_eq!(run.value("SSI-VMM-TEST-EXIT").as_deref(), Some("0"));
    assert!(
        run.stderr.contains("PowerOff"),
        "stopped by ACPI poweroff: {}",
        run.stderr
    );
    let json = std::fs::read_to_string(&stats).expect("stats json written");
    assert!(json.contains("\"exits\""), "{json}");
    let _ = std::fs::remove_file(stats);
    run.console
}

#[test]
fn lean_kernel_one_vcpu() {
    let _ = boot(1, true);
}

#[test]
fn lean_kernel_two_vcpus() {
    let _ = boot(2, false);
}
