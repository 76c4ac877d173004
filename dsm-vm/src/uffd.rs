//! A minimal userfaultfd binding: the kernel ABI structs from `<linux/userfaultfd.h>` as
//! `#[repr(C)]` over `libc`, and the handful of ioctls the DSM needs (missing + write-protect
//! modes on anonymous memory). No `UFFD_USER_MODE_ONLY`: faults taken by the kernel on behalf of
//! KVM (guest accesses) are delivered too.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use thiserror::Error;

/// Page granularity of every operation here.
pub const PAGE: usize = 4096;

const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault member of the union is decoded.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (`_IO(0xAA, 0x00)`).
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const COPY_MODE_WP: u64 = 2;
const WRITEPROTECT_MODE_WP: u64 = 1;
const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const FLAG_WP: u64 = 2;

/// userfaultfd failures.
#[derive(Debug, Error)]
pub enum Error {
    /// Neither the syscall nor `/dev/userfaultfd` gave a descriptor.
    #[error("userfaultfd unavailable (syscall: {syscall}; /dev/userfaultfd: {dev})")]
    Open {
        /// Syscall error.
        syscall: io::Error,
        /// Device error.
        dev: io::Error,
    },
    /// The kernel lacks something the DSM needs.
    #[error("userfaultfd: kernel lacks {0}")]
    Unsupported(&'static str),
    /// An ioctl failed.
    #[error("{op} at {addr:#x}: {err}")]
    Ioctl {
        /// Operation.
        op: &'static str,
        /// Address.
        addr: u64,
        /// errno.
        err: io::Error,
    },
    /// Reading fault events failed.
    #[error("reading userfaultfd events: {0}")]
    Read(io::Error),
}

/// One page fault reported by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address (page aligned by the kernel unless EXACT_ADDRESS was asked for).
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
    /// The page is present but write-protected.
    pub wp: bool,
}

/// An open userfaultfd with the write-protect feature enabled.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// Opens a non-blocking userfaultfd (syscall, falling back to `/dev/userfaultfd`) and
    /// negotiates `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub fn new() -> Result<Uffd, Error> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall with integer flags; the result is checked below.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as RawFd
        } else {
            let syscall = errno();
            Self::open_dev(flags).map_err(|dev| Error::Open { syscall, dev })?
        };
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r < 0 {
            let err = errno();
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Err(Error::Unsupported("UFFD_FEATURE_PAGEFAULT_FLAG_WP"));
            }
            return Err(Error::Ioctl {
                op: "UFFDIO_API",
                addr: 0,
                err,
            });
        }
        if api.features & FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(Error::Unsupported("UFFD_FEATURE_PAGEFAULT_FLAG_WP"));
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    fn open_dev(flags: i32) -> Result<RawFd, io::Error> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as an integer argument and returns a new fd.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd < 0 {
            Err(errno())
        } else {
            Ok(fd)
        }
    }

    /// Features the kernel reported.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn ioctl<T>(&self, op: &'static str, req: u64, arg: &mut T, addr: u64) -> Result<(), Error> {
        // A few retries: EAGAIN means the address space was changing under the operation.
        for _ in 0..100 {
            // SAFETY: every caller passes the request matching `T`'s kernel struct.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
            if r == 0 {
                return Ok(());
            }
            let err = errno();
            if err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(Error::Ioctl { op, addr, err });
            }
            std::thread::yield_now();
        }
        Err(Error::Ioctl {
            op,
            addr,
            err: io::Error::from_raw_os_error(libc::EAGAIN),
        })
    }

    /// Registers `[addr, addr+len)` in missing + write-protect modes.
    pub fn register(&self, addr: u64, len: u64) -> Result<(), Error> {
        let mut r = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut r, addr)?;
        for (bit, name) in [
            (0x02, "UFFDIO_WAKE"),
            (0x03, "UFFDIO_COPY"),
            (0x04, "UFFDIO_ZEROPAGE"),
            (0x06, "UFFDIO_WRITEPROTECT"),
        ] {
            if r.ioctls & (1 << bit) == 0 {
                return Err(Error::Unsupported(name));
            }
        }
        Ok(())
    }

    /// Installs a copy of `src` at the missing page `dst` and wakes its waiters; read-only
    /// (write-protected) unless `writable`.
    pub fn copy(&self, dst: u64, src: &[u8; PAGE], writable: bool) -> Result<(), Error> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: PAGE as u64,
            mode: if writable { 0 } else { COPY_MODE_WP },
            copy: 0,
        };
        self.ioctl("UFFDIO_COPY", UFFDIO_COPY, &mut c, dst)
    }

    /// Maps the shared zero page at the missing page `dst` (writable: the first write
    /// allocates silently, so use it only for exclusive grants) and wakes its waiters.
    pub fn zeropage(&self, dst: u64) -> Result<(), Error> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst,
                len: PAGE as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        self.ioctl("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, &mut z, dst)
    }

    /// Sets (`wp`) or clears write protection on a present page; clearing wakes waiters.
    pub fn write_protect(&self, addr: u64, wp: bool) -> Result<(), Error> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: addr,
                len: PAGE as u64,
            },
            mode: if wp { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, &mut w, addr)
    }

    /// Wakes threads waiting on a fault in the page at `addr` (they retry the access).
    pub fn wake(&self, addr: u64) -> Result<(), Error> {
        let mut r = UffdioRange {
            start: addr,
            len: PAGE as u64,
        };
        self.ioctl("UFFDIO_WAKE", UFFDIO_WAKE, &mut r, addr)
    }

    /// Reads pending page faults without blocking; returns how many were stored in `out`.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<usize, Error> {
        let mut msgs = [UffdMsg::default(); 64];
        // SAFETY: the buffer is `msgs`, writable for its full size; the kernel writes whole
        // 32-byte `uffd_msg` records.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast::<libc::c_void>(),
                size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = errno();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(Error::Read(e)),
            };
        }
        let count = n as usize / size_of::<UffdMsg>();
        let before = out.len();
        for m in &msgs[..count] {
            if m.event == EVENT_PAGEFAULT {
                let flags = m.arg[0];
                out.push(Fault {
                    addr: m.arg[1],
                    write: flags & FLAG_WRITE != 0,
                    wp: flags & FLAG_WP != 0,
                });
            }
        }
        Ok(out.len() - before)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Drops a page (`MADV_DONTNEED`): the next access faults as missing.
