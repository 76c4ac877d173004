//! Memory files: guest pages in a sparse file at offset = guest-physical address, and the page
//! index that says which pages the file holds.
//!
//! A memory file `NAME.mem` has the apparent size of the end of its last guest-physical range
//! and holds the bytes of a data page of address `gpa` at offset `gpa`; nothing else is ever
//! written, so zero pages, untouched pages and the holes between ranges take no disk space,
//! and a restore can copy (or a lazy restore `pread`) any page straight from its address.
//!
//! Its page index `NAME.idx` lists the pages the file holds, as runs of consecutive pages,
//! each run either *data* (bytes in the file) or *zero* (the page is zero; nothing written).
//! A page in no run is *not in this layer*: in a full snapshot a page the guest never touched
//! (zero), in an incremental one a page not written since the parent (read from the parent).
//! Every data page has an XXH3-64 checksum in the index, so a page read alone (lazy restore)
//! is verified alone; the manifest holds the SHA-256 of the index. Index layout, little-endian:
//!
//! ```text
//! 0   magic "SSIVMIDX"
//! 8   u32 index version (1)        12  u32 page size (4096)
//! 16  u64 run count R              24  u64 data page count D
//! 32  R x { u64 first page number (gpa / 4096), u32 page count, u32 kind: 0 zero, 1 data }
//!     runs sorted by first page, disjoint, inside the file's ranges
//! 32 + 16 R   D x u64 XXH3-64 of each data page, in address order
//! ```
//!
//! A [`MemoryFileWriter`] takes pages in any order from any number of threads (`&self`);
//! several hosts each write their own file into the same snapshot directory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::checksum::{is_zero_page, page_hash, sha256_hex, PAGE_SIZE};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{GpaRange, MemoryFileRef};

const MAGIC: &[u8; 8] = b"SSIVMIDX";
const INDEX_VERSION: u32 = 1;
const HEADER: usize = 32;
const RUN: usize = 16;
const PAGE: u64 = PAGE_SIZE as u64;
/// Pages read by one `pread` when verifying a whole file.
const VERIFY_CHUNK_PAGES: u64 = 256;

/// Where a page comes from, as far as one layer (or a whole chain) knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// The page's bytes were read (and verified) into the caller's buffer.
    Data,
    /// The page is zero; nothing was read and the buffer is untouched.
    Zero,
    /// The layer does not record the page: read it from the parent. From a whole chain: no
    /// layer records it, a page the guest never touched, which is zero.
    NotInLayer,
}

/// What a run of pages holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// Bytes in the memory file.
    Data,
    /// Zero pages, no bytes written.
    Zero,
}

/// Consecutive pages of one kind in one memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u64,
    /// What they hold.
    pub kind: PageKind,
}

/// Writes one memory file and its page index.
///
/// Pages may come in any order and from several threads at once; each page at most once.
/// Zero pages are recorded in the index and not written. [`finish`](Self::finish) writes the
/// index, makes both files durable and returns the [`MemoryFileRef`] for the manifest (plain
/// serde data: a host that is not host 0 sends it to host 0).
#[derive(Debug)]
pub struct MemoryFileWriter {
    data_path: PathBuf,
    index_path: PathBuf,
    data_name: String,
    index_name: String,
    file: File,
    ranges: Vec<GpaRange>,
    size: u64,
    /// (page number << 1 | is data, checksum), in arrival order.
    pages: Mutex<Vec<(u64, u64)>>,
}

