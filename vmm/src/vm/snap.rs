//! Snapshots of a VM, on one host (`ssi-vmm run`) or spread over a cluster: what each host
//! writes ([`Source::write_parts`]), how the parts become one snapshot ([`assemble`]), and what
//! a restore reads back ([`load`], [`Restore`]). The on-disk format is the `snapshot` crate's;
//! the cluster's pause protocol is `crate::cluster::snapshot`'s.
//!
//! # What a snapshot holds
//!
//! - `manifest.json`: `guest` = [`GuestConfig`] (memory size, vCPUs, command line, kernel and
//!   initrd paths as booted, disks), `placement` = the [`Placement`] the VM ran with;
//! - `memory-h<i>.mem` / `.idx` for every host `i`: the pages that host held the valid copy of
//!   (all of guest RAM for one host; zero pages are only indexed). Every data page is in
//!   exactly one host's file;
//! - state files (component names in [`component`]): per host, its vCPUs ([`SavedVcpu`]: KVM
//!   state, halted flag, TSC rate) and their local APICs (`state-h<i>-vcpus`,
//!   `state-h<i>-lapics`, same order); from their homes, the IOAPIC, the serial port, the
//!   legacy ports, each disk's virtio-mmio transport with its device's state
//!   (`state-virtio-<d>`), and the boot host's kvmclock;
//! - `disk-<d>.img`: a copy of each disk image as it was at the pause, made by the disk's home
//!   with a reflink (`FICLONE`) where the file system can, else as a sparse copy. The copies
//!   are not covered by the snapshot's checksums (only their size is recorded), and a restore
//!   runs the guest on the copy **in place**: the snapshot's disk then moves on with the
//!   restored guest, so a snapshot is meant to be restored once (copy the directory to restore
//!   it again).
//!
//! # Order
//!
//! Saving: pause (every vCPU out of `KVM_RUN`; on a cluster, every host's, then quiesced),
//! each vCPU thread saves its own KVM state (`VcpuEvent::Save`: completes the last exit, then
//! `vcpu::state::save`), then the host's parts are written while the vCPUs stay paused; then
//! the manifest is written and the directory committed, and only then the VM is resumed or
//! stopped.
//!
//! Restoring: [`load`] opens and checks the snapshot and reads every state before anything is
//! built; the VM is then built as `run` or `up` builds it, minus the kernel loading, on any
//! number of hosts with a new placement: RAM is filled from the memory files (on a cluster,
//! each host loads the pages whose new home it is before serving them), each vCPU gets the
//! CPUID `run` gives it and then its saved state, the local APIC timers are put on the restored
//! guest TSC, and the devices are rebuilt from their states on their new homes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use irqchip::{IoapicState, IrqChip, LapicState};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use snapshot::{
    GpaRange, Manifest, MemoryFileRef, PageSource, Persist, Snapshot, SnapshotBuilder,
    StateFileRef, PAGE_SIZE,
};
use virtio_mmio::MmioTransportState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cluster::spec::{ClusterFile, DiskEntry, HostEntry};
use crate::cluster::Placement;
use crate::config::{self, VmConfig};
use crate::devices::legacy::LegacyState;
use crate::devices::serial::ConsoleState;
use crate::devices::Devices;
use crate::layout::ram_regions;
pub use crate::vcpu::control::SavedVcpu;

/// Component names of the state files.
pub mod component {
    /// `Vec<SavedVcpu>`, in vCPU order.
    pub const VCPUS: &str = "vcpus";
    /// `Vec<irqchip::LapicState>`, in vCPU order.
    pub const LAPICS: &str = "lapics";
    /// `irqchip::IoapicState`.
    pub const IOAPIC: &str = "ioapic";
    /// `ConsoleState`.
    pub const SERIAL: &str = "serial";
    /// `LegacyState`.
    pub const LEGACY: &str = "legacy";
    /// `MmioTransportState` of disk `i`: component `virtio-<i>` ([`super::virtio_component`]).
    pub const VIRTIO: &str = "virtio";
    /// `ClockState`.
    pub const KVMCLOCK: &str = "kvmclock";
}

/// Name of the memory file written by host 0.
pub const MEMORY_FILE: &str = "memory-h0";

/// The guest configuration in a snapshot's manifest (`guest`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    /// The kernel it booted (not needed to restore).
    pub kernel: PathBuf,
    /// The initrd it booted (not needed to restore).
    pub initrd: Option<PathBuf>,
    /// The disks, in virtio-mmio slot order.
    pub disks: Vec<SavedDisk>,
}

/// One disk of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedDisk {
    /// The copy's file name in the snapshot directory.
    pub file: String,
    /// The image the VM ran on.
    pub source: PathBuf,
    /// Exposed read-only.
    pub read_only: bool,
    /// Size of the image in bytes.
    pub size: u64,
    /// How the copy was made: "reflink" or "sparse copy".
    pub copied_by: String,
}

/// The VM's kvmclock (`KVM_GET_CLOCK`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClockState {
    /// Nanoseconds of kvmclock time.
    pub clock: u64,
    /// `kvm_clock_data.flags` as read (informational).
    pub flags: u32,
}

