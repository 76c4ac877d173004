//! Machine configuration: what `ssi-vmm run` was asked to build, validated before anything is
//! created so that bad input gives a clear error and no half-built VM.

use std::path::PathBuf;

use crate::layout::{CMDLINE_MAX, MIN_MEMORY};

/// Most vCPUs one machine may have (the MADT and the guest's NR_CPUS allow 256).
pub const MAX_VCPUS: u8 = u8::MAX;
/// Guest RAM set aside below an initrd for the kernel image (loaded at 16 MiB).
pub const KERNEL_ROOM: u64 = 32 << 20;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors in a machine configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A size string could not be parsed.
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    BadSize(String),
    /// Zero vCPUs.
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    BadCpuCount(u32),
    /// Too little or too much memory.
    #[error("--memory must be between {} MiB and {} GiB, got {} bytes", MIN_MEMORY >> 20, MAX_MEMORY >> 30, .0)]
    BadMemory(u64),
    /// The memory size is not page aligned.
    #[error("--memory must be a multiple of 4 KiB, got {0} bytes")]
    UnalignedMemory(u64),
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX} including what ssi-vmm appends")]
    CmdlineTooLong(usize),
    /// A file named in the configuration cannot be opened.
    #[error("cannot open {what} {path:?}: {source}")]
    Unreadable {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd cannot fit in guest RAM next to a kernel.
    #[error("initrd {path:?} is {size} bytes; it cannot fit in {memory} bytes of guest memory")]
    InitrdTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest RAM.
        memory: u64,
    },
    /// A disk image is not a regular file or block device.
    #[error("disk {0:?} is not a regular file")]
    DiskNotFile(PathBuf),
    /// Too many disks for the IRQ lines we hand out.
    #[error("at most {0} disks are supported")]
    TooManyDisks(usize),
    /// A `--disk` option is not `ro` or `host=N`.
    #[error("invalid disk option {0:?} (expected PATH[,ro][,host=N])")]
    BadDiskOption(String),
    /// A disk's home host is not in the machine.
    #[error("disk {path:?} is on host {host}, but the machine has {hosts} host(s)")]
    DiskHost {
        /// The disk.
        path: PathBuf,
        /// Its home host.
        host: usize,
        /// Hosts in the machine.
        hosts: usize,
    },
}

/// One virtio-blk disk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Expose the disk read-only.
    pub read_only: bool,
    /// Home host: the host that opens the image and emulates the device (0 on one host).
    pub host: usize,
}

/// Parses `PATH[,ro][,host=N]` (options are taken from the end, so a path may hold commas).
pub fn parse_disk(spec: &str) -> Result<DiskConfig, Error> {
    let mut path = spec;
    let (mut read_only, mut host) = (false, 0);
    while let Some((head, opt)) = path.rsplit_once(',') {
        if opt == "ro" {
            read_only = true;
        } else if let Some(n) = opt.strip_prefix("host=") {
            host = n
                .parse()
                .map_err(|_| Error::BadDiskOption(opt.to_string()))?;
        } else {
            break;
        }
        path = head;
    }
    if path.is_empty() {
        return Err(Error::BadDiskOption(spec.to_string()));
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
        host,
    })
}

/// A validated machine configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line given by the user (ssi-vmm appends what its devices need).
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// Where to write exit statistics as JSON when the VM stops.
    pub stats_json: Option<PathBuf>,
}

/// The command line used when none is given: measured on this machine's emulating KVM, see
/// `docs/ARCHITECTURE.md` ("Host quirks").
/// XSAVE stays on (user code uses the host's AVX-512, whose state the guest kernel must switch;
/// the VMM emulates XSAVE/XRSTOR), but only the standard form: `clearcpuid=xsaveopt,xsavec,xsaves`.
/// `nofsgsbase nopcid`: the host forces FSGSBASE on in CPUID leaf 7; both are kept off (PCID is
/// also hidden in CPUID) to keep the guest on the paths measured here.
/// `random.trust_cpu=on`: the guest has no other entropy source (no virtio-rng, the lean kernel
/// does not trust RDRAND by default), so its CRNG was never ready during a 25-minute Debian
/// boot and getrandom() callers (systemd-random-seed and others) waited for minutes.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 tsc=reliable no_timer_check \
nokaslr nofsgsbase nopcid clearcpuid=ssse3,popcnt,xsaveopt,xsavec,xsaves \
cryptomgr.notests rodata=off random.trust_cpu=on";

/// Parses `512M`, `1G`, `1048576`, `2g` and the like into bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(Error::BadSize(s.to_string())),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| Error::BadSize(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Error::BadSize(s.to_string()))
}

