//! `AzureIoTHub.Client`: a device's MQTT connection to IoT Hub, with telemetry,
//! cloud-to-device messages, device twins, direct methods and SAS token auto-refresh.

use std::cell::{RefCell, RefMut};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::OnceLock;
use std::time::Instant;

use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use super::shared_access_signature::encode_uri;
use super::*;
use crate::mqtt::{self, ConnectOptions, MessageOptions};
use crate::{imp, server};

const TWIN_RES: &str = "$iothub/twin/res/";
const TWIN_GET: &str = "$iothub/twin/GET/";
const TWIN_REPORTED: &str = "$iothub/twin/PATCH/properties/reported/";
const TWIN_DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";
const METHOD_POST: &str = "$iothub/methods/POST/";
const METHOD_RES: &str = "$iothub/methods/res/";

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
        }
    }
}

type Done = Box<dyn FnOnce(i32)>;
type OnSent = Box<dyn FnOnce(i32, Message)>;
type OnRetrieved = Box<dyn FnOnce(i32, Option<Value>, Option<Value>)>;
type OnUpdated = Box<dyn FnOnce(i32, Map<String, Value>)>;
type OnReplySent = Box<dyn FnOnce(i32, DirectMethodResponse)>;
type OnMethod = Rc<dyn Fn(String, Option<Value>, MethodReply)>;
type Deferred = Box<dyn FnOnce(&Client)>;

/// The optional features, each enabled by subscribing to its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feature {
    Messages = 0,
    Twin = 1,
    Methods = 2,
}

struct TwinGet {
    rid: String,
    done: OnRetrieved,
    sent_at: Option<f64>,
}

struct TwinUpdate {
    props: Map<String, Value>,
    done: OnUpdated,
    sent_at: Option<f64>,
}

struct MethodCall {
    received_at: f64,
    reply: Option<(DirectMethodResponse, OnReplySent)>,
}

#[derive(Default)]
struct State {
    connected: bool,
    connecting: bool,
    disconnecting: bool,
    refreshing: bool,
    should_disconnect: bool,
    refresh_paused: bool,
    password: String,
    token_expires_at: u64,
    on_message: Option<Rc<dyn Fn(Message)>>,
    on_twin: Option<Rc<dyn Fn(Map<String, Value>)>>,
    on_method: Option<OnMethod>,
    enabling: [Option<Done>; 3],
    next_send: u64,
    sending: HashMap<u64, (Message, OnSent)>,
    twin_get: Option<TwinGet>,
    twin_updates: BTreeMap<u64, TwinUpdate>,
    methods: HashMap<String, MethodCall>,
    pending_calls: VecDeque<Deferred>,
    req_num: u64,
    refresh_timer: Option<imp::Timer>,
    queue_timer: Option<imp::Timer>,
    debug: bool,
}

impl State {
    fn enabled(&self, f: Feature) -> bool {
        match f {
            Feature::Messages => self.on_message.is_some(),
            Feature::Twin => self.on_twin.is_some(),
            Feature::Methods => self.on_method.is_some(),
        }
    }

    /// Two-phase operations and sends in flight: a token refresh waits for them.
    fn busy(&self) -> bool {
        self.enabling.iter().any(Option::is_some)
            || !self.sending.is_empty()
            || self.twin_get.is_some()
            || !self.twin_updates.is_empty()
            || !self.methods.is_empty()
            || self.refreshing
    }

    /// The error for an operation while not (fully) connected, if any.
    fn not_ready(&self) -> Option<i32> {
        if self.connecting && !self.connected {
            // Documented as 1004 ("the connection is still being established"); 5.1.0's
            // code answered 1000 here.
            Some(ERROR_OP_NOT_ALLOWED_NOW)
        } else if !self.connected {
            Some(ERROR_NOT_CONNECTED)
        } else if self.disconnecting {
            Some(ERROR_OP_NOT_ALLOWED_NOW)
        } else {
            None
        }
    }
}

