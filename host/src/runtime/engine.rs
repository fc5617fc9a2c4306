//! The wasmtime engine shared by all agents: sandbox configuration, the epoch ticker that
//! bounds CPU per event, and loading modules: shape pre-check, compile, link, cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::{CompileCache, Live};
use super::instance::{self, AgentState};
use super::shape::{ModuleLimits, ShapeError};
use super::worker::{self, compile_config};
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
    /// A module named by digest that this host never compiled (or evicted since).
    #[error("no compiled module sha256:{0} in the cache")]
    NotCached(String),
    /// Refused before compiling: past a `[host.modules]` limit, or undecodable.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// Compiling took longer than the module's deadline, and was stopped.
    #[error("module refused: compiling it took longer than its deadline of {0:.1?} (modules.compile_max_secs, modules.compile_ms_per_kib)")]
    CompileTimeout(Duration),
    /// The compiler process could not be run.
    #[error("cannot compile: {0}")]
    Compile(String),
}

/// A compiled, linked agent module, ready to instantiate many times.
#[derive(Clone)]
pub struct AgentModule {
    pub(crate) pre: AgentPre<AgentState>,
    /// SHA-256 of the module's bytes, hex.
    pub digest: String,
    /// Keeps the module's cached artefact from eviction while the module is in use.
    _live: Live,
}

/// The engine, linker and component cache.
pub struct Runtime {
    pub(crate) engine: Engine,
    linker: Linker<AgentState>,
    cache: CompileCache,
    modules: ModuleLimits,
    /// The `tether` binary that compiles in a child process; here, without a deadline,
    /// when unset.
    worker: Option<PathBuf>,
    cache_dir: PathBuf,
    memory_mib: u32,
    /// Set when the host stops: compiles in progress end at once.
    abandon: AtomicBool,
}

/// Memory mappings per agent slot, measured (BENCHMARKS.md, density): its fiber stack and
/// guard page in the pool, and about four more once it runs (its memory's image, the rest
/// of its memory slot, and the splits around them).
const MAPS_PER_AGENT: u64 = 6;
/// Mappings the rest of the process may need: threads, libraries, heap arenas.
const MAPS_SLACK: u64 = 4096;
/// Bytes of a freed memory or table slot reset in place rather than given back.
const KEEP_RESIDENT: usize = 64 << 10;

/// Refuses a pool the kernel's mapping limit could not hold, with the fix: past
/// `vm.max_map_count`, wasmtime fails to build the pool, or an agent fails to start with
/// "Cannot allocate memory".
fn map_count_check(agents: u32, limit: u64) -> anyhow::Result<()> {
    let needed = u64::from(agents) * MAPS_PER_AGENT + MAPS_SLACK;
    if needed > limit {
        let suggest = needed.div_ceil(65536) * 65536;
        anyhow::bail!(
            "room for {agents} agents needs about {needed} memory mappings, but the kernel allows {limit} (vm.max_map_count); \
             raise it with `sysctl -w vm.max_map_count={suggest}` (and a file in /etc/sysctl.d/ to keep it), or lower max_agents"
        );
    }
    Ok(())
}

impl Runtime {
    /// Builds the engine for `config` and starts the epoch ticker.
    pub fn new(config: &HostConfig) -> anyhow::Result<Arc<Runtime>> {
        let memory = u64::from(config.limits.memory_mib) << 20;
        let mut wasm = compile_config(config.limits.memory_mib);
        let agents = config.max_agents.max(1);
        if let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()) {
            map_count_check(agents, limit)?;
        }
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
            .max_core_instance_size(1 << 20)
            // A restarted or redeployed agent reuses a warm slot: resetting its first
            // pages with memset keeps them mapped, where madvise would make every page
            // fault again, and on a busy host also interrupt the other cores to flush
            // their TLBs (BENCHMARKS.md, density).
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        #[cfg(feature = "profiling")]
        if std::env::var_os("TETHER_PERF_MAP").is_some() {
            wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
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
        let cache = CompileCache::new(&config.cache_dir, config.cache_max_mib << 20, &engine);
        Ok(Arc::new(Runtime {
            engine,
            linker,
            cache,
            modules: config.modules.clone(),
            worker: config.compile_worker.clone(),
            cache_dir: config.cache_dir.clone(),
            memory_mib: config.limits.memory_mib,
            abandon: AtomicBool::new(false),
        }))
    }

