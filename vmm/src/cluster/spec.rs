//! The cluster description: the TOML file a user writes (or `up --local` generates), and the
//! per-host [`ClusterSpec`] derived from it.
//!
//! ```toml
//! name = "demo"                 # cluster name (its id is derived from it)
//! memory = "1G"
//! kernel = "/path/vmlinux"      # read on the boot host only (host 0)
//! initrd = "/path/initramfs.cpio"
//! append = "ssi.test=boot"      # optional; `cmdline` replaces the default command line
//! home_chunk_pages = 512        # DSM home interleave (pages per chunk)
//!
//! [[host]]
//! addr = "127.0.0.1:7100"       # where this host's `ssi-vmm host` listens
//! cpus = 1
//!
//! [[host]]
//! addr = "127.0.0.1:7101"
//! cpus = 1
//!
//! [[disk]]
//! path = "/path/disk.img"       # read on its home host
//! read_only = false
//! host = 1                      # home host (default 0): opens the image, emulates the device
//! ```
//!
//! The cluster key is never in this file: each host daemon reads it from its `--key-file`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::placement::Placement;
use crate::config::{self, DiskConfig, VmConfig};

/// Most hosts in one cluster (the DSM directory keeps a 64-bit sharer set).
pub const MAX_HOSTS: usize = 64;

/// Errors in a cluster description.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TOML text is malformed or has unknown fields.
    #[error("cluster file: {0}")]
    Toml(String),
    /// A machine parameter is invalid.
    #[error(transparent)]
    Machine(#[from] config::Error),
    /// The host list is empty, too long, or has a host without vCPUs.
    #[error("cluster file: {0}")]
    Hosts(String),
    /// A host address does not parse.
    #[error("cluster file: host {index}: bad address {addr:?}: {detail}")]
    Addr {
        /// Host index.
        index: usize,
        /// The address given.
        addr: String,
        /// Parser message.
        detail: String,
    },
}

/// One `[[host]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// Listen address of the host daemon (and of its cluster transport).
    pub addr: String,
    /// vCPUs this host runs.
    pub cpus: u32,
}

/// One `[[disk]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Raw image path (on its home host).
    pub path: PathBuf,
    /// Read-only?
    #[serde(default)]
    pub read_only: bool,
    /// Home host (index into `[[host]]`): where the image is opened and the device emulated;
    /// the other hosts forward the device's MMIO there.
    #[serde(default)]
    pub host: usize,
}

/// The cluster TOML file (plain serde data).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Cluster name.
    pub name: String,
    /// Guest RAM, e.g. "1G".
    pub memory: String,
    /// Guest kernel (the boot host's path: host 0's).
    pub kernel: PathBuf,
    /// Initrd (the boot host's path: host 0's).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Replaces the default kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Appended to the command line.
    #[serde(default)]
    pub append: String,
    /// DSM home interleave: consecutive pages with the same home host.
    #[serde(default = "default_chunk")]
    pub home_chunk_pages: u64,
    /// Hosts, in host-id order.
    #[serde(rename = "host")]
    pub hosts: Vec<HostEntry>,
    /// Disks (each served by its `host`).
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskEntry>,
}

fn default_chunk() -> u64 {
    512
}

/// A host of the cluster as every host sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    /// Where it listens.
    pub addr: SocketAddr,
    /// How many vCPUs it runs.
    pub cpus: u8,
}

/// Everything one host needs to take part (derived from the file, plus its own identity).
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Cluster name.
    pub name: String,
    /// Cluster id (derived from the name; peers with another id are refused).
    pub cluster_id: u64,
    /// This host's index in `hosts`.
    pub me: usize,
    /// Every host in id order.
    pub hosts: Vec<HostSpec>,
    /// DSM home interleave.
    pub home_chunk_pages: u64,
    /// Shared key (from the daemon's key file).
    pub key: Vec<u8>,
    /// Guest clock epoch: host CLOCK_REALTIME (ns) at which guest time is zero.
    pub epoch_ns: u64,
    /// Where the status home (host 0 by default) writes the cluster status (None: nowhere).
    pub state_dir: Option<PathBuf>,
    /// Where everything lives (identical on every host; [`Placement::initial`] of the file).
    pub placement: Placement,
}

