//! `manifest.json`: what a snapshot directory holds, with a checksum of every other file.
//!
//! On disk the manifest is an envelope around the [`Manifest`] body:
//!
//! ```json
//! {
//!   "format": { "major": 1, "minor": 0 },
//!   "manifest_sha256": "<sha256 of the exact bytes of the `manifest` value below>",
//!   "manifest": { "created_unix_ms": ..., "guest": ..., "placement": ..., "parent": ...,
//!                 "memory_files": [...], "state_files": [...] }
//! }
//! ```
//!
//! `format` is read first, on its own, so a snapshot of an unknown major version is refused
//! as such whatever the rest looks like; a higher minor version of the same major is accepted
//! (minor versions only add fields, which this build ignores). The body's checksum covers its
//! bytes exactly as written, so a flipped byte anywhere in it is caught, not only one that
//! breaks the JSON.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::checksum::{sha256_hex, PAGE_SIZE};
use crate::error::{Error, IoContext, Result};

/// Major format version this build writes and reads. A change that an older reader would
/// misread bumps it.
pub const FORMAT_MAJOR: u32 = 1;
/// Minor format version this build writes. Readers accept any minor of their major.
pub const FORMAT_MINOR: u32 = 0;
/// Name of the manifest inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions.
    pub minor: u32,
}

impl FormatVersion {
    /// The version this build writes.
    pub const CURRENT: FormatVersion = FormatVersion {
        major: FORMAT_MAJOR,
        minor: FORMAT_MINOR,
    };

    fn current() -> Self {
        Self::CURRENT
    }
}

/// The manifest of one snapshot directory (one layer of a chain).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version; on disk it sits in the envelope, outside the checksummed body.
    #[serde(skip, default = "FormatVersion::current")]
    pub format: FormatVersion,
    /// When the snapshot was taken, milliseconds since the Unix epoch (UTC).
    pub created_unix_ms: u64,
    /// The guest's configuration as the VMM describes it (memory size and layout, vCPU count,
    /// kernel command line, disks, ...): opaque to this crate.
    pub guest: Value,
    /// Which host runs which vCPUs and devices: opaque to this crate.
    pub placement: Value,
    /// For an incremental snapshot: the snapshot it was taken on top of.
    #[serde(default)]
    pub parent: Option<ParentRef>,
    /// Guest memory: pages the hosts wrote, one file per writer.
    pub memory_files: Vec<MemoryFileRef>,
    /// Saved component states (vCPUs, interrupt controllers, devices).
    pub state_files: Vec<StateFileRef>,
}

impl Manifest {
    /// An empty manifest of the current version, created now.
    pub fn new(guest: Value, placement: Value) -> Self {
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Manifest {
            format: FormatVersion::CURRENT,
            created_unix_ms,
            guest,
            placement,
            parent: None,
            memory_files: Vec::new(),
            state_files: Vec::new(),
        }
    }

    /// The state file of `component` written by `host`, if any.
    pub fn state_file(&self, component: &str, host: Option<u32>) -> Option<&StateFileRef> {
        self.state_files
            .iter()
            .find(|s| s.component == component && s.host == host)
    }

    /// Checks every value the readers rely on; `path` is the manifest's path for errors.
    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let mut names: Vec<&str> = Vec::new();
        let bad = |reason: String| Error::invalid(path, reason);
        for m in &self.memory_files {
            check_file_name(path, &m.file)?;
            check_file_name(path, &m.index)?;
            check_sha256(path, &m.index_sha256, &m.index)?;
            names.push(&m.file);
            names.push(&m.index);
            if m.ranges.is_empty() {
                return Err(bad(format!("memory file {}: no ranges", m.file)));
            }
            let mut prev_end = 0u64;
            let mut pages = 0u64;
            for r in &m.ranges {
                let end = r.start.checked_add(r.len);
                let aligned = r.start.is_multiple_of(PAGE_SIZE as u64)
                    && r.len.is_multiple_of(PAGE_SIZE as u64);
                match end {
                    Some(end) if aligned && r.len > 0 && r.start >= prev_end => {
                        prev_end = end;
                        pages += r.len / PAGE_SIZE as u64;
                    }
                    _ => {
                        return Err(bad(format!(
                            "memory file {}: range {:#x}+{:#x} is empty, unaligned, \
                             overflowing, unsorted or overlapping",
                            m.file, r.start, r.len
                        )))
                    }
                }
            }
            if m.size != prev_end {
                return Err(bad(format!(
                    "memory file {}: size {} differs from the end of its last range {prev_end}",
                    m.file, m.size
                )));
            }
            if m.pages_data
                .checked_add(m.pages_zero)
                .is_none_or(|n| n > pages)
            {
                return Err(bad(format!(
                    "memory file {}: {} data + {} zero pages exceed the {pages} pages of its ranges",
                    m.file, m.pages_data, m.pages_zero
                )));
            }
        }
        for s in &self.state_files {
            check_file_name(path, &s.file)?;
            check_sha256(path, &s.sha256, &s.file)?;
            names.push(&s.file);
        }
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("file {} is listed twice", w[0])));
        }
        if let Some(p) = &self.parent {
            if p.path.is_empty() || p.path.contains('\0') {
                return Err(bad("parent path is empty or not a path".into()));
            }
            check_sha256(path, &p.manifest_sha256, "parent manifest")?;
        }
        Ok(())
    }
}

