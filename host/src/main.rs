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
    /// Runs the local Azure IoT Hub + DPS emulator until Ctrl-C, and prints ready-made
    /// connection strings.
    Hub(HubArgs),
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
        Command::Hub(args) => hub(args).await,
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
    shutdown_signal().await?;
    tracing::info!("shutting down");
    host.shutdown().await;
    Ok(())
}

async fn hub(args: HubArgs) -> anyhow::Result<()> {
    use tether_hub_emulator::{Enrollment, Hub, HubConfig};
    let config = HubConfig {
        hub_name: args.hub_name,
        mqtt_port: args.mqtt_port,
        https_port: args.https_port,
        state_dir: args.state_dir,
        persist: args.persist,
        ..HubConfig::default()
    };
    let hub = Hub::start(config).await.context("cannot start the hub emulator")?;
    let device = match hub.device_connection_string(DEMO_DEVICE) {
        Some(cs) => cs,
        None => hub.create_device(DEMO_DEVICE).context("cannot create the demo device")?.connection_string,
    };
    let enrollment = hub
        .add_enrollment(Enrollment::Individual { registration_id: DEMO_REGISTRATION.into(), device_id: None, primary_key: None, secondary_key: None })
        .context("cannot add the demo enrollment")?;
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
    shutdown_signal().await?;
    tracing::info!("shutting down the hub emulator");
    hub.shutdown().await;
    Ok(())
}

const DEMO_DEVICE: &str = "demo-device";
const DEMO_REGISTRATION: &str = "demo-registration";

/// Ctrl-C, or SIGTERM from a service manager.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C"),
        _ = term.recv() => Ok(()),
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
