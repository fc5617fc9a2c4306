//! {name}: a Tether agent for Azure IoT Hub (or `tether hub`, the local emulator). It
//! sends a reading every 10 s, reports its interval in the twin, follows the desired
//! `interval`, and answers the direct method `ping`. Set `connection_string` in
//! tether.toml: `tether hub` prints one.

use std::cell::Cell;
use std::rc::Rc;

use serde_json::json;
use tether_guest::azure_iot_hub::{AzureError, ClientOptions, DeviceClient, DirectMethodResponse, Message};
use tether_guest::{config, imp, server, task};

fn start() {
    task::spawn(async {
        if let Err(e) = run().await {
            server::error(format!("{e}"));
        }
    });
}

async fn run() -> Result<(), AzureError> {
    let cs = config("connection_string").unwrap_or_default();
    let hub = DeviceClient::new(&cs, ClientOptions::resilient());
    hub.connect().await?;
    server::log("connected to IoT Hub");
    hub.on_method(|name, _params| async move { DirectMethodResponse::new(200, Some(json!({ "pong": name }))) }).await?;

    let interval = Rc::new(Cell::new(10.0));
    let i = interval.clone();
    hub.on_desired(move |desired| {
        if let Some(secs) = desired.values.get("interval").and_then(|v| v.as_f64()).filter(|s| *s >= 1.0) {
            i.set(secs);
        }
    })
    .await?;
    hub.update_reported(json!({ "interval": interval.get() })).await?;
    for n in 0u64.. {
        let reading = json!({ "n": n, "uptime": n as f64 * interval.get() }).to_string();
        hub.send_message(Message::with_properties(reading, [("$.ct", "application/json")])).await?;
        if let Err(e) = imp::sleep(interval.get()).await {
            server::error(format!("no timer: {e}"));
            break;
        }
    }
    Ok(())
}

tether_guest::agent!(start);
