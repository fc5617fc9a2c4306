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
//! The client runs with `ClientOptions::resilient()`: it reconnects by itself and keeps
//! telemetry in a durable outbox, so a reading taken while the hub is unreachable, or
//! just before the agent crashes, still arrives once the hub is back.

use std::cell::RefCell;

use serde_json::{Map, Value, json};
use tether_guest::azure_iot_hub::{Client, ClientOptions, DirectMethodResponse, Dps, ERROR_NOT_REGISTERED, Message, MethodReply};
use tether_guest::{config, device, server};

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
    /// Features stay enabled across the client's own reconnects: enable them once.
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn client() -> Option<Client> {
    CLIENT.with_borrow(Clone::clone)
}

fn start() {
    device::on_connect(|info| server::log(format!("device {} connected (firmware {})", info.id, info.firmware)));
    device::on_disconnect(|reason| server::log(format!("device disconnected: {reason}")));
    device::on("temperature", |celsius: f64| {
        // The outbox takes it whether or not the hub is reachable now.
        let Some(client) = client() else { return };
        let body = json!({ "temperature": celsius }).to_string();
        let message = Message::with_properties(body, [("$.ct", "application/json"), ("$.ce", "utf-8")]);
        client.send_message(message, move |err, _| match err {
            0 => server::log(format!("telemetry sent: {celsius:.2} °C")),
            err => server::error(format!("telemetry failed: {err}")),
        });
    });
    match config("connection_string") {
        Some(cs) => connect(&cs),
        None => provision(),
    }
}

/// Asks DPS for this device's connection string, registering it the first time.
fn provision() {
    let (Some(scope), Some(registration), Some(key)) = (config("dps_scope"), config("dps_registration_id"), config("dps_key")) else {
        return server::error("config needs connection_string, or dps_scope, dps_registration_id and dps_key");
    };
    let mut dps = Dps::new(&scope, &registration, &key);
    if let Some(endpoint) = config("dps_endpoint") {
        dps = dps.with_endpoint(&endpoint);
    }
    let d = dps.clone();
    dps.get_connection_string(move |err, _, cs| match (err, cs) {
        (0, Some(cs)) => {
            server::log("device is registered already");
            connect(&cs)
        }
        (ERROR_NOT_REGISTERED, _) => {
            server::log("registering the device through DPS...");
            d.register(|err, resp, cs| match cs {
                Some(cs) => {
                    server::log("registered through DPS");
                    connect(&cs)
                }
                None => server::error(format!("DPS registration failed: {err} {}", resp.unwrap_or_default())),
            });
        }
        (err, _) => server::error(format!("DPS lookup failed: {err}")),
    });
}

fn connect(connection_string: &str) {
    let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
    let client = Client::new(connection_string, on_connected, on_disconnected, ClientOptions { port, ..ClientOptions::resilient() });
    CLIENT.with_borrow_mut(|c| *c = Some(client.clone()));
    client.connect();
}

fn on_connected(err: i32) {
    let Some(client) = client() else { return };
    if err != 0 {
        // Transient failures are retried by the client; this one will not heal.
        let cause = client.last_disconnect_cause().unwrap_or_default();
        return server::error(format!("cannot connect to IoT Hub: {err} {cause}; check the device's key and that it is enabled"));
    }
    server::log("connected to IoT Hub");
    if ENABLED.replace(true) {
        return retrieve_desired(&client);
    }
    let c = client.clone();
    client.enable_twin(apply_desired, move |err| match err {
        0 => retrieve_desired(&c),
        err => server::error(format!("enabling the twin failed: {err}")),
    });
    client.enable_direct_methods(on_method, |err| report("direct methods", err));
    client.enable_incoming_messages(on_c2d, |err| report("cloud-to-device messages", err));
}

/// Applies what was desired while the agent was away.
fn retrieve_desired(client: &Client) {
    client.retrieve_twin_properties(|err, _, desired| match (err, desired) {
        (0, Some(Value::Object(desired))) => apply_desired(desired),
        (0, _) => {}
        (err, _) => server::error(format!("retrieving the twin failed: {err}")),
    });
}

fn report(feature: &str, err: i32) {
    match err {
        0 => server::log(format!("{feature} enabled")),
        err => server::error(format!("enabling {feature} failed: {err}")),
    }
}

fn on_disconnected(err: i32) {
    if err != 0 {
        let cause = client().and_then(|c| c.last_disconnect_cause()).unwrap_or_default();
        server::error(format!("disconnected from IoT Hub: {err} {cause}; the client reconnects by itself"));
    }
}

/// A desired `interval` (seconds) goes to the device and is reported back.
fn apply_desired(desired: Map<String, Value>) {
    let Some(interval) = desired.get("interval").and_then(Value::as_f64).filter(|s| *s > 0.0) else { return };
    server::log(format!("desired reporting interval: {interval} s"));
    if let Err(e) = device::send_queued("set-interval", &interval) {
        return server::error(format!("cannot tell the device: {e}"));
    }
    let Some(client) = client() else { return };
    let mut reported = Map::new();
    reported.insert("interval".into(), json!(interval));
    client.update_twin_properties(reported, |err, _| match err {
        0 => server::log("reported the new interval"),
        err => server::error(format!("reporting the interval failed: {err}")),
    });
}

fn on_method(name: String, params: Option<Value>, reply: MethodReply) {
    server::log(format!("direct method {name}({})", params.clone().unwrap_or(Value::Null)));
    let param = |k: &str| params.as_ref().and_then(|p| p.get(k)).cloned();
    let answer = std::rc::Rc::new(RefCell::new(Some(reply)));
    let respond = move |status: i32, body: Value| {
        if let Some(reply) = answer.borrow_mut().take() {
            reply.send(DirectMethodResponse::new(status, Some(body)), |err, _| {
                if err != 0 {
                    server::error(format!("method reply failed: {err}"));
                }
            });
        }
    };
    let (on_done, on_fail) = (respond.clone(), respond.clone());
    let request = match name.as_str() {
        "blink" => {
            let times = param("times").and_then(|t| t.as_i64()).unwrap_or(3);
            device::request("blink", &times).on_ack(move || on_done(200, json!({ "blinked": times })))
        }
        "led" => {
            let on = param("on").and_then(|v| v.as_bool()).unwrap_or(true);
            device::request("led", &on).on_ack(move || on_done(200, json!({ "led": on })))
        }
        "get-led" => device::request("get-led", &()).on_reply(move |on: bool| on_done(200, json!({ "led": on }))),
        _ => return respond(404, json!({ "error": format!("no method {name}") })),
    };
    let sent = request.on_fail(move |f| on_fail(503, json!({ "error": f.to_string() }))).timeout(5.0).send();
    if let Err(e) = sent {
        respond(503, json!({ "error": e.to_string() }));
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
