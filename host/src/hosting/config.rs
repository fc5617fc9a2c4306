//! Configuration of the host and of one agent, as read from TOML.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::allowed_hosts::AllowedHosts;
pub use crate::runtime::shape::ModuleLimits;
pub use crate::policy::rate::Rate;

/// Errors reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML is malformed or has unknown keys; the message names the line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Settings shared by all agents of one host.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Where agent URLs are served: `http://<addr>/<agent-id>/...`.
    pub http_listen: SocketAddr,
    /// The base URL agents are told they live under; `http://<http_listen>` when unset.
    pub public_url: Option<String>,
    /// One file per agent holds its persistent store, another its queues.
    pub store_dir: PathBuf,
    /// Compiled components, named by content hash.
    pub cache_dir: PathBuf,
    /// PEM files of CAs trusted for agents' outgoing TLS (MQTT and HTTP) besides the public
    /// roots, e.g. the hub emulator's CA.
    pub trusted_ca_files: Vec<PathBuf>,
    /// How many agents the instance pool is sized for.
    pub max_agents: u32,
    /// Connections to the agents' URLs open at once; over it, a new one is closed at once.
    pub http_max_connections: usize,
    /// Connections to the agents' URLs open at once from one address; over it, a new one
    /// is closed at once. Behind a proxy every client has the proxy's address: raise it
    /// to `http_max_connections` there.
    pub http_max_connections_per_address: usize,
    /// How long a client of an agent URL may take to send a request's headers, s.
    pub http_header_timeout_secs: u64,
    /// Whether a queue append waits for an fsync. Without it an appended entry survives a
    /// crash of the host (kill -9 included) but the last ones may be lost in a power loss
    /// or a kernel crash; with it they survive those too, for a disk flush per append.
    pub queue_fsync: bool,
    /// Bytes the compile cache may hold; past it, the least recently used artefacts of
    /// modules no agent runs are removed, MiB.
    pub cache_max_mib: u64,
    /// Modules compiled at once (deploys wait their turn); each compile may use every core.
    pub compile_concurrency: usize,
    /// Bounds on a module's shape, checked before it is compiled, and its compile deadline.
    pub modules: ModuleLimits,
    /// Move an agent that is in a long event or uses over a tenth of a core to low-priority
    /// threads, behind lighter ones (default true). Off, every agent stays on the I/O
    /// threads: fewer thread hops per event for a busy agent, but no shelter from a
    /// spinning neighbour but the CPU budget.
    pub slow_lane: bool,
    /// The `tether` binary, to compile modules in a child process that is stopped at the
    /// deadline; the `tether` commands set it. Unset (a library embedding the host), modules
    /// compile in this process with no deadline.
    #[serde(skip)]
    pub compile_worker: Option<PathBuf>,
    /// Limits applied to every agent.
    pub limits: Limits,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            store_dir: PathBuf::from("tether-data/store"),
            cache_dir: PathBuf::from("tether-data/cache"),
            trusted_ca_files: Vec::new(),
            max_agents: 100,
            http_max_connections: 4096,
            http_max_connections_per_address: 256,
            http_header_timeout_secs: 10,
            queue_fsync: false,
            cache_max_mib: 1024,
            compile_concurrency: 1,
            modules: ModuleLimits::default(),
            slow_lane: true,
            compile_worker: None,
            limits: Limits::default(),
        }
    }
}

