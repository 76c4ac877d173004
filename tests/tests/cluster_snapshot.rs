//! Snapshot of a VM spread over two hosts, restored onto one, two and three hosts.
//!
//! One 2-host boot (3 vCPUs: two on host 0, one on host 1) of the lean kernel runs a shell
//! loop that keeps state in guest memory and on its disk and checks it as it goes: a 512 KiB
//! random file in /tmp (tmpfs: guest RAM) whose checksum is verified at every step, the count
//! in a /tmp file and at the start of the virtio disk, and the guest's uptime. At count
//! [`SNAP_AT`] `ssi-vmm snapshot NAME DIR --stop` snapshots the cluster (every host writes the
//! pages it holds) and stops it. The snapshot (copied, since a restore runs on its disk copy)
//! is then restored with `ssi-vmm restore --local N` for N = 1 (one process, as `run`), 2 and
//! 3, and lazily (`--lazy`: the vCPUs start before guest RAM is loaded) onto 1 and 3. Each time
//! the guest must carry on from the next count to the last with every check passing, exit 0
//! and power off cleanly, its uptime must go on without a jump (no more than the guest ran
//! between its last count and the pause plus the seconds the restore took), and its disk copy
//! must end with the last count. The 3-host restore also takes checkpoints every 2 s
//! (incremental after the first) and loses host 2 to kill -9 once two are complete, with a
//! newer checkpoint that was cut short (a truncated memory file) and a partial one planted
//! next to them: it must come back by itself from the newest complete checkpoint on the 2
//! remaining hosts, never from the broken ones, and finish the same way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ssi_tests::{assert_clean_cluster, initramfs, lean_kernel, run_vmm_with, vmm_bin};

const DEADLINE: Duration = Duration::from_secs(1200);

