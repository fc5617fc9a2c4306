//! The transport: runs the state machine over one MQTT connection and the host's timers.
//! It makes the SAS token and connect options, turns the agent's calls and the MQTT
//! callbacks into [`Machine`] inputs, and performs what the machine answers: connects,
//! publishes, (un)subscribes, timers, log lines and callbacks.
//!
//! Nothing here picks an error code or a state; that is the machine's. What is here is
//! the order of effects: callbacks run in the order the machine returns them, and never
//! while the machine is borrowed, since an agent's callback may call the client again.

use std::cell::{Cell, RefCell, RefMut};
use std::fmt::Display;
use std::rc::{Rc, Weak};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::{Map, Value};

use super::state::{AfterConnect, Call, Closing, Completion, Done, Feature, Handler, Machine, OnReplySent, OnRetrieved, OnSent, OnUpdated, TwinAnswer, Verdict};
use super::outbox::Outbox;
use super::topics::{self, Inbound};
use super::{Client, ClientOptions, MethodReply};
use crate::azure_iot_hub::{
    API_VERSION, ConnectionString, DirectMethodResponse, ERROR_GENERAL, ERROR_MESSAGE_TOO_LARGE, MAX_MESSAGE_BYTES, Message, SasError, SharedAccessSignature, encode_uri,
};
use crate::mqtt::{self, ClientCertificate, ConnectOptions, MessageOptions, MqttError, OnPublished};
use crate::{imp, server};

/// What runs once a chain of (un)subscriptions is over, with 0 or the first failure's code.
type Then = Box<dyn FnOnce(&Client, i32)>;

/// What a [`Client`]'s clones and its MQTT callbacks share.
pub(super) struct Inner {
    host: String,
    device_id: String,
    key: String,
    /// The connection string says `x509=true`: the device authenticates by certificate.
    x509: bool,
    options: ClientOptions,
    pub(super) mqtt: mqtt::Client,
    on_connected: Box<dyn Fn(i32)>,
    on_disconnected: Box<dyn Fn(i32)>,
    machine: RefCell<Machine>,
    refresh_timer: Cell<Option<imp::Timer>>,
    /// One timer for every two-phase operation, set to the earliest deadline.
    queue_timer: Cell<Option<imp::Timer>>,
    /// The next reconnect attempt.
    reconnect_timer: Cell<Option<imp::Timer>>,
    /// With `options.outbox`.
    pub(super) outbox: Option<RefCell<Outbox>>,
    pub(super) debug: Cell<bool>,
}

