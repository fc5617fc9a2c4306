//! The host manifest of `tether serve`: host settings, the management API, tenants and
//! their agents, each with its module, device, configuration, secrets, limits and allowed
//! destinations (none unless listed).
//!
//! ```toml
//! [host]
//! http_listen = "127.0.0.1:8080"
//! [host.limits]                # defaults for every agent
//! memory_mib = 32
//!
//! [manage]
//! listen = "127.0.0.1:9090"
//!
//! [[tenant]]
//! name = "acme"
//! token = "a-long-random-secret"
//!
//! [[agent]]
//! id = "thermo-1"
//! tenant = "acme"
//! module = "agents/thermo.wasm"      # relative to this file, or "sha256:<hex>" of a cached one
//! allowed_hosts = ["https://*.azure-devices.net", "mqtts://*.azure-devices.net"]
//! config = { interval = "60" }
//! secrets = { connection_string = "HostName=..." }
//! device = { path = "/dev/serial/by-id/usb-board-1", baud = 115200 }
//! limits = { memory_mib = 16, http_rate = { burst = 40, per_sec = 2.0 } }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::policy::allowed_hosts::AllowedHosts;
use super::config::{AgentPolicy, AgentSettings, DeviceBinding, HostConfig, Limits, Rate, check_agent_id};

/// imp's outgoing HTTP rate: 40 requests of credit, refilled at 2 per second.
pub const IMP_HTTP_RATE: Rate = Rate { burst: 40, per_sec: 2.0 };
/// The log rate of manifest agents unless set: bursts of 200 lines, 50 lines/s.
pub const DEFAULT_LOG_RATE: Rate = Rate { burst: 200, per_sec: 50.0 };

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Malformed TOML or a bad value, at `line`.
    #[error("{path}:{line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: String },
}

/// A parsed, checked manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Host settings; the instance pool is sized for the agents (`max_agents`, and
    /// `limits.memory_mib` as the largest agent memory).
    pub host: HostConfig,
    pub manage: ManageConfig,
    pub tenants: Vec<Tenant>,
    pub agents: Vec<AgentEntry>,
}

/// The management API's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManageConfig {
    /// Where the management API and dashboard listen; not served when unset. (The
    /// largest module a deploy may upload is `[host.modules] max_module_bytes`.)
    pub listen: Option<SocketAddr>,
    /// Log streams (`/api/logs`, `/api/agents/{id}/logs`) one tenant may have open at
    /// once; past it, 429.
    pub max_log_streams: usize,
    /// How often the console's plots take a sample of every agent's counters, ms; the
    /// last 24 samples are kept.
    pub history_interval_ms: u64,
}

impl Default for ManageConfig {
    fn default() -> Self {
        ManageConfig { listen: None, max_log_streams: 16, history_interval_ms: 10_000 }
    }
}

/// A tenant and the bearer token that acts for it.
#[derive(Clone)]
pub struct Tenant {
    pub name: String,
    pub token: String,
}

// By hand, so that a debug print never carries the token.
impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant").field("name", &self.name).field("token", &"<redacted>").finish()
    }
}

/// Where an agent's module comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModuleSource {
    /// A component file.
    Path(PathBuf),
    /// A module this host compiled before, by the SHA-256 (hex) of its bytes.
    Digest(String),
}

/// One agent of the manifest.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub id: String,
    pub tenant: String,
    pub module: ModuleSource,
    /// Configuration values and secrets together (both read with `agent-info.config`).
    pub settings: AgentSettings,
    pub policy: AgentPolicy,
    /// In a cluster, only nodes started with this `--label` run it (the node with its
    /// device's port, say); ignored without a cluster.
    pub node_label: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    host: HostConfig,
    #[serde(default)]
    manage: ManageConfig,
    #[serde(default)]
    tenant: Vec<RawTenant>,
    #[serde(default)]
    agent: Vec<RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: Spanned<String>,
    token: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Spanned<String>,
    tenant: Spanned<String>,
    module: Spanned<String>,
    #[serde(default)]
    allowed_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    secrets: Option<Spanned<BTreeMap<String, String>>>,
    device: Option<DeviceBinding>,
    limits: Option<Spanned<toml::Table>>,
    node_label: Option<String>,
}

