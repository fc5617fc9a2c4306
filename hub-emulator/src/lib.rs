//! Local Azure IoT Hub + Device Provisioning Service emulator.
//!
//! One [`Hub`] serves, on loopback only:
//! * device-facing MQTT 3.1.1 over TLS (IoT Hub device sessions and DPS registration
//!   sessions on the same port),
//! * HTTPS: the IoT Hub service REST API (`/devices`, `/twins`, ...), the DPS device
//!   REST API (`/{scopeId}/registrations/...`), a control API (`/emulator/...`) and MQTT
//!   over WebSocket (`/$iothub/websocket`).
//!
//! TLS uses a CA and a `localhost` certificate generated into the state directory on
//! first start, and the control API wants a bearer token generated there too
//! ([`Hub::control_token`]). docs/hub-emulator.md describes the endpoints and the control
//! API.

mod control;
mod control_token;
mod dps;
mod events;
mod feedback;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod messages;
mod metrics;
mod mqtt;
mod net;
mod query;
mod sas;
mod state;
mod tls;
mod twin;
mod util;
mod x509;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use control::{CaInfo, Control, DeviceInfo, Enrollment, EnrollmentInfo, Fault};
pub use events::{Event, EventFilter, EventKind};
pub use messages::C2dRequest;
pub use sas::{derive_device_key, generate_sas_token};
pub use state::ControlError;
pub use state::policy::{Permission, Policy};
pub use twin::{ServiceTwinError, TwinError};

use state::{HubSettings, Persisted, Shared};

/// The hostname clients use; the generated certificate is valid for it and 127.0.0.1.
pub const HOSTNAME: &str = "localhost";

/// Emulator settings. Ports 0 pick free ephemeral ports.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Hub name, e.g. `tether-hub`. Clients still connect to `localhost`; the name (and
    /// `{name}.azure-devices.net`) is accepted as host in usernames and SAS `sr`.
    pub hub_name: String,
    /// Device MQTT/TLS port; default 8883 (azure-iot-device hard-codes it).
    pub mqtt_port: u16,
    /// HTTPS port for service REST, DPS REST and control API; default 8443 (unprivileged).
    pub https_port: u16,
    /// Holds the TLS files and `hub.json` (policy keys, DPS scope), plus `state.json`
    /// when `persist` is set.
    pub state_dir: PathBuf,
    /// Keep registry, twins, enrollments and C2D queues across restarts.
    pub persist: bool,
    /// How long after its token's `se` a connection is still tolerated.
    pub token_expiry_grace: Duration,
    /// The control API's bearer token. `None` (the default): read from
    /// `<state_dir>/control-token`, which the first start writes with a random token
    /// (owner-only on unix). `Some`: this token (printable ASCII, no spaces), not stored.
    pub control_token: Option<String>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            hub_name: "tether-hub".into(),
            mqtt_port: 8883,
            https_port: 8443,
            state_dir: std::env::temp_dir().join("tether-hub"),
            persist: false,
            token_expiry_grace: Duration::ZERO,
            control_token: None,
        }
    }
}

/// Failures starting the emulator.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl HubError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        HubError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Keys and names generated once per state directory (kept even without `persist`, so
/// printed connection strings stay valid across restarts).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HubIdentity {
    scope_id: String,
    policies: Vec<Policy>,
}

