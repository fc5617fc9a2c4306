//! Connects to the broker in config `broker` (default `tcp://127.0.0.1:1883`), subscribes
//! to `in_topic` (default `tether/in`) and republishes each message to `out_topic`
//! (default `tether/out`) at QoS 1. Reconnects 2 s after losing the connection.

use std::rc::Rc;

use tether_guest::mqtt::{self, Client, ConnectOptions, MessageOptions};
use tether_guest::{config, imp, server};

struct Settings {
    broker: String,
    in_topic: String,
    out_topic: String,
    client_id: String,
}

fn start() {
    let settings = Rc::new(Settings {
        broker: config("broker").unwrap_or_else(|| "tcp://127.0.0.1:1883".into()),
        in_topic: config("in_topic").unwrap_or_else(|| "tether/in".into()),
        out_topic: config("out_topic").unwrap_or_else(|| "tether/out".into()),
        client_id: format!("tether-{}", server::agent_id()),
    });
    let client = mqtt::create_client();
    let (c, s) = (client.clone(), settings.clone());
    client.on_connect(move |code| {
        if code != mqtt::codes::SUCCESS {
            server::error(format!("connect to {} failed: {code}", s.broker));
            retry(&c, &s);
            return;
        }
        server::log(format!("connected to {}", s.broker));
        let topic = s.in_topic.clone();
        let subscribed = c.subscribe(&[&s.in_topic], mqtt::AT_LEAST_ONCE, move |code, granted| {
            server::log(format!("subscribed to {topic}: code {code}, granted {granted:?}"));
        });
        if let Err(e) = subscribed {
            server::error(format!("subscribe: {e}"));
        }
    });
    let (c, s) = (client.clone(), settings.clone());
    client.on_connection_lost(move |code| {
        server::error(format!("connection lost: {code}"));
        retry(&c, &s);
    });
    let (c, s) = (client.clone(), settings.clone());
    client.on_message(move |m| {
        server::log(format!("received on {}: {}", m.topic, String::from_utf8_lossy(&m.message)));
        let out = c.create_message(&s.out_topic, m.message, MessageOptions { qos: mqtt::AT_LEAST_ONCE, retain: false });
        let sent = out.send_async(|code| match code {
            mqtt::codes::SUCCESS => server::log("republished"),
            _ => server::error(format!("republish failed: {code}")),
        });
        if let Err(e) = sent {
            server::error(format!("republish: {e}"));
        }
    });
    connect(&client, &settings);
}

fn connect(client: &Client, s: &Settings) {
    if let Err(e) = client.connect(&s.broker, &s.client_id, &ConnectOptions::default()) {
        server::error(format!("connect: {e}"));
    }
}

fn retry(client: &Client, s: &Rc<Settings>) {
    let (c, s) = (client.clone(), s.clone());
    imp::wakeup(2.0, move || connect(&c, &s));
}

tether_guest::agent!(start);