/// A client for the device of `cs`, its MQTT callbacks wired to the state machine.
pub(super) fn new_client(cs: ConnectionString, on_connected: Box<dyn Fn(i32)>, on_disconnected: Box<dyn Fn(i32)>, mut options: ClientOptions) -> Client {
    // `HostName=host:port` names the MQTT port (beyond 5.1.0), as it names the HTTPS port
    // in a Registry's connection string; the host alone goes into the username and token.
    let (host, port) = split_port(cs.host_name.as_deref().unwrap_or_default());
    if let Some(port) = port {
        options.port = port;
    }
    let outbox = options.outbox.as_deref().map(|name| {
        let (outbox, left) = Outbox::open(name, random_bits());
        match left {
            Ok(0) => {}
            Ok(n) => server::log(format!("[AzureIoTHubMQTTClient] outbox {name}: {n} messages from before will be sent once connected")),
            Err(e) => server::error(format!("[AzureIoTHubMQTTClient] outbox {name}: cannot read what was left: {e}")),
        }
        RefCell::new(outbox)
    });
    let inner = Rc::new(Inner {
        outbox,
        host: host.to_owned(),
        device_id: cs.device_id.unwrap_or_default(),
        key: cs.shared_access_key.unwrap_or_default(),
        x509: cs.all.get("x509").is_some_and(|v| v.eq_ignore_ascii_case("true")),
        machine: RefCell::new(Machine::new(options.clone())),
        options,
        mqtt: mqtt::create_client(),
        on_connected,
        on_disconnected,
        refresh_timer: Cell::new(None),
        queue_timer: Cell::new(None),
        reconnect_timer: Cell::new(None),
        debug: Cell::new(false),
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

/// `host:port` as the host and its port; a host without a (numeric) port as it is.
fn split_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && !name.ends_with(':') => match port.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

/// The machine's clock: monotonic seconds.
fn now() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Random bits: std's hasher keys come from the host's random source.
fn random_bits() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// A random number in [0, 1), for the reconnect jitter.
fn random() -> f64 {
    (random_bits() >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `f` on the client if it still exists.
fn with(weak: &Weak<Inner>, f: impl FnOnce(&Client)) {
    if let Some(inner) = weak.upgrade() {
        f(&Client(inner))
    }
}

/// Runs callbacks the machine handed back. Callers take them out of the machine in a
/// statement of their own, so that the machine is no longer borrowed.
fn complete(completions: impl IntoIterator<Item = Completion>) {
    for completion in completions {
        completion.run();
    }
}

/// Connect options with IoT Hub's username and a SAS token valid until `expiry` as the
/// password.
fn connect_options(host: &str, device_id: &str, key: &str, keep_alive: u16, expiry: u64) -> Result<ConnectOptions, SasError> {
    let resource = encode_uri(&format!("{host}/devices/{device_id}"));
    let sas = SharedAccessSignature::new(&resource, None, key, expiry)?;
    Ok(ConnectOptions { password: Some(sas.to_string()), ..x509_connect_options(host, device_id, keep_alive, None) })
}

/// Connect options with IoT Hub's username and no password: an X.509 device proves who
/// it is with `certificate` in the TLS handshake instead.
fn x509_connect_options(host: &str, device_id: &str, keep_alive: u16, certificate: Option<&ClientCertificate>) -> ConnectOptions {
    ConnectOptions {
        username: Some(format!("{host}/{device_id}/?api-version={API_VERSION}")),
        keepalive: keep_alive,
        client_certificate: certificate.cloned(),
        ..ConnectOptions::default()
    }
}

impl Client {
    pub(super) fn machine(&self) -> RefMut<'_, Machine> {
        self.0.machine.borrow_mut()
    }

    fn debug(&self, text: impl AsRef<str>) {
        if self.0.debug.get() {
            server::log(format!("[AzureIoTHubMQTTClient] {}", text.as_ref()));
        }
    }

    fn error(&self, text: impl AsRef<str>) {
        server::error(format!("[AzureIoTHubMQTTClient] {}", text.as_ref()));
    }

    /// `connect()`.
    pub(super) fn open(&self) {
        let started = self.machine().connect();
        if let Err(code) = started {
            return (self.0.on_connected)(code);
        }
        if let Err(code) = self.mqtt_connect() {
            self.machine().connect_failed();
            (self.0.on_connected)(code);
        }
    }

    fn mqtt_connect(&self) -> Result<(), i32> {
        let i = &self.0;
        if i.host.is_empty() || i.device_id.is_empty() {
            self.error("the connection string needs HostName and DeviceId");
            return Err(ERROR_GENERAL);
        }
        let options = match &i.options.client_certificate {
            Some(certificate) => x509_connect_options(&i.host, &i.device_id, i.options.keep_alive, Some(certificate)),
            None if i.x509 => {
                self.error("the connection string says x509=true: set ClientOptions.client_certificate to the device's certificate and key");
                return Err(ERROR_GENERAL);
            }
            None if i.key.is_empty() => {
                self.error("the connection string needs SharedAccessKey (or x509=true with ClientOptions.client_certificate)");
                return Err(ERROR_GENERAL);
            }
            None => {
                let expiry = imp::time() + i.options.token_ttl;
                let options = connect_options(&i.host, &i.device_id, &i.key, i.options.keep_alive, expiry).map_err(|e| {
                    self.error(e.to_string());
                    ERROR_GENERAL
                })?;
                self.machine().token_issued(expiry);
                options
            }
        };
        let url = format!("ssl://{}:{}", i.host, i.options.port);
        self.debug(format!("connecting to {url} as {}", i.device_id));
        i.mqtt.connect(&url, &i.device_id, &options).map_err(|e| e.code())
    }

    fn mqtt_connected(&self, err: i32) {
        self.debug(format!("MQTT connect result: {err}"));
        let next = self.machine().connect_result(err, now());
        match next {
            AfterConnect::Retry => self.schedule_reconnect(),
            AfterConnect::Resubscribe => self.resubscribe(),
            AfterConnect::Lost => self.mqtt_disconnected(),
            AfterConnect::Close => self.mqtt_disconnect(),
            AfterConnect::Closed => (self.0.on_disconnected)(0),
            AfterConnect::Report => {
                if err == 0 {
                    self.arm_refresh_timer();
                }
                (self.0.on_connected)(err);
                self.pump_outbox();
            }
        }
    }

    /// `disconnect()`.
    pub(super) fn close(&self) {
        let closing = self.machine().disconnect();
        match closing {
            Closing::Close => self.mqtt_disconnect(),
            Closing::Stopped => {
                if let Some(t) = self.0.reconnect_timer.take() {
                    imp::cancel_wakeup(t);
                }
                (self.0.on_disconnected)(0)
            }
            Closing::Later | Closing::Nothing => {}
        }
    }

    /// Waits for the next reconnect attempt (after a loss or a transient failure).
    fn schedule_reconnect(&self) {
        let delay = self.machine().retry_delay(random());
        let cause = self.0.mqtt.last_error().unwrap_or_else(|| "connection lost".to_owned());
        self.debug(format!("reconnecting in {delay:.1} s ({cause})"));
        let weak = Rc::downgrade(&self.0);
        let timer = imp::wakeup(delay, move || with(&weak, |c| c.reconnect()));
        if let Some(t) = self.0.reconnect_timer.replace(Some(timer)) {
            imp::cancel_wakeup(t);
        }
    }

    /// One reconnect attempt, unless `disconnect()` came meanwhile.
    fn reconnect(&self) {
        self.0.reconnect_timer.set(None);
        let attempt = self.machine().start_attempt();
        if attempt && let Err(code) = self.mqtt_connect() {
            self.mqtt_connected(code);
        }
    }

    /// Closes the MQTT connection; `mqtt_disconnected` follows.
    fn mqtt_disconnect(&self) {
        let weak = Rc::downgrade(&self.0);
        if self.0.mqtt.disconnect(move || with(&weak, |c| c.mqtt_disconnected())).is_err() {
            self.mqtt_disconnected();
        }
    }

    /// The connection is gone, asked for or not: timers are cancelled, every pending
    /// callback is answered, calls kept during a refresh run against the disconnected
    /// client, and then `on_disconnected` is told.
    fn mqtt_disconnected(&self) {
        let reason = self.machine().disconnect_reason();
        self.debug(format!("disconnected: {reason}"));
        for t in [self.0.refresh_timer.take(), self.0.queue_timer.take()].into_iter().flatten() {
            imp::cancel_wakeup(t);
        }
        if let Some(outbox) = &self.0.outbox {
            outbox.borrow_mut().all_back();
        }
        let (completions, calls, reconnects) = {
            let mut machine = self.machine();
            let reconnects = reason != 0 && machine.reconnects_after_loss(now());
            let completions = if reconnects { machine.lose() } else { machine.reset() };
            (completions, machine.take_deferred(), reconnects)
        };
        complete(completions);
        self.replay(calls);
        (self.0.on_disconnected)(reason);
        if reconnects {
            self.schedule_reconnect();
        }
    }

    /// Keeps `call` until the token refresh is over.
    fn defer(&self, call: Call, what: impl Display) {
        self.machine().defer(call);
        self.debug(format!("{what} queued until the token refresh completes"));
    }

    /// Runs calls kept during a token refresh, in order.
    fn replay(&self, calls: impl IntoIterator<Item = Call>) {
        for call in calls {
            match call {
                Call::Send(message, on_sent) => self.send_boxed(message, on_sent),
                Call::Enable(feature, handler, on_done) => self.enable(feature, handler, on_done),
                Call::Retrieve(done) => self.retrieve_boxed(done),
                Call::Update(props, done) => self.update_boxed(props, done),
                Call::Close => self.mqtt_disconnect(),
            }
        }
    }

    /// `send_message()`.
    pub(super) fn send_boxed(&self, message: Message, on_sent: OnSent) {
        let size = topics::message_size(message.body(), message.properties());
        if size > MAX_MESSAGE_BYTES {
            self.error(format!("sendMessage: {size} bytes with properties, over IoT Hub's {MAX_MESSAGE_BYTES}; not sent"));
            return on_sent(ERROR_MESSAGE_TOO_LARGE, message);
        }
        if let Some(outbox) = &self.0.outbox {
            let accepted = outbox.borrow_mut().accept(message, on_sent);
            return match accepted {
                Ok(()) => self.pump_outbox(),
                Err(refused) => {
                    self.error(format!("sendMessage: not accepted by the outbox: {}", refused.cause));
                    (refused.on_sent)(refused.code, refused.message)
                }
            };
        }
        let verdict = self.machine().send_verdict();
        match verdict {
            Verdict::Refuse(code) => return on_sent(code, message),
            Verdict::Queue => return self.defer(Call::Send(message, on_sent), "sendMessage"),
            Verdict::Go => {}
        }
        let topic = topics::telemetry(&self.0.device_id, message.properties());
        let id = self.machine().start_send(message, on_sent);
        let weak = Rc::downgrade(&self.0);
        let done = Box::new(move |code| with(&weak, |c| c.message_sent(id, code)));
        // The body is lent from the machine, which keeps the message for `on_sent`, rather
        // than copied. Holding the machine across the call is safe: a refused publish hands
        // `done` back instead of calling it.
        let refused = {
            let machine = self.machine();
            let body = machine.sending_body(id).unwrap_or_default();
            self.try_publish(&topic, body, self.0.options.qos, done)
        };
        if let Some((e, done)) = refused {
            done(e.code())
        }
    }

    /// Publishes outbox messages, oldest first, while the connection has room for them.
    fn pump_outbox(&self) {
        let Some(outbox) = &self.0.outbox else { return };
        while self.machine().outbox_slots() > 0 {
            let next = outbox.borrow_mut().next_to_send();
            let Some((id, bag, body)) = next else { return };
            self.machine().outbox_publishing();
            let weak = Rc::downgrade(&self.0);
            // QoS 1 whatever the client's QoS: a message leaves the outbox on its PUBACK.
            self.publish_at(&topics::telemetry_with_bag(&self.0.device_id, &bag), &body, 1, move |code| with(&weak, |c| c.outbox_sent(id, code)));
            if !outbox.borrow().in_flight(id) {
                // Refused at once (the connection is going): it waits for the next one.
                return;
            }
        }
    }

    fn outbox_sent(&self, id: u64, code: i32) {
        self.machine().outbox_published(code);
        let Some(outbox) = &self.0.outbox else { return };
        if code == 0 {
            let (done, removed) = outbox.borrow_mut().acked(id);
            if let Err(e) = removed {
                self.error(format!("outbox: cannot remove message {id}, which IoT Hub has: {e}; a later instance will send it again"));
            }
            if let Some((message, on_sent)) = done {
                on_sent(0, message);
            }
            self.pump_outbox();
        } else {
            outbox.borrow_mut().failed(id);
            self.debug(format!("outbox: message {id} not acknowledged ({code}); it will be sent again"));
        }
        self.continue_refreshing();
    }

    fn message_sent(&self, id: u64, code: i32) {
        let done = self.machine().sent(id, code);
        complete(done);
        self.continue_refreshing();
    }

    /// Enabling (`handler`) or disabling a feature.
    pub(super) fn enable(&self, feature: Feature, handler: Option<Handler>, on_done: Done) {
        let verdict = self.machine().enable_verdict(feature, handler.is_some());
        match verdict {
            Verdict::Refuse(code) => return on_done(code),
            Verdict::Queue => return self.defer(Call::Enable(feature, handler, on_done), format!("enabling {feature:?}")),
            Verdict::Go => self.machine().start_enabling(feature, on_done),
        }
        let subscribe = handler.is_some();
        self.chain(topics::feature_topics(&self.0.device_id, feature), subscribe, Box::new(move |c: &Client, code| {
            let done = c.machine().enable_done(feature, handler, code);
            complete(done);
            c.continue_refreshing();
        }));
    }

    /// Subscribes to (or unsubscribes from) `topics` one after another; `then` gets 0 or
    /// the first failure's code.
    fn chain(&self, mut topics: Vec<String>, subscribe: bool, then: Then) {
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

    /// A token refresh reconnected: re-subscribes the enabled features, then ends the
    /// refresh and replays the calls kept meanwhile.
    fn resubscribe(&self) {
        let topics = topics::resubscribe_topics(&self.0.device_id, self.machine().enabled_features());
        self.chain(topics, true, Box::new(|c: &Client, code| {
            c.machine().end_refresh();
            if code == 0 {
                c.arm_refresh_timer();
                let (calls, announce) = {
                    let mut machine = c.machine();
                    (machine.take_deferred(), machine.take_announce())
                };
                if announce {
                    c.debug("reconnected");
                    (c.0.on_connected)(0);
                }
                c.replay(calls);
                c.pump_outbox();
            } else {
                c.error(format!("re-subscribing after the token refresh failed: {code}"));
                c.mqtt_disconnect();
            }
        }));
    }

    /// `retrieve_twin_properties()`.
    pub(super) fn retrieve_boxed(&self, done: OnRetrieved) {
        let verdict = self.machine().retrieve_verdict();
        match verdict {
            Verdict::Refuse(code) => return done(code, None, None),
            Verdict::Queue => return self.defer(Call::Retrieve(done), "retrieveTwinProperties"),
            Verdict::Go => {}
        }
        let rid = self.machine().start_retrieve(done);
        let weak = Rc::downgrade(&self.0);
        self.publish(&topics::twin_get(&rid), &[], move |code| {
            with(&weak, |c| {
                let failed = c.machine().retrieve_published(&rid, code, now());
                c.twin_published(code, failed)
            })
        });
    }

    /// `update_twin_properties()`.
    pub(super) fn update_boxed(&self, props: Map<String, Value>, done: OnUpdated) {
        let verdict = self.machine().update_verdict();
        match verdict {
            Verdict::Refuse(code) => return done(code, props),
            Verdict::Queue => return self.defer(Call::Update(props, done), "updateTwinProperties"),
            Verdict::Go => {}
        }
        let body = Value::Object(props.clone()).to_string().into_bytes();
        let rid = self.machine().start_update(props, done);
        let weak = Rc::downgrade(&self.0);
        self.publish(&topics::twin_reported(rid), &body, move |code| {
            with(&weak, |c| {
                let failed = c.machine().update_published(rid, code, now());
                c.twin_published(code, failed)
            })
        });
    }

    /// A twin request's publish completed: its timeout runs from now, or its failure
    /// (`failed`) is answered.
    fn twin_published(&self, code: i32, failed: Option<Completion>) {
        if code == 0 {
            self.rearm_queue_timer();
        } else {
            complete(failed);
            self.continue_refreshing();
        }
    }

    /// Publishes at the client's QoS; `done` gets the MQTT result.
    fn publish(&self, topic: &str, body: &[u8], done: impl FnOnce(i32) + 'static) {
        self.publish_at(topic, body, self.0.options.qos, done)
    }

    /// Publishes at `qos`; `done` gets the MQTT result.
    fn publish_at(&self, topic: &str, body: &[u8], qos: u8, done: impl FnOnce(i32) + 'static) {
        if let Some((e, done)) = self.try_publish(topic, body, qos, Box::new(done)) {
            done(e.code())
        }
    }

    /// Publishes at `qos`, or hands `done` back with the refusal without calling it.
    fn try_publish(&self, topic: &str, body: &[u8], qos: u8, done: OnPublished) -> Option<(MqttError, OnPublished)> {
        self.0.mqtt.publish(topic, body, MessageOptions { qos, retain: false }, done).err()
    }

    fn mqtt_message(&self, m: mqtt::ReceivedMessage) {
        self.debug(format!("_onMessage: topic={} | body={}", m.topic, String::from_utf8_lossy(&m.message)));
        match topics::inbound(&self.0.device_id, &m.topic) {
            Inbound::CloudToDevice(bag) => {
                let handler = self.machine().message_handler();
                if let Some(h) = handler {
                    h(Message::with_properties(m.message, topics::decode_properties(bag)));
                }
            }
            Inbound::Desired => {
                let handler = self.machine().twin_handler();
                match (handler, serde_json::from_slice::<Value>(&m.message)) {
                    (Some(h), Ok(Value::Object(props))) => h(props),
                    (Some(_), _) => self.error(format!("desired properties are not a JSON object: {}", String::from_utf8_lossy(&m.message))),
                    (None, _) => {}
                }
            }
            Inbound::TwinResponse { status, rid } => self.twin_response(status, &rid, &m.message),
            Inbound::MethodCall { name, rid } => self.method_called(name, rid, &m.message),
            Inbound::Malformed(what) => self.error(format!("malformed {what} topic: {}", m.topic)),
            Inbound::Other => {}
        }
    }

    fn twin_response(&self, status: i32, rid: &str, body: &[u8]) {
        let answer = self.machine().twin_response(status, rid, body);
        match answer {
            TwinAnswer::Answered(done) => done.run(),
            TwinAnswer::BadDocument(done) => {
                self.error(format!("twin document without reported and desired: {}", String::from_utf8_lossy(body)));
                done.run()
            }
            TwinAnswer::UnknownRequest => self.error(format!("Message with unknown request ID received: {rid}")),
        }
        self.rearm_queue_timer();
        self.continue_refreshing();
    }

    fn method_called(&self, name: &str, rid: String, body: &[u8]) {
        let params = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(v) => Some(v),
                Err(e) => return self.error(format!("direct method {name}: parameters are not JSON: {e}")),
            }
        };
        let handler = self.machine().method_called(rid.clone(), now());
        let Some(handler) = handler else { return };
        self.rearm_queue_timer();
        handler(name.to_owned(), params, MethodReply { client: Rc::downgrade(&self.0), rid });
    }

    /// [`MethodReply::send`].
    pub(super) fn reply(&self, rid: String, response: DirectMethodResponse, done: OnReplySent) {
        let topic = topics::method_response(response.status, &rid);
        let body = response.body.as_ref().unwrap_or(&Value::Null).to_string().into_bytes();
        let expired = self.machine().reply(&rid, response, done, now());
        if let Some(expired) = expired {
            expired.run();
            self.rearm_queue_timer();
            return self.continue_refreshing();
        }
        let weak = Rc::downgrade(&self.0);
        self.publish(&topic, &body, move |code| {
            with(&weak, |c| {
                let done = c.machine().reply_sent(&rid, code);
                complete(done);
                c.rearm_queue_timer();
                c.continue_refreshing();
            })
        });
    }

    /// Sets the single timer of two-phase operations to the earliest deadline.
    fn rearm_queue_timer(&self) {
        let deadline = self.machine().next_deadline();
        if let Some(t) = self.0.queue_timer.take() {
            imp::cancel_wakeup(t);
        }
        if let Some(deadline) = deadline {
            let weak = Rc::downgrade(&self.0);
            let timer = imp::wakeup((deadline - now()).max(0.0), move || with(&weak, |c| c.process_queues()));
            self.0.queue_timer.set(Some(timer));
        }
    }

    fn process_queues(&self) {
        self.0.queue_timer.set(None);
        let expired = self.machine().expire(now());
        complete(expired);
        self.rearm_queue_timer();
        self.continue_refreshing();
    }

    /// Schedules the token refresh the machine asks for, if any.
    fn arm_refresh_timer(&self) {
        let Some(at) = self.machine().refresh_due() else { return };
        let delay = at.saturating_sub(imp::time());
        let weak = Rc::downgrade(&self.0);
        let timer = imp::wakeup(delay as f64, move || with(&weak, |c| c.refresh_token()));
        if let Some(t) = self.0.refresh_timer.replace(Some(timer)) {
            imp::cancel_wakeup(t);
        }
    }

    /// Reconnects with a new token, if the machine lets the refresh start now.
    fn refresh_token(&self) {
        self.0.refresh_timer.set(None);
        let start = self.machine().start_refresh();
        if !start {
            return;
        }
        self.debug("refreshing the SAS token");
        let weak = Rc::downgrade(&self.0);
        let reconnect = move || {
            with(&weak, |c| {
                if let Err(code) = c.mqtt_connect() {
                    c.error(format!("reconnecting with a new token failed: {code}"));
                    c.refresh_failed();
                }
            })
        };
        if self.0.mqtt.disconnect(reconnect).is_err() {
            self.refresh_failed();
        }
    }

    /// The refresh could not reconnect: the connection is lost.
    fn refresh_failed(&self) {
        self.machine().end_refresh();
        self.mqtt_disconnected();
    }

    /// Starts a token refresh that waited for operations in flight, once they are over.
    fn continue_refreshing(&self) {
        let go = self.machine().refresh_waiting();
        if go {
            self.refresh_token();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_options_carry_iot_hubs_username_and_a_device_token() {
        let options = connect_options("myhub.azure-devices.net", "dev1", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", 30, 1700086400).unwrap();
        assert_eq!(options.username.as_deref(), Some("myhub.azure-devices.net/dev1/?api-version=2016-11-14"));
        let password = options.password.unwrap_or_default();
        assert!(password.starts_with("SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig="), "{password}");
        assert!(password.ends_with("&se=1700086400"), "{password}");
        assert_eq!(options.keepalive, 30);
        assert!(options.clean_session);
        assert_eq!(connect_options("h", "d", "not base64!", 60, 1).err(), Some(SasError::InvalidKey));
        assert_eq!(options.client_certificate, None);
    }

    #[test]
    fn a_host_name_may_name_the_port() {
        assert_eq!(split_port("localhost:18883"), ("localhost", Some(18883)));
        assert_eq!(split_port("myhub.azure-devices.net"), ("myhub.azure-devices.net", None));
        assert_eq!(split_port("h:notaport"), ("h:notaport", None));
    }

    #[test]
    fn x509_connect_options_carry_the_username_and_certificate_and_no_password() {
        let certificate = ClientCertificate { cert_pem: "cert".into(), key_pem: "key".into() };
        let options = x509_connect_options("myhub.azure-devices.net", "dev1", 30, Some(&certificate));
        assert_eq!(options.username.as_deref(), Some("myhub.azure-devices.net/dev1/?api-version=2016-11-14"));
        assert_eq!(options.password, None);
        assert_eq!(options.client_certificate, Some(certificate));
    }
}
