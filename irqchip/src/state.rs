//! Saved states: plain serde data, apart from the live objects, converted through
//! [`snapshot::Persist`] ([`crate::LocalApic`] to [`LapicState`], [`crate::Ioapic`] to
//! [`IoapicState`]). They hold no host resource and no host time: every timer value is in
//! guest-TSC cycles. Restoring validates them as untrusted input (see the `Persist` impls).

use serde::{Deserialize, Serialize};

/// Saved state of one local APIC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LapicState {
    /// APIC ID (the vCPU index).
    pub id: u8,
    /// `IA32_APIC_BASE`: base address, BSP (bit 8), x2APIC mode (EXTD, bit 10), global enable
    /// (EN, bit 11).
    pub apic_base: u64,
    /// Interrupt request register: vector `v` is bit `v % 32` of word `v / 32`.
    pub irr: [u32; 8],
    /// In-service register (same layout).
    pub isr: [u32; 8],
    /// Trigger mode register, 1 = level (same layout).
    pub tmr: [u32; 8],
    /// Task priority register.
    pub tpr: u32,
    /// Logical destination register.
    pub ldr: u32,
    /// Destination format register (xAPIC).
    pub dfr: u32,
    /// Spurious-interrupt vector register (bit 8: APIC software enable).
    pub svr: u32,
    /// Error status register.
    pub esr: u32,
    /// Interrupt command register: command in bits 0-31, destination above (xAPIC: bits 56-63;
    /// x2APIC: bits 32-63).
    pub icr: u64,
    /// Local vector table: timer, thermal, performance counters, LINT0, LINT1, error (register
    /// order, `0x320..=0x370`).
    pub lvt: [u32; 6],
    /// The timer.
    pub timer: TimerState,
    /// An NMI accepted and not yet injected.
    pub nmi_pending: bool,
    /// Where the vCPU is in the INIT/SIPI protocol.
    pub run_state: SavedRunState,
}

/// Saved state of a local APIC timer, in guest-TSC time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TimerState {
    /// Initial-count register (counting modes).
    pub initial_count: u32,
    /// Divide-configuration register.
    pub divide_config: u32,
    /// `IA32_TSC_DEADLINE` as the guest wrote it (0: disarmed; only in TSC-deadline mode).
    pub tsc_deadline: u64,
    /// Guest TSC at which the timer fires next (None: not armed): the MSR value in TSC-deadline
    /// mode, the TSC at which the count reaches zero in the counting modes.
    pub next_fire_tsc: Option<u64>,
    /// Guest TSC cycles between fires (periodic mode only).
    pub period_tsc: Option<u64>,
}

/// Saved INIT/SIPI state of the vCPU behind a local APIC.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedRunState {
    /// Waiting for INIT + SIPI.
    WaitForSipi,
    /// A SIPI arrived; the vCPU starts in real mode at `vector << 12`.
    Starting {
        /// The SIPI vector.
        vector: u8,
    },
    /// Running guest code.
    Running,
}

/// Saved state of the IOAPIC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IoapicState {
    /// IOAPIC ID (bits 24-31 of the ID register).
    pub id: u8,
    /// `IOREGSEL`: the register `IOWIN` accesses.
    pub ioregsel: u32,
    /// The redirection table: one entry per input pin, remote IRR (bit 14) included.
    pub redirection: Vec<u64>,
    /// Input pin levels: bit `n` set = pin `n` asserted.
    pub pin_levels: u32,
}
