//! Checkpoint/restart of a local cluster (`up --local N` or `restore --local N` with
//! `--checkpoint-every D --checkpoint-dir DIR`).
//!
//! While the VM runs, a thread takes a cluster snapshot (see [`super::snapshot`]) into
//! `DIR/ckpt-<seq>` every `D`. Checkpoints are **incremental**: each one records only the pages
//! that differ from the previous checkpoint of the run (its parent), except the first of a run
//! and every [`FULL_EVERY`]-th, which are full, so chains stay short. The last [`KEEP`] complete
//! checkpoints are kept together with every checkpoint their chains read through; the rest are
//! removed once a newer one is complete. A checkpoint is written as
//! `DIR/ckpt-<seq>.tmp-<pid>` and renamed into place only once complete, so one cut short (the
//! writer or a host killed mid-way) is never used: restart opens the newest directory whose
//! snapshot (chain included) opens and verifies.
//!
//! When the run ends with a host gone (killed, crashed, unreachable: any host without a
//! clean exit) and not on a stop signal, the VM is started again from the newest complete
//! checkpoint on the hosts that remain (one fewer local host process; its vCPUs spread over
//! them), with a log line saying so, and checkpointing goes on. The checkpoint used is moved
//! out of the rotation first (`DIR/restored-ckpt-<seq>`): the restarted guest runs on its disk
//! copy. Restarts stop when no
//! checkpoint exists, no host would remain, or after [`MAX_RESTARTS`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::launch::{self, HostOutcome, Restore, UpControl};
use super::spec::ClusterFile;
use super::status;
use crate::control;
use crate::vm::snap;

/// Complete checkpoints kept (older ones are removed once a newer one is complete).
pub const KEEP: usize = 2;
/// Most automatic restarts of one run.
pub const MAX_RESTARTS: usize = 3;
/// Every this many checkpoints of a run, one is full (the others are incremental).
pub const FULL_EVERY: usize = 8;

/// Periodic checkpoints of a local cluster.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Time between the end of one checkpoint and the start of the next.
    pub every: Duration,
    /// Where checkpoints go (created if missing).
    pub dir: PathBuf,
}

/// Parses a duration such as `60s`, `500ms`, `2m` or `90` (seconds).
pub fn parse_every(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 60s, 500ms, 2m)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("bad duration {s:?} (e.g. 60s, 500ms, 2m)")),
    };
    if d < Duration::from_millis(100) {
        return Err(format!("checkpoint interval {s:?} is below 100ms"));
    }
    Ok(d)
}

/// The sequence number of a complete checkpoint directory name (`ckpt-<seq>`).
fn seq_of(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// Complete checkpoints in `dir` (partial `.tmp-<pid>` ones are skipped by name), oldest
/// first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((seq_of(e.file_name().to_str()?)?, e.path())))
        .collect();
    v.sort();
    v
}

/// The newest checkpoint in `dir` that opens and verifies completely.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir)
        .into_iter()
        .rev()
        .find_map(|(_, p)| match snap::load(&p, true) {
            Ok(_) => Some(p),
            Err(e) => {
                log::warn!("checkpoint {} is unusable: {e}", p.display());
                None
            }
        })
}

