//! `DeviceClient`: the async face of [`Client`] (beyond 5.1.0). Every call is an `async fn`
//! returning `Result<_, AzureError>`; handlers of direct methods may be `async` and simply
//! return their response; twins have one type, [`TwinProperties`], for desired and
//! reported alike. Underneath it is the documented [`Client`], so the codes, timeouts,
//! reconnects and outbox are the same; [`DeviceClient::client`] reaches it.
//!
//! ```no_run
//! use serde_json::json;
//! use tether_guest::azure_iot_hub::{AzureError, ClientOptions, DeviceClient, DirectMethodResponse, Message};
//! use tether_guest::{server, task};
//!
//! async fn run() -> Result<(), AzureError> {
//!     let cs = server::config("connection_string").unwrap_or_default();
//!     let hub = DeviceClient::new(&cs, ClientOptions::resilient());
//!     hub.connect().await?;
//!     hub.on_method(|name, _params| async move {
//!         DirectMethodResponse::new(200, Some(json!({ "ran": name })))
//!     })
//!     .await?;
//!     hub.update_reported(json!({ "firmware": "1.2" })).await?;
//!     let twin = hub.twin().await?;
//!     server::log(format!("desired interval: {:?}", twin.desired.values.get("interval")));
//!     hub.send_message(Message::new("22.5")).await
//! }
//!
//! fn start() {
//!     task::spawn(async {
//!         if let Err(e) = run().await {
//!             server::error(format!("{e}"));
//!         }
//!     });
//! }
//! tether_guest::agent!(start);
//! ```

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;


use serde_json::{Map, Value};

use super::{
    Client, ClientOptions, DirectMethodResponse, ERROR_ALREADY_CONNECTED, ERROR_ALREADY_ENABLED, ERROR_GENERAL, ERROR_MESSAGE_TOO_LARGE, ERROR_NOT_CONNECTED,
    ERROR_NOT_ENABLED, ERROR_NOT_REGISTERED, ERROR_OP_NOT_ALLOWED_NOW, ERROR_OP_TIMED_OUT, ERROR_OUTBOX_FULL, Message,
};
use crate::task;

/// Why an async AzureIoTHub call failed: the operation, the code 5.1.0's callbacks would
/// have got, and what it means in words (with the cause of a lost connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct AzureError {
    /// What was being done, e.g. "connect" or "send_message".
    pub operation: &'static str,
    /// An MQTT code, an `ERROR_*`, an HTTP status, or (DPS, registry) the curl number of
    /// a transport failure.
    pub code: i32,
    /// What the code means here, and what to do about it.
    pub message: String,
}

impl AzureError {
    /// A failure of an MQTT operation; `cause` is why the connection failed, if known.
    pub(super) fn mqtt(operation: &'static str, code: i32, cause: Option<String>) -> AzureError {
        let mut message = describe(code);
        if let Some(cause) = cause {
            message = format!("{message} ({cause})");
        }
        AzureError { operation, code, message }
    }

    /// A failure of an HTTPS operation (DPS, registry): `code` is the HTTP status or the
    /// curl number of a transport failure; `detail` what the service said.
    pub(super) fn https(operation: &'static str, code: i32, detail: Option<String>) -> AzureError {
        let message = match code {
            0..=99 => match crate::http::transport_error_of(code as u16) {
                Some(kind) => format!("the request failed (curl {code}); {}", crate::http::advice(kind)),
                None => describe(code),
            },
            _ => describe(code),
        };
        let message = match detail {
            Some(detail) => format!("{message}: {detail}"),
            None => message,
        };
        AzureError { operation, code, message }
    }

    /// The code (as the field; a method like the other error types' `code()`).
    pub fn code(&self) -> i32 {
        self.code
    }
}

