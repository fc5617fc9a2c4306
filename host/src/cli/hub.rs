//! `tether hub`: the Azure IoT Hub + DPS emulator on its own.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use super::Shutdown;

/// The device `tether hub` and `tether demo` create.
pub const DEMO_DEVICE: &str = "demo-device";
const DEMO_REGISTRATION: &str = "demo-registration";

/// `tether hub`'s arguments (also the hub part of `tether demo`'s).
#[derive(clap::Args)]
pub struct HubArgs {
    /// Device MQTT over TLS (Microsoft's device SDKs insist on 8883).
    #[arg(long, default_value_t = 8883)]
    pub mqtt_port: u16,
    /// Service REST, DPS REST, the control API and MQTT over WebSocket.
    #[arg(long, default_value_t = 8443)]
    pub https_port: u16,
    /// Where the CA, the server certificate and the hub's keys are kept.
    #[arg(long, default_value = "tether-data/hub")]
    pub state_dir: PathBuf,
    /// Keep devices, twins, enrollments and C2D queues across restarts.
    #[arg(long)]
    pub persist: bool,
    /// The hub's name (also accepted as `<name>.azure-devices.net` in tokens).
    #[arg(long, default_value = "tether-hub")]
    pub hub_name: String,
    /// Where the hub page (devices, telemetry, twins, methods, C2D, faults) listens:
    /// loopback, since it acts with the hub's service credentials.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub page_listen: std::net::SocketAddr,
}

/// Serves the hub page for `hub` on `listen`, and says where in the log, with a link that
/// logs in once as `iothubowner`.
pub async fn start_page(hub: &tether_hub_emulator::Hub, listen: std::net::SocketAddr) -> anyhow::Result<tether_host::hub_page::HubPage> {
    let page = tether_host::hub_page::HubPage::start(hub, listen).await.with_context(|| format!("cannot serve the hub page on {listen} (change it with --page-listen)"))?;
    tracing::info!("hub page: http://{}/", page.addr());
    tracing::info!("hub page login, once within 10 minutes: {}", page.login_link()?);
    Ok(page)
}


/// Starts the emulator with `args`.
pub async fn start_hub(args: &HubArgs) -> anyhow::Result<tether_hub_emulator::Hub> {
    let config = tether_hub_emulator::HubConfig {
        hub_name: args.hub_name.clone(),
        mqtt_port: args.mqtt_port,
        https_port: args.https_port,
        state_dir: args.state_dir.clone(),
        persist: args.persist,
        ..tether_hub_emulator::HubConfig::default()
    };
    let ports = format!("ports {} and {} (change them with --mqtt-port and --https-port)", config.mqtt_port, config.https_port);
    tether_hub_emulator::Hub::start(config).await.with_context(|| format!("cannot start the hub emulator on {ports}"))
}

/// Ready-to-paste lines for a second terminal: a service token valid for a day, the
/// control token, and curl commands that invoke `method` with `payload` on `device`, set
/// its desired `interval`, and send it `c2d`.
pub fn try_it(hub: &tether_hub_emulator::Hub, device: &str, method: &str, payload: &str, what_method_does: &str, c2d: &str) -> anyhow::Result<String> {
    let cs = hub.service_connection_string();
    let get = |k: &str| cs.split(';').find_map(|p| p.strip_prefix(k)?.strip_prefix('=').map(str::to_owned)).unwrap_or_default();
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 86_400;
    let token = tether_hub_emulator::generate_sas_token(&get("HostName"), &get("SharedAccessKey"), Some("iothubowner"), expiry).context("the hub's owner key is not base64")?;
    let ca = hub.ca_cert_path().display();
    let https = format!("localhost:{}", hub.https_addr().port());
    let control = hub.control_token();
    let c2d = c2d.replace('\'', "'\\''");
    Ok(format!(
        "\n  export TOKEN='{token}'\
         \n  export CONTROL_TOKEN='{control}'\
         \n  # a direct method: {what_method_does}\
         \n  curl --cacert {ca} -H \"Authorization: $TOKEN\" -H 'Content-Type: application/json' \\\
         \n    -d '{{\"methodName\":\"{method}\",\"payload\":{payload},\"responseTimeoutInSeconds\":10}}' \\\
         \n    'https://{https}/twins/{device}/methods?api-version=2021-04-12'\
         \n  # a desired property: the reporting interval, 1 s\
         \n  curl --cacert {ca} -H \"Authorization: $TOKEN\" -H 'Content-Type: application/json' -X PATCH \\\
         \n    -d '{{\"properties\":{{\"desired\":{{\"interval\":1}}}}}}' 'https://{https}/twins/{device}?api-version=2021-04-12'\
         \n  # a cloud-to-device message\
         \n  curl --cacert {ca} -H \"Authorization: Bearer $CONTROL_TOKEN\" -d '{c2d}' \\\
         \n    'https://{https}/emulator/devices/{device}/c2d'\n"
    ))
}

/// Runs the emulator until Ctrl-C or SIGTERM, after printing how to reach it.
pub async fn hub(args: HubArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::watch()?;
    use tether_hub_emulator::Enrollment;
    let hub = start_hub(&args).await?;
    let page = start_page(&hub, args.page_listen).await?;
    // Before the credentials are printed: a signal from here on stops the hub cleanly.
    shutdown.started();
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
    let try_it = try_it(&hub, DEMO_DEVICE, "ping", "{}", "answered by the device once it is connected", "hello")?;
    // One write, and a reader that has gone (`tether hub | head`) is no reason to fail.
    let _ = writeln!(
        std::io::stdout(),
        "Azure IoT Hub + DPS emulator running.\n\
         \n  CA certificate:        {ca}\
         \n  device MQTT (TLS):     {mqtt}\
         \n  service/DPS (HTTPS):   https://{https}  (control API under /emulator, docs/hub-emulator.md)\
         \n  hub page:              http://{page}/  (the log's \"hub page login\" line logs in once)\
         \n  control API token:     {control}\
         \n    (send `Authorization: Bearer <token>`; stored in {control_file})\
         \n\n  device connection string ({DEMO_DEVICE}):\n    {device}\
         \n  registry connection string (iothubowner):\n    {service}\
         \n  DPS: scope {scope}, registration id {reg}, key {key}\n\
         \nTry it from a second terminal:\n{try_it}",
        ca = hub.ca_cert_path().display(),
        mqtt = hub.mqtt_addr(),
        https = hub.https_addr(),
        service = hub.service_connection_string(),
        control = hub.control_token(),
        page = page.addr(),
        control_file = hub.control_token_path().map_or("no file".into(), |p| p.display().to_string()),
        scope = hub.dps_scope_id(),
        reg = enrollment.id,
        key = enrollment.primary_key,
    );
    shutdown.wait().await;
    tracing::info!("shutting down the hub emulator");
    page.stop().await;
    hub.shutdown().await;
    Ok(())
}

