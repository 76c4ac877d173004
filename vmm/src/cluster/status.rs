//! Cluster status: every host reports once a second (its vCPUs and DSM page counts) to the
//! placement's status home (host 0 by default), which writes `<state dir>/status.json`;
//! `ssi-vmm status` reads and prints it.
//!
//! The status home's daemon records the stop (state "stopped", the reason and the time) when
//! its VM has stopped. `ssi-vmm status` also checks that the processes are there (the `pids`
//! file `up --local` writes, else the hosts' control sockets in the directory): a cluster
//! whose file says "running" but whose processes are all gone is shown as `gone`. Stopped
//! and gone clusters stay listed until `ssi-vmm status --prune` removes their directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{HostId, Message};
use serde::{Deserialize, Serialize};
use transport::Transport;

use super::fabric::IoCounters;
use super::ClusterSpec;
use crate::stop::Stopper;

/// Errors reading the status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No status file.
    #[error(
        "no cluster status under {0}: is a cluster running on this machine (its status home, \
         host 0 by default)?"
    )]
    NoClusters(PathBuf),
    /// The status file cannot be read or parsed.
    #[error("{path}: {detail}")]
    Bad {
        /// File.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// One host's report (plain serde data, sent as JSON in `Status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Host index.
    pub host: u32,
    /// Listen address.
    pub addr: String,
    /// vCPU indexes it runs.
    pub vcpus: Vec<u32>,
    /// Guest pages present in its mapping.
    pub resident_pages: u64,
    /// Pages it holds writable.
    pub owned_pages: u64,
    /// Pages it is home of that some host touched.
    pub directory_entries: u64,
    /// Read / write / write-protect faults taken.
    pub faults: [u64; 3],
    /// Pages received / sent.
    pub pages_in: u64,
    /// Pages sent.
    pub pages_out: u64,
    /// DSM protocol violations or malformed requests seen (must stay 0).
    #[serde(default)]
    pub protocol_errors: u64,
    /// DSM messages that could not be sent (must stay 0 while the VM runs).
    #[serde(default)]
    pub send_errors: u64,
    /// Device accesses this host forwarded to the device's home host.
    #[serde(default)]
    pub io_forwarded: u64,
    /// Accesses forwarded by other hosts that this host served.
    #[serde(default)]
    pub io_served: u64,
}

/// The cluster status file (plain serde data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub name: String,
    /// "running" or "stopped".
    pub state: String,
    /// CLOCK_REALTIME seconds of the last update.
    pub updated: u64,
    /// Latest report of each host.
    pub hosts: Vec<HostStatus>,
    /// Why the VM stopped (once stopped), e.g. `PowerOff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// CLOCK_REALTIME seconds of the stop (once stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<u64>,
}

/// What a cluster is, as `ssi-vmm status` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Its processes run.
    Running,
    /// It stopped and recorded why.
    Stopped,
    /// Its status says running, but none of its processes exists any more.
    Gone,
}

impl Liveness {
    /// Liveness from the recorded state and whether any process of the cluster is there.
    pub fn of(st: &ClusterStatus, alive: bool) -> Liveness {
        if st.state == "stopped" {
            Liveness::Stopped
        } else if alive {
            Liveness::Running
        } else {
            Liveness::Gone
        }
    }
}

/// One cluster found under the state root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Its state directory.
    pub dir: PathBuf,
    /// What it is now.
    pub liveness: Liveness,
    /// Its last status file.
    pub status: ClusterStatus,
    /// Its last complete checkpoint, if it takes checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// The last complete checkpoint of a cluster (`checkpoint.json` in its state directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// CLOCK_REALTIME seconds when it was committed.
    pub at: u64,
}

