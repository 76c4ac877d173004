//! Snapshot directories: writing one completely or not at all ([`SnapshotBuilder`]), opening
//! one ([`Layer`]) or a chain of incremental ones ([`Snapshot`]), and folding a chain into one
//! ([`merge`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

use crate::checksum::PAGE_SIZE;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{
    read_manifest, sync_dir, write_manifest, GpaRange, Manifest, StateFileRef, MANIFEST_FILE,
};
use crate::memory::{read_checked, MemoryFile, MemoryFileWriter, PageSource};
use crate::persist::Persist;
use crate::state::{read_state_file, write_state_file};

/// Most layers a chain may have (a bound on files opened for a forged or runaway chain).
pub const MAX_CHAIN: usize = 256;

const PAGE: u64 = PAGE_SIZE as u64;

/// Whether a directory name is that of a snapshot being written (`NAME.tmp-<pid>`).
pub fn is_partial_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    match name.rsplit_once(".tmp-") {
        Some((base, pid)) => {
            !base.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// The directory a snapshot destined for `dir` is written in by process `pid`.
fn partial_dir(dir: &Path, pid: u32) -> Option<PathBuf> {
    let name = dir.file_name()?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp-{pid}"));
    Some(dir.with_file_name(tmp))
}

/// Writes one snapshot directory completely or not at all.
///
/// Everything is written into `DIR.tmp-<pid>` (a sibling of `DIR`, so relative parent paths
/// hold in both). [`commit`](Self::commit) checks that every file the manifest lists is there
/// with its size, fsyncs, writes the manifest last (atomically), and renames the directory to
/// `DIR`: a reader finds either a complete snapshot or none. Dropped without commit, the
/// builder removes the partial directory. Other hosts write their memory and state files into
/// [`partial_dir`](Self::partial_dir) with [`MemoryFileWriter`] and
/// [`write_state_file`] and send their entries to the host that commits.
#[derive(Debug)]
pub struct SnapshotBuilder {
    dir: PathBuf,
    tmp: PathBuf,
    done: bool,
}

impl SnapshotBuilder {
    /// Starts a snapshot that will be `dir`, which must not exist.
    pub fn create(dir: &Path) -> Result<Self> {
        let Some(tmp) = partial_dir(dir, std::process::id()) else {
            return Err(Error::invalid(dir, "not a directory name"));
        };
        if dir.file_name().is_some_and(is_partial_name) {
            return Err(Error::invalid(
                dir,
                "a name ending in .tmp-<digits> is reserved for snapshots being written",
            ));
        }
        if fs::symlink_metadata(dir).is_ok() {
            return Err(Error::AlreadyExists {
                path: dir.to_path_buf(),
            });
        }
        // A leftover of an earlier process that had our pid: ours by name, and never complete.
        if fs::symlink_metadata(&tmp).is_ok() {
            fs::remove_dir_all(&tmp).at(&tmp, "remove stale partial snapshot")?;
        }
        fs::create_dir(&tmp).at(&tmp, "create directory")?;
        Ok(SnapshotBuilder {
            dir: dir.to_path_buf(),
            tmp,
            done: false,
        })
    }

    /// The directory the snapshot will have once committed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory files are written into until the commit.
    pub fn partial_dir(&self) -> &Path {
        &self.tmp
    }

    /// A writer for memory file `NAME.mem` / `NAME.idx` covering `ranges`.
    pub fn memory_writer(&self, name: &str, ranges: &[GpaRange]) -> Result<MemoryFileWriter> {
        MemoryFileWriter::create(&self.tmp, name, ranges)
    }

    /// Writes state file `NAME.json`; see [`write_state_file`].
    pub fn write_state<T: Serialize + ?Sized>(
        &self,
        name: &str,
        host: Option<u32>,
        component: &str,
        state: &T,
    ) -> Result<StateFileRef> {
        write_state_file(&self.tmp, name, host, component, state)
    }

    /// Completes the snapshot: checks `manifest` (its values, that every file it lists is
    /// present with its recorded size, and its parent), writes it, and renames the directory
    /// into place. Returns the final directory.
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf> {
        manifest.validate(&self.tmp.join(MANIFEST_FILE))?;
        let mut sizes: Vec<(&str, u64)> = Vec::new();
        for m in &manifest.memory_files {
            sizes.push((&m.file, m.size));
            sizes.push((&m.index, m.index_size));
        }
        for s in &manifest.state_files {
            sizes.push((&s.file, s.size));
        }
        for (name, expected) in sizes {
            let path = self.tmp.join(name);
            let actual = fs::metadata(&path).at(&path, "stat")?.len();
            if actual != expected {
                return Err(Error::Size {
                    path,
                    expected,
                    actual,
                });
            }
        }
        if let Some(p) = &manifest.parent {
            // The same check a reader makes, before the child is published.
            check_parent(&self.tmp.join(MANIFEST_FILE), &p.resolve(&self.tmp), p)?;
        }
        sync_dir(&self.tmp)?;
        write_manifest(&self.tmp, manifest)?;
        if fs::symlink_metadata(&self.dir).is_ok() {
            return Err(Error::AlreadyExists {
                path: self.dir.clone(),
            });
        }
        fs::rename(&self.tmp, &self.dir).at(&self.dir, "rename into place")?;
        self.done = true;
        let parent = match self.dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
        Ok(self.dir.clone())
    }
}

impl Drop for SnapshotBuilder {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Opens the parent at `parent_dir` and checks it is the one `p` records.
fn check_parent(child: &Path, parent_dir: &Path, p: &crate::ParentRef) -> Result<Layer> {
    let layer = Layer::open(parent_dir).map_err(|e| Error::Parent {
        path: child.to_path_buf(),
        parent: parent_dir.to_path_buf(),
        source: Box::new(e),
    })?;
    if layer.manifest_sha256 != p.manifest_sha256 {
        return Err(Error::ParentMismatch {
            path: child.to_path_buf(),
            parent: parent_dir.to_path_buf(),
            expected: p.manifest_sha256.clone(),
            actual: layer.manifest_sha256,
        });
    }
    Ok(layer)
}

/// One snapshot directory, opened and checked.
///
/// Opening checks the manifest (version, checksum, values), the size and SHA-256 of every
/// state file and page index, the size of every memory file, and that no two memory files
/// record the same page. Page data is checked when read, or all of it by
/// [`verify`](Self::verify).
#[derive(Debug)]
pub struct Layer {
    dir: PathBuf,
    manifest: Manifest,
    manifest_sha256: String,
    memory: Vec<MemoryFile>,
}

impl Layer {
    /// Opens the snapshot directory `dir` (not its parents: see [`Snapshot::open`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.file_name().is_some_and(is_partial_name) {
            return Err(Error::Incomplete {
                path: dir.to_path_buf(),
            });
        }
        let (manifest, manifest_sha256) = read_manifest(dir)?;
        let memory = manifest
            .memory_files
            .iter()
            .map(|m| MemoryFile::open(dir, m))
            .collect::<Result<Vec<_>>>()?;
        for s in &manifest.state_files {
            read_checked(&dir.join(&s.file), s.size, &s.sha256)?;
        }
        let layer = Layer {
            dir: dir.to_path_buf(),
            manifest,
            manifest_sha256,
            memory,
        };
        layer.check_disjoint()?;
        Ok(layer)
    }

    /// No page may be recorded by two memory files of one layer.
    fn check_disjoint(&self) -> Result<()> {
        let mut runs: Vec<(u64, u64, usize)> = Vec::new();
        for (i, f) in self.memory.iter().enumerate() {
            runs.extend(f.runs().map(|r| (r.gpa, r.gpa + r.pages * PAGE, i)));
        }
        runs.sort_unstable();
        let mut reach: Option<(u64, usize)> = None;
        for (start, end, i) in runs {
            if let Some((prev_end, j)) = reach {
                if start < prev_end {
                    return Err(Error::invalid(
                        &self.dir.join(MANIFEST_FILE),
                        format!(
                            "memory files {} and {} both record the page at {start:#x}",
                            self.memory[j].entry().file,
                            self.memory[i].entry().file
                        ),
                    ));
                }
            }
            if reach.is_none_or(|(e, _)| end > e) {
                reach = Some((end, i));
            }
        }
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of `manifest.json` (what a child's parent reference records).
    pub fn manifest_sha256(&self) -> &str {
        &self.manifest_sha256
    }

    /// The memory files.
    pub fn memory_files(&self) -> &[MemoryFile] {
        &self.memory
    }

    /// The page at `gpa` as this layer records it; see [`MemoryFile::read_page`].
    pub fn read_page(&self, gpa: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<PageSource> {
        for f in &self.memory {
            match f.read_page(gpa, buf)? {
                PageSource::NotInLayer => continue,
                found => return Ok(found),
            }
        }
        Ok(PageSource::NotInLayer)
    }

    /// Reads and parses a state file of this layer (size and SHA-256 checked again).
    pub fn read_state<T: DeserializeOwned>(&self, entry: &StateFileRef) -> Result<T> {
        read_state_file(&self.dir, entry)
    }

    /// Restores a component from its state file: a parse error or a state the component
    /// refuses (a value out of range) is an error naming the file.
    pub fn restore_state<P: Persist>(
        &self,
        entry: &StateFileRef,
        args: P::ConstructorArgs,
    ) -> Result<P> {
        let state: P::State = self.read_state(entry)?;
        P::restore(args, &state).map_err(|e| Error::InvalidState {
            path: self.dir.join(&entry.file),
            source: Box::new(e),
        })
    }

    /// Reads every data page of every memory file and checks it.
    pub fn verify(&self) -> Result<()> {
        self.memory.iter().try_for_each(MemoryFile::verify)
    }
}

/// A snapshot with its chain of parents: what a restore reads.
#[derive(Debug)]
pub struct Snapshot {
    /// The snapshot asked for first, then its parent, and so on down to a full snapshot.
    layers: Vec<Layer>,
}

/// Opens the snapshot in `dir` and every parent it is taken on top of; see [`Snapshot::open`].
pub fn open(dir: &Path) -> Result<Snapshot> {
    Snapshot::open(dir)
}

impl Snapshot {
    /// Opens `dir` and its chain of parents, checking each ([`Layer::open`]) and that each
    /// parent is the one its child records. A missing or changed parent is an error naming
    /// the child's manifest and the parent.
    pub fn open(dir: &Path) -> Result<Self> {
        let top = Layer::open(dir)?;
        let mut seen = HashSet::new();
        seen.insert(fs::canonicalize(dir).at(dir, "resolve")?);
        let mut layers = vec![top];
        loop {
            let child = layers.last().expect("at least the top layer");
            let Some(p) = child.manifest.parent.clone() else {
                break;
            };
            let child_manifest = child.dir.join(MANIFEST_FILE);
            let parent_dir = p.resolve(&child.dir);
            if layers.len() >= MAX_CHAIN {
                return Err(Error::invalid(
                    &child_manifest,
                    format!("chain of parents longer than {MAX_CHAIN}"),
                ));
            }
            if let Ok(canon) = fs::canonicalize(&parent_dir) {
                if !seen.insert(canon) {
                    return Err(Error::invalid(
                        &child_manifest,
                        format!(
                            "parent {} is already in the chain (a loop)",
                            parent_dir.display()
                        ),
                    ));
                }
            }
            let parent = check_parent(&child_manifest, &parent_dir, &p)?;
            layers.push(parent);
        }
        Ok(Snapshot { layers })
    }

    /// The snapshot that was opened (the top of the chain).
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The layers, top first, down to the full snapshot at the bottom.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Reads the page at `gpa` through the chain: the topmost layer that records it wins.
    /// [`PageSource::NotInLayer`] means no layer records it: a page the guest never touched,
    /// zero. `buf` is written only for [`PageSource::Data`].
    pub fn read_page(&self, gpa: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<PageSource> {
        for layer in &self.layers {
            match layer.read_page(gpa, buf)? {
                PageSource::NotInLayer => continue,
                found => return Ok(found),
            }
        }
        Ok(PageSource::NotInLayer)
    }

    /// What the chain records for the page at `gpa`, without reading it (the topmost layer
    /// that records it wins): `Some(None)` zero, `Some(Some(hash))` data with its XXH3-64,
    /// `None` recorded nowhere (never touched: zero).
    pub fn recorded(&self, gpa: u64) -> Option<Option<u64>> {
        self.layers
            .iter()
            .flat_map(|l| l.memory.iter())
            .find_map(|f| f.recorded(gpa))
    }

    /// Reads every data page of every layer and checks it. A restore that must not start a
    /// guest from a corrupt snapshot (eager restore reads everything anyway) calls this
    /// first; a lazy restore finds a corrupt page when the guest first touches it.
    pub fn verify(&self) -> Result<()> {
        self.layers.iter().try_for_each(Layer::verify)
    }

    /// The guest-physical intervals (sorted, disjoint, adjacent ones joined) that hold a page
    /// recorded by some layer: the only places a restore or merge need look.
    pub fn recorded_intervals(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = self
            .layers
            .iter()
            .flat_map(|l| l.memory.iter())
            .flat_map(|f| f.runs())
            .map(|r| (r.gpa, r.gpa + r.pages * PAGE))
            .collect();
        runs.sort_unstable();
        coalesce(runs)
    }
}

/// Sorted intervals with overlapping and adjacent ones joined.
fn coalesce(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Folds the chain `snap` into one full snapshot at `out` (which must not exist): one memory
/// file `memory.mem` holding, for every page, what a read through the chain gives (data or
/// zero; pages no layer records stay unrecorded), the top layer's state files, guest config,
/// placement and creation time, and no parent. Written like any snapshot (complete or not at
/// all). Returns `out`.
pub fn merge(snap: &Snapshot, out: &Path) -> Result<PathBuf> {
    merge_with(snap, out, &[])
}

/// [`merge`], also copying the files `extra` (names in the top layer's directory that the
/// manifest does not list, such as the VMM's disk images) into `out` before it is committed.
pub fn merge_with(snap: &Snapshot, out: &Path, extra: &[&str]) -> Result<PathBuf> {
    let top = snap.top();
    let builder = SnapshotBuilder::create(out)?;
    for name in extra {
        if name.is_empty() || name.contains('/') || *name == "." || *name == ".." {
            return Err(Error::invalid(out, format!("bad extra file name {name:?}")));
        }
        let from = top.dir.join(name);
        let to = builder.partial_dir().join(name);
        fs::copy(&from, &to).at(&from, "copy")?;
        fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .at(&to, "fsync")?;
    }
    let mut manifest = top.manifest.clone();
    manifest.parent = None;
    manifest.memory_files.clear();
    manifest.format = crate::FormatVersion::CURRENT;

    let mut ranges: Vec<(u64, u64)> = snap
        .layers
        .iter()
        .flat_map(|l| l.manifest.memory_files.iter())
        .flat_map(|m| m.ranges.iter().map(|r| (r.start, r.end())))
        .collect();
    ranges.sort_unstable();
    let ranges: Vec<GpaRange> = coalesce(ranges)
        .into_iter()
        .map(|(start, end)| GpaRange {
            start,
            len: end - start,
        })
        .collect();
    if !ranges.is_empty() {
        let w = builder.memory_writer("memory", &ranges)?;
        let mut buf = [0u8; PAGE_SIZE];
        let zero = [0u8; PAGE_SIZE];
        for (start, end) in snap.recorded_intervals() {
            for gpa in (start..end).step_by(PAGE_SIZE) {
                match snap.read_page(gpa, &mut buf)? {
                    PageSource::Data => w.write_page(gpa, &buf)?,
                    PageSource::Zero => w.write_page(gpa, &zero)?,
                    PageSource::NotInLayer => {}
                }
            }
        }
        manifest.memory_files.push(w.finish()?);
    }
    for s in &top.manifest.state_files {
        let bytes = read_checked(&top.dir.join(&s.file), s.size, &s.sha256)?;
        let path = builder.partial_dir().join(&s.file);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path, "create")?;
        std::io::Write::write_all(&mut f, &bytes).at(&path, "write")?;
        f.sync_all().at(&path, "fsync")?;
    }
    builder.commit(&manifest)
}