struct Inner {
    host: String,
    device_id: String,
    key: String,
    options: ClientOptions,
    mqtt: mqtt::Client,
    on_connected: Box<dyn Fn(i32)>,
    on_disconnected: Box<dyn Fn(i32)>,
    state: RefCell<State>,
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
pub struct Client(Rc<Inner>);

/// Replies to one direct method call (the `reply` function of imp's `onMethod`).
pub struct MethodReply {
    client: Weak<Inner>,
    rid: String,
}

fn now() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

impl Client {
    /// A client for a device connection string (imp: `AzureIoTHub.Client(...)`).
    /// `on_connected` gets each connect result (0 = connected); `on_disconnected` gets 0
    /// after [`Client::disconnect`], otherwise an error code (1100 for a lost connection).
    pub fn new(connection_string: &str, on_connected: impl Fn(i32) + 'static, on_disconnected: impl Fn(i32) + 'static, options: ClientOptions) -> Client {
        let cs = ConnectionString::parse(connection_string);
        let inner = Rc::new(Inner {
            host: cs.host_name.unwrap_or_default(),
            device_id: cs.device_id.unwrap_or_default(),
            key: cs.shared_access_key.unwrap_or_default(),
            options,
            mqtt: mqtt::create_client(),
            on_connected: Box::new(on_connected),
            on_disconnected: Box::new(on_disconnected),
            state: RefCell::new(State::default()),
        });
        // Weak: the MQTT client's handlers live inside `inner` and must not keep it alive.
        let weak = Rc::downgrade(&inner);
        let w = weak.clone();
        inner.mqtt.on_connect(move |code| with(&w, |c| c.mqtt_connected(code)));
        let w = weak.clone();
        inner.mqtt.on_connection_lost(move |_| with(&w, |c| c.mqtt_disconnected()));
        let w = weak;
        inner.mqtt.on_message(move |m| with(&w, |c| c.mqtt_message(m)));
        Client(inner)
    }

    fn st(&self) -> RefMut<'_, State> {
        self.0.state.borrow_mut()
    }

    fn debug(&self, text: impl AsRef<str>) {
        if self.0.state.borrow().debug {
            server::log(format!("[AzureIoTHubMQTTClient] {}", text.as_ref()));
        }
    }

    fn error(&self, text: impl AsRef<str>) {
        server::error(format!("[AzureIoTHubMQTTClient] {}", text.as_ref()));
    }

    /// Enables or disables debug logging (imp: `setDebug`).
    pub fn set_debug(&self, value: bool) {
        self.st().debug = value;
    }

    /// Whether the client is connected (imp: `isConnected`).
    pub fn is_connected(&self) -> bool {
        self.0.state.borrow().connected
    }

    /// Opens the connection; the result goes to `on_connected`: 1001 if already
    /// connected, 1004 if connecting.
    pub fn connect(&self) {
        let busy = {
            let s = self.0.state.borrow();
            if s.connected {
                Some(ERROR_ALREADY_CONNECTED)
            } else if s.connecting {
                Some(ERROR_OP_NOT_ALLOWED_NOW)
            } else {
                None
            }
        };
        if let Some(code) = busy {
            return (self.0.on_connected)(code);
        }
        self.st().connecting = true;
        if let Err(code) = self.mqtt_connect() {
            self.st().connecting = false;
            (self.0.on_connected)(code);
        }
    }

    fn mqtt_connect(&self) -> Result<(), i32> {
        let i = &self.0;
        if i.host.is_empty() || i.device_id.is_empty() || i.key.is_empty() {
            self.error("the connection string needs HostName, DeviceId and SharedAccessKey");
            return Err(ERROR_GENERAL);
        }
        let expiry = imp::time() + i.options.token_ttl;
        let resource = encode_uri(&format!("{}/devices/{}", i.host, i.device_id));
        let sas = SharedAccessSignature::new(&resource, None, &i.key, expiry).map_err(|e| {
            self.error(e.to_string());
            ERROR_GENERAL
        })?;
        let password = sas.to_string();
        {
            let mut s = self.st();
            s.password = password.clone();
            s.token_expires_at = expiry;
        }
        let options = ConnectOptions {
            username: Some(format!("{}/{}/?api-version={API_VERSION}", i.host, i.device_id)),
            password: Some(password),
            keepalive: i.options.keep_alive,
            ..ConnectOptions::default()
        };
        let url = format!("ssl://{}:{}", i.host, i.options.port);
        self.debug(format!("connecting to {url} as {}", i.device_id));
        i.mqtt.connect(&url, &i.device_id, &options).map_err(|e| e.code())
    }