pub fn discard(addr: u64) -> Result<(), Error> {
    // SAFETY: `addr` is a page of an anonymous mapping owned by the caller; discarding it only
    // affects its contents, which the DSM protocol has already copied or given up.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) };
    if r < 0 {
        return Err(Error::Ioctl {
            op: "MADV_DONTNEED",
            addr,
            err: errno(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_match_the_kernel() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioCopy>(), 40);
        assert_eq!(size_of::<UffdioZeropage>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    }

    /// The DSM grants untouched pages for writing with UFFDIO_ZEROPAGE; a downgrade may
    /// write-protect that zero-page mapping before the writer's first store. The store must
    /// then raise a write-protect fault, not a silent copy-on-write.
    #[test]
    fn write_protected_zero_page_reports_the_write() {
        let u = Uffd::new().unwrap();
        // SAFETY: a fresh private anonymous mapping of one page, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let a = base as u64;
        u.register(a, PAGE as u64).unwrap();
        u.zeropage(a).unwrap();
        u.write_protect(a, true).unwrap();
        let writer = std::thread::spawn(move || {
            // SAFETY: a store to the mapping; it blocks in a WP fault until resolved below.
            unsafe { std::ptr::write_volatile(a as *mut u8, 9) };
        });
        let mut f = Vec::new();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while f.is_empty() {
            assert!(
                std::time::Instant::now() < end,
                "no write-protect fault reported"
            );
            u.read_faults(&mut f).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            f[0],
            Fault {
                addr: a,
                write: true,
                wp: true
            }
        );
        u.write_protect(a, false).unwrap();
        writer.join().unwrap();
        // SAFETY: the writer is done; the page is present.
        assert_eq!(unsafe { *(a as *const u8) }, 9);
        // SAFETY: nothing uses the mapping any more.
        unsafe { libc::munmap(base, PAGE) };
    }

    #[test]
    fn kernel_supports_write_protect_on_anonymous_memory() {
        let u = Uffd::new().expect("userfaultfd");
        assert_ne!(u.features() & FEATURE_PAGEFAULT_FLAG_WP, 0);
        // SAFETY: a fresh private anonymous mapping of 4 pages, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let a = base as u64;
        u.register(a, 4 * PAGE as u64).unwrap();
        let data = [0x5au8; PAGE];
        u.copy(a, &data, false).unwrap();
        // SAFETY: the page was just installed; reading it does not fault.
        assert_eq!(unsafe { *(a as *const u8) }, 0x5a);
        // A second install of a present page fails with EEXIST.
        assert!(matches!(u.copy(a, &data, false), Err(Error::Ioctl { .. })));
        u.write_protect(a, false).unwrap();
        // SAFETY: write protection was just cleared; the write does not fault.
        unsafe { *(a as *mut u8) = 1 };
        u.write_protect(a, true).unwrap();
        u.zeropage(a + PAGE as u64).unwrap();
        discard(a).unwrap();
        let mut f = Vec::new();
        assert_eq!(u.read_faults(&mut f).unwrap(), 0);
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(base, 4 * PAGE) };
    }
}
