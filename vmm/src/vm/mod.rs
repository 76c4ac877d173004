//! A machine on this host: [`Vm::start`] builds it from a [`VmConfig`] (alone, or as one host
//! of a cluster) and starts its threads; [`Vm::pause`], [`Vm::resume`] and [`Vm::stop`] control
//! the local vCPUs (also through a [`Controller`] shared with the control socket), and
//! [`Vm::wait`] returns once the guest powered off, reset, or the VMM hit an error.
//!
//! - [`build`]: the KVM VM, the guest image, disks, joining the cluster.
//! - [`memory`]: guest RAM (local or distributed) and its KVM slots.
//! - vCPU thread control (event channel, acknowledgements): [`crate::vcpu::control`].

mod build;
mod memory;
pub mod snap;

use snap::SavedVcpu;

pub use build::JOIN_TIMEOUT;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use irqchip::IrqChip;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::boot::{acpi, cpu, loader};
use crate::cluster::shadow::ShadowZap;
use crate::cluster::{fabric, status, timesync, ClusterSpec, Fabric, Placement};
use crate::config::VmConfig;
use crate::devices::{serial, Devices};
use crate::irq::IrqLine;
use crate::layout::*;
use crate::stats::Stats;
use crate::stop::{StopReason, Stopper};
use crate::vcpu::control::{self as vcpu_control, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vcpu::{self, quirks::FixupStats, Vcpu};
use build::Net;
use memory::Ram;

/// Errors while building, running or controlling the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// /dev/kvm cannot be used.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while building the VM.
    #[error("KVM {0} failed: {1}")]
    KvmIoctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory: {detail}")]
    Memory {
        /// Requested size.
        size: u64,
        /// What went wrong.
        detail: String,
    },
    /// Kernel or initrd loading failed.
    #[error(transparent)]
    Loader(#[from] loader::Error),
    /// ACPI table construction failed.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// vCPU setup failed.
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    /// A disk could not be opened.
    #[error("disk {path}: {detail}")]
    Disk {
        /// Image path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A thread could not be spawned.
    #[error("cannot spawn thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The cluster could not be joined.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Distributed guest memory failed.
    #[error("distributed memory: {0}")]
    Dsm(#[from] dsm_vm::Error),
    /// The VM is stopping: it can no longer be paused or resumed.
    #[error("the VM is stopping")]
    Stopping,
    /// The request needs a paused VM.
    #[error("the VM is not paused")]
    NotPaused,
    /// The cluster did not settle.
    #[error("{0}")]
    Busy(String),
    /// A vCPU did not answer a pause or resume request.
    #[error("{0}")]
    Vcpu(#[source] vcpu_control::Error),
    /// The control socket could not be served.
    #[error("control socket: {0}")]
    Control(#[source] Box<crate::control::Error>),
    /// A snapshot could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] snap::Error),
    /// A saved component state could not be restored.
    #[error("cannot restore {what} from the snapshot: {source}")]
    Restore {
        /// The component.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn restore_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Error {
    let what = what.into();
    move |source| Error::Restore { what, source }
}

/// What a finished run reports.
#[derive(Debug, serde::Serialize)]
pub struct RunReport {
    /// Why the VM stopped.
    pub stop: String,
    /// Process exit status.
    pub exit_code: i32,
    /// Wall time from VM creation to stop.
    pub wall_seconds: f64,
    /// Exits by reason.
    pub exits: std::collections::BTreeMap<&'static str, u64>,
    /// Interrupts injected.
    pub interrupts_injected: u64,
    /// Emulation fix-ups by instruction.
    pub fixups: std::collections::BTreeMap<&'static str, u64>,
    /// DSM protocol violations or malformed requests seen (0 on a healthy cluster; always 0
    /// for a single host).
    pub dsm_protocol_errors: u64,
    /// DSM messages that could not be sent.
    pub dsm_send_errors: u64,
}

/// How long [`Controller::pause`] and [`Controller::resume`] wait for every local vCPU.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// One local vCPU as seen by `status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStatus {
    /// vCPU index.
    pub index: usize,
    /// What it is doing ("running", "halted", "paused", ...).
    pub state: &'static str,
    /// Its `KVM_RUN` exits so far.
    pub exits: u64,
}

/// What the VM on this host is doing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VmStatus {
    /// "running", "paused" or "stopping".
    pub state: &'static str,
    /// The local vCPUs.
    pub vcpus: Vec<VcpuStatus>,
}

struct Handles {
    vcpus: Vec<VcpuHandle>,
    paused: bool,
}

/// Pauses, resumes and stops the local vCPUs of a running [`Vm`]; shared with the control
/// socket. Requests are serialized.
pub struct Controller {
    handles: Mutex<Handles>,
    stop: Arc<Stopper>,
    /// What a snapshot saves besides the vCPUs.
    snap: snap::Source,
    /// The cluster's transport (None: a single host).
    transport: Option<Arc<dyn transport::Transport>>,
}

impl Controller {
    fn lock(&self) -> MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `ev` to every local vCPU and waits up to `timeout` for `want` from each.
    fn broadcast(
        h: &Handles,
        ev: VcpuEvent,
        want: VcpuResponse,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), Error> {
        for v in &h.vcpus {
            v.drain();
        }
        for v in &h.vcpus {
            v.send(ev).map_err(Error::Vcpu)?;
        }
        let deadline = Instant::now() + timeout;
        let missing: Vec<usize> = h
            .vcpus
            .iter()
            .filter(|v| !v.wait_for(want, deadline))
            .map(|v| v.index)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Vcpu(vcpu_control::Error::Timeout {
                what,
                vcpus: missing,
                timeout,
            }))
        }
    }

    /// Has every (paused) local vCPU save its KVM state on its own thread; returns the
    /// states in vCPU order.
    fn save_vcpus(h: &Handles) -> Result<Vec<SavedVcpu>, Error> {
        Self::broadcast(h, VcpuEvent::Save, VcpuResponse::Saved, "save", ACK_TIMEOUT)?;
        h.vcpus
            .iter()
            .map(|v| match v.shared.take_saved() {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(snap::Error::Vcpu(e).into()),
                None => Err(snap::Error::NoVcpuState(v.index).into()),
            })
            .collect()
    }

    /// Pauses every local vCPU: returns once each has left `KVM_RUN` (or was parked on HLT or
    /// waiting for SIPI) and acknowledged. On a timeout the vCPUs are resumed again and the
    /// error names the ones that did not answer.
    pub fn pause(&self, timeout: Duration) -> Result<(), Error> {
        let mut h = self.lock();
        if self.stop.stopped() {
            return Err(Error::Stopping);
        }
        match Self::broadcast(&h, VcpuEvent::Pause, VcpuResponse::Paused, "pause", timeout) {
            Ok(()) => {
                h.paused = true;
                log::info!("paused {} local vCPU(s)", h.vcpus.len());
                Ok(())
            }
            Err(e) => {
                for v in &h.vcpus {
                    let _ = v.send(VcpuEvent::Resume);
                }
                h.paused = false;
                Err(if self.stop.stopped() {
                    Error::Stopping
                } else {
                    e
                })
            }
        }
    }

    /// Resumes every local vCPU (a no-op for running ones).
    pub fn resume(&self, timeout: Duration) -> Result<(), Error> {
        let mut h = self.lock();
        if self.stop.stopped() {
            return Err(Error::Stopping);
        }
        let r = Self::broadcast(
            &h,
            VcpuEvent::Resume,
            VcpuResponse::Resumed,
            "resume",
            timeout,
        );
        if r.is_ok() {
            h.paused = false;
            log::info!("resumed {} local vCPU(s)", h.vcpus.len());
        }
        r
    }

    /// Stops the VM (every vCPU thread ends, paused or not).
    pub fn stop(&self) {
        self.stop_with(StopReason::Error("stopped on request".into()));
    }

    /// Stops the VM for `reason` (the first reason wins; the other hosts are told).
    pub fn stop_with(&self, reason: StopReason) {
        self.stop.request(reason);
        for v in &self.lock().vcpus {
            let _ = v.send(VcpuEvent::Stop);
        }
    }

    /// Writes a snapshot of the VM to `dir` (which must not exist): pauses it unless it is
    /// paused, has every vCPU save its state on its own thread, saves the interrupt
    /// controllers, devices, kvmclock, guest RAM (with `parent`: only the pages that differ
    /// from that snapshot, which becomes the new one's parent) and disks (see [`snap`]),
    /// commits, then
    /// resumes the VM, or stops it if `stop`. A VM paused before stays paused. On an error no
    /// snapshot is left and the VM goes on as before (also with `stop`).
    pub fn snapshot(
        &self,
        dir: &Path,
        stop: bool,
        parent: Option<&Path>,
    ) -> Result<PathBuf, Error> {
        let mut h = self.lock();
        if self.stop.stopped() {
            return Err(Error::Stopping);
        }
        if self.transport.is_some() {
            return Err(snap::Error::Cluster.into());
        }
        let src = &self.snap;
        let was_paused = h.paused;
        if !was_paused {
            if let Err(e) = Self::broadcast(
                &h,
                VcpuEvent::Pause,
                VcpuResponse::Paused,
                "pause",
                ACK_TIMEOUT,
            ) {
                for v in &h.vcpus {
                    let _ = v.send(VcpuEvent::Resume);
                }
                return Err(e);
            }
            h.paused = true;
        }
        let r = (|| {
            let vcpus = Self::save_vcpus(&h)?;
            Ok::<_, Error>(src.write(dir, vcpus, parent)?)
        })();
        match &r {
            Ok(d) if stop => {
                drop(h);
                log::info!("stopping after the snapshot {}", d.display());
                self.stop_with(StopReason::Snapshotted(d.display().to_string()));
            }
            _ if !was_paused => {
                let resumed = Self::broadcast(
                    &h,
                    VcpuEvent::Resume,
                    VcpuResponse::Resumed,
                    "resume",
                    ACK_TIMEOUT,
                );
                match resumed {
                    Ok(()) => h.paused = false,
                    Err(e) => log::error!("after the snapshot: {e}"),
                }
            }
            _ => {}
        }
        r
    }

    /// Part of a cluster snapshot, on a paused host: waits (up to `timeout`) until this host's
    /// DSM has no transaction in flight, then makes sure every message it sent before has
    /// been handled by its peers (one `Ping` round trip per peer: links deliver in order, and
    /// handlers run in arrival order). The coordinator runs this on every host, twice, so
    /// that messages sent while handling earlier ones (an `IrqPulse` that becomes an IPI) are
    /// in too: then no page, interrupt or forwarded access is in flight anywhere.
    pub fn quiesce(&self, timeout: Duration) -> Result<(), Error> {
        let h = self.lock();
        if self.stop.stopped() {
            return Err(Error::Stopping);
        }
        if !h.paused {
            return Err(Error::NotPaused);
        }
        let deadline = Instant::now() + timeout;
        if let Some(d) = &self.snap.dsm {
            while !d.is_idle() {
                if Instant::now() >= deadline {
                    return Err(Error::Busy(
                        "the distributed memory still has a transaction in flight".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Some(t) = &self.transport {
            for peer in t.peers() {
                let left = deadline.saturating_duration_since(Instant::now());
                let nonce = u64::from(peer.0);
                match t.request(peer, proto::Message::Ping { nonce }, left) {
                    Ok(proto::Message::Pong { nonce: n }) if n == nonce => {}
                    Ok(other) => {
                        return Err(Error::Busy(format!(
                            "host {} answered the flush with {}",
                            peer.0,
                            other.name()
                        )))
                    }
                    Err(e) => return Err(Error::Busy(format!("flush to host {}: {e}", peer.0))),
                }
            }
        }
        Ok(())
    }

    /// Part of a cluster snapshot, on a paused and quiesced host: has every local vCPU save
    /// its state and writes this host's files into `partial` (the snapshot's directory being
    /// written; see [`snap::Source::write_parts`]). Returns what it wrote, for the manifest.
    pub fn save_parts(
        &self,
        partial: &Path,
        parent: Option<&Path>,
    ) -> Result<snap::HostParts, Error> {
        let h = self.lock();
        if self.stop.stopped() {
            return Err(Error::Stopping);
        }
        if !h.paused {
            return Err(Error::NotPaused);
        }
        let vcpus = Self::save_vcpus(&h)?;
        let parent = match parent {
            Some(p) => Some(snapshot::open(p).map_err(snap::Error::from)?),
            None => None,
        };
        Ok(self.snap.write_parts(partial, vcpus, parent.as_ref())?)
    }

    /// The VM's state and each local vCPU's.
    pub fn status(&self) -> VmStatus {
        let h = self.lock();
        VmStatus {
            state: if self.stop.stopped() {
                "stopping"
            } else if h.paused {
                "paused"
            } else {
                "running"
            },
            vcpus: h
                .vcpus
                .iter()
                .map(|v| VcpuStatus {
                    index: v.index,
                    state: v.shared.activity().name(),
                    exits: v.shared.exits(),
                })
                .collect(),
        }
    }
}

/// A started machine on this host. Dropping it without [`Vm::wait`] stops it and waits.
pub struct Vm {
    controller: Arc<Controller>,
    running: Option<Running>,
}

/// Everything [`Vm::wait`] tears down. Field order is drop order: the guest memory holders
/// first, the mappings (`ram`, then `dsm`) after them, the KVM VM last.
struct Running {
    started: Instant,
    threads: Vec<JoinHandle<()>>,
    timers: Vec<JoinHandle<()>>,
    stop: Arc<Stopper>,
    stats: Arc<Stats>,
    fixups: Arc<FixupStats>,
    zap: Option<Arc<ShadowZap>>,
    net: Option<Net>,
    devices: Arc<Devices>,
    mem: GuestMemoryMmap,
    ram: Ram,
    dsm: Option<dsm_vm::DsmMemory>,
    _vm: Arc<VmFd>,
}

/// Builds and runs the VM on this host alone. Returns when it has stopped.
pub fn run(cfg: &VmConfig) -> Result<RunReport, Error> {
    run_on(cfg, None)
}

/// Builds and runs the VM, alone or as host `spec.me` of a cluster (whose transport listens
/// on `listener`). Returns when it has stopped.
pub fn run_on(
    cfg: &VmConfig,
    cluster: Option<(ClusterSpec, TcpListener)>,
) -> Result<RunReport, Error> {
    Ok(Vm::start(cfg, cluster)?.wait())
}

impl Vm {
    /// Builds the VM, alone or as host `spec.me` of a cluster (whose transport listens on
    /// `listener`), and starts its vCPU, timer and service threads.
    pub fn start(cfg: &VmConfig, cluster: Option<(ClusterSpec, TcpListener)>) -> Result<Vm, Error> {
        Self::start_with(cfg, cluster, None)
    }

    /// Builds the VM of the snapshot `r` (loaded and verified by [`snap::load`]) on this host
    /// and starts it where the snapshot was taken: like [`Vm::start`] without loading a kernel,
    /// with guest RAM, vCPUs, interrupt controllers, devices and kvmclock from the snapshot.
    /// The disks are the snapshot's copies, used in place.
    pub fn restore(r: &snap::Restore) -> Result<Vm, Error> {
        Self::start_with(&r.vm_config(), None, Some(r))
    }

    /// Builds host `spec.me`'s part of the VM of the snapshot `r` (loaded by [`snap::load`];
    /// its pages are checked as they are read) and starts it: like [`Vm::start`] without
    /// loading a kernel; the pages homed here are loaded before any other host is granted
    /// one, the local vCPUs, local APICs and the devices homed here get their saved states,
    /// and the guest's clocks go on from the snapshot on the restore's timeline. `cfg` is the
    /// snapshot's machine (see [`snap::Restore::cluster_file`]).
    pub fn restore_cluster(
        cfg: &VmConfig,
        cluster: (ClusterSpec, TcpListener),
        r: &snap::Restore,
    ) -> Result<Vm, Error> {
        let mismatch = |what: &str| {
            Err(Error::Cluster(format!(
                "the cluster file's {what} is not the snapshot's ({})",
                r.dir.display()
            )))
        };
        if cfg.cpus != r.guest.cpus {
            return mismatch("vCPU count");
        }
        if cfg.memory != r.guest.memory {
            return mismatch("memory size");
        }
        if cfg.disks.len() != r.guest.disks.len() {
            return mismatch("disk count");
        }
        Self::start_with(cfg, Some(cluster), Some(r))
    }

    fn start_with(
        cfg: &VmConfig,
        cluster: Option<(ClusterSpec, TcpListener)>,
        restore: Option<&snap::Restore>,
    ) -> Result<Vm, Error> {
        let me = cluster.as_ref().map(|(s, _)| s.me).unwrap_or(0);
        // Where everything lives: the cluster's placement (the same on every host), or all here.
        let placement = match &cluster {
            Some((spec, _)) => spec.placement.clone(),
            None => Placement::initial(
                &[cfg.cpus],
                &cfg.disks.iter().map(|d| d.host).collect::<Vec<_>>(),
                cfg.memory,
                512,
            ),
        };
        match &cluster {
            // A restored guest needs no kernel: only the machine and its disk copies.
            None if restore.is_some() => cfg.validate_machine()?,
            None => cfg.validate()?,
            // A restored host needs no kernel either; its disks are the placement's to check.
            Some(_) if restore.is_some() => cfg.validate_machine()?,
            Some(_) => {}
        }
        if let Some((spec, _)) = &cluster {
            if restore.is_none() {
                cfg.validate_host(me, spec.hosts.len(), usize::from(placement.boot_host))?;
            }
            placement
                .validate(usize::from(cfg.cpus), cfg.disks.len(), cfg.memory)
                .map_err(|e| Error::Cluster(e.to_string()))?;
            if usize::from(placement.hosts) != spec.hosts.len() {
                return Err(Error::Cluster(format!(
                    "the placement has {} hosts, the cluster {}",
                    placement.hosts,
                    spec.hosts.len()
                )));
            }
        }
        let started = Instant::now();
        // The cluster first: a peer that is not there is reported before anything is built.
        let net = match cluster {
            Some((spec, listener)) => Some(build::join_cluster(spec, listener)?),
            None => None,
        };
        let (kvm, vm) = build::create_vm()?;
        // A restored cluster's guest time goes on from the snapshot on the cluster's timeline:
        // saved kvmclock and TSC plus the time since the restore's epoch (0 for one host).
        let since_epoch_ns = net
            .as_ref()
            .map_or(0, |n| timesync::now_ns().saturating_sub(n.spec.epoch_ns));
        if let Some(r) = restore {
            vm.set_clock(&kvm_bindings::kvm_clock_data {
                clock: r.clock.clock.saturating_add(since_epoch_ns),
                ..Default::default()
            })
            .map_err(|e| snap::Error::Kvm("SET_CLOCK", e))?;
        }

        // `dsm` outlives everything that holds a view of its memory (see `Running`).
        let mut dsm: Option<dsm_vm::DsmMemory> = None;
        let ram = match &net {
            None => memory::local_ram(cfg.memory)?,
            Some(n) => {
                let (d, ram) = memory::dsm_ram(n, cfg.memory, &placement, restore.is_some())?;
                dsm = Some(d);
                ram
            }
        };
        let mem = ram.mem.clone();
        // SAFETY: `ram` and `dsm` move into `Running` and are dropped only after every vCPU
        // thread has been joined (or leaked when one cannot be); on an error return below no
        // vCPU thread has been started yet.
        let kvm_slots = unsafe { memory::register(&vm, &ram) }?;
        if let (Some(n), None) = (&net, restore) {
            timesync::set_clock(&vm, n.spec.epoch_ns);
        }

        // The boot host (host 0 by default) loads the guest and runs vCPU 0; the other hosts'
        // vCPUs wait for INIT/SIPI and see it through the DSM.
        // The stopper, once it exists (a lazy restore's page errors stop the VM).
        let stop_slot: Arc<std::sync::OnceLock<Arc<Stopper>>> = Arc::default();
        let mut streamer = None;
        let kernel_entry = if let Some(r) = restore {
            let t = Instant::now();
            let pages = match &dsm {
                // Lazy: pages come from the snapshot on first touch, the rest streams behind.
                Some(d) if r.lazy => {
                    let (s1, s2) = (stop_slot.clone(), stop_slot.clone());
                    let on_error = Arc::new(move |e: String| {
                        log::error!("lazy restore: {e}");
                        if let Some(s) = s1.get() {
                            s.request(StopReason::Error(format!("lazy restore: {e}")));
                        }
                    });
                    let stopped = Arc::new(move || s2.get().is_some_and(|s| s.stopped()));
                    streamer = Some(r.lazy_home(d, on_error, stopped)?);
                    0
                }
                // This host's home pages; the other hosts' requests for them wait until now.
                Some(d) => {
                    let pages = r.fill_home(d)?;
                    d.finish_loading();
                    pages
                }
                None => r.fill_memory(&mem)?,
            };
            log::info!(
                "restored {pages} data pages of guest RAM from {} in {:.2} s",
                r.dir.display(),
                t.elapsed().as_secs_f64()
            );
            None
        } else if me == usize::from(placement.boot_host) {
            Some(build::load_guest(cfg, &mem)?)
        } else {
            None
        };

        let cpu_host = placement.cpu_hosts();
        let local: Vec<bool> = cpu_host.iter().map(|h| *h == me).collect();
        let ioapic_local = me == usize::from(placement.ioapic_home);
        let chip = Arc::new(IrqChip::with_local(cfg.cpus, local, ioapic_local));
        let stop = Arc::new(Stopper::new(chip.local_lapics()));
        let _ = stop_slot.set(stop.clone());
        let stats = Arc::new(Stats::default());
        let fixups = Arc::new(FixupStats::default());
        let serial_line = IrqLine::new(chip.clone(), SERIAL_IRQ);
        let console_local = me == usize::from(placement.console_home);
        let console = match restore {
            Some(r) if console_local => {
                <serial::Console as snapshot::Persist>::restore(serial_line, &r.serial)
                    .map_err(|e| restore_err("the serial port")(Box::new(e)))?
            }
            _ => serial::Console::new(serial_line),
        };
        if let (Some(r), true) = (restore, ioapic_local) {
            *chip.ioapic() = <irqchip::Ioapic as snapshot::Persist>::restore((), &r.ioapic)
                .map_err(|e| restore_err("the IOAPIC")(Box::new(e)))?;
        }
        // Each disk is opened and emulated on its home host only; the other hosts forward.
        let disk_home = placement.disk_homes();
        let mut virtio = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            virtio.push(if disk_home.get(i) == Some(&me) {
                let line = IrqLine::new(chip.clone(), VIRTIO_IRQS[i]);
                Some(match restore.and_then(|r| r.virtio.get(i)) {
                    Some(st) => build::restore_disk(&d.path, st, &mem, line)?,
                    None => build::open_disk(&d.path, d.read_only, &mem, line)?,
                })
            } else {
                None
            });
        }
        let mut devices = Devices::new(console, virtio, chip.clone(), stop.clone());
        if let (Some(r), true) = (restore, console_local) {
            let legacy = <crate::devices::legacy::Legacy as snapshot::Persist>::restore(
                stop.clone(),
                &r.legacy,
            )
            .map_err(|e| restore_err("the legacy ports")(Box::new(e)))?;
            devices.set_legacy(legacy);
        }
        let zap = match &dsm {
            Some(d) if std::env::var_os("SSI_VMM_NO_SHADOW_ZAP").is_none() => {
                let z = Arc::new(ShadowZap::new(
                    vm.clone(),
                    kvm_slots.clone(),
                    chip.local_lapics(),
                ));
                let z2 = z.clone();
                d.set_discard_hook(Box::new(move |gpa, page| {
                    z2.on_changed_behind_kvm(gpa, page)
                }));
                Some(z)
            }
            _ => None,
        };
        if let Some(d) = &dsm {
            // Hosts leave once the VM stops: a peer going away then is no failure.
            let s = stop.clone();
            d.set_stopping_probe(Box::new(move || s.stopped()));
        }
        let mut io_server = None::<std::sync::mpsc::Receiver<fabric::IoWork>>;
        let mut io_counters = None;
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        if let Some(n) = &net {
            let fabric = Arc::new(Fabric::new(n.transport.clone(), me, &placement));
            chip.set_remote(fabric.clone());
            let f2 = fabric.clone();
            stop.set_hook(Box::new(move |r| {
                f2.broadcast(&proto::Message::Stop {
                    reason: fabric::stop_to_wire(r),
                })
            }));
            let (tx, rx) = std::sync::mpsc::sync_channel(fabric::IO_QUEUE);
            io_counters = Some(fabric.io_counters());
            fabric::register(
                &n.transport,
                chip.clone(),
                stop.clone(),
                tx,
                fabric.io_counters(),
                status.clone(),
            );
            devices = devices.clustered(fabric, me, &placement);
            // Every host serves the forwarded accesses to the devices it is home of.
            io_server = Some(rx);
        }
        let devices = Arc::new(devices);
        if let Some(rx) = io_server {
            let (d, s) = (devices.clone(), stop.clone());
            std::thread::Builder::new()
                .name("io-server".into())
                .spawn(move || fabric::io_server(rx, d, s))
                .map_err(Error::Thread)?;
        }
        if let (Some(n), Some(d), Some(io)) = (&net, &dsm, io_counters) {
            let reporter =
                status::Reporter::new(n.spec.clone(), d.stats_source(), io, status.clone());
            let (t, s) = (n.transport.clone(), stop.clone());
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || reporter.run(t, s))
                .map_err(Error::Thread)?;
        }

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::KvmIoctl("GET_SUPPORTED_CPUID", e))?;
        let limits = match restore {
            Some(_) => Some(
                vcpu::state::RestoreLimits::from_kvm(&kvm)
                    .map_err(|e| restore_err("the vCPUs")(Box::new(e)))?,
            ),
            None => None,
        };
        let mut vcpus = Vec::new();
        let mut handles = Vec::new();
        for i in 0..cfg.cpus {
            if !chip.is_local(usize::from(i)) {
                continue;
            }
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| Error::KvmIoctl("CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            cpu::patch_cpuid(&mut cpuid, i, cfg.cpus);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| Error::KvmIoctl("SET_CPUID2", e))?;
            cpu::setup_fpu_msrs(&fd, i == 0)?;
            if let (0, Some(entry)) = (i, kernel_entry) {
                cpu::setup_boot_cpu(&fd, entry)?;
            }
            if let Some(n) = &net {
                timesync::set_tsc(&fd, n.spec.epoch_ns);
            }
            let mut tsc_khz = u64::from(fd.get_tsc_khz().unwrap_or(1_000_000));
            let lapic = chip.lapics[usize::from(i)].clone();
            let mut halted = false;
            if let (Some(r), Some(limits)) = (restore, &limits) {
                let ix = usize::from(i);
                let (saved, lstate) = (&r.vcpus[ix], &r.lapics[ix]);
                // Every vCPU starts from one guest TSC (see `Restore::tsc_base`), moved on by
                // the time since the restore's epoch.
                let mut kvm_state = saved.kvm.clone();
                let tsc = r.tsc_base().saturating_add(
                    (u128::from(since_epoch_ns) * u128::from(saved.tsc_khz) / 1_000_000) as u64,
                );
                for m in kvm_state.msrs.iter_mut().filter(|m| m.index == 0x10) {
                    m.value = tsc;
                }
                vcpu::state::restore(&fd, &kvm_state, limits)
                    .map_err(|e| restore_err(format!("vCPU {i}"))(Box::new(e)))?;
                if saved.tsc_khz != tsc_khz {
                    log::warn!(
                        "vCPU {i}: guest TSC runs at {tsc_khz} kHz here, {} kHz when saved: \
                         APIC timer deadlines use the saved rate",
                        saved.tsc_khz
                    );
                    tsc_khz = saved.tsc_khz;
                }
                let tsc = vcpu::quirks::guest_tsc(&fd)
                    .map_err(|e| restore_err(format!("vCPU {i} (guest TSC)"))(Box::new(e)))?;
                let args = irqchip::LapicArgs {
                    id: i,
                    bsp: i == 0,
                    clock: irqchip::GuestClock::new(tsc, tsc_khz, Instant::now()),
                };
                *lapic.lock() = irqchip::lapic::Apic::restore(args, lstate)
                    .map_err(|e| restore_err(format!("the local APIC of vCPU {i}"))(Box::new(e)))?;
                halted = saved.halted;
            }
            let (handle, control) = vcpu_control::channel(usize::from(i), lapic.clone());
            handles.push(handle);
            vcpus.push(Vcpu {
                index: usize::from(i),
                fd,
                lapic,
                chip: chip.clone(),
                devices: devices.clone(),
                mem: mem.clone(),
                stop: stop.clone(),
                stats: stats.clone(),
                fixups: fixups.clone(),
                tsc_khz,
                zap: zap.clone(),
                control,
                halted,
            });
        }
        vcpu::install_kick_handler().map_err(Error::Thread)?;

        let mut timers: Vec<JoinHandle<()>> = streamer.into_iter().collect();
        for l in &chip.local_lapics() {
            let (l, s) = (l.clone(), stop.clone());
            timers.push(
                std::thread::Builder::new()
                    .name(format!("apic-timer-{}", l.id))
                    .spawn(move || vcpu::timer_thread(l, s))
                    .map_err(Error::Thread)?,
            );
        }
        let mut threads = Vec::new();
        for v in vcpus {
            let name = format!("vcpu-{}", v.index);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || v.run())
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.request(StopReason::Error(format!("cannot spawn vCPU thread: {e}")));
                    break;
                }
            }
        }
        if let Some(r) = restore {
            log::info!(
                "restore: guest running {:.0} ms after this host began building it ({})",
                started.elapsed().as_secs_f64() * 1000.0,
                if r.lazy { "lazy" } else { "eager" }
            );
        }
        // The console home (host 0 by default) feeds stdin to the serial port.
        if me == usize::from(placement.console_home) {
            let d = devices.clone();
            // Detached: it blocks in read(2) on stdin and dies with the process.
            let _ = std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || serial::stdin_pump(d));
        }
        let controller = Arc::new(Controller {
            handles: Mutex::new(Handles {
                vcpus: handles,
                paused: false,
            }),
            stop: stop.clone(),
            snap: snap::Source {
                chip: chip.clone(),
                devices: devices.clone(),
                mem: mem.clone(),
                vm: vm.clone(),
                cfg: cfg.clone(),
                placement: placement.clone(),
                me,
                dsm: dsm.as_ref().map(|d| d.handle()),
            },
            transport: net.as_ref().map(|n| n.transport.clone()),
        });
        Ok(Vm {
            controller,
            running: Some(Running {
                started,
                threads,
                timers,
                stop,
                stats,
                fixups,
                zap,
                net,
                devices,
                mem,
                ram,
                dsm,
                _vm: vm,
            }),
        })
    }

    /// The controller of this VM's local vCPUs (for the control socket).
    pub fn controller(&self) -> Arc<Controller> {
        self.controller.clone()
    }

    /// Pauses every local vCPU (see [`Controller::pause`]), waiting at most [`ACK_TIMEOUT`].
    pub fn pause(&self) -> Result<(), Error> {
        self.controller.pause(ACK_TIMEOUT)
    }

    /// Resumes every local vCPU.
    pub fn resume(&self) -> Result<(), Error> {
        self.controller.resume(ACK_TIMEOUT)
    }

    /// Stops the VM; [`Vm::wait`] then returns.
    pub fn stop(&self) {
        self.controller.stop();
    }

    /// Waits until the VM has stopped, tears it down and reports.
    pub fn wait(mut self) -> RunReport {
        match self.running.take() {
            Some(r) => r.wait(),
            // Unreachable: `running` is only taken here, and `wait` consumes the VM.
            None => RunReport {
                stop: "not running".into(),
                exit_code: 1,
                wall_seconds: 0.0,
                exits: BTreeMap::new(),
                interrupts_injected: 0,
                fixups: BTreeMap::new(),
                dsm_protocol_errors: 0,
                dsm_send_errors: 0,
            },
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            self.controller.stop();
            let _ = r.wait();
        }
    }
}

impl Running {
    fn wait(self) -> RunReport {
        let Running {
            started,
            threads,
            timers,
            stop,
            stats,
            fixups,
            zap,
            net,
            devices,
            mem,
            ram,
            mut dsm,
            _vm,
        } = self;
        let stuck = join_all(threads, &stop);
        stop.request(StopReason::Error("all vCPUs stopped".into()));
        for t in timers {
            let _ = t.join();
        }
        if let Some(n) = &net {
            // Let the Stop message reach the other hosts before the connections close.
            std::thread::sleep(Duration::from_millis(300));
            n.shutdown();
        }
        let dsm_stats = dsm.as_ref().map(|d| d.stats_source().snapshot());
        if stuck {
            // A vCPU is blocked on a page that nobody will send: its thread still uses guest
            // RAM, so the mapping must outlive this function. The process exits right after.
            log::warn!("a vCPU thread did not stop (waiting on a lost page); leaving it behind");
            std::mem::forget(devices);
            std::mem::forget(mem);
            std::mem::forget(ram);
            if let Some(d) = dsm.take() {
                std::mem::forget(d);
            }
        } else {
            drop(devices);
            drop(mem);
            drop(ram);
            drop(dsm.take());
        }
        if let Some(z) = &zap {
            log::info!(
                "shadow page tables dropped {} time(s), deferred {} time(s)",
                z.zaps(),
                z.deferred()
            );
        }
        let reason = stop
            .reason()
            .unwrap_or(StopReason::Error("no stop reason".into()));
        RunReport {
            exit_code: reason.exit_code(),
            stop: format!("{reason:?}"),
            wall_seconds: started.elapsed().as_secs_f64(),
            exits: stats.exits().into_iter().collect(),
            interrupts_injected: stats.injected.load(std::sync::atomic::Ordering::Relaxed),
            fixups: fixups.counts(),
            dsm_protocol_errors: dsm_stats.as_ref().map_or(0, |s| s.protocol_errors),
            dsm_send_errors: dsm_stats.as_ref().map_or(0, |s| s.send_errors),
        }
    }
}

/// How long vCPU threads get to finish once the machine is stopping.
const JOIN_GRACE: Duration = Duration::from_secs(5);

/// Joins vCPU threads; once a stop was requested, waits at most [`JOIN_GRACE`]. Returns true
/// if some thread is still running (blocked on guest memory).
fn join_all(mut threads: Vec<JoinHandle<()>>, stop: &Stopper) -> bool {
    let mut stopped_at: Option<Instant> = None;
    while !threads.is_empty() {
        let (done, running): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
        for t in done {
            if t.join().is_err() {
                stop.request(StopReason::Error("a vCPU thread panicked".into()));
            }
        }
        threads = running;
        if stop.stopped() {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if at.elapsed() > JOIN_GRACE && !threads.is_empty() {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
