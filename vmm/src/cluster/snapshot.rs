//! `ssi-vmm snapshot NAME DIR` of a cluster: the coordinator, driving every host through its
//! control socket.
//!
//! ```text
//!  ssi-vmm snapshot            host 0 .. host N-1 (control sockets)
//!   |-- status ---------------->|  remember whether the VM was paused already
//!   |-- pause ----------------->|  every local vCPU out of KVM_RUN (forwarded I/O done)
//!   |-- quiesce --------------->|  DSM idle here; Ping/Pong with every peer (in-order links)
//!   |-- quiesce --------------->|  again: what handling earlier messages sent is in too
//!   |   create DIR.tmp-<pid>    |
//!   |-- save DIR.tmp-<pid> ---->|  in parallel: vCPUs save, the host writes memory-h<i>
//!   |<-- parts -----------------|  (its valid pages), its states, its disks' copies
//!   |   manifest from all parts, fsync, rename DIR.tmp-<pid> -> DIR
//!   |-- resume ---------------->|  (or `stop DIR` with --stop: exit status 0)
//! ```
//!
//! After the pause no vCPU runs anywhere, so nothing new starts; the first quiesce waits out
//! the DSM transactions still running and pushes through every message sent before it (the
//! transport delivers in order and handlers run in arrival order); the second pushes through
//! what handling those sent (an `IrqPulse` for the IOAPIC's host becomes an `Ipi`). Then no
//! page, interrupt or forwarded access is in flight, and every host's saved state agrees.
//! Any failure resumes the VM (unless it was paused before) and leaves no snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapshot::SnapshotBuilder;

use crate::control::{self, Endpoint, Op};
use crate::vm::snap::{self, HostParts};

/// Why a cluster snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host refused or did not answer a step.
    #[error("{host}: {step} failed: {source}")]
    Host {
        /// The host ("host N").
        host: String,
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: control::Error,
    },
    /// A host's answer to `save` is not what it should be.
    #[error("{host}: bad answer to save: {detail}")]
    BadParts {
        /// The host.
        host: String,
        /// What is wrong.
        detail: String,
    },
    /// The snapshot directory could not be written.
    #[error(transparent)]
    Format(#[from] snapshot::Error),
    /// The hosts' parts do not make one snapshot.
    #[error(transparent)]
    Assemble(#[from] snap::Error),
}

/// What a cluster snapshot took.
#[derive(Clone, Debug)]
pub struct Taken {
    /// The committed directory.
    pub dir: PathBuf,
    /// How long the guest was paused (pause to resume or stop).
    pub paused_for: Duration,
    /// Bytes of data pages written, over all hosts.
    pub data_bytes: u64,
}

/// A spinner on stderr (drawn only on a terminal) with the step and, while the hosts save,
/// the bytes written so far and the rate.
fn spinner() -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Bytes allocated by the files in `dir` (what the hosts have written so far).
fn written(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn step(ep: &Endpoint, name: &'static str, op: Op) -> Result<serde_json::Value, Error> {
    control::request(&ep.path, op).map_err(|source| Error::Host {
        host: ep.label.clone(),
        step: name,
        source,
    })
}

/// Snapshots the cluster whose hosts answer on `endpoints` into `dir` (absolute; must not
/// exist), then resumes it, or stops it when `stop`. A VM paused before stays paused.
/// With `parent`, the snapshot is incremental: every host writes only the pages that differ
/// from that snapshot (chain), which becomes the new one's parent.
pub fn take(
    endpoints: &[Endpoint],
    dir: &Path,
    stop: bool,
    parent: Option<&Path>,
) -> Result<Taken, Error> {
    let mut was_paused = true;
    for ep in endpoints {
        let st = step(ep, "status", Op::Status)?;
        was_paused &= st.get("state").and_then(|s| s.as_str()) == Some("paused");
    }
    let t0 = Instant::now();
    let pb = spinner();
    let mut paused: Vec<&Endpoint> = Vec::new();
    let result = (|| {
        pb.set_message(format!("pausing {} hosts", endpoints.len()));
        for ep in endpoints {
            step(ep, "pause", Op::Pause)?;
            paused.push(ep);
        }
        pb.set_message("quiescing");
        for _ in 0..2 {
            for ep in endpoints {
                step(ep, "quiesce", Op::Quiesce)?;
            }
        }
        let pref = match parent {
            Some(p) => Some(snapshot::ParentRef::new(dir, p)?),
            None => None,
        };
        let b = SnapshotBuilder::create(dir)?;
        let partial = b.partial_dir().to_path_buf();
        let saving = std::sync::atomic::AtomicBool::new(true);
        let parts: Vec<Result<HostParts, Error>> = std::thread::scope(|s| {
            let (pb, partial, saving) = (&pb, &partial, &saving);
            s.spawn(move || {
                let t = Instant::now();
                while saving.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = written(partial);
                    pb.set_message(format!(
                        "saving: {} written, {}/s",
                        indicatif::HumanBytes(n),
                        indicatif::HumanBytes(
                            (n as f64 / t.elapsed().as_secs_f64().max(0.01)) as u64
                        )
                    ));
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
            let handles: Vec<_> = endpoints
                .iter()
                .map(|ep| {
                    let partial = partial.clone();
                    s.spawn(move || {
                        let op = Op::Save {
                            dir: partial,
                            parent: parent.map(Path::to_path_buf),
                        };
                        let v = step(ep, "save", op)?;
                        let bad = |detail: String| Error::BadParts {
                            host: ep.label.clone(),
                            detail,
                        };
                        let p = v.get("parts").cloned().ok_or(bad("no parts".into()))?;
                        serde_json::from_value(p).map_err(|e| bad(e.to_string()))
                    })
                })
                .collect();
            let all = handles
                .into_iter()
                .zip(endpoints)
                .map(|(h, ep)| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::BadParts {
                            host: ep.label.clone(),
                            detail: "the save thread panicked".into(),
                        })
                    })
                })
                .collect();
            saving.store(false, std::sync::atomic::Ordering::Relaxed);
            all
        });
        pb.set_message("committing");
        let parts: Vec<HostParts> = parts.into_iter().collect::<Result<_, _>>()?;
        let data_bytes = parts
            .iter()
            .filter_map(|p| p.memory.as_ref())
            .map(|m| m.pages_data * snapshot::PAGE_SIZE as u64)
            .sum();
        let manifest = snap::assemble(&parts, pref)?;
        let out = b.commit(&manifest)?;
        Ok((out, data_bytes))
    })();
    pb.finish_and_clear();
    match result {
        Ok((out, data_bytes)) => {
            if stop {
                for ep in endpoints {
                    if let Err(e) = step(ep, "stop", Op::Stop { dir: out.clone() }) {
                        log::warn!("{e}");
                    }
                }
            } else if !was_paused {
                for ep in endpoints {
                    step(ep, "resume", Op::Resume)?;
                }
            }
            Ok(Taken {
                dir: out,
                paused_for: t0.elapsed(),
                data_bytes,
            })
        }
        Err(e) => {
            if !was_paused {
                for ep in paused {
                    if let Err(r) = step(ep, "resume", Op::Resume) {
                        log::warn!("after a failed snapshot: {r}");
                    }
                }
            }
            Err(e)
        }
    }
}
