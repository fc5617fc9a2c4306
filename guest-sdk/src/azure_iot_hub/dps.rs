//! `AzureIoTHub.DPS`: provisioning with a symmetric key through the Device Provisioning
//! Service's REST API.

use std::rc::Rc;

use serde_json::{Value, json};

use super::shared_access_signature::encode_uri;
use super::{AzureError, DPS_API_VERSION, ERROR_GENERAL, ERROR_NOT_REGISTERED, SharedAccessSignature};
use crate::{http, imp, server};

/// Azure's global provisioning endpoint, the default.
pub const DEFAULT_DPS_ENDPOINT: &str = "https://global.azure-devices-provisioning.net";
/// Delay between status polls when DPS gives no Retry-After, s.
const DEFAULT_DELAY: f64 = 3.0;

struct Inner {
    scope_id: String,
    registration_id: String,
    device_key: String,
    endpoint: String,
}

/// What [`Dps::provision`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// `HostName=...;DeviceId=...;SharedAccessKey=...`.
    pub connection_string: String,
    /// Whether this call registered the device (DPS did not know it before).
    pub registered: bool,
}

/// A device's provisioning client.
#[derive(Clone)]
pub struct Dps(Rc<Inner>);

/// The outcome of a DPS operation: error code (0 = success), the response body if any,
/// and on success the device connection string (imp's `onCompleted(err, resp, connStr)`).
pub type OnCompleted = Box<dyn FnOnce(i32, Option<Value>, Option<String>)>;

impl Dps {
    /// A client for `registration_id` in scope `scope_id` with its symmetric `device_key`
    /// (for a group enrollment, derive it with [`super::derive_device_key`]).
    pub fn new(scope_id: &str, registration_id: &str, device_key: &str) -> Dps {
        Dps(Rc::new(Inner {
            scope_id: scope_id.to_owned(),
            registration_id: registration_id.to_owned(),
            device_key: device_key.to_owned(),
            endpoint: DEFAULT_DPS_ENDPOINT.to_owned(),
        }))
    }

    /// Talks to another provisioning endpoint (e.g. the local emulator's
    /// `https://localhost:8443`, or just `localhost:8443`) instead of Azure's global one.
    pub fn with_endpoint(self, endpoint: &str) -> Dps {
        let inner = &self.0;
        let endpoint = if endpoint.contains("://") { endpoint.to_owned() } else { format!("https://{endpoint}") };
        Dps(Rc::new(Inner {
            scope_id: inner.scope_id.clone(),
            registration_id: inner.registration_id.clone(),
            device_key: inner.device_key.clone(),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
        }))
    }

    /// Registers the device and, once DPS has assigned it to a hub, passes its connection
    /// string to `on_completed`. Polls the operation, honouring Retry-After and 429.
    ///
    /// ```no_run
    /// use tether_guest::{azure_iot_hub::Dps, server};
    /// Dps::new("0ne00000000", "my-device", "a2V5").register(|err, _resp, cs| match cs {
    ///     Some(cs) => server::log(format!("provisioned: {cs}")),
    ///     None => server::error(format!("provisioning failed: {err}")),
    /// });
    /// ```
    pub fn register(&self, on_completed: impl FnOnce(i32, Option<Value>, Option<String>) + 'static) {
        let dps = self.clone();
        let url = self.url("/register");
        self.send("PUT", &url, Box::new(on_completed), move |status, body, _, done| match status {
            200 | 202 => match body.as_ref().and_then(|b| b.get("operationId")).and_then(Value::as_str) {
                Some(op) => dps.poll(op.to_owned(), done),
                None => {
                    server::error(format!("DPS: no operationId in the registration response: {body:?}"));
                    done(ERROR_GENERAL, body, None)
                }
            },
            _ => done(i32::from(status), body, None),
        });
    }

    fn poll(&self, operation: String, on_completed: OnCompleted) {
        let dps = self.clone();
        let url = self.url(&format!("/operations/{}", encode_uri(&operation)));
        self.send("GET", &url, on_completed, move |status, body, retry_after, done| {
            let again = move |dps: Dps, done: OnCompleted| {
                imp::wakeup(retry_after.unwrap_or(DEFAULT_DELAY), move || dps.poll(operation, done));
            };
            match status {
                200 | 202 => match body.as_ref().and_then(|b| b.get("status")).and_then(Value::as_str) {
                    None => done(ERROR_GENERAL, body, None),
                    Some("assigned") => {
                        let state = body.as_ref().and_then(|b| b.get("registrationState"));
                        match dps.connection_string(state) {
                            Some(cs) => done(0, body, Some(cs)),
                            None => {
                                server::error("DPS: registrationState.assignedHub missing in an assigned registration");
                                done(ERROR_GENERAL, body, None)
                            }
                        }
                    }
                    Some("assigning") | Some("unassigned") => again(dps, done),
                    Some(_) => done(ERROR_NOT_REGISTERED, body, None),
                },
                429 => again(dps, done),
                _ => done(i32::from(status), body, None),
            }
        });
    }

