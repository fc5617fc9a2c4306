//! The `tether` command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tether_host::Host;
use tether_host::config::{RunConfig, check_agent_id};

#[derive(Parser)]
#[command(name = "tether", version, about = "Runs Electric Imp-style agents as sandboxed WebAssembly")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one agent until Ctrl-C.
    Run {
        /// The agent: a wasm32-wasip2 component of the tether:agent world.
        agent: PathBuf,
        /// TOML with [host] settings (listen address, directories, limits) and [agent]
        /// id and config values; see README.md.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides host.http_listen, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Runs every agent of a host manifest, and the management API, until Ctrl-C.
    Serve {
        /// The manifest: host settings, tenants and agents (see host/src/manifest.rs).
        #[arg(long)]
        manifest: PathBuf,
    },
    /// Manages the agents of a `tether serve` through its management API.
    Agents(AgentsArgs),
    /// Runs the local Azure IoT Hub + DPS emulator until Ctrl-C, and prints ready-made
    /// connection strings.
    Hub(HubArgs),
    /// The whole flow on this machine: the hub emulator, a simulated sensor board on a
    /// pty and the azure-demo agent between them (provisioning, telemetry, twin, direct
    /// methods, C2D). Ctrl-C ends it.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct AgentsArgs {
    /// The management API's base URL.
    #[arg(long, env = "TETHER_URL", default_value = "http://127.0.0.1:9090")]
    url: String,
    /// The tenant's bearer token.
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    action: AgentsAction,
}

#[derive(Subcommand)]
enum AgentsAction {
    /// Lists the tenant's agents with their status.
    List,
    /// Deploys a new module version to an agent (it restarts over its kept store).
    Deploy { id: String, module: PathBuf },
    /// Stops an agent.
    Stop { id: String },
    /// Starts a stopped or failed agent.
    Start { id: String },
    /// Restarts an agent.
    Restart { id: String },
    /// Follows the log of one agent, or of all the tenant's agents.
    Logs { id: Option<String> },
}

#[derive(clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The demo agent (built by scripts/demo.sh).
    #[arg(long, default_value = "target/wasm32-wasip2/guest/azure_demo.wasm")]
    agent: PathBuf,
    /// The device simulator; by default `device-sim` next to this binary.
    #[arg(long)]
    device_sim: Option<PathBuf>,
    /// Seconds between the simulated board's temperature readings.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
}

#[derive(clap::Args)]
struct HubArgs {
    /// Device MQTT over TLS (Microsoft's device SDKs insist on 8883).
    #[arg(long, default_value_t = 8883)]
    mqtt_port: u16,
    /// Service REST, DPS REST, the control API and MQTT over WebSocket.
    #[arg(long, default_value_t = 8443)]
    https_port: u16,
    /// Where the CA, the server certificate and the hub's keys are kept.
    #[arg(long, default_value = "tether-data/hub")]
    state_dir: PathBuf,
    /// Keep devices, twins, enrollments and C2D queues across restarts.
    #[arg(long)]
    persist: bool,
    /// The hub's name (also accepted as `<name>.azure-devices.net` in tokens).
    #[arg(long, default_value = "tether-hub")]
    hub_name: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")),
        )
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { agent, config, listen } => run(&agent, config.as_deref(), listen).await,
        Command::Serve { manifest } => serve(&manifest).await,
        Command::Agents(args) => agents(args).await,
        Command::Hub(args) => hub(args).await,
        Command::Demo(args) => demo(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(module_path: &Path, config_path: Option<&Path>, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    let mut config = match config_path {
        Some(path) => RunConfig::load(path)?,
        None => RunConfig::default(),
    };
    if let Some(listen) = listen {
        config.host.http_listen = listen;
    }
    let id = match config.agent.id.clone() {
        Some(id) => id,
        None => default_id(module_path)?,
    };
    check_agent_id(&id)?;
    let host = Host::start(config.host).await?;
    let module = host.runtime().load_file(module_path).with_context(|| format!("cannot load {}", module_path.display()))?;
    host.spawn(&id, config.agent, module)?;
    tracing::info!(agent = %id, "agent URL: {}", host.agent_url(&id));
    shutdown.wait().await;
    tracing::info!("shutting down");
    host.shutdown().await;
    Ok(())
}

async fn serve(manifest_path: &Path) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    use tether_host::manage::ManageServer;
    use tether_host::manifest::Manifest;
    let manifest = Manifest::load(manifest_path)?;
    let host = std::sync::Arc::new(Host::start(manifest.host.clone()).await?);
    manifest.spawn_agents(&host)?;
    tracing::info!("{} agents running; agent URLs under {}", manifest.agents.len(), host.agent_url(""));
    let manage = match manifest.manage.listen {
        Some(listen) => {
            let server = ManageServer::start(host.clone(), manifest.access(), &manifest.manage, listen)
                .await
                .with_context(|| format!("cannot serve the management API on {listen}"))?;
            tracing::info!("management API and dashboard: http://{}/", server.addr());
            Some(server)
        }
        None => None,
    };
    shutdown.wait().await;
    tracing::info!("shutting down");
    if let Some(manage) = manage {
        manage.stop().await;
    }
    match std::sync::Arc::try_unwrap(host) {
        Ok(host) => host.shutdown().await,
        Err(_) => bail!("the host is still in use at shutdown"),
    }
    Ok(())
}

