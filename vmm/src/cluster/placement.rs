//! [`Placement`]: where each part of the one machine lives: which host runs each vCPU, which
//! host is home of the IOAPIC, the console and legacy devices, each disk, the status reports,
//! the boot loading, and each chunk of guest RAM's DSM directory.
//!
//! Every host holds the same placement. Today it is built from the cluster file on every host,
//! identically ([`Placement::initial`], carried in [`crate::cluster::ClusterSpec`]), and never
//! changes while the machine runs; a snapshot restored onto another number of hosts, or a live
//! migration, will install another one with a higher `epoch`. The sites that used to say
//! "host 0" (boot loading, stdin, the IOAPIC, level EOIs, `IrqPulse`, port I/O, status) and the
//! DSM's `(pfn / chunk) % hosts` interleave now read it.
//!
//! Why here and not in `proto` or `dsm-vm`: the placement speaks of vCPUs, disks, consoles and
//! boot loading, which are VMM notions that neither the wire protocol (a hand-written binary
//! codec of small messages) nor the DSM knows. The DSM only needs the page-home table, which it
//! gets as [`dsm_vm::HomePolicy::Table`] ([`Placement::home_policy`]), so `dsm-vm` keeps not
//! depending on `vmm`. When a placement has to travel (snapshot manifest, migration), it is
//! plain serde data and goes as a serialized blob; it is validated on arrival with
//! [`Placement::validate`] like any untrusted input.

use serde::{Deserialize, Serialize};

use super::spec::MAX_HOSTS;

/// Errors in a placement: the field at fault and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// `epoch` is 0 (epochs start at 1).
    #[error("placement: epoch must be at least 1")]
    Epoch,
    /// `hosts` is 0 or above [`MAX_HOSTS`].
    #[error("placement: hosts must be between 1 and {MAX_HOSTS}, got {0}")]
    Hosts(u16),
    /// `home_chunk_pages` is 0.
    #[error("placement: home_chunk_pages must be at least 1")]
    ChunkPages,
    /// A list has the wrong length.
    #[error("placement: {field} has {got} entries, the machine needs {want}")]
    Length {
        /// The field.
        field: &'static str,
        /// Entries present.
        got: usize,
        /// Entries needed.
        want: usize,
    },
    /// A host index is not below `hosts`.
    #[error("placement: {field}{} names host {host}, but there are only {hosts} hosts",
        .index.map(|i| format!("[{i}]")).unwrap_or_default())]
    Host {
        /// The field.
        field: &'static str,
        /// Entry index for lists.
        index: Option<usize>,
        /// The host named.
        host: u16,
        /// Host count.
        hosts: u16,
    },
    /// The boot host does not run vCPU 0 (the BSP it sets up).
    #[error("placement: boot_host {boot} does not run vCPU 0 (it is on host {bsp})")]
    BootHost {
        /// `boot_host`.
        boot: u16,
        /// `vcpu_host[0]`.
        bsp: u16,
    },
}

/// Where everything of the machine lives (plain serde data, identical on every host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Version: a new placement replaces the current one only with a higher epoch (from 1).
    pub epoch: u64,
    /// Number of hosts (host ids are `0..hosts`).
    pub hosts: u16,
    /// Host of each vCPU.
    pub vcpu_host: Vec<u16>,
    /// Home of the IOAPIC: level EOIs and `IrqPulse` go there.
    pub ioapic_home: u16,
    /// Home of the serial console and the legacy ports (i8042, ACPI sleep registers); reads
    /// stdin.
    pub console_home: u16,
    /// Host that loads the kernel, initrd and ACPI tables and sets up the BSP (vCPU 0).
    pub boot_host: u16,
    /// Host that collects the other hosts' `Status` and writes the status file.
    pub status_home: u16,
    /// Home host of each virtio disk.
    pub disk_home: Vec<u16>,
    /// Pages per chunk of `page_home`.
    pub home_chunk_pages: u64,
    /// DSM home of each chunk of guest page frames: chunk `pfn / home_chunk_pages`. Covers
    /// page frames 0 up to the end of guest RAM, the MMIO hole included.
    pub page_home: Vec<u16>,
}

