//! Versions deployed through the management API, kept beside the agents' stores so that a
//! host started again from the same manifest runs them rather than the manifest's older
//! module. A manifest edited since (another module for the agent) wins: it is the newer
//! word, and the kept version is removed.
//!
//! Layout, in `<store_dir>/deployed/`: `<id>.wasm`, the component as uploaded (so that
//! another engine can compile it again), and `<id>.base`, the digest of the manifest
//! module it replaced. For the console's deploy history and rollback, also
//! `<id>.history`, the agent's last [`MAX_HISTORY`] deploys as JSON lines, and
//! `<id>.versions/<digest>.wasm`, the last [`MAX_VERSIONS`] versions deployed, to roll
//! back to.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::atomic_file::write as write_atomically;

/// Deploys remembered per agent.
pub const MAX_HISTORY: usize = 50;
/// Versions kept per agent to roll back to: the bytes of each take disk space, a few MiB
/// at most (`max_module_bytes`).
pub const MAX_VERSIONS: usize = 8;

/// One deploy in an agent's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRecord {
    /// The digest of the version deployed.
    pub module: String,
    /// When, seconds since the Unix epoch.
    pub at: u64,
    /// The tenant whose token deployed it.
    pub by: String,
    /// `"deploy"` (a new upload) or `"rollback"`.
    pub via: String,
}

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

    fn versions(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.versions"))
    }

    /// The digest of the manifest module that API deploys of `id` replaced, if any is kept.
    pub fn base(&self, id: &str) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.paths(id).1) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Agent `id`'s deploys, oldest first.
    pub fn history(&self, id: &str) -> io::Result<Vec<DeployRecord>> {
        let text = match std::fs::read_to_string(self.dir.join(format!("{id}.history"))) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A line that does not parse (a file edited by hand) is skipped, not fatal.
        Ok(text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect())
    }

    /// Adds `module` to agent `id`'s history, and keeps `bytes` (if given) to roll back to,
    /// forgetting the oldest records and versions past the limits.
    pub fn record(&self, id: &str, module: &str, bytes: Option<&[u8]>, by: &str, via: &str) -> io::Result<()> {
        let mut history = self.history(id)?;
        let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        history.push(DeployRecord { module: module.to_owned(), at, by: by.to_owned(), via: via.to_owned() });
        let excess = history.len().saturating_sub(MAX_HISTORY);
        history.drain(..excess);
        if let Some(bytes) = bytes {
            write_atomically(&self.versions(id).join(format!("{module}.wasm")), bytes)?;
        }
        // The newest distinct versions stay; older files go.
        let mut keep: Vec<&str> = Vec::new();
        for record in history.iter().rev() {
            if keep.len() < MAX_VERSIONS && !keep.contains(&record.module.as_str()) {
                keep.push(&record.module);
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.versions(id)) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let digest = name.to_string_lossy();
                if !keep.iter().any(|k| digest.strip_suffix(".wasm") == Some(k)) {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let mut text = String::new();
        for record in &history {
            text.push_str(&serde_json::to_string(record).map_err(io::Error::other)?);
            text.push('\n');
        }
        write_atomically(&self.dir.join(format!("{id}.history")), text.as_bytes())
    }

    /// The bytes of version `module` of agent `id`, if they are still kept.
    pub fn version(&self, id: &str, module: &str) -> io::Result<Option<Vec<u8>>> {
        // Digests are hex; anything else is no version (and no path outside the folder).
        if module.is_empty() || !module.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        match std::fs::read(self.versions(id).join(format!("{module}.wasm"))) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_and_the_versions_to_roll_back_to_are_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let deployed = Deployed::new(dir.path());
        assert!(deployed.history("a").expect("none yet").is_empty());
        for i in 0..MAX_HISTORY + 5 {
            let digest = format!("{:02x}", i % (MAX_VERSIONS + 2));
            deployed.record("a", &digest, Some(digest.as_bytes()), "t", "deploy").expect("written");
        }
        let history = deployed.history("a").expect("read");
        assert_eq!(history.len(), MAX_HISTORY);
        let newest = &history[MAX_HISTORY - 1];
        assert_eq!((newest.by.as_str(), newest.via.as_str()), ("t", "deploy"));
        assert_eq!(deployed.version("a", &newest.module).expect("read"), Some(newest.module.as_bytes().to_vec()));
        let kept = std::fs::read_dir(deployed.versions("a")).expect("folder").count();
        assert_eq!(kept, MAX_VERSIONS, "only the newest versions stay on disk");
        assert_eq!(deployed.version("a", "../a.history").expect("refused"), None, "not a digest");
        assert_eq!(deployed.version("b", &newest.module).expect("read"), None, "another agent's versions are its own");
    }
}
