//! The interrupt controllers of an ssi-vmm machine, emulated in userspace: one local APIC per
//! vCPU ([`LocalApic`]: xAPIC MMIO and x2APIC MSR interfaces, timer with TSC-deadline mode), the
//! IOAPIC ([`Ioapic`]), the APIC-bus messages between them ([`Message`]) and the router that
//! delivers them ([`IrqChip`]). Keeping them out of KVM is what lets IPIs and device interrupts
//! cross hosts.
//!
//! The crate has no KVM and no threads: the VMM drives it. Register accesses return
//! [`Effect`]s instead of acting, the IOAPIC returns messages instead of delivering them, time
//! comes in as arguments (host `Instant`s, mapped to guest-TSC time by a [`GuestClock`]), a
//! running vCPU is interrupted through the [`Kick`] its thread installs, and other hosts are
//! reached through [`RemoteIrq`]. Everything is therefore unit-testable.
//!
//! Saved states ([`state`]) are plain serde structs apart from the live objects, converted
//! through [`snapshot::Persist`]; restoring validates them as untrusted input.

pub mod bus;
pub mod chip;
pub mod ioapic;
pub mod lapic;
pub mod state;

pub use bus::{DeliveryMode, Effect, GeneralProtection, Message, Shorthand, X2APIC_BROADCAST};
pub use chip::{IrqChip, RemoteIrq};
pub use ioapic::{Ioapic, IoapicStateError};
pub use lapic::{GuestClock, Kick, LapicArgs, LapicStateError, LocalApic, RunState};
pub use state::{IoapicState, LapicState, SavedRunState, TimerState};
