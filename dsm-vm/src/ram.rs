//! The guest RAM mapping of one host and the page-number layout shared by all hosts.

use proto::{HostId, Pfn, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use std::io;
use thiserror::Error;

/// Errors building the layout or the mapping.
#[derive(Debug, Error)]
pub enum Error {
    /// A region is empty, unaligned or overlaps another.
    #[error("bad region {gpa:#x}+{len:#x}: {why}")]
    BadRegion {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// `mmap` failed.
    #[error("mmap of {len:#x} bytes for guest RAM at {gpa:#x}: {err}")]
    Mmap {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
        /// errno.
        err: io::Error,
    },
}

/// Which host is the home (directory keeper) of each page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HomePolicy {
    /// Chunks of `chunk_pages` consecutive page frames go to hosts in turn:
    /// home = hosts[(pfn / chunk_pages) % hosts.len()].
    Interleave {
        /// Pages per chunk (at least 1).
        chunk_pages: u64,
    },
    /// An explicit table (the VMM's placement): home = `HostId(homes[pfn / chunk_pages])`.
    /// The table covers every page frame from 0 to the end of the highest region (holes
    /// included), so a lookup is one division and one index.
    Table {
        /// Pages per chunk (at least 1).
        chunk_pages: u64,
        /// Home host id of each chunk (each one of the cluster's hosts).
        homes: Vec<u16>,
    },
}

impl HomePolicy {
    /// Checks the policy against the cluster's `hosts` and the guest RAM `layout`: a chunk
    /// size of at least 1 and, for a table, a known host for every chunk and a chunk for every
    /// page of guest RAM.
    pub fn check(&self, hosts: &[HostId], layout: &Layout) -> Result<(), String> {
        match self {
            HomePolicy::Interleave { chunk_pages: 0 }
            | HomePolicy::Table { chunk_pages: 0, .. } => {
                Err("chunk_pages must be at least 1".into())
            }
            HomePolicy::Interleave { .. } => Ok(()),
            HomePolicy::Table { chunk_pages, homes } => {
                if let Some((i, h)) = homes
                    .iter()
                    .enumerate()
                    .find(|(_, h)| !hosts.contains(&HostId(**h)))
                {
                    return Err(format!(
                        "home table: chunk {i} names host {h}, not in the cluster"
                    ));
                }
                let end = layout.regions().map(|(f, n)| f + n).max().unwrap_or(0);
                let need = end.div_ceil(*chunk_pages);
                if (homes.len() as u64) < need {
                    return Err(format!(
                        "home table has {} chunks, guest RAM needs {need}",
                        homes.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Guest RAM regions as page-frame ranges, with a dense index over all their pages.
#[derive(Clone, Debug)]
pub struct Layout {
    /// (first pfn, page count, dense index of the first page).
    ranges: Vec<(Pfn, u64, usize)>,
    pages: usize,
}

impl Layout {
    /// Builds the layout of `regions` (guest-physical start, length), page aligned, disjoint.
    pub fn new(regions: &[(u64, u64)]) -> Result<Layout, Error> {
        let mut sorted = regions.to_vec();
        sorted.sort();
        let mut ranges = Vec::new();
        let mut pages = 0usize;
        let mut end = 0u64;
        for (i, &(gpa, len)) in sorted.iter().enumerate() {
            let bad = |why| Err(Error::BadRegion { gpa, len, why });
            if len == 0 {
                return bad("empty");
            }
            if gpa % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 {
                return bad("not page aligned");
            }
            if i > 0 && gpa < end {
                return bad("overlaps the previous region");
            }
            let Some(e) = gpa.checked_add(len) else {
                return bad("wraps around");
            };
            end = e;
            let n = len / PAGE_SIZE as u64;
            ranges.push((gpa / PAGE_SIZE as u64, n, pages));
            pages += n as usize;
        }
        Ok(Layout { ranges, pages })
    }

    /// Dense index of `pfn`, or `None` outside guest RAM.
    pub fn index(&self, pfn: Pfn) -> Option<usize> {
        self.ranges
            .iter()
            .find(|(first, n, _)| pfn >= *first && pfn - first < *n)
            .map(|(first, _, base)| base + (pfn - first) as usize)
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The (first pfn, page count) of each region.
    pub fn regions(&self) -> impl Iterator<Item = (Pfn, u64)> + '_ {
        self.ranges.iter().map(|(f, n, _)| (*f, *n))
    }
}

/// Returns the home of `pfn` among `hosts` under `policy`.
/// (A table too short for `pfn`, which [`HomePolicy::check`] refuses, gives the first host.)
pub fn home_of(policy: &HomePolicy, hosts: &[HostId], pfn: Pfn) -> HostId {
    match policy {
        HomePolicy::Interleave { chunk_pages } => {
            let i = (pfn / (*chunk_pages).max(1)) % hosts.len().max(1) as u64;
            hosts.get(i as usize).copied().unwrap_or_default()
        }
        HomePolicy::Table { chunk_pages, homes } => usize::try_from(pfn / (*chunk_pages).max(1))
            .ok()
            .and_then(|c| homes.get(c))
            .map(|h| HostId(*h))
            .unwrap_or_else(|| hosts.first().copied().unwrap_or_default()),
    }
}

/// One mapped region.
#[derive(Debug)]
struct Mapped {
    gpa: u64,
    len: u64,
    host: u64,
}

/// Anonymous private mappings holding this host's view of all guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    maps: Vec<Mapped>,
}

impl GuestRam {
    /// Reserves every region (`MAP_NORESERVE`, no transparent huge pages: the DSM moves 4 KiB
    /// pages). Nothing is populated.
    pub fn map(regions: &[(u64, u64)]) -> Result<GuestRam, Error> {
        let mut ram = GuestRam { maps: Vec::new() };
        for &(gpa, len) in regions {
            // SAFETY: a new private anonymous mapping at an address the kernel picks; it does
            // not alias anything. It is unmapped in `Drop`.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                let err = io::Error::last_os_error();
                return Err(Error::Mmap { gpa, len, err });
            }
            // SAFETY: advice on the mapping just created. Failure only costs performance
            // (huge pages would be split by the first MADV_DONTNEED), so it is ignored.
            unsafe { libc::madvise(p, len as usize, libc::MADV_NOHUGEPAGE) };
            ram.maps.push(Mapped {
                gpa,
                len,
                host: p as u64,
            });
        }
        Ok(ram)
    }

    /// Host virtual address of guest-physical `gpa`.
    pub fn host_addr(&self, gpa: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|m| gpa >= m.gpa && gpa - m.gpa < m.len)
            .map(|m| m.host + (gpa - m.gpa))
    }

    /// Guest-physical address of host address `host`.
    pub fn guest_addr(&self, host: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|m| host >= m.host && host - m.host < m.len)
            .map(|m| m.gpa + (host - m.host))
    }

    /// (guest-physical start, length, host address) of each region.
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.maps.iter().map(|m| (m.gpa, m.len, m.host))
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for m in &self.maps {
            // SAFETY: the mapping was created in `map` and nothing uses it after the last
            // owner of this `GuestRam` is gone.
            unsafe { libc::munmap(m.host as *mut libc::c_void, m.len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_indexes_pages_across_the_hole() {
        let l = Layout::new(&[(0x1_0000_0000, 0x2000), (0, 0x3000)]).unwrap();
        assert_eq!(l.pages(), 5);
        assert_eq!(l.index(0), Some(0));
        assert_eq!(l.index(2), Some(2));
        assert_eq!(l.index(3), None);
        assert_eq!(l.index(0x10_0000), Some(3));
        assert_eq!(l.index(0x10_0001), Some(4));
        assert_eq!(l.index(0x10_0002), None);
    }

    #[test]
    fn bad_regions_are_refused() {
        assert!(Layout::new(&[(0, 0)]).is_err());
        assert!(Layout::new(&[(1, 0x1000)]).is_err());
        assert!(Layout::new(&[(0, 0x2000), (0x1000, 0x1000)]).is_err());
        assert!(Layout::new(&[(u64::MAX - 0xfff, 0x2000)]).is_err());
    }

    #[test]
    fn interleaving() {
        let hosts = [HostId(4), HostId(7)];
        let p = HomePolicy::Interleave { chunk_pages: 2 };
        let homes: Vec<u16> = (0..6).map(|pfn| home_of(&p, &hosts, pfn).0).collect();
        assert_eq!(homes, vec![4, 4, 7, 7, 4, 4]);
    }

    #[test]
    fn table_homes() {
        let hosts = [HostId(0), HostId(1), HostId(2)];
        let p = HomePolicy::Table {
            chunk_pages: 2,
            homes: vec![2, 0, 0, 1],
        };
        let homes: Vec<u16> = (0..8).map(|pfn| home_of(&p, &hosts, pfn).0).collect();
        assert_eq!(homes, vec![2, 2, 0, 0, 0, 0, 1, 1]);
        let layout = Layout::new(&[(0, 8 * PAGE_SIZE as u64)]).unwrap();
        assert!(p.check(&hosts, &layout).is_ok());
        let big = Layout::new(&[(0, 9 * PAGE_SIZE as u64)]).unwrap();
        assert!(p.check(&hosts, &big).unwrap_err().contains("needs 5"));
        assert!(p
            .check(&hosts[..2], &layout)
            .unwrap_err()
            .contains("host 2"));
        let zero = HomePolicy::Table {
            chunk_pages: 0,
            homes: vec![0],
        };
        assert!(zero.check(&hosts, &layout).is_err());
    }

    #[test]
    fn mapping_translates_addresses() {
        let ram = GuestRam::map(&[(0, 0x4000), (0x10_0000, 0x1000)]).unwrap();
        let a = ram.host_addr(0x1234).unwrap();
        assert_eq!(a, ram.host_addr(0).unwrap() + 0x1234);
        assert!(ram.host_addr(0x4000).is_none());
        assert!(ram.host_addr(0x10_0fff).is_some());
        let h = ram.host_addr(0x10_0123).unwrap();
        assert_eq!(ram.guest_addr(h), Some(0x10_0123));
        assert_eq!(ram.guest_addr(1), None);
        assert_eq!(ram.regions().count(), 2);
    }
}
