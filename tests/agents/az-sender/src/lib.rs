//! Test agent for "nothing lost": sends `count` numbered messages, one every `interval`
//! seconds, through an AzureIoTHub client with the durable outbox and reconnect on
//! (`ClientOptions::resilient`). It logs `accepted N` once `send_message` returned
//! (the message is in the outbox then) and `acked N` when IoT Hub has it; the next number
//! is saved before each send, so a restarted agent never reuses one. `GET /depth`
//! answers the outbox depth; `GET /panic` traps the agent.
//!
//! With `source = "device"` the numbers come from the device instead: each `reading` {n}
//! is sent with message id `reading-{n}` and answered `true` once accepted (`false` if
//! refused, so the device sends it again). A number it has accepted before (its answer was
//! lost with the line) is answered `true` without sending again.
//!
//! Config: `cs` (device connection string), `port` (the hub's MQTT port), `count`,
//! `interval`, `source`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tether_guest::azure_iot_hub::{Client, ClientOptions, Message};
use tether_guest::device::{self, Value};
use tether_guest::{http, imp, server};

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
}

fn setting(key: &str, default: f64) -> f64 {
    server::config(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn start() {
    let options = ClientOptions { port: setting("port", 8883.0) as u16, max_pending_send_requests: 10, ..ClientOptions::resilient() };
    let client = Client::new(
        &server::config("cs").unwrap_or_default(),
        |code| server::log(format!("connected {code}")),
        |code| server::log(format!("disconnected {code}")),
        options,
    );
    client.connect();
    CLIENT.with_borrow_mut(|c| *c = Some(client));
    http::on_request(|req, res| {
        let answer = match req.path.as_str() {
            "/depth" => CLIENT.with_borrow(|c| c.as_ref().map_or(0, Client::outbox_len)).to_string(),
            "/panic" => panic!("asked to"),
            _ => "unknown".to_owned(),
        };
        let _ = res.send(200, answer);
    });
    if server::config("source").as_deref() == Some("device") {
        device::on_request("reading", take_reading);
    } else {
        tick();
    }
}

/// Sends number `n`, logging `accepted n` once the outbox has it; false if refused.
fn send(n: u64, message_id: Option<String>) -> bool {
    let Some(client) = CLIENT.with_borrow(Clone::clone) else { return false };
    let mut properties = vec![("seq", n.to_string())];
    properties.extend(message_id.map(|id| ("$.mid", id)));
    let message = Message::with_properties(n.to_string(), properties);
    // With the outbox, only a refusal comes back at once with a code other than 0.
    let refused = Rc::new(Cell::new(false));
    let r = refused.clone();
    client.send_message(message, move |code, _| match code {
        0 => server::log(format!("acked {n}")),
        code => {
            r.set(true);
            server::error(format!("refused {n}: {code}"))
        }
    });
    if refused.get() {
        return false;
    }
    server::log(format!("accepted {n}"));
    true
}

/// A reading from the device: true once it is in the outbox (now or before).
fn take_reading(reading: Value) -> bool {
    let Some(n) = reading.get("n").and_then(Value::as_i64).and_then(|n| u64::try_from(n).ok()) else {
        server::error(format!("a reading without a number: {reading:?}"));
        return false;
    };
    let last: u64 = server::load().ok().flatten().unwrap_or(0);
    if n <= last {
        server::log(format!("reading {n} again"));
        return true;
    }
    if !send(n, Some(format!("reading-{n}"))) {
        return false;
    }
    if let Err(e) = server::save(&n) {
        server::error(format!("cannot save the last reading: {e}"));
    }
    if n == setting("count", 100.0) as u64 {
        server::log("all accepted");
    }
    true
}

/// Sends the next message and schedules the one after.
fn tick() {
    let next: u64 = server::load().ok().flatten().unwrap_or(1);
    if next > setting("count", 100.0) as u64 {
        return server::log("all accepted");
    }
    if let Err(e) = server::save(&(next + 1)) {
        server::error(format!("cannot save the next number: {e}"));
        return;
    }
    send(next, None);
    imp::wakeup(setting("interval", 0.05), tick);
}

tether_guest::agent!(start);