async fn agents(args: AgentsArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let client = reqwest::Client::new();
    let auth = format!("Bearer {}", args.token);
    let (method, path, body) = match &args.action {
        AgentsAction::List => (reqwest::Method::GET, "/api/agents".to_owned(), None),
        AgentsAction::Deploy { id, module } => {
            let bytes = std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
            (reqwest::Method::POST, format!("/api/agents/{id}/deploy"), Some(bytes))
        }
        AgentsAction::Stop { id } => (reqwest::Method::POST, format!("/api/agents/{id}/stop"), None),
        AgentsAction::Start { id } => (reqwest::Method::POST, format!("/api/agents/{id}/start"), None),
        AgentsAction::Restart { id } => (reqwest::Method::POST, format!("/api/agents/{id}/restart"), None),
        AgentsAction::Logs { id: Some(id) } => (reqwest::Method::GET, format!("/api/agents/{id}/logs"), None),
        AgentsAction::Logs { id: None } => (reqwest::Method::GET, "/api/logs".to_owned(), None),
    };
    let mut request = client.request(method, format!("{base}{path}")).header("authorization", auth);
    if let Some(body) = body {
        request = request.body(body);
    }
    let mut response = request.send().await.with_context(|| format!("cannot reach the management API at {base}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"].as_str().map(str::to_owned)).unwrap_or(text);
        bail!("{status}: {reason}");
    }
    if let AgentsAction::Logs { .. } = args.action {
        let mut pending = String::new();
        while let Some(chunk) = response.chunk().await.context("the log stream broke")? {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if let Some(Ok(line)) = event.trim_end().strip_prefix("data: ").map(serde_json::from_str::<serde_json::Value>) {
                    println!("[{}] {}", line["agent"].as_str().unwrap_or("host"), line["text"].as_str().unwrap_or_default());
                }
            }
        }
        return Ok(());
    }
    let text = response.text().await.context("the management API's answer broke off")?;
    let value: serde_json::Value = serde_json::from_str(&text).context("the management API answered with invalid JSON")?;
    match args.action {
        AgentsAction::List => {
            println!("{:<24} {:<11} {:>8} {:<12} {:<12} cause", "agent", "status", "restarts", "device", "module");
            for a in value["agents"].as_array().into_iter().flatten() {
                let device = match a["device_connected"].as_bool() {
                    None => "none",
                    Some(true) => "connected",
                    Some(false) => "disconnected",
                };
                let module = a["module"].as_str().unwrap_or_default();
                println!(
                    "{:<24} {:<11} {:>8} {:<12} {:<12} {}",
                    a["id"].as_str().unwrap_or_default(),
                    a["status"].as_str().unwrap_or_default(),
                    a["restarts"],
                    device,
                    &module[..module.len().min(12)],
                    a["cause"].as_str().unwrap_or_default()
                );
            }
        }
        _ => println!("{value}"),
    }
    Ok(())
}