impl MemoryFileWriter {
    /// Creates `dir/NAME.mem` (sparse, apparent size = end of the last range) for pages of
    /// `ranges` (sorted, disjoint, page aligned) and later `dir/NAME.idx`. Refuses existing
    /// files.
    pub fn create(dir: &Path, name: &str, ranges: &[GpaRange]) -> Result<Self> {
        let data_name = format!("{name}.mem");
        let index_name = format!("{name}.idx");
        let data_path = dir.join(&data_name);
        let mut prev_end = 0u64;
        for r in ranges {
            let ok = r.len > 0
                && r.start.is_multiple_of(PAGE)
                && r.len.is_multiple_of(PAGE)
                && r.start >= prev_end
                && r.start.checked_add(r.len).is_some();
            if !ok {
                return Err(Error::invalid(
                    &data_path,
                    format!(
                        "range {:#x}+{:#x} is empty, unaligned, overflowing, unsorted or \
                         overlapping",
                        r.start, r.len
                    ),
                ));
            }
            prev_end = r.end();
        }
        if ranges.is_empty() {
            return Err(Error::invalid(&data_path, "no guest-physical ranges"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&data_path)
            .at(&data_path, "create")?;
        // Extending with set_len leaves a hole: no block is allocated until a page is written.
        file.set_len(prev_end).at(&data_path, "set size")?;
        Ok(MemoryFileWriter {
            index_path: dir.join(&index_name),
            data_path,
            data_name,
            index_name,
            file,
            ranges: ranges.to_vec(),
            size: prev_end,
            pages: Mutex::new(Vec::new()),
        })
    }

    /// Records the page at `gpa`.
    pub fn write_page(&self, gpa: u64, page: &[u8; PAGE_SIZE]) -> Result<()> {
        self.write_pages(gpa, page)
    }

    /// Records the consecutive pages `data` (a multiple of the page size) starting at `gpa`;
    /// consecutive data pages go to the file in one write.
    pub fn write_pages(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let bad = |gpa, reason| Error::BadPage {
            path: self.data_path.clone(),
            gpa,
            reason,
        };
        if !gpa.is_multiple_of(PAGE) || !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(bad(gpa, "address or length not page aligned"));
        }
        let end = gpa
            .checked_add(data.len() as u64)
            .ok_or(bad(gpa, "outside the file's ranges"))?;
        if !data.is_empty() && !self.ranges.iter().any(|r| r.start <= gpa && end <= r.end()) {
            return Err(bad(gpa, "outside the file's ranges"));
        }
        let mut recs = Vec::with_capacity(data.len() / PAGE_SIZE);
        // Start (index into `data`) of the pending batch of consecutive data pages.
        let mut batch: Option<usize> = None;
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let page: &[u8; PAGE_SIZE] = page.try_into().expect("chunks_exact gives pages");
            let pfn = gpa / PAGE + i as u64;
            if is_zero_page(page) {
                recs.push((pfn << 1, 0));
                if let Some(s) = batch.take() {
                    self.write_at(gpa, data, s, i)?;
                }
            } else {
                recs.push((pfn << 1 | 1, page_hash(page)));
                batch.get_or_insert(i);
            }
        }
        if let Some(s) = batch {
            self.write_at(gpa, data, s, data.len() / PAGE_SIZE)?;
        }
        self.pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(recs);
        Ok(())
    }

    /// Writes pages `from..to` of `data` (which starts at `gpa`).
    fn write_at(&self, gpa: u64, data: &[u8], from: usize, to: usize) -> Result<()> {
        self.file
            .write_all_at(
                &data[from * PAGE_SIZE..to * PAGE_SIZE],
                gpa + (from * PAGE_SIZE) as u64,
            )
            .at(&self.data_path, "write")
    }