/// Why a snapshot cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host of a cluster is snapshotted with the others, by `ssi-vmm snapshot` (which
    /// pauses, quiesces and saves every host), never alone.
    #[error("this is one host of a cluster: snapshot the whole cluster with `ssi-vmm snapshot NAME DIR`")]
    Cluster,
    /// The snapshot files.
    #[error(transparent)]
    Format(#[from] snapshot::Error),
    /// A vCPU could not save its state.
    #[error("{0}")]
    Vcpu(String),
    /// A vCPU did not hand over a state.
    #[error("vCPU {0} saved no state")]
    NoVcpuState(usize),
    /// `KVM_GET_CLOCK` / `KVM_SET_CLOCK`.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A disk image could not be copied.
    #[error("cannot copy disk {src} to {dst}: {source}")]
    DiskCopy {
        /// The image.
        src: PathBuf,
        /// The copy.
        dst: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory at {gpa:#x}: {source}")]
    Memory {
        /// Where.
        gpa: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The manifest's guest configuration or placement is unusable.
    #[error("{path}: {what}: {detail}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Which part.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A state file the restore needs is not listed.
    #[error("{path}: no state file for component {component:?}{}", .host.map(|h| format!(" of host {h}")).unwrap_or_default())]
    MissingState {
        /// The manifest.
        path: PathBuf,
        /// The component.
        component: String,
        /// The host it belongs to (per-host states).
        host: Option<u32>,
    },
    /// The states disagree with the guest configuration.
    #[error("{path}: {detail}")]
    Inconsistent {
        /// The state file.
        path: PathBuf,
        /// What disagrees.
        detail: String,
    },
}

/// What one host wrote into the partial directory of a snapshot (plain serde data: a cluster
/// host answers the coordinator's `save` request with it; [`assemble`] turns every host's
/// parts into the manifest).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostParts {
    /// The host that wrote them.
    pub host: usize,
    /// Its memory file (the pages it held the valid copy of).
    pub memory: Option<MemoryFileRef>,
    /// Its state files.
    pub states: Vec<StateFileRef>,
    /// The disks it is home of and copied: (disk index, copy).
    pub disks: Vec<(usize, SavedDisk)>,
    /// The guest configuration (disks left empty: [`assemble`] fills them in).
    pub guest: GuestConfig,
    /// The placement the VM ran with.
    pub placement: Placement,
}

/// The manifest of a snapshot from every host's parts: each host of the placement exactly
/// once, each disk copied exactly once.
pub fn assemble(
    parts: &[HostParts],
    parent: Option<snapshot::ParentRef>,
) -> Result<Manifest, Error> {
    let bad = |detail: String| Error::Manifest {
        path: PathBuf::from(snapshot::MANIFEST_FILE),
        what: "assembling",
        detail,
    };
    let first = parts
        .first()
        .ok_or_else(|| bad("no host wrote anything".into()))?;
    let hosts = usize::from(first.placement.hosts);
    let mut seen = vec![false; hosts];
    for p in parts {
        if p.placement != first.placement || p.guest != first.guest {
            return Err(bad(format!("host {} ran another machine", p.host)));
        }
        match seen.get_mut(p.host) {
            Some(s) if !*s => *s = true,
            _ => return Err(bad(format!("host {} is unknown or answered twice", p.host))),
        }
    }
    if let Some(h) = seen.iter().position(|s| !s) {
        return Err(bad(format!("host {h} wrote nothing")));
    }
    let ndisks = first.placement.disk_home.len();
    let mut disks: Vec<Option<SavedDisk>> = vec![None; ndisks];
    for (i, d) in parts.iter().flat_map(|p| p.disks.iter()) {
        match disks.get_mut(*i) {
            Some(slot) if slot.is_none() => *slot = Some(d.clone()),
            _ => return Err(bad(format!("disk {i} is unknown or copied twice"))),
        }
    }
    let mut guest = first.guest.clone();
    guest.disks = disks
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.ok_or_else(|| bad(format!("disk {i} was not copied"))))
        .collect::<Result<_, _>>()?;
    let mut manifest = Manifest::new(to_value(&guest)?, to_value(&first.placement)?);
    manifest.parent = parent;
    for p in parts {
        manifest.memory_files.extend(p.memory.clone());
        manifest.state_files.extend(p.states.iter().cloned());
    }
    Ok(manifest)
}

/// Component name of disk `i`'s virtio-mmio transport state.
pub fn virtio_component(i: usize) -> String {
    format!("{}-{i}", component::VIRTIO)
}

/// What a host of a VM needs to write its part of a snapshot.
pub struct Source {
    pub(super) chip: Arc<IrqChip>,
    pub(super) devices: Arc<Devices>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) vm: Arc<VmFd>,
    pub(super) cfg: VmConfig,
    pub(super) placement: Placement,
    /// This host.
    pub(super) me: usize,
    /// The cluster's memory (None: all of guest RAM is here).
    pub(super) dsm: Option<dsm_vm::DsmHandle>,
}

