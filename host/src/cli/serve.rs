//! `tether serve`: every agent of a manifest, and the management API.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tether_host::Host;

use super::Shutdown;

/// `tether serve`'s arguments.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The manifest: host settings, tenants and agents (see docs/manifest.md).
    #[arg(long)]
    manifest: PathBuf,
}

/// Runs a manifest's agents and the management API until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let manifest_path = args.manifest.as_path();
    let shutdown = Shutdown::watch()?;
    use tether_host::manage::ManageServer;
    use tether_host::manifest::Manifest;
    let manifest = Manifest::load(manifest_path)?;
    let host = std::sync::Arc::new(Host::start(tether_host::config::HostConfig { compile_worker: super::compile_worker(), ..manifest.host.clone() }).await?);
    manifest.spawn_agents(&host)?;
    // Before anything says "ready": a signal from here on stops the host cleanly.
    shutdown.started();
    tracing::info!("{} agents running; agent URLs under {}", manifest.agents.len(), host.agent_url(""));
    let manage = match manifest.manage.listen {
        Some(listen) => {
            let server = ManageServer::start(host.clone(), manifest.access(), &manifest.manage, listen)
                .await
                .with_context(|| format!("cannot serve the management API on {listen}"))?;
            tracing::info!("management API and console: http://{}/", server.addr());
            // Jupyter's way: a link that logs in once, so nobody pastes a token. Each
            // works once, for 10 minutes; `tether agents console` makes more.
            for tenant in &manifest.tenants {
                match server.login_link(&tenant.name) {
                    Ok(link) => tracing::info!("console login for tenant {}: {link}", tenant.name),
                    Err(e) => tracing::warn!("no console login link for tenant {}: {e}", tenant.name),
                }
            }
            Some(server)
        }
        None => None,
    };
    shutdown.wait().await;
    tracing::info!("shutting down");
    // A deploy compiling would hold the management API's graceful stop.
    host.runtime().abandon_compiles();
    if let Some(manage) = manage {
        manage.stop().await;
    }
    match std::sync::Arc::try_unwrap(host) {
        Ok(host) => host.shutdown().await,
        Err(_) => bail!("the host is still in use at shutdown"),
    }
    Ok(())
}

