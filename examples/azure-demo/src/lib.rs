//! The agent of `tether demo`, and a template for a real one. It provisions itself
//! through DPS (or takes `connection_string` from its config), forwards the device's
//! temperature readings as telemetry, applies the desired property `interval` to the
//! device and reports it back, answers the direct methods `blink`, `led` and `get-led` by
//! asking the device, and passes C2D messages (`{"led": true}`, `{"blink": 2}`, or any
//! text) on to the device.
//!
//! Config: `dps_scope`, `dps_registration_id`, `dps_key`, optional `dps_endpoint` (default
//! Azure's global endpoint) and `hub_port` (default 8883); or `connection_string`.
//!
//! Written with the async layer (`DeviceClient`, `device::request(..).await`). The client
//! runs with `ClientOptions::resilient()`: it reconnects by itself, enabling its features
//! again, and keeps telemetry in a durable outbox, so a reading taken while the hub is
//! unreachable, or just before the agent crashes, still arrives once the hub is back.

use serde_json::{Value, json};
use tether_guest::azure_iot_hub::{AzureError, ClientOptions, DeviceClient, DirectMethodResponse, Dps, Message, TwinProperties};
use tether_guest::device::{self, DeviceError};
use tether_guest::{config, server, task};

fn start() {
    device::on_connect(|info| server::log(format!("device {} connected (firmware {})", info.id, info.firmware)));
    device::on_disconnect(|reason| server::log(format!("device disconnected: {reason}")));
    // Readings are kept from now on, also while the agent provisions and connects.
    let readings = device::messages::<f64>("temperature");
    task::spawn(async {
        if let Err(e) = run(readings).await {
            server::error(format!("{e}"));
        }
    });
}

async fn run(mut readings: device::Messages<f64>) -> Result<(), AzureError> {
    let cs = match config("connection_string") {
        Some(cs) => cs,
        None => provision().await?,
    };
    let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
    let hub = DeviceClient::new(&cs, ClientOptions { port, ..ClientOptions::resilient() });
    hub.connect().await?;
    server::log("connected to IoT Hub");

    let h = hub.clone();
    hub.on_desired(move |desired| task::spawn(apply_desired(h.clone(), desired))).await?;
    // What was desired while the agent was away.
    apply_desired(hub.clone(), hub.twin().await?.desired).await;
    hub.on_method(on_method).await?;
    server::log("direct methods enabled");
    hub.on_message(on_c2d).await?;
    server::log("cloud-to-device messages enabled");
    while let Some(celsius) = readings.next().await {
        // A task per reading: the outbox takes each at once, while IoT Hub may be away.
        task::spawn(send_reading(hub.clone(), celsius));
    }
    Ok(())
}

async fn send_reading(hub: DeviceClient, celsius: f64) {
    let body = json!({ "temperature": celsius }).to_string();
    let message = Message::with_properties(body, [("$.ct", "application/json"), ("$.ce", "utf-8")]);
    match hub.send_message(message).await {
        Ok(()) => server::log(format!("telemetry sent: {celsius:.2} °C")),
        Err(e) => server::error(format!("telemetry: {e}")),
    }
}

/// Asks DPS for this device's connection string, registering it the first time.
async fn provision() -> Result<String, AzureError> {
    let (Some(scope), Some(registration), Some(key)) = (config("dps_scope"), config("dps_registration_id"), config("dps_key")) else {
        let message = "config needs connection_string, or dps_scope, dps_registration_id and dps_key".into();
        return Err(AzureError { operation: "start", code: 0, message });
    };
    let mut dps = Dps::new(&scope, &registration, &key);
    if let Some(endpoint) = config("dps_endpoint") {
        dps = dps.with_endpoint(&endpoint);
    }
    let provisioned = dps.provision().await?;
    server::log(if provisioned.registered { "registered through DPS" } else { "device is registered already" });
    Ok(provisioned.connection_string)
}

/// A desired `interval` (seconds) goes to the device and is reported back.
async fn apply_desired(hub: DeviceClient, desired: TwinProperties) {
    let Some(interval) = desired.values.get("interval").and_then(Value::as_f64).filter(|s| *s > 0.0) else { return };
    server::log(format!("desired reporting interval: {interval} s"));
    if let Err(e) = device::send_queued("set-interval", &interval) {
        return server::error(format!("cannot tell the device: {e}"));
    }
    match hub.update_reported(json!({ "interval": interval })).await {
        Ok(()) => server::log("reported the new interval"),
        Err(e) => server::error(format!("reporting the interval: {e}")),
    }
}

/// Answers a direct method by asking the device.
async fn on_method(name: String, params: Option<Value>) -> DirectMethodResponse {
    server::log(format!("direct method {name}({})", params.clone().unwrap_or(Value::Null)));
    let param = |k: &str| params.as_ref().and_then(|p| p.get(k)).cloned();
    let answer: Result<Value, DeviceError> = match name.as_str() {
        "blink" => {
            let times = param("times").and_then(|t| t.as_i64()).unwrap_or(3);
            device::request("blink", &times).timeout(5.0).await.map(|_| json!({ "blinked": times }))
        }
        "led" => {
            let on = param("on").and_then(|v| v.as_bool()).unwrap_or(true);
            device::request("led", &on).timeout(5.0).await.map(|_| json!({ "led": on }))
        }
        "get-led" => device::request("get-led", &()).timeout(5.0).await.and_then(|reply| reply.decode::<bool>()).map(|on| json!({ "led": on })),
        _ => return DirectMethodResponse::new(404, Some(json!({ "error": format!("no method {name}") }))),
    };
    match answer {
        Ok(body) => DirectMethodResponse::new(200, Some(body)),
        Err(e) => DirectMethodResponse::new(503, Some(json!({ "error": e.to_string() }))),
    }
}

fn on_c2d(message: Message) {
    let text = message.body_text();
    server::log(format!("C2D message: {text} {:?}", message.properties()));
    let sent = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(o)) if o.contains_key("led") => device::send_queued("led", &o["led"].as_bool().unwrap_or(false)),
        Ok(Value::Object(o)) if o.contains_key("blink") => device::send_queued("blink", &o["blink"].as_i64().unwrap_or(1)),
        _ => device::send_queued("echo", &text),
    };
    if let Err(e) = sent {
        server::error(format!("cannot pass the C2D message to the device: {e}"));
    }
}

tether_guest::agent!(start);