/// What an MQTT or library code means, and what to do about it.
fn describe(code: i32) -> String {
    match code {
        -1 => "the connection failed (TCP or TLS); is the hub reachable, and its CA in the host's trusted_ca_files?".into(),
        1 => "IoT Hub refused the MQTT protocol version (CONNACK 1)".into(),
        2 => "IoT Hub refused the client id (CONNACK 2); check DeviceId".into(),
        3 => "IoT Hub is unavailable (CONNACK 3); try again later".into(),
        4 => "bad credentials (CONNACK 4); check the connection string's SharedAccessKey".into(),
        5 => "not authorized (CONNACK 5): a wrong key or certificate, or a disabled or deleted device".into(),
        ERROR_NOT_CONNECTED => "not connected; connect first".into(),
        ERROR_ALREADY_CONNECTED => "already connected".into(),
        ERROR_NOT_ENABLED => "the feature is not enabled".into(),
        ERROR_ALREADY_ENABLED => "the feature is already enabled".into(),
        ERROR_OP_NOT_ALLOWED_NOW => "not allowed now: connecting or disconnecting, or too many requests pending (max_pending_*)".into(),
        ERROR_OP_TIMED_OUT => "no answer in time (twins_timeout, d_methods_timeout)".into(),
        ERROR_MESSAGE_TOO_LARGE => "the message with its properties is over IoT Hub's 256 KB".into(),
        ERROR_OUTBOX_FULL => "the outbox is full (limits.queue_bytes); wait for IoT Hub to take some".into(),
        ERROR_NOT_REGISTERED => "the device is not registered".into(),
        ERROR_GENERAL => "the connection was lost, or the service answered unexpectedly".into(),
        status @ 100..=599 => format!("the service answered HTTP {status}"),
        other => format!("error {other}"),
    }
}

/// A twin section: its `$version` and the application's properties without it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinProperties {
    /// `$version`, when IoT Hub sent one.
    pub version: Option<i64>,
    /// Every property but `$version`.
    pub values: Map<String, Value>,
}

impl TwinProperties {
    fn from_value(value: Option<Value>) -> TwinProperties {
        match value {
            Some(Value::Object(map)) => TwinProperties::from_map(map),
            _ => TwinProperties::default(),
        }
    }

    fn from_map(mut values: Map<String, Value>) -> TwinProperties {
        let version = values.remove("$version").and_then(|v| v.as_i64());
        TwinProperties { version, values }
    }
}

/// A device twin's two sections.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Twin {
    pub desired: TwinProperties,
    pub reported: TwinProperties,
}

type Waiters = RefCell<Vec<task::Sender<i32>>>;
type DesiredHandler = Rc<dyn Fn(TwinProperties)>;

/// What the client's callbacks share with the async calls.
#[derive(Default)]
struct Shared {
    connects: Waiters,
    disconnects: Waiters,
    on_desired: RefCell<Option<DesiredHandler>>,
}

/// An IoT Hub device client with async calls (beyond 5.1.0). Cheap to clone; clones are
/// the same client.
#[derive(Clone)]
pub struct DeviceClient {
    client: Client,
    shared: Rc<Shared>,
}

/// Waits for the code the callback hands over; 1100 if the client went away first.
async fn code_of(rx: task::Receiver<i32>) -> i32 {
    rx.await.unwrap_or(ERROR_GENERAL)
}

/// A one-shot callback `f(code)` and the future of that code.
fn code_callback() -> (impl FnOnce(i32) + 'static, task::Receiver<i32>) {
    let (tx, rx) = task::oneshot();
    (
        move |code| {
            tx.send(code);
        },
        rx,
    )
}

impl DeviceClient {
    /// A client for a device connection string, with [`Client`]'s options.
    pub fn new(connection_string: &str, options: ClientOptions) -> DeviceClient {
        let shared = Rc::new(Shared::default());
        let wake = |waiters: fn(&Shared) -> &Waiters| {
            let shared = Rc::downgrade(&shared);
            move |code: i32| {
                if let Some(shared) = shared.upgrade() {
                    for tx in waiters(&shared).take() {
                        tx.send(code);
                    }
                }
            }
        };
        let client = Client::new(connection_string, wake(|s| &s.connects), wake(|s| &s.disconnects), options);
        DeviceClient { client, shared }
    }

    /// The documented client underneath, e.g. for [`Client::is_connected`] or
    /// [`Client::set_debug`].
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn error(&self, operation: &'static str, code: i32) -> AzureError {
        let cause = matches!(code, -1..=5 | ERROR_GENERAL).then(|| self.client.last_disconnect_cause()).flatten();
        AzureError::mqtt(operation, code, cause)
    }

    fn check(&self, operation: &'static str, code: i32) -> Result<(), AzureError> {
        if code == 0 { Ok(()) } else { Err(self.error(operation, code)) }
    }

    /// Connects. Already connected is not an error, and calls while a connect is under
    /// way wait for its result. With [`ClientOptions::reconnect`], a failure that may
    /// heal is retried before this returns.
    pub async fn connect(&self) -> Result<(), AzureError> {
        if self.client.is_connected() {
            return Ok(());
        }
        let (tx, rx) = task::oneshot();
        let first = {
            let mut waiters = self.shared.connects.borrow_mut();
            waiters.push(tx);
            waiters.len() == 1
        };
        // A second caller would get 1004 (connecting) and wake the first with it.
        if first {
            self.client.connect();
        }
        match code_of(rx).await {
            0 | ERROR_ALREADY_CONNECTED => Ok(()),
            code => Err(self.error("connect", code)),
        }
    }

