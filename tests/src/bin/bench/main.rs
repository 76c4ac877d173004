//! `bench`: boot benchmarks of ssi-vmm, printed as Markdown for `docs/BENCHMARKS.md`.
//!
//! ```text
//! cargo run --release -p ssi-tests --bin bench -- boot [--stock | --only-stock | --smoke] [--runs N]
//! (SSI_CONSOLE_LOG=FILE tees the guest consoles to FILE)
//! ```
//! For each configuration (lean kernel + busybox initramfs with 1 and 2 vCPUs; with `--stock`
//! also Debian's stock kernel + its initramfs) it boots the guest with `ssi.test=nproc`, takes
//! the host time at which `SSI-VMM-USERSPACE-UP` appears on the console, and reads the VMM's
//! `--stats-json` (exits by reason, emulation fix-ups by instruction). `--smoke`: the lean
//! kernel with 1 vCPU once (CI runs it so the benchmark keeps working). Any failed run makes
//! the exit status 1.
//!
//! ```text
//! cargo run --release -p ssi-tests --bin bench -- cluster [--runs N] [--only-par | --only-boot]
//! ```
//! Boots the lean kernel with `ssi-vmm up --local H` (one vCPU per host) for H = 1, 2, 3 and
//! reports the host time to `SSI-VMM-USERSPACE-UP`; then runs the CPU-parallel workload
//! (`ssi.test=par`: the same user-mode loop on one CPU, then on all) on 2 hosts x 1 vCPU and on
//! 1 host x 2 vCPUs, and reports the guest-measured times and the speedup.
//!
//! ```text
//! cargo run --release -p ssi-tests --bin bench -- snapshot [--sizes 512,1024]
//! ```
//! Snapshot write rate next to `dd`'s, the guest's pause, and restore times (eager and lazy)
//! of a `run` VM (see the `snapshot` module).

mod snapshot;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ssi_tests::{artifact, initramfs, lean_kernel, run_vmm};

struct Config {
    name: String,
    kernel: PathBuf,
    initrd: PathBuf,
    cpus: u32,
}

/// What a boot benchmark reads from the VMM's `--stats-json` report.
#[derive(Debug, Default, PartialEq)]
struct BootStats {
    wall: f64,
    exits: BTreeMap<String, f64>,
    fixups: BTreeMap<String, f64>,
}

impl BootStats {
    /// Parses the report (`vmm::vm::RunReport` as JSON); a missing or malformed report is an
    /// error, so a broken run never shows up as a row of zeros.
    fn parse(json: &str) -> Result<BootStats, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("stats JSON: {e}"))?;
        let map = |name: &str| -> Result<BTreeMap<String, f64>, String> {
            v.get(name)
                .and_then(|m| m.as_object())
                .ok_or_else(|| format!("stats JSON has no object {name:?}"))?
                .iter()
                .map(|(k, x)| {
                    x.as_f64()
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| format!("{name}.{k} is not a number"))
                })
                .collect()
        };
        Ok(BootStats {
            wall: v
                .get("wall_seconds")
                .and_then(|w| w.as_f64())
                .ok_or("stats JSON has no wall_seconds")?,
            exits: map("exits")?,
            fixups: map("fixups")?,
        })
    }

    /// Exits per second of wall time.
    fn exit_rate(&self) -> f64 {
        self.exits.values().sum::<f64>() / self.wall.max(1e-9)
    }

    /// The `n` most frequent exit reasons, as `reason N/s`.
    fn top_exits(&self, n: usize) -> Vec<String> {
        let mut top: Vec<_> = self.exits.iter().filter(|(_, v)| **v > 0.0).collect();
        top.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        top.iter()
            .take(n)
            .map(|(k, v)| format!("{k} {:.0}/s", **v / self.wall.max(1e-9)))
            .collect()
    }
}

/// The parallel workload's result line values (`ssi.test=par`): one CPU ms, all CPUs ms, speedup.
fn par_result(run: &ssi_tests::Run) -> Option<(u64, u64, f64)> {
    let num = |k: &str| run.value(k)?.parse::<u64>().ok();
    Some((
        num("SSI-VMM-PAR-SINGLE-MS")?,
        num("SSI-VMM-PAR-ALL-MS")?,
        num("SSI-VMM-PAR-SPEEDUP-X100")? as f64 / 100.0,
    ))
}

