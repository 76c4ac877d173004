//! State files: one component's saved state ([`crate::Persist::State`]) as a JSON file whose
//! size and SHA-256 the manifest records.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::checksum::sha256_hex;
use crate::error::{Error, IoContext, Result};
use crate::manifest::StateFileRef;
use crate::memory::read_checked;

/// Writes `state` as pretty JSON to `dir/NAME.json` (a new file), fsynced, and returns its
/// manifest entry. `host` is the writing host for per-host state, `component` what it holds.
pub fn write_state_file<T: Serialize + ?Sized>(
    dir: &Path,
    name: &str,
    host: Option<u32>,
    component: &str,
    state: &T,
) -> Result<StateFileRef> {
    let file = format!("{name}.json");
    let path = dir.join(&file);
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|source| Error::Json {
        path: path.clone(),
        what: "state (cannot serialize)",
        source,
    })?;
    bytes.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .at(&path, "create")?;
    f.write_all(&bytes).at(&path, "write")?;
    f.sync_all().at(&path, "fsync")?;
    Ok(StateFileRef {
        file,
        size: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
        host,
        component: component.to_string(),
    })
}

/// Reads the state file `entry` of the snapshot in `dir`: checks its size and SHA-256, then
/// parses it as `T`. Errors name the file.
pub fn read_state_file<T: DeserializeOwned>(dir: &Path, entry: &StateFileRef) -> Result<T> {
    let path = dir.join(&entry.file);
    let bytes = read_checked(&path, entry.size, &entry.sha256)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path,
        what: "state file",
        source,
    })
}