/// The parent of an incremental snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent directory, relative to this snapshot's directory (or absolute).
    pub path: String,
    /// SHA-256 of the parent's whole `manifest.json`: the parent cannot be swapped or
    /// modified under its children unnoticed.
    pub manifest_sha256: String,
}

impl ParentRef {
    /// A reference from the snapshot that will be written at `child_dir` to the existing
    /// snapshot `parent_dir`: a relative path when both lie on one tree (so a chain can be
    /// moved as a whole), and the checksum of the parent's manifest as it is now.
    pub fn new(child_dir: &Path, parent_dir: &Path) -> Result<Self> {
        let manifest = parent_dir.join(MANIFEST_FILE);
        let bytes = fs::read(&manifest).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NoManifest {
                path: parent_dir.to_path_buf(),
            },
            _ => Error::io(&manifest, "read", e),
        })?;
        let parent_abs = fs::canonicalize(parent_dir).at(parent_dir, "resolve")?;
        let path = match absolute_child(child_dir) {
            Some(child_abs) => relative_path(&child_abs, &parent_abs),
            None => parent_abs,
        };
        Ok(ParentRef {
            path: path.to_string_lossy().into_owned(),
            manifest_sha256: sha256_hex(&bytes),
        })
    }

    /// The parent directory of the snapshot in `child_dir`.
    pub fn resolve(&self, child_dir: &Path) -> PathBuf {
        child_dir.join(&self.path)
    }
}

/// The absolute path `child_dir` will have (it need not exist yet, its parent must).
fn absolute_child(child_dir: &Path) -> Option<PathBuf> {
    let name = child_dir.file_name()?;
    let up = match child_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(fs::canonicalize(up).ok()?.join(name))
}

/// `to` relative to the directory `from` (both absolute, normalized).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// A contiguous guest-physical range, page aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpaRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GpaRange {
    /// One past the last byte (callers check for overflow first: see `Manifest::validate`).
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether `gpa` lies in the range.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.start && gpa - self.start < self.len
    }
}

/// A memory file and its page index (see [`crate::memory`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileRef {
    /// The sparse data file: a data page of guest-physical address `gpa` is at offset `gpa`.
    pub file: String,
    /// Apparent size of the data file: the end of its last range.
    pub size: u64,
    /// Guest-physical ranges the file may hold pages of, sorted, disjoint.
    pub ranges: Vec<GpaRange>,
    /// The page index: which pages this file holds (data or zero) and their checksums.
    pub index: String,
    /// Size of the page index.
    pub index_size: u64,
    /// SHA-256 of the page index, which holds a checksum of every data page: together they
    /// are the data file's checksum.
    pub index_sha256: String,
    /// Pages whose data is in the file.
    pub pages_data: u64,
    /// Pages recorded as zero (no bytes written).
    pub pages_zero: u64,
}

/// A saved component state (JSON; see [`crate::state`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFileRef {
    /// File name.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file.
    pub sha256: String,
    /// The host that wrote it, for per-host state (its vCPUs, its devices).
    pub host: Option<u32>,
    /// What it holds: a name the VMM chooses ("vcpus", "ioapic", "virtio-blk0", ...).
    pub component: String,
}

/// A file name in a manifest must be a plain name inside the snapshot directory.
fn check_file_name(path: &Path, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name != MANIFEST_FILE;
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            path,
            format!("file name {name:?} is not a plain file name inside the snapshot"),
        ))
    }
}

fn check_sha256(path: &Path, hex: &str, what: &str) -> Result<()> {
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::invalid(
            path,
            format!("checksum of {what} is not a sha256 in hex: {hex:?}"),
        ))
    }
}

/// Just the version, read before anything else.
#[derive(Deserialize)]
struct Probe {
    format: FormatVersion,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    manifest_sha256: String,
    manifest: Box<RawValue>,
}

/// The bytes of `manifest.json` for `m`.
pub(crate) fn encode(m: &Manifest) -> Vec<u8> {
    let body = serde_json::to_string_pretty(m).expect("a manifest always serializes");
    // Indent the body under its key; JSON strings hold no raw newline, so this only moves
    // whitespace between tokens. The checksum covers the body exactly as written.
    let body = body.replace('\n', "\n  ");
    let format = serde_json::to_string(&m.format).expect("a version always serializes");
    format!(
        "{{\n  \"format\": {format},\n  \"manifest_sha256\": \"{}\",\n  \"manifest\": {body}\n}}\n",
        sha256_hex(body.as_bytes())
    )
    .into_bytes()
}

