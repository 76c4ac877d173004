//! Snapshots of a single-host VM (`ssi-vmm run`): what [`super::Controller::snapshot`] writes
//! and what [`super::Vm::restore`] reads back. The on-disk format is the `snapshot` crate's.
//!
//! # What a snapshot of a `run` VM holds
//!
//! - `manifest.json`: `guest` = [`GuestConfig`] (memory size, vCPUs, command line, kernel and
//!   initrd paths as booted, disks), `placement` = the VM's [`Placement`] (one host);
//! - `memory-h0.mem` / `.idx`: every non-zero page of guest RAM (zero pages are only indexed);
//! - state files (component names in [`component`]): the vCPUs ([`SavedVcpu`]: KVM state,
//!   halted flag, TSC rate), the local APICs, the IOAPIC, the serial port, the legacy ports,
//!   the virtio-mmio transports with their devices' state, and the VM's kvmclock;
//! - `disk-<i>.img`: a copy of each disk image as it was at the pause, made with a reflink
//!   (`FICLONE`) where the file system can, else as a sparse copy. The copies are not covered
//!   by the snapshot's checksums (only their size is recorded), and a restore runs the guest on
//!   the copy **in place**: the snapshot's disk then moves on with the restored guest, so a
//!   snapshot is meant to be restored once (copy the directory to restore it again).
//!
//! # Order
//!
//! Saving: pause (every vCPU out of `KVM_RUN`), each vCPU thread saves its own KVM state
//! (`VcpuEvent::Save`: completes the last exit, then `vcpu::state::save`), then everything
//! else is saved by the controller while the vCPUs stay paused; then the manifest is written
//! and the directory committed, and only then the VM is resumed or stopped.
//!
//! Restoring: [`load`] opens and fully verifies the snapshot and reads every state file before
//! anything is built; the VM is then built as `run` builds it, minus the kernel loading: RAM is
//! filled from the memory file, each vCPU gets the CPUID `run` gives it and then its saved
//! state, the local APIC timers are put on the restored guest TSC, and the devices are rebuilt
//! from their states.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use irqchip::{IoapicState, IrqChip, LapicState};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use snapshot::{GpaRange, Manifest, PageSource, Persist, Snapshot, SnapshotBuilder, PAGE_SIZE};
use virtio_mmio::MmioTransportState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
    /// `Vec<MmioTransportState>`, one per disk.
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
    /// Snapshots of cluster VMs are not implemented yet.
    #[error("snapshots of a VM spread over several hosts are not supported yet")]
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
    #[error("{path}: no state file for component {component:?}")]
    MissingState {
        /// The manifest.
        path: PathBuf,
        /// The component.
        component: &'static str,
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

/// What the controller of a single-host VM needs to write a snapshot.
pub struct Source {
    pub(super) chip: Arc<IrqChip>,
    pub(super) devices: Arc<Devices>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) vm: Arc<VmFd>,
    pub(super) cfg: VmConfig,
    pub(super) placement: Placement,
}

impl Source {
    /// Writes the snapshot of a paused VM whose vCPUs saved `vcpus` into `dir`; returns the
    /// committed directory. On an error nothing is left behind (the builder removes its
    /// temporary directory).
    pub(super) fn write(&self, dir: &Path, vcpus: Vec<SavedVcpu>) -> Result<PathBuf, Error> {
        let started = std::time::Instant::now();
        let b = SnapshotBuilder::create(dir)?;
        let tmp = b.partial_dir().to_path_buf();
        let lapics: Vec<LapicState> = self.chip.lapics.iter().map(|l| l.save()).collect();
        let ioapic: IoapicState = self.chip.ioapic().save();
        let serial: ConsoleState = self
            .devices
            .serial()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save();
        let legacy: LegacyState = self.devices.legacy().save();
        let virtio: Vec<MmioTransportState> = self
            .devices
            .virtio()
            .iter()
            .flatten()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save())
            .collect();
        let clock = self
            .vm
            .get_clock()
            .map_err(|e| Error::Kvm("GET_CLOCK", e))?;
        let clock = ClockState {
            clock: clock.clock,
            flags: clock.flags,
        };

        let mut manifest = Manifest::new(serde_json::Value::Null, serde_json::Value::Null);
        let h0 = Some(0);
        manifest
            .state_files
            .push(b.write_state("state-h0-vcpus", h0, component::VCPUS, &vcpus)?);
        manifest.state_files.push(b.write_state(
            "state-h0-lapics",
            h0,
            component::LAPICS,
            &lapics,
        )?);
        manifest.state_files.push(b.write_state(
            "state-ioapic",
            None,
            component::IOAPIC,
            &ioapic,
        )?);
        manifest.state_files.push(b.write_state(
            "state-serial",
            None,
            component::SERIAL,
            &serial,
        )?);
        manifest.state_files.push(b.write_state(
            "state-legacy",
            None,
            component::LEGACY,
            &legacy,
        )?);
        manifest.state_files.push(b.write_state(
            "state-virtio",
            None,
            component::VIRTIO,
            &virtio,
        )?);
        manifest.state_files.push(b.write_state(
            "state-kvmclock",
            None,
            component::KVMCLOCK,
            &clock,
        )?);

