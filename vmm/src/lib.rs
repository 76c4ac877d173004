//! ssi-vmm: the per-host VMM of a distributed single-system-image hypervisor.
//!
//! This crate boots an unmodified Linux guest on KVM with the interrupt controllers (local
//! APICs, IOAPIC) emulated in the VMM rather than in KVM, so that later IPIs and device
//! interrupts can cross hosts. See `docs/ARCHITECTURE.md` for the whole picture.
//!
//! - [`config`]: validated machine configuration.
//! - [`layout`]: guest-physical memory map.
//! - [`boot`]: kernel/initrd loading, zero page, ACPI, initial CPU state.
//! - [`irq`]: glue to the `irqchip` crate (userspace local APICs and IOAPIC): vCPU kicker,
//!   device interrupt lines.
//! - [`devices`]: serial, legacy ports, MMIO/PIO dispatch, virtio-mmio windows.
//! - [`vcpu`]: the KVM_RUN loop, and [`vcpu::quirks`], fix-ups for emulating hosts.
//! - [`vm`]: the [`vm::Vm`] of this host: building, running, pausing and stopping a machine,
//!   alone or as one host of a cluster.
//! - [`cluster`]: placement, cross-host interrupts and I/O, `host`/`up`/`status`.
//! - [`control`]: the per-process control socket (`pause`, `resume`, `status`).

pub mod boot;
pub mod cluster;
pub mod config;
pub mod control;
pub mod devices;
pub mod irq;
pub mod layout;
pub mod stats;
pub mod stop;
pub mod vcpu;
pub mod vm;
