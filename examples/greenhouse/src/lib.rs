//! A greenhouse, the agent of the issue that asked for the async layer: the board's
//! `temperature` readings go to IoT Hub as telemetry with an `alert` property (above the
//! twin's desired `threshold`, default 30 °C, reported back); the direct method `vent`
//! (`{"open": percent}`) is answered by asking the board; `GET /readings` serves the last
//! 10 readings, kept in the agent's store across restarts.
//!
//! Config: `connection_string` (`HostName=host:port` reaches an emulator's port).

use std::cell::Cell;
use std::rc::Rc;

use serde_json::{Value, json};
use tether_guest::azure_iot_hub::{AzureError, ClientOptions, DeviceClient, DirectMethodResponse, Message};
use tether_guest::http::{self, Answer};
use tether_guest::{config, device, server, task};

const KEPT: usize = 10;

fn start() {
    let readings = device::messages::<f64>("temperature");
    http::serve(|req| async move {
        match req.path.as_str() {
            "/readings" => Answer::json(200, &kept()),
            _ => Answer::new(404, "try GET /readings\n"),
        }
    });
    task::spawn(async {
        if let Err(e) = run(readings).await {
            server::error(format!("{e}"));
        }
    });
}

async fn run(mut readings: device::Messages<f64>) -> Result<(), AzureError> {
    let hub = DeviceClient::new(&config("connection_string").unwrap_or_default(), ClientOptions::resilient());
    hub.connect().await?;
    let desired = |v: &serde_json::Map<String, Value>| v.get("threshold").and_then(Value::as_f64);
    let threshold = Rc::new(Cell::new(desired(&hub.twin().await?.desired.values).unwrap_or(30.0)));
    let (t, h) = (threshold.clone(), hub.clone());
    hub.on_desired(move |patch| {
        if let Some(celsius) = desired(&patch.values) {
            t.set(celsius);
            task::spawn(report(h.clone(), celsius));
        }
    })
    .await?;
    report(hub.clone(), threshold.get()).await;
    hub.on_method(|name, params| async move {
        let open = params.as_ref().and_then(|p| p["open"].as_u64()).unwrap_or(100).min(100);
        match name.as_str() {
            "vent" => match device::request("vent", &open).timeout(5.0).await {
                Ok(_) => DirectMethodResponse::new(200, Some(json!({ "open": open }))),
                Err(e) => DirectMethodResponse::new(503, Some(json!({ "error": e.to_string() }))),
            },
            _ => DirectMethodResponse::new(404, Some(json!({ "error": format!("no method {name}") }))),
        }
    })
    .await?;
    server::log("greenhouse connected");
    while let Some(celsius) = readings.next().await {
        keep(celsius);
        let alert = celsius > threshold.get();
        let message = Message::with_properties(json!({ "temperature": celsius }).to_string(), [("alert", alert.to_string()), ("$.ct", "application/json".into())]);
        let hub = hub.clone();
        task::spawn(async move {
            if let Err(e) = hub.send_message(message).await {
                server::error(format!("{e}"));
            }
        });
    }
    Ok(())
}

async fn report(hub: DeviceClient, threshold: f64) {
    if let Err(e) = hub.update_reported(json!({ "threshold": threshold })).await {
        server::error(format!("{e}"));
    }
}

/// The last readings, oldest first.
fn kept() -> Vec<f64> {
    server::load().ok().flatten().unwrap_or_default()
}

fn keep(celsius: f64) {
    let mut readings = kept();
    readings.push(celsius);
    let excess = readings.len().saturating_sub(KEPT);
    readings.drain(..excess);
    if let Err(e) = server::save(&readings) {
        server::error(format!("readings not kept: {e}"));
    }
}

tether_guest::agent!(start);