    fn mqtt_connected(&self, err: i32) {
        self.debug(format!("MQTT connect result: {err}"));
        let (refreshing, should_disconnect) = {
            let s = self.0.state.borrow();
            (s.refreshing, s.should_disconnect)
        };
        if refreshing {
            if err != 0 {
                self.st().refreshing = false;
                return self.mqtt_disconnected();
            }
            return self.resubscribe(Box::new(|c: &Client, code| {
                c.st().refreshing = false;
                if code == 0 {
                    c.arm_refresh_timer();
                    c.run_pending_calls();
                } else {
                    c.error(format!("re-subscribing after the token refresh failed: {code}"));
                    c.mqtt_disconnect();
                }
            }));
        }
        if should_disconnect {
            {
                let mut s = self.st();
                s.should_disconnect = false;
                s.connecting = false;
                s.connected = err == 0;
            }
            if err == 0 {
                return self.mqtt_disconnect();
            }
            // 5.1.0 left the client stuck "disconnecting" here; the documented outcome is
            // a completed disconnect.
            self.st().disconnecting = false;
            return (self.0.on_disconnected)(0);
        }
        {
            let mut s = self.st();
            s.connecting = false;
            s.connected = err == 0;
        }
        if err == 0 {
            self.arm_refresh_timer();
        }
        (self.0.on_connected)(err)
    }

    /// Closes the MQTT connection; `mqtt_disconnected` follows.
    fn mqtt_disconnect(&self) {
        let weak = Rc::downgrade(&self.0);
        if self.0.mqtt.disconnect(move || with(&weak, |c| c.mqtt_disconnected())).is_err() {
            self.mqtt_disconnected();
        }
    }

    /// The connection is gone, asked for or not.
    fn mqtt_disconnected(&self) {
        let reason = if self.0.state.borrow().disconnecting { 0 } else { ERROR_GENERAL };
        self.debug(format!("disconnected: {reason}"));
        self.cleanup();
        (self.0.on_disconnected)(reason)
    }

    /// Resets to disconnected: features off, timers cancelled, every pending callback
    /// answered with 1000, queued calls re-run against the disconnected client.
    fn cleanup(&self) {
        let (enabling, sending, twin_get, updates, methods, pending) = {
            let mut s = self.st();
            for t in [s.refresh_timer.take(), s.queue_timer.take()].into_iter().flatten() {
                imp::cancel_wakeup(t);
            }
            s.connected = false;
            s.connecting = false;
            s.disconnecting = false;
            s.refreshing = false;
            s.should_disconnect = false;
            s.refresh_paused = false;
            s.on_message = None;
            s.on_twin = None;
            s.on_method = None;
            (
                std::mem::take(&mut s.enabling),
                std::mem::take(&mut s.sending),
                s.twin_get.take(),
                std::mem::take(&mut s.twin_updates),
                std::mem::take(&mut s.methods),
                std::mem::take(&mut s.pending_calls),
            )
        };
        for done in enabling.into_iter().flatten() {
            done(ERROR_NOT_CONNECTED);
        }
        let mut sending: Vec<_> = sending.into_iter().collect();
        sending.sort_by_key(|(id, _)| *id);
        for (_, (msg, done)) in sending {
            done(ERROR_NOT_CONNECTED, msg);
        }
        if let Some(get) = twin_get {
            (get.done)(ERROR_NOT_CONNECTED, None, None);
        }
        for (_, update) in updates {
            (update.done)(ERROR_NOT_CONNECTED, update.props);
        }
        for (_, call) in methods {
            if let Some((resp, done)) = call.reply {
                done(ERROR_NOT_CONNECTED, resp);
            }
        }
        for call in pending {
            call(self);
        }
    }

    fn run_pending_calls(&self) {
        let pending = std::mem::take(&mut self.st().pending_calls);
        for call in pending {
            call(self);
        }
    }

    /// Closes the connection; `on_disconnected(0)` follows. No effect when already
    /// disconnected or disconnecting. While connecting, the connection is closed as soon
    /// as it is established, and `on_connected` is not called.
    pub fn disconnect(&self) {
        enum Then {
            Nothing,
            Queue,
            AfterConnect,
            Now,
        }
        let then = {
            let mut s = self.st();
            if !(s.connected || s.connecting) || s.disconnecting {
                Then::Nothing
            } else {
                s.disconnecting = true;
                if s.refreshing {
                    Then::Queue
                } else if s.connecting {
                    s.should_disconnect = true;
                    Then::AfterConnect
                } else {
                    Then::Now
                }
            }
        };
        match then {
            Then::Queue => self.st().pending_calls.push_back(Box::new(|c: &Client| c.mqtt_disconnect())),
            Then::Now => self.mqtt_disconnect(),
            Then::Nothing | Then::AfterConnect => {}
        }
    }

    /// Sends a device-to-cloud message; `on_sent(err, message)` reports the outcome
    /// (0, an MQTT code, 1000, 1004 when `max_pending_send_requests` are in flight).
    pub fn send_message(&self, message: Message, on_sent: impl FnOnce(i32, Message) + 'static) {
        self.send_boxed(message, Box::new(on_sent))
    }

