//! `AzureIoTHub.Registry`: device identities over IoT Hub's REST API.

use std::cell::RefCell;

use serde_json::{Map, Value};

use super::{API_VERSION, ConnectionString, Device, SharedAccessSignature};
use crate::{http, imp};

/// A failed registry request (imp's `{response, message}` error table).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RegistryError {
    /// The HTTP response, when one arrived; `None` for errors found before sending. A
    /// request that got no HTTP answer has the curl number as its `statuscode`.
    pub response: Option<http::Response>,
    /// IoT Hub's `Message` from the error body, or `Error <status>`; for a request that
    /// got no answer, what happened and what to do (beyond imp, which said `Error 35`).
    pub message: String,
}

impl RegistryError {
    /// The HTTP status, the curl number of a transport failure, or 0 for an error found
    /// before sending.
    pub fn code(&self) -> u16 {
        self.response.as_ref().map_or(0, |r| r.statuscode)
    }
}

/// imp's message for a missing device id.
pub const ERROR_MISSING_DEVICE_ID: &str = "A deviceId string required to complete request";
/// imp's message for update without a device id.
pub const ERROR_MISSING_DEVICE_INFO: &str = "A table with a deviceId key required to complete request";

/// Manages device identities with a shared access policy's connection string
/// (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`). A `HostName` with a port
/// (`localhost:8443`) reaches an emulator.
pub struct Registry {
    host: String,
    hub_name: String,
    key_name: String,
    key: String,
    token: RefCell<Option<(String, u64)>>,
}

impl Registry {
    /// A registry client (imp: `AzureIoTHub.Registry(connectionString)`). An incomplete
    /// connection string makes every request fail with a message saying what is missing.
    pub fn new(connection_string: &str) -> Registry {
        let cs = ConnectionString::parse(connection_string);
        let host = cs.host_name.unwrap_or_default();
        Registry {
            hub_name: host.split('.').next().unwrap_or_default().to_owned(),
            host,
            key_name: cs.shared_access_key_name.unwrap_or_default(),
            key: cs.shared_access_key.unwrap_or_default(),
            token: RefCell::new(None),
        }
    }

    /// A fresh one-hour token, reused until it expires.
    fn authorization(&self) -> Result<String, RegistryError> {
        if self.host.is_empty() || self.key_name.is_empty() || self.key.is_empty() {
            return Err(early("the connection string needs HostName, SharedAccessKeyName and SharedAccessKey"));
        }
        let now = imp::time();
        if let Some((token, expiry)) = &*self.token.borrow()
            && now < *expiry
        {
            return Ok(token.clone());
        }
        let expiry = now + 3600;
        let sas = SharedAccessSignature::new(&self.host, Some(&self.key_name), &self.key, expiry).map_err(|e| early(&e.to_string()))?;
        let token = sas.to_string();
        *self.token.borrow_mut() = Some((token.clone(), expiry));
        Ok(token)
    }

