//! The [`Persist`] trait: live object <-> plain saved state.

use serde::{de::DeserializeOwned, Serialize};

/// A component whose state can be saved into and restored from a plain serde struct.
///
/// `save` is called on a paused component (no vCPU runs, no I/O in flight), so the state it
/// returns is consistent. `restore` must treat `state` as untrusted: check every value it
/// relies on (ranges, lengths, combinations) and fail with `Self::Error` instead of panicking
/// or building an object that misbehaves later.
pub trait Persist: Sized {
    /// The saved state: plain data, no host resources (file descriptors, `Instant`s, threads).
    type State: Serialize + DeserializeOwned;
    /// What the restored object needs from its new environment (memory, interrupt lines, ...).
    type ConstructorArgs;
    /// Why a state cannot be restored.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A copy of the component's state.
    fn save(&self) -> Self::State;

    /// A live component built from `state`, validated, in the environment `args` describes.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
