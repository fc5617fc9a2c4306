//! The running host: its agents, the HTTP server of their URLs, and the public API the
//! CLI, the management API and the tests drive. Spawning an agent builds each
//! capability's policy for it from its settings; the agent then runs in [`super::agent`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, watch};

use super::agent::{self, AgentShared, AgentStatus, Control, Resume};
use super::engine::{AgentModule, LoadError, Runtime};
use super::instance::AgentParts;
use super::queue::{Envelope, Queue};
use super::sched::SlowLane;
use crate::capabilities::agent_info::AgentInfo;
use crate::capabilities::device::{self, AnyLine, GatewayLine, SerialLine};
use crate::capabilities::http::inbound::{self, Door, Doors};
use crate::capabilities::http::{outbound, server};
use crate::capabilities::mqtt;
use crate::capabilities::queue::{self, SqliteQueues};
use crate::capabilities::store::{self, FileStore};
use crate::hosting::config::{AgentPolicy, AgentSettings, ConfigError, HostConfig};
use crate::hosting::deployed::{DeployRecord, Deployed};
use crate::kit::Handles;
use crate::kit::blocking::Blocking;
use crate::kit::events::Events;
use crate::kit::lanes::{AgentLane, Lanes};
use crate::kit::log::{LogLine, Logger};
use crate::kit::metrics::{AgentMetrics, MetricsSnapshot};
use crate::policy::allowed_hosts::AllowedHosts;
use crate::policy::connect_guard::ConnectGuard;
use crate::policy::tls::TlsTrust;

/// Host-wide state every agent shares.
pub(crate) struct HostShared {
    config: HostConfig,
    runtime: Arc<Runtime>,
    deployed: Deployed,
    /// The slow lane's threads, kept for as long as the host runs.
    _slow_lane: SlowLane,
    /// Where agents and the tasks that follow them run.
    lanes: Lanes,
    /// Where MQTT connections limited to public addresses are checked; kept for as long
    /// as the host runs.
    _connect_guard: ConnectGuard,
    /// The runtime of the host's own tasks (timers, connections, requests), which guest
    /// calls on the slow lane must not spawn onto their own.
    io: tokio::runtime::Handle,
    http_clients: outbound::Clients,
    mqtt_network: Arc<mqtt::Network>,
    public_url: String,
    agents: RwLock<HashMap<String, Arc<AgentShared>>>,
    logs: broadcast::Sender<LogLine>,
    /// Each tenant's own stream: a noisy tenant makes only its own readers lag.
    tenant_logs: Mutex<HashMap<String, broadcast::Sender<LogLine>>>,
    shutdown: watch::Sender<bool>,
    /// Compiles running at once (`compile_concurrency`).
    compile_gate: tokio::sync::Semaphore,
    /// Where requests for agents that run on other nodes go (cluster mode).
    forward: std::sync::OnceLock<Arc<dyn inbound::Forward>>,
    /// The cluster's NATS, for devices on gateway boxes (cluster mode).
    gateways: std::sync::OnceLock<async_nats::Client>,
}

impl HostShared {
    fn agent(&self, id: &str) -> Option<Arc<AgentShared>> {
        self.agents.read().ok()?.get(id).cloned()
    }

    fn tenant_logs(&self, tenant: &str) -> broadcast::Sender<LogLine> {
        let mut streams = self.tenant_logs.lock().unwrap_or_else(|p| p.into_inner());
        streams.entry(tenant.to_owned()).or_insert_with(|| broadcast::channel(TENANT_LOG_LINES).0).clone()
    }
}

/// Lines a tenant's log stream holds for a reader that is behind.
const TENANT_LOG_LINES: usize = 1024;

impl Doors for HostShared {
    fn door(&self, id: &str) -> Option<Door> {
        let agent = self.agent(id)?;
        Some(Door {
            requests: Events::any_instance(agent.parts.queue.clone()),
            body_bytes: agent.parts.limits.http_body_bytes,
            timeout: Duration::from_secs(agent.parts.limits.inbound_timeout_secs.into()),
            backlog: agent.parts.backlog.clone(),
            backlog_bytes: agent.parts.limits.inbound_queue_bytes,
            max_connections: agent.parts.limits.http_connections,
            log: agent.parts.handles.log.clone(),
        })
    }

    fn forward(&self) -> Option<Arc<dyn inbound::Forward>> {
        self.forward.get().cloned()
    }
}

