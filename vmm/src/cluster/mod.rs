//! One machine across several `ssi-vmm` host processes.
//!
//! - [`spec`]: what a host needs to know about the cluster (placement, peers, key, time epoch)
//!   and the TOML cluster file it comes from;
//! - [`fabric`]: the runtime links between hosts: interrupt messages to remote vCPUs,
//!   forwarded device I/O, stop propagation, status reports;
//! - [`launch`]: the `host` daemon, `up` (TOML or `--local N`) and the job hand-off between them;
//! - [`placement`]: which host runs each vCPU and is home of each device, the IOAPIC, the
//!   status, the boot loading and each chunk of guest RAM's directory;
//! - [`status`]: the cluster status file written by the status home and read by `ssi-vmm status`.
//!
//! The initial placement: vCPUs are numbered host by host (host 0 has vCPUs `0..n0`, host 1 the
//! next `n1`, ...); vCPU 0, the IOAPIC, the console, the legacy devices and the status live on
//! host 0, each disk on its configured host, and guest RAM is interleaved by chunk.

pub mod checkpoint;
pub mod fabric;
pub mod launch;
pub mod placement;
pub mod shadow;
pub mod snapshot;
pub mod spec;
pub mod status;
pub mod timesync;

pub use fabric::Fabric;
pub use placement::Placement;
pub use spec::{ClusterFile, ClusterSpec, HostSpec};
