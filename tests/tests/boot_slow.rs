//! Slow guest tests (run by `scripts/test.sh --slow`, `#[ignore]`d otherwise: guest kernel code
//! is emulated on this project's machines, so these take many minutes each).
//!
//! - Debian's **stock** kernel (unmodified distro kernel) with an initramfs holding its virtio
//!   modules boots to userspace and powers off.
//! - The Debian bookworm image boots with systemd to multi-user over virtio-blk, runs a command,
//!   powers off, and the file the command wrote is in the image afterwards.
//! - The same image across 2 host processes (`up --local 2`) passes `stress-ng --verify`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ssi_tests::{artifact, assert_clean_cluster, lean_kernel, line_value, run_vmm};

#[test]
#[ignore = "slow: stock Debian kernel boot under instruction emulation (scripts/test.sh --slow)"]
fn stock_debian_kernel_boots_to_userspace() {
    let p = artifact("images/build-stock-kernel.sh");
    assert_eq!(
        p.len(),
        2,
        "stock kernel script prints vmlinux and initramfs"
    );
    let run = run_vmm(
        &[
            "run",
            "--kernel",
            p[0].to_str().unwrap_or_default(),
            "--initrd",
            p[1].to_str().unwrap_or_default(),
            "--memory",
            "1G",
            "--append",
            "ssi.test=boot",
        ],
        &["SSI-VMM-USERSPACE-UP", "SSI-VMM-BOOT-OK"],
        Duration::from_secs(4200),
    );
    run.assert_clean_exit();
    let up = run.mark("SSI-VMM-USERSPACE-UP").expect("userspace");
    eprintln!(
        "stock kernel: userspace after {up:?}, total {:?}",
        run.elapsed
    );
    assert!(run.console.contains("SSI-VMM-BOOT-OK"), "{}", run.console);
    assert_eq!(
        line_value(&run.console, "SSI-VMM-TEST-EXIT").as_deref(),
        Some("0"),
        "{}",
        run.console
    );
    // Every module of the initramfs's list (virtio, virtio-blk, ext4 and their dependencies)
    // loaded into the unmodified kernel.
    let loaded = line_value(&run.console, "SSI-VMM-MODULES-LOADED").unwrap_or_default();
    let (ok, total) = loaded.split_once('/').unwrap_or(("", ""));
    assert!(
        !ok.is_empty() && ok == total && total.parse::<u32>().is_ok_and(|n| n > 0),
        "modules loaded: {loaded:?}\n{}",
        run.console
    );
    assert!(!run.console.contains("segfault"), "{}", run.console);
}

fn sparse_copy(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "copy of the Debian image failed");
}

