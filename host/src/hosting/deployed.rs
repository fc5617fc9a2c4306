//! Versions deployed through the management API, kept beside the agents' stores so that a
//! host started again from the same manifest runs them rather than the manifest's older
//! module. A manifest edited since (another module for the agent) wins: it is the newer
//! word, and the kept version is removed.
//!
//! Layout, in `<store_dir>/deployed/`: `<id>.wasm`, the component as uploaded (so that
//! another engine can compile it again), and `<id>.base`, the digest of the manifest
//! module it replaced.

use std::io;
use std::path::{Path, PathBuf};

use crate::atomic_file::write as write_atomically;

/// The kept versions of a host's agents.
pub(crate) struct Deployed {
    dir: PathBuf,
}

impl Deployed {
    pub fn new(store_dir: &Path) -> Deployed {
        Deployed { dir: store_dir.join("deployed") }
    }

    fn paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{id}.wasm")), self.dir.join(format!("{id}.base")))
    }

    /// Keeps `bytes` as agent `id`'s version. `running` is the digest of what it runs now,
    /// which is the manifest's module unless an earlier deploy was kept (whose base stays).
    pub fn keep(&self, id: &str, bytes: &[u8], running: &str) -> io::Result<()> {
        let (wasm, base) = self.paths(id);
        let replaced = match std::fs::read_to_string(&base) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => running.to_owned(),
            Err(e) => return Err(e),
        };
        write_atomically(&wasm, bytes)?;
        write_atomically(&base, replaced.as_bytes())
    }

    /// Agent `id`'s kept version, if the manifest still names the module it replaced
    /// (`manifest`, a digest). One the manifest has moved past is removed.
    pub fn kept(&self, id: &str, manifest: &str) -> io::Result<Option<Vec<u8>>> {
        let (wasm, base) = self.paths(id);
        let replaced = match std::fs::read_to_string(&base) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if replaced != manifest {
            self.forget(id)?;
            return Ok(None);
        }
        std::fs::read(&wasm).map(Some)
    }

    /// Removes agent `id`'s kept version.
    pub fn forget(&self, id: &str) -> io::Result<()> {
        let (wasm, base) = self.paths(id);
        for path in [base, wasm] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}