/// Where an agent keeps its `server.save` value and its queues when not in the store
/// directory's files (cluster mode: in JetStream).
pub(crate) struct Kept {
    pub store: Box<dyn store::Backend>,
    pub queues: Arc<dyn queue::Backend>,
}

/// Errors starting an agent.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The id is not usable.
    #[error(transparent)]
    Id(#[from] ConfigError),
    /// An agent with this id runs already.
    #[error("an agent with id {0:?} is already running")]
    Duplicate(String),
}

/// Errors asking an agent to stop, start or take a new version.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent has this id.
    #[error("no agent {0:?}")]
    Unknown(String),
    /// The agent's task has ended (the host is shutting down).
    #[error("agent {0:?} has shut down")]
    Gone(String),
    /// A deploy's new version could not be written down; the old one keeps running.
    #[error("cannot keep the new version of {id:?}: {source}")]
    Keep { id: String, source: std::io::Error },
}

/// Why a rollback did not happen; the running version stays.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// Neither the version's bytes nor the manifest's module are kept for it.
    #[error("version {0} is not kept for this agent (the last {max} deployed versions and the manifest's module are)", max = crate::hosting::deployed::MAX_VERSIONS)]
    NotKept(String),
    /// The kept version no longer loads (limits lowered since, or the cache lost it).
    #[error("cannot load that version: {0}")]
    Load(LoadError),
    #[error(transparent)]
    Control(ControlError),
}

/// What the host reports of one agent.
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub id: String,
    pub status: AgentStatus,
    /// Crashes since it was spawned.
    pub restarts: u32,
    /// `None` when the agent has no device binding.
    pub device_connected: Option<bool>,
    /// SHA-256 of the module version it runs, hex.
    pub module_digest: String,
    /// Whether it runs in the slow lane, behind lighter agents: it is in a long event or
    /// has used more than a tenth of a core lately.
    pub slow_lane: bool,
    pub metrics: MetricsSnapshot,
}

/// A running host: its agents and the HTTP server of their URLs.
pub struct Host {
    shared: Arc<HostShared>,
    http_addr: SocketAddr,
    /// Each agent's tasks by its id, so that one can be removed; the server's under "".
    tasks: std::sync::Mutex<HashMap<String, Vec<tokio::task::JoinHandle<()>>>>,
}