    fn send_boxed(&self, message: Message, on_sent: OnSent) {
        let id = {
            let mut s = self.st();
            if let Some(code) = s.not_ready() {
                drop(s);
                return on_sent(code, message);
            }
            if s.refreshing {
                s.pending_calls.push_back(Box::new(move |c: &Client| c.send_boxed(message, on_sent)));
                drop(s);
                return self.debug("sendMessage queued until the token refresh completes");
            }
            if s.sending.len() >= self.0.options.max_pending_send_requests {
                drop(s);
                return on_sent(ERROR_OP_NOT_ALLOWED_NOW, message);
            }
            s.next_send += 1;
            s.next_send
        };
        let topic = format!("devices/{}/messages/events/{}", self.0.device_id, encode_properties(message.properties()));
        let body = message.body().to_vec();
        self.st().sending.insert(id, (message, on_sent));
        let weak = Rc::downgrade(&self.0);
        let sent = self
            .0
            .mqtt
            .create_message(&topic, body, MessageOptions { qos: self.0.options.qos, retain: false })
            .send_async(move |code| with(&weak, |c| c.message_sent(id, code)));
        if let Err(e) = sent {
            self.message_sent(id, e.code());
        }
    }

    fn message_sent(&self, id: u64, code: i32) {
        let entry = self.st().sending.remove(&id);
        if let Some((message, done)) = entry {
            done(code, message);
        }
        self.continue_refreshing();
    }

    /// Starts receiving cloud-to-device messages; `on_done` gets 0, an MQTT code, or
    /// 1000/1003/1004.
    pub fn enable_incoming_messages(&self, on_receive: impl Fn(Message) + 'static, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Messages, Some(Handler::Messages(Rc::new(on_receive))), Box::new(on_done))
    }

