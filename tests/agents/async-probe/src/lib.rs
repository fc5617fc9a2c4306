//! Test agent for the SDK's async layer. Every request to its URL runs as a task of
//! `http::serve`; the answer is what the awaited calls returned, errors as their
//! `Display` text and `code()`.

use std::cell::RefCell;

use serde_json::{Value, json};
use tether_guest::azure_iot_hub::{ClientOptions, Device, DeviceClient, DirectMethodResponse, Message, Registry, RegistryError};
use tether_guest::http::{self, Answer, IncomingRequest};
use tether_guest::{imp, server};

thread_local! {
    /// The client of `/hub/new`: a test agent keeps one; examples pass theirs along.
    static HUB: RefCell<Option<DeviceClient>> = const { RefCell::new(None) };
}

fn start() {
    http::serve(handle);
}

fn hub() -> Option<DeviceClient> {
    HUB.with_borrow(Clone::clone)
}

async fn handle(req: IncomingRequest) -> Answer {
    let q = |k: &str| req.query.get(k).cloned().unwrap_or_default();
    let text = match req.path.as_str() {
        "/sleep" => match imp::sleep(q("s").parse().unwrap_or(0.0)).await {
            Ok(()) => "slept".to_owned(),
            Err(e) => format!("error {e}"),
        },
        "/get" => match http::get(&q("url"), &[]).timeout(q("timeout").parse().unwrap_or(10.0)).send().await {
            Ok(r) => format!("status {} {}", r.statuscode, r.body_text()),
            Err(e) => format!("error {} {e}", e.code()),
        },
        "/hub/new" => {
            let options = ClientOptions { port: q("port").parse().unwrap_or(8883), qos: 1, ..ClientOptions::default() };
            HUB.with_borrow_mut(|h| *h = Some(DeviceClient::new(&q("cs"), options)));
            "ok".to_owned()
        }
        "/registry" => registry_call(&Registry::new(&q("cs")), &q).await.unwrap_or_else(|e| format!("error {} {e}", e.code())),
        path => match hub() {
            None => "no client: /hub/new first".to_owned(),
            Some(hub) => hub_call(&hub, path, &q).await,
        },
    };
    Answer::new(200, text)
}

async fn hub_call(hub: &DeviceClient, path: &str, q: &dyn Fn(&str) -> String) -> String {
    let result = match path {
        "/hub/connect" => hub.connect().await.map(|()| "connected".to_owned()),
        "/hub/send" => hub.send_message(Message::new(q("body"))).await.map(|()| "sent".to_owned()),
        "/hub/twin" => hub.twin().await.map(|t| {
            json!({
                "desired": t.desired.values, "desiredVersion": t.desired.version,
                "reported": t.reported.values, "reportedVersion": t.reported.version,
            })
            .to_string()
        }),
        "/hub/report" => {
            let patch = serde_json::from_str(&q("json")).unwrap_or(Value::Null);
            hub.update_reported(patch).await.map(|()| "reported".to_owned())
        }
        "/hub/desired" => hub
            .on_desired(|d| server::log(format!("desired {} version {:?}", Value::Object(d.values), d.version)))
            .await
            .map(|()| "watching".to_owned()),
        // Each method waits a little, as one asking a device would, then answers with
        // its name and parameters.
        "/hub/methods" => hub
            .on_method(|name, params| async move {
                let _ = imp::sleep(0.05).await;
                DirectMethodResponse::new(201, Some(json!({ "method": name, "params": params })))
            })
            .await
            .map(|()| "methods".to_owned()),
        "/hub/c2d" => hub.on_message(|m| server::log(format!("c2d {}", m.body_text()))).await.map(|()| "c2d".to_owned()),
        "/hub/disconnect" => hub.disconnect().await.map(|()| "disconnected".to_owned()),
        other => return format!("unknown {other}"),
    };
    result.unwrap_or_else(|e| format!("error {} {e}", e.code()))
}

/// One awaited registry call: `op` is create, get, update (with `json`, a device
/// description), list or remove, of device `id`.
async fn registry_call(registry: &Registry, q: &dyn Fn(&str) -> String) -> Result<String, RegistryError> {
    let body = |d: Device| Value::Object(d.body().clone()).to_string();
    Ok(match q("op").as_str() {
        "create" => body(registry.create_device(Device::new(Some(json!({ "deviceId": q("id") })))).await?),
        "get" => body(registry.get_device(&q("id")).await?),
        "update" => body(registry.update_device(Device::new(serde_json::from_str(&q("json")).ok())).await?),
        "list" => registry.list_devices().await?.iter().map(Device::device_id).collect::<Vec<_>>().join(","),
        "remove" => registry.remove_device(&q("id")).await.map(|()| "removed".to_owned())?,
        other => format!("unknown op {other}"),
    })
}

tether_guest::agent!(start);