    /// Disconnects; returns once the connection is closed.
    pub async fn disconnect(&self) -> Result<(), AzureError> {
        if !self.client.is_connected() {
            return Ok(());
        }
        let (tx, rx) = task::oneshot();
        self.shared.disconnects.borrow_mut().push(tx);
        self.client.disconnect();
        let code = code_of(rx).await;
        self.check("disconnect", code)
    }

    /// Sends a device-to-cloud message; returns once it is sent (QoS 0) or IoT Hub has it
    /// (QoS 1), or, with [`ClientOptions::outbox`], once it is kept in the outbox.
    pub async fn send_message(&self, message: Message) -> Result<(), AzureError> {
        let (tx, rx) = task::oneshot();
        self.client.send_message(message, move |code, _| {
            tx.send(code);
        });
        let code = code_of(rx).await;
        self.check("send_message", code)
    }

    /// Enables twins if they are not enabled (5.1.0: `enableTwin`).
    async fn ensure_twin(&self) -> Result<(), AzureError> {
        let shared = Rc::downgrade(&self.shared);
        let (done, rx) = code_callback();
        self.client.enable_twin(
            move |patch| {
                let handler = shared.upgrade().and_then(|s| s.on_desired.borrow().clone());
                if let Some(handler) = handler {
                    handler(TwinProperties::from_map(patch));
                }
            },
            done,
        );
        match code_of(rx).await {
            0 | ERROR_ALREADY_ENABLED => Ok(()),
            code => Err(self.error("enable twin", code)),
        }
    }

    /// The device's twin, both sections (twins are enabled first if need be).
    pub async fn twin(&self) -> Result<Twin, AzureError> {
        self.ensure_twin().await?;
        let (tx, rx) = task::oneshot();
        self.client.retrieve_twin_properties(move |code, reported, desired| {
            tx.send((code, reported, desired));
        });
        let (code, reported, desired) = rx.await.unwrap_or((ERROR_GENERAL, None, None));
        self.check("twin", code)?;
        Ok(Twin { desired: TwinProperties::from_value(desired), reported: TwinProperties::from_value(reported) })
    }

    /// Patches the reported properties with a JSON object (e.g. `json!({"fan": "on"})`).
    pub async fn update_reported(&self, patch: Value) -> Result<(), AzureError> {
        let Value::Object(patch) = patch else {
            return Err(AzureError { operation: "update_reported", code: 400, message: "the patch must be a JSON object".into() });
        };
        self.ensure_twin().await?;
        let (tx, rx) = task::oneshot();
        self.client.update_twin_properties(patch, move |code, _| {
            tx.send(code);
        });
        let code = code_of(rx).await;
        self.check("update_reported", code)
    }

    /// Calls `handler` with each desired-properties patch IoT Hub sends (twins are enabled
    /// first if need be). A later call replaces the handler.
    pub async fn on_desired(&self, handler: impl Fn(TwinProperties) + 'static) -> Result<(), AzureError> {
        *self.shared.on_desired.borrow_mut() = Some(Rc::new(handler));
        self.ensure_twin().await
    }

    /// Answers direct methods with `handler(name, params)`, which may wait for anything
    /// (the device, a web service) before returning the response; it has
    /// `d_methods_timeout` to do so. Returns once IoT Hub routes methods to this device.
    pub async fn on_method<F, Fut>(&self, handler: F) -> Result<(), AzureError>
    where
        F: Fn(String, Option<Value>) -> Fut + 'static,
        Fut: Future<Output = DirectMethodResponse> + 'static,
    {
        let (done, rx) = code_callback();
        self.client.enable_direct_methods(
            move |name, params, reply| {
                let answer = handler(name.clone(), params);
                task::spawn(async move {
                    let response = answer.await;
                    reply.send(response, move |code, _| {
                        if code != 0 {
                            crate::server::error(format!("direct method {name}: the reply was not sent: {}", describe(code)));
                        }
                    });
                });
            },
            done,
        );
        let code = code_of(rx).await;
        self.check("on_method", code)
    }

    /// Calls `handler` with each cloud-to-device message. Returns once IoT Hub delivers
    /// them to this device.
    pub async fn on_message(&self, handler: impl Fn(Message) + 'static) -> Result<(), AzureError> {
        let (done, rx) = code_callback();
        self.client.enable_incoming_messages(handler, done);
        let code = code_of(rx).await;
        self.check("on_message", code)
    }
}