impl Host {
    /// Builds the engine, binds the agents' HTTP listener and starts serving it.
    pub async fn start(config: HostConfig) -> anyhow::Result<Host> {
        config.limits.check()?;
        let runtime = Runtime::new(&config).context("cannot build the WebAssembly engine")?;
        let tls = TlsTrust::new(&config.trusted_ca_files)?;
        let http_clients = outbound::Clients::new(&tls).context("cannot build the HTTP client")?;
        let listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http_listen))?;
        let http_addr = listener.local_addr()?;
        let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{http_addr}"));
        let deployed = Deployed::new(&config.store_dir);
        let io = tokio::runtime::Handle::current();
        let connect_guard = ConnectGuard::start(&io).await.context("cannot start the MQTT connect guard")?;
        let mqtt_network = Arc::new(mqtt::Network { tls, guard: connect_guard.proxy() });
        let compile_concurrency = config.compile_concurrency.max(1);
        let slow_lane = if config.slow_lane { SlowLane::new().context("cannot start the slow lane threads")? } else { SlowLane::off() };
        let shared = Arc::new(HostShared {
            deployed,
            public_url: public_url.trim_end_matches('/').to_owned(),
            config,
            runtime,
            lanes: slow_lane.lanes(&io),
            _slow_lane: slow_lane,
            _connect_guard: connect_guard,
            io,
            http_clients,
            mqtt_network,
            agents: RwLock::default(),
            logs: broadcast::channel(4096).0,
            tenant_logs: Mutex::default(),
            shutdown: watch::channel(false).0,
            compile_gate: tokio::sync::Semaphore::new(compile_concurrency),
            forward: std::sync::OnceLock::new(),
            gateways: std::sync::OnceLock::new(),
        });
        let router = inbound::router(shared.clone());
        let caps = server::Caps {
            connections: shared.config.http_max_connections,
            per_address: shared.config.http_max_connections_per_address,
            header_timeout: Duration::from_secs(shared.config.http_header_timeout_secs),
        };
        let stop = shared.shutdown.subscribe();
        let server = tokio::spawn(server::serve(listener, router, stop, caps));
        Ok(Host { shared, http_addr, tasks: std::sync::Mutex::new(HashMap::from([(String::new(), vec![server])])) })
    }

    /// The engine, to load modules.
    pub fn runtime(&self) -> &Runtime {
        &self.shared.runtime
    }

    /// Where agent URLs are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The public URL of agent `id`.
    pub fn agent_url(&self, id: &str) -> String {
        format!("{}/{id}", self.shared.public_url)
    }

    /// Every agent's log lines from now on (for the host's own observers: one reader
    /// falling behind here sees lines of every tenant skipped).
    pub fn logs(&self) -> broadcast::Receiver<LogLine> {
        self.shared.logs.subscribe()
    }

    /// The log lines of `tenant`'s agents from now on.
    pub fn tenant_logs(&self, tenant: &str) -> broadcast::Receiver<LogLine> {
        self.shared.tenant_logs(tenant).subscribe()
    }

    /// Hands `line`, of an agent of `tenant` that runs on another node, to the tenant's
    /// log streams here (cluster mode).
    pub(crate) fn relay_log(&self, tenant: &str, line: LogLine) {
        let _ = self.shared.tenant_logs(tenant).send(line);
    }

    /// Agent `id`'s recent log lines (up to 100, 16 KiB), oldest first.
    pub fn recent_logs(&self, id: &str) -> Vec<LogLine> {
        self.shared.agent(id).map(|a| a.parts.handles.log.recent()).unwrap_or_default()
    }

    /// The newest error line among agent `id`'s recent lines.
    pub fn last_error(&self, id: &str) -> Option<String> {
        self.shared.agent(id)?.parts.handles.log.last_error()
    }

    /// The status of agent `id`, with how often it was restarted.
    pub fn status(&self, id: &str) -> Option<(AgentStatus, u32)> {
        let agent = self.shared.agent(id)?;
        let status = agent.status.lock().ok()?.clone();
        let restarts = *agent.restarts.lock().ok()?;
        Some((status, restarts))
    }

    /// Bytes of agent `id`'s `server.save` store on disk (0 before its first save).
    pub fn store_bytes(&self, id: &str) -> u64 {
        FileStore::new(&self.shared.config.store_dir, id).bytes_on_disk()
    }

    /// Agent `id`'s recent device and broker traffic, oldest first; it keeps recording for
    /// the next minute (the timeline records only while someone looks).
    pub fn timeline(&self, id: &str) -> Option<Vec<crate::kit::timeline::Entry>> {
        Some(self.shared.agent(id)?.parts.handles.timeline.watch())
    }

    /// Frame and error counts of agent `id`'s serial line, if it has a device.
    pub fn device_stats(&self, id: &str) -> Option<device_link::Stats> {
        Some(self.shared.agent(id)?.parts.device.as_ref()?.line_stats())
    }

    /// Times agent `id`'s serial line closed and was reopened, if it has a device.
    pub fn device_reopens(&self, id: &str) -> Option<u64> {
        Some(self.shared.agent(id)?.parts.device.as_ref()?.reopens())
    }

    pub(super) fn new_agent(&self, id: &str, settings: AgentSettings) -> (Arc<AgentShared>, flume::Receiver<Envelope>) {
        // Benchmark instances run without a device driver.
        let (agent, rx, _control, _driver) = self.new_agent_with_device(id, settings, self.default_policy(), None);
        (agent, rx)
    }

    /// The host's limits, and every destination allowed: what `spawn` gives an agent.
    pub fn default_policy(&self) -> AgentPolicy {
        AgentPolicy { limits: self.shared.config.limits.clone(), allowed_hosts: AllowedHosts::All, tenant: None }
    }

    /// The agent, its control channel and, if it has a device, the driver of its line, to
    /// spawn once the agent is registered. Here each capability's policy for the agent is
    /// built from its settings and limits.
    #[allow(clippy::type_complexity)]
    fn new_agent_with_device(
        &self,
        id: &str,
        settings: AgentSettings,
        policy: AgentPolicy,
        kept: Option<Kept>,
    ) -> (Arc<AgentShared>, flume::Receiver<Envelope>, flume::Receiver<Control>, Option<device::Driver<AnyLine>>) {
        let host = &self.shared;
        let (tx, rx) = flume::unbounded();
        let queue = Arc::new(Queue(tx));
        let (control, control_rx) = flume::unbounded();
        let metrics = Arc::new(AgentMetrics::default());
        let mut subscribers = vec![host.logs.clone()];
        subscribers.extend(policy.tenant.as_deref().map(|t| host.tenant_logs(t)));
        let log = Logger::new(id, subscribers, policy.limits.log_rate, metrics.clone());
        let slow = Arc::<std::sync::atomic::AtomicBool>::default();
        let lane = AgentLane { lanes: host.lanes.clone(), slow: slow.clone() };
        let handles = Handles { log: log.clone(), metrics, io: host.io.clone(), lane, blocking: Blocking::default(), timeline: Arc::default() };
        let (device, driver) = match settings.device {
            Some(binding) => {
                let line = match binding.gateway {
                    true => AnyLine::Gateway(GatewayLine::new(host.gateways.get().cloned(), id)),
                    false => AnyLine::Serial(SerialLine::new(binding.path, binding.baud)),
                };
                let (channel, driver) = device::DeviceChannel::new(line, id, Events::any_instance(queue.clone()), log, &policy.limits);
                (Some(Arc::new(channel)), Some(driver))
            }
            None => (None, None),
        };
        let limits = policy.limits;
        let (store, queues) = match kept {
            Some(Kept { store, queues }) => (store, queues),
            None => (
                Box::new(FileStore::new(&host.config.store_dir, id)) as Box<dyn store::Backend>,
                Arc::new(SqliteQueues::new(&host.config.store_dir, id, limits.queue_bytes as u64, host.config.queue_fsync)) as Arc<dyn queue::Backend>,
            ),
        };
        let http = outbound::Policy::new(policy.allowed_hosts.clone(), host.http_clients.clone(), &limits);
        let mqtt = mqtt::Policy::new(host.mqtt_network.clone(), policy.allowed_hosts, &limits);
        let parts = AgentParts {
            info: Arc::new(AgentInfo { id: id.to_owned(), url: self.agent_url(id), config: settings.config }),
            handles,
            queue,
            device,
            http: Arc::new(http),
            mqtt: Arc::new(mqtt),
            store: Arc::new(store::Policy::new(store, limits.store_bytes, limits.store_rate)),
            queues,
            limits,
            slow,
            backlog: Arc::default(),
        };
        let agent = Arc::new(AgentShared {
            id: id.to_owned(),
            engine: host.runtime.engine.clone(),
            parts,
            status: std::sync::Mutex::new(AgentStatus::Starting),
            restarts: std::sync::Mutex::new(0),
            control,
            module_digest: std::sync::Mutex::default(),
        });
        (agent, rx, control_rx, driver)
    }

    /// Starts agent `id` running `module`, with the host's limits and every destination
    /// allowed.
    pub fn spawn(&self, id: &str, settings: AgentSettings, module: AgentModule) -> Result<(), SpawnError> {
        self.spawn_with_policy(id, settings, self.default_policy(), module)
    }

    /// Starts agent `id` running `module` with its own limits and allowed destinations.
    pub fn spawn_with_policy(&self, id: &str, settings: AgentSettings, policy: AgentPolicy, module: AgentModule) -> Result<(), SpawnError> {
        self.spawn_kept(id, settings, policy, module, None)
    }

    /// [`Host::spawn_with_policy`] with the agent's `server.save` value and queues kept in
    /// `kept` rather than in files of the store directory (`None`).
    pub(crate) fn spawn_kept(&self, id: &str, settings: AgentSettings, policy: AgentPolicy, module: AgentModule, kept: Option<Kept>) -> Result<(), SpawnError> {
        crate::hosting::config::check_agent_id(id)?;
        policy.limits.check()?;
        let (agent, rx, control, driver) = self.new_agent_with_device(id, settings, policy, kept);
        {
            let mut agents = self.shared.agents.write().unwrap_or_else(|p| p.into_inner());
            if agents.contains_key(id) {
                return Err(SpawnError::Duplicate(id.to_owned()));
            }
            agents.insert(id.to_owned(), agent.clone());
        }
        let slow = agent.parts.slow.clone();
        let task = self.shared.lanes.spawn(agent::run(agent, module, rx, control, self.shared.shutdown.subscribe()), slow);
        let mut tasks = vec![task];
        if let Some(driver) = driver {
            tasks.push(tokio::spawn(driver.run(self.shared.shutdown.subscribe())));
        }
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), tasks);
        Ok(())
    }

    /// Ends agent `id` on this host and forgets it, and returns once its instance is gone:
    /// in a cluster it moves to another node, which must not run it while this one does.
    /// False if it did not run here.
    pub async fn remove_agent(&self, id: &str) -> bool {
        let Some(agent) = self.shared.agents.write().unwrap_or_else(|p| p.into_inner()).remove(id) else {
            return false;
        };
        // Its requests waiting in the queue are answered 503 as the queue is dropped.
        let _ = agent.control.send(Control::Leave);
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(id).unwrap_or_default();
        let mut tasks = tasks.into_iter();
        if let Some(agent_task) = tasks.next() {
            let _ = agent_task.await;
        }
        // The device driver runs until shutdown otherwise; dropping it closes the line.
        for driver in tasks {
            driver.abort();
        }
        true
    }

    /// Agent `id`'s answer to a request forwarded from another node, if it runs here.
    pub(crate) async fn answer_here(&self, id: &str, rest: &str, req: axum::extract::Request) -> Option<axum::response::Response> {
        let door = self.shared.door(id)?;
        Some(inbound::serve(door, rest, req).await)
    }

    /// Reaches devices on gateway boxes through `client` (cluster mode); set once, before
    /// any agent with such a device starts.
    pub(crate) fn set_gateways(&self, client: async_nats::Client) {
        let _ = self.shared.gateways.set(client);
    }

    /// Sends requests for agents that do not run here to `forward` (cluster mode); set
    /// once.
    pub(crate) fn set_forward(&self, forward: Arc<dyn inbound::Forward>) {
        let _ = self.shared.forward.set(forward);
    }

    /// Compiles (or takes from the cache) and links a module on a blocking thread, so
    /// that a deploy does not stall the agents sharing this thread; at most
    /// `compile_concurrency` at once, the others wait their turn.
    pub async fn compile(&self, bytes: Vec<u8>) -> Result<AgentModule, LoadError> {
        let _turn = self.shared.compile_gate.acquire().await;
        let runtime = self.shared.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.load(&bytes))
            .await
            .unwrap_or_else(|e| Err(LoadError::NotComponent(format!("compilation failed: {e}"))))
    }

    /// Every agent's report, sorted by id.
    pub fn agents(&self) -> Vec<AgentReport> {
        let agents: Vec<Arc<AgentShared>> = match self.shared.agents.read() {
            Ok(agents) => agents.values().cloned().collect(),
            Err(_) => return Vec::new(),
        };
        let lane = self.shared.config.slow_lane;
        let mut reports: Vec<AgentReport> = agents.iter().map(|a| report(a, lane)).collect();
        reports.sort_by(|a, b| a.id.cmp(&b.id));
        reports
    }

    /// Agent `id`'s report.
    pub fn agent(&self, id: &str) -> Option<AgentReport> {
        self.shared.agent(id).map(|a| report(&a, self.shared.config.slow_lane))
    }

    /// Swaps agent `id` to `module` between two of its events and restarts it over its
    /// kept store, logging "Agent restarted: reload". Other agents are not touched.
    pub fn deploy(&self, id: &str, module: AgentModule) -> Result<(), ControlError> {
        self.control(id, Control::Run(Resume::Reload(module)))
    }

    /// [`Host::deploy`], after keeping `bytes` (the new version) in the store directory: a
    /// host started again from the same manifest runs it instead of the manifest's module,
    /// until the manifest names another module for the agent. The deploy goes into the
    /// agent's history, as `by`'s.
    pub fn deploy_kept(&self, id: &str, module: AgentModule, bytes: &[u8], by: &str) -> Result<(), ControlError> {
        let agent = self.shared.agent(id).ok_or_else(|| ControlError::Unknown(id.to_owned()))?;
        let running = agent.module_digest.lock().map(|d| d.clone()).unwrap_or_default();
        let keep = |source| ControlError::Keep { id: id.to_owned(), source };
        self.shared.deployed.keep(id, bytes, &running).map_err(keep)?;
        self.shared.deployed.record(id, &module.digest, Some(bytes), by, "deploy").map_err(keep)?;
        self.deploy(id, module)
    }

    /// Agent `id`'s deploys through the API (oldest first), and the digest of the
    /// manifest's module they replaced, if any.
    pub fn deploys(&self, id: &str) -> std::io::Result<(Vec<DeployRecord>, Option<String>)> {
        Ok((self.shared.deployed.history(id)?, self.shared.deployed.base(id)?))
    }

    /// Whether agent `id` can roll back to version `module`: its bytes are kept, or it is
    /// the manifest's module.
    pub fn can_roll_back(&self, id: &str, module: &str) -> bool {
        self.shared.deployed.version(id, module).is_ok_and(|v| v.is_some()) || self.shared.deployed.base(id).is_ok_and(|b| b.as_deref() == Some(module))
    }

    /// Runs version `module` of agent `id` again, one deployed before or the manifest's
    /// (after which a restarted host runs the manifest's module, as before any deploy).
    pub async fn roll_back(&self, id: &str, module: &str, by: &str) -> Result<(), RollbackError> {
        let deployed = &self.shared.deployed;
        let io = |source| RollbackError::Control(ControlError::Keep { id: id.to_owned(), source });
        let base = deployed.base(id).map_err(io)?;
        let bytes = deployed.version(id, module).map_err(io)?;
        if base.as_deref() == Some(module) {
            let loaded = match bytes {
                Some(bytes) => self.compile(bytes).await,
                None => self.runtime().load_cached(module),
            };
            let loaded = loaded.map_err(RollbackError::Load)?;
            deployed.forget(id).map_err(io)?;
            deployed.record(id, module, None, by, "rollback").map_err(io)?;
            return self.deploy(id, loaded).map_err(RollbackError::Control);
        }
        let bytes = bytes.ok_or_else(|| RollbackError::NotKept(module.to_owned()))?;
        let loaded = self.compile(bytes.clone()).await.map_err(RollbackError::Load)?;
        let agent = self.shared.agent(id).ok_or_else(|| RollbackError::Control(ControlError::Unknown(id.to_owned())))?;
        let running = agent.module_digest.lock().map(|d| d.clone()).unwrap_or_default();
        deployed.keep(id, &bytes, &running).map_err(io)?;
        deployed.record(id, module, None, by, "rollback").map_err(io)?;
        self.deploy(id, loaded).map_err(RollbackError::Control)
    }

    /// What agent `id` should run at start: the version kept from an API deploy if the
    /// manifest still names `manifest` (the module that deploy replaced), else `manifest`.
    /// Problems with the kept version are logged, and the manifest's module runs.
    pub fn kept_or(&self, id: &str, manifest: AgentModule) -> AgentModule {
        let kept = match self.shared.deployed.kept(id, &manifest.digest) {
            Ok(Some(bytes)) => self.runtime().load(&bytes).map_err(|e| e.to_string()),
            Ok(None) => return manifest,
            Err(e) => Err(e.to_string()),
        };
        match kept {
            Ok(module) => {
                tracing::info!(agent = id, "running sha256:{}, deployed through the API, instead of the manifest's module", module.digest);
                module
            }
            Err(e) => {
                tracing::error!(agent = id, "cannot use the version deployed through the API ({e}); running the manifest's module");
                manifest
            }
        }
    }

    /// Stops agent `id` (its requests get 503) until it is started again.
    pub fn stop_agent(&self, id: &str) -> Result<(), ControlError> {
        self.control(id, Control::Stop)
    }

    /// Starts agent `id` if it is stopped or failed.
    pub fn start_agent(&self, id: &str) -> Result<(), ControlError> {
        self.control(id, Control::Run(Resume::Start))
    }

    /// Restarts agent `id` with a fresh instance over its kept store.
    pub fn restart_agent(&self, id: &str) -> Result<(), ControlError> {
        self.control(id, Control::Run(Resume::Restart))
    }

    fn control(&self, id: &str, control: Control) -> Result<(), ControlError> {
        let agent = self.shared.agent(id).ok_or_else(|| ControlError::Unknown(id.to_owned()))?;
        agent.control.send(control).map_err(|_| ControlError::Gone(id.to_owned()))
    }

    /// Stops every agent and the HTTP server, and waits for them.
    pub async fn shutdown(self) {
        self.shared.runtime.abandon_compiles();
        let _ = self.shared.shutdown.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks.into_values().flatten() {
            let _ = task.await;
        }
    }
}

/// `lane`: whether the host has a slow lane at all.
fn report(agent: &AgentShared, lane: bool) -> AgentReport {
    AgentReport {
        id: agent.id.clone(),
        status: agent.status.lock().map(|s| s.clone()).unwrap_or(AgentStatus::Stopped),
        restarts: agent.restarts.lock().map(|n| *n).unwrap_or(0),
        device_connected: agent.parts.device.as_ref().map(|d| d.connected()),
        module_digest: agent.module_digest.lock().map(|d| d.clone()).unwrap_or_default(),
        slow_lane: lane && agent.parts.slow.load(std::sync::atomic::Ordering::Relaxed),
        metrics: agent.parts.handles.metrics.snapshot(),
    }
}