/// Chunks needed to cover guest RAM of `memory` bytes (the MMIO hole included).
pub fn chunk_count(memory: u64, home_chunk_pages: u64) -> usize {
    let end = crate::layout::ram_regions(memory)
        .iter()
        .map(|(a, l)| (a + l) / proto::PAGE_SIZE as u64)
        .max()
        .unwrap_or(0);
    usize::try_from(end.div_ceil(home_chunk_pages.max(1))).unwrap_or(usize::MAX)
}

impl Placement {
    /// Today's layout: vCPUs numbered host by host (`cpus[h]` on host `h`), disks at their
    /// configured homes, everything else at host 0, and guest RAM of `memory` bytes
    /// interleaved by chunk of `home_chunk_pages` pages over the hosts (chunk `c` on host
    /// `c % hosts`). Epoch 1.
    pub fn initial(cpus: &[u8], disk_home: &[usize], memory: u64, home_chunk_pages: u64) -> Self {
        let hosts = cpus.len().max(1);
        Placement {
            epoch: 1,
            hosts: hosts as u16,
            vcpu_host: cpus
                .iter()
                .enumerate()
                .flat_map(|(h, n)| std::iter::repeat_n(h as u16, usize::from(*n)))
                .collect(),
            ioapic_home: 0,
            console_home: 0,
            boot_host: 0,
            status_home: 0,
            disk_home: disk_home.iter().map(|h| *h as u16).collect(),
            home_chunk_pages,
            page_home: (0..chunk_count(memory, home_chunk_pages))
                .map(|c| (c % hosts) as u16)
                .collect(),
        }
    }

    /// Checks a placement as untrusted input against the machine: `cpus` vCPUs, `disks`
    /// disks, `memory` bytes of guest RAM.
    pub fn validate(&self, cpus: usize, disks: usize, memory: u64) -> Result<(), Error> {
        if self.epoch == 0 {
            return Err(Error::Epoch);
        }
        if self.hosts == 0 || usize::from(self.hosts) > MAX_HOSTS {
            return Err(Error::Hosts(self.hosts));
        }
        if self.home_chunk_pages == 0 {
            return Err(Error::ChunkPages);
        }
        let chunks = chunk_count(memory, self.home_chunk_pages);
        for (field, got, want) in [
            ("vcpu_host", self.vcpu_host.len(), cpus),
            ("disk_home", self.disk_home.len(), disks),
            ("page_home", self.page_home.len(), chunks),
        ] {
            if got != want {
                return Err(Error::Length { field, got, want });
            }
        }
        let hosts = self.hosts;
        let one = |field, index, host: u16| {
            if host < hosts {
                Ok(())
            } else {
                Err(Error::Host {
                    field,
                    index,
                    host,
                    hosts,
                })
            }
        };
        one("ioapic_home", None, self.ioapic_home)?;
        one("console_home", None, self.console_home)?;
        one("boot_host", None, self.boot_host)?;
        one("status_home", None, self.status_home)?;
        for (field, list) in [
            ("vcpu_host", &self.vcpu_host),
            ("disk_home", &self.disk_home),
            ("page_home", &self.page_home),
        ] {
            for (i, h) in list.iter().enumerate() {
                one(field, Some(i), *h)?;
            }
        }
        match self.vcpu_host.first() {
            Some(&bsp) if bsp != self.boot_host => Err(Error::BootHost {
                boot: self.boot_host,
                bsp,
            }),
            _ => Ok(()),
        }
    }

    /// The host of each vCPU, as indexes.
    pub fn cpu_hosts(&self) -> Vec<usize> {
        self.vcpu_host.iter().map(|h| usize::from(*h)).collect()
    }

    /// The home host of each disk, as indexes.
    pub fn disk_homes(&self) -> Vec<usize> {
        self.disk_home.iter().map(|h| usize::from(*h)).collect()
    }

