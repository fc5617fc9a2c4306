//! The wasmtime engine shared by all agents: sandbox configuration, the epoch ticker that
//! bounds CPU per event, and the on-disk cache of compiled components.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::instance::{self, AgentState};
use super::sched::TICK;
use crate::bindings::AgentPre;
use crate::hosting::config::HostConfig;

/// Errors loading an agent module.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not a WebAssembly component (e.g. a core module or another kind of file).
    #[error("not a WebAssembly component: {0}")]
    NotComponent(String),
    /// A component, but not of the `tether:agent/agent` world.
    #[error("not a tether:agent@0.1.0 agent: {0}")]
    WrongWorld(String),
    /// A module named by digest that this host never compiled.
    #[error("no compiled module sha256:{0} in the cache")]
    NotCached(String),
}

/// A compiled, linked agent module, ready to instantiate many times.
#[derive(Clone)]
pub struct AgentModule {
    pub(crate) pre: AgentPre<AgentState>,
    /// SHA-256 of the module's bytes, hex.
    pub digest: String,
}

/// The engine, linker and component cache.
pub struct Runtime {
    pub(crate) engine: Engine,
    linker: Linker<AgentState>,
    cache_dir: PathBuf,
}

impl Runtime {
    /// Builds the engine for `config` and starts the epoch ticker.
    pub fn new(config: &HostConfig) -> anyhow::Result<Arc<Runtime>> {
        let memory = u64::from(config.limits.memory_mib) << 20;
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            // Memories never grow past the cap, so reserving more address space per slot
            // only costs page tables; a small guard keeps 10,000 slots within reach.
            .memory_reservation(memory)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .async_stack_size(512 << 10)
            .max_wasm_stack(256 << 10);
        let agents = config.max_agents.max(1);
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasip2 component holds a few core instances, memories and tables.
        pool.total_component_instances(agents)
            .total_core_instances(agents * 8)
            .total_memories(agents * 2)
            .total_tables(agents * 4)
            // Each store keeps its fiber stack between calls, so every agent holds one.
            .total_stacks(agents)
            .max_memory_size(memory as usize)
            .max_memories_per_component(2)
            .max_tables_per_component(8)
            .max_core_instances_per_component(16)
            .table_elements(20_000)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;

        let weak = engine.weak();
        std::thread::Builder::new().name("tether-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })?;

        let mut linker = Linker::new(&engine);
        instance::link(&mut linker)?;
        Ok(Arc::new(Runtime { engine, linker, cache_dir: config.cache_dir.clone() }))
    }

    /// Loads a module from a file: see [`Runtime::load`].
    pub fn load_file(&self, path: &Path) -> Result<AgentModule, LoadError> {
        let bytes = std::fs::read(path)
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        self.load(&bytes)
    }

    /// Compiles (or takes from the cache) and links a module, checking that it is a
    /// component of the agent world.
    pub fn load(&self, bytes: &[u8]) -> Result<AgentModule, LoadError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let component = self.compile_cached(bytes, &digest)?;
        self.link(&component, digest)
    }

    /// Loads a module compiled earlier, by the SHA-256 (hex) of its bytes.
    pub fn load_cached(&self, digest: &str) -> Result<AgentModule, LoadError> {
        let path = self.cache_path(digest);
        let not_cached = || LoadError::NotCached(digest.to_owned());
        if !digest.bytes().all(|b| b.is_ascii_hexdigit()) || !path.exists() {
            return Err(not_cached());
        }
        // SAFETY: as in `compile_cached`.
        let component = unsafe { Component::deserialize_file(&self.engine, &path) }.map_err(|_| not_cached())?;
        self.link(&component, digest.to_owned())
    }

    fn link(&self, component: &Component, digest: String) -> Result<AgentModule, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::WrongWorld(one_line(&e)))?;
        let pre = AgentPre::new(pre).map_err(|e| LoadError::WrongWorld(one_line(&e)))?;
        Ok(AgentModule { pre, digest })
    }

    fn cache_path(&self, digest: &str) -> PathBuf {
        // The engine's compatibility hash is part of the name: a host upgrade or other
        // settings never load an incompatible artefact.
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut hasher);
        let engine_tag = std::hash::Hasher::finish(&hasher);
        self.cache_dir.join(format!("{digest}-{engine_tag:016x}.cwasm"))
    }

    fn compile_cached(&self, bytes: &[u8], digest: &str) -> Result<Component, LoadError> {
        if !wasmparser_is_component(bytes) {
            return Err(LoadError::NotComponent(describe_non_component(bytes)));
        }
        let path = self.cache_path(digest);
        if path.exists() {
            // SAFETY: the cache directory holds only artefacts this host serialized itself
            // for this engine configuration (checked again by wasmtime's header).
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(path = %path.display(), "recompiling: cached component unusable: {e:#}"),
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::NotComponent(one_line(&e)))?;
        if let Err(e) = write_cache(&path, &component) {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {e:#}");
        }
        Ok(component)
    }
}

fn write_cache(path: &Path, component: &Component) -> anyhow::Result<()> {
    let bytes = component.serialize()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::atomic_file::write(path, &bytes)?;
    Ok(())
}

/// A component's preamble is `\0asm` followed by a layer field of 1; a core module has 0.
fn wasmparser_is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[6..8] == [1, 0]
}

fn describe_non_component(bytes: &[u8]) -> String {
    if bytes.len() >= 8 && &bytes[0..4] == b"\0asm" {
        "this is a core WebAssembly module; build the agent for wasm32-wasip2 so that it is a component".into()
    } else {
        "the file does not start with the WebAssembly magic bytes".into()
    }
}

pub(crate) fn one_line(e: &impl std::fmt::Display) -> String {
    format!("{e:#}").replace('\n', " ")
}
