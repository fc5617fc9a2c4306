//! `tether gateway`: the box with the device's serial port, far from the agent.

use std::path::PathBuf;

use tether_host::{GatewayConfig, run_gateway};

use super::Shutdown;

/// `tether gateway`'s arguments.
#[derive(clap::Args)]
pub struct GatewayArgs {
    /// The cluster's NATS server(s).
    #[arg(long, value_name = "nats://HOST:PORT")]
    cluster: String,
    /// The device's serial port (`/dev/ttyUSB0`, a `/dev/serial/by-id/...` link, a pty).
    #[arg(long)]
    device: PathBuf,
    /// The agent the device belongs to; its manifest entry has `device = { gateway = true }`.
    #[arg(long)]
    agent: String,
    /// Line speed.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
}

/// Carries the device's line to its agent, wherever in the cluster it runs, until Ctrl-C
/// or SIGTERM.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    shutdown.started();
    tracing::info!("gateway for agent {} on {} via {}", args.agent, args.device.display(), args.cluster);
    let config = GatewayConfig { url: args.cluster, device: args.device, baud: args.baud, agent: args.agent };
    run_gateway(config, shutdown.wait()).await
}
