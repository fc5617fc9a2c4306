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
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    tracing::info!("shutting down");
    host.shutdown().await;
    Ok(())
}

/// `examples/hello.wasm` runs as agent `hello`.
fn default_id(path: &Path) -> anyhow::Result<String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().replace('.', "-");
    if check_agent_id(&stem).is_err() {
        bail!("cannot derive an agent id from {}; set [agent] id in the config", path.display());
    }
    Ok(stem)
}
