//! Bad input to `ssi-vmm run` gives a clear error and a non-zero exit status, never a panic.

use std::path::PathBuf;
use std::process::Command;

use ssi_tests::vmm_bin;

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ssi-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).expect("write temp file");
    p
}

/// Runs ssi-vmm and returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("run ssi-vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "ssi-vmm panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

fn expect_error(args: &[&str], needle: &str) {
    let (code, err) = run(args);
    assert_ne!(code, 0, "expected failure for {args:?}");
    assert!(
        err.contains(needle),
        "stderr for {args:?} should mention {needle:?}:\n{err}"
    );
}

#[test]
fn missing_kernel() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel",
    );
}

#[test]
fn garbage_kernel() {
    let k = tmp("garbage", &[0x42; 65536]);
    expect_error(
        &["run", "--kernel", k.to_str().unwrap_or_default()],
        "not a loadable x86_64 kernel",
    );
    let k = tmp("empty", b"");
    expect_error(
        &["run", "--kernel", k.to_str().unwrap_or_default()],
        "not a loadable x86_64 kernel",
    );
}

#[test]
fn zero_cpus() {
    let k = tmp("k0", &[0; 16]);
    expect_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--cpus",
            "0",
        ],
        "--cpus must be between 1 and",
    );
    expect_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--cpus",
            "100000",
        ],
        "--cpus must be between 1 and",
    );
}

#[test]
fn memory_too_small_or_malformed() {
    let k = tmp("k1", &[0; 16]);
    let k = k.to_str().unwrap_or_default();
    expect_error(
        &["run", "--kernel", k, "--memory", "1M"],
        "--memory must be between",
    );
    expect_error(&["run", "--kernel", k, "--memory", "lots"], "invalid size");
    expect_error(
        &["run", "--kernel", k, "--memory", "100000T"],
        "--memory must be between",
    );
    expect_error(
        &["run", "--kernel", k, "--memory", "99999999999T"],
        "invalid size",
    );
}

#[test]
fn initrd_larger_than_memory() {
    let k = tmp("k2", &[0; 16]);
    let initrd = std::env::temp_dir().join(format!("ssi-cli-{}-bigrd", std::process::id()));
    let f = std::fs::File::create(&initrd).expect("create");
    f.set_len(200 << 20).expect("set_len");
    expect_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--memory",
            "128M",
        ],
        "cannot fit in",
    );
    let _ = std::fs::remove_file(initrd);
}

#[test]
fn unreadable_disk() {
    let k = tmp("k3", &[0; 16]);
    let k = k.to_str().unwrap_or_default();
    expect_error(
        &["run", "--kernel", k, "--disk", "/nonexistent/disk.img"],
        "cannot open disk",
    );
    expect_error(
        &["run", "--kernel", k, "--disk", "/tmp"],
        "cannot open disk",
    );
    // Home-host options: malformed, or a host a single-host machine does not have.
    expect_error(
        &["run", "--kernel", k, "--disk", "/tmp/x.img,host=two"],
        "invalid disk option \"host=two\"",
    );
    expect_error(
        &["run", "--kernel", k, "--disk", "/tmp/x.img,host=1"],
        "is on host 1, but the machine has 1 host(s)",
    );
}

/// Runs ssi-vmm with `SSI_VMM_STATE_DIR=root` and returns (exit code, stderr).
fn run_in(root: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(vmm_bin())
        .args(args)
        .env("SSI_VMM_STATE_DIR", root)
        .output()
        .expect("run ssi-vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "ssi-vmm panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

fn state_root(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssi-cli-state-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

#[test]
fn pause_and_resume_of_a_missing_vm() {
    let root = state_root("missing");
    for verb in ["pause", "resume"] {
        let (code, err) = run_in(&root, &[verb, "nosuchvm"]);
        assert_ne!(code, 0, "{verb}: {err}");
        assert!(err.contains("no VM named \"nosuchvm\""), "{verb}: {err}");
    }
    let (code, err) = run_in(&root, &["pause", "../etc"]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid VM name"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn pause_of_an_exited_vm() {
    let root = state_root("exited");
    // A state directory without a socket: the VM is gone.
    std::fs::create_dir_all(root.join("gone")).expect("mkdir");
    let (code, err) = run_in(&root, &["pause", "gone"]);
    assert_ne!(code, 0);
    assert!(err.contains("has no control socket"), "{err}");
    // A stale socket left by a VM that died: nobody listens.
    std::fs::create_dir_all(root.join("dead")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(root.join("dead/control.sock")).expect("bind"));
    let (code, err) = run_in(&root, &["resume", "dead"]);
    assert_ne!(code, 0);
    assert!(err.contains("the VM has exited"), "{err}");
    // The same for a cluster host's socket.
    std::fs::create_dir_all(root.join("cl")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(root.join("cl/host-0.sock")).expect("bind"));
    let (code, err) = run_in(&root, &["pause", "cl"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("host 0:") && err.contains("has exited"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn run_refuses_a_bad_or_taken_name() {
    let root = state_root("name");
    let k = tmp("kname", &[0; 16]);
    let (code, err) = run_in(
        &root,
        &[
            "run",
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--name",
            "a/b",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("invalid VM name"), "{err}");
    // Something that is not a socket where the control socket goes.
    std::fs::create_dir_all(root.join("taken")).expect("mkdir");
    std::fs::write(root.join("taken/control.sock"), b"x").expect("write");
    let (code, err) = run_in(
        &root,
        &[
            "run",
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--name",
            "taken",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("is not a socket"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