    /// Stops receiving cloud-to-device messages (imp: `enableIncomingMessages(null, onDone)`).
    pub fn disable_incoming_messages(&self, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Messages, None, Box::new(on_done))
    }

    /// Enables device twins; `on_request` gets each desired-properties patch (with `$version`).
    pub fn enable_twin(&self, on_request: impl Fn(Map<String, Value>) + 'static, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Twin, Some(Handler::Twin(Rc::new(on_request))), Box::new(on_done))
    }

    /// Disables device twins (imp: `enableTwin(null, onDone)`).
    pub fn disable_twin(&self, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Twin, None, Box::new(on_done))
    }

    /// Enables direct methods; `on_method(name, params, reply)` gets each call, to be
    /// answered with [`MethodReply::send`] within `d_methods_timeout`.
    pub fn enable_direct_methods(&self, on_method: impl Fn(String, Option<Value>, MethodReply) + 'static, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Methods, Some(Handler::Methods(Rc::new(on_method))), Box::new(on_done))
    }

    /// Disables direct methods (imp: `enableDirectMethods(null, onDone)`).
    pub fn disable_direct_methods(&self, on_done: impl FnOnce(i32) + 'static) {
        self.enable(Feature::Methods, None, Box::new(on_done))
    }

    fn enable(&self, feature: Feature, handler: Option<Handler>, on_done: Done) {
        let refused = {
            let mut s = self.st();
            let enabled = s.enabled(feature);
            let code = if let Some(code) = s.not_ready() {
                Some(code)
            } else if s.enabling[feature as usize].is_some() {
                Some(ERROR_OP_NOT_ALLOWED_NOW)
            } else if enabled && handler.is_some() {
                Some(ERROR_ALREADY_ENABLED)
            } else if !enabled && handler.is_none() {
                Some(ERROR_NOT_ENABLED)
            } else {
                None
            };
            if code.is_none() && s.refreshing {
                s.pending_calls.push_back(Box::new(move |c: &Client| c.enable(feature, handler, on_done)));
                drop(s);
                return self.debug(format!("enabling {feature:?} queued until the token refresh completes"));
            }
            match code {
                Some(code) => Err((code, on_done)),
                None => {
                    s.enabling[feature as usize] = Some(on_done);
                    Ok(handler)
                }
            }
        };
        let handler = match refused {
            Err((code, on_done)) => return on_done(code),
            Ok(handler) => handler,
        };
        let topics = self.feature_topics(feature);
        let subscribe = handler.is_some();
        self.chain(topics, subscribe, Box::new(move |c: &Client, code| {
            let done = {
                let mut s = c.st();
                if code == 0 {
                    match handler {
                        Some(Handler::Messages(h)) => s.on_message = Some(h),
                        Some(Handler::Twin(h)) => s.on_twin = Some(h),
                        Some(Handler::Methods(h)) => s.on_method = Some(h),
                        None => match feature {
                            Feature::Messages => s.on_message = None,
                            Feature::Twin => s.on_twin = None,
                            Feature::Methods => s.on_method = None,
                        },
                    }
                }
                s.enabling[feature as usize].take()
            };
            if let Some(done) = done {
                done(code);
            }
            c.continue_refreshing();
        }));
    }

    /// Topics of a feature, in subscription order.
    fn feature_topics(&self, feature: Feature) -> Vec<String> {
        match feature {
            Feature::Messages => vec![format!("devices/{}/messages/devicebound/#", self.0.device_id)],
            Feature::Twin => vec![format!("{TWIN_DESIRED}#"), format!("{TWIN_RES}#")],
            Feature::Methods => vec![format!("{METHOD_POST}#")],
        }
    }

    /// Subscribes to (or unsubscribes from) `topics` one after another; `then` gets 0 or
    /// the first failure's code.
    fn chain(&self, mut topics: Vec<String>, subscribe: bool, then: Box<dyn FnOnce(&Client, i32)>) {
        if topics.is_empty() {
            return then(self, 0);
        }
        let topic = topics.remove(0);
        // Kept outside the MQTT callback: a call refused at once drops that callback, and
        // `then` must still run, or the feature would stay "enabling" for good.
        let then = Rc::new(RefCell::new(Some(then)));
        let pending = then.clone();
        let weak = Rc::downgrade(&self.0);
        let next = move |code: i32| {
            let Some(then) = pending.borrow_mut().take() else { return };
            with(&weak, move |c| if code == 0 { c.chain(topics, subscribe, then) } else { then(c, code) })
        };
        let started = if subscribe {
            self.0.mqtt.subscribe(&[&topic], self.0.options.qos, move |code, _| next(code))
        } else {
            self.0.mqtt.unsubscribe(&[&topic], next)
        };
        if let Err(e) = started {
            self.error(format!("(un)subscribing {topic}: {e}"));
            let then = then.borrow_mut().take();
            if let Some(then) = then {
                then(self, e.code());
            }
        }
    }

    /// Re-subscribes the enabled features after a token refresh.
    fn resubscribe(&self, then: Box<dyn FnOnce(&Client, i32)>) {
        let topics = {
            let s = self.0.state.borrow();
            let mut topics = Vec::new();
            if s.on_message.is_some() {
                topics.push(format!("devices/{}/messages/devicebound/#", self.0.device_id));
            }
            if s.on_twin.is_some() {
                topics.push(format!("{TWIN_RES}#"));
                topics.push(format!("{TWIN_DESIRED}#"));
            }
            if s.on_method.is_some() {
                topics.push(format!("{METHOD_POST}#"));
            }
            topics
        };
        self.chain(topics, true, then)
    }

    /// Retrieves the twin; `on_retrieved(err, reported, desired)` (1002 if twins are not
    /// enabled, 1004 if a retrieve is pending, 1005 after `twins_timeout`).
    pub fn retrieve_twin_properties(&self, on_retrieved: impl FnOnce(i32, Option<Value>, Option<Value>) + 'static) {
        self.retrieve_boxed(Box::new(on_retrieved))
    }

    fn retrieve_boxed(&self, done: OnRetrieved) {
        let rid = {
            let mut s = self.st();
            let code = s.not_ready().or_else(|| {
                if s.on_twin.is_none() {
                    Some(ERROR_NOT_ENABLED)
                } else if s.twin_get.is_some() {
                    Some(ERROR_OP_NOT_ALLOWED_NOW)
                } else {
                    None
                }
            });
            if let Some(code) = code {
                drop(s);
                return done(code, None, None);
            }
            if s.refreshing {
                s.pending_calls.push_back(Box::new(move |c: &Client| c.retrieve_boxed(done)));
                drop(s);
                return self.debug("retrieveTwinProperties queued until the token refresh completes");
            }
            let rid = s.req_num.to_string();
            s.req_num += 1;
            s.twin_get = Some(TwinGet { rid: rid.clone(), done, sent_at: None });
            rid
        };
        let weak = Rc::downgrade(&self.0);
        let r = rid.clone();
        self.publish(&format!("{TWIN_GET}?$rid={rid}"), Vec::new(), move |code| {
            with(&weak, |c| {
                if code == 0 {
                    if let Some(get) = c.st().twin_get.as_mut().filter(|g| g.rid == r) {
                        get.sent_at = Some(now());
                    }
                    c.rearm_queue_timer();
                } else {
                    let get = c.st().twin_get.take();
                    if let Some(get) = get {
                        (get.done)(code, None, None);
                    }
                    c.continue_refreshing();
                }
            })
        });
    }

    /// Updates reported properties; `on_updated(err, props)` (1004 when
    /// `max_pending_twin_requests` are pending, 1005 after `twins_timeout`, or IoT Hub's
    /// status such as 400).
    pub fn update_twin_properties(&self, properties: Map<String, Value>, on_updated: impl FnOnce(i32, Map<String, Value>) + 'static) {
        self.update_boxed(properties, Box::new(on_updated))
    }

    fn update_boxed(&self, props: Map<String, Value>, done: OnUpdated) {
        let rid = {
            let mut s = self.st();
            let code = s.not_ready().or_else(|| {
                if s.on_twin.is_none() {
                    Some(ERROR_NOT_ENABLED)
                } else if s.twin_updates.len() >= self.0.options.max_pending_twin_requests {
                    Some(ERROR_OP_NOT_ALLOWED_NOW)
                } else {
                    None
                }
            });
            if let Some(code) = code {
                drop(s);
                return done(code, props);
            }
            if s.refreshing {
                s.pending_calls.push_back(Box::new(move |c: &Client| c.update_boxed(props, done)));
                drop(s);
                return self.debug("updateTwinProperties queued until the token refresh completes");
            }
            let rid = s.req_num;
            s.req_num += 1;
            rid
        };
        let body = Value::Object(props.clone()).to_string().into_bytes();
        self.st().twin_updates.insert(rid, TwinUpdate { props, done, sent_at: None });
        let weak = Rc::downgrade(&self.0);
        self.publish(&format!("{TWIN_REPORTED}?$rid={rid}"), body, move |code| {
            with(&weak, |c| {
                if code == 0 {
                    if let Some(u) = c.st().twin_updates.get_mut(&rid) {
                        u.sent_at = Some(now());
                    }
                    c.rearm_queue_timer();
                } else {
                    let update = c.st().twin_updates.remove(&rid);
                    if let Some(u) = update {
                        (u.done)(code, u.props);
                    }
                    c.continue_refreshing();
                }
            })
        });
    }

    /// Publishes at the client's QoS; `done` gets the MQTT result.
    fn publish(&self, topic: &str, body: Vec<u8>, done: impl FnOnce(i32) + 'static) {
        let done = Rc::new(RefCell::new(Some(done)));
        let d = done.clone();
        let sent = self
            .0
            .mqtt
            .create_message(topic, body, MessageOptions { qos: self.0.options.qos, retain: false })
            .send_async(move |code| {
                if let Some(done) = d.borrow_mut().take() {
                    done(code)
                }
            });
        if let Err(e) = sent {
            let done = done.borrow_mut().take();
            if let Some(done) = done {
                done(e.code())
            }
        }
    }

    fn mqtt_message(&self, m: mqtt::ReceivedMessage) {
        self.debug(format!("_onMessage: topic={} | body={}", m.topic, String::from_utf8_lossy(&m.message)));
        let c2d_prefix = format!("devices/{}/messages/devicebound/", self.0.device_id);
        if let Some(bag) = m.topic.strip_prefix(&c2d_prefix) {
            let handler = self.0.state.borrow().on_message.clone();
            if let Some(h) = handler {
                h(Message::with_properties(m.message, decode_properties(bag)));
            }
        } else if m.topic.starts_with(TWIN_DESIRED) {
            let handler = self.0.state.borrow().on_twin.clone();
            match (handler, serde_json::from_slice::<Value>(&m.message)) {
                (Some(h), Ok(Value::Object(props))) => h(props),
                (Some(_), _) => self.error(format!("desired properties are not a JSON object: {}", String::from_utf8_lossy(&m.message))),
                (None, _) => {}
            }
        } else if let Some(rest) = m.topic.strip_prefix(TWIN_RES) {
            self.twin_response(rest, &m.message);
        } else if let Some(rest) = m.topic.strip_prefix(METHOD_POST) {
            self.method_called(rest, &m.message);
        }
    }

    /// `{status}/?$rid={rid}[&$version=N]`.
    fn twin_response(&self, rest: &str, body: &[u8]) {
        let Some((status, query)) = rest.split_once('/') else {
            return self.error(format!("malformed twin response topic: {TWIN_RES}{rest}"));
        };
        let (Ok(status), Some(rid)) = (status.parse::<i32>(), decode_properties(query.trim_start_matches('?')).remove("$rid")) else {
            return self.error(format!("malformed twin response topic: {TWIN_RES}{rest}"));
        };
        let ok = status / 100 == 2;
        let update = rid.parse::<u64>().ok().and_then(|r| self.st().twin_updates.remove(&r));
        if let Some(u) = update {
            (u.done)(if ok { 0 } else { status }, u.props);
        } else {
            let get = {
                let mut s = self.st();
                if s.twin_get.as_ref().is_some_and(|g| g.rid == rid) { s.twin_get.take() } else { None }
            };
            match get {
                Some(get) if !ok => (get.done)(status, None, None),
                Some(get) => match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(mut twin)) if twin.contains_key("reported") && twin.contains_key("desired") => {
                        (get.done)(0, twin.remove("reported"), twin.remove("desired"))
                    }
                    _ => {
                        self.error(format!("twin document without reported and desired: {}", String::from_utf8_lossy(body)));
                        (get.done)(ERROR_GENERAL, None, None)
                    }
                },
                None => self.error(format!("Message with unknown request ID received: {rid}")),
            }
        }
        self.rearm_queue_timer();
        self.continue_refreshing();
    }

    /// `{method}/?$rid={rid}`.
    fn method_called(&self, rest: &str, body: &[u8]) {
        let Some((name, query)) = rest.split_once('/') else {
            return self.error(format!("malformed direct method topic: {METHOD_POST}{rest}"));
        };
        let Some(rid) = decode_properties(query.trim_start_matches('?')).remove("$rid") else {
            return self.error(format!("malformed direct method topic: {METHOD_POST}{rest}"));
        };
        let params = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(v) => Some(v),
                Err(e) => return self.error(format!("direct method {name}: parameters are not JSON: {e}")),
            }
        };
        let handler = self.0.state.borrow().on_method.clone();
        let Some(handler) = handler else { return };
        self.st().methods.insert(rid.clone(), MethodCall { received_at: now(), reply: None });
        self.rearm_queue_timer();
        handler(name.to_owned(), params, MethodReply { client: Rc::downgrade(&self.0), rid });
    }

    fn reply(&self, rid: String, response: DirectMethodResponse, done: OnReplySent) {
        let timeout = f64::from(self.0.options.d_methods_timeout);
        let expired = {
            let mut s = self.st();
            match s.methods.get(&rid) {
                None => true,
                Some(call) if call.reply.is_some() => true,
                Some(call) if now() - call.received_at > timeout => {
                    s.methods.remove(&rid);
                    true
                }
                Some(_) => false,
            }
        };
        if expired {
            done(ERROR_OP_TIMED_OUT, response);
            self.rearm_queue_timer();
            return self.continue_refreshing();
        }
        let topic = format!("{METHOD_RES}{}/?$rid={rid}", response.status);
        let body = response.body.clone().unwrap_or(Value::Null).to_string().into_bytes();
        if let Some(call) = self.st().methods.get_mut(&rid) {
            call.reply = Some((response, done));
        }
        let weak = Rc::downgrade(&self.0);
        self.publish(&topic, body, move |code| {
            with(&weak, |c| {
                let call = c.st().methods.remove(&rid);
                if let Some((response, done)) = call.and_then(|call| call.reply) {
                    done(code, response);
                }
                c.rearm_queue_timer();
                c.continue_refreshing();
            })
        });
    }

    /// Sets the single timer of two-phase operations to the earliest deadline.
    fn rearm_queue_timer(&self) {
        let deadline = {
            let s = self.0.state.borrow();
            let twins = f64::from(self.0.options.twins_timeout);
            let methods = f64::from(self.0.options.d_methods_timeout);
            let twin_deadlines = s.twin_get.iter().filter_map(|g| g.sent_at).chain(s.twin_updates.values().filter_map(|u| u.sent_at)).map(|t| t + twins);
            let method_deadlines = s.methods.values().filter(|m| m.reply.is_none()).map(|m| m.received_at + methods);
            twin_deadlines.chain(method_deadlines).reduce(f64::min)
        };
        let old = self.st().queue_timer.take();
        if let Some(t) = old {
            imp::cancel_wakeup(t);
        }
        if let Some(deadline) = deadline {
            let weak = Rc::downgrade(&self.0);
            let timer = imp::wakeup((deadline - now()).max(0.0), move || with(&weak, |c| c.process_queues()));
            self.st().queue_timer = Some(timer);
        }
    }

    /// Times out twin operations without a response and direct methods without a reply.
    fn process_queues(&self) {
        let t = now();
        let twins = f64::from(self.0.options.twins_timeout);
        let methods = f64::from(self.0.options.d_methods_timeout);
        let (get, updates) = {
            let mut s = self.st();
            s.queue_timer = None;
            let get = if s.twin_get.as_ref().and_then(|g| g.sent_at).is_some_and(|at| t - at >= twins) { s.twin_get.take() } else { None };
            let expired: Vec<u64> = s.twin_updates.iter().filter(|(_, u)| u.sent_at.is_some_and(|at| t - at >= twins)).map(|(rid, _)| *rid).collect();
            let updates: Vec<TwinUpdate> = expired.into_iter().filter_map(|rid| s.twin_updates.remove(&rid)).collect();
            s.methods.retain(|_, m| m.reply.is_some() || t - m.received_at < methods);
            (get, updates)
        };
        if let Some(get) = get {
            (get.done)(ERROR_OP_TIMED_OUT, None, None);
        }
        for u in updates {
            (u.done)(ERROR_OP_TIMED_OUT, u.props);
        }
        self.rearm_queue_timer();
        self.continue_refreshing();
    }

    /// Schedules the token refresh a little before expiry: 2 minutes, or a tenth of a
    /// short TTL (5.1.0 refreshed exactly at expiry; the documentation says before).
    fn arm_refresh_timer(&self) {
        if !self.0.options.token_auto_refresh {
            return;
        }
        let ttl = self.0.options.token_ttl;
        let margin = (ttl / 10).min(120);
        let at = self.0.state.borrow().token_expires_at.saturating_sub(margin);
        let delay = at.saturating_sub(imp::time());
        let weak = Rc::downgrade(&self.0);
        let timer = imp::wakeup(delay as f64, move || with(&weak, |c| c.refresh_token()));
        let old = self.st().refresh_timer.replace(timer);
        if let Some(t) = old {
            imp::cancel_wakeup(t);
        }
    }

    /// Reconnects with a new token once no operation is in flight.
    fn refresh_token(&self) {
        {
            let mut s = self.st();
            s.refresh_timer = None;
            s.refresh_paused = false;
            if !s.connected || s.disconnecting {
                return;
            }
            if s.busy() {
                s.refresh_paused = true;
                return;
            }
            s.refreshing = true;
        }
        self.debug("refreshing the SAS token");
        let weak = Rc::downgrade(&self.0);
        let reconnect = move || {
            with(&weak, |c| {
                if let Err(code) = c.mqtt_connect() {
                    c.error(format!("reconnecting with a new token failed: {code}"));
                    c.st().refreshing = false;
                    c.mqtt_disconnected();
                }
            })
        };
        if self.0.mqtt.disconnect(reconnect).is_err() {
            self.st().refreshing = false;
            self.mqtt_disconnected();
        }
    }

    fn continue_refreshing(&self) {
        let go = {
            let s = self.0.state.borrow();
            s.refresh_paused && !s.busy()
        };
        if go {
            self.refresh_token();
        }
    }
}

