//! Logging and the persistent store (imp: `server.*`), and the agent's configuration.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bindings::tether::agent::{agent_info, log, store};

/// Writes a line to the agent's log.
pub fn log(line: impl AsRef<str>) {
    log::log(line.as_ref())
}

/// Writes an error line to the agent's log.
pub fn error(line: impl AsRef<str>) {
    log::error(line.as_ref())
}

/// Why the store could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The encoded value is over the host's cap (64 KiB by default); nothing was written.
    #[error("value too large for the persistent store")]
    TooLarge,
    /// The host could not write or read it; the previous value is intact.
    #[error("the host could not access the persistent store")]
    Io,
    /// Saved more often than the host allows (beyond imp); nothing was written. Save
    /// less often, e.g. at most once per change worth keeping.
    #[error("saved too often: over the host's store write rate")]
    RateLimited,
    /// The value could not be encoded as JSON.
    #[error("cannot encode the value: {0}")]
    Encode(String),
    /// What is stored does not decode as the requested type.
    #[error("stored value does not match the requested type: {0}")]
    Decode(String),
}

impl From<store::StoreError> for StoreError {
    fn from(e: store::StoreError) -> Self {
        match e {
            store::StoreError::TooLarge => StoreError::TooLarge,
            store::StoreError::Io => StoreError::Io,
            store::StoreError::RateLimited => StoreError::RateLimited,
        }
    }
}

/// Replaces the stored value (imp: `server.save`). It survives restarts and deploys.
///
/// ```no_run
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct State { boots: u32 }
/// let boots = tether_guest::server::load::<State>().ok().flatten().map_or(0, |s| s.boots);
/// tether_guest::server::save(&State { boots: boots + 1 }).unwrap();
/// ```
pub fn save<T: Serialize + ?Sized>(value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))?;
    store::save(&bytes).map_err(StoreError::from)
}

/// The stored value (imp: `server.load`), `None` if nothing was saved yet.
pub fn load<T: DeserializeOwned>() -> Result<Option<T>, StoreError> {
    match store::load()? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StoreError::Decode(e.to_string())),
    }
}

/// A configuration value or secret the operator gave this agent.
pub fn config(key: &str) -> Option<String> {
    agent_info::config(key)
}

/// The agent's id.
pub fn agent_id() -> String {
    agent_info::id()
}
