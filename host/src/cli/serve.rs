//! `tether serve`: every agent of a manifest, and the management API.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tether_host::Host;

use std::time::Duration;

use tether_host::cluster::{Cluster, ClusterConfig};

use super::Shutdown;

/// `tether serve`'s arguments.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The manifest: host settings, tenants and agents (see docs/manifest.md).
    #[arg(long)]
    manifest: PathBuf,
    /// Joins a cluster on these NATS servers (JetStream on): agents are spread over the
    /// nodes given the same manifest, and move when a node dies (docs/cluster.md).
    #[arg(long, value_name = "nats://HOST:PORT")]
    cluster: Option<String>,
    /// This node's name in the cluster, unique among its nodes (default: the host name).
    #[arg(long, requires = "cluster")]
    node: Option<String>,
    /// How long a node may be silent before its agents move to the others.
    #[arg(long, requires = "cluster", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1000..))]
    lease_ttl_ms: u64,
    /// Copies JetStream keeps of each lease, store and module: 3 on a three-server NATS
    /// cluster.
    #[arg(long, requires = "cluster", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: u8,
    /// A label of this node (repeatable): agents whose manifest entry has this
    /// `node_label` run only on nodes that have it, e.g. the node with their device's port.
    #[arg(long = "label", requires = "cluster", value_name = "LABEL")]
    labels: Vec<String>,
}

/// Runs a manifest's agents and the management API until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let manifest_path = args.manifest.as_path();
    let shutdown = Shutdown::watch()?;
    use tether_host::manage::ManageServer;
    use tether_host::manifest::Manifest;
    // In a cluster, the tenants and agents are the cluster's (docs/cluster.md).
    let connection = match &args.cluster {
        Some(url) => {
            let node = match &args.node {
                Some(node) => node.clone(),
                None => host_name().context("no --node given, and cannot read the host name")?,
            };
            let config = ClusterConfig { url: url.clone(), node, lease_ttl: Duration::from_millis(args.lease_ttl_ms), replicas: args.replicas.into(), labels: args.labels.clone() };
            let mut connection = Cluster::connect(config).await.context("cannot join the cluster")?;
            let manifest = connection.manifest(manifest_path).await.context("cannot join the cluster")?;
            Some((connection, manifest))
        }
        None => None,
    };
    let manifest = match &connection {
        Some((_, manifest)) => manifest.clone(),
        None => Manifest::load(manifest_path)?,
    };
    let host = std::sync::Arc::new(Host::start(tether_host::config::HostConfig { compile_worker: super::compile_worker(), ..manifest.host.clone() }).await?);
    let cluster = match connection {
        // Agents start as this node takes their leases, not here.
        Some((connection, _)) => {
            let cluster = connection.join(host.clone(), &manifest);
            tracing::info!("node {} joined the cluster", cluster.node());
            Some(std::sync::Arc::new(cluster))
        }
        None => {
            manifest.spawn_agents(&host)?;
            None
        }
    };
    // Before anything says "ready": a signal from here on stops the host cleanly.
    shutdown.started();
    match &cluster {
        Some(_) => tracing::info!("{} agents in the cluster, each starting on the node that takes its lease; agent URLs under {}", manifest.agents.len(), host.agent_url("")),
        None => tracing::info!("{} agents running; agent URLs under {}", manifest.agents.len(), host.agent_url("")),
    }
    let manage = match manifest.manage.listen {
        Some(listen) => {
            let server = ManageServer::start(host.clone(), manifest.access(), &manifest.manage, listen)
                .await
                .with_context(|| format!("cannot serve the management API on {listen}"))?;
            tracing::info!("management API and console: http://{}/", server.addr());
            if let Some(cluster) = &cluster {
                server.set_cluster(cluster.clone());
            }
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
    // First, so that the other nodes take this one's agents at once.
    if let Some(cluster) = &cluster {
        cluster.leave().await;
    }
    // A deploy compiling would hold the management API's graceful stop.
    host.runtime().abandon_compiles();
    if let Some(manage) = manage {
        manage.stop().await;
    }
    drop(cluster);
    match std::sync::Arc::try_unwrap(host) {
        Ok(host) => host.shutdown().await,
        Err(_) => bail!("the host is still in use at shutdown"),
    }
    Ok(())
}


/// The machine's name, as a node name needs it.
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect())
}