enum Handler {
    Messages(Rc<dyn Fn(Message)>),
    Twin(Rc<dyn Fn(Map<String, Value>)>),
    Methods(OnMethod),
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

/// Runs `f` on the client if it still exists.
fn with(weak: &Weak<Inner>, f: impl FnOnce(&Client)) {
    if let Some(inner) = weak.upgrade() {
        f(&Client(inner))
    }
}

/// `k=v&k2=v2`, both sides URI-encoded, as IoT Hub's property bags are.
fn encode_properties(props: &BTreeMap<String, String>) -> String {
    props.iter().map(|(k, v)| format!("{}={}", encode_uri(k), encode_uri(v))).collect::<Vec<_>>().join("&")
}

/// Parses a property bag (or a topic's query); undecodable parts are skipped.
fn decode_properties(bag: &str) -> BTreeMap<String, String> {
    bag.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode_str(k).decode_utf8().ok()?.into_owned();
            let v = percent_decode_str(v).decode_utf8().ok()?.into_owned();
            Some((k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_bags_round_trip() {
        let props: BTreeMap<String, String> = [("$.ct", "application/json"), ("k", "a b&c")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let bag = encode_properties(&props);
        assert_eq!(bag, "%24.ct=application%2Fjson&k=a%20b%26c");
        assert_eq!(decode_properties(&bag), props);
        assert_eq!(decode_properties("%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&k=v")["$.to"], "/devices/dev1/messages/deviceBound");
        assert!(decode_properties("").is_empty());
    }
}
