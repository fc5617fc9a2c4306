//! The Tether agent host: runs Electric Imp-style agents as sandboxed WebAssembly
//! components, one long-lived store per agent, with the capabilities of `wit/`.
//!
//! Where things are (docs/architecture.md walks a message through them):
//! - [`runtime`]: the engine, an agent's life and restarts, the instance that composes the
//!   capabilities, the event queue, CPU sharing, and the [`Host`] itself;
//! - `capabilities`: one folder per WIT interface (log, timers, store, http, mqtt,
//!   device, agent-info), each owning its state, its `Host` impl, its policy and its
//!   linker projection; none imports another;
//! - [`kit`]: the handles a capability is given (event posting, the agent's log, counters,
//!   tasks);
//! - [`policy`]: allowed hosts, the MQTT connect guard, rates, TLS trust;
//! - [`hosting`]: configuration, the manifest, the management API, kept deploys;
//! - `bindings`: the code generated from `wit/`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tether_host::{Host, config::{HostConfig, AgentSettings}};
//! let host = Host::start(HostConfig::default()).await?;
//! let module = host.runtime().load_file("hello.wasm".as_ref())?;
//! host.spawn("hello", AgentSettings::default(), module)?;
//! # Ok(()) }
//! ```

mod atomic_file;
mod bindings;
mod capabilities;
pub mod hosting;
pub mod kit;
pub mod policy;
pub mod runtime;

pub use capabilities::device::{GatewayConfig, run_gateway};
pub use capabilities::mqtt::code as mqtt_code;
pub use hosting::{cluster, config, hub_page, manage, manifest};
pub use kit::log::{Level, LogLine};
pub use kit::metrics;
pub use policy::allowed_hosts;
pub use runtime::agent::AgentStatus;
pub use runtime::engine::{AgentModule, LoadError, Runtime};
pub use hosting::deployed::DeployRecord;
pub use runtime::host::{AgentReport, ControlError, Host, RollbackError, SpawnError};
pub use runtime::{bench, engine};