impl Source {
    /// Writes the snapshot of a paused single-host VM whose vCPUs saved `vcpus` into `dir`;
    /// returns the committed directory. On an error nothing is left behind (the builder
    /// removes its temporary directory).
    pub(super) fn write(
        &self,
        dir: &Path,
        vcpus: Vec<SavedVcpu>,
        parent: Option<&Path>,
    ) -> Result<PathBuf, Error> {
        let started = std::time::Instant::now();
        let b = SnapshotBuilder::create(dir)?;
        let (chain, pref) = match parent {
            Some(p) => (
                Some(snapshot::open(p)?),
                Some(snapshot::ParentRef::new(dir, p)?),
            ),
            None => (None, None),
        };
        let parts = self.write_parts(b.partial_dir(), vcpus, chain.as_ref())?;
        let out = b.commit(&assemble(&[parts], pref)?)?;
        log::info!(
            "snapshot {} written in {:.1} s",
            out.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }

    /// Writes this host's files into `tmp` (a snapshot's partial directory) while the VM is
    /// paused everywhere: its vCPUs (`vcpus`, saved by their threads) and local APICs, the
    /// devices it is home of (IOAPIC; serial and legacy ports at the console home; each
    /// disk's transport and a copy of the disk at the disk's home), the kvmclock (boot host),
    /// and the guest RAM it holds the valid copy of (all of it without a cluster).
    pub(super) fn write_parts(
        &self,
        tmp: &Path,
        vcpus: Vec<SavedVcpu>,
        parent: Option<&Snapshot>,
    ) -> Result<HostParts, Error> {
        let started = std::time::Instant::now();
        let me = self.me;
        let h = Some(me as u32);
        if let Some(chain) = parent {
            let theirs: Result<GuestConfig, _> =
                serde_json::from_value(chain.top().manifest().guest.clone());
            if !theirs.is_ok_and(|g| g.memory == self.cfg.memory && g.cpus == self.cfg.cpus) {
                return Err(Error::Inconsistent {
                    path: chain.top().dir().to_path_buf(),
                    detail: "the parent is a snapshot of another machine".into(),
                });
            }
        }
        let mut states = Vec::new();
        let lapics: Vec<LapicState> = vcpus
            .iter()
            .map(|v| {
                self.chip
                    .lapics
                    .get(v.index)
                    .map(|l| l.save())
                    .ok_or(Error::NoVcpuState(v.index))
            })
            .collect::<Result<_, _>>()?;
        states.push(snapshot::write_state_file(
            tmp,
            &format!("state-h{me}-vcpus"),
            h,
            component::VCPUS,
            &vcpus,
        )?);
        states.push(snapshot::write_state_file(
            tmp,
            &format!("state-h{me}-lapics"),
            h,
            component::LAPICS,
            &lapics,
        )?);
        if me == usize::from(self.placement.ioapic_home) {
            let ioapic: IoapicState = self.chip.ioapic().save();
            states.push(snapshot::write_state_file(
                tmp,
                "state-ioapic",
                None,
                component::IOAPIC,
                &ioapic,
            )?);
        }
        if me == usize::from(self.placement.console_home) {
            let serial: ConsoleState = self
                .devices
                .serial()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save();
            states.push(snapshot::write_state_file(
                tmp,
                "state-serial",
                None,
                component::SERIAL,
                &serial,
            )?);
            let legacy: LegacyState = self.devices.legacy().save();
            states.push(snapshot::write_state_file(
                tmp,
                "state-legacy",
                None,
                component::LEGACY,
                &legacy,
            )?);
        }
        if me == usize::from(self.placement.boot_host) {
            let clock = self
                .vm
                .get_clock()
                .map_err(|e| Error::Kvm("GET_CLOCK", e))?;
            let clock = ClockState {
                clock: clock.clock,
                flags: clock.flags,
            };
            states.push(snapshot::write_state_file(
                tmp,
                "state-kvmclock",
                None,
                component::KVMCLOCK,
                &clock,
            )?);
        }
        let mut disks = Vec::new();
        for (i, t) in self.devices.virtio().iter().enumerate() {
            let Some(t) = t else { continue };
            let Some(d) = self.cfg.disks.get(i) else {
                continue;
            };
            let st: MmioTransportState = t.lock().unwrap_or_else(|p| p.into_inner()).save();
            states.push(snapshot::write_state_file(
                tmp,
                &format!("state-virtio-{i}"),
                None,
                &virtio_component(i),
                &st,
            )?);
            let file = format!("disk-{i}.img");
            let dst = tmp.join(&file);
            let (size, how) = copy_disk(&d.path, &dst).map_err(|source| Error::DiskCopy {
                src: d.path.clone(),
                dst: dst.clone(),
                source,
            })?;
            disks.push((
                i,
                SavedDisk {
                    file,
                    source: d.path.clone(),
                    read_only: d.read_only,
                    size,
                    copied_by: how.into(),
                },
            ));
        }

        // Guest RAM: all of it here, or the pages this host holds the valid copy of.
        let ranges: Vec<GpaRange> = ram_regions(self.cfg.memory)
            .into_iter()
            .map(|(start, len)| GpaRange { start, len })
            .collect();
        let w = snapshot::MemoryFileWriter::create(tmp, &format!("memory-h{me}"), &ranges)?;
        let runs: Vec<(u64, u64)> = match &self.dsm {
            None => ranges.iter().map(|r| (r.start, r.len)).collect(),
            Some(d) => page_runs(&d.snapshot_pages()),
        };
        let mut buf = vec![0u8; CHUNK];
        let mut bytes = 0u64;
        for (start, len) in runs {
            let mut gpa = start;
            while gpa < start + len {
                let n = (start + len - gpa).min(CHUNK as u64) as usize;
                self.mem
                    .read_slice(&mut buf[..n], GuestAddress(gpa))
                    .map_err(|source| Error::Memory { gpa, source })?;
                match parent {
                    None => w.write_pages(gpa, &buf[..n])?,
                    // Incremental: only the pages whose contents differ from the chain's.
                    Some(chain) => {
                        for (i, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
                            let at = gpa + (i * PAGE_SIZE) as u64;
                            let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(page) else {
                                continue;
                            };
                            let now = (!snapshot::checksum::is_zero_page(page))
                                .then(|| snapshot::checksum::page_hash(page));
                            if now != chain.recorded(at).unwrap_or(None) {
                                w.write_page(at, page)?;
                            }
                        }
                    }
                }
                gpa += n as u64;
                bytes += n as u64;
            }
        }
        let memory = w.finish()?;
        log::info!(
            "host {me}: snapshot part written in {:.2} s ({} MiB of guest RAM looked at, {} data pages)",
            started.elapsed().as_secs_f64(),
            bytes >> 20,
            memory.pages_data
        );
        Ok(HostParts {
            host: me,
            memory: Some(memory),
            states,
            disks,
            guest: GuestConfig {
                memory: self.cfg.memory,
                cpus: self.cfg.cpus,
                cmdline: self.cfg.cmdline.clone(),
                kernel: self.cfg.kernel.clone(),
                initrd: self.cfg.initrd.clone(),
                disks: Vec::new(),
            },
            placement: self.placement.clone(),
        })
    }
}

/// Sorted page addresses as runs of consecutive pages: (start, length in bytes).
fn page_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &gpa in pages {
        match runs.last_mut() {
            Some((s, l)) if *s + *l == gpa => *l += PAGE_SIZE as u64,
            _ => runs.push((gpa, PAGE_SIZE as u64)),
        }
    }
    runs
}