    fn send(&self, method: &str, path: &str, body: Option<&Map<String, Value>>, if_match: Option<&str>, done: impl FnOnce(Result<http::Response, RegistryError>) + 'static) {
        let auth = match self.authorization() {
            Ok(auth) => auth,
            Err(e) => return later(move || done(Err(e))),
        };
        let mut headers = vec![("Authorization", auth.as_str()), ("iothub-name", self.hub_name.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json; charset=utf-8"));
        }
        if let Some(tag) = if_match {
            headers.push(("If-Match", tag));
        }
        let body = body.map(|b| Value::Object(b.clone()).to_string()).unwrap_or_default();
        let url = format!("https://{}{path}?api-version={API_VERSION}", self.host);
        http::request(method, &url, &headers, body).send_async(move |response| {
            if response.statuscode / 100 == 2 {
                done(Ok(response))
            } else {
                let message = match (response.error, &response.error_message) {
                    (Some(kind), Some(what)) => format!("{what}; {}", http::advice(kind)),
                    _ => serde_json::from_slice::<Value>(&response.body)
                        .ok()
                        .and_then(|v| v.get("Message").and_then(Value::as_str).map(str::to_owned))
                        .unwrap_or_else(|| format!("Error {}", response.statuscode)),
                };
                done(Err(RegistryError { response: Some(response), message }))
            }
        });
    }

    /// Creates a device identity; without `device`, one with the agent's id and defaults.
    pub fn create(&self, device: Option<Device>, done: impl FnOnce(Result<Device, RegistryError>) + 'static) {
        let device = device.unwrap_or_else(|| Device::new(None));
        let path = format!("/devices/{}", super::shared_access_signature::encode_uri(device.device_id()));
        self.send("PUT", &path, Some(device.body()), None, move |r| done(r.and_then(device_from)));
    }

    /// Updates a device identity (read-only properties cannot change). A device that
    /// carries an `etag` (as `get` returns it) is updated only if unchanged since, else
    /// IoT Hub answers 412; without one the update is unconditional (`If-Match: *`).
    pub fn update(&self, device: Device, done: impl FnOnce(Result<Device, RegistryError>) + 'static) {
        if device.device_id().is_empty() {
            return later(move || done(Err(early(ERROR_MISSING_DEVICE_INFO))));
        }
        let path = format!("/devices/{}", super::shared_access_signature::encode_uri(device.device_id()));
        let etag = match device.body().get("etag").and_then(Value::as_str).filter(|e| !e.is_empty()) {
            Some(e) if e.starts_with('"') => e.to_owned(),
            Some(e) => format!("\"{e}\""),
            None => "*".to_owned(),
        };
        self.send("PUT", &path, Some(device.body()), Some(&etag), move |r| done(r.and_then(device_from)));
    }

    /// Deletes a device identity.
    pub fn remove(&self, device_id: &str, done: impl FnOnce(Result<(), RegistryError>) + 'static) {
        if device_id.is_empty() {
            return later(move || done(Err(early(ERROR_MISSING_DEVICE_ID))));
        }
        let path = format!("/devices/{}", super::shared_access_signature::encode_uri(device_id));
        self.send("DELETE", &path, None, Some("*"), move |r| done(r.map(|_| ())));
    }

    /// Reads a device identity.
    pub fn get(&self, device_id: &str, done: impl FnOnce(Result<Device, RegistryError>) + 'static) {
        if device_id.is_empty() {
            return later(move || done(Err(early(ERROR_MISSING_DEVICE_ID))));
        }
        let path = format!("/devices/{}", super::shared_access_signature::encode_uri(device_id));
        self.send("GET", &path, None, None, move |r| done(r.and_then(device_from)));
    }

    /// Lists up to 1000 device identities.
    pub fn list(&self, done: impl FnOnce(Result<Vec<Device>, RegistryError>) + 'static) {
        self.send("GET", "/devices/", None, None, move |r| {
            done(r.and_then(|response| match serde_json::from_slice::<Value>(&response.body) {
                Ok(Value::Array(items)) => Ok(items
                    .into_iter()
                    .filter_map(|item| match item {
                        Value::Object(body) => Some(Device::from_body(body)),
                        _ => None,
                    })
                    .collect()),
                _ => Err(RegistryError { message: "the device list is not a JSON array".into(), response: Some(response) }),
            }))
        });
    }
}

/// The async face of the registry (beyond imp): the same requests, awaited.
///
/// ```no_run
/// use serde_json::json;
/// use tether_guest::azure_iot_hub::{Device, Registry, RegistryError};
/// # async fn f() -> Result<(), RegistryError> {
/// let registry = Registry::new("HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5");
/// let device = registry.create_device(Device::new(Some(json!({"deviceId": "sensor-1"})))).await?;
/// tether_guest::server::log(device.connection_string("localhost"));
/// for device in registry.list_devices().await? {
///     tether_guest::server::log(device.device_id());
/// }
/// registry.remove_device("sensor-1").await
/// # }
/// ```
impl Registry {
    /// Creates a device identity ([`Registry::create`], awaited).
    pub async fn create_device(&self, device: Device) -> Result<Device, RegistryError> {
        awaited(|done| self.create(Some(device), done)).await
    }

    /// Updates a device identity, conditionally on its `etag` if it has one
    /// ([`Registry::update`], awaited).
    pub async fn update_device(&self, device: Device) -> Result<Device, RegistryError> {
        awaited(|done| self.update(device, done)).await
    }

    /// Reads a device identity ([`Registry::get`], awaited).
    pub async fn get_device(&self, device_id: &str) -> Result<Device, RegistryError> {
        awaited(|done| self.get(device_id, done)).await
    }

    /// Lists up to 1000 device identities ([`Registry::list`], awaited).
    pub async fn list_devices(&self) -> Result<Vec<Device>, RegistryError> {
        awaited(|done| self.list(done)).await
    }

    /// Deletes a device identity ([`Registry::remove`], awaited).
    pub async fn remove_device(&self, device_id: &str) -> Result<(), RegistryError> {
        awaited(|done| self.remove(device_id, done)).await
    }
}

/// Starts a callback request and waits for what its callback gets.
async fn awaited<T: 'static>(start: impl FnOnce(Box<dyn FnOnce(Result<T, RegistryError>)>)) -> Result<T, RegistryError> {
    let (tx, rx) = crate::task::oneshot();
    start(Box::new(move |result| {
        tx.send(result);
    }));
    // The callback is only dropped uncalled when the agent is ending.
    rx.await.unwrap_or_else(|| Err(early("the agent is ending")))
}

fn device_from(response: http::Response) -> Result<Device, RegistryError> {
    match serde_json::from_slice::<Value>(&response.body) {
        Ok(Value::Object(body)) => Ok(Device::from_body(body)),
        _ => Err(RegistryError { message: "the device description is not a JSON object".into(), response: Some(response) }),
    }
}

fn early(message: &str) -> RegistryError {
    RegistryError { response: None, message: message.to_owned() }
}

/// Runs `f` during a later event, so callbacks never run inside the call that set them up.
pub(super) fn later(f: impl FnOnce() + 'static) {
    imp::wakeup(0.0, f);
}