    /// Stops the compiles in progress in child processes, and any later ones: the host is
    /// shutting down, and a deploy must not hold it up for a compile deadline.
    pub fn abandon_compiles(&self) {
        self.abandon.store(true, Ordering::Release);
    }

    /// The bounds on a module's shape checked before compiling.
    pub fn module_limits(&self) -> &ModuleLimits {
        &self.modules
    }

    /// Loads a module from a file: see [`Runtime::load`].
    pub fn load_file(&self, path: &Path) -> Result<AgentModule, LoadError> {
        let bytes = std::fs::read(path)
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        self.load(&bytes)
    }

    /// Checks a module's shape, compiles it (or takes it from the cache) and links it,
    /// checking that it is a component of the agent world. Only a module that links is
    /// cached.
    pub fn load(&self, bytes: &[u8]) -> Result<AgentModule, LoadError> {
        if !wasmparser_is_component(bytes) {
            return Err(LoadError::NotComponent(describe_non_component(bytes)));
        }
        // Before the cache too: limits lowered since a module was cached still hold for it.
        self.modules.check(bytes)?;
        let digest = hex::encode(Sha256::digest(bytes));
        if let Some(component) = self.cache.get(&self.engine, &digest) {
            return self.link(&component, digest);
        }
        let (component, artefact) = match &self.worker {
            Some(exe) => {
                let deadline = self.modules.compile_deadline(bytes.len());
                let artefact = worker::compile(exe, self.memory_mib, bytes, &self.cache_dir, deadline, &self.abandon).map_err(|failed| match failed {
                    worker::Failed::Deadline(deadline) => LoadError::CompileTimeout(deadline),
                    worker::Failed::Abandoned => LoadError::Compile("the host is shutting down".into()),
                    worker::Failed::Run(why) => LoadError::Compile(why),
                    worker::Failed::Refused(why) => LoadError::NotComponent(one_line(&why)),
                })?;
                (artefact.load(&self.engine).map_err(|e| LoadError::NotComponent(one_line(&e)))?, Some(artefact))
            }
            None => (Component::new(&self.engine, bytes).map_err(|e| LoadError::NotComponent(one_line(&e)))?, None),
        };
        let module = self.link(&component, digest)?;
        match artefact {
            // The worker's file is the artefact already: moved, not written again.
            Some(artefact) => self.cache.adopt(&module.digest, artefact.path()),
            None => self.cache.put(&module.digest, &component),
        }
        Ok(module)
    }

    /// Loads a module compiled earlier, by the SHA-256 (hex) of its bytes.
    pub fn load_cached(&self, digest: &str) -> Result<AgentModule, LoadError> {
        let component = self.cache.get(&self.engine, digest).ok_or_else(|| LoadError::NotCached(digest.to_owned()))?;
        self.link(&component, digest.to_owned())
    }

    fn link(&self, component: &Component, digest: String) -> Result<AgentModule, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::WrongWorld(one_line(&e)))?;
        let pre = AgentPre::new(pre).map_err(|e| LoadError::WrongWorld(one_line(&e)))?;
        let live = self.cache.hold(&digest);
        Ok(AgentModule { pre, digest, _live: live })
    }
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

#[cfg(test)]
mod tests {
    use super::map_count_check;

    #[test]
    fn a_pool_past_the_kernels_mapping_limit_is_refused_with_the_fix() {
        // Linux's default limit holds 10,000 agents (measured: about 60,400 mappings).
        assert!(map_count_check(10_000, 65_530).is_ok());
        let e = map_count_check(100_000, 65_530).unwrap_err().to_string();
        assert!(e.contains("100000 agents needs about 604096 memory mappings"), "{e}");
        assert!(e.contains("sysctl -w vm.max_map_count=655360"), "{e}");
        assert!(e.contains("lower max_agents"), "{e}");
        assert!(map_count_check(100_000, 655_360).is_ok());
    }
}
