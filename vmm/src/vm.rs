//! Builds a machine from a [`VmConfig`] and runs it until the guest powers off, resets, or the
//! VMM hits an error.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_UNKNOWN,
};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::{acpi, cpu, loader};
use crate::config::VmConfig;
use crate::devices::{serial, Devices};
use crate::irq::{IrqChip, IrqLine};
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

/// Builds and runs the VM. Returns when it has stopped.
pub fn run(cfg: &VmConfig) -> Result<RunReport, Error> {
    cfg.validate()?;
    let started = Instant::now();
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = kvm.create_vm().map_err(Error::Kvm)?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| Error::KvmIoctl("SET_TSS_ADDR", e))?;
    enable_cap(
        &vm,
        kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        u64::from(KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN),
    )
    .map_err(|e| Error::KvmIoctl("ENABLE_CAP(X86_USER_SPACE_MSR)", e))?;
    // The TSC-deadline MSR belongs to the userspace local APIC.
    let deny = [0u8; 1];
    vm.set_msr_filter(
        MsrFilterDefaultAction::ALLOW,
        &[MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: cpu::msr::IA32_TSC_DEADLINE,
            msr_count: 1,
            bitmap: &deny,
        }],
    )
    .map_err(|e| Error::KvmIoctl("X86_SET_MSR_FILTER", e))?;
    if let Err(e) = enable_cap(&vm, kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1) {
        log::warn!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not available: {e}");
    }

    let ranges: Vec<(GuestAddress, usize)> = ram_regions(cfg.memory)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| Error::Memory(cfg.memory, e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(cfg.memory, e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (it is
        // dropped after every vCPU thread has been joined at the end of this function).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::KvmIoctl("SET_USER_MEMORY_REGION", e))?;
    }

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

    let chip = Arc::new(IrqChip::new(cfg.cpus));
    let stop = Arc::new(Stopper::new(chip.lapics.clone()));
    let stats = Arc::new(Stats::default());
    let fixups = Arc::new(FixupStats::default());
    let console = serial::Console::new(IrqLine::new(chip.clone(), SERIAL_IRQ));
    let mut virtio = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let line = IrqLine::new(chip.clone(), VIRTIO_IRQS[i]);
        virtio.push(open_disk(&d.path, d.read_only, &mem, line)?);
    }
    let devices = Arc::new(Devices::new(console, virtio, chip.clone(), stop.clone()));

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::KvmIoctl("GET_SUPPORTED_CPUID", e))?;
    let mut vcpus = Vec::new();
    for i in 0..cfg.cpus {
        let fd = vm
            .create_vcpu(u64::from(i))
            .map_err(|e| Error::KvmIoctl("CREATE_VCPU", e))?;
        let mut cpuid = supported.clone();
        cpu::patch_cpuid(&mut cpuid, i, cfg.cpus);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::KvmIoctl("SET_CPUID2", e))?;
        cpu::setup_fpu_msrs(&fd, i == 0)?;
        if i == 0 {
            cpu::setup_boot_cpu(&fd, kernel.entry)?;
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
        });
    }
    vcpu::install_kick_handler().map_err(Error::Thread)?;

    let mut timers = Vec::new();
    for l in &chip.lapics {
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
    {
        let d = devices.clone();
        // Detached: it blocks in read(2) on stdin and dies with the process.
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || serial::stdin_pump(d));
    }
    for t in threads {
        if t.join().is_err() {
            stop.request(StopReason::Error("a vCPU thread panicked".into()));
        }
    }
    stop.request(StopReason::Error("all vCPUs stopped".into()));
    for t in timers {
        let _ = t.join();
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
    })
}
