//! The documentation's `AzureIoTHub.Registry` example: find this agent's device in the
//! registry, create it if missing, then connect a client with its credentials.
//!
//! Config: `registry_connection_string` (a policy with registry read/write), optional
//! `hub_port` (default 8883).

use std::cell::RefCell;

use tether_guest::azure_iot_hub::{Client, ClientOptions, ConnectionString, Device, Registry};
use tether_guest::{config, http, server};

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
}

fn on_connected(err: i32) {
    if err != 0 {
        server::error(format!("Connection failed: {err}"));
    } else {
        server::log("Connected");
    }
}

/// The MQTT host is the registry's host name without the HTTPS port an emulator adds.
fn hostname(connection_string: &str) -> String {
    let host = ConnectionString::parse(connection_string).host_name.unwrap_or_default();
    host.split(':').next().unwrap_or_default().to_owned()
}

fn connect(device: &Device, connection_string: &str) {
    let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
    let client = Client::new(&device.connection_string(&hostname(connection_string)), on_connected, |_| (), ClientOptions { port, ..ClientOptions::default() });
    client.connect();
    CLIENT.with_borrow_mut(|c| *c = Some(client));
}

fn start() {
    let Some(cs) = config("registry_connection_string") else {
        return server::error("config registry_connection_string is missing");
    };
    // The agent id is the last segment of the agent URL, as in the Squirrel example.
    let agent_id = http::agent_url().rsplit('/').next().unwrap_or_default().to_owned();
    let registry = std::rc::Rc::new(Registry::new(&cs));
    let r = registry.clone();
    registry.get(&agent_id, move |result| match result {
        Ok(device) => {
            server::log(format!("Device registered as {}", device.device_id()));
            connect(&device, &cs);
        }
        Err(err) if err.response.as_ref().is_some_and(|r| r.statuscode == 404) => {
            // No such device, so let's create one with default parameters.
            r.create(None, move |result| match result {
                Ok(device) => {
                    server::log(format!("Created {}", device.device_id()));
                    connect(&device, &cs);
                }
                Err(err) => server::error(err.message),
            });
        }
        Err(err) => server::error(err.message),
    });
}

tether_guest::agent!(start);
