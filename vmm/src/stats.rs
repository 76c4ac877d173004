//! Exit statistics: counts by exit reason, dumped when the VM stops.

use std::sync::atomic::{AtomicU64, Ordering};

/// Exit reasons counted.
#[derive(Clone, Copy, Debug)]
pub enum Exit {
    /// Port I/O.
    Pio,
    /// MMIO to the local APIC.
    LapicMmio,
    /// MMIO to the IOAPIC.
    IoapicMmio,
    /// Other MMIO (virtio).
    DeviceMmio,
    /// HLT.
    Hlt,
    /// Interrupt window opened.
    IrqWindow,
    /// KVM_RUN interrupted by a kick.
    Kick,
    /// RDMSR/WRMSR handled by the VMM.
    Msr,
    /// Emulation failure fixed up.
    EmulationFailure,
    /// Guest RAM access handed to the VMM as MMIO (an interrupted userfaultfd wait, see
    /// `vcpu::ram_exit`).
    RamAccess,
    /// Emulation failure retried (an instruction the fix-ups do not know, run again in case
    /// its memory access was cut short by a signal).
    EmulationRetry,
    /// Anything else.
    Other,
}

const NAMES: [&str; 12] = [
    "pio",
    "lapic_mmio",
    "ioapic_mmio",
    "device_mmio",
    "hlt",
    "irq_window",
    "kick",
    "msr",
    "emulation_failure",
    "ram_access",
    "emulation_retry",
    "other",
];

/// Counters shared by all vCPUs.
#[derive(Default)]
pub struct Stats {
    exits: [AtomicU64; 12],
    /// Interrupts injected with KVM_INTERRUPT.
    pub injected: AtomicU64,
}

impl Stats {
    /// Counts one exit; returns how many of its kind there were, this one included.
    pub fn count(&self, e: Exit) -> u64 {
        self.exits[e as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// (name, count) pairs.
    pub fn exits(&self) -> Vec<(&'static str, u64)> {
        NAMES
            .iter()
            .zip(self.exits.iter())
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }
}