fn up(hosts: u32, cpus_per_host: u32, append: &str, markers: &[&str]) -> ssi_tests::Run {
    let (k, i) = (lean_kernel(), initramfs());
    let (h, c) = (hosts.to_string(), cpus_per_host.to_string());
    let dir = std::env::temp_dir().join(format!("ssi-bench-state-{}", std::process::id()));
    std::env::set_var("SSI_VMM_STATE_DIR", &dir);
    run_vmm(
        &[
            "up",
            "--local",
            &h,
            "--cpus-per-host",
            &c,
            "--name",
            "bench",
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--initrd",
            i.to_str().unwrap_or_default(),
            "--memory",
            "512M",
            "--append",
            append,
        ],
        markers,
        Duration::from_secs(3600),
    )
}

/// Runs the cluster benchmarks; returns the number of failed runs.
fn cluster(runs: usize, only_par: bool, only_boot: bool) -> usize {
    let mut failed = 0;
    println!("| hosts x vCPUs | run | userspace (s) | poweroff (s) | result |");
    println!("|---|---|---|---|---|");
    for hosts in [1, 2, 3].into_iter().filter(|_| !only_par) {
        for r in 0..runs {
            let run = up(hosts, 1, "ssi.test=nproc", &["SSI-VMM-USERSPACE-UP"]);
            let upt = run
                .mark("SSI-VMM-USERSPACE-UP")
                .map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64()));
            let ok = run.status.is_some_and(|s| s.success())
                && run.value("SSI-VMM-NPROC") == Some(hosts.to_string());
            failed += usize::from(!ok);
            println!(
                "| {hosts} x 1 | {} | {upt} | {:.1} | {} |",
                r + 1,
                run.elapsed.as_secs_f64(),
                if ok { "ok, nproc matches" } else { "FAILED" }
            );
        }
    }
    println!();
    println!("| layout | run | one CPU (ms) | all CPUs (ms) | speedup | result |");
    println!("|---|---|---|---|---|---|");
    for (hosts, cpus) in [(2, 1), (1, 2)].into_iter().filter(|_| !only_boot) {
        for r in 0..runs {
            let run = up(hosts, cpus, "ssi.test=par", &[]);
            let res = par_result(&run).filter(|_| run.status.is_some_and(|s| s.success()));
            failed += usize::from(res.is_none());
            let (one, all, speed) = res
                .map_or(("-".into(), "-".into(), "-".into()), |(o, a, x)| {
                    (o.to_string(), a.to_string(), format!("{x:.2}"))
                });
            println!(
                "| {hosts} host(s) x {cpus} vCPU(s) | {} | {one} | {all} | {speed} | {} |",
                r + 1,
                if res.is_some() { "ok" } else { "FAILED" }
            );
        }
    }
    failed
}

/// Boot benchmarks (`ssi-vmm run`); returns the number of failed runs. `smoke`: the lean
/// kernel with 1 vCPU once (CI keeps the benchmark path working).
fn boot(args: &[String]) -> usize {
    let stock = args.iter().any(|a| a == "--stock" || a == "--only-stock");
    let smoke = args.iter().any(|a| a == "--smoke");
    let runs = runs_arg(args);
    let only_stock = args.iter().any(|a| a == "--only-stock");
    let (lk, li) = (lean_kernel(), initramfs());
    let mut configs = vec![];
    let lean_cpus: &[u32] = if smoke { &[1] } else { &[1, 2] };
    for &cpus in lean_cpus.iter().filter(|_| !only_stock) {
        configs.push(Config {
            name: "lean".into(),
            kernel: lk.clone(),
            initrd: li.clone(),
            cpus,
        });
    }
    if stock && !smoke {
        let p = artifact("images/build-stock-kernel.sh");
        if p.len() == 2 {
            for cpus in [1, 2] {
                configs.push(Config {
                    name: "stock".into(),
                    kernel: p[0].clone(),
                    initrd: p[1].clone(),
                    cpus,
                });
            }
        }
    }
    let mut failed = 0;
    println!(
        "| kernel | vCPUs | run | userspace (s) | poweroff (s) | exits/s | top exits | fix-ups |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for c in &configs {
        for r in 0..runs {
            let stats = std::env::temp_dir().join(format!("ssi-bench-{}.json", std::process::id()));
            let cpus = c.cpus.to_string();
            // The stock initramfs would first insmod its virtio/ext4 modules (minutes each
            // here, mostly the signature check): boot time is measured without them.
            let cl = if c.name == "stock" {
                String::from("ssi.test=nproc ssi.modules=skip")
            } else {
                String::from("ssi.test=nproc")
            };
            let run = run_vmm(
                &[
                    "run",
                    "--kernel",
                    c.kernel.to_str().unwrap_or_default(),
                    "--initrd",
                    c.initrd.to_str().unwrap_or_default(),
                    "--memory",
                    "512M",
                    "--cpus",
                    &cpus,
                    "--append",
                    &cl,
                    "--stats-json",
                    stats.to_str().unwrap_or_default(),
                ],
                &["SSI-VMM-USERSPACE-UP"],
                Duration::from_secs(4200),
            );
            let json = std::fs::read_to_string(&stats).unwrap_or_default();
            let _ = std::fs::remove_file(&stats);
            let up = run
                .mark("SSI-VMM-USERSPACE-UP")
                .map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64()));
            let parsed = BootStats::parse(&json);
            let ok = run.status.is_some_and(|s| s.success())
                && run.value("SSI-VMM-NPROC") == Some(cpus.clone())
                && parsed.is_ok();
            failed += usize::from(!ok);
            let st = parsed.unwrap_or_else(|e| {
                eprintln!("bench: {e}");
                BootStats::default()
            });
            let fix: Vec<String> = st
                .fixups
                .iter()
                .map(|(k, v)| format!("{k}: {v:.0}"))
                .collect();
            println!(
                "| {}{} | {} | {} | {up} | {:.1} | {:.0} | {} | {} |",
                c.name,
                if ok { "" } else { " (FAILED)" },
                c.cpus,
                r + 1,
                st.wall,
                st.exit_rate(),
                st.top_exits(5).join(", "),
                fix.join(", ")
            );
        }
    }
    failed
}

