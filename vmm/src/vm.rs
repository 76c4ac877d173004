//! Builds a machine from a [`VmConfig`] and runs it until the guest powers off, resets, or the
//! VMM hits an error.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use irqchip::IrqChip;
use proto::HostId;
use transport::Transport;

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::{acpi, cpu, loader};
use crate::cluster::shadow::ShadowZap;
use crate::cluster::{fabric, status, timesync, ClusterSpec, Fabric, Placement};
use crate::config::VmConfig;
use crate::devices::{serial, Devices};
use crate::irq::IrqLine;
use crate::layout::*;
use crate::stats::Stats;
use crate::stop::{StopReason, Stopper};
use crate::vcpu::{self, quirks::FixupStats, Vcpu};

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// /dev/kvm cannot be used.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    /// A KVM ioctl failed while building the VM.
    #[error("KVM {0} failed: {1}")]
    KvmIoctl(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {0} bytes of guest memory: {1}")]
    Memory(u64, String),
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
    Thread(std::io::Error),
    /// The cluster could not be joined.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Distributed guest memory failed.
    #[error("distributed memory: {0}")]
    Dsm(#[from] dsm_vm::Error),
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

fn enable_cap(vm: &VmFd, cap: u32, arg0: u64) -> Result<(), kvm_ioctls::Error> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    vm.enable_cap(&c)
}

struct VirtioIrq(IrqLine);
impl virtio_mmio::InterruptLine for VirtioIrq {
    fn trigger(&self) {
        self.0.pulse();
    }
}

fn open_disk(
    path: &Path,
    read_only: bool,
    mem: &GuestMemoryMmap,
    line: IrqLine,
) -> Result<virtio_mmio::MmioTransport, Error> {
    let err = |detail: String| Error::Disk {
        path: path.display().to_string(),
        detail,
    };
    let block = virtio_blk_dist::Block::new(path, read_only).map_err(|e| err(e.to_string()))?;
    virtio_mmio::MmioTransport::new(Box::new(block), mem.clone(), Arc::new(VirtioIrq(line)))
        .map_err(|e| err(e.to_string()))
}

/// Builds and runs the VM on this host alone. Returns when it has stopped.
pub fn run(cfg: &VmConfig) -> Result<RunReport, Error> {
    run_on(cfg, None)
}

/// Guest RAM: plain anonymous memory, or the cluster's distributed memory.
struct Ram {
    mem: GuestMemoryMmap,
    /// (guest address, size, host address) of each region, for KVM.
    slots: Vec<(u64, u64, u64)>,
}

fn local_ram(size: u64) -> Result<Ram, Error> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(size, e.to_string()))?;
    let mut slots = Vec::new();
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(size, e.to_string()))?;
        slots.push((region.start_addr().0, region.len(), host as u64));
    }
    Ok(Ram { mem, slots })
}