        // Guest RAM, chunk by chunk; the writer skips zero pages.
        let ranges: Vec<GpaRange> = ram_regions(self.cfg.memory)
            .into_iter()
            .map(|(start, len)| GpaRange { start, len })
            .collect();
        let w = b.memory_writer(MEMORY_FILE, &ranges)?;
        let mut buf = vec![0u8; CHUNK];
        for r in &ranges {
            let mut gpa = r.start;
            while gpa < r.end() {
                let n = (r.end() - gpa).min(CHUNK as u64) as usize;
                self.mem
                    .read_slice(&mut buf[..n], GuestAddress(gpa))
                    .map_err(|source| Error::Memory { gpa, source })?;
                w.write_pages(gpa, &buf[..n])?;
                gpa += n as u64;
            }
        }
        manifest.memory_files.push(w.finish()?);

        let mut disks = Vec::new();
        for (i, d) in self.cfg.disks.iter().enumerate() {
            let file = format!("disk-{i}.img");
            let dst = tmp.join(&file);
            let (size, how) = copy_disk(&d.path, &dst).map_err(|source| Error::DiskCopy {
                src: d.path.clone(),
                dst: dst.clone(),
                source,
            })?;
            disks.push(SavedDisk {
                file,
                source: d.path.clone(),
                read_only: d.read_only,
                size,
                copied_by: how.into(),
            });
        }
        let guest = GuestConfig {
            memory: self.cfg.memory,
            cpus: self.cfg.cpus,
            cmdline: self.cfg.cmdline.clone(),
            kernel: self.cfg.kernel.clone(),
            initrd: self.cfg.initrd.clone(),
            disks,
        };
        manifest.guest = to_value(&guest)?;
        manifest.placement = to_value(&self.placement)?;
        let out = b.commit(&manifest)?;
        log::info!(
            "snapshot {} written in {:.1} s",
            out.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }
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
    /// The VM's placement (one host).
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

    /// Fills guest RAM (fresh, zero) with every data page of the snapshot.
    pub(super) fn fill_memory(&self, mem: &GuestMemoryMmap) -> Result<u64, Error> {
        let mut page = [0u8; PAGE_SIZE];
        let mut pages = 0;
        for (start, len) in ram_regions(self.guest.memory) {
            let mut gpa = start;
            while gpa < start + len {
                if self.snap.read_page(gpa, &mut page)? == PageSource::Data {
                    mem.write_slice(&page, GuestAddress(gpa))
                        .map_err(|source| Error::Memory { gpa, source })?;
                    pages += 1;
                }
                gpa += PAGE_SIZE as u64;
            }
        }
        Ok(pages)
    }
}

/// Opens the snapshot in `dir`, verifies every file (every data page included) and reads every
/// state, checking them against the guest configuration. Nothing is built.
pub fn load(dir: &Path) -> Result<Restore, Error> {
    let snap = snapshot::open(dir)?;
    snap.verify()?;
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
    if placement.hosts != 1 {
        return Err(bad(
            "placement",
            format!(
                "{} hosts: only single-host snapshots can be restored",
                placement.hosts
            ),
        ));
    }
    placement
        .validate(usize::from(guest.cpus), guest.disks.len(), guest.memory)
        .map_err(|e| bad("placement", e.to_string()))?;
    let ranges: Vec<(u64, u64)> = m
        .memory_files
        .iter()
        .flat_map(|f| f.ranges.iter().map(|r| (r.start, r.len)))
        .collect();
    if ranges != ram_regions(guest.memory) {
        return Err(bad(
            "memory_files",
            format!(
                "ranges {ranges:x?} are not the guest RAM of {} bytes",
                guest.memory
            ),
        ));
    }

    let state = |component: &'static str, host: Option<u32>| {
        m.state_file(component, host)
            .ok_or_else(|| Error::MissingState {
                path: mpath.clone(),
                component,
            })
    };
    let vcpus: Vec<SavedVcpu> = top.read_state(state(component::VCPUS, Some(0))?)?;
    let lapics: Vec<LapicState> = top.read_state(state(component::LAPICS, Some(0))?)?;
    let ioapic: IoapicState = top.read_state(state(component::IOAPIC, None)?)?;
    let serial: ConsoleState = top.read_state(state(component::SERIAL, None)?)?;
    let legacy: LegacyState = top.read_state(state(component::LEGACY, None)?)?;
    let virtio: Vec<MmioTransportState> = top.read_state(state(component::VIRTIO, None)?)?;
    let clock: ClockState = top.read_state(state(component::KVMCLOCK, None)?)?;
    let inconsistent = |component: &'static str, detail: String| -> Error {
        let file = m
            .state_file(component, Some(0))
            .or_else(|| m.state_file(component, None))
            .map(|s| dir.join(&s.file))
            .unwrap_or_else(|| mpath.clone());
        Error::Inconsistent { path: file, detail }
    };
    let ncpus = usize::from(guest.cpus);
    if vcpus.len() != ncpus || vcpus.iter().enumerate().any(|(i, v)| v.index != i) {
        return Err(inconsistent(
            component::VCPUS,
            format!("expected vCPUs 0..{ncpus} in order"),
        ));
    }
    if lapics.len() != ncpus {
        return Err(inconsistent(
            component::LAPICS,
            format!("{} local APICs for {ncpus} vCPUs", lapics.len()),
        ));
    }
    if virtio.len() != guest.disks.len() {
        return Err(inconsistent(
            component::VIRTIO,
            format!(
                "{} transports for {} disks",
                virtio.len(),
                guest.disks.len()
            ),
        ));
    }
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

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