/// A running emulator. Dropping it without [`Hub::shutdown`] leaves the tasks running
/// until the runtime ends.
pub struct Hub {
    shared: Arc<Shared>,
    hub_name: String,
    mqtt_addr: SocketAddr,
    https_addr: SocketAddr,
    ca_path: PathBuf,
    ca_pem: String,
    control_token: Arc<control_token::ControlToken>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Loads or creates TLS material and identity, binds both listeners on 127.0.0.1 and
    /// starts serving.
    pub async fn start(config: HubConfig) -> Result<Hub, HubError> {
        let dir = &config.state_dir;
        let tls = tls::TlsMaterial::load_or_create(dir)?;
        let control_token = Arc::new(match &config.control_token {
            Some(token) => control_token::ControlToken::given(token)?,
            None => control_token::ControlToken::load_or_create(dir)?,
        });
        let identity: HubIdentity = load_or_create_json(&dir.join("hub.json"), || HubIdentity {
            scope_id: format!(
                "0ne{}",
                util::random_bytes::<4>()
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<String>()
            ),
            policies: Policy::defaults(),
        })?;
        let state_path = dir.join("state.json");
        let persisted = if config.persist && state_path.exists() {
            read_json(&state_path)?
        } else {
            Persisted::default()
        };

        let name = config.hub_name.to_lowercase();
        let settings = HubSettings {
            hostname: HOSTNAME.into(),
            host_aliases: vec![
                HOSTNAME.to_string(),
                "127.0.0.1".into(),
                format!("{name}.azure-devices.net"),
                name,
            ],
            scope_id: identity.scope_id,
            token_grace: config.token_expiry_grace,
            persist_path: config.persist.then_some(state_path),
        };
        let (shutdown, rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(settings, identity.policies, persisted, rx));

        let bind = |port: u16| async move {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            TcpListener::bind(addr)
                .await
                .map_err(|source| HubError::Bind { addr, source })
        };
        let mqtt_listener = bind(config.mqtt_port).await?;
        let https_listener = bind(config.https_port).await?;
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| HubError::io(Path::new("socket"), e))
        };
        let (mqtt_addr, https_addr) = (local(&mqtt_listener)?, local(&https_listener)?);

        let acceptor = TlsAcceptor::from(tls.server_config);
        let mqtt_acceptor = TlsAcceptor::from(tls.mqtt_config);
        let mut tasks = vec![
            tokio::spawn(mqtt::serve(mqtt_listener, mqtt_acceptor, shared.clone())),
            tokio::spawn(http::serve(
                https_listener,
                acceptor,
                shared.clone(),
                control_token.clone(),
            )),
        ];
        if shared.persist_path.is_some() {
            tasks.push(tokio::spawn(save_loop(shared.clone())));
        }
        // The token itself stays out of logs; where to find it does not.
        tracing::info!(
            "hub emulator: mqtts://{mqtt_addr} https://{https_addr} CA {} control token {}",
            tls.ca_path.display(),
            control_token
                .path()
                .map_or("set by the embedder".into(), |p| format!(
                    "in {}",
                    p.display()
                ))
        );
        Ok(Hub {
            shared,
            hub_name: config.hub_name,
            mqtt_addr,
            https_addr,
            ca_path: tls.ca_path,
            ca_pem: tls.ca_pem,
            control_token,
            shutdown,
            tasks,
        })
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// PEM file of the CA that signed the server certificate (trust it in clients).
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Host name clients connect to (`localhost`).
    pub fn hostname(&self) -> &str {
        &self.shared.hostname
    }

    pub fn hub_name(&self) -> &str {
        &self.hub_name
    }

    /// DPS ID scope (stable per state directory).
    pub fn dps_scope_id(&self) -> &str {
        &self.shared.scope_id
    }

    /// DPS "global endpoint" host for REST clients: `localhost:{https_port}`.
    pub fn dps_endpoint(&self) -> String {
        format!("{}:{}", self.hostname(), self.https_addr.port())
    }

    /// The bearer token the HTTPS control API (`/emulator/...`) requires:
    /// `Authorization: Bearer <token>`. Stable per state directory unless
    /// [`HubConfig::control_token`] set it.
    pub fn control_token(&self) -> &str {
        self.control_token.value()
    }

    /// The file holding [`Hub::control_token`] (`<state dir>/control-token`); `None` when
    /// [`HubConfig::control_token`] set it.
    pub fn control_token_path(&self) -> Option<&Path> {
        self.control_token.path()
    }

    /// In-process control handle (C2D, events, faults, enrollments); needs no token.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
        }
    }

    /// Registers a device with generated keys.
    pub fn create_device(&self, device_id: &str) -> Result<DeviceInfo, ControlError> {
        self.control().create_device(device_id)
    }

    /// `HostName=localhost;DeviceId=..;SharedAccessKey=..` for a registered device.
    pub fn device_connection_string(&self, device_id: &str) -> Option<String> {
        self.control()
            .device_info(device_id)
            .map(|d| d.connection_string)
    }

    /// Adds a DPS enrollment (keys generated when not given).
    pub fn add_enrollment(&self, enrollment: Enrollment) -> Result<EnrollmentInfo, ControlError> {
        self.control().add_enrollment(enrollment)
    }

    /// `iothubowner` connection string; HostName carries the HTTPS port
    /// (`localhost:8443`), which is what azure-iot-hub needs to reach it.
    pub fn service_connection_string(&self) -> String {
        self.policy_connection_string("iothubowner")
            .unwrap_or_default()
    }

    /// Connection string for any shared access policy (`service`, `registryRead`, ...).
    pub fn policy_connection_string(&self, policy: &str) -> Option<String> {
        let st = self.shared.lock();
        let p = st.policy(policy)?;
        Some(format!(
            "HostName={}:{};SharedAccessKeyName={};SharedAccessKey={}",
            self.hostname(),
            self.https_addr.port(),
            p.name,
            p.primary_key
        ))
    }

    /// Stops listeners and connections, and writes state if persistence is on.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Err(e) = save(&self.shared) {
            tracing::warn!("saving hub state: {e}");
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, HubError> {
    let data = std::fs::read(path).map_err(|e| HubError::io(path, e))?;
    serde_json::from_slice(&data).map_err(|e| HubError::State {
        path: path.into(),
        message: e.to_string(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), HubError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| HubError::State {
        path: path.into(),
        message: e.to_string(),
    })?;
    // Write-then-rename so a crash never leaves a truncated file.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, data).map_err(|e| HubError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HubError::io(path, e))
}

fn load_or_create_json<T: Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    create: impl FnOnce() -> T,
) -> Result<T, HubError> {
    if path.exists() {
        return read_json(path);
    }
    let value = create();
    write_json(path, &value)?;
    Ok(value)
}

fn save(shared: &Shared) -> Result<(), HubError> {
    let Some(path) = &shared.persist_path else {
        return Ok(());
    };
    let data = serde_json::to_value(&shared.lock().p).map_err(|e| HubError::State {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_json(path, &data)
}

/// Writes state after changes, coalescing bursts.
async fn save_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = shared.dirty.notified() => {}
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Err(e) = save(&shared) {
            tracing::warn!("saving hub state: {e}");
        }
    }
}
