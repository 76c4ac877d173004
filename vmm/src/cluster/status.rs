//! Cluster status: every host reports once a second (its vCPUs and DSM page counts) to the
//! placement's status home (host 0 by default), which writes `<state dir>/status.json`;
//! `ssi-vmm status` reads and prints it.

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
            std::thread::sleep(Duration::from_secs(1));
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
        let st = ClusterStatus {
            name: self.spec.name.clone(),
            state: if stopped { "stopped" } else { "running" }.into(),
            updated: super::timesync::now_ns() / 1_000_000_000,
            hosts,
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

/// Human-readable table of one cluster.
pub fn render(st: &ClusterStatus, now_s: u64) -> String {
    let mut s = format!(
        "cluster {:?}: {} host(s), {} (updated {} s ago)\n",
        st.name,
        st.hosts.len(),
        st.state,
        now_s.saturating_sub(st.updated)
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
        };
        write_atomic(&dir.join("t"), &st).unwrap();
        let all = read_all(&dir).unwrap();
        assert_eq!(all, vec![st.clone()]);
        let text = render(&st, 101);
        assert!(text.contains("1,2") && text.contains("77") && text.contains("1 s ago"));
        assert!(text.contains("12/0") && text.contains("5/0"), "{text}");
        std::fs::write(dir.join("t/status.json"), "{garbage").unwrap();
        assert!(read_all(&dir)
            .unwrap_err()
            .to_string()
            .contains("status.json"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(read_all(&dir).is_err());
    }
}
