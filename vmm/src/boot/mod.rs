//! Everything that happens once before the first `KVM_RUN`: loading the kernel and initrd, the
//! zero page and e820 map, ACPI tables, and the initial CPU state of the boot processor.

pub mod acpi;
pub mod aml;
pub mod cpu;
pub mod loader;
