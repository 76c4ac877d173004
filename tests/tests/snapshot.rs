//! Whole-VM snapshot and restore of a single-host VM (`ssi-vmm snapshot NAME DIR --stop`,
//! `ssi-vmm restore DIR`), and the command-line errors around them.
//!
//! The guest test boots the lean kernel with a shell loop that counts, writing each count to a
//! file in /tmp and to the start of its virtio disk and reading both back, takes a snapshot
//! mid-loop and stops the VM, restores the snapshot in a new VMM process and checks that the
//! guest carries on from the next count, finishes its command with exit status 0 and powers
//! off; and that the disk image kept the count of the snapshot while the snapshot's disk copy
//! (which the restored guest runs on) ends with the last count. The guest has 2 vCPUs: a copy
//! of the stopped snapshot (incremental on one taken earlier, after which the VM went on) is
//! restored onto 2 hosts (one vCPU each) and must carry on to the last count too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use snapshot::{GpaRange, Manifest, SnapshotBuilder};
use ssi_tests::{initramfs, lean_kernel, run_vmm_with, vmm_bin};

const DEADLINE: Duration = Duration::from_secs(900);

/// Counts the guest loop runs to.
const COUNT: u32 = 10;
/// The count at which the VM is snapshotted and goes on.
const SNAP_GO_ON_AT: u32 = 3;
/// The count at which the VM is snapshotted and stopped.
const SNAP_AT: u32 = 6;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssi-snapshot-{}-{name}", std::process::id()));
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

