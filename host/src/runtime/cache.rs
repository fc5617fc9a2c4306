//! The on-disk cache of compiled components, named by the module's SHA-256 and the
//! engine's compatibility hash, capped in size. Only modules that linked are written, so
//! refused uploads leave nothing behind; past the cap, the least recently used artefacts
//! go first, except those of modules loaded in this process and still held by an agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use wasmtime::Engine;
use wasmtime::component::Component;

/// Held by every loaded module: while one is alive, its artefact is not evicted.
pub(crate) type Live = Arc<()>;

pub(crate) struct CompileCache {
    dir: PathBuf,
    max_bytes: u64,
    engine_tag: String,
    live: Mutex<HashMap<String, Weak<()>>>,
}

impl CompileCache {
    pub fn new(dir: &Path, max_bytes: u64, engine: &Engine) -> CompileCache {
        // The engine's compatibility hash is part of the name: a host upgrade or other
        // settings never load an incompatible artefact.
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let engine_tag = format!("{:016x}", std::hash::Hasher::finish(&hasher));
        CompileCache { dir: dir.to_owned(), max_bytes, engine_tag, live: Mutex::new(HashMap::new()) }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_tag))
    }

    /// Marks `digest` as in use for as long as the returned handle lives.
    pub fn hold(&self, digest: &str) -> Live {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, weak| weak.strong_count() > 0);
        if let Some(held) = live.get(digest).and_then(Weak::upgrade) {
            return held;
        }
        let held = Arc::new(());
        live.insert(digest.to_owned(), Arc::downgrade(&held));
        held
    }

    /// The cached artefact of `digest`, if there is a usable one; a hit counts as a use.
    pub fn get(&self, engine: &Engine, digest: &str) -> Option<Component> {
        if !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let path = self.path(digest);
        if !path.exists() {
            return None;
        }
        // SAFETY: the cache directory holds only artefacts this host serialized itself for
        // this engine configuration (checked again by wasmtime's header).
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                // The mtime is the eviction order; failing to bump it only ages the entry.
                let _ = std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                Some(component)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "recompiling: cached component unusable: {e:#}");
                None
            }
        }
    }

    /// Writes `component`'s artefact, then evicts old ones past the cap. A failure only
    /// costs a compile later, so it is logged, not returned.
    pub fn put(&self, digest: &str, component: &Component) {
        let path = self.path(digest);
        let written = component.serialize().map_err(anyhow::Error::from).and_then(|bytes| {
            std::fs::create_dir_all(&self.dir)?;
            crate::atomic_file::write(&path, &bytes)?;
            Ok(())
        });
        self.written(digest, &path, written);
    }

    /// Takes `file`, an artefact a compile worker wrote in the cache directory, as
    /// `digest`'s, by renaming it. The worker does not sync it: after a power loss a torn
    /// artefact fails wasmtime's header check and is compiled again.
    pub fn adopt(&self, digest: &str, file: &Path) {
        let path = self.path(digest);
        let moved = std::fs::rename(file, &path).map_err(anyhow::Error::from);
        self.written(digest, &path, moved);
    }

    fn written(&self, digest: &str, path: &Path, written: anyhow::Result<()>) {
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {e:#}");
        }
        if let Err(e) = self.evict(digest) {
            tracing::warn!(dir = %self.dir.display(), "cannot trim the compile cache: {e:#}");
        }
    }

    fn evict(&self, keep: &str) -> std::io::Result<()> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".cwasm") else { continue };
            let meta = entry.metadata()?;
            total += meta.len();
            let digest = stem.split('-').next().unwrap_or_default().to_owned();
            entries.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), entry.path(), digest));
        }
        if total <= self.max_bytes {
            return Ok(());
        }
        entries.sort_by_key(|e| e.0);
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for (_, len, path, digest) in entries {
            if total <= self.max_bytes {
                break;
            }
            let in_use = digest == keep || live.get(&digest).is_some_and(|w| w.strong_count() > 0);
            if !in_use {
                std::fs::remove_file(&path)?;
                total -= len;
                tracing::info!(path = %path.display(), "evicted from the compile cache");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(engine: &Engine, text: &str) -> Component {
        Component::new(engine, wat::parse_str(text).expect("wat")).expect("compiles")
    }

    fn cached(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "cwasm"))).count())
    }

    #[test]
    fn least_recently_used_artefacts_go_first_unless_held() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().expect("tempdir");
        // One component under several digests: artefacts of one size.
        let a = component(&engine, "(component (core module (func)))");
        let (b, c) = (a.clone(), a.clone());
        let one = a.serialize().expect("serialize").len() as u64;
        // Room for two artefacts, not three.
        let cache = CompileCache::new(dir.path(), one * 5 / 2, &engine);
        cache.put("aa", &a);
        let held = cache.hold("aa");
        cache.put("bb", &b);
        assert_eq!(cached(dir.path()), 2);
        cache.put("cc", &c);
        assert_eq!(cached(dir.path()), 2, "one went");
        assert!(cache.get(&engine, "aa").is_some(), "a held module is kept");
        assert!(cache.get(&engine, "bb").is_none(), "the oldest unheld one went");
        drop(held);
        // Now `aa` is not held, and it was used after `cc` was written: `cc` goes.
        cache.put("dd", &b);
        assert!(cache.get(&engine, "cc").is_none());
        assert!(cache.get(&engine, "aa").is_some() && cache.get(&engine, "dd").is_some());
    }
}