/// Counts the guest loop runs to.
const COUNT: u32 = 8;
/// The count at which the cluster is snapshotted and stopped.
const SNAP_AT: u32 = 3;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssi-csnap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Runs ssi-vmm and returns (exit code, stdout, stderr); never a panic of ssi-vmm.
fn cli(args: &[&str], state: &Path) -> (i32, String, String) {
    let out = Command::new(vmm_bin())
        .args(args)
        .env("SSI_VMM_STATE_DIR", state)
        .output()
        .expect("run ssi-vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "ssi-vmm panicked: {err}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

/// The `SSI-COUNT=<n> <uptime>` lines of a console: (count, uptime in seconds).
fn counts(console: &str) -> Vec<(u32, f64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("SSI-COUNT=")?;
            let mut it = rest.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
}

fn first_line(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Slow (about 25 minutes here: a 2-host boot and four restores): in the slow set
/// (`scripts/test.sh --slow`). The fast set snapshots a running 2-host VM in `cluster_boot.rs`
/// and restores `run` snapshots onto 2 hosts in `snapshot.rs`.
#[test]
#[ignore = "slow set: scripts/test.sh --slow"]
fn a_two_host_snapshot_restores_onto_one_two_and_three_hosts() {
    let dir = tmp_dir("guest");
    let state = dir.join("state");
    let snap = dir.join("snap");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk image");
    let kernel = lean_kernel();
    let initrd = initramfs();
    // dd if=/dev/urandom of=/tmp/m bs=64k count=8; md5sum /tmp/m >/tmp/m.sum; i=0;
    // while [ $i -lt COUNT ]; do i=$((i+1)); md5sum -c -s /tmp/m.sum || exit 5;
    //  echo $i >/tmp/c; read v </tmp/c; [ $v = $i ] || exit 3; echo $i >/dev/vda;
    //  read d </dev/vda; [ $d = $i ] || exit 4; read u r </proc/uptime;
    //  echo SSI-COUNT=$i $u; sleep 0.5; done
    let cmd = format!(
        "ssi.cmd=dd+if=/dev/urandom+of=/tmp/m+bs=64k+count=8+2>/dev/null;\
         md5sum+/tmp/m+>/tmp/m.sum;i=0;while+[+$i+-lt+{COUNT}+];do+i=$((i%2B1));\
         md5sum+-c+-s+/tmp/m.sum||exit+5;echo+$i+>/tmp/c;read+v+</tmp/c;[+$v+=+$i+]||exit+3;\
         echo+$i+>/dev/vda;read+d+</dev/vda;[+$d+=+$i+]||exit+4;read+u+r+</proc/uptime;\
         echo+SSI-COUNT=$i+$u;sleep+0.5;done"
    );
    let name = "csnap";
    let at = format!("SSI-COUNT={SNAP_AT} ");
    let mut took: Option<(i32, String)> = None;
    let first = run_vmm_with(
        &[
            "up",
            "--local",
            "2",
            "--cpus",
            "3",
            "--name",
            name,
            "--kernel",
            kernel.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--memory",
            "256M",
            "--append",
            &cmd,
            "--disk",
            disk.to_str().unwrap_or_default(),
        ],
        &[("SSI_VMM_STATE_DIR", state.as_path())],
        &[&at],
        DEADLINE,
        &mut |_, _| {
            took = Some({
                let (code, _, err) = cli(
                    &[
                        "snapshot",
                        name,
                        snap.to_str().unwrap_or_default(),
                        "--stop",
                    ],
                    &state,
                );
                (code, err)
            });
        },
    );
    let (code, err) = took.expect("the guest reached the snapshot point");
    eprintln!("snapshot: exit {code}: {err}");
    assert_eq!(code, 0, "ssi-vmm snapshot failed: {err}");
    assert!(err.contains("2 hosts"), "{err}");
    first.assert_clean_exit();
    for h in 0..2 {
        let want = format!("host {h}: exit 0: Snapshotted");
        assert!(
            first.stderr.contains(&want),
            "host {h} stopped because of the snapshot:\n{}",
            first.stderr
        );
    }
    assert!(
        !first.console.contains("SSI-VMM-CMD-EXIT"),
        "the first VM must not finish the command:\n{}",
        first.console
    );
    let before = counts(&first.console);
    let (last, last_up) = *before.last().expect("counts before the snapshot");
    assert!((SNAP_AT..COUNT).contains(&last), "{before:?}");
    let numbers: Vec<u32> = before.iter().map(|c| c.0).collect();
    assert_eq!(numbers, (1..=last).collect::<Vec<_>>());
    let gap = before
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .fold(0.0f64, f64::max);

    let (code, out, err) = cli(
        &["snapshot", "inspect", snap.to_str().unwrap_or_default()],
        &state,
    );
    assert_eq!(code, 0, "inspect failed: {err}");
    eprintln!("--- snapshot inspect ---\n{out}");
    for f in ["memory-h0", "memory-h1", "state-h1-vcpus", "disk-0.img"] {
        assert!(out.contains(f), "{f} in:\n{out}");
    }

    // Eager (every page loaded before the vCPUs start) and lazy (pages from the snapshot on
    // first touch, the rest streamed in behind) restores must give the same guest results.
    for (hosts, lazy) in [(1usize, false), (1, true), (2, false), (3, true)] {
        let how = if lazy { "lazy" } else { "eager" };
        let copy = dir.join(format!("snap-{hosts}-{how}"));
        let st = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&snap)
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(st.success(), "copying the snapshot");
        let rname = format!("csnap-r{hosts}-{how}");
        let n = hosts.to_string();
        let mut args = vec![
            "restore",
            copy.to_str().unwrap_or_default(),
            "--local",
            &n,
            "--name",
            &rname,
        ];
        if lazy {
            args.push("--lazy");
        }
        // The 3-host restore takes checkpoints, and loses host 2 (kill -9) once one is
        // complete: the VM must come back by itself on the 2 remaining hosts.
        let ckpt = dir.join("checkpoints");
        let ckpt_arg = ckpt.to_str().unwrap_or_default().to_string();
        let chaos = hosts == 3;
        if chaos {
            args.extend(["--checkpoint-every", "2s", "--checkpoint-dir", &ckpt_arg]);
        }
        let kill_at = format!("SSI-COUNT={} ", last + 1);
        let pids_file = state.join(&rname).join("pids");
        let mut killed = None;
        let mut planted = false;
        let second = run_vmm_with(
            &args,
            &[("SSI_VMM_STATE_DIR", state.as_path())],
            &["SSI-VMM-CMD-EXIT", &kill_at],
            DEADLINE,
            &mut |m, _| {
                if !chaos || m != kill_at {
                    return;
                }
                let t = std::time::Instant::now();
                let complete = || -> Vec<PathBuf> {
                    std::fs::read_dir(&ckpt)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            n.starts_with("ckpt-") && !n.contains(".tmp-")
                        })
                        .map(|e| e.path())
                        .collect()
                };
                // Two complete checkpoints: the second is incremental on the first.
                while complete().len() < 2 && t.elapsed() < Duration::from_secs(120) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                // A newer checkpoint cut short (a copy of the one with the most data, its
                // memory file truncated) and a partial one: neither may be used.
                let size = |p: &Path| std::fs::metadata(p.join("memory-h0")).map_or(0, |m| m.len());
                if let Some(good) = complete().into_iter().max_by_key(|p| size(p)) {
                    let broken = ckpt.join("ckpt-998");
                    let _ = Command::new("cp")
                        .arg("-a")
                        .arg(&good)
                        .arg(&broken)
                        .status();
                    if let Ok(f) = std::fs::OpenOptions::new()
                        .write(true)
                        .open(broken.join("memory-h0"))
                    {
                        let half = size(&broken) / 2;
                        planted = f.set_len(half).is_ok() && half > 0;
                    }
                    let _ = std::fs::create_dir_all(ckpt.join("ckpt-999.tmp-1"));
                }
                let pid = std::fs::read_to_string(&pids_file)
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("2 ").map(|p| p.trim().to_string()));
                if let Some(pid) = pid {
                    let ok = Command::new("kill")
                        .args(["-9", &pid])
                        .status()
                        .is_ok_and(|s| s.success());
                    killed = Some((ok, complete().len() >= 3));
                }
            },
        );
        eprintln!(
            "restored onto {hosts} host(s), {how}: ran {:?}; stderr:\n{}",
            second.elapsed, second.stderr
        );
        // One eager host runs in the restoring process (as `run`); the others are clusters.
        if chaos {
            assert_eq!(
                killed,
                Some((true, true)),
                "host 2 killed after two checkpoints"
            );
            second.assert_clean_exit();
            let restart = second
                .stderr
                .find(&format!("restarting {rname} from checkpoint"))
                .unwrap_or_else(|| panic!("no restart:\n{}", second.stderr));
            assert!(planted, "a truncated checkpoint was planted");
            assert!(
                second.stderr.contains("incremental on ckpt-"),
                "an incremental checkpoint:\n{}",
                second.stderr
            );
            assert!(
                second.stderr.contains("ckpt-998 is unusable"),
                "the checkpoint cut short is refused:\n{}",
                second.stderr
            );
            assert!(
                !second.stderr[restart..]
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .contains("ckpt-99"),
                "restarted from a broken checkpoint:\n{}",
                second.stderr
            );
            let tail = &second.stderr[restart..];
            for h in 0..2 {
                assert!(
                    tail.contains(&format!("host {h}: exit 0: PowerOff")),
                    "host {h} of the restarted VM:\n{}",
                    second.stderr
                );
            }
        } else if hosts == 1 && !lazy {
            second.assert_clean_exit();
        } else {
            assert_clean_cluster(&second, &state, &rname, hosts);
        }
        let mut after = counts(&second.console);
        if chaos {
            // The restart goes back to the checkpoint: counts after it may repeat. Keep the
            // run that reaches the end.
            if let Some(back) = after.windows(2).rposition(|w| w[1].0 <= w[0].0) {
                let restarted_at = after[back + 1].0;
                assert!(restarted_at > last, "{after:?}");
                let before_restart: Vec<(u32, f64)> = after[..=back].to_vec();
                after = before_restart
                    .into_iter()
                    .filter(|c| c.0 < restarted_at)
                    .chain(after[back + 1..].iter().copied())
                    .collect();
            }
        }
        let numbers: Vec<u32> = after.iter().map(|c| c.0).collect();
        assert_eq!(
            numbers,
            (last + 1..=COUNT).collect::<Vec<_>>(),
            "restored onto {hosts} host(s), {how}, the guest continues from the next count:\n{}",
            second.console
        );
        assert_eq!(
            ssi_tests::line_value(&second.console, "SSI-VMM-CMD-EXIT").as_deref(),
            Some("0"),
            "every memory, file and disk check passed:\n{}",
            second.console
        );
        // Guest time goes on from the snapshot: no jump back, and forward no more than the
        // guest ran between its last count and the pause (at most the longest gap between
        // two counts before) plus the time the restore took (its whole run bounds it).
        let up = after[0].1;
        let bound = second.elapsed.as_secs_f64() + gap + 5.0;
        assert!(
            up >= last_up && up - last_up <= bound,
            "uptime {last_up} at the snapshot, {up} after restoring onto {hosts} host(s), {how}"
        );
        assert!(
            after.windows(2).all(|w| w[1].1 >= w[0].1),
            "uptime goes forward: {after:?}"
        );
        // The guest ends on the disk it was restored on: the snapshot copy's, or after the
        // restart the checkpoint's.
        let used = if chaos {
            let line = second
                .stderr
                .lines()
                .find(|l| l.contains("from checkpoint "))
                .unwrap_or_default();
            let p = line
                .split("from checkpoint ")
                .nth(1)
                .and_then(|t| t.split(" on the ").next())
                .unwrap_or_default();
            PathBuf::from(p)
        } else {
            copy.clone()
        };
        assert_eq!(
            first_line(&used.join("disk-0.img")),
            COUNT.to_string(),
            "the restored guest's disk ({})",
            used.display()
        );
    }
    assert_eq!(first_line(&disk), last.to_string(), "the original disk");
    let _ = std::fs::remove_dir_all(&dir);
}