/// Bytes of data pages in the top layer of the snapshot in `dir`.
fn data_bytes(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["manifest"]["memory_files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["pages_data"].as_u64())
        .sum::<u64>()
        * 4096
}

fn first_line(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The `SSI-COUNT=` values on a console, in order.
fn counts(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SSI-COUNT=")?.parse().ok())
        .collect()
}

#[test]
fn snapshot_stop_and_restore_continues_the_guest() {
    let dir = tmp_dir("guest");
    let state = dir.join("state");
    let snap = dir.join("snap");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk image");
    let disk_arg = disk.to_str().unwrap_or_default().to_string();
    let kernel = lean_kernel();
    let initrd = initramfs();
    // `i=0; while [ $i -lt COUNT ]; do i=$((i+1)); echo $i >/tmp/c; read v </tmp/c;
    //  [ $v = $i ] || exit 3; echo $i >/dev/vda; read d </dev/vda; [ $d = $i ] || exit 4;
    //  dd if=/dev/urandom of=/tmp/r$((i%2)) bs=64k count=4; echo SSI-COUNT=$i; sleep 0.5;
    //  done` (the last close of /dev/vda writes it back; the dd dirties 256 KiB per count).
    let cmd = format!(
        "ssi.cmd=i=0;while+[+$i+-lt+{COUNT}+];do+i=$((i%2B1));echo+$i+>/tmp/c;read+v+</tmp/c;\
         [+$v+=+$i+]||exit+3;echo+$i+>/dev/vda;read+d+</dev/vda;[+$d+=+$i+]||exit+4;\
         dd+if=/dev/urandom+of=/tmp/r$((i%252))+bs=64k+count=4+2>/dev/null;\
         echo+SSI-COUNT=$i;sleep+0.5;done"
    );
    let name = "snap-guest";
    let early = dir.join("snap-early");
    let go_on_at = format!("SSI-COUNT={SNAP_GO_ON_AT}");
    let at = format!("SSI-COUNT={SNAP_AT}");
    let mut took: Option<(i32, String)> = None;
    let mut early_took: Vec<(i32, String)> = Vec::new();
    let first = run_vmm_with(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--memory",
            "256M",
            "--cpus",
            "2",
            "--append",
            &cmd,
            "--disk",
            &disk_arg,
            "--name",
            name,
        ],
        &[("SSI_VMM_STATE_DIR", state.as_path())],
        &[&go_on_at, &at],
        DEADLINE,
        &mut |m, _| {
            if m == go_on_at {
                // A snapshot after which the VM goes on, then one into the same directory,
                // which must fail and leave the VM running.
                for _ in 0..2 {
                    let (code, _, err) = cli(
                        &["snapshot", name, early.to_str().unwrap_or_default()],
                        &state,
                    );
                    early_took.push((code, err));
                }
                return;
            }
            // Incremental on top of the first: only the pages written since.
            let (code, _, err) = cli(
                &[
                    "snapshot",
                    name,
                    snap.to_str().unwrap_or_default(),
                    "--stop",
                    "--incremental",
                    early.to_str().unwrap_or_default(),
                ],
                &state,
            );
            took = Some((code, err));
        },
    );
    eprintln!("snapshots while running: {early_took:?}");
    assert_eq!(early_took.len(), 2, "{early_took:?}");
    assert_eq!(early_took[0].0, 0, "{early_took:?}");
    assert!(early_took[0].1.contains("resumed"), "{early_took:?}");
    assert_ne!(early_took[1].0, 0, "{early_took:?}");
    assert!(early_took[1].1.contains("exists"), "{early_took:?}");
    let (code, err) = took.expect("the guest reached the snapshot point");
    eprintln!("snapshot: exit {code}: {err}");
    assert_eq!(code, 0, "ssi-vmm snapshot failed: {err}");
    first.assert_clean_exit();
    assert!(
        first.stderr.contains("Snapshotted"),
        "the first VM stopped because of the snapshot:\n{}",
        first.stderr
    );
    assert!(
        !first.console.contains("SSI-VMM-CMD-EXIT"),
        "the first VM must not finish the command:\n{}",
        first.console
    );
    let before = counts(&first.console);
    let last = *before.last().expect("counts before the snapshot");
    assert!((SNAP_AT..COUNT).contains(&last), "{before:?}");
    assert_eq!(before, (1..=last).collect::<Vec<_>>());

    let (code, out, err) = cli(
        &["snapshot", "inspect", snap.to_str().unwrap_or_default()],
        &state,
    );
    assert_eq!(code, 0, "inspect failed: {err}");
    eprintln!("--- snapshot inspect ---\n{out}");
    assert!(out.contains("memory-h0"), "{out}");
    // The incremental snapshot holds the pages written between the two snapshots: the
    // guest's own 256 KiB per count (at least one count passed) and some kernel pages,
    // far less than the full one.
    let (full, incr) = (data_bytes(&early), data_bytes(&snap));
    let counted = u64::from(last - SNAP_GO_ON_AT).max(1) * (256 << 10);
    eprintln!(
        "full snapshot {full} bytes of data, incremental {incr} (guest wrote about {counted} \
         in between)"
    );
    assert!(out.contains("parent"), "{out}");
    assert!(incr >= 256 << 10, "{incr}");
    assert!(
        incr <= counted * 8 + (4 << 20) && incr < full / 4,
        "{incr} vs {full}"
    );

    // The chain folded into one full snapshot (disk copy included), restored below too.
    let merged = dir.join("merged");
    let (code, _, err) = cli(
        &[
            "snapshot",
            "merge",
            snap.to_str().unwrap_or_default(),
            merged.to_str().unwrap_or_default(),
        ],
        &state,
    );
    assert_eq!(code, 0, "merge failed: {err}");
    // A copy for the 2-host restore below (restores use their disk copy in place); a sibling,
    // so the relative path to the parent still holds.
    let on2_copy = dir.join("snap-on-2");
    let st = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&snap)
        .arg(&on2_copy)
        .status()
        .expect("cp");
    assert!(st.success(), "copying the snapshot");
    let (code, out, err) = cli(
        &["snapshot", "inspect", early.to_str().unwrap_or_default()],
        &state,
    );
    assert_eq!(code, 0, "inspect of the first snapshot failed: {err}");
    assert!(out.contains("disk-0.img"), "{out}");

    let second = run_vmm_with(
        &[
            "restore",
            snap.to_str().unwrap_or_default(),
            "--name",
            "snap-guest-restored",
        ],
        &[("SSI_VMM_STATE_DIR", state.as_path())],
        &["SSI-VMM-CMD-EXIT"],
        DEADLINE,
        &mut |_, _| {},
    );
    eprintln!(
        "restored guest ran {:?}; stderr:\n{}",
        second.elapsed, second.stderr
    );
    second.assert_clean_exit();
    let after = counts(&second.console);
    assert_eq!(
        after,
        (last + 1..=COUNT).collect::<Vec<_>>(),
        "the restored guest continues from the next count:\n{}",
        second.console
    );
    assert_eq!(
        ssi_tests::line_value(&second.console, "SSI-VMM-CMD-EXIT").as_deref(),
        Some("0"),
        "{}",
        second.console
    );
    assert!(
        second.stderr.contains("PowerOff"),
        "stopped by the guest's poweroff: {}",
        second.stderr
    );
    // The original disk stayed as the first VM left it; the restored guest wrote the copy.
    assert_eq!(first_line(&disk), last.to_string(), "the original disk");
    assert_eq!(
        first_line(&snap.join("disk-0.img")),
        COUNT.to_string(),
        "the snapshot's disk copy, used by the restored guest"
    );

    // The merged snapshot restores the same way (through no chain).
    let merged_run = run_vmm_with(
        &["restore", merged.to_str().unwrap_or_default()],
        &[("SSI_VMM_STATE_DIR", state.as_path())],
        &["SSI-VMM-CMD-EXIT"],
        DEADLINE,
        &mut |_, _| {},
    );
    merged_run.assert_clean_exit();
    assert_eq!(
        counts(&merged_run.console),
        (last + 1..=COUNT).collect::<Vec<_>>(),
        "the merged snapshot's guest:\n{}",
        merged_run.console
    );

    // The `run` snapshot (through its chain) restored onto two hosts (one vCPU each): the
    // guest carries on from the count after the snapshot to the end.
    let third = run_vmm_with(
        &[
            "restore",
            on2_copy.to_str().unwrap_or_default(),
            "--local",
            "2",
            "--name",
            "snap-guest-on-2",
        ],
        &[("SSI_VMM_STATE_DIR", state.as_path())],
        &["SSI-VMM-CMD-EXIT"],
        DEADLINE,
        &mut |_, _| {},
    );
    eprintln!(
        "run snapshot restored onto 2 hosts ran {:?}; stderr:\n{}",
        third.elapsed, third.stderr
    );
    ssi_tests::assert_clean_cluster(&third, &state, "snap-guest-on-2", 2);
    let on2 = counts(&third.console);
    assert_eq!(
        on2,
        (last + 1..=COUNT).collect::<Vec<_>>(),
        "{}",
        third.console
    );
    assert_eq!(
        ssi_tests::line_value(&third.console, "SSI-VMM-CMD-EXIT").as_deref(),
        Some("0"),
        "{}",
        third.console
    );
    assert_eq!(first_line(&on2_copy.join("disk-0.img")), COUNT.to_string());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_of_a_missing_directory_fails() {
    let dir = tmp_dir("missing");
    let missing = dir.join("no-such-snapshot");
    let (code, _, err) = cli(&["restore", missing.to_str().unwrap_or_default()], &dir);
    assert_ne!(code, 0);
    assert!(err.contains("no-such-snapshot"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small snapshot with one data page at 0x1000 of a 1 MiB "guest", and `guest` as its
/// guest configuration.
fn small_snapshot(dir: &Path, guest: serde_json::Value) {
    let b = SnapshotBuilder::create(dir).expect("builder");
    let w = b
        .memory_writer(
            "memory-h0",
            &[GpaRange {
                start: 0,
                len: 1 << 20,
            }],
        )
        .expect("memory writer");
    w.write_pages(0x1000, &[0xab; 4096]).expect("page");
    let mut m = Manifest::new(guest, serde_json::json!({}));
    m.memory_files.push(w.finish().expect("finish"));
    b.commit(&m).expect("commit");
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn restore_of_a_corrupt_snapshot_fails_naming_the_file() {
    let dir = tmp_dir("corrupt");
    let state = dir.join("state");

    // A flipped byte in guest memory: found by the full verification, before anything starts.
    let mem = dir.join("mem-flipped");
    small_snapshot(&mem, serde_json::json!({}));
    flip_byte(&mem.join("memory-h0.mem"), 0x1000 + 17);
    let (code, _, err) = cli(&["restore", mem.to_str().unwrap_or_default()], &state);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("memory-h0.mem"), "{err}");
    assert!(!err.contains("restoring"), "nothing may start: {err}");

    // A corrupted manifest.
    let man = dir.join("manifest-flipped");
    small_snapshot(&man, serde_json::json!({}));
    let text = std::fs::read_to_string(man.join("manifest.json")).expect("manifest");
    let at = text.find("created_unix_ms").expect("field") + 2;
    flip_byte(&man.join("manifest.json"), at);
    let (code, _, err) = cli(&["restore", man.to_str().unwrap_or_default()], &state);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("manifest.json"), "{err}");

    // An intact snapshot that is not a VM's: the guest configuration is refused.
    let alien = dir.join("not-a-vm");
    small_snapshot(&alien, serde_json::json!({"memory": "lots"}));
    let (code, _, err) = cli(&["restore", alien.to_str().unwrap_or_default()], &state);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("manifest.json") && err.contains("guest"),
        "{err}"
    );

    // A partial snapshot directory is never opened.
    let partial = dir.join(format!("snap.tmp-{}", 1));
    std::fs::create_dir_all(&partial).expect("mkdir");
    let (code, _, err) = cli(&["restore", partial.to_str().unwrap_or_default()], &state);
    assert_ne!(code, 0, "{err}");

    // inspect still describes the intact one.
    let (code, out, err) = cli(
        &["snapshot", "inspect", alien.to_str().unwrap_or_default()],
        &state,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memory-h0"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_of_a_vm_that_does_not_exist_fails() {
    let dir = tmp_dir("novm");
    let target = dir.join("snap");
    let (code, _, err) = cli(
        &[
            "snapshot",
            "no-such-vm",
            target.to_str().unwrap_or_default(),
        ],
        &dir.join("state"),
    );
    assert_ne!(code, 0);
    assert!(err.contains("no-such-vm"), "{err}");
    assert!(!target.exists(), "no snapshot directory may be left");
    let _ = std::fs::remove_dir_all(&dir);
}