/// Builds and runs the VM, alone or as host `spec.me` of a cluster (whose transport listens
/// on `listener`). Returns when it has stopped.
pub fn run_on(
    cfg: &VmConfig,
    cluster: Option<(ClusterSpec, TcpListener)>,
) -> Result<RunReport, Error> {
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
        None => cfg.validate()?,
        Some((spec, _)) => {
            cfg.validate_host(me, spec.hosts.len(), usize::from(placement.boot_host))?;
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
    }
    let started = Instant::now();
    // The cluster first: a peer that is not there is reported before anything is built.
    let net = match cluster {
        Some((spec, listener)) => Some(join_cluster(spec, listener)?),
        None => None,
    };
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(Error::Kvm)?);
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| Error::KvmIoctl("SET_TSS_ADDR", e))?;
    enable_cap(
        &vm,
        kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        u64::from(
            KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL,
        ),
    )
    .map_err(|e| Error::KvmIoctl("ENABLE_CAP(X86_USER_SPACE_MSR)", e))?;
    // The local APIC's MSRs belong to the userspace local APIC: a clear bit in a filter range
    // sends the access to the VMM. The x2APIC registers (0x800-0x8ff) cannot be filtered; KVM
    // fails them without an in-kernel APIC, and KVM_MSR_EXIT_REASON_INVAL above turns that
    // failure into a userspace exit too.
    let deny = [0u8; 1];
    vm.set_msr_filter(
        MsrFilterDefaultAction::ALLOW,
        &[
            MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: cpu::msr::IA32_TSC_DEADLINE,
                msr_count: 1,
                bitmap: &deny,
            },
            MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: cpu::msr::IA32_APICBASE,
                msr_count: 1,
                bitmap: &deny,
            },
        ],
    )
    .map_err(|e| Error::KvmIoctl("X86_SET_MSR_FILTER", e))?;
    if let Err(e) = enable_cap(&vm, kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1) {
        log::warn!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not available: {e}");
    }

    // `dsm` is declared before everything that holds a view of its memory, so it is dropped
    // after them.
    let mut dsm: Option<dsm_vm::DsmMemory> = None;
    let ram = match &net {
        None => local_ram(cfg.memory)?,
        Some(n) => {
            let d = dsm_vm::DsmMemory::new(
                dsm_vm::DsmConfig {
                    local: HostId(n.spec.me as u16),
                    hosts: (0..n.spec.hosts.len()).map(|h| HostId(h as u16)).collect(),
                    regions: ram_regions(cfg.memory),
                    home: placement.home_policy(),
                },
                n.transport.clone(),
            )?;
            // SAFETY: every holder of this view (devices, vCPUs, loaders) is dropped before
            // `dsm`, or `dsm` is leaked when a vCPU thread cannot be joined (see the end).
            let mem = unsafe { d.guest_memory() }?;
            let slots = d
                .regions()
                .iter()
                .map(|r| (r.guest_addr, r.size, r.host_addr))
                .collect();
            dsm = Some(d);
            Ram { mem, slots }
        }
    };
    let mem = ram.mem.clone();
    let mut kvm_slots = Vec::new();
    for (slot, (guest, size, host)) in ram.slots.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: *guest,
            memory_size: *size,
            userspace_addr: *host,
        };
        // SAFETY: the region is a live mapping owned by `ram` or `dsm`, which outlive the VM
        // (dropped after every vCPU thread has been joined at the end of this function, or
        // leaked).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::KvmIoctl("SET_USER_MEMORY_REGION", e))?;
        kvm_slots.push(r);
    }
    if let Some(n) = &net {
        timesync::set_clock(&vm, n.spec.epoch_ns);
    }

    // The boot host (host 0 by default) loads the guest and runs vCPU 0; the other hosts' vCPUs
    // wait for INIT/SIPI and see it through the DSM.
    let mut kernel_entry = None;
    if me == usize::from(placement.boot_host) {
        let mut params = boot_params::default();
        let kernel = loader::load_kernel(&mem, &cfg.kernel, &mut params)?;
        let initrd = match &cfg.initrd {
            Some(p) => Some(loader::load_initrd(&mem, p, cfg.memory, kernel.end)?),
            None => None,
        };
        let apic_ids: Vec<u8> = (0..cfg.cpus).collect();
        let mmio: Vec<acpi::MmioDevice> = (0..cfg.disks.len())
            .map(|i| acpi::MmioDevice {
                base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_IRQS[i],
            })
            .collect();
        let rsdp = acpi::write_tables(&mem, &apic_ids, &mmio)?;
        log::info!("kernel command line: {}", cfg.cmdline);
        loader::write_boot_params(&mem, &mut params, &cfg.cmdline, initrd, cfg.memory, rsdp)?;
        cpu::write_boot_tables(&mem)?;
        kernel_entry = Some(kernel.entry);
    }

    let cpu_host = placement.cpu_hosts();
    let local: Vec<bool> = cpu_host.iter().map(|h| *h == me).collect();
    let ioapic_local = me == usize::from(placement.ioapic_home);
    let chip = Arc::new(IrqChip::with_local(cfg.cpus, local, ioapic_local));
    let stop = Arc::new(Stopper::new(chip.local_lapics()));
    let stats = Arc::new(Stats::default());
    let fixups = Arc::new(FixupStats::default());
    let console = serial::Console::new(IrqLine::new(chip.clone(), SERIAL_IRQ));
    // Each disk is opened and emulated on its home host only; the other hosts forward.
    let disk_home = placement.disk_homes();
    let mut virtio = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        virtio.push(if disk_home.get(i) == Some(&me) {
            let line = IrqLine::new(chip.clone(), VIRTIO_IRQS[i]);
            Some(open_disk(&d.path, d.read_only, &mem, line)?)
        } else {
            None
        });
    }
    let mut devices = Devices::new(console, virtio, chip.clone(), stop.clone());
    let zap = match &dsm {
        Some(d) if std::env::var_os("SSI_VMM_NO_SHADOW_ZAP").is_none() => {
            let z = Arc::new(ShadowZap::new(
                vm.clone(),
                kvm_slots.clone(),
                chip.local_lapics(),
            ));
            let z2 = z.clone();
            d.set_discard_hook(Box::new(move |gpa, page| z2.on_discard(gpa, page)));
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
        let reporter = status::Reporter::new(n.spec.clone(), d.stats_source(), io, status.clone());
        let (t, s) = (n.transport.clone(), stop.clone());
        std::thread::Builder::new()
            .name("status".into())
            .spawn(move || reporter.run(t, s))
            .map_err(Error::Thread)?;
    }

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::KvmIoctl("GET_SUPPORTED_CPUID", e))?;
    let mut vcpus = Vec::new();
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
        let tsc_khz = u64::from(fd.get_tsc_khz().unwrap_or(1_000_000));
        vcpus.push(Vcpu {
            index: usize::from(i),
            fd,
            lapic: chip.lapics[usize::from(i)].clone(),
            chip: chip.clone(),
            devices: devices.clone(),
            mem: mem.clone(),
            stop: stop.clone(),
            stats: stats.clone(),
            fixups: fixups.clone(),
            tsc_khz,
            zap: zap.clone(),
        });
    }
    vcpu::install_kick_handler().map_err(Error::Thread)?;

    let mut timers = Vec::new();
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
    // The console home (host 0 by default) feeds stdin to the serial port.
    if me == usize::from(placement.console_home) {
        let d = devices.clone();
        // Detached: it blocks in read(2) on stdin and dies with the process.
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || serial::stdin_pump(d));
    }
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
        // A vCPU is blocked on a page that nobody will send: its thread still uses guest RAM,
        // so the mapping must outlive this function. The process exits right after.
        log::warn!("a vCPU thread did not stop (waiting on a lost page); leaving it behind");
        std::mem::forget(devices);
        std::mem::forget(mem);
        std::mem::forget(ram);
        if let Some(d) = dsm.take() {
            std::mem::forget(d);
        }
    }
    if let Some(z) = &zap {
        log::info!("shadow page tables dropped {} time(s)", z.zaps());
    }
    let reason = stop
        .reason()
        .unwrap_or(StopReason::Error("no stop reason".into()));
    Ok(RunReport {
        exit_code: reason.exit_code(),
        stop: format!("{reason:?}"),
        wall_seconds: started.elapsed().as_secs_f64(),
        exits: stats.exits().into_iter().collect(),
        interrupts_injected: stats.injected.load(std::sync::atomic::Ordering::Relaxed),
        fixups: fixups.counts(),
        dsm_protocol_errors: dsm_stats.as_ref().map_or(0, |s| s.protocol_errors),
        dsm_send_errors: dsm_stats.as_ref().map_or(0, |s| s.send_errors),
    })
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

