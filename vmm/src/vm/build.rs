//! Building a machine: the KVM VM and its capabilities, the guest image on the boot host,
//! disks, and joining the cluster. [`super::Vm::start`] puts these together.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    kvm_enable_cap, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use linux_loader::loader::bootparam::boot_params;
use proto::HostId;
use transport::Transport;
use vm_memory::GuestMemoryMmap;

use super::Error;
use crate::boot::{acpi, cpu, loader};
use crate::cluster::ClusterSpec;
use crate::config::VmConfig;
use crate::irq::IrqLine;
use crate::layout::*;

fn enable_cap(vm: &VmFd, cap: u32, arg0: u64) -> Result<(), kvm_ioctls::Error> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    vm.enable_cap(&c)
}

/// Opens /dev/kvm and creates the VM with what the userspace interrupt controllers need: the
/// local APIC MSRs and failed x2APIC accesses exit to the VMM.
pub(super) fn create_vm() -> Result<(Kvm, Arc<VmFd>), Error> {
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
    Ok((kvm, vm))
}

/// Loads the kernel, initrd, ACPI tables, zero page and boot tables into guest memory (the
/// boot host only). Returns the kernel entry point.
pub(super) fn load_guest(cfg: &VmConfig, mem: &GuestMemoryMmap) -> Result<u64, Error> {
    let mut params = boot_params::default();
    let kernel = loader::load_kernel(mem, &cfg.kernel, &mut params)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(loader::load_initrd(mem, p, cfg.memory, kernel.end)?),
        None => None,
    };
    let apic_ids: Vec<u8> = (0..cfg.cpus).collect();
    let mmio: Vec<acpi::MmioDevice> = (0..cfg.disks.len())
        .map(|i| acpi::MmioDevice {
            base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_IRQS[i],
        })
        .collect();
    let rsdp = acpi::write_tables(mem, &apic_ids, &mmio)?;
    log::info!("kernel command line: {}", cfg.cmdline);
    loader::write_boot_params(mem, &mut params, &cfg.cmdline, initrd, cfg.memory, rsdp)?;
    cpu::write_boot_tables(mem)?;
    Ok(kernel.entry)
}

struct VirtioIrq(IrqLine);
impl virtio_mmio::InterruptLine for VirtioIrq {
    fn trigger(&self) {
        self.0.pulse();
    }
}

/// Opens a disk image as a virtio-blk device behind a virtio-mmio transport.
pub(super) fn open_disk(
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

/// Rebuilds a virtio-blk device and its virtio-mmio transport from a snapshot's state, on the
/// image `path` (the snapshot's own copy of the disk: only its capacity is checked).
pub(super) fn restore_disk(
    path: &Path,
    state: &virtio_mmio::MmioTransportState,
    mem: &GuestMemoryMmap,
    line: IrqLine,
) -> Result<virtio_mmio::MmioTransport, Error> {
    use snapshot::Persist;
    let err = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| Error::Restore {
        what: format!("disk {} ({what})", path.display()),
        source: e,
    };
    let block_state: virtio_blk_dist::BlockState = state
        .device_state()
        .map_err(|e| err("device state", Box::new(e)))?;
    let block = virtio_blk_dist::Block::restore(
        virtio_blk_dist::BlockRestoreArgs {
            path: path.to_path_buf(),
            check: virtio_blk_dist::DiskCheck::SizeOnly,
        },
        &block_state,
    )
    .map_err(|e| err("virtio-blk", Box::new(e)))?;
    virtio_mmio::MmioTransport::restore(
        virtio_mmio::MmioTransportArgs {
            device: Box::new(block),
            mem: mem.clone(),
            line: Arc::new(VirtioIrq(line)),
        },
        state,
    )
    .map_err(|e| err("virtio-mmio transport", Box::new(e)))
}

/// A host's live membership in a cluster.
pub(super) struct Net {
    pub(super) spec: ClusterSpec,
    pub(super) transport: Arc<dyn Transport>,
    tcp: Arc<transport::TcpTransport>,
}

impl Net {
    pub(super) fn shutdown(&self) {
        self.tcp.shutdown();
    }
}

/// How long a host waits for every other host to connect.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to every other host of the cluster (they connect to `listener`).
pub(super) fn join_cluster(spec: ClusterSpec, listener: TcpListener) -> Result<Net, Error> {
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
