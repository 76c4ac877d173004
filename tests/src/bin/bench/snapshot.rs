//! `bench snapshot`: snapshot and restore of a `run` VM with 512 MiB and 1 GiB of RAM.
//!
//! For each size the lean kernel boots with 2 vCPUs; the guest dirties about 60 % of its RAM
//! (`ssi-check --mem`, which leaves its pattern in the freed pages), then prints a tick a
//! second. At the second tick `ssi-vmm snapshot NAME DIR` takes a full snapshot (the VM goes
//! on); its wall time is the guest's pause (a `run` VM is paused from the pause to the
//! commit). The data written (the manifest's data pages) over that time is the snapshot's
//! write rate, shown next to `dd`'s sequential write rate (`conv=fsync`) of as many bytes into
//! the same directory. After the third tick the guest dirties another eighth of its RAM
//! (`ssi-check --mem`); at the fifth, `snapshot NAME DIR2 --incremental DIR --stop` takes an
//! incremental one (size and time next to the full one's). Then copies of the full snapshot
//! are restored eagerly (`restore DIR`: verify every page, load, start) and lazily
//! (`restore DIR --lazy`: a 1-host cluster whose vCPUs start before RAM is loaded), each
//! measured from the command's start to the VMM's "guest running" log line (the first guest
//! instruction) and to the next console line (the next tick).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ssi_tests::{initramfs, lean_kernel, run_vmm_with, vmm_bin};

/// Milliseconds since the UTC midnight of a `[2026-12-02T14:11:02.155Z ...` log line.
fn log_ms_of_day(line: &str) -> Option<u64> {
    let t = line.split('T').nth(1)?;
    let hms = t.get(..12)?;
    let h: u64 = hms.get(0..2)?.parse().ok()?;
    let m: u64 = hms.get(3..5)?.parse().ok()?;
    let s: u64 = hms.get(6..8)?.parse().ok()?;
    let ms: u64 = hms.get(9..12)?.parse().ok()?;
    Some(((h * 60 + m) * 60 + s) * 1000 + ms)
}

fn now_ms_of_day() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() % 86_400_000) as u64
}

/// Bytes of data pages a snapshot's manifest records.
fn data_bytes(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let files = v["manifest"]["memory_files"].as_array()?;
    Some(
        files
            .iter()
            .filter_map(|f| f["pages_data"].as_u64())
            .sum::<u64>()
            * 4096,
    )
}

/// `dd`'s rate in MB/s writing `mib` MiB into `dir` with an fsync at the end.
fn dd_rate(dir: &Path, mib: u64) -> Option<f64> {
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", dir.join("dd.bin").display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fsync"])
        .output()
        .ok()?;
    let _ = std::fs::remove_file(dir.join("dd.bin"));
    let err = String::from_utf8_lossy(&out.stderr);
    // "... copied, 0.49 s, 547 MB/s"
    let line = err.lines().find(|l| l.contains("copied"))?;
    let secs: f64 = line
        .split(", ")
        .nth(1)?
        .trim_end_matches(" s")
        .parse()
        .ok()?;
    Some(mib as f64 * 1048576.0 / secs / 1e6)
}

struct Restored {
    /// Command start to the "guest running" log line.
    running_ms: Option<u64>,
    /// Command start to the next console line.
    next_line: Option<Duration>,
    ok: bool,
}

fn restore(dir: &Path, state: &Path, name: &str, lazy: bool) -> Restored {
    let info = Path::new("info");
    let mut args = vec!["restore", dir.to_str().unwrap_or_default(), "--name", name];
    if lazy {
        args.push("--lazy");
    }
    let t0 = now_ms_of_day();
    let run = run_vmm_with(
        &args,
        &[("SSI_VMM_STATE_DIR", state), ("RUST_LOG", info)],
        &["SSI-TICK="],
        Duration::from_secs(600),
        &mut |_, _| {},
    );
    let running_ms = run
        .stderr
        .lines()
        .find(|l| l.contains("restore: guest running"))
        .and_then(log_ms_of_day)
        .map(|t| t.saturating_sub(t0));
    let ok = run.status.is_some_and(|s| s.success())
        && ssi_tests::line_value(&run.console, "SSI-VMM-CMD-EXIT").as_deref() == Some("0");
    if !ok {
        eprintln!("restore {} failed:\n{}", dir.display(), run.stderr);
    }
    Restored {
        running_ms,
        next_line: run.mark("SSI-TICK="),
        ok,
    }
}

