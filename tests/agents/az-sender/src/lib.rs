//! Test agent for "nothing lost": sends `count` numbered messages, one every `interval`
//! seconds, through an AzureIoTHub client with the durable outbox and reconnect on
//! (`ClientOptions::resilient`). It logs `accepted N` once `send_message` returned
//! (the message is in the outbox then) and `acked N` when IoT Hub has it; the next number
//! is saved before each send, so a restarted agent never reuses one. `GET /depth`
//! answers the outbox depth; `GET /panic` traps the agent.
//!
//! Config: `cs` (device connection string), `port` (the hub's MQTT port), `count`,
//! `interval`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tether_guest::azure_iot_hub::{Client, ClientOptions, Message};
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
    tick();
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
    let Some(client) = CLIENT.with_borrow(Clone::clone) else { return };
    let message = Message::with_properties(next.to_string(), [("seq", next.to_string())]);
    // With the outbox, only a refusal comes back at once with a code other than 0.
    let refused = Rc::new(Cell::new(false));
    let r = refused.clone();
    client.send_message(message, move |code, _| match code {
        0 => server::log(format!("acked {next}")),
        code => {
            r.set(true);
            server::error(format!("refused {next}: {code}"))
        }
    });
    if !refused.get() {
        server::log(format!("accepted {next}"));
    }
    imp::wakeup(setting("interval", 0.05), tick);
}

tether_guest::agent!(start);