/// A host's live membership in a cluster.
struct Net {
    spec: ClusterSpec,
    transport: Arc<dyn Transport>,
    tcp: Arc<transport::TcpTransport>,
}

impl Net {
    fn shutdown(&self) {
        self.tcp.shutdown();
    }
}

/// How long a host waits for every other host to connect.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

fn join_cluster(spec: ClusterSpec, listener: TcpListener) -> Result<Net, Error> {
    let peers = spec
        .hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != spec.me)
        .map(|(i, h)| (HostId(i as u16), h.addr))
        .collect();
    let cfg = transport::TcpConfig::new(HostId(spec.me as u16), peers, spec.cluster_id, &spec.key);
    let tcp =
        transport::TcpTransport::start(cfg, listener).map_err(|e| Error::Cluster(e.to_string()))?;
    log::info!(
        "host {} of cluster {:?}: waiting for {} peer(s)",
        spec.me,
        spec.name,
        spec.hosts.len() - 1
    );
    if let Err(e) = tcp.wait_connected(JOIN_TIMEOUT) {
        tcp.shutdown();
        return Err(Error::Cluster(format!(
            "not every host joined within {}s: {e}",
            JOIN_TIMEOUT.as_secs()
        )));
    }
    log::info!("host {}: all {} hosts connected", spec.me, spec.hosts.len());
    let transport: Arc<dyn Transport> = tcp.clone();
    Ok(Net {
        spec,
        transport,
        tcp,
    })
}
