//! The documentation's `AzureIoTHub.DPS` example: get the device's connection string from
//! DPS, registering the device first if it is not registered yet, then connect.
//!
//! Config: `dps_scope`, `dps_registration_id`, `dps_key`, optional `dps_endpoint`
//! (default Azure's global endpoint) and `hub_port` (default 8883).

use std::cell::{Cell, RefCell};

use serde_json::Value;
use tether_guest::azure_iot_hub::{Client, ClientOptions, Dps, ERROR_NOT_REGISTERED};
use tether_guest::{config, server};

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
    static DPS: RefCell<Option<Dps>> = const { RefCell::new(None) };
    static REGISTRATION_CALLED: Cell<bool> = const { Cell::new(false) };
}

fn on_connected(err: i32) {
    if err != 0 {
        server::error(format!("Connection failed: {err}"));
    } else {
        server::log("Connected");
    }
}

fn on_completed(err: i32, resp: Option<Value>, conn_str: Option<String>) {
    let registration_called = REGISTRATION_CALLED.get();
    match (err, conn_str) {
        (0, Some(cs)) => {
            server::log(if registration_called { "Device has been registered" } else { "Device is registered already" });
            let port = config("hub_port").and_then(|p| p.parse().ok()).unwrap_or(8883);
            let client = Client::new(&cs, on_connected, |_| (), ClientOptions { port, ..ClientOptions::default() });
            client.connect();
            CLIENT.with_borrow_mut(|c| *c = Some(client));
        }
        (ERROR_NOT_REGISTERED, _) if !registration_called => {
            // The device is not registered.
            server::log("Device is not registered. Starting registration...");
            REGISTRATION_CALLED.set(true);
            if let Some(dps) = DPS.with_borrow(Clone::clone) {
                dps.register(on_completed);
            }
        }
        (err, _) => server::error(format!("Error occurred: code = {err}, response = {}", resp.unwrap_or_default())),
    }
}

fn start() {
    let (Some(scope), Some(registration), Some(key)) = (config("dps_scope"), config("dps_registration_id"), config("dps_key")) else {
        return server::error("config dps_scope, dps_registration_id and dps_key are needed");
    };
    let mut dps = Dps::new(&scope, &registration, &key);
    if let Some(endpoint) = config("dps_endpoint") {
        dps = dps.with_endpoint(&endpoint);
    }
    DPS.with_borrow_mut(|d| *d = Some(dps.clone()));
    // Try to get a Device Connection String.
    dps.get_connection_string(on_completed);
}

tether_guest::agent!(start);
