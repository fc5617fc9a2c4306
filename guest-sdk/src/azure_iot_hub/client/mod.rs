//! `AzureIoTHub.Client`: a device's MQTT connection to IoT Hub, with telemetry,
//! cloud-to-device messages, device twins, direct methods and SAS token auto-refresh.
//!
//! This file is the agent-facing API. The rules behind it (connection states, the
//! documented error codes, pending operations and their timeouts, when a token refresh
//! may start) are in `state`, a state machine without I/O that is unit-tested on the host;
//! `transport` runs that machine over MQTT and timers; `topics` is IoT Hub's topic format.

mod outbox;
mod retry;
mod state;
mod topics;
mod transport;

use std::rc::{Rc, Weak};

use serde_json::{Map, Value};

use super::{
    ConnectionString, DEFAULT_DMETHODS_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MSG_SEND_PARAL_REQS, DEFAULT_QOS, DEFAULT_TOKEN_TTL, DEFAULT_TWIN_UPD_PARAL_REQS, DEFAULT_TWINS_TIMEOUT,
    DirectMethodResponse, ERROR_OP_TIMED_OUT, Message,
};
use state::{Feature, Handler};

pub use retry::Reconnect;

use crate::mqtt::ClientCertificate;

/// Client settings (imp's options table), with the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// MQTT QoS of every publish and subscription: 0 or 1. Default 0.
    pub qos: u8,
    /// MQTT keep-alive, s. Default 60.
    pub keep_alive: u16,
    /// Time for a twin retrieve or update to get its response, s. Default 10.
    pub twins_timeout: u32,
    /// Time allowed to reply to a direct method, s. Default 30.
    pub d_methods_timeout: u32,
    /// Twin updates that may wait for a response at once. Default 3.
    pub max_pending_twin_requests: usize,
    /// Messages that may wait to be sent at once. Default 3.
    pub max_pending_send_requests: usize,
    /// Lifetime of each SAS token, s. Default 86400.
    pub token_ttl: u64,
    /// Renew the token before it expires, reconnecting invisibly. Default true.
    pub token_auto_refresh: bool,
    /// The hub's MQTT port (Tether addition, to reach an emulator). Default 8883.
    pub port: u16,
    /// Reconnect by itself after a lost connection, with exponential backoff and jitter,
    /// enabling again the features that were enabled (beyond 5.1.0). Default `None`: as in
    /// 5.1.0, a lost connection is reported (1100) and the agent decides. With it, the
    /// agent gets `on_disconnected(1100)` at the loss and `on_connected(0)` once the
    /// client is back with its features; a failed first `connect()` is retried too.
    /// Errors that will not heal (bad key, disabled or deleted device: CONNACK 1, 2, 4,
    /// or 5 for a key that never connected) end it with one `on_connected(code)`.
    pub reconnect: Option<Reconnect>,
    /// Keep every message `send_message` accepts in the agent's durable queue of this
    /// name until IoT Hub acknowledges it (beyond 5.1.0). Default `None`. With it, a
    /// message accepted is kept across disconnects, agent crashes and host restarts: it is
    /// sent (at QoS 1, in order, `max_pending_send_requests` at a time) whenever the client
    /// is connected, and `on_sent(0, ..)` is called once IoT Hub has it. `send_message` is
    /// accepted in every state, connected or not. A message without a `$.mid` gets one, so
    /// that one sent again after a crash is recognisable. Refused with
    /// [`ERROR_OUTBOX_FULL`](crate::azure_iot_hub::ERROR_OUTBOX_FULL) when the queue quota
    /// is used up. Use one name per client.
    pub outbox: Option<String>,
    /// Authenticate with this X.509 certificate instead of a SAS token (beyond 5.1.0,
    /// which has only keys). Default `None`. Use it with the connection string IoT Hub
    /// gives X.509 devices, `HostName=...;DeviceId=...;x509=true`: the device's
    /// registry entry holds the certificate's thumbprint (self-signed) or the device
    /// certificate is signed by a CA verified in the hub (CA-signed). No token is made
    /// or refreshed; `token_ttl` and `token_auto_refresh` do not apply.
    pub client_certificate: Option<ClientCertificate>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            qos: DEFAULT_QOS,
            keep_alive: DEFAULT_KEEP_ALIVE,
            twins_timeout: DEFAULT_TWINS_TIMEOUT,
            d_methods_timeout: DEFAULT_DMETHODS_TIMEOUT,
            max_pending_twin_requests: DEFAULT_TWIN_UPD_PARAL_REQS,
            max_pending_send_requests: DEFAULT_MSG_SEND_PARAL_REQS,
            token_ttl: DEFAULT_TOKEN_TTL,
            token_auto_refresh: true,
            port: 8883,
            reconnect: None,
            outbox: None,
            client_certificate: None,
        }
    }
}

