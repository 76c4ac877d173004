//! `bench`: boot benchmarks of ssi-vmm, printed as Markdown for `docs/BENCHMARKS.md`.
//!
//! ```text
//! cargo run --release -p ssi-tests --bin bench -- boot [--stock | --only-stock] [--runs N]
//! (SSI_CONSOLE_LOG=FILE tees the guest consoles to FILE)
//! ```
//! For each configuration (lean kernel + busybox initramfs with 1 and 2 vCPUs; with `--stock`
//! also Debian's stock kernel + its initramfs) it boots the guest with `ssi.test=nproc`, takes
//! the host time at which `SSI-VMM-USERSPACE-UP` appears on the console, and reads the VMM's
//! `--stats-json` (exits by reason, emulation fix-ups by instruction).
//!
//! ```text
//! cargo run --release -p ssi-tests --bin bench -- cluster [--runs N] [--only-par | --only-boot]
//! ```
//! Boots the lean kernel with `ssi-vmm up --local H` (one vCPU per host) for H = 1, 2, 3 and
//! reports the host time to `SSI-VMM-USERSPACE-UP`; then runs the CPU-parallel workload
//! (`ssi.test=par`: the same user-mode loop on one CPU, then on all) on 2 hosts x 1 vCPU and on
//! 1 host x 2 vCPUs, and reports the guest-measured times and the speedup.

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

/// Minimal extraction of `"key": number` pairs inside the JSON object named `section`.
fn section(json: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Some(start) = json.find(&format!("\"{name}\"")) else {
        return out;
    };
    let rest = &json[start..];
    let (Some(open), Some(close)) = (rest.find('{'), rest.find('}')) else {
        return out;
    };
    for item in rest[open + 1..close].split(',') {
        let mut kv = item.splitn(2, ':');
        if let (Some(k), Some(v)) = (kv.next(), kv.next()) {
            if let Ok(v) = v.trim().parse::<f64>() {
                out.insert(k.trim().trim_matches('"').to_string(), v);
            }
        }
    }
    out
}

fn scalar(json: &str, key: &str) -> Option<f64> {
    let i = json.find(&format!("\"{key}\""))?;
    let rest = &json[i..];
    let v = rest.split(':').nth(1)?.split([',', '\n', '}']).next()?;
    v.trim().parse().ok()
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

fn cluster(runs: usize, only_par: bool, only_boot: bool) {
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
            let v = |k: &str| run.value(k).unwrap_or_else(|| "-".into());
            let speed = run
                .value("SSI-VMM-PAR-SPEEDUP-X100")
                .and_then(|s| s.parse::<f64>().ok())
                .map_or("-".to_string(), |x| format!("{:.2}", x / 100.0));
            println!(
                "| {hosts} host(s) x {cpus} vCPU(s) | {} | {} | {} | {speed} | {} |",
                r + 1,
                v("SSI-VMM-PAR-SINGLE-MS"),
                v("SSI-VMM-PAR-ALL-MS"),
                if run.status.is_some_and(|s| s.success()) {
                    "ok"
                } else {
                    "FAILED"
                }
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs_arg: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    if args.first().map(String::as_str) == Some("cluster") {
        let has = |f: &str| args.iter().any(|a| a == f);
        cluster(runs_arg, has("--only-par"), has("--only-boot"));
        return;
    }
    if args.first().map(String::as_str) != Some("boot") {
        eprintln!("usage: bench boot [--stock] [--runs N] | bench cluster [--runs N]");
        std::process::exit(2);
    }
    let stock = args.iter().any(|a| a == "--stock" || a == "--only-stock");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let only_stock = args.iter().any(|a| a == "--only-stock");
    let (lk, li) = (lean_kernel(), initramfs());
    let mut configs = vec![];
    for cpus in [1, 2].into_iter().filter(|_| !only_stock) {
        configs.push(Config {
            name: "lean".into(),
            kernel: lk.clone(),
            initrd: li.clone(),
            cpus,
        });
    }
    if stock {
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
            let wall = scalar(&json, "wall_seconds").unwrap_or(0.0);
            let exits = section(&json, "exits");
            let total: f64 = exits.values().sum();
            let mut top: Vec<_> = exits.iter().filter(|(_, v)| **v > 0.0).collect();
            top.sort_by(|a, b| b.1.total_cmp(a.1));
            let top: Vec<String> = top
                .iter()
                .take(5)
                .map(|(k, v)| format!("{k} {:.0}/s", **v / wall.max(1e-9)))
                .collect();
            let fix: Vec<String> = section(&json, "fixups")
                .iter()
                .map(|(k, v)| format!("{k}: {v:.0}"))
                .collect();
            let ok = if run.status.is_some_and(|s| s.success()) {
                ""
            } else {
                " (FAILED)"
            };
            println!(
                "| {}{ok} | {} | {} | {up} | {wall:.1} | {:.0} | {} | {} |",
                c.name,
                c.cpus,
                r + 1,
                total / wall.max(1e-9),
                top.join(", "),
                fix.join(", ")
            );
        }
    }
}