impl Manifest {
    /// Reads and checks a manifest; module paths are taken relative to its directory.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
        Manifest::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|(line, message)| ManifestError::Invalid {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses a manifest's text; the error carries the line it is about.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Manifest, (usize, String)> {
        let at = |span: Range<usize>, message: String| (line_of(text, span.start), message);
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            let message = e.message().trim().to_owned();
            (line, message)
        })?;
        // What the file leaves out of [host] gets the manifest's defaults, not `tether run`'s.
        let table: toml::Table = toml::from_str(text).map_err(|e| (1, e.message().to_owned()))?;
        let host_table = table.get("host").and_then(toml::Value::as_table);
        let limits_table = host_table.and_then(|h| h.get("limits")).and_then(toml::Value::as_table);
        let mut host = raw.host;
        if limits_table.is_none_or(|l| !l.contains_key("http_rate")) {
            host.limits.http_rate = Some(IMP_HTTP_RATE);
        }
        if limits_table.is_none_or(|l| !l.contains_key("log_rate")) {
            host.limits.log_rate = Some(DEFAULT_LOG_RATE);
        }
        host.limits.check().map_err(|e| (line_of_key(text, "[host.limits]"), e.to_string()))?;
        super::config::check_modules(&host.modules).map_err(|e| (line_of_key(text, "[host.modules]"), e.to_string()))?;
        if raw.manage.history_interval_ms < 100 {
            return Err((line_of_key(text, "history_interval_ms"), "manage.history_interval_ms must be at least 100: sampling every agent more often costs the host more than the plots are worth".into()));
        }
        if raw.manage.max_log_streams == 0 {
            return Err((line_of_key(text, "max_log_streams"), "manage.max_log_streams must be at least 1, or no tenant could follow a log".into()));
        }

        let mut tenants = Vec::new();
        let mut tenant_names = HashSet::new();
        let mut tokens = HashSet::new();
        for t in raw.tenant {
            if !tenant_names.insert(t.name.get_ref().clone()) {
                return Err(at(t.name.span(), format!("tenant {:?} is listed twice", t.name.get_ref())));
            }
            if t.token.get_ref().trim() != t.token.get_ref() {
                return Err(at(t.token.span(), "a tenant's token may not begin or end with spaces: a bearer header never carries them".into()));
            }
            if t.token.get_ref().len() < 16 || !tokens.insert(t.token.get_ref().clone()) {
                return Err(at(t.token.span(), "each tenant needs its own token of at least 16 characters".into()));
            }
            tenants.push(Tenant { name: t.name.into_inner(), token: t.token.into_inner() });
        }

        let mut agents = Vec::new();
        let mut ids = HashSet::new();
        for a in raw.agent {
            let id = a.id.get_ref().clone();
            check_agent_id(&id).map_err(|e| at(a.id.span(), e.to_string()))?;
            if !ids.insert(id.clone()) {
                return Err(at(a.id.span(), format!("agent {id:?} is listed twice")));
            }
            if !tenant_names.contains(a.tenant.get_ref()) {
                return Err(at(a.tenant.span(), format!("unknown tenant {:?}: add a [[tenant]] entry", a.tenant.get_ref())));
            }
            let module = match a.module.get_ref().strip_prefix("sha256:") {
                Some(digest) if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    ModuleSource::Digest(digest.to_ascii_lowercase())
                }
                Some(_) => return Err(at(a.module.span(), "a module digest is sha256: and 64 hex digits".into())),
                None => ModuleSource::Path(base_dir.join(a.module.get_ref())),
            };
            let mut allowed = Vec::new();
            for pattern in &a.allowed_hosts {
                let parsed = crate::policy::allowed_hosts::HostPattern::parse(pattern.get_ref()).map_err(|e| at(pattern.span(), e.to_string()))?;
                allowed.push(parsed);
            }
            let mut config = a.config;
            if let Some(secrets) = a.secrets {
                let span = secrets.span();
                for (key, value) in secrets.into_inner() {
                    if config.insert(key.clone(), value).is_some() {
                        return Err(at(span, format!("{key:?} is both a config value and a secret")));
                    }
                }
            }
            let limits = match a.limits {
                Some(overrides) => agent_limits(&host.limits, overrides.get_ref()).map_err(|m| at(overrides.span(), m))?,
                None => host.limits.clone(),
            };
            if let Some(device) = &a.device {
                device.check().map_err(|m| at(a.id.span(), m))?;
            }
            let tenant = a.tenant.into_inner();
            agents.push(AgentEntry {
                id: id.clone(),
                tenant: tenant.clone(),
                module,
                settings: AgentSettings { id: Some(id), config, device: a.device },
                policy: AgentPolicy { limits, allowed_hosts: AllowedHosts::Only(allowed), tenant: Some(tenant) },
                node_label: a.node_label,
            });
        }

        // Size the instance pool for these agents (and a few spare slots).
        let agent_count = u32::try_from(agents.len()).unwrap_or(u32::MAX);
        if host_table.is_none_or(|h| !h.contains_key("max_agents")) {
            host.max_agents = agent_count.saturating_add(16);
        } else if host.max_agents < agent_count {
            return Err((line_of_key(text, "max_agents"), format!("max_agents is {} but the manifest has {agent_count} agents", host.max_agents)));
        }
        host.limits.memory_mib = agents.iter().map(|a| a.policy.limits.memory_mib).fold(host.limits.memory_mib, u32::max);
        Ok(Manifest { host, manage: raw.manage, tenants, agents })
    }
}