impl ClientOptions {
    /// The recommended settings (beyond 5.1.0): QoS 1, reconnecting by itself with the
    /// default backoff, and the durable outbox `azure-iot-hub`. 5.1.0's defaults otherwise.
    pub fn resilient() -> ClientOptions {
        ClientOptions { qos: 1, reconnect: Some(Reconnect::default()), outbox: Some("azure-iot-hub".into()), ..ClientOptions::default() }
    }
}

/// A device's connection to Azure IoT Hub. Clones share the connection.
///
/// ```no_run
/// use tether_guest::azure_iot_hub::{Client, ClientOptions, Message};
/// use tether_guest::server;
///
/// let client = Client::new(
///     "HostName=myhub.azure-devices.net;DeviceId=dev1;SharedAccessKey=a2V5",
///     |err| if err != 0 { server::error(format!("connect failed: {err}")) },
///     |err| if err != 0 { server::error(format!("disconnected: {err}")) },
///     ClientOptions::default(),
/// );
/// let c = client.clone();
/// client.connect();
/// // later, once connected:
/// c.send_message(Message::new("hello"), |err, _msg| server::log(format!("sent: {err}")));
/// ```
#[derive(Clone)]
pub struct Client(Rc<transport::Inner>);

/// Replies to one direct method call (the `reply` function of imp's `onMethod`).
pub struct MethodReply {
    client: Weak<transport::Inner>,
    rid: String,
}

impl Client {
    /// A client for a device connection string (imp: `AzureIoTHub.Client(...)`).
    /// `on_connected` gets each connect result (0 = connected); `on_disconnected` gets 0
    /// after [`Client::disconnect`], otherwise an error code (1100 for a lost connection).
    pub fn new(connection_string: &str, on_connected: impl Fn(i32) + 'static, on_disconnected: impl Fn(i32) + 'static, options: ClientOptions) -> Client {
        transport::new_client(ConnectionString::parse(connection_string), Box::new(on_connected), Box::new(on_disconnected), options)
    }

    /// Enables or disables debug logging (imp: `setDebug`).
    pub fn set_debug(&self, value: bool) {
        self.0.debug.set(value);
    }

    /// Whether the client is connected (imp: `isConnected`).
    pub fn is_connected(&self) -> bool {
        self.machine().is_connected()
    }

    /// Messages in the outbox that IoT Hub has not acknowledged yet (0 without
    /// [`ClientOptions::outbox`]). Beyond 5.1.0.
    pub fn outbox_len(&self) -> usize {
        self.0.outbox.as_ref().map_or(0, |o| o.borrow().len())
    }

    /// Why the last connect attempt failed or the connection was lost, in words (e.g.
    /// "keep-alive timeout: the broker did not answer a ping"); `None` if it did not.
    /// Beyond 5.1.0, whose callbacks give only a code.
    pub fn last_disconnect_cause(&self) -> Option<String> {
        self.0.mqtt.last_error()
    }

    /// Opens the connection; the result goes to `on_connected`: 1001 if already
    /// connected, 1004 if connecting.
    pub fn connect(&self) {
        self.open()
    }

    /// Closes the connection; `on_disconnected(0)` follows. No effect when already
    /// disconnected or disconnecting. While connecting, the connection is closed as soon
    /// as it is established, and `on_connected` is not called.
    pub fn disconnect(&self) {
        self.close()
    }

    /// Sends a device-to-cloud message; `on_sent(err, message)` reports the outcome
    /// (0, an MQTT code, 1000, 1004 when `max_pending_send_requests` are in flight, 1006
    /// when it is over 256 KB with its properties). With [`ClientOptions::outbox`], see
    /// there.
    pub fn send_message(&self, message: Message, on_sent: impl FnOnce(i32, Message) + 'static) {
        self.send_boxed(message, Box::new(on_sent))
    }

    /// Starts receiving cloud-to-device messages; `on_done` gets 0, an MQTT code, or
    /// 1000/1003/1004.
    ///
    /// For one connection only: the client connects with a clean MQTT session, whose
    /// subscriptions end with it. After a [`Client::disconnect`] or a lost connection
    /// (`on_disconnected`), no message arrives until this is called again, once
    /// `on_connected(0)` has come. With [`ClientOptions::reconnect`], a connection the
    /// client restores by itself comes back receiving, before its `on_connected(0)`; a
    /// `disconnect()`, or a reconnect that gives up (`on_connected(code)`), still ends it. A SAS token refresh reconnects invisibly and keeps it.
    pub fn enable_incoming_messages(&self, on_receive: impl Fn(Message) + 'static, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Messages, Some(Handler::Messages(Rc::new(on_receive))), Box::new(on_done))
    }

