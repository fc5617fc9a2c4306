//! The file backend of the agent store: one file per agent, replaced atomically.

use std::path::{Path, PathBuf};

use super::backend::Backend;

/// An agent's value in `<dir>/<agent-id>.store`.
pub(crate) struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(dir: &Path, agent_id: &str) -> FileStore {
        FileStore { path: dir.join(format!("{agent_id}.store")) }
    }

    /// Bytes the value takes on disk; 0 before the first save.
    pub fn bytes_on_disk(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

impl Backend for FileStore {
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, data: &[u8]) -> std::io::Result<()> {
        crate::atomic_file::write(&self.path, data)
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}