/// Removes the complete checkpoints in `dir` that neither are among the newest [`KEEP`] nor
/// lie in one of their chains.
fn rotate(dir: &Path) {
    let all = list(dir);
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let keep: std::collections::HashSet<PathBuf> = all
        .iter()
        .rev()
        .take(KEEP)
        .flat_map(|(_, p)| match snapshot::Snapshot::open(p) {
            Ok(s) => s.layers().iter().map(|l| canon(l.dir())).collect(),
            Err(_) => vec![canon(p)],
        })
        .collect();
    for (_, p) in &all {
        if !keep.contains(&canon(p)) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Takes checkpoints of cluster `name` until `done`.
fn checkpointer(name: String, plan: Plan, done: Arc<AtomicBool>) {
    let root = status::state_root();
    let mut seq = list(&plan.dir).last().map_or(1, |(s, _)| s + 1);
    let mut next = Instant::now() + plan.every;
    // The previous checkpoint of this run and how many checkpoints its chain holds.
    let mut parent: Option<(PathBuf, usize)> = None;
    while !done.load(Ordering::SeqCst) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let target = plan.dir.join(format!("ckpt-{seq}"));
        let on = parent
            .as_ref()
            .filter(|(_, len)| *len < FULL_EVERY)
            .map(|(p, len)| (p.clone(), *len));
        let r = control::endpoints(&root, &name)
            .map_err(|e| e.to_string())
            .and_then(|eps| {
                super::snapshot::take(&eps, &target, false, on.as_ref().map(|(p, _)| p.as_path()))
                    .map_err(|e| e.to_string())
            });
        match r {
            Ok(t) => {
                eprintln!(
                    "ssi-vmm: checkpoint {} written ({}, guest paused {:.2} s, {} MiB of data)",
                    t.dir.display(),
                    match &on {
                        Some((p, _)) => format!(
                            "incremental on {}",
                            p.file_name().unwrap_or_default().to_string_lossy()
                        ),
                        None => "full".into(),
                    },
                    t.paused_for.as_secs_f64(),
                    t.data_bytes >> 20
                );
                if let Err(e) = status::set_checkpoint(&root.join(&name), &t.dir) {
                    log::warn!("cannot record the checkpoint in the status: {e}");
                }
                parent = Some((t.dir.clone(), on.map_or(1, |(_, len)| len + 1)));
                rotate(&plan.dir);
                seq += 1;
            }
            Err(e) if done.load(Ordering::SeqCst) => {
                log::debug!("checkpoint at the end of the run: {e}");
            }
            Err(e) => log::warn!("checkpoint {} failed: {e}", target.display()),
        }
        next = Instant::now() + plan.every;
    }
}

/// `up_local` with periodic checkpoints and automatic restart from the newest one when a
/// host goes away. `cpus[i]`: vCPUs of host `i`; `restore`: start from this snapshot.
pub fn run_local(
    file: ClusterFile,
    cpus: &[u32],
    restore: Option<Restore>,
    plan: Option<Plan>,
    ctl: &Arc<UpControl>,
) -> Result<Vec<HostOutcome>, launch::Error> {
    let Some(plan) = plan else {
        return launch::up_local(file, cpus, restore, ctl);
    };
    std::fs::create_dir_all(&plan.dir).map_err(|e| {
        launch::Error::Io(format!("checkpoint directory {}: {e}", plan.dir.display()))
    })?;
    let name = file.name.clone();
    let (mut file, mut cpus, mut restore) = (file, cpus.to_vec(), restore);
    let mut restarts = 0;
    loop {
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let (n2, p2) = (name.clone(), plan.clone());
        let writer = std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || checkpointer(n2, p2, d2))
            .map_err(|e| launch::Error::Io(format!("checkpoint thread: {e}")))?;
        let outcomes = launch::up_local(file.clone(), &cpus, restore.clone(), ctl);
        done.store(true, Ordering::SeqCst);
        let _ = writer.join();
        let outcomes = outcomes?;
        let lost: Vec<&HostOutcome> = outcomes.iter().filter(|o| o.report.code != 0).collect();
        if lost.is_empty() || ctl.signal().is_some() {
            return Ok(outcomes);
        }
        // The host that failed first is the one that did not report at all (killed), else
        // the first with an error.
        let gone = lost
            .iter()
            .find(|o| o.report.reason.contains("without a report"))
            .unwrap_or(&lost[0]);
        let remaining = cpus.len() - 1;
        let Some(ckpt) = latest(&plan.dir) else {
            eprintln!(
                "ssi-vmm: host {} failed and no complete checkpoint exists: not restarting",
                gone.host
            );
            return Ok(outcomes);
        };
        if remaining == 0 || restarts >= MAX_RESTARTS {
            eprintln!("ssi-vmm: host {} failed; not restarting ({} restarts so far, {remaining} hosts left)", gone.host, restarts);
            return Ok(outcomes);
        }
        // The restarted guest runs on the checkpoint's disk copy in place: take it out of the
        // rotation first (it is no longer a checkpoint once the guest writes to it).
        let live = plan.dir.join(format!(
            "restored-{}",
            ckpt.file_name()
                .map_or("ckpt".into(), |n| n.to_string_lossy())
        ));
        std::fs::rename(&ckpt, &live).map_err(|e| {
            launch::Error::Io(format!(
                "moving {} to {}: {e}",
                ckpt.display(),
                live.display()
            ))
        })?;
        let ckpt = live;
        let r = snap::load(&ckpt, true).map_err(|e| launch::Error::Io(e.to_string()))?;
        let Some(new_cpus) = snap::spread_cpus(u32::from(r.guest.cpus), remaining) else {
            eprintln!(
                "ssi-vmm: host {} failed; the guest's {} vCPUs cannot run on {remaining} hosts: not restarting",
                gone.host, r.guest.cpus
            );
            return Ok(outcomes);
        };
        eprintln!(
            "ssi-vmm: host {} failed ({}); restarting {name} from checkpoint {} on the {remaining} remaining hosts",
            gone.host,
            gone.report.reason,
            ckpt.display()
        );
        for o in &outcomes {
            eprintln!(
                "ssi-vmm:   before the restart, host {}: exit {}: {}",
                o.host, o.report.code, o.report.reason
            );
        }
        file = r
            .cluster_file(&name, &new_cpus)
            .map_err(|e| launch::Error::Io(e.to_string()))?;
        drop(r);
        // The dead host's control socket stays behind; the others removed theirs.
        clear_sockets(&status::state_root().join(&name));
        cpus = new_cpus;
        restore = Some(Restore {
            dir: ckpt,
            lazy: false,
        });
        restarts += 1;
    }
}