impl VmConfig {
    /// Checks the machine shape (vCPUs, memory, disk count): what every host of a cluster
    /// needs; files are checked by [`VmConfig::validate`] where they are used.
    pub fn validate_machine(&self) -> Result<(), Error> {
        if self.cpus == 0 {
            return Err(Error::BadCpuCount(u32::from(self.cpus)));
        }
        if self.memory < MIN_MEMORY || self.memory > MAX_MEMORY {
            return Err(Error::BadMemory(self.memory));
        }
        if !self.memory.is_multiple_of(4096) {
            return Err(Error::UnalignedMemory(self.memory));
        }
        if self.disks.len() > crate::layout::VIRTIO_IRQS.len() {
            return Err(Error::TooManyDisks(crate::layout::VIRTIO_IRQS.len()));
        }
        Ok(())
    }

    /// Checks everything [`VmConfig::validate_machine`] checks, and that the kernel, initrd
    /// and every disk can be used here (one host, or a cluster started from this machine).
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_machine()?;
        self.validate_files(None)
    }

    /// The file checks of host `me` of a cluster of `hosts`: the kernel and initrd on the boot
    /// host `boot_host` (the placement's, host 0 by default), each disk on its home host.
    pub fn validate_host(&self, me: usize, hosts: usize, boot_host: usize) -> Result<(), Error> {
        self.validate_machine()?;
        if let Some(d) = self.disks.iter().find(|d| d.host >= hosts) {
            return Err(Error::DiskHost {
                path: d.path.clone(),
                host: d.host,
                hosts,
            });
        }
        self.validate_files(Some((me, boot_host)))
    }

    /// Checks the files used on host `me` whose boot host is `boot` (every file when None).
    fn validate_files(&self, me: Option<(usize, usize)>) -> Result<(), Error> {
        let boot = me.is_none_or(|(m, b)| m == b);
        let me = me.map(|(m, _)| m);
        let here = |h: usize| me.is_none_or(|m| m == h);
        let readable = |what, path: &PathBuf| {
            std::fs::File::open(path)
                .map(|_| ())
                .map_err(|source| Error::Unreadable {
                    what,
                    path: path.clone(),
                    source,
                })
        };
        if boot {
            readable("kernel", &self.kernel)?;
        }
        if let Some(initrd) = self.initrd.as_ref().filter(|_| boot) {
            readable("initrd", initrd)?;
            let size = std::fs::metadata(initrd).map(|m| m.len()).unwrap_or(0);
            // The kernel is loaded at 16 MiB; the initrd must fit above it in low memory.
            let room = self
                .memory
                .min(crate::layout::INITRD_MAX_END)
                .saturating_sub(KERNEL_ROOM);
            if size > room {
                return Err(Error::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    memory: self.memory,
                });
            }
        }
        for d in self.disks.iter().filter(|d| here(d.host)) {
            let res = std::fs::OpenOptions::new()
                .read(true)
                .write(!d.read_only)
                .open(&d.path);
            let f = res.map_err(|source| Error::Unreadable {
                what: "disk",
                path: d.path.clone(),
                source,
            })?;
            if f.metadata().map(|m| m.is_dir()).unwrap_or(true) {
                return Err(Error::DiskNotFile(d.path.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disk("/a/b.img").unwrap();
        assert_eq!((d.path, d.read_only, d.host), ("/a/b.img".into(), false, 0));
        let d = parse_disk("/a/b.img,ro,host=2").unwrap();
        assert_eq!((d.path, d.read_only, d.host), ("/a/b.img".into(), true, 2));
        let d = parse_disk("/a,b.img,host=1").unwrap();
        assert_eq!((d.path, d.read_only, d.host), ("/a,b.img".into(), false, 1));
        assert!(matches!(
            parse_disk("x.img,host=two"),
            Err(Error::BadDiskOption(_))
        ));
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    fn base() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/proc/self/exe"),
            initrd: None,
            cmdline: String::new(),
            memory: 256 << 20,
            cpus: 1,
            disks: vec![],
            stats_json: None,
        }
    }

    #[test]
    fn validation() {
        assert!(base().validate().is_ok());
        let mut c = base();
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(Error::BadCpuCount(0))));
        let mut c = base();
        c.memory = 1 << 20;
        assert!(matches!(c.validate(), Err(Error::BadMemory(_))));
        let mut c = base();
        c.kernel = PathBuf::from("/nonexistent/vmlinux");
        assert!(matches!(c.validate(), Err(Error::Unreadable { .. })));
    }
}
