//! The documentation's `AzureIoTHub.Client` examples in one agent: connect (reconnecting
//! after an unexpected disconnection), send a message without and one with a callback
//! (re-sending on error), receive cloud-to-device messages, retrieve and update the
//! device twin, and answer direct methods.
//!
//! Config: `connection_string` (a device connection string), optional `hub_port`.

use std::cell::RefCell;

use serde_json::{Map, Value, json};
use tether_guest::azure_iot_hub::{Client, ClientOptions, DirectMethodResponse, Message, MethodReply};
use tether_guest::{config, imp, server};

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
}

fn client() -> Option<Client> {
    CLIENT.with_borrow(Clone::clone)
}

fn on_connected(err: i32) {
    if err != 0 {
        server::error(format!("Connect failed: {err}"));
        return;
    }
    server::log("Connected");
    let Some(client) = client() else { return };
    // Send a string with no callback.
    client.send_message(Message::new("This is a string"), |_, _| ());
    // Send a string with a callback, and resend it in case of an error.
    send_with_callback(&client, Message::new("This is another string"));
    client.enable_incoming_messages(on_receive, |err| {
        if err != 0 {
            server::error(format!("Enabling message receiving failed: {err}"));
        } else {
            server::log("Message receiving enabled successfully");
        }
    });
    let c = client.clone();
    client.enable_twin(
        |_props: Map<String, Value>| server::log("Desired properties received"),
        move |err| {
            if err != 0 {
                return server::error(format!("Enabling Twins functionality failed: {err}"));
            }
            server::log("Twins functionality enabled successfully");
            c.retrieve_twin_properties(|err, _reported, _desired| {
                if err != 0 {
                    return server::error(format!("Retrieving Twin properties failed: {err}"));
                }
                server::log("Twin properties retrieved successfully");
            });
            let mut props = Map::new();
            props.insert("exampleProp".into(), json!("val"));
            c.update_twin_properties(props, |err, _props| {
                if err != 0 {
                    server::error(format!("Twin properties update failed: {err}"));
                } else {
                    server::log("Twin properties updated successfully");
                }
            });
        },
    );
    client.enable_direct_methods(on_method, |err| {
        if err != 0 {
            server::error(format!("Enabling Direct Methods failed: {err}"));
        } else {
            server::log("Direct Methods enabled successfully");
        }
    });
}

fn send_with_callback(client: &Client, message: Message) {
    let c = client.clone();
    client.send_message(message, move |err, msg| {
        if err != 0 {
            server::error(format!("Message sending failed: {err}"));
            server::log("Trying to send again...");
            // For simplicity, resend after a second on any error.
            imp::wakeup(1.0, move || send_with_callback(&c, msg));
        } else {
            server::log(format!("Message sent at {}", imp::time()));
        }
    });
}

fn on_disconnected(err: i32) {
    if err != 0 {
        server::error(format!("Disconnected unexpectedly with code: {err}"));
        // Reconnect if the disconnection was not initiated by the application.
        if let Some(c) = client() {
            c.connect();
        }
    } else {
        server::log("Disconnected by application");
    }
}

fn on_receive(msg: Message) {
    server::log(format!("Message received: {}", msg.body_text()));
}

fn on_method(name: String, _params: Option<Value>, reply: MethodReply) {
    server::log(format!("Direct Method called. Name = {name}"));
    let response = DirectMethodResponse::new(200, Some(json!({ "example": "val" })));
    reply.send(response, |err, _data| {
        if err != 0 {
            server::error(format!("Sending reply failed: {err}"));
        } else {
            server::log("Reply was sent successfully");
        }
    });
}

fn start() {
    let Some(cs) = config("connection_string") else {
        return server::error("config connection_string is missing");
    };
    let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
    let client = Client::new(&cs, on_connected, on_disconnected, ClientOptions { port, ..ClientOptions::default() });
    CLIENT.with_borrow_mut(|c| *c = Some(client.clone()));
    client.connect();
}

tether_guest::agent!(start);
