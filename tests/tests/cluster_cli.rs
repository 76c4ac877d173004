//! Cluster launch errors: an unreachable host, a wrong key, a bad cluster file and a missing
//! status give clear errors and a non-zero status, quickly, with no process left behind.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ssi_tests::vmm_bin;

fn tmp(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ssi-ccli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).expect("write temp file");
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn cluster_file(name: &str, ports: &[u16]) -> PathBuf {
    let mut t =
        format!("name = \"{name}\"\nmemory = \"256M\"\nkernel = \"/nonexistent/vmlinux\"\n");
    for p in ports {
        t.push_str(&format!("[[host]]\naddr = \"127.0.0.1:{p}\"\ncpus = 1\n"));
    }
    tmp(&format!("{name}.toml"), &t)
}

fn run(args: &[&str]) -> (i32, String, Duration) {
    let t = Instant::now();
    let out = Command::new(vmm_bin())
        .args(args)
        .env(
            "SSI_VMM_STATE_DIR",
            std::env::temp_dir().join("ssi-ccli-state"),
        )
        .output()
        .expect("run ssi-vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "ssi-vmm panicked: {err}");
    (out.status.code().unwrap_or(-1), err, t.elapsed())
}

#[test]
fn unreachable_host_is_reported_by_name() {
    let key = tmp("key-unreach", "0123456789abcdef0123456789abcdef");
    let file = cluster_file("unreach", &[free_port(), free_port()]);
    let (code, err, took) = run(&[
        "up",
        "--config",
        file.to_str().unwrap_or_default(),
        "--key-file",
        key.to_str().unwrap_or_default(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("host 0 at 127.0.0.1:") && err.contains("unreachable"),
        "{err}"
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
}

#[test]
fn job_with_the_wrong_key_is_refused_and_the_daemon_keeps_waiting() {
    let port = free_port();
    let good = tmp("key-good", "the daemon's own cluster key 0001");
    let bad = tmp("key-bad", "somebody else's key, not ours 0002");
    let mut daemon = Command::new(vmm_bin())
        .args([
            "host",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--key-file",
            good.to_str().unwrap_or_default(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn daemon");
    let file = cluster_file("badkey", &[port]);
    let (code, err, _) = run(&[
        "up",
        "--config",
        file.to_str().unwrap_or_default(),
        "--key-file",
        bad.to_str().unwrap_or_default(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("refused the job") && err.contains("authentication failed"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        daemon.try_wait().expect("try_wait").is_none(),
        "the daemon must survive a bad job"
    );
    let _ = daemon.kill();
    let out = daemon.wait_with_output().expect("daemon output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("refused a job"), "daemon log: {log}");
}

#[test]
fn bad_cluster_files_and_arguments() {
    let key = tmp("key-files", "0123456789abcdef0123456789abcdef");
    let cases = [
        ("name = \"x\"\nmemory = \"1G\"\nkernel = \"/k\"\n", "host"),
        (
            "name = \"x\"\nmemory = \"1G\"\nkernel = \"/k\"\n[[host]]\naddr = \"nowhere\"\ncpus = 1\n",
            "bad address",
        ),
        ("this is not toml", "cluster file"),
        (
            "name = \"x\"\nmemory = \"1G\"\nkernel = \"/k\"\n[[host]]\naddr = \"127.0.0.1:1\"\ncpus = 1\n\
             [[disk]]\npath = \"/d.img\"\nhost = 1\n",
            "is on host 1, but the machine has 1 host(s)",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = tmp(&format!("bad{i}.toml"), text);
        let (code, err, _) = run(&[
            "up",
            "--config",
            f.to_str().unwrap_or_default(),
            "--key-file",
            key.to_str().unwrap_or_default(),
        ]);
        assert_ne!(code, 0);
        assert!(err.contains(want), "{text:?}: {err}");
    }
    let short = tmp("key-short", "short");
    let f = cluster_file("shortkey", &[free_port()]);
    let (code, err, _) = run(&[
        "up",
        "--config",
        f.to_str().unwrap_or_default(),
        "--key-file",
        short.to_str().unwrap_or_default(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 16 bytes"), "{err}");
    let (code, err, _) = run(&["up", "--local", "2", "--kernel", "/nonexistent/vmlinux"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot open kernel"), "{err}");
    let (code, err, _) = run(&[
        "up",
        "--local",
        "2",
        "--kernel",
        "/nonexistent/vmlinux",
        "--disk",
        "/tmp/x.img,host=2",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is on host 2, but the machine has 2 host(s)"),
        "{err}"
    );
    let (code, err, _) = run(&["up"]);
    assert_ne!(code, 0);
    assert!(err.contains("--config") && err.contains("--local"), "{err}");
}

#[test]
fn status_without_a_cluster_is_an_error() {
    let empty = std::env::temp_dir().join(format!("ssi-ccli-empty-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&empty);
    let (code, err, _) = run(&["status", "--state-dir", empty.to_str().unwrap_or_default()]);
    assert_ne!(code, 0);
    assert!(err.contains("no cluster status"), "{err}");
}
