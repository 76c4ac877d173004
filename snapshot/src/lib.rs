//! Snapshots of an ssi-vmm machine.
//!
//! Every component that has state to save (vCPUs, local APICs, the IOAPIC, devices, ...) keeps
//! it in a plain serde struct apart from the live object and converts through [`Persist`]: `save`
//! takes a consistent copy of a paused component, `restore` builds a live component from a saved
//! state and validates that state as untrusted input (a snapshot file may be corrupt or forged),
//! so a value out of range is an error naming the field, never a panic or a silently wrong
//! machine.

pub mod persist;

pub use persist::Persist;