    /// Writes the page index, fsyncs both files, and returns the manifest entry. Fails if a
    /// page was recorded twice.
    pub fn finish(self) -> Result<MemoryFileRef> {
        let mut pages = self.pages.into_inner().unwrap_or_else(|e| e.into_inner());
        pages.sort_unstable_by_key(|&(key, _)| key >> 1);
        if let Some(w) = pages.windows(2).find(|w| w[0].0 >> 1 == w[1].0 >> 1) {
            return Err(Error::BadPage {
                path: self.data_path,
                gpa: (w[0].0 >> 1) * PAGE,
                reason: "written twice",
            });
        }
        // Runs: maximal stretches of consecutive pages of one kind (split at u32::MAX pages).
        let mut runs: Vec<(u64, u32, u32)> = Vec::new();
        let mut hashes: Vec<u64> = Vec::new();
        let (mut data_pages, mut zero_pages) = (0u64, 0u64);
        for &(key, hash) in &pages {
            let (pfn, kind) = (key >> 1, (key & 1) as u32);
            if kind == 1 {
                hashes.push(hash);
                data_pages += 1;
            } else {
                zero_pages += 1;
            }
            match runs.last_mut() {
                Some((first, count, k))
                    if *k == kind && *first + u64::from(*count) == pfn && *count < u32::MAX =>
                {
                    *count += 1
                }
                _ => runs.push((pfn, 1, kind)),
            }
        }
        let mut index = Vec::with_capacity(HEADER + RUN * runs.len() + 8 * hashes.len());
        index.extend_from_slice(MAGIC);
        index.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        index.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        index.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        index.extend_from_slice(&data_pages.to_le_bytes());
        for &(first, count, kind) in &runs {
            index.extend_from_slice(&first.to_le_bytes());
            index.extend_from_slice(&count.to_le_bytes());
            index.extend_from_slice(&kind.to_le_bytes());
        }
        for h in &hashes {
            index.extend_from_slice(&h.to_le_bytes());
        }
        self.file.sync_all().at(&self.data_path, "fsync")?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.index_path)
            .at(&self.index_path, "create")?;
        std::io::Write::write_all(&mut f, &index).at(&self.index_path, "write")?;
        f.sync_all().at(&self.index_path, "fsync")?;
        Ok(MemoryFileRef {
            file: self.data_name,
            size: self.size,
            ranges: self.ranges,
            index: self.index_name,
            index_size: index.len() as u64,
            index_sha256: sha256_hex(&index),
            pages_data: data_pages,
            pages_zero: zero_pages,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Run {
    first_page: u64,
    count: u64,
    data: bool,
    /// Index of the run's first checksum in `hashes` (data runs).
    hash_base: usize,
}

/// One memory file of a snapshot, opened and its index checked.
#[derive(Debug)]
pub struct MemoryFile {
    path: PathBuf,
    file: File,
    entry: MemoryFileRef,
    runs: Vec<Run>,
    hashes: Vec<u64>,
}

impl MemoryFile {
    /// Opens the memory file `entry` of the snapshot in `dir`: checks the data file's size,
    /// the index's size and SHA-256, and every value in the index. Page data is checked as it
    /// is read ([`read_page`](Self::read_page)) or all at once ([`verify`](Self::verify)).
    pub fn open(dir: &Path, entry: &MemoryFileRef) -> Result<Self> {
        let path = dir.join(&entry.file);
        let file = File::open(&path).at(&path, "open")?;
        let size = file.metadata().at(&path, "stat")?.len();
        if size != entry.size {
            return Err(Error::Size {
                path,
                expected: entry.size,
                actual: size,
            });
        }
        let index_path = dir.join(&entry.index);
        let index = read_checked(&index_path, entry.index_size, &entry.index_sha256)?;
        let (runs, hashes) = parse_index(&index_path, &index, entry)?;
        Ok(MemoryFile {
            path,
            file,
            entry: entry.clone(),
            runs,
            hashes,
        })
    }

    /// Path of the data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The manifest entry.
    pub fn entry(&self) -> &MemoryFileRef {
        &self.entry
    }

    /// What this file records for the page at `gpa` (page aligned): data (and its checksum's
    /// position), zero, or nothing. No I/O.
    fn lookup(&self, gpa: u64) -> Option<(PageKind, usize)> {
        let pfn = gpa / PAGE;
        let i = self.runs.partition_point(|r| r.first_page <= pfn);
        let r = self.runs.get(i.checked_sub(1)?)?;
        let off = pfn - r.first_page;
        if off >= r.count {
            return None;
        }
        if r.data {
            Some((PageKind::Data, r.hash_base + off as usize))
        } else {
            Some((PageKind::Zero, 0))
        }
    }

    /// What this file records for the page at `gpa` (page aligned), without reading it:
    /// `Some(None)` a zero page, `Some(Some(hash))` a data page with its XXH3-64, `None` not
    /// recorded here. An incremental snapshot compares a page's current hash with this.
    pub fn recorded(&self, gpa: u64) -> Option<Option<u64>> {
        match self.lookup(gpa & !(PAGE - 1))? {
            (PageKind::Zero, _) => Some(None),
            (PageKind::Data, h) => Some(self.hashes.get(h).copied()),
        }
    }

    /// Whether this file records the page at `gpa` (data or zero).
    pub fn holds(&self, gpa: u64) -> bool {
        self.lookup(gpa & !(PAGE - 1)).is_some()
    }

    /// Reads the page at `gpa` (page aligned) into `buf` if the file has its data, verifying
    /// its checksum. `buf` is written only when [`PageSource::Data`] is returned.
    pub fn read_page(&self, gpa: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<PageSource> {
        if !gpa.is_multiple_of(PAGE) {
            return Err(Error::BadPage {
                path: self.path.clone(),
                gpa,
                reason: "address not page aligned",
            });
        }
        match self.lookup(gpa) {
            None => Ok(PageSource::NotInLayer),
            Some((PageKind::Zero, _)) => Ok(PageSource::Zero),
            Some((PageKind::Data, h)) => {
                self.file
                    .read_exact_at(buf, gpa)
                    .at(&self.path, "read page")?;
                if page_hash(buf) != self.hashes[h] {
                    return Err(Error::PageChecksum {
                        path: self.path.clone(),
                        gpa,
                    });
                }
                Ok(PageSource::Data)
            }
        }
    }

    /// The runs of pages this file records, in address order.
    pub fn runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.runs.iter().map(|r| PageRun {
            gpa: r.first_page * PAGE,
            pages: r.count,
            kind: if r.data {
                PageKind::Data
            } else {
                PageKind::Zero
            },
        })
    }

    /// Reads every data page and checks its checksum: what an eager restore, or one that must
    /// not start a guest on a corrupt snapshot, does before starting.
    pub fn verify(&self) -> Result<()> {
        let mut buf = vec![0u8; VERIFY_CHUNK_PAGES as usize * PAGE_SIZE];
        for r in self.runs.iter().filter(|r| r.data) {
            let mut done = 0u64;
            while done < r.count {
                let n = (r.count - done).min(VERIFY_CHUNK_PAGES);
                let gpa = (r.first_page + done) * PAGE;
                let chunk = &mut buf[..n as usize * PAGE_SIZE];
                self.file
                    .read_exact_at(chunk, gpa)
                    .at(&self.path, "read pages")?;
                for (i, page) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
                    let page: &[u8; PAGE_SIZE] = page.try_into().expect("whole pages");
                    if page_hash(page) != self.hashes[r.hash_base + done as usize + i] {
                        return Err(Error::PageChecksum {
                            path: self.path.clone(),
                            gpa: gpa + (i * PAGE_SIZE) as u64,
                        });
                    }
                }
                done += n;
            }
        }
        Ok(())
    }
}

/// Reads a whole small file, checking its size and SHA-256 against the manifest.
pub(crate) fn read_checked(path: &Path, size: u64, sha256: &str) -> Result<Vec<u8>> {
    let actual = std::fs::metadata(path).at(path, "stat")?.len();
    if actual != size {
        return Err(Error::Size {
            path: path.to_path_buf(),
            expected: size,
            actual,
        });
    }
    let bytes = std::fs::read(path).at(path, "read")?;
    let actual = sha256_hex(&bytes);
    if actual != sha256 {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Parses and checks a page index: every value is untrusted.
fn parse_index(path: &Path, b: &[u8], entry: &MemoryFileRef) -> Result<(Vec<Run>, Vec<u64>)> {
    let bad = |reason: String| Error::invalid(path, format!("page index: {reason}"));
    if b.len() < HEADER || &b[..8] != MAGIC {
        return Err(bad("no page-index header".into()));
    }
    let version = u32_at(b, 8);
    if version != INDEX_VERSION {
        return Err(bad(format!(
            "index version {version}, expected {INDEX_VERSION}"
        )));
    }
    let page_size = u32_at(b, 12);
    if page_size as usize != PAGE_SIZE {
        return Err(bad(format!("page size {page_size}, expected {PAGE_SIZE}")));
    }
    let (nruns, ndata) = (u64_at(b, 16), u64_at(b, 24));
    let expected_len = nruns
        .checked_mul(RUN as u64)
        .and_then(|r| ndata.checked_mul(8).and_then(|d| d.checked_add(r)))
        .and_then(|n| n.checked_add(HEADER as u64));
    if expected_len != Some(b.len() as u64) {
        return Err(bad(format!(
            "{nruns} runs and {ndata} checksums do not fill its {} bytes",
            b.len()
        )));
    }
    // The ranges with adjacent ones joined, in pages: a run must lie inside one of them.
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in &entry.ranges {
        let (s, e) = (r.start / PAGE, r.end() / PAGE);
        match spans.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => spans.push((s, e)),
        }
    }
    let mut runs = Vec::with_capacity(nruns as usize);
    let (mut data, mut zero, mut prev_end) = (0u64, 0u64, 0u64);
    for i in 0..nruns as usize {
        let off = HEADER + i * RUN;
        let (first, count, kind) = (
            u64_at(b, off),
            u64::from(u32_at(b, off + 8)),
            u32_at(b, off + 12),
        );
        let end = first.checked_add(count).filter(|_| count > 0);
        let Some(end) = end.filter(|_| i == 0 || first >= prev_end) else {
            return Err(bad(format!("run {i} (page {first:#x}, {count} pages) is empty, overflowing, unsorted or overlapping")));
        };
        if !spans.iter().any(|&(s, e)| s <= first && end <= e) {
            return Err(bad(format!(
                "run {i} (gpa {:#x}, {count} pages) is outside the file's ranges",
                first.saturating_mul(PAGE)
            )));
        }
        let is_data = match kind {
            0 => false,
            1 => true,
            k => {
                return Err(bad(format!(
                    "run {i} has kind {k}, expected 0 (zero) or 1 (data)"
                )))
            }
        };
        runs.push(Run {
            first_page: first,
            count,
            data: is_data,
            hash_base: data as usize,
        });
        if is_data {
            data += count;
        } else {
            zero += count;
        }
        prev_end = end;
    }
    if data != ndata || data != entry.pages_data || zero != entry.pages_zero {
        return Err(bad(format!(
            "{data} data and {zero} zero pages in runs, {ndata} checksums, manifest says {} \
             and {}",
            entry.pages_data, entry.pages_zero
        )));
    }
    let base = HEADER + nruns as usize * RUN;
    let hashes = (0..ndata as usize)
        .map(|i| u64_at(b, base + 8 * i))
        .collect();
    Ok((runs, hashes))
}