fn runs_arg(args: &[String]) -> usize {
    args.iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let failed = match args.first().map(String::as_str) {
        Some("cluster") => cluster(runs_arg(&args), has("--only-par"), has("--only-boot")),
        Some("boot") => boot(&args),
        Some("snapshot") => {
            let sizes: Vec<u64> = args
                .iter()
                .position(|a| a == "--sizes")
                .and_then(|i| args.get(i + 1))
                .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
                .unwrap_or_else(|| vec![512, 1024]);
            snapshot::run(&sizes)
        }
        _ => {
            eprintln!(
                "usage: bench boot [--stock | --only-stock | --smoke] [--runs N] | bench cluster [--runs N] [--only-par | --only-boot] | bench snapshot [--sizes 512,1024]"
            );
            std::process::exit(2);
        }
    };
    if failed > 0 {
        eprintln!("bench: {failed} run(s) FAILED");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{
  "stop": "PowerOff",
  "exit_code": 0,
  "wall_seconds": 10.0,
  "exits": {"hlt": 50, "io": 200, "mmio": 0},
  "interrupts_injected": 7,
  "fixups": {"clac (0f 01 ca)": 3}
}"#;

    #[test]
    fn run_reports_parse() {
        let s = BootStats::parse(REPORT).unwrap();
        assert_eq!(s.wall, 10.0);
        assert_eq!(s.exits.len(), 3);
        assert_eq!(s.exit_rate(), 25.0);
        assert_eq!(s.top_exits(5), vec!["io 20/s", "hlt 5/s"]);
        assert_eq!(s.top_exits(1), vec!["io 20/s"]);
        assert_eq!(s.fixups.get("clac (0f 01 ca)"), Some(&3.0));
    }

    #[test]
    fn broken_reports_are_errors() {
        assert!(BootStats::parse("").is_err());
        assert!(BootStats::parse("{").is_err());
        assert!(BootStats::parse(r#"{"exits": {}, "fixups": {}}"#).is_err());
        let no_exits = REPORT.replace("\"exits\"", "\"other\"");
        assert!(BootStats::parse(&no_exits).unwrap_err().contains("exits"));
        let bad = REPORT.replace("\"hlt\": 50", "\"hlt\": \"x\"");
        assert!(BootStats::parse(&bad).unwrap_err().contains("hlt"));
    }

    fn run(console: &str) -> ssi_tests::Run {
        ssi_tests::Run {
            console: console.into(),
            stderr: String::new(),
            status: None,
            elapsed: Duration::ZERO,
            marks: Vec::new(),
        }
    }

    #[test]
    fn parallel_results_parse() {
        let r = run("x\nSSI-VMM-PAR-CPUS=2\nSSI-VMM-PAR-SINGLE-MS=4420\nSSI-VMM-PAR-ALL-MS=6330\nSSI-VMM-PAR-SPEEDUP-X100=139\n");
        assert_eq!(par_result(&r), Some((4420, 6330, 1.39)));
        assert_eq!(par_result(&run("SSI-VMM-PAR-SINGLE-MS=1\n")), None);
        let garbled = "SSI-VMM-PAR-SINGLE-MS=1\nSSI-VMM-PAR-ALL-MS=x\nSSI-VMM-PAR-SPEEDUP-X100=1\n";
        assert_eq!(par_result(&run(garbled)), None);
    }
}