#[test]
#[ignore = "slow: Debian image with systemd under instruction emulation (scripts/test.sh --slow)"]
fn debian_image_reaches_multi_user_and_keeps_written_file() {
    let image = artifact("images/build-debian.sh")
        .pop()
        .expect("debian image");
    let disk = std::env::temp_dir().join(format!("ssi-debian-{}.img", std::process::id()));
    sparse_copy(&image, &disk);
    let token = format!("written-by-guest-{}", std::process::id());
    let append = format!(
        "root=/dev/vda rw ssi.cmd=uname+-a;echo+{token}>/root/ssi-vmm-written;systemctl+is-system-running"
    );
    let run = run_vmm(
        &[
            "run",
            "--kernel",
            lean_kernel().to_str().unwrap_or_default(),
            "--memory",
            "1G",
            "--disk",
            disk.to_str().unwrap_or_default(),
            "--append",
            &append,
        ],
        &["SSI-VMM-MULTI-USER", "SSI-VMM-CMD-EXIT"],
        Duration::from_secs(3000),
    );
    run.assert_clean_exit();
    let mu = run.mark("SSI-VMM-MULTI-USER").expect("multi-user reached");
    eprintln!(
        "debian image: multi-user after {mu:?}, total {:?}",
        run.elapsed
    );
    assert!(run.value("SSI-VMM-CMD-EXIT").is_some(), "{}", run.console);
    let out = Command::new("debugfs")
        .args(["-R", "cat /root/ssi-vmm-written"])
        .arg(&disk)
        .output()
        .expect("debugfs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
    let _ = std::fs::remove_file(disk);
}

/// Issue 3: the Debian image across 2 host processes (one vCPU each) through the forwarded
/// virtio-blk (the disk lives on host 0; host 1's vCPU reaches it through MMIO forwarding and
/// the DSM), and `stress-ng --verify` (memory, fork, pipe and futex stressors) passes inside.
#[test]
#[ignore = "slow: Debian image with systemd on 2 hosts under instruction emulation (scripts/test.sh --slow)"]
fn debian_image_on_two_hosts_passes_stress_ng_verify() {
    let image = artifact("images/build-debian.sh")
        .pop()
        .expect("debian image");
    let disk = std::env::temp_dir().join(format!("ssi-debian2-{}.img", std::process::id()));
    sparse_copy(&image, &disk);
    let state = std::env::temp_dir().join(format!("ssi-debian2-state-{}", std::process::id()));
    std::env::set_var("SSI_VMM_STATE_DIR", &state);
    // One stress-ng run per stressor, 2 instances each (one per CPU), so every stressor gets
    // its 30 s: started together, the later ones are still being spawned when a short timeout
    // ends (spawning a stress-ng instance takes seconds under emulation), and report nothing.
    // `set -e`: the first failing run ends the command with its status. The vm stressor keeps
    // its mapping (`--vm-keep`) and uses the `flip` method: the default (`all` methods, a fresh
    // mmap and random madvise every pass) does not finish one verified pass in 30 s under
    // emulation, even on one host with 2 vCPUs, so it would report 0 bogo ops. 1 MiB per
    // instance: with 4 MiB one 2-host run made 18 bogo ops and the next 0 (verify passed in both).
    // First the CPU count and the failed systemd units (both printed on lines of their own).
    let append = "root=/dev/vda rw ssi.cmd=echo+SSI-VMM-NPROC=$(nproc);\
                  systemctl+--failed+--no-legend+--plain;\
                  echo+SSI-VMM-FAILED-UNITS=$(systemctl+--failed+--no-legend+--plain|wc+-l);set+-e;\
                  stress-ng+--verify+--timeout+30s+--metrics+--vm+2+--vm-bytes+1M+--vm-keep+--vm-method+flip;\
                  stress-ng+--verify+--timeout+30s+--metrics+--fork+2;\
                  stress-ng+--verify+--timeout+30s+--metrics+--pipe+2;\
                  stress-ng+--verify+--timeout+30s+--metrics+--futex+2";
    let run = run_vmm(
        &[
            "up",
            "--local",
            "2",
            "--name",
            "debian2",
            "--kernel",
            lean_kernel().to_str().unwrap_or_default(),
            "--memory",
            "1G",
            "--disk",
            disk.to_str().unwrap_or_default(),
            "--append",
            append,
        ],
        &["SSI-VMM-MULTI-USER", "SSI-VMM-CMD-EXIT"],
        Duration::from_secs(5400),
    );
    let _ = std::fs::remove_file(&disk);
    assert_clean_cluster(&run, &state, "debian2", 2);
    let mu = run.mark("SSI-VMM-MULTI-USER").expect("multi-user reached");
    assert_eq!(
        line_value(&run.console, "SSI-VMM-NPROC").as_deref(),
        Some("2"),
        "{}",
        run.console
    );
    assert_eq!(
        line_value(&run.console, "SSI-VMM-FAILED-UNITS").as_deref(),
        Some("0"),
        "failed systemd units:\n{}",
        run.console
    );
    eprintln!(
        "debian image on 2 hosts: multi-user after {mu:?}, total {:?}",
        run.elapsed
    );
    assert_eq!(
        run.value("SSI-VMM-CMD-EXIT").as_deref(),
        Some("0"),
        "{}",
        run.console
    );
    assert_eq!(
        run.console.matches("successful run completed").count(),
        STRESSORS.len(),
        "{}",
        run.console
    );
    for name in STRESSORS {
        let ops = bogo_ops(&run.console, name);
        assert!(
            ops.is_some_and(|n| n > 0),
            "stressor {name}: bogo ops {ops:?}\n{}",
            run.console
        );
        eprintln!("stress-ng {name}: {} bogo ops in 30 s", ops.unwrap_or(0));
    }
    assert!(!run.console.contains("segfault"), "{}", run.console);
}

/// The stressors the 2-host Debian test runs, each must report work done.
const STRESSORS: [&str; 4] = ["vm", "fork", "pipe", "futex"];

/// Bogo ops of stressor `name` from stress-ng's `--metrics` table
/// (`stress-ng: metrc: [pid] vm   123   30.01 ...`).
fn bogo_ops(console: &str, name: &str) -> Option<u64> {
    console.lines().find_map(|l| {
        let rest = l.split("stress-ng: metrc: [").nth(1)?;
        let mut f = rest.split_whitespace().skip(1);
        (f.next()? == name).then(|| f.next()?.parse().ok())?
    })
}

#[test]
fn bogo_ops_are_read_from_the_metrics_table() {
    let c = "stress-ng: metrc: [72] stressor       bogo ops real time\n\
             stress-ng: metrc: [72] vm                    0     24.96\n\
             stress-ng: metrc: [72] fork                  6     20.58\n";
    assert_eq!(bogo_ops(c, "vm"), Some(0));
    assert_eq!(bogo_ops(c, "fork"), Some(6));
    assert_eq!(bogo_ops(c, "pipe"), None);
}