    /// Passes the connection string of an already assigned device to `on_completed`, or
    /// [`ERROR_NOT_REGISTERED`] (1010) if it is not registered.
    pub fn get_connection_string(&self, on_completed: impl FnOnce(i32, Option<Value>, Option<String>) + 'static) {
        let dps = self.clone();
        let url = self.url("");
        self.send("POST", &url, Box::new(on_completed), move |status, body, _, done| match status {
            200 => match body.as_ref().and_then(|b| b.get("status")).and_then(Value::as_str) {
                None => done(ERROR_GENERAL, body, None),
                Some("assigned") => match dps.connection_string(body.as_ref()) {
                    Some(cs) => done(0, body, Some(cs)),
                    None => done(ERROR_GENERAL, body, None),
                },
                Some(_) => done(ERROR_NOT_REGISTERED, body, None),
            },
            404 => done(ERROR_NOT_REGISTERED, body, None),
            _ => done(i32::from(status), body, None),
        });
    }

    /// The device's connection string (beyond 5.1.0: the async form of
    /// [`Dps::get_connection_string`], then [`Dps::register`] if DPS does not know the
    /// device yet).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), tether_guest::azure_iot_hub::AzureError> {
    /// use tether_guest::azure_iot_hub::Dps;
    /// let provisioned = Dps::new("0ne00000000", "my-device", "a2V5").provision().await?;
    /// tether_guest::server::log(format!("registered now: {}", provisioned.registered));
    /// # Ok(()) }
    /// ```
    pub async fn provision(&self) -> Result<Provisioned, AzureError> {
        let lookup = |dps: &Dps, on_completed: OnCompleted| dps.get_connection_string(on_completed);
        match self.complete("dps lookup", lookup).await {
            Ok(connection_string) => Ok(Provisioned { connection_string, registered: false }),
            Err(e) if e.code == ERROR_NOT_REGISTERED => {
                let register = |dps: &Dps, on_completed: OnCompleted| dps.register(on_completed);
                let connection_string = self.complete("dps register", register).await?;
                Ok(Provisioned { connection_string, registered: true })
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a callback operation to its connection string, or its error.
    async fn complete(&self, operation: &'static str, start: impl FnOnce(&Dps, OnCompleted)) -> Result<String, AzureError> {
        let (tx, rx) = crate::task::oneshot();
        start(self, Box::new(move |code, body, cs| {
            tx.send((code, body, cs));
        }));
        let (code, body, cs) = rx.await.unwrap_or((ERROR_GENERAL, None, None));
        match cs {
            Some(cs) if code == 0 => Ok(cs),
            _ => {
                let detail = body.as_ref().and_then(|b| b.get("message")).and_then(Value::as_str).map(str::to_owned);
                Err(AzureError::https(operation, code, detail))
            }
        }
    }

    fn url(&self, suffix: &str) -> String {
        let i = &self.0;
        format!("{}/{}/registrations/{}{suffix}?api-version={DPS_API_VERSION}", i.endpoint, encode_uri(&i.scope_id), encode_uri(&i.registration_id))
    }

    /// `HostName=<assignedHub>;DeviceId=<deviceId>;SharedAccessKey=<key>` from a registration state.
    fn connection_string(&self, state: Option<&Value>) -> Option<String> {
        let state = state?;
        let hub = state.get("assignedHub").and_then(Value::as_str).filter(|h| !h.is_empty())?;
        let device = state.get("deviceId").and_then(Value::as_str).unwrap_or(&self.0.registration_id);
        Some(format!("HostName={hub};DeviceId={device};SharedAccessKey={}", self.0.device_key))
    }

    /// Sends one request with a fresh one-hour token; `next` gets the status, the JSON body,
    /// the Retry-After delay and the completion callback.
    fn send(&self, method: &str, url: &str, done: OnCompleted, next: impl FnOnce(u16, Option<Value>, Option<f64>, OnCompleted) + 'static) {
        let i = &self.0;
        let resource = encode_uri(&format!("{}/registrations/{}", i.scope_id, i.registration_id));
        let token = match SharedAccessSignature::new(&resource, Some("registration"), &i.device_key, imp::time() + 3600) {
            Ok(sas) => sas.to_string(),
            Err(e) => {
                server::error(format!("DPS: {e}"));
                return super::registry::later(move || done(ERROR_GENERAL, None, None));
            }
        };
        let headers = [
            ("Accept", "application/json"),
            ("Content-Type", "application/json; charset=utf-8"),
            ("User-Agent", "prov_device_client/1.0"),
            ("Authorization", token.as_str()),
        ];
        let body = json!({ "registrationId": i.registration_id }).to_string();
        http::request(method, url, &headers, body).send_async(move |response| {
            let body = if response.body.is_empty() {
                None
            } else {
                match serde_json::from_slice::<Value>(&response.body) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        server::error(format!("DPS: response body is not valid JSON: {}", response.body_text()));
                        None
                    }
                }
            };
            let retry_after = response.headers.get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0);
            next(response.statuscode, body, retry_after, done)
        });
    }
}
