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