/// Errors starting a manifest's agents.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An agent's module could not be loaded.
    #[error("agent {id}: {source}")]
    Load { id: String, source: crate::runtime::engine::LoadError },
    /// An agent could not be started.
    #[error("agent {id}: {source}")]
    Spawn { id: String, source: crate::runtime::host::SpawnError },
}

impl Manifest {
    /// Loads each module once (agents sharing a module share its compiled code) and
    /// starts every agent of the manifest in `host`.
    pub fn spawn_agents(&self, host: &crate::runtime::host::Host) -> Result<(), StartError> {
        let mut modules: HashMap<&ModuleSource, crate::runtime::engine::AgentModule> = HashMap::new();
        for entry in &self.agents {
            let module = match modules.get(&entry.module) {
                Some(module) => module.clone(),
                None => {
                    let loaded = match &entry.module {
                        ModuleSource::Path(path) => host.runtime().load_file(path),
                        ModuleSource::Digest(digest) => host.runtime().load_cached(digest),
                    };
                    let module = loaded.map_err(|source| StartError::Load { id: entry.id.clone(), source })?;
                    modules.insert(&entry.module, module.clone());
                    module
                }
            };
            let module = host.kept_or(&entry.id, module);
            host.spawn_with_policy(&entry.id, entry.settings.clone(), entry.policy.clone(), module)
                .map_err(|source| StartError::Spawn { id: entry.id.clone(), source })?;
        }
        Ok(())
    }

    /// Who may manage which agent, for the management API.
    pub fn access(&self) -> Access {
        Access {
            tokens: self.tenants.iter().map(|t| (t.token.clone(), t.name.clone())).collect(),
            owners: self.agents.iter().map(|a| (a.id.clone(), a.tenant.clone())).collect(),
        }
    }
}

/// Who may manage which agent: the management API's view of the tenants.
pub struct Access {
    /// Token → tenant.
    pub(crate) tokens: HashMap<String, String>,
    /// Agent id → tenant.
    pub(crate) owners: HashMap<String, String>,
}

impl Access {
    /// One tenant with `token`, owning `agents`: what `tether demo` serves its console with.
    pub fn single(tenant: &str, token: &str, agents: &[&str]) -> Access {
        Access {
            tokens: HashMap::from([(token.to_owned(), tenant.to_owned())]),
            owners: agents.iter().map(|id| ((*id).to_owned(), tenant.to_owned())).collect(),
        }
    }
}

