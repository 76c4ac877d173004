//! Snapshots of an ssi-vmm machine: the [`Persist`] trait every component's saved state goes
//! through, and the on-disk snapshot format (this page is its description).
//!
//! # Saved state
//!
//! Every component that has state to save (vCPUs, local APICs, the IOAPIC, devices, ...) keeps
//! it in a plain serde struct apart from the live object and converts through [`Persist`]: `save`
//! takes a consistent copy of a paused component, `restore` builds a live component from a saved
//! state and validates that state as untrusted input (a snapshot file may be corrupt or forged),
//! so a value out of range is an error naming the field, never a panic or a silently wrong
//! machine. [`Layer::restore_state`] adds the file's name to such an error.
//!
//! # The snapshot directory (format 1.0)
//!
//! ```text
//! DIR/
//!   manifest.json        format version, guest config, placement, parent, file list + checksums
//!   NAME.mem             memory file: sparse, a data page of guest-physical gpa at offset gpa
//!   NAME.idx             its page index: runs of data / zero pages, XXH3-64 per data page
//!   NAME.json            a component's saved state (JSON)
//! ```
//!
//! Names are chosen by the VMM; the convention is one memory file per host (`memory-h0`, ...)
//! written by that host with the pages it holds the valid copy of, and state files per host
//! and component (`state-h0-vcpus`, `state-ioapic`, ...). Several hosts write their files into
//! the same (shared) directory in parallel and send their manifest entries ([`MemoryFileRef`],
//! [`StateFileRef`], plain serde data) to host 0, which writes the manifest and commits.
//!
//! **`manifest.json`** ([`manifest`]): `{"format": {"major", "minor"}, "manifest_sha256",
//! "manifest": {...}}`, where the body holds `created_unix_ms`, `guest` and `placement` (opaque
//! JSON the VMM fills: memory layout, vCPUs, command line, disks; which host runs what),
//! `parent` (`{path, manifest_sha256}` for an incremental snapshot), `memory_files` (file,
//! apparent size, guest-physical ranges, index name, size and SHA-256, data and zero page
//! counts) and `state_files` (file, size, SHA-256, host, component). A reader refuses an
//! unknown major version before reading anything else and accepts a higher minor (minor
//! versions only add fields). `manifest_sha256` covers the body's bytes as written.
//!
//! **Memory** ([`memory`]): offset = guest-physical address, so a restore copies (or a lazy
//! restore `pread`s) a page straight from its address, and a single full file could even be
//! mapped. Only data pages are written: zero pages and untouched pages cost no disk blocks.
//! The page index tells three cases apart: *data*, *zero* (written as zero since the parent,
//! or zero in a full snapshot) and *not in this layer* (unchanged since the parent; in a full
//! snapshot, never touched: zero).
//!
//! **Checksums** ([`checksum`]): every file is covered. The manifest covers itself and holds
//! the SHA-256 of every page index and state file; each page index holds an XXH3-64 of every
//! data page of its memory file (~10 GB/s per core against ~1.6 GB/s for SHA-256, so
//! checksumming never limits a snapshot or restore), which lets a lazy restore verify one page
//! read alone. [`Snapshot::open`] checks the manifest, every index and state file (size and
//! SHA-256) and every memory file's size (a truncated file is refused at once);
//! [`Snapshot::verify`] reads and checks every data page (an eager restore does that before
//! starting the guest; a lazy one checks each page on first touch).
//!
//! **Completeness**: a snapshot is written as `DIR.tmp-<pid>` ([`SnapshotBuilder`]); every
//! file is fsynced, the manifest is written last (temporary file, fsync, rename, fsync of the
//! directory), and only then the directory is renamed to `DIR` (and its parent fsynced). A
//! `DIR.tmp-<pid>` is never opened ([`Error::Incomplete`]), a directory without manifest is
//! not a snapshot ([`Error::NoManifest`]), and an existing `DIR` is never overwritten: a
//! checkpoint is used only if complete.
//!
//! **Incremental snapshots**: a child records only the pages written since its parent (data or
//! zero), complete state files, and `parent` = the parent's path relative to the child and
//! the SHA-256 of the parent's `manifest.json`. [`Snapshot::open`] opens the whole chain
//! (a missing parent, or one whose manifest changed, is an error naming both) and
//! [`Snapshot::read_page`] reads through it: the topmost layer that records a page wins.
//! [`merge`] folds a chain into one full snapshot.
//!
//! **Errors**: one [`Error`] type; every variant names the file concerned (missing,
//! truncated, corrupt, unknown version, value out of range). Nothing here panics on a file's
//! content.
//!
//! [`inspect()`] describes a snapshot for `ssi-vmm snapshot inspect DIR`.

pub mod checksum;
pub mod dir;
pub mod error;
pub mod inspect;
pub mod manifest;
pub mod memory;
pub mod persist;
pub mod state;

pub use checksum::PAGE_SIZE;
pub use dir::{merge, merge_with, open, Layer, Snapshot, SnapshotBuilder};
pub use error::{Error, Result};
pub use inspect::inspect;
pub use manifest::{
    read_manifest, write_manifest, FormatVersion, GpaRange, Manifest, MemoryFileRef, ParentRef,
    StateFileRef, FORMAT_MAJOR, FORMAT_MINOR, MANIFEST_FILE,
};
pub use memory::{MemoryFile, MemoryFileWriter, PageKind, PageRun, PageSource};
pub use persist::Persist;
pub use state::{read_state_file, write_state_file};

#[cfg(test)]
mod tests;