    /// The vCPUs of host `host`.
    pub fn vcpus_of(&self, host: usize) -> impl Iterator<Item = usize> + '_ {
        self.vcpu_host
            .iter()
            .enumerate()
            .filter(move |(_, h)| usize::from(**h) == host)
            .map(|(i, _)| i)
    }

    /// The page homes for the DSM.
    pub fn home_policy(&self) -> dsm_vm::HomePolicy {
        dsm_vm::HomePolicy::Table {
            chunk_pages: self.home_chunk_pages,
            homes: self.page_home.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::HostId;

    const MIB: u64 = 1 << 20;

    #[test]
    fn initial_reproduces_the_old_layout() {
        for (cpus, memory, chunk) in [
            (vec![1u8], 512 * MIB, 512u64),
            (vec![1, 2], 1024 * MIB, 512),
            (vec![2, 1, 3], 4096 * MIB, 512),
            (vec![1, 1, 1, 1, 1], 6144 * MIB, 7),
            (vec![4; 8], 768 * MIB, 1),
        ] {
            let p = Placement::initial(&cpus, &[0, cpus.len() - 1], memory, chunk);
            p.validate(cpus.iter().map(|c| usize::from(*c)).sum(), 2, memory)
                .unwrap();
            // vCPUs host by host.
            let want: Vec<usize> = cpus
                .iter()
                .enumerate()
                .flat_map(|(h, n)| std::iter::repeat_n(h, usize::from(*n)))
                .collect();
            assert_eq!(p.cpu_hosts(), want);
            assert_eq!(p.disk_homes(), vec![0, cpus.len() - 1]);
            assert_eq!(
                (p.ioapic_home, p.console_home, p.boot_host, p.status_home),
                (0, 0, 0, 0)
            );
            // Page homes equal the old modulo interleave on every page of guest RAM.
            let hosts: Vec<HostId> = (0..cpus.len() as u16).map(HostId).collect();
            let old = dsm_vm::HomePolicy::Interleave { chunk_pages: chunk };
            let new = p.home_policy();
            for (first, len) in crate::layout::ram_regions(memory) {
                let (first, len) = (first / 4096, len / 4096);
                for pfn in (first..first + len).step_by(97).chain([first + len - 1]) {
                    assert_eq!(
                        dsm_vm::ram::home_of(&new, &hosts, pfn),
                        dsm_vm::ram::home_of(&old, &hosts, pfn),
                        "pfn {pfn:#x} of {cpus:?}/{memory}/{chunk}"
                    );
                }
            }
        }
    }

    /// Breaks one field of a placement.
    type Spoil = fn(&mut Placement);

    fn good() -> Placement {
        Placement::initial(&[1, 2, 1], &[0, 2], 1024 * MIB, 512)
    }

    #[test]
    fn validation_names_the_bad_field() {
        let check = |p: &Placement| p.validate(4, 2, 1024 * MIB);
        assert_eq!(check(&good()), Ok(()));
        let cases: Vec<(Spoil, &str)> = vec![
            (|p| p.epoch = 0, "epoch"),
            (|p| p.hosts = 0, "hosts"),
            (|p| p.hosts = 65, "hosts"),
            (|p| p.home_chunk_pages = 0, "home_chunk_pages"),
            (|p| p.vcpu_host.push(0), "vcpu_host has 5"),
            (
                |p| p.disk_home.pop().map(drop).unwrap_or(()),
                "disk_home has 1",
            ),
            (|p| p.page_home.push(0), "page_home has"),
            (|p| p.ioapic_home = 3, "ioapic_home names host 3"),
            (|p| p.console_home = 9, "console_home names host 9"),
            (|p| p.boot_host = 3, "boot_host names host 3"),
            (|p| p.status_home = 3, "status_home names host 3"),
            (|p| p.vcpu_host[2] = 3, "vcpu_host[2] names host 3"),
            (|p| p.disk_home[1] = 7, "disk_home[1] names host 7"),
            (|p| p.page_home[5] = 3, "page_home[5] names host 3"),
            (|p| p.boot_host = 1, "boot_host 1 does not run vCPU 0"),
        ];
        for (spoil, want) in cases {
            let mut p = good();
            spoil(&mut p);
            let e = check(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        // Another machine shape is refused too.
        assert!(good().validate(4, 2, 2048 * MIB).is_err());
        assert!(good().validate(3, 2, 1024 * MIB).is_err());
    }

    #[test]
    fn serde_round_trip() {
        let mut p = good();
        p.epoch = 7;
        p.ioapic_home = 1;
        let json = serde_json::to_string(&p).unwrap();
        let back: Placement = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        let extra = json.replacen('{', "{\"bogus\":1,", 1);
        assert!(serde_json::from_str::<Placement>(&extra).is_err());
    }
}