/// The host's limits with an agent's overrides on top.
fn agent_limits(defaults: &Limits, overrides: &toml::Table) -> Result<Limits, String> {
    let mut table = toml::Table::try_from(defaults).map_err(|e| e.to_string())?;
    table.extend(overrides.clone());
    let limits: Limits = table.try_into().map_err(|e: toml::de::Error| format!("in limits: {}", e.message().trim()))?;
    limits.check().map_err(|e| e.to_string())?;
    Ok(limits)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The line of a key the deserializer gave no span for.
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines().position(|l| l.trim_start().starts_with(key)).map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[host]
http_listen = "127.0.0.1:0"

[[tenant]]
name = "acme"
token = "acme-token-0123456789"

[[agent]]
id = "a1"
tenant = "acme"
module = "probe.wasm"
allowed_hosts = ["https://*.azure-devices.net"]
config = { k = "v" }
secrets = { s = "hidden" }
limits = { memory_mib = 16, queue_bytes = 4096 }

[[agent]]
id = "a2"
tenant = "acme"
module = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
"#;

    #[test]
    fn a_debug_print_carries_no_token_and_no_secret() {
        let m = Manifest::parse(GOOD, Path::new("/m")).unwrap();
        let printed = format!("{m:?}");
        assert!(!printed.contains("acme-token") && !printed.contains("hidden"), "{printed}");
        assert!(printed.contains("acme") && printed.contains("\"s\""), "names and keys stay: {printed}");
    }

    #[test]
    fn parses_agents_with_defaults_and_overrides() {
        let m = Manifest::parse(GOOD, Path::new("/m")).unwrap();
        assert_eq!(m.agents.len(), 2);
        assert_eq!(m.host.max_agents, 18);
        let a1 = &m.agents[0];
        assert_eq!(a1.module, ModuleSource::Path("/m/probe.wasm".into()));
        assert_eq!(a1.settings.config.get("s").map(String::as_str), Some("hidden"));
        assert_eq!(a1.policy.limits.memory_mib, 16);
        assert_eq!(a1.policy.limits.queue_bytes, 4096);
        assert_eq!(m.agents[1].policy.limits.queue_bytes, 16 << 20);
        assert_eq!(a1.policy.limits.http_rate, Some(IMP_HTTP_RATE));
        assert_eq!(m.agents[1].policy.limits.memory_mib, 64);
        assert!(m.agents[1].policy.allowed_hosts.check("https", "example.com", 443).is_none());
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (GOOD.replace("tenant = \"acme\"\nmodule = \"probe", "tenant = \"other\"\nmodule = \"probe"), 11, "unknown tenant"),
            (GOOD.replace("\"https://*.azure-devices.net\"", "\"ftp://x\""), 13, "invalid allowed host"),
            (GOOD.replace("memory_mib = 16", "memory_mib = \"lots\""), 16, "in limits"),
            (GOOD.replace("id = \"a2\"", "id = \"a1\""), 19, "listed twice"),
            (GOOD.replace("config = {", "config = {{"), 14, ""),
            (GOOD.replace("module = \"sha256:0", "modul = \"sha256:0"), 21, "unknown field"),
            (GOOD.replace("acme-token-0123456789", "acme-token-0123456789 "), 7, "may not begin or end with spaces"),
            (GOOD.replace("[[tenant]]", "[host.modules]\nmax_nesting = 0\n\n[[tenant]]"), 5, "modules.max_nesting must be at least 1"),
            (GOOD.replace("[[tenant]]", "[manage]\nmax_log_streams = 0\n\n[[tenant]]"), 6, "max_log_streams must be at least 1"),
            (GOOD.replace("[[tenant]]", "[manage]\nhistory_interval_ms = 10\n\n[[tenant]]"), 6, "history_interval_ms must be at least 100"),
        ];
        for (text, line, needle) in cases {
            let (got, message) = Manifest::parse(&text, Path::new(".")).unwrap_err();
            assert_eq!(got, line, "{message}");
            assert!(message.contains(needle), "{message}");
        }
    }
}