/// Records `ckpt` as the last complete checkpoint of the cluster whose state is in `dir`.
pub fn set_checkpoint(dir: &Path, ckpt: &Path) -> std::io::Result<()> {
    let c = Checkpoint {
        dir: ckpt.to_path_buf(),
        at: super::timesync::now_ns() / 1_000_000_000,
    };
    let tmp = dir.join("checkpoint.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&c).unwrap_or_default())?;
    std::fs::rename(&tmp, dir.join("checkpoint.json"))
}

/// The line `ssi-vmm status` prints for a checkpoint.
pub fn render_checkpoint(c: &Checkpoint, now_s: u64) -> String {
    format!(
        "last checkpoint: {} ({} s ago)\n",
        c.dir.display(),
        now_s.saturating_sub(c.at)
    )
}

/// The per-host reporting loop.
pub struct Reporter {
    spec: ClusterSpec,
    stats: Arc<dsm_vm::stats::Stats>,
    io: Arc<IoCounters>,
    reports: Arc<Mutex<BTreeMap<u32, String>>>,
}

impl Reporter {
    /// A reporter for host `spec.me`; on the status home, `reports` collects the other hosts'
    /// reports.
    pub fn new(
        spec: ClusterSpec,
        stats: Arc<dsm_vm::stats::Stats>,
        io: Arc<IoCounters>,
        reports: Arc<Mutex<BTreeMap<u32, String>>>,
    ) -> Self {
        Reporter {
            spec,
            stats,
            io,
            reports,
        }
    }

    fn mine(&self) -> HostStatus {
        let s = self.stats.snapshot();
        HostStatus {
            host: self.spec.me as u32,
            addr: self.spec.hosts[self.spec.me].addr.to_string(),
            vcpus: self
                .spec
                .placement
                .vcpus_of(self.spec.me)
                .map(|i| i as u32)
                .collect(),
            resident_pages: s.resident_pages,
            owned_pages: s.owned_pages,
            directory_entries: s.directory_entries,
            faults: [s.read_faults, s.write_faults, s.wp_faults],
            pages_in: s.pages_in,
            pages_out: s.pages_out,
            protocol_errors: s.protocol_errors,
            send_errors: s.send_errors,
            io_forwarded: self.io.forwarded.load(Ordering::Relaxed),
            io_served: self.io.served.load(Ordering::Relaxed),
        }
    }

    /// Reports every second until the VM stops (and once more after).
    pub fn run(self, transport: Arc<dyn Transport>, stop: Arc<Stopper>) {
        loop {
            let stopped = stop.stopped();
            let me = self.mine();
            let json = serde_json::to_string(&me).unwrap_or_default();
            let home = self.spec.placement.status_home;
            if self.spec.me == usize::from(home) {
                self.reports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.spec.me as u32, json);
                self.write(stopped);
            } else {
                let _ = transport.send(HostId(home), Message::Status { json });
            }
            if stopped {
                return;
            }
            for _ in 0..10 {
                if stop.stopped() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn write(&self, stopped: bool) {
        let Some(dir) = &self.spec.state_dir else {
            return;
        };
        let hosts = self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        // Never overwrite the stop the daemon recorded (`mark_stopped`).
        let recorded = std::fs::read_to_string(dir.join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<ClusterStatus>(&t).ok())
            .is_some_and(|old| old.reason.is_some());
        if recorded {
            return;
        }
        let now = super::timesync::now_ns() / 1_000_000_000;
        // The daemon records the reason once its VM has stopped (`mark_stopped`).
        let st = ClusterStatus {
            name: self.spec.name.clone(),
            state: if stopped { "stopped" } else { "running" }.into(),
            updated: now,
            hosts,
            reason: None,
            stopped_at: stopped.then_some(now),
        };
        if let Err(e) = write_atomic(dir, &st) {
            log::warn!("cannot write cluster status in {}: {e}", dir.display());
        }
    }
}

fn write_atomic(dir: &Path, st: &ClusterStatus) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("status.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st).unwrap_or_default())?;
    std::fs::rename(tmp, dir.join("status.json"))
}

/// Records in `dir/status.json` that the cluster stopped now, for `reason` (the host reports
/// of the last status are kept).
pub fn mark_stopped(dir: &Path, reason: &str) -> std::io::Result<()> {
    let mut st: ClusterStatus = std::fs::read_to_string(dir.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| ClusterStatus {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ..Default::default()
        });
    let now = super::timesync::now_ns() / 1_000_000_000;
    st.state = "stopped".into();
    st.reason = Some(reason.to_string());
    st.stopped_at = Some(now);
    st.updated = now;
    write_atomic(dir, &st)
}

/// Whether some process of the cluster in `dir` is there: a pid of its `pids` file (written
/// by `up --local`) that is still an `ssi-vmm host`, or a control socket that accepts.
pub fn alive(dir: &Path) -> bool {
    if let Ok(text) = std::fs::read_to_string(dir.join("pids")) {
        let any = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
            .any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| c.split(|&b| b == 0).any(|a| a == b"host"))
                    .unwrap_or(false)
            });
        if any {
            return true;
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        p.extension().is_some_and(|x| x == "sock")
            && std::os::unix::net::UnixStream::connect(&p).is_ok()
    })
}

