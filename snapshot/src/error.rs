//! The one error type of the snapshot format: every variant names the file it is about.

use std::io;
use std::path::{Path, PathBuf};

/// What can go wrong writing, opening or reading a snapshot.
///
/// Every variant carries the path of the file (or directory) concerned, so a message printed
/// as is tells the user which file is missing, truncated, corrupt or from an unknown version.
/// As elsewhere in ssi-vmm, the message includes its cause's message (callers print `{e}`
/// only); the cause is also the error's `source()`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on `path` failed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("open", "read", "fsync", ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `path` is not valid JSON of the expected shape.
    #[error("{}: not a valid {what}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What the file should hold ("snapshot manifest", "state file", ...).
        what: &'static str,
        /// The parse error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot was written by an incompatible (newer or older) major format version.
    #[error(
        "{}: snapshot format version {major}.{minor} is not supported (this build reads {}.x)",
        path.display(),
        crate::manifest::FORMAT_MAJOR
    )]
    UnsupportedVersion {
        /// The manifest.
        path: PathBuf,
        /// Major version found.
        major: u32,
        /// Minor version found.
        minor: u32,
    },
    /// The directory holds no `manifest.json`: not a (complete) snapshot.
    #[error("{}: no manifest.json: not a snapshot, or one whose writing did not finish", path.display())]
    NoManifest {
        /// The directory.
        path: PathBuf,
    },
    /// A `DIR.tmp-<pid>` directory: a snapshot still being written or left by a crash.
    #[error("{}: incomplete snapshot (a directory still being written or left by a crash)", path.display())]
    Incomplete {
        /// The directory.
        path: PathBuf,
    },
    /// The snapshot directory to be written already exists.
    #[error("{}: already exists (a snapshot is never overwritten)", path.display())]
    AlreadyExists {
        /// The directory.
        path: PathBuf,
    },
    /// A file's SHA-256 differs from the one recorded for it: the file is corrupt.
    #[error("{}: checksum mismatch: sha256 is {actual}, {expected} was recorded (corrupt file)", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Recorded SHA-256 (hex).
        expected: String,
        /// SHA-256 of the file as read (hex).
        actual: String,
    },
    /// A file's size differs from the one recorded for it: truncated or extended.
    #[error("{}: size is {actual} bytes, {expected} recorded (truncated or overwritten file)", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// Recorded size.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A guest page read from a memory file fails its per-page checksum.
    #[error("{}: page at guest-physical {gpa:#x} fails its checksum (corrupt file)", path.display())]
    PageChecksum {
        /// The memory file.
        path: PathBuf,
        /// Guest-physical address of the page.
        gpa: u64,
    },
    /// A file's content is well-formed at the byte level but holds a value out of range or an
    /// inconsistent combination (a forged or buggy snapshot).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field or value.
        reason: String,
    },
    /// The parent snapshot of an incremental snapshot cannot be read.
    #[error("{}: parent snapshot {}: {source}", path.display(), parent.display())]
    Parent {
        /// The child's manifest.
        path: PathBuf,
        /// The parent directory as resolved.
        parent: PathBuf,
        /// Why (missing, corrupt, ...).
        #[source]
        source: Box<Error>,
    },
    /// The parent's manifest is not the one the child was taken on top of.
    #[error(
        "{}: parent {} has manifest sha256 {actual}, {expected} was recorded (parent replaced or modified)",
        path.display(),
        parent.display()
    )]
    ParentMismatch {
        /// The child's manifest.
        path: PathBuf,
        /// The parent directory.
        parent: PathBuf,
        /// Recorded SHA-256 of the parent's `manifest.json`.
        expected: String,
        /// SHA-256 found.
        actual: String,
    },
    /// A page handed to a memory-file writer is unaligned, outside the file's ranges or
    /// written twice.
    #[error("{}: page at guest-physical {gpa:#x}: {reason}", path.display())]
    BadPage {
        /// The memory file.
        path: PathBuf,
        /// Guest-physical address given.
        gpa: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A component's saved state in `path` was parsed but its restore refused it (a value out
    /// of range, an inconsistent combination): see [`crate::Layer::restore_state`].
    #[error("{}: invalid saved state: {source}", path.display())]
    InvalidState {
        /// The state file.
        path: PathBuf,
        /// The component's own error, naming the field.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// The path of the file or directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Error::Io { path, .. }
            | Error::Json { path, .. }
            | Error::UnsupportedVersion { path, .. }
            | Error::NoManifest { path }
            | Error::Incomplete { path }
            | Error::AlreadyExists { path }
            | Error::Checksum { path, .. }
            | Error::Size { path, .. }
            | Error::PageChecksum { path, .. }
            | Error::Invalid { path, .. }
            | Error::Parent { path, .. }
            | Error::ParentMismatch { path, .. }
            | Error::BadPage { path, .. }
            | Error::InvalidState { path, .. } => path,
        }
    }
}

/// Adds the path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, op, e))
    }
}