/// Parses `manifest.json` bytes read from `path`.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
    let json = |source| Error::Json {
        path: path.to_path_buf(),
        what: "snapshot manifest",
        source,
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(json)?;
    if probe.format.major != FORMAT_MAJOR {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            major: probe.format.major,
            minor: probe.format.minor,
        });
    }
    let env: EnvelopeIn = serde_json::from_slice(bytes).map_err(json)?;
    let actual = sha256_hex(env.manifest.get().as_bytes());
    if actual != env.manifest_sha256 {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: env.manifest_sha256,
            actual,
        });
    }
    let mut m: Manifest = serde_json::from_str(env.manifest.get()).map_err(json)?;
    m.format = probe.format;
    m.validate(path)?;
    Ok(m)
}

/// Reads and checks the manifest of the snapshot in `dir`; also returns the SHA-256 of the
/// whole file (what a child's [`ParentRef`] records).
pub fn read_manifest(dir: &Path) -> Result<(Manifest, String)> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => {
            return Err(Error::NoManifest {
                path: dir.to_path_buf(),
            })
        }
        Err(e) if !dir.is_dir() => return Err(Error::io(dir, "open snapshot directory", e)),
        Err(e) => return Err(Error::io(&path, "read", e)),
    };
    let m = decode(&path, &bytes)?;
    Ok((m, sha256_hex(&bytes)))
}

/// Writes `m` as `dir/manifest.json` atomically: a temporary file, fsync, rename, fsync of
/// the directory. Returns the SHA-256 of the file.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<String> {
    let path = dir.join(MANIFEST_FILE);
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp-{}", std::process::id()));
    let bytes = encode(m);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .at(&tmp, "create")?;
    f.write_all(&bytes).at(&tmp, "write")?;
    f.sync_all().at(&tmp, "fsync")?;
    drop(f);
    fs::rename(&tmp, &path).at(&path, "rename into place")?;
    sync_dir(dir)?;
    Ok(sha256_hex(&bytes))
}

/// fsync of a directory: makes the entries created or renamed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir, "fsync directory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            json!({"memory_mib": 64, "cmdline": "console=ttyS0 \"q\"\n"}),
            json!([0, 1]),
        );
        m.state_files.push(StateFileRef {
            file: "state-h0-vcpus.json".into(),
            size: 10,
            sha256: "0".repeat(64),
            host: Some(0),
            component: "vcpus".into(),
        });
        m
    }

    #[test]
    fn encode_decode_round_trip() {
        let m = sample();
        let bytes = encode(&m);
        let back = decode(Path::new("m.json"), &bytes).unwrap();
        assert_eq!(back, m);
        // Plain JSON: any tool reads it.
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["format"]["major"], FORMAT_MAJOR);
        assert_eq!(v["manifest"]["guest"]["memory_mib"], 64);
    }

    #[test]
    fn every_flipped_byte_is_an_error_or_harmless() {
        let m = sample();
        let bytes = encode(&m);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            match decode(Path::new("m.json"), &b) {
                Err(e) => assert!(e.to_string().starts_with("m.json: "), "{e}"),
                // Only the minor version (and whitespace around the body) may change without
                // changing what the manifest says.
                Ok(back) => {
                    let mut back = back;
                    back.format = m.format;
                    assert_eq!(back, m, "byte {i} flipped went unnoticed");
                }
            }
        }
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b/c2"), Path::new("/a/b/c1")),
            PathBuf::from("../c1")
        );
        assert_eq!(
            relative_path(Path::new("/a/x/c2"), Path::new("/a/b/c1")),
            PathBuf::from("../../b/c1")
        );
        assert_eq!(
            Path::new("/a/b/c2").join(relative_path(Path::new("/a/b/c2"), Path::new("/d"))),
            PathBuf::from("/a/b/c2/../../../d")
        );
    }

    #[test]
    fn bad_names_and_ranges_are_refused() {
        let p = Path::new("m.json");
        for name in ["", "../x", "a/b", ".hidden", "manifest.json"] {
            let mut m = sample();
            m.state_files[0].file = name.into();
            assert!(
                matches!(m.validate(p), Err(Error::Invalid { .. })),
                "{name:?}"
            );
        }
        let mut m = sample();
        m.memory_files.push(MemoryFileRef {
            file: "m.mem".into(),
            size: 0x2000,
            ranges: vec![GpaRange {
                start: 0x1000,
                len: 0x1000,
            }],
            index: "m.idx".into(),
            index_size: 0,
            index_sha256: "0".repeat(64),
            pages_data: 1,
            pages_zero: 0,
        });
        m.validate(p).unwrap();
        m.memory_files[0].pages_zero = 1;
        assert!(m.validate(p).is_err(), "2 pages in a 1-page range");
        m.memory_files[0].pages_zero = 0;
        m.memory_files[0].ranges[0].start = 0x1001;
        assert!(m.validate(p).is_err(), "unaligned");
        m.memory_files[0].ranges[0] = GpaRange {
            start: u64::MAX - 0xfff,
            len: 0x2000,
        };
        assert!(m.validate(p).is_err(), "overflow");
        m.memory_files[0].ranges[0] = GpaRange {
            start: 0x1000,
            len: 0x1000,
        };
        m.memory_files[0].size = 0x3000;
        assert!(m.validate(p).is_err(), "size beyond the ranges");
    }
}