/// Per-agent resource limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap per agent, MiB.
    pub memory_mib: u32,
    /// CPU time one event may use before the agent is stopped, ms.
    pub cpu_ms_per_event: u32,
    /// Persistent store cap, bytes (imp: 64 KiB).
    pub store_bytes: usize,
    /// Saves to the persistent store (each one a file flushed to disk); past it,
    /// `rate-limited`.
    pub store_rate: Rate,
    /// Payload bytes kept over all of the agent's queues (beyond imp).
    pub queue_bytes: usize,
    /// Largest body of an outgoing request, its response, or an incoming request, bytes;
    /// an outgoing request past it fails with `too-large`.
    pub http_body_bytes: usize,
    /// Default timeout of an outgoing request, s.
    pub http_timeout_secs: u32,
    /// Longest timeout an outgoing request may name; a longer one is cut to it, s.
    pub http_max_timeout_secs: u32,
    /// Outgoing requests an agent may have in flight; past it, `too-many-in-flight`.
    pub http_in_flight: usize,
    /// Body bytes of the outgoing requests in flight, which the host holds until each
    /// ends; past it, `too-many-in-flight`.
    pub http_in_flight_bytes: usize,
    /// How long an incoming request waits for the agent's answer, s.
    pub inbound_timeout_secs: u32,
    /// Bytes the requests waiting for the agent may hold (their bodies, and 1 KiB plus the
    /// head of each); past it, a request gets 503 before its body is read.
    pub inbound_queue_bytes: usize,
    /// Connections to the agent's URL with a request in progress (being received,
    /// waiting for the agent, or being answered); past it, 503 and the connection is
    /// closed, so that one agent's URL cannot take the host's `http_max_connections`.
    pub http_connections: usize,
    /// Largest MQTT message in either direction, bytes (imp: 256 KiB).
    pub mqtt_message_bytes: usize,
    /// Bytes of MQTT publishes the host holds for an agent until they are written (QoS 0)
    /// or acknowledged (QoS 1), over all its clients; past it, `queue-full`.
    pub mqtt_pending_bytes: usize,
    /// MQTT clients an agent may have open (connecting or connected) at once; past it,
    /// `connect` fails with `too-many-connections`.
    pub mqtt_connections: usize,
    /// Messages to the agent's device waiting to be sent (a slow device, or held while it
    /// is disconnected); past it, `queue-full`.
    pub device_queue_messages: usize,
    /// Their bytes (names and payloads); past it, `queue-full`.
    pub device_queue_bytes: usize,
    /// Timers an agent may have pending (scheduled, or fired and not yet delivered); past
    /// it, a wakeup is refused.
    pub timers: usize,
    /// Restarts in a row (none lasting `healthy_after_secs`) before an agent is marked failed.
    pub max_restarts: u32,
    /// An instance that ran this long resets the restart count, s.
    pub healthy_after_secs: u32,
    /// Outgoing HTTP requests (imp: 40 at 2/s); over it, `rate-limited`. Unlimited when unset.
    pub http_rate: Option<Rate>,
    /// Log lines; over it, lines are dropped and counted. Unlimited when unset.
    pub log_rate: Option<Rate>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 64,
            cpu_ms_per_event: 1000,
            store_bytes: 64 * 1024,
            store_rate: Rate { burst: 200, per_sec: 100.0 },
            queue_bytes: 16 * 1024 * 1024,
            http_body_bytes: 4 * 1024 * 1024,
            http_timeout_secs: 60,
            http_max_timeout_secs: 300,
            http_in_flight: 64,
            http_in_flight_bytes: 16 * 1024 * 1024,
            inbound_timeout_secs: 60,
            inbound_queue_bytes: 16 * 1024 * 1024,
            http_connections: 256,
            mqtt_message_bytes: 256 * 1024,
            mqtt_connections: 16,
            mqtt_pending_bytes: 16 * 1024 * 1024,
            timers: 1024,
            device_queue_messages: 256,
            device_queue_bytes: 1 << 20,
            max_restarts: 8,
            healthy_after_secs: 60,
            http_rate: None,
            log_rate: None,
        }
    }
}

/// What one agent may use and reach, beyond its [`AgentSettings`].
#[derive(Debug, Clone)]
pub struct AgentPolicy {
    pub limits: Limits,
    pub allowed_hosts: AllowedHosts,
    /// The tenant the agent belongs to, if any: its lines go to that tenant's log stream,
    /// which no other tenant's agents write to.
    pub tenant: Option<String>,
}

/// One agent's identity and configuration values.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// The agent id; `tether run` derives one from the module's file name when unset.
    pub id: Option<String>,
    /// Values the agent reads with `agent-info.config`.
    pub config: BTreeMap<String, String>,
    /// The agent's device, if it has one: the serial port it is attached to.
    pub device: Option<DeviceBinding>,
}

// By hand: `config` holds the manifest's secrets too, and a debug print (a log line, a
// panic message) must not carry them. Keys are shown, values are not.
impl std::fmt::Debug for AgentSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSettings")
            .field("id", &self.id)
            .field("config", &self.config.keys().map(|k| (k, "<redacted>")).collect::<BTreeMap<_, _>>())
            .field("device", &self.device)
            .finish()
    }
}

/// Where an agent's device is attached: a serial port, 8N1, on this machine (`path`), or
/// on a gateway box that runs `tether gateway` for the agent (`gateway = true`, cluster
/// mode only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBinding {
    /// The port's path (`/dev/ttyUSB0`, a stable `/dev/serial/by-id/...` link, or a pty).
    #[serde(default)]
    pub path: PathBuf,
    /// Line speed; default 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// The device is on a gateway box, reached over the cluster's NATS.
    #[serde(default)]
    pub gateway: bool,
}

impl DeviceBinding {
    /// A serial port on this machine.
    pub fn serial(path: PathBuf, baud: u32) -> DeviceBinding {
        DeviceBinding { path, baud, gateway: false }
    }

