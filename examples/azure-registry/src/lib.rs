//! The documentation's `AzureIoTHub.Registry` example, in the async style: find this
//! agent's device in the registry, create it if missing, then connect a client with its
//! credentials.
//!
//! Config: `registry_connection_string` (a policy with registry read/write), optional
//! `hub_port` (default 8883).

use tether_guest::azure_iot_hub::{ClientOptions, ConnectionString, Device, DeviceClient, Registry, RegistryError};
use tether_guest::{config, http, server, task};

fn start() {
    let Some(cs) = config("registry_connection_string") else {
        return server::error("config registry_connection_string is missing");
    };
    task::spawn(async move {
        if let Err(e) = run(&cs).await {
            server::error(e);
        }
    });
}

async fn run(cs: &str) -> Result<(), String> {
    // The agent id is the last segment of the agent URL, as in the Squirrel example.
    let agent_id = http::agent_url().rsplit('/').next().unwrap_or_default().to_owned();
    let registry = Registry::new(cs);
    let device = match registry.get_device(&agent_id).await {
        Ok(device) => {
            server::log(format!("Device registered as {}", device.device_id()));
            device
        }
        // No such device, so let's create one with default parameters.
        Err(RegistryError { response: Some(r), .. }) if r.statuscode == 404 => {
            let device = registry.create_device(Device::new(None)).await.map_err(|e| e.message)?;
            server::log(format!("Created {}", device.device_id()));
            device
        }
        Err(e) => return Err(e.message),
    };
    // The MQTT host is the registry's host name without the HTTPS port an emulator adds.
    let host = ConnectionString::parse(cs).host_name.unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default();
    let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
    let client = DeviceClient::new(&device.connection_string(host), ClientOptions { port, ..ClientOptions::default() });
    client.connect().await.map_err(|e| format!("Connection failed: {e}"))?;
    server::log("Connected");
    // The task keeps the client, as the Squirrel example's global does.
    std::future::pending().await
}

tether_guest::agent!(start);