/// Runs the benchmark; returns the number of failed runs.
pub fn run(sizes: &[u64]) -> usize {
    let kernel = lean_kernel();
    let initrd = initramfs();
    let base = std::env::temp_dir().join(format!("ssi-bench-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut failed = 0;
    println!(
        "| guest RAM | full: data, time (pause) | write rate | dd rate | ratio | \
         incremental: guest dirtied, data, time | eager restore: running / next line | \
         lazy restore: running / next line |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &mib in sizes {
        let dir = base.join(format!("{mib}"));
        let state = dir.join("state");
        let _ = std::fs::create_dir_all(&state);
        let snap = dir.join("snap");
        let incr = dir.join("incr");
        let fill = mib * 6 / 10;
        let dirty = mib / 8;
        let cmd = format!(
            "ssi.cmd=ssi-check+--mem+{fill}+--seconds+1+--threads+1+>/dev/null;i=0;\
             while+[+$i+-lt+8+];do+i=$((i%2B1));echo+SSI-TICK=$i;\
             [+$i+=+3+]&&ssi-check+--mem+{dirty}+--seconds+1+--threads+1+>/dev/null;\
             sleep+1;done"
        );
        let name = format!("bench-snap-{mib}");
        // (ok, wall time) of the full and the incremental snapshot.
        let mut full: Option<(bool, Duration)> = None;
        let mut inc: Option<(bool, Duration)> = None;
        let mem = format!("{mib}M");
        let snapshot = |extra: &[&str]| {
            let t = Instant::now();
            let ok = Command::new(vmm_bin())
                .arg("snapshot")
                .arg(&name)
                .args(extra)
                .env("SSI_VMM_STATE_DIR", &state)
                .status()
                .is_ok_and(|s| s.success());
            (ok, t.elapsed())
        };
        let first = run_vmm_with(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap_or_default(),
                "--initrd",
                initrd.to_str().unwrap_or_default(),
                "--memory",
                &mem,
                "--cpus",
                "2",
                "--append",
                &cmd,
                "--name",
                &name,
            ],
            &[("SSI_VMM_STATE_DIR", state.as_path())],
            &["SSI-TICK=2", "SSI-TICK=5"],
            Duration::from_secs(1800),
            &mut |mark, _| {
                if mark == "SSI-TICK=2" {
                    full = Some(snapshot(&[snap.to_str().unwrap_or_default()]));
                } else {
                    inc = Some(snapshot(&[
                        incr.to_str().unwrap_or_default(),
                        "--incremental",
                        snap.to_str().unwrap_or_default(),
                        "--stop",
                    ]));
                }
            },
        );
        let Some((true, pause)) = full else {
            eprintln!("{mib} MiB: no snapshot:\n{}", first.stderr);
            failed += 1;
            continue;
        };
        let inc_cell = match inc {
            Some((true, t)) => format!(
                "{dirty} MiB, {:.0} MiB, {:.2} s",
                data_bytes(&incr).unwrap_or(0) as f64 / 1048576.0,
                t.as_secs_f64()
            ),
            _ => {
                eprintln!("{mib} MiB: no incremental snapshot:\n{}", first.stderr);
                failed += 1;
                "failed".into()
            }
        };
        let bytes = data_bytes(&snap).unwrap_or(0);
        let rate = bytes as f64 / pause.as_secs_f64() / 1e6;
        let dd = dd_rate(&dir, (bytes >> 20).max(64));
        let mut cells = Vec::new();
        for lazy in [false, true] {
            let copy = dir.join(if lazy { "lazy" } else { "eager" });
            let _ = Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&snap)
                .arg(&copy)
                .status();
            let r = restore(&copy, &state, &format!("{name}-{}", lazy as u8), lazy);
            if !r.ok {
                failed += 1;
            }
            cells.push(format!(
                "{} / {}",
                r.running_ms.map_or("?".into(), |m| format!("{m} ms")),
                r.next_line
                    .map_or("?".into(), |d| format!("{:.2} s", d.as_secs_f64()))
            ));
        }
        println!(
            "| {mib} MiB | {:.0} MiB, {:.2} s | {rate:.0} MB/s | {} | {} | {inc_cell} | {} | {} |",
            bytes as f64 / 1048576.0,
            pause.as_secs_f64(),
            dd.map_or("?".into(), |d| format!("{d:.0} MB/s")),
            dd.map_or("?".into(), |d| format!("{:.0} %", 100.0 * rate / d)),
            cells[0],
            cells[1]
        );
    }
    let _ = std::fs::remove_dir_all(&base);
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_parse() {
        assert_eq!(
            log_ms_of_day("[2026-12-02T14:11:02.155Z INFO  vmm::vm] restore: guest running"),
            Some(((14 * 60 + 11) * 60 + 2) * 1000 + 155)
        );
        assert_eq!(log_ms_of_day("no time here"), None);
    }
}