/// Every cluster under `root` with its liveness.
pub fn entries(root: &Path) -> Result<Vec<Entry>, Error> {
    let mut out = Vec::new();
    let dirs = std::fs::read_dir(root).map_err(|_| Error::NoClusters(root.to_path_buf()))?;
    for e in dirs.flatten() {
        let dir = e.path();
        let path = dir.join("status.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let status: ClusterStatus = serde_json::from_str(&text).map_err(|e| Error::Bad {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let liveness = Liveness::of(&status, alive(&dir));
        let checkpoint = std::fs::read_to_string(dir.join("checkpoint.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        out.push(Entry {
            dir,
            liveness,
            status,
            checkpoint,
        });
    }
    if out.is_empty() {
        return Err(Error::NoClusters(root.to_path_buf()));
    }
    out.sort_by(|a, b| a.status.name.cmp(&b.status.name));
    Ok(out)
}

/// Removes the directories of the stopped and gone clusters among `entries`; returns them.
pub fn prune(entries: &[Entry]) -> Vec<(PathBuf, std::io::Result<()>)> {
    entries
        .iter()
        .filter(|e| e.liveness != Liveness::Running)
        .map(|e| (e.dir.clone(), std::fs::remove_dir_all(&e.dir)))
        .collect()
}

/// `status --json`: the entries as one JSON array (`liveness` is "running", "stopped" or
/// "gone"; `status` is the status file).
pub fn to_json(entries: &[Entry]) -> String {
    serde_json::to_string_pretty(entries).unwrap_or_else(|_| "[]".into())
}

/// Default root of cluster state directories (`$SSI_VMM_STATE_DIR` or `/run/ssi-vmm`).
pub fn state_root() -> PathBuf {
    std::env::var_os("SSI_VMM_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ssi-vmm"))
}

