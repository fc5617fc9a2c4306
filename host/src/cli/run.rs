//! `tether run`: one agent, configured by an optional TOML file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tether_host::Host;
use tether_host::config::{RunConfig, check_agent_id};

use super::Shutdown;

/// `tether run`'s arguments.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The agent: a wasm32-wasip2 component of the tether:agent world, or an agent
    /// crate's directory (built first, as `tether build` does).
    #[arg(default_value = ".")]
    agent: PathBuf,
    /// TOML with [host] settings (listen address, directories, limits) and [agent]
    /// id and config values; see README.md. Default for a crate: its tether.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides host.http_listen, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// Runs one agent until Ctrl-C or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (module_path, config_path) = if args.agent.is_dir() {
        let config = args.config.as_deref().map(std::path::absolute).transpose()?;
        let module = std::path::absolute(super::build::build_crate(&args.agent)?)?;
        // The crate's tether.toml, and the relative paths in it (tether-data/...), are
        // the crate's, wherever `tether run` was started.
        std::env::set_current_dir(&args.agent).with_context(|| format!("cannot enter {}", args.agent.display()))?;
        let crate_config = PathBuf::from("tether.toml");
        (module, config.or_else(|| crate_config.is_file().then_some(crate_config)))
    } else {
        (args.agent.clone(), args.config.clone())
    };
    let (module_path, config_path, listen) = (module_path.as_path(), config_path.as_deref(), args.listen);
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
    config.host.compile_worker = super::compile_worker();
    let host = Host::start(config.host).await?;
    let module = host.runtime().load_file(module_path).with_context(|| format!("cannot load {}", module_path.display()))?;
    host.spawn(&id, config.agent, module)?;
    shutdown.started();
    tracing::info!(agent = %id, "agent URL: {}", host.agent_url(&id));
    shutdown.wait().await;
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