async fn start_hub(args: HubArgs) -> anyhow::Result<tether_hub_emulator::Hub> {
    let config = tether_hub_emulator::HubConfig {
        hub_name: args.hub_name,
        mqtt_port: args.mqtt_port,
        https_port: args.https_port,
        state_dir: args.state_dir,
        persist: args.persist,
        ..tether_hub_emulator::HubConfig::default()
    };
    let ports = format!("ports {} and {} (change them with --mqtt-port and --https-port)", config.mqtt_port, config.https_port);
    tether_hub_emulator::Hub::start(config).await.with_context(|| format!("cannot start the hub emulator on {ports}"))
}

async fn hub(args: HubArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    use tether_hub_emulator::Enrollment;
    let hub = start_hub(args).await?;
    let device = match hub.device_connection_string(DEMO_DEVICE) {
        Some(cs) => cs,
        None => hub.create_device(DEMO_DEVICE).context("cannot create the demo device")?.connection_string,
    };
    // With --persist the enrollment survives restarts; its key must stay the same, or
    // devices provisioned with it could not register again.
    let enrollment = match hub.control().enrollment(DEMO_REGISTRATION) {
        Some(existing) => existing,
        None => hub
            .add_enrollment(Enrollment::Individual { registration_id: DEMO_REGISTRATION.into(), device_id: None, primary_key: None, secondary_key: None })
            .context("cannot add the demo enrollment")?,
    };
    println!(
        "Azure IoT Hub + DPS emulator running.\n\
         \n  CA certificate:        {ca}\
         \n  device MQTT (TLS):     {mqtt}\
         \n  service/DPS (HTTPS):   https://{https}  (control API under /emulator, docs/hub-emulator.md)\
         \n\n  device connection string ({DEMO_DEVICE}):\n    {device}\
         \n  registry connection string (iothubowner):\n    {service}\
         \n  DPS: scope {scope}, registration id {reg}, key {key}\n",
        ca = hub.ca_cert_path().display(),
        mqtt = hub.mqtt_addr(),
        https = hub.https_addr(),
        service = hub.service_connection_string(),
        scope = hub.dps_scope_id(),
        reg = enrollment.id,
        key = enrollment.primary_key,
    );
    shutdown.wait().await;
    tracing::info!("shutting down the hub emulator");
    hub.shutdown().await;
    Ok(())
}

