//! `tether demo`: the emulator, a simulated board on a pty and the azure-demo agent.

use std::path::PathBuf;

use anyhow::{Context, bail};

use super::Shutdown;
use super::hub::{DEMO_DEVICE, HubArgs, start_hub};
use tether_host::Host;

/// `tether demo`'s arguments.
#[derive(clap::Args)]
pub struct DemoArgs {
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
    /// Where the console (the agent's page: plots, log, device line, deploys) listens.
    #[arg(long, default_value = "127.0.0.1:9090")]
    console_listen: std::net::SocketAddr,
}


/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    // Stopped cleanly from the start: an exit would leave the device simulator running.
    shutdown.started();
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
    let hub = start_hub(&args.hub).await?;
    let page = super::hub::start_page(&hub, args.hub.page_listen).await?;
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
        compile_worker: super::compile_worker(),
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
        device: Some(DeviceBinding::serial(link, 115_200)),
    };
    host.spawn("demo", settings, module)?;
    let host = std::sync::Arc::new(host);

    // The console, for one tenant whose token nobody needs to see: the printed link logs
    // in once, and `tether agents console` can make another with the token in the file.
    let mut token = [0u8; 24];
    getrandom::fill(&mut token).map_err(|e| anyhow::anyhow!("no randomness for the console token: {e}"))?;
    let token = hex::encode(token);
    let token_file = state_dir.join("console-token");
    std::fs::write(&token_file, &token).with_context(|| format!("cannot write {}", token_file.display()))?;
    let access = tether_host::manifest::Access::single("demo", &token, &["demo"]);
    // One agent: sampling it every 2 s costs nothing and fills the plots quickly.
    let config = tether_host::manifest::ManageConfig { history_interval_ms: 2000, ..Default::default() };
    let manage = tether_host::manage::ManageServer::start(host.clone(), access, &config, args.console_listen)
        .await
        .with_context(|| format!("cannot serve the console on {} (change it with --console-listen)", args.console_listen))?;
    tracing::info!("console: http://{}/ (the token is in {})", manage.addr(), token_file.display());
    tracing::info!("console login, once within 10 minutes: {}", manage.login_link("demo")?);

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

    let try_it = super::hub::try_it(&hub, DEMO_DEVICE, "blink", r#"{"times":3}"#, "the agent asks the board to blink", r#"{"led": true}"#)?;
    println!(
        "\nTether demo: hub emulator, simulated board and the azure-demo agent are running.\n\
         Console (the agent: plots, log, device line, deploys): http://{console}/\n\
         Hub page (devices, live telemetry, twin, direct methods, C2D, faults): http://{page}/\n\
         (the \"login\" lines above have links that log in once)\n\
         From a second terminal:\n{try_it}\nCtrl-C ends the demo.\n",
        page = page.addr(),
        console = manage.addr(),
    );

    tokio::select! {
        () = shutdown.wait() => {}
        status = sim.wait() => tracing::error!("the device simulator exited: {:?}", status),
    }
    tracing::info!("shutting down the demo");
    watcher.abort();
    page.stop().await;
    host.runtime().abandon_compiles();
    manage.stop().await;
    match std::sync::Arc::try_unwrap(host) {
        Ok(host) => host.shutdown().await,
        Err(_) => bail!("the host is still in use at shutdown"),
    }
    let _ = sim.kill().await;
    hub.shutdown().await;
    Ok(())
}

