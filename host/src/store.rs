//! The `store` capability: one file per agent, replaced atomically so that a crash or power
//! loss leaves either the old value or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::agent::AgentCtx;
use crate::bindings::store::StoreError;
use crate::log::Level;

/// An agent's persistent value on disk.
pub(crate) struct AgentStore {
    path: PathBuf,
    cap: usize,
}

impl AgentStore {
    pub fn new(dir: &Path, agent_id: &str, cap: usize) -> AgentStore {
        AgentStore { path: dir.join(format!("{agent_id}.store")), cap }
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)?.sync_all()
}

impl crate::bindings::store::Host for AgentCtx {
    fn save(&mut self, data: Vec<u8>) -> Result<(), StoreError> {
        if data.len() > self.store.cap {
            return Err(StoreError::TooLarge);
        }
        write_atomically(&self.store.path, &data).map_err(|e| {
            self.agent.log.write(Level::Error, &format!("store: cannot write {}: {e}", self.store.path.display()));
            StoreError::Io
        })
    }

    fn load(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(&self.store.path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                self.agent.log.write(Level::Error, &format!("store: cannot read {}: {e}", self.store.path.display()));
                Err(StoreError::Io)
            }
        }
    }
}