    /// Stops receiving cloud-to-device messages (imp: `enableIncomingMessages(null, onDone)`).
    pub fn disable_incoming_messages(&self, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Messages, None, Box::new(on_done))
    }

    /// Enables device twins; `on_request` gets each desired-properties patch (with `$version`).
    ///
    /// For one connection only: the client connects with a clean MQTT session, whose
    /// subscriptions end with it. After a [`Client::disconnect`] or a lost connection
    /// (`on_disconnected`), twins are disabled (no patch arrives; a retrieve or an update
    /// gets 1002) until this is called again, once `on_connected(0)` has come. With
    /// [`ClientOptions::reconnect`], a connection the client restores by itself comes back
    /// with twins enabled, before its `on_connected(0)`; a `disconnect()`, or a reconnect
    /// that gives up (`on_connected(code)`), still disables them. A SAS token refresh reconnects invisibly and keeps them.
    pub fn enable_twin(&self, on_request: impl Fn(Map<String, Value>) + 'static, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Twin, Some(Handler::Twin(Rc::new(on_request))), Box::new(on_done))
    }

    /// Disables device twins (imp: `enableTwin(null, onDone)`).
    pub fn disable_twin(&self, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Twin, None, Box::new(on_done))
    }

    /// Enables direct methods; `on_method(name, params, reply)` gets each call, to be
    /// answered with [`MethodReply::send`] within `d_methods_timeout`.
    ///
    /// For one connection only: the client connects with a clean MQTT session, whose
    /// subscriptions end with it. After a [`Client::disconnect`] or a lost connection
    /// (`on_disconnected`), no call arrives until this is called again, once
    /// `on_connected(0)` has come. With [`ClientOptions::reconnect`], a connection the
    /// client restores by itself comes back with direct methods enabled, before its
    /// `on_connected(0)`; a `disconnect()`, or a reconnect that gives up
    /// (`on_connected(code)`), still disables them. A SAS token refresh reconnects
    /// invisibly and keeps them.
    pub fn enable_direct_methods(&self, on_method: impl Fn(String, Option<Value>, MethodReply) + 'static, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Methods, Some(Handler::Methods(Rc::new(on_method))), Box::new(on_done))
    }

    /// Disables direct methods (imp: `enableDirectMethods(null, onDone)`).
    pub fn disable_direct_methods(&self, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Methods, None, Box::new(on_done))
    }

    /// Retrieves the twin; `on_retrieved(err, reported, desired)` (1002 if twins are not
    /// enabled, 1004 if a retrieve is pending, 1005 after `twins_timeout`).
    pub fn retrieve_twin_properties(&self, on_retrieved: impl FnOnce(i32, Option<Value>, Option<Value>) + 'static) {
        self.retrieve_boxed(Box::new(on_retrieved))
    }

    /// Updates reported properties, a table (`serde_json::Map`) or a `json!({..})`
    /// object; `on_updated(err, props)` (1004 when `max_pending_twin_requests` are
    /// pending, 1005 after `twins_timeout`, or IoT Hub's status such as 400; 400 at once,
    /// with empty props, for JSON that is not an object).
    ///
    /// ```no_run
    /// # fn f(client: &tether_guest::azure_iot_hub::Client) {
    /// client.update_twin_properties(serde_json::json!({ "firmware": "1.2" }), |err, _| {
    ///     tether_guest::server::log(format!("reported: {err}"));
    /// });
    /// # }
    /// ```
    pub fn update_twin_properties(&self, properties: impl Into<Value>, on_updated: impl FnOnce(i32, Map<String, Value>) + 'static) {
        match properties.into() {
            Value::Object(properties) => self.update_boxed(properties, Box::new(on_updated)),
            // IoT Hub's answer to such a patch.
            _ => on_updated(400, Map::new()),
        }
    }
}

impl MethodReply {
    /// Sends the response; `on_reply_sent(err, response)` gets 0, an MQTT code, or 1005 if
    /// the call is older than `d_methods_timeout` (or was answered already).
    pub fn send(self, response: DirectMethodResponse, on_reply_sent: impl FnOnce(i32, DirectMethodResponse) + 'static) {
        match self.client.upgrade() {
            Some(inner) => Client(inner).reply(self.rid, response, Box::new(on_reply_sent)),
            None => on_reply_sent(ERROR_OP_TIMED_OUT, response),
        }
    }
}