fn to_value<T: Serialize>(v: &T) -> Result<serde_json::Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::Manifest {
        path: PathBuf::from(snapshot::MANIFEST_FILE),
        what: "cannot encode",
        detail: e.to_string(),
    })
}

/// Bytes of guest RAM read and written at once.
const CHUNK: usize = 1 << 20;

/// `FICLONE` (`_IOW(0x94, 9, int)`): make `dst` share `src`'s extents (btrfs, XFS, ...).
const FICLONE: u64 = 0x4004_9409;

/// Copies the image `src` to the new file `dst`: a reflink if the file system can, else a
/// sparse copy (only the data extents are copied; holes stay holes). Fsyncs the copy. Returns
/// its size and how it was made.
pub fn copy_disk(src: &Path, dst: &Path) -> io::Result<(u64, &'static str)> {
    let from = File::open(src)?;
    let size = from.metadata()?.len();
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    let r = (|| {
        // SAFETY: FICLONE takes the source descriptor as its argument and reads no memory of
        // ours; both descriptors are open files owned by this function.
        let ret = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) };
        let how = if ret == 0 {
            "reflink"
        } else {
            sparse_copy(&from, &to, size)?;
            "sparse copy"
        };
        to.sync_all()?;
        Ok((size, how))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

/// Copies the data extents of `from` (found with `SEEK_DATA` / `SEEK_HOLE`) to `to` and sets
/// its size to `size`.
fn sparse_copy(from: &File, to: &File, size: u64) -> io::Result<()> {
    to.set_len(size)?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos: u64 = 0;
    while pos < size {
        let Some(data) = seek(from, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(from, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(CHUNK as u64) as usize;
            from.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|b| *b != 0) {
                to.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// `lseek(fd, pos, whence)`; None for ENXIO (no data / hole after `pos`).
fn seek(f: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// A snapshot opened, verified and read, ready to be built into a VM ([`super::Vm::restore`]).
pub struct Restore {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The opened snapshot (memory is read from it).
    pub snap: Snapshot,
    /// The guest's configuration.
    pub guest: GuestConfig,
    /// The placement the VM ran with when it was snapshotted.
    pub placement: Placement,
    /// vCPU states, in vCPU order.
    pub vcpus: Vec<SavedVcpu>,
    /// Local APIC states, in vCPU order.
    pub lapics: Vec<LapicState>,
    /// IOAPIC.
    pub ioapic: IoapicState,
    /// Serial port.
    pub serial: ConsoleState,
    /// Legacy ports.
    pub legacy: LegacyState,
    /// One transport per disk.
    pub virtio: Vec<MmioTransportState>,
    /// kvmclock.
    pub clock: ClockState,
    /// Start the vCPUs before guest RAM is loaded: pages come from the snapshot when first
    /// touched, the rest streams in behind (cluster restores; set by the caller).
    pub lazy: bool,
}

impl Restore {
    /// The machine configuration of the restored VM (disks: the snapshot's copies).
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.guest.kernel.clone(),
            initrd: self.guest.initrd.clone(),
            cmdline: self.guest.cmdline.clone(),
            memory: self.guest.memory,
            cpus: self.guest.cpus,
            disks: self
                .guest
                .disks
                .iter()
                .map(|d| config::DiskConfig {
                    path: self.dir.join(&d.file),
                    read_only: d.read_only,
                    host: 0,
                })
                .collect(),
            stats_json: None,
        }
    }

    /// Fills guest RAM (fresh, zero) with every data page of the snapshot, with a progress
    /// bar on stderr (drawn only on a terminal: bytes, rate, ETA).
    pub(super) fn fill_memory(&self, mem: &GuestMemoryMmap) -> Result<u64, Error> {
        let total: u64 = self
            .snap
            .layers()
            .iter()
            .flat_map(|l| l.manifest().memory_files.iter())
            .map(|f| f.pages_data * PAGE_SIZE as u64)
            .sum();
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "restoring guest RAM [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        let r = self.for_each_data_page(
            |_| true,
            |gpa, page| {
                pb.inc(PAGE_SIZE as u64);
                mem.write_slice(page, GuestAddress(gpa))
                    .map_err(|source| Error::Memory { gpa, source })
            },
        );
        pb.finish_and_clear();
        r
    }

    /// Loads every data page homed on this host into the cluster memory `dsm` (a memory
    /// created for a restore: the other hosts' requests for these pages wait until
    /// [`dsm_vm::DsmMemory::finish_loading`]).
    pub(super) fn fill_home(&self, dsm: &dsm_vm::DsmMemory) -> Result<u64, Error> {
        let me = dsm.local();
        self.for_each_data_page(
            |gpa| dsm.home_of(gpa) == me,
            |gpa, page| {
                dsm.preload(gpa, page).map_err(|e| Error::Inconsistent {
                    path: self.dir.clone(),
                    detail: e.to_string(),
                })
            },
        )
    }

    /// Lazy restore: makes `dsm` (a loading memory) serve the pages homed here from the
    /// snapshot when first asked for, and returns the thread that streams the rest in behind
    /// the guest. A page that cannot be read (corrupt, truncated) stops the VM through
    /// `on_error`, naming the file.
    pub(super) fn lazy_home(
        &self,
        dsm: &dsm_vm::DsmMemory,
        on_error: Arc<dyn Fn(String) + Send + Sync>,
        stopped: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<std::thread::JoinHandle<()>, Error> {
        let backing_snap = snapshot::open(&self.dir)?;
        let err = on_error.clone();
        dsm.set_backing(Box::new(move |pfn| {
            let mut page = proto::PageBuf::zeroed();
            match backing_snap.read_page(pfn * PAGE_SIZE as u64, &mut page.0) {
                Ok(PageSource::Data) => Ok(Some(page)),
                Ok(_) => Ok(None),
                Err(e) => {
                    err(e.to_string());
                    Err(e.to_string())
                }
            }
        }));
        dsm.finish_loading();
        let handle = dsm.handle();
        let me = dsm.local();
        let intervals = self.snap.recorded_intervals();
        std::thread::Builder::new()
            .name("restore-stream".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let mut pages = 0u64;
                for (start, end) in intervals {
                    let mut gpa = start;
                    while gpa < end {
                        if stopped() {
                            return;
                        }
                        if handle.home_of(gpa) == me {
                            match handle.prefetch(gpa) {
                                Ok(true) => pages += 1,
                                Ok(false) => {}
                                Err(e) => {
                                    on_error(e.to_string());
                                    return;
                                }
                            }
                        }
                        gpa += PAGE_SIZE as u64;
                    }
                }
                log::info!(
                    "lazy restore: {pages} home pages streamed in behind the guest in {:.2} s",
                    t.elapsed().as_secs_f64()
                );
            })
            .map_err(|e| Error::Inconsistent {
                path: self.dir.clone(),
                detail: format!("cannot start the streaming thread: {e}"),
            })
    }

    /// Calls `f` with every data page recorded in the snapshot (through its chain) whose
    /// address passes `want`; returns how many.
    fn for_each_data_page(
        &self,
        want: impl Fn(u64) -> bool,
        mut f: impl FnMut(u64, &[u8; PAGE_SIZE]) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let mut page = [0u8; PAGE_SIZE];
        let mut pages = 0;
        for (start, end) in self.snap.recorded_intervals() {
            let mut gpa = start;
            while gpa < end {
                if want(gpa) && self.snap.read_page(gpa, &mut page)? == PageSource::Data {
                    f(gpa, &page)?;
                    pages += 1;
                }
                gpa += PAGE_SIZE as u64;
            }
        }
        Ok(pages)
    }

    /// The guest TSC every restored vCPU starts from: the highest saved one (the hosts of a
    /// cluster save their vCPUs one after another while the guest TSC runs on, so the saved
    /// values differ by that much; the highest keeps every vCPU's time from going back).
    pub fn tsc_base(&self) -> u64 {
        self.vcpus
            .iter()
            .flat_map(|v| v.kvm.msrs.iter())
            .filter(|m| m.index == IA32_TSC)
            .map(|m| m.value)
            .max()
            .unwrap_or(0)
    }

    /// A cluster file for restoring onto `cpus.len()` hosts, host `i` running `cpus[i]`
    /// vCPUs (they must add up to the guest's), named `name`. Each disk keeps its home if
    /// that host exists, else host 0 serves it; the disks are the snapshot's copies.
    pub fn cluster_file(&self, name: &str, cpus: &[u32]) -> Result<ClusterFile, Error> {
        let total: u32 = cpus.iter().sum();
        if total != u32::from(self.guest.cpus) || cpus.contains(&0) {
            return Err(Error::Manifest {
                path: self.dir.join(snapshot::MANIFEST_FILE),
                what: "guest",
                detail: format!(
                    "the guest has {} vCPUs; hosts with {cpus:?} vCPUs cannot run it",
                    self.guest.cpus
                ),
            });
        }
        Ok(ClusterFile {
            name: name.to_string(),
            memory: self.guest.memory.to_string(),
            kernel: self.guest.kernel.clone(),
            initrd: None,
            cmdline: Some(self.guest.cmdline.clone()),
            append: String::new(),
            home_chunk_pages: self.placement.home_chunk_pages,
            hosts: cpus
                .iter()
                .enumerate()
                .map(|(i, c)| HostEntry {
                    addr: format!("127.0.0.1:{}", i + 1),
                    cpus: *c,
                })
                .collect(),
            disks: self
                .guest
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskEntry {
                    path: self.dir.join(&d.file),
                    read_only: d.read_only,
                    host: self
                        .placement
                        .disk_home
                        .get(i)
                        .map(|h| usize::from(*h))
                        .filter(|h| *h < cpus.len())
                        .unwrap_or(0),
                })
                .collect(),
        })
    }
}

/// `IA32_TSC`.
const IA32_TSC: u32 = 0x10;

/// vCPU counts for `hosts` hosts sharing `cpus` vCPUs as evenly as possible (the first hosts
/// take one more); None if some host would get none.
pub fn spread_cpus(cpus: u32, hosts: usize) -> Option<Vec<u32>> {
    let hosts_u32 = u32::try_from(hosts).ok()?;
    if hosts == 0 || hosts_u32 > cpus {
        return None;
    }
    let (each, extra) = (cpus / hosts_u32, cpus % hosts_u32);
    Some(
        (0..hosts_u32)
            .map(|i| each + u32::from(i < extra))
            .collect(),
    )
}

/// Opens the snapshot in `dir`, checks it (every data page too when `verify`: a restore that
/// reads pages later checks each as it reads it) and reads every state, checking them against
/// the guest configuration. Nothing is built.
pub fn load(dir: &Path, verify: bool) -> Result<Restore, Error> {
    let snap = snapshot::open(dir)?;
    if verify {
        snap.verify()?;
    }
    let top = snap.top();
    let m = top.manifest();
    let mpath = dir.join(snapshot::MANIFEST_FILE);
    let bad = |what: &'static str, detail: String| Error::Manifest {
        path: mpath.clone(),
        what,
        detail,
    };
    let guest: GuestConfig =
        serde_json::from_value(m.guest.clone()).map_err(|e| bad("guest", e.to_string()))?;
    let placement: Placement =
        serde_json::from_value(m.placement.clone()).map_err(|e| bad("placement", e.to_string()))?;
    let cfg = VmConfig {
        kernel: guest.kernel.clone(),
        initrd: None,
        cmdline: guest.cmdline.clone(),
        memory: guest.memory,
        cpus: guest.cpus,
        disks: Vec::new(),
        stats_json: None,
    };
    cfg.validate_machine()
        .map_err(|e| bad("guest", e.to_string()))?;
    if guest.disks.len() > crate::layout::VIRTIO_IRQS.len() {
        return Err(bad("guest", format!("{} disks", guest.disks.len())));
    }
    for d in &guest.disks {
        let ok = !d.file.is_empty()
            && !d.file.contains('/')
            && d.file != "."
            && d.file != ".."
            && d.file != snapshot::MANIFEST_FILE;
        if !ok {
            return Err(bad("guest.disks", format!("bad file name {:?}", d.file)));
        }
        let path = dir.join(&d.file);
        let size = std::fs::metadata(&path)
            .map_err(|e| bad("guest.disks", format!("{}: {e}", path.display())))?
            .len();
        if size != d.size {
            return Err(bad(
                "guest.disks",
                format!(
                    "{}: {size} bytes, the manifest says {}",
                    path.display(),
                    d.size
                ),
            ));
        }
    }
    placement
        .validate(usize::from(guest.cpus), guest.disks.len(), guest.memory)
        .map_err(|e| bad("placement", e.to_string()))?;
    for f in &m.memory_files {
        let ranges: Vec<(u64, u64)> = f.ranges.iter().map(|r| (r.start, r.len)).collect();
        if ranges != ram_regions(guest.memory) {
            return Err(bad(
                "memory_files",
                format!(
                    "{}: ranges {ranges:x?} are not the guest RAM of {} bytes",
                    f.file, guest.memory
                ),
            ));
        }
    }

    let state = |component: &str, host: Option<u32>| {
        m.state_file(component, host)
            .ok_or_else(|| Error::MissingState {
                path: mpath.clone(),
                component: component.to_string(),
                host,
            })
    };
    let inconsistent = |s: &StateFileRef, detail: String| Error::Inconsistent {
        path: dir.join(&s.file),
        detail,
    };
    // Each host's vCPUs and their local APICs, in that host's order.
    let mut cpus: Vec<(SavedVcpu, LapicState)> = Vec::new();
    for h in 0..u32::from(placement.hosts) {
        let vf = state(component::VCPUS, Some(h))?;
        let lf = state(component::LAPICS, Some(h))?;
        let vcpus: Vec<SavedVcpu> = top.read_state(vf)?;
        let lapics: Vec<LapicState> = top.read_state(lf)?;
        if lapics.len() != vcpus.len() {
            return Err(inconsistent(
                lf,
                format!("{} local APICs for {} vCPUs", lapics.len(), vcpus.len()),
            ));
        }
        for v in &vcpus {
            if placement.vcpu_host.get(v.index).map(|x| u32::from(*x)) != Some(h) {
                return Err(inconsistent(
                    vf,
                    format!("vCPU {} did not run on host {h}", v.index),
                ));
            }
        }
        cpus.extend(vcpus.into_iter().zip(lapics));
    }
    cpus.sort_by_key(|(v, _)| v.index);
    let ncpus = usize::from(guest.cpus);
    if cpus.len() != ncpus || cpus.iter().enumerate().any(|(i, (v, _))| v.index != i) {
        return Err(bad(
            "state_files",
            format!("the vCPU states are not vCPUs 0..{ncpus}, each once"),
        ));
    }
    let (vcpus, lapics): (Vec<SavedVcpu>, Vec<LapicState>) = cpus.into_iter().unzip();
    let ioapic: IoapicState = top.read_state(state(component::IOAPIC, None)?)?;
    let serial: ConsoleState = top.read_state(state(component::SERIAL, None)?)?;
    let legacy: LegacyState = top.read_state(state(component::LEGACY, None)?)?;
    let clock: ClockState = top.read_state(state(component::KVMCLOCK, None)?)?;
    let virtio: Vec<MmioTransportState> = (0..guest.disks.len())
        .map(|i| {
            top.read_state(state(&virtio_component(i), None)?)
                .map_err(Error::from)
        })
        .collect::<Result<_, _>>()?;
    Ok(Restore {
        dir: dir.to_path_buf(),
        snap,
        guest,
        placement,
        vcpus,
        lapics,
        ioapic,
        serial,
        legacy,
        virtio,
        clock,
        lazy: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn parts(host: usize, hosts: u16, disk_home: &[usize]) -> HostParts {
        let placement = Placement::initial(&vec![1; usize::from(hosts)], disk_home, 64 << 20, 512);
        HostParts {
            host,
            memory: None,
            states: Vec::new(),
            disks: disk_home
                .iter()
                .enumerate()
                .filter(|(_, h)| **h == host)
                .map(|(i, _)| {
                    (
                        i,
                        SavedDisk {
                            file: format!("disk-{i}.img"),
                            source: PathBuf::from(format!("/d{i}")),
                            read_only: false,
                            size: 4096,
                            copied_by: "reflink".into(),
                        },
                    )
                })
                .collect(),
            guest: GuestConfig {
                memory: 64 << 20,
                cpus: hosts as u8,
                cmdline: "console=ttyS0".into(),
                kernel: PathBuf::from("/k"),
                initrd: None,
                disks: Vec::new(),
            },
            placement,
        }
    }

    #[test]
    fn parts_assemble_into_one_manifest() {
        let all = [parts(1, 2, &[1, 0]), parts(0, 2, &[1, 0])];
        let m = assemble(&all, None).unwrap();
        let guest: GuestConfig = serde_json::from_value(m.guest).unwrap();
        let files: Vec<&str> = guest.disks.iter().map(|d| d.file.as_str()).collect();
        assert_eq!(files, ["disk-0.img", "disk-1.img"]);
        // A host missing, answering twice, or from another machine; a disk copied twice.
        let err = |p: &[HostParts]| assemble(p, None).unwrap_err().to_string();
        assert!(err(&all[..1]).contains("host 0 wrote nothing"));
        assert!(err(&[all[0].clone(), all[0].clone()]).contains("twice"));
        let mut other = all[0].clone();
        other.guest.cmdline = "x".into();
        assert!(err(&[all[1].clone(), other]).contains("another machine"));
        let mut dup = all[0].clone();
        dup.disks.push(dup.disks[0].clone());
        assert!(err(&[all[1].clone(), dup]).contains("copied twice"));
        let mut lost = all[0].clone();
        lost.disks.clear();
        assert!(err(&[all[1].clone(), lost]).contains("disk 0 was not copied"));
        assert!(err(&[]).contains("no host"));
    }

    #[test]
    fn cpus_spread_over_hosts_and_pages_join_into_runs() {
        assert_eq!(spread_cpus(3, 1), Some(vec![3]));
        assert_eq!(spread_cpus(3, 2), Some(vec![2, 1]));
        assert_eq!(spread_cpus(3, 3), Some(vec![1, 1, 1]));
        assert_eq!(spread_cpus(2, 3), None);
        assert_eq!(spread_cpus(2, 0), None);
        let p = PAGE_SIZE as u64;
        assert_eq!(
            page_runs(&[0, p, 2 * p, 5 * p, 7 * p, 8 * p]),
            vec![(0, 3 * p), (5 * p, p), (7 * p, 2 * p)]
        );
        assert!(page_runs(&[]).is_empty());
    }

    #[test]
    fn disk_copy_keeps_data_and_holes() {
        let d = std::env::temp_dir().join(format!("ssi-snap-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let src = d.join("src.img");
        let mut f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"hello disk").unwrap();
        f.sync_all().unwrap();
        let dst = d.join("dst.img");
        let (size, _how) = copy_disk(&src, &dst).unwrap();
        assert_eq!(size, 8 << 20);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // An existing destination is refused and left alone.
        assert!(copy_disk(&src, &dst).is_err());
        assert!(dst.exists());
        // A missing source leaves no file behind.
        assert!(copy_disk(&d.join("missing.img"), &d.join("x.img")).is_err());
        assert!(!d.join("x.img").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A vCPU that ran a `hlt` is saved, loaded into a fresh VM's vCPU (CPUID set as `run`
    /// sets it) and saved again: the two states agree (the TSC aside). Needs /dev/kvm.
    #[test]
    fn vcpu_state_round_trips_through_kvm() {
        use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
        use vm_memory::GuestMemoryBackend;
        if std::fs::File::open("/dev/kvm").is_err() {
            eprintln!("no /dev/kvm: skipped");
            return;
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[0xf4], GuestAddress(0x1000)).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let make = || {
            let (kvm, vm) = super::super::build::create_vm().unwrap();
            let r = kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: 0x10000,
                userspace_addr: host,
            };
            // SAFETY: `mem` outlives both VMs (dropped at the end of the test).
            unsafe { vm.set_user_memory_region(r) }.unwrap();
            let fd = vm.create_vcpu(0).unwrap();
            let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
            crate::boot::cpu::patch_cpuid(&mut cpuid, 0, 1);
            fd.set_cpuid2(&cpuid).unwrap();
            crate::boot::cpu::setup_fpu_msrs(&fd, true).unwrap();
            (kvm, vm, fd)
        };
        let (kvm, _vm, mut fd) = make();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        regs.rbx = 0x1234_5678;
        fd.set_regs(&regs).unwrap();
        let exit = format!("{:?}", fd.run().unwrap());
        assert_eq!(exit, "Hlt");
        crate::vcpu::state::complete_pending_io(&mut fd).unwrap();
        let saved = crate::vcpu::state::save(&fd).unwrap();
        assert_eq!(saved.regs.rip, 0x1001);
        let limits = crate::vcpu::state::RestoreLimits::from_kvm(&kvm).unwrap();
        let (_k2, _vm2, fd2) = make();
        crate::vcpu::state::restore(&fd2, &saved, &limits)
            .unwrap_or_else(|e| panic!("restore: {e}"));
        let again = crate::vcpu::state::save(&fd2).unwrap();
        assert_eq!(again.regs, saved.regs);
        assert_eq!(again.sregs, saved.sregs);
        assert_eq!(again.xcr0, saved.xcr0);
        assert_eq!(again.xsave, saved.xsave);
        assert_eq!(again.events, saved.events);
        let no_tsc = |s: &crate::vcpu::state::VcpuState| {
            s.msrs
                .iter()
                .filter(|m| m.index != 0x10)
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(no_tsc(&again), no_tsc(&saved));
        drop(mem);
    }

    #[test]
    fn sparse_copy_without_reflink() {
        let d = std::env::temp_dir().join(format!("ssi-snap-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let src = d.join("src.img");
        let mut f = File::create(&src).unwrap();
        f.set_len(4 << 20).unwrap();
        f.seek(SeekFrom::Start((1 << 20) + 5)).unwrap();
        f.write_all(&[7u8; 9000]).unwrap();
        drop(f);
        let from = File::open(&src).unwrap();
        let dst = d.join("dst.img");
        let to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .unwrap();
        sparse_copy(&from, &to, 4 << 20).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
