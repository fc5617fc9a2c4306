//! The documentation's `AzureIoTHub.DPS` example, in the async style: get the device's
//! connection string from DPS, registering the device first if it is not registered yet,
//! then connect.
//!
//! Config: `dps_scope`, `dps_registration_id`, `dps_key`, optional `dps_endpoint`
//! (default Azure's global endpoint) and `hub_port` (default 8883).

use tether_guest::azure_iot_hub::{AzureError, ClientOptions, DeviceClient, Dps};
use tether_guest::{config, server, task};

fn start() {
    let (Some(scope), Some(registration), Some(key)) = (config("dps_scope"), config("dps_registration_id"), config("dps_key")) else {
        return server::error("config dps_scope, dps_registration_id and dps_key are needed");
    };
    let mut dps = Dps::new(&scope, &registration, &key);
    if let Some(endpoint) = config("dps_endpoint") {
        dps = dps.with_endpoint(&endpoint);
    }
    task::spawn(async move {
        if let Err(e) = run(&dps).await {
            server::error(format!("Error occurred: {e}"));
        }
    });
}

async fn run(dps: &Dps) -> Result<(), AzureError> {
    // Looks the device up, and registers it if DPS does not know it yet.
    let provisioned = dps.provision().await?;
    server::log(if provisioned.registered { "Device has been registered" } else { "Device is registered already" });
    let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
    let client = DeviceClient::new(&provisioned.connection_string, ClientOptions { port, ..ClientOptions::default() });
    client.connect().await?;
    server::log("Connected");
    // The task keeps the client, as the Squirrel example's global does.
    std::future::pending().await
}

tether_guest::agent!(start);