const DEMO_DEVICE: &str = "demo-device";
const DEMO_REGISTRATION: &str = "demo-registration";

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    use tether_host::config::{AgentSettings, DeviceBinding, HostConfig};
    use tether_hub_emulator::{Enrollment, EventFilter};

    let state_dir = args.hub.state_dir.join("demo");
    std::fs::create_dir_all(&state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
    let sim_path = match args.device_sim {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("device-sim"),
    };
    if !args.agent.exists() {
        bail!("no demo agent at {}; build it with scripts/demo.sh (or pass --agent)", args.agent.display());
    }
    let hub = start_hub(args.hub).await?;
    let enrollment = hub
        .add_enrollment(Enrollment::Individual { registration_id: DEMO_DEVICE.into(), device_id: None, primary_key: None, secondary_key: None })
        .context("cannot add the demo enrollment")?;

    // The simulated sensor board, on a pty reached through a stable link.
    let link = state_dir.join("device");
    let mut sim = tokio::process::Command::new(&sim_path)
        .arg("--link")
        .arg(&link)
        .args(["--interval", &args.interval.to_string(), "--device-id", "sensor-board", "-v"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the device simulator {}; build it with `cargo build -p device-sim`", sim_path.display()))?;

    let host = Host::start(HostConfig {
        http_listen: "127.0.0.1:0".parse()?,
        store_dir: state_dir.join("store"),
        cache_dir: state_dir.join("cache"),
        trusted_ca_files: vec![hub.ca_cert_path().to_owned()],
        ..HostConfig::default()
    })
    .await?;
    let module = host.runtime().load_file(&args.agent).with_context(|| format!("cannot load {}", args.agent.display()))?;
    let https = format!("localhost:{}", hub.https_addr().port());
    let settings = AgentSettings {
        id: Some("demo".into()),
        config: [
            ("dps_scope", hub.dps_scope_id().to_owned()),
            ("dps_registration_id", enrollment.id.clone()),
            ("dps_key", enrollment.primary_key.clone()),
            ("dps_endpoint", format!("https://{https}")),
            ("hub_port", hub.mqtt_addr().port().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        device: Some(DeviceBinding { path: link, baud: 115_200 }),
    };
    host.spawn("demo", settings, module)?;

    // What the cloud side sees, live.
    let control = hub.control();
    let watcher = tokio::spawn(async move {
        let mut since = 0;
        let filter = EventFilter::default();
        loop {
            for event in control.wait_events(since, &filter, std::time::Duration::from_secs(30)).await {
                since = event.seq;
                if let Ok(serde_json::Value::Object(mut e)) = serde_json::to_value(&event) {
                    e.retain(|k, _| !matches!(k.as_str(), "seq" | "time" | "bodyBase64" | "systemProperties"));
                    println!("[hub] {}", serde_json::Value::Object(e));
                }
            }
        }
    });

    let (host_part, key) = {
        let cs = hub.service_connection_string();
        let get = |k: &str| cs.split(';').find_map(|p| p.strip_prefix(k)?.strip_prefix('=').map(str::to_owned)).unwrap_or_default();
        (get("HostName"), get("SharedAccessKey"))
    };
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 86_400;
    let token = tether_hub_emulator::generate_sas_token(&host_part, &key, Some("iothubowner"), expiry).unwrap_or_default();
    let ca = hub.ca_cert_path().display().to_string();
    println!(
        "\nTether demo: hub emulator, simulated board and the azure-demo agent are running.\n\
         From a second terminal:\n\
         \n  export TOKEN='{token}'\
         \n  # a direct method: the agent asks the board to blink\
         \n  curl --cacert {ca} -H \"Authorization: $TOKEN\" -H 'Content-Type: application/json' \\\
         \n    -d '{{\"methodName\":\"blink\",\"payload\":{{\"times\":3}},\"responseTimeoutInSeconds\":10}}' \\\
         \n    'https://{https}/twins/{DEMO_DEVICE}/methods?api-version=2021-04-12'\
         \n  # a desired property: the board reports every second\
         \n  curl --cacert {ca} -H \"Authorization: $TOKEN\" -H 'Content-Type: application/json' -X PATCH \\\
         \n    -d '{{\"properties\":{{\"desired\":{{\"interval\":1}}}}}}' 'https://{https}/twins/{DEMO_DEVICE}?api-version=2021-04-12'\
         \n  # a cloud-to-device message: the board switches its LED on\
         \n  curl --cacert {ca} -d '{{\"led\": true}}' 'https://{https}/emulator/devices/{DEMO_DEVICE}/c2d'\
         \n\nCtrl-C ends the demo.\n"
    );

    tokio::select! {
        () = shutdown.wait() => {}
        status = sim.wait() => tracing::error!("the device simulator exited: {:?}", status),
    }
    tracing::info!("shutting down the demo");
    watcher.abort();
    host.shutdown().await;
    let _ = sim.kill().await;
    hub.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM from a service manager, watched from the moment it is made: a
/// signal sent as soon as a command says it is ready still stops it cleanly, rather than
/// killing it before the command waits for it.
struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn watch() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// `examples/hello.wasm` runs as agent `hello`.
fn default_id(path: &Path) -> anyhow::Result<String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().replace('.', "-");
    if check_agent_id(&stem).is_err() {
        bail!("cannot derive an agent id from {}; set [agent] id in the config", path.display());
    }
    Ok(stem)
}
