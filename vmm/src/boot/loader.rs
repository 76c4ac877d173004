//! Kernel, initrd and zero-page setup for the Linux 64-bit boot protocol.
//!
//! An ELF `vmlinux` is preferred on emulating hosts (the bzImage decompressor runs for minutes
//! there); a bzImage is accepted too. Either way the VMM enters the kernel's 64-bit entry point
//! directly, with `boot_params` at [`ZERO_PAGE`](crate::layout::ZERO_PAGE).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Errors while loading the guest's kernel and initrd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelIo {
        /// Path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a loadable x86_64 kernel (ELF vmlinux or bzImage): {detail}")]
    BadKernel {
        /// Path.
        path: String,
        /// What the loader said.
        detail: String,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdIo {
        /// Path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory (room for {room} bytes above the kernel)")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
    /// The command line contains a NUL byte or is too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Loads the kernel (ELF or bzImage) and returns its entry point; `params` receives the setup
/// header of a bzImage.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    params: &mut boot_params,
) -> Result<LoadedKernel, Error> {
    let name = path.display().to_string();
    let io = |source| Error::KernelIo {
        path: name.clone(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(|e| Error::BadKernel {
        path: name.clone(),
        detail: format!("too short ({e})"),
    })?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            Error::BadKernel {
                path: name.clone(),
                detail: e.to_string(),
            }
        })?;
        Ok(LoadedKernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
        })
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            Error::BadKernel {
                path: name.clone(),
                detail: e.to_string(),
            }
        })?;
        let hdr = r.setup_header.ok_or_else(|| Error::BadKernel {
            path: name.clone(),
            detail: "bzImage without setup header".into(),
        })?;
        params.hdr = hdr;
        // The 64-bit entry point is 0x200 bytes into the protected-mode code.
        Ok(LoadedKernel {
            entry: r.kernel_load.0 + 0x200,
            end: r.kernel_end,
        })
    }
}

/// Copies the initrd to the top of low memory (below 2 GiB) and returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    ram_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), Error> {
    let name = path.display().to_string();
    let io = |source| Error::InitrdIo {
        path: name.clone(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let top = ram_size.min(MMIO_HOLE_START).min(INITRD_MAX_END);
    let lowest = kernel_end.max(HIMEM_START).next_multiple_of(4096);
    let room = top.saturating_sub(lowest);
    if size > room {
        return Err(Error::InitrdTooLarge { size, room });
    }
    let addr = (top - size) & !0xfff;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| Error::GuestWrite("initrd"))?;
    Ok((addr, size))
}

/// Fills in the zero page (command line, initrd, e820 map, RSDP) and writes it, with the command
/// line, into guest memory.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: &mut boot_params,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    ram_size: u64,
    rsdp: u64,
) -> Result<(), Error> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.as_bytes().contains(&0) {
        return Err(Error::Cmdline(format!(
            "{} bytes (limit {}), or contains NUL",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| Error::GuestWrite("command line"))?;

    let hdr = &mut params.hdr;
    if hdr.header != 0x5372_6448 {
        // ELF vmlinux: no setup header in the image, build the fields the kernel reads.
        hdr.header = 0x5372_6448; // "HdrS"
        hdr.version = 0x020f;
        hdr.kernel_alignment = 0x0100_0000;
    }
    hdr.boot_flag = 0xaa55;
    hdr.type_of_loader = 0xff;
    hdr.loadflags |= 1; // LOADED_HIGH
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = CMDLINE_MAX as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, BIOS_END - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_regions(ram_size) {
        let s = start.max(HIMEM_START);
        e820.push((s, start + len - s, E820_RAM));
    }
    for (i, (addr, size, type_)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        params.e820_entries = (i + 1) as u8;
    }
    mem.write_obj(*params, GuestAddress(ZERO_PAGE))
        .map_err(|_| Error::GuestWrite("boot_params"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let p = std::env::temp_dir().join(format!("ssi-garbage-{}", std::process::id()));
        std::fs::write(&p, vec![0x55u8; 8192]).unwrap();
        let mut bp = boot_params::default();
        let e = load_kernel(&mem(), &p, &mut bp).unwrap_err();
        assert!(matches!(e, Error::BadKernel { .. }), "{e}");
        std::fs::write(&p, b"ab").unwrap();
        assert!(matches!(
            load_kernel(&mem(), &p, &mut bp),
            Err(Error::BadKernel { .. })
        ));
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn oversized_initrd_is_rejected() {
        let p = std::env::temp_dir().join(format!("ssi-initrd-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(80 << 20).unwrap();
        let e = load_initrd(&mem(), &p, 64 << 20, 16 << 20).unwrap_err();
        assert!(matches!(e, Error::InitrdTooLarge { .. }), "{e}");
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn e820_covers_ram_minus_bios_area() {
        let m = mem();
        let mut bp = boot_params::default();
        write_boot_params(&m, &mut bp, "console=ttyS0", None, 64 << 20, ACPI_START).unwrap();
        let n = bp.e820_entries as usize;
        let ram: u64 = bp.e820_table[..n]
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, EBDA_START + (64 << 20) - HIMEM_START);
        assert!(write_boot_params(&m, &mut bp, &"x".repeat(4000), None, 64 << 20, 0).is_err());
    }
}