/// Reads every cluster status under `root` (one directory per cluster name).
pub fn read_all(root: &Path) -> Result<Vec<ClusterStatus>, Error> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(root).map_err(|_| Error::NoClusters(root.to_path_buf()))?;
    for e in entries.flatten() {
        let path = e.path().join("status.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let st: ClusterStatus = serde_json::from_str(&text).map_err(|e| Error::Bad {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        out.push(st);
    }
    if out.is_empty() {
        return Err(Error::NoClusters(root.to_path_buf()));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The state part of a cluster's heading.
pub fn describe(st: &ClusterStatus, live: Liveness, now_s: u64) -> String {
    let ago = now_s.saturating_sub(st.updated);
    match live {
        Liveness::Running => format!("running (updated {ago} s ago)"),
        Liveness::Stopped => format!(
            "stopped ({}, {} s ago)",
            st.reason.as_deref().unwrap_or("no reason recorded"),
            now_s.saturating_sub(st.stopped_at.unwrap_or(st.updated))
        ),
        Liveness::Gone => {
            format!("gone (processes no longer exist; last update {ago} s ago)")
        }
    }
}

/// Human-readable table of one cluster.
pub fn render(st: &ClusterStatus, live: Liveness, now_s: u64) -> String {
    let mut s = format!(
        "cluster {:?}: {} host(s), {}\n",
        st.name,
        st.hosts.len(),
        describe(st, live, now_s)
    );
    s.push_str("host  address                 vcpus     resident    owned  home-dir   faults(r/w/wp)      pages-in  pages-out  io(fwd/srv)  errors(proto/send)\n");
    for h in &st.hosts {
        let vcpus = h
            .vcpus
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let faults = format!("{}/{}/{}", h.faults[0], h.faults[1], h.faults[2]);
        let io = format!("{}/{}", h.io_forwarded, h.io_served);
        s.push_str(&format!(
            "{:<5} {:<23} {:<9} {:>8} {:>8} {:>9}   {faults:<18} {:>9} {:>10}  {io:<12} {}/{}\n",
            h.host,
            h.addr,
            vcpus,
            h.resident_pages,
            h.owned_pages,
            h.directory_entries,
            h.pages_in,
            h.pages_out,
            h.protocol_errors,
            h.send_errors,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_files_round_trip_and_render() {
        let dir = std::env::temp_dir().join(format!("ssi-status-{}", std::process::id()));
        let st = ClusterStatus {
            name: "t".into(),
            state: "running".into(),
            updated: 100,
            hosts: vec![HostStatus {
                host: 1,
                addr: "127.0.0.1:1".into(),
                vcpus: vec![1, 2],
                resident_pages: 77,
                protocol_errors: 5,
                io_forwarded: 12,
                ..Default::default()
            }],
            ..Default::default()
        };
        write_atomic(&dir.join("t"), &st).unwrap();
        let all = read_all(&dir).unwrap();
        assert_eq!(all, vec![st.clone()]);
        let text = render(&st, Liveness::Running, 101);
        assert!(text.contains("1,2") && text.contains("77") && text.contains("1 s ago"));
        assert!(text.contains("12/0") && text.contains("5/0"), "{text}");
        // Nothing of it runs: gone. Stopped once marked, with the reason and the time.
        let e = entries(&dir).unwrap();
        assert_eq!(e[0].liveness, Liveness::Gone);
        let text = render(&st, Liveness::Gone, 130);
        assert!(
            text.contains("gone (processes no longer exist; last update 30 s ago)"),
            "{text}"
        );
        mark_stopped(&dir.join("t"), "PowerOff").unwrap();
        let e = entries(&dir).unwrap();
        assert_eq!(e[0].liveness, Liveness::Stopped);
        let at = e[0].status.stopped_at.unwrap();
        assert_eq!(e[0].status.hosts, st.hosts);
        let text = render(&e[0].status, e[0].liveness, at + 7);
        assert!(text.contains("stopped (PowerOff, 7 s ago)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&to_json(&e)).unwrap();
        assert_eq!(json[0]["liveness"], "stopped");
        assert_eq!(json[0]["status"]["reason"], "PowerOff");
        assert_eq!(json[0]["status"]["hosts"][0]["resident_pages"], 77);
        // Our own pid is not an `ssi-vmm host`; a live control socket makes it running.
        std::fs::write(
            dir.join("t/pids"),
            format!("0 {}\n1 999999999\n", std::process::id()),
        )
        .unwrap();
        assert!(!alive(&dir.join("t")));
        let _l = std::os::unix::net::UnixListener::bind(dir.join("t/host-0.sock")).unwrap();
        assert!(alive(&dir.join("t")));
        assert_eq!(Liveness::of(&st, true), Liveness::Running);
        drop(_l);
        let pruned = prune(&entries(&dir).unwrap());
        assert_eq!(pruned.len(), 1);
        assert!(!dir.join("t").exists());
        write_atomic(&dir.join("t"), &st).unwrap();
        std::fs::write(dir.join("t/status.json"), "{garbage").unwrap();
        assert!(read_all(&dir)
            .unwrap_err()
            .to_string()
            .contains("status.json"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(read_all(&dir).is_err());
    }
}