impl ClusterFile {
    /// Parses and checks a cluster file.
    pub fn parse(text: &str) -> Result<ClusterFile, Error> {
        let f: ClusterFile = toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))?;
        f.check()?;
        Ok(f)
    }

    /// The file as TOML text.
    pub fn to_toml(&self) -> Result<String, Error> {
        toml::to_string(self).map_err(|e| Error::Toml(e.to_string()))
    }

    fn check(&self) -> Result<(), Error> {
        if self.hosts.is_empty() || self.hosts.len() > MAX_HOSTS {
            return Err(Error::Hosts(format!(
                "between 1 and {MAX_HOSTS} [[host]] entries are needed, got {}",
                self.hosts.len()
            )));
        }
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(Error::Hosts("name must be 1 to 64 characters".into()));
        }
        if self.home_chunk_pages == 0 {
            return Err(Error::Hosts("home_chunk_pages must be at least 1".into()));
        }
        self.addrs()?;
        if let Some((i, _)) = self.hosts.iter().enumerate().find(|(_, h)| h.cpus == 0) {
            return Err(Error::Hosts(format!("host {i} has no vCPUs")));
        }
        if let Some(h) = self.hosts.iter().find(|h| h.cpus > u32::from(u8::MAX)) {
            return Err(config::Error::BadCpuCount(h.cpus).into());
        }
        let total: u32 = self.hosts.iter().map(|h| h.cpus).sum();
        u8::try_from(total).map_err(|_| config::Error::BadCpuCount(total))?;
        if let Some(d) = self.disks.iter().find(|d| d.host >= self.hosts.len()) {
            return Err(config::Error::DiskHost {
                path: d.path.clone(),
                host: d.host,
                hosts: self.hosts.len(),
            }
            .into());
        }
        Ok(())
    }

    /// Host addresses, parsed.
    pub fn addrs(&self) -> Result<Vec<SocketAddr>, Error> {
        let mut v = Vec::new();
        for (index, h) in self.hosts.iter().enumerate() {
            let a: SocketAddr =
                h.addr
                    .parse()
                    .map_err(|e: std::net::AddrParseError| Error::Addr {
                        index,
                        addr: h.addr.clone(),
                        detail: e.to_string(),
                    })?;
            if v.contains(&a) {
                return Err(Error::Hosts(format!("address {a} is listed twice")));
            }
            v.push(a);
        }
        Ok(v)
    }

    /// The machine as a [`VmConfig`] (files are checked only where they are used: the boot
    /// host and the disk homes).
    pub fn vm_config(&self) -> Result<VmConfig, Error> {
        let memory = config::parse_size(&self.memory)?;
        let total: u32 = self.hosts.iter().map(|h| h.cpus).sum();
        let cpus = u8::try_from(total).map_err(|_| config::Error::BadCpuCount(total))?;
        let base = self
            .cmdline
            .clone()
            .unwrap_or_else(|| config::DEFAULT_CMDLINE.to_string());
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: format!("{base} {}", self.append).trim().to_string(),
            memory,
            cpus,
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    host: d.host,
                })
                .collect(),
            stats_json: None,
        })
    }

    /// The spec of host `me`.
    pub fn spec(
        &self,
        me: usize,
        key: Vec<u8>,
        epoch_ns: u64,
        state_dir: Option<PathBuf>,
    ) -> Result<ClusterSpec, Error> {
        if me >= self.hosts.len() {
            return Err(Error::Hosts(format!(
                "host id {me} is not in the file ({} hosts)",
                self.hosts.len()
            )));
        }
        let addrs = self.addrs()?;
        let placement = self.placement()?;
        Ok(ClusterSpec {
            name: self.name.clone(),
            cluster_id: cluster_id(&self.name),
            me,
            hosts: addrs
                .into_iter()
                .zip(&self.hosts)
                .map(|(addr, h)| HostSpec {
                    addr,
                    cpus: u8::try_from(h.cpus).unwrap_or(u8::MAX),
                })
                .collect(),
            home_chunk_pages: self.home_chunk_pages,
            key,
            epoch_ns,
            state_dir,
            placement,
        })
    }

    /// The initial placement of the machine this file describes (the same on every host).
    pub fn placement(&self) -> Result<Placement, Error> {
        let memory = config::parse_size(&self.memory)?;
        let cpus: Vec<u8> = self
            .hosts
            .iter()
            .map(|h| u8::try_from(h.cpus).unwrap_or(u8::MAX))
            .collect();
        let disks: Vec<usize> = self.disks.iter().map(|d| d.host).collect();
        Ok(Placement::initial(
            &cpus,
            &disks,
            memory,
            self.home_chunk_pages,
        ))
    }
}

/// A stable 64-bit id for a cluster name (FNV-1a).
pub fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl ClusterSpec {
    /// The host index of every vCPU (from the placement).
    pub fn cpu_hosts(&self) -> Vec<usize> {
        self.placement.cpu_hosts()
    }

    /// Total vCPUs.
    pub fn total_cpus(&self) -> usize {
        self.hosts.iter().map(|h| usize::from(h.cpus)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
memory = "512M"
kernel = "/k"
[[host]]
addr = "127.0.0.1:7000"
cpus = 1
[[host]]
addr = "127.0.0.1:7001"
cpus = 2
"#;

    #[test]
    fn parses_and_places_vcpus() {
        let f = ClusterFile::parse(GOOD).unwrap();
        let s = f.spec(1, vec![0; 32], 0, None).unwrap();
        assert_eq!(s.cpu_hosts(), vec![0, 1, 1]);
        assert_eq!(f.vm_config().unwrap().cpus, 3);
        let again = ClusterFile::parse(&f.to_toml().unwrap()).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let cases = [
            (
                "name = \"t\"\nmemory = \"1G\"\nkernel = \"/k\"\nhost = []\n",
                "between 1",
            ),
            (&GOOD.replace("cpus = 2", "cpus = 0"), "no vCPUs"),
            (&GOOD.replace("7001", "7000"), "listed twice"),
            (&GOOD.replace("127.0.0.1:7001", "nowhere"), "bad address"),
            (&GOOD.replace("cpus = 2", "cpus = 300"), "--cpus"),
            (&format!("{GOOD}\nbogus = 1\n"), "unknown field"),
            ("name = ", "cluster file"),
        ];
        for (text, want) in cases {
            let e = ClusterFile::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        let f = ClusterFile::parse(GOOD).unwrap();
        assert!(f.spec(2, vec![], 0, None).is_err());
    }
}
