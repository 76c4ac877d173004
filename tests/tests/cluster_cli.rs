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

/// Runs `ssi-vmm status ARGS --state-dir ROOT`; returns (code, stdout, stderr).
fn status(root: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vmm_bin())
        .arg("status")
        .args(args)
        .arg("--state-dir")
        .arg(root)
        .output()
        .expect("run ssi-vmm status");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "ssi-vmm panicked: {err}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

/// A cluster whose status says running but whose processes are gone is `gone`; a stopped one
/// says why and when; `--json` says the same; `--prune` removes both directories.
#[test]
fn status_tells_running_from_stopped_and_gone_clusters() {
    let root = std::env::temp_dir().join(format!("ssi-ccli-status-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let host = r#"{"host":0,"addr":"127.0.0.1:1","vcpus":[0],"resident_pages":5,"owned_pages":1,
        "directory_entries":0,"faults":[0,0,0],"pages_in":0,"pages_out":0}"#;
    let write = |name: &str, body: String| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("status.json"), body).expect("status.json");
        d
    };
    // Killed with -9: still "running" in its file, its pids are gone.
    let dead = write(
        "dead",
        format!(
            r#"{{"name":"dead","state":"running","updated":{},"hosts":[{host}]}}"#,
            now - 30
        ),
    );
    std::fs::write(dead.join("pids"), "0 999999998\n1 999999999\n").expect("pids");
    write(
        "done",
        format!(
            r#"{{"name":"done","state":"stopped","updated":{0},"hosts":[{host}],
            "reason":"PowerOff","stopped_at":{0}}}"#,
            now - 5
        ),
    );
    let (code, out, err) = status(&root, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("cluster \"dead\": 1 host(s), gone (processes no longer exist; last update"),
        "{out}"
    );
    assert!(
        out.contains("cluster \"done\": 1 host(s), stopped (PowerOff, "),
        "{out}"
    );
    let (code, out, err) = status(&root, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json parses");
    let states: Vec<(&str, &str)> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["status"]["name"].as_str().unwrap_or_default(),
                e["liveness"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(states, [("dead", "gone"), ("done", "stopped")], "{out}");
    assert_eq!(v[1]["status"]["reason"], "PowerOff", "{out}");
    let (code, _, err) = status(&root, &["--prune"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("removed") && !root.join("dead").exists() && !root.join("done").exists());
    let (code, _, err) = status(&root, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no cluster status"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `up` interrupted while it waits for its hosts exits at once with the signal's code; a
/// daemon still waiting for its job ends on SIGTERM with 143.
#[test]
fn signals_end_a_starting_up_and_an_idle_daemon() {
    let key = tmp("key-sig", "0123456789abcdef0123456789abcdef");
    let file = cluster_file("sigup", &[free_port()]);
    let t = Instant::now();
    let up = Command::new(vmm_bin())
        .args([
            "up",
            "--config",
            file.to_str().unwrap_or_default(),
            "--key-file",
            key.to_str().unwrap_or_default(),
        ])
        .env(
            "SSI_VMM_STATE_DIR",
            std::env::temp_dir().join("ssi-ccli-state"),
        )
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    std::thread::sleep(Duration::from_millis(700));
    let st = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    let out = up.wait_with_output().expect("up output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let port = free_port();
    let mut daemon = Command::new(vmm_bin())
        .args([
            "host",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--key-file",
            key.to_str().unwrap_or_default(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    assert!(st.is_ok_and(|s| s.success()));
    let t = Instant::now();
    let code = loop {
        if let Ok(Some(s)) = daemon.try_wait() {
            break s.code();
        }
        if t.elapsed() > Duration::from_secs(5) {
            let _ = daemon.kill();
            let _ = daemon.wait();
            panic!("the daemon ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(143));
}