/// Removes the host control sockets left in a cluster's state directory.
fn clear_sockets(dir: &Path) {
    for e in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("host-") && n.ends_with(".sock") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse() {
        assert_eq!(parse_every("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_every("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_every("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_every("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_every("10ms").is_err());
        assert!(parse_every("1h").is_err());
        assert!(parse_every("s").is_err());
    }

    /// An empty checkpoint at `dir`, incremental on `parent`.
    fn ckpt(dir: &Path, parent: Option<&str>) {
        let b = snapshot::SnapshotBuilder::create(dir).unwrap();
        let mut m = snapshot::Manifest::new(serde_json::json!({}), serde_json::json!({}));
        if let Some(p) = parent {
            let p = dir.parent().unwrap().join(p);
            m.parent = Some(snapshot::ParentRef::new(dir, &p).unwrap());
        }
        b.commit(&m).unwrap();
    }

    fn names(d: &Path) -> Vec<u64> {
        list(d).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn rotation_keeps_the_newest_checkpoints_and_their_chains() {
        let d = std::env::temp_dir().join(format!("ssi-ckpt-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        ckpt(&d.join("ckpt-1"), None);
        ckpt(&d.join("ckpt-2"), Some("ckpt-1"));
        ckpt(&d.join("ckpt-3"), Some("ckpt-2"));
        rotate(&d);
        // 3 and 2 are the newest; 3 reads through 2 and 1.
        assert_eq!(names(&d), [1, 2, 3]);
        ckpt(&d.join("ckpt-4"), None);
        rotate(&d);
        assert_eq!(names(&d), [1, 2, 3, 4]);
        ckpt(&d.join("ckpt-5"), Some("ckpt-4"));
        rotate(&d);
        assert_eq!(names(&d), [4, 5]);
        // What is kept still opens, chain included.
        let s = snapshot::Snapshot::open(&d.join("ckpt-5")).unwrap();
        assert_eq!(s.layers().len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_complete_checkpoints_are_listed() {
        let d = std::env::temp_dir().join(format!("ssi-ckpt-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for n in ["ckpt-2", "ckpt-10", "ckpt-3.tmp-77", "other", "ckpt-x"] {
            std::fs::create_dir_all(d.join(n)).unwrap();
        }
        let seqs: Vec<u64> = list(&d).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [2, 10]);
        // Neither is a snapshot: none is usable.
        assert_eq!(latest(&d), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