    /// Refuses a binding that names no port, or both a port and a gateway.
    pub fn check(&self) -> Result<(), String> {
        match (self.gateway, self.path.as_os_str().is_empty()) {
            (false, true) => Err("device: give the port's `path`, or `gateway = true` for a device on a gateway box".into()),
            (true, false) => Err("device: a `path` is for a port on this machine; a device on a gateway has none here".into()),
            _ => Ok(()),
        }
    }
}

fn default_baud() -> u32 {
    115_200
}

/// The file given to `tether run --config`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub host: HostConfig,
    pub agent: AgentSettings,
}

impl RunConfig {
    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config: RunConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(&e.to_string()),
        })?;
        config.host.limits.check()?;
        check_modules(&config.host.modules)?;
        if let Some(device) = &config.agent.device {
            device.check().map_err(ConfigError::Invalid)?;
        }
        Ok(config)
    }
}

/// Rejects module limits that would refuse every module or never stop a compile.
pub fn check_modules(m: &ModuleLimits) -> Result<(), ConfigError> {
    let counts = [
        ("max_module_bytes", m.max_module_bytes as u64),
        ("max_code_bytes", m.max_code_bytes as u64),
        ("max_functions", m.max_functions as u64),
        ("max_function_bytes", m.max_function_bytes as u64),
        ("max_function_operators", m.max_function_operators as u64),
        ("max_function_locals", m.max_function_locals),
        ("max_nesting", m.max_nesting as u64),
    ];
    if let Some((name, _)) = counts.iter().find(|(_, v)| *v == 0) {
        return Err(ConfigError::Invalid(format!("modules.{name} must be at least 1: 0 refuses every module")));
    }
    if !(m.compile_max_secs.is_finite() && m.compile_max_secs > 0.0 && m.compile_ms_per_kib.is_finite() && m.compile_ms_per_kib >= 0.0) {
        return Err(ConfigError::Invalid("modules.compile_max_secs must be over 0 and modules.compile_ms_per_kib at least 0, both finite".into()));
    }
    Ok(())
}

impl Limits {
    /// Rejects limits that cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.memory_mib == 0 || self.memory_mib > 4096 {
            return Err(ConfigError::Invalid(format!(
                "limits.memory_mib must be 1..=4096, not {}",
                self.memory_mib
            )));
        }
        for (name, rate) in [("http_rate", self.http_rate), ("log_rate", self.log_rate), ("store_rate", Some(self.store_rate))] {
            if rate.is_some_and(|r| r.burst == 0 || !r.per_sec.is_finite() || r.per_sec <= 0.0) {
                return Err(ConfigError::Invalid(format!("limits.{name} needs burst >= 1 and per_sec > 0")));
            }
        }
        if self.inbound_queue_bytes < self.http_body_bytes {
            return Err(ConfigError::Invalid(format!(
                "limits.inbound_queue_bytes ({}) must be at least limits.http_body_bytes ({}), or a largest body could never wait",
                self.inbound_queue_bytes, self.http_body_bytes
            )));
        }
        if self.mqtt_connections == 0 || self.timers == 0 || self.http_in_flight == 0 || self.http_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.mqtt_connections, limits.timers, limits.http_in_flight and limits.http_connections must be at least 1".into(),
            ));
        }
        if self.device_queue_messages == 0 || self.device_queue_bytes < 256 * 1024 {
            return Err(ConfigError::Invalid(
                "limits.device_queue_messages must be at least 1 and limits.device_queue_bytes at least 262144 (one largest message)".into(),
            ));
        }
        if self.mqtt_pending_bytes < self.mqtt_message_bytes {
            return Err(ConfigError::Invalid(format!(
                "limits.mqtt_pending_bytes ({}) must be at least limits.mqtt_message_bytes ({}), or a largest message could never be sent",
                self.mqtt_pending_bytes, self.mqtt_message_bytes
            )));
        }
        if self.http_in_flight_bytes < self.http_body_bytes {
            return Err(ConfigError::Invalid(format!(
                "limits.http_in_flight_bytes ({}) must be at least limits.http_body_bytes ({}), or a largest body could never be sent",
                self.http_in_flight_bytes, self.http_body_bytes
            )));
        }
        if self.cpu_ms_per_event < crate::runtime::sched::TICK.as_millis() as u32 {
            return Err(ConfigError::Invalid(format!(
                "limits.cpu_ms_per_event must be at least {} ms",
                crate::runtime::sched::TICK.as_millis()
            )));
        }
        Ok(())
    }
}

/// Checks an agent id: it is a URL segment and a file name, so it is kept plain.
pub fn check_agent_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "agent id {id:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'"
        )))
    }
}

/// toml's messages span several lines (a source excerpt); keep the first and the line number.
fn one_line(message: &str) -> String {
    message.split('\n').filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('|')).collect::<Vec<_>>().join(": ")
}
