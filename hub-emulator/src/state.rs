//! The hub's state shared by the MQTT, REST and control front ends: identity registry,
//! twins, C2D queues, live sessions, pending direct methods, faults.
//!
//! One `std::sync::Mutex` guards it; it is never held across an `.await`, and every
//! operation is short, so contention stays low even with many devices.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Publish;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::events::{EventKind, EventLog};
use crate::messages::{
    C2D_LOCK, C2D_MAX_DELIVERY_COUNT, C2dMessage, C2dRequest, MAX_C2D_BYTES, MAX_C2D_QUEUE,
};
use crate::sas::{SasError, SasToken};
use crate::twin::{Twin, TwinError};
use crate::util::{NULL_DATE, iso8601, new_key, unix_secs};

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the state is
/// always left consistent between statements, and one bad task must not stop the hub.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared access policy permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Permission {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

/// A hub-level shared access policy (`iothubowner`, `service`, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub permissions: Vec<Permission>,
}

impl Policy {
    fn new(name: &str, permissions: &[Permission]) -> Self {
        Policy {
            name: name.into(),
            primary_key: new_key(),
            secondary_key: new_key(),
            permissions: permissions.to_vec(),
        }
    }

    /// IoT Hub's default policies.
    pub(crate) fn defaults() -> Vec<Policy> {
        use Permission::*;
        vec![
            Policy::new(
                "iothubowner",
                &[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
            ),
            Policy::new("service", &[ServiceConnect]),
            Policy::new("device", &[DeviceConnect]),
            Policy::new("registryRead", &[RegistryRead]),
            Policy::new("registryReadWrite", &[RegistryRead, RegistryWrite]),
        ]
    }

    pub(crate) fn allows(&self, p: Permission) -> bool {
        // RegistryReadWrite implies RegistryRead.
        self.permissions.contains(&p)
            || (p == Permission::RegistryRead
                && self.permissions.contains(&Permission::RegistryWrite))
    }
}

/// Which of the four device topics a session subscribed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Subs {
    pub c2d: bool,
    pub twin_res: bool,
    pub desired: bool,
    pub methods: bool,
}

/// A device identity with its twin and C2D queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Device {
    pub id: String,
    pub generation_id: String,
    pub etag: u64,
    pub enabled: bool,
    pub status_reason: Option<String>,
    pub status_updated: String,
    pub auth_type: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub iot_edge: bool,
    pub connection_state_updated: String,
    pub last_activity: String,
    pub twin: Twin,
    pub c2d: VecDeque<C2dMessage>,
    /// Subscriptions kept by a CleanSession=0 session between connections.
    pub persistent_subs: Option<Subs>,
    /// Tokens with `se` at or below this are refused (control API "expire token").
    pub token_floor: u64,
}

impl Device {
    pub fn new(
        id: &str,
        etag: u64,
        primary_key: Option<String>,
        secondary_key: Option<String>,
    ) -> Self {
        let now = iso8601(SystemTime::now());
        let ticks = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() / 100)
            + 621_355_968_000_000_000;
        Device {
            id: id.into(),
            generation_id: ticks.to_string(),
            etag,
            enabled: true,
            status_reason: None,
            status_updated: NULL_DATE.into(),
            auth_type: "sas".into(),
            primary_key: Some(primary_key.unwrap_or_else(new_key)),
            secondary_key: Some(secondary_key.unwrap_or_else(new_key)),
            iot_edge: false,
            connection_state_updated: NULL_DATE.into(),
            last_activity: NULL_DATE.into(),
            twin: Twin::new(&now),
            c2d: VecDeque::new(),
            persistent_subs: None,
            token_floor: 0,
        }
    }

    /// Device etags are base64 of a decimal string (`ODgxNTgwOA==` = "8815808").
    pub fn etag(&self) -> String {
        crate::util::b64(self.etag.to_string().as_bytes())
    }

    pub fn keys(&self) -> Vec<&str> {
        [&self.primary_key, &self.secondary_key]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// The registry JSON (swagger `Device`).
    pub fn identity_json(&self, connected: bool) -> Value {
        json!({
            "deviceId": self.id,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": if connected { "Connected" } else { "Disconnected" },
            "status": if self.enabled { "enabled" } else { "disabled" },
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": self.connection_state_updated,
            "statusUpdatedTime": self.status_updated,
            "lastActivityTime": self.last_activity,
            "cloudToDeviceMessageCount": self.c2d.len(),
            "authentication": {
                "symmetricKey": { "primaryKey": self.primary_key, "secondaryKey": self.secondary_key },
                "x509Thumbprint": { "primaryThumbprint": null, "secondaryThumbprint": null },
                "type": self.auth_type,
            },
            "capabilities": { "iotEdge": self.iot_edge },
        })
    }

    /// The service-side twin JSON.
    pub fn twin_json(&self, connected: bool) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("deviceId".into(), self.id.clone().into());
        m.insert("etag".into(), self.twin.etag().into());
        m.insert("deviceEtag".into(), self.etag().into());
        m.insert(
            "status".into(),
            (if self.enabled { "enabled" } else { "disabled" }).into(),
        );
        m.insert(
            "statusUpdateTime".into(),
            self.status_updated.clone().into(),
        );
        m.insert(
            "connectionState".into(),
            (if connected {
                "Connected"
            } else {
                "Disconnected"
            })
            .into(),
        );
        m.insert("lastActivityTime".into(), self.last_activity.clone().into());
        m.insert("cloudToDeviceMessageCount".into(), self.c2d.len().into());
        m.insert("authenticationType".into(), self.auth_type.clone().into());
        m.insert(
            "x509Thumbprint".into(),
            json!({ "primaryThumbprint": null, "secondaryThumbprint": null }),
        );
        m.insert("modelId".into(), "".into());
        m.extend(self.twin.service_members());
        m.insert("capabilities".into(), json!({ "iotEdge": self.iot_edge }));
        Value::Object(m)
    }
}

/// A DPS individual enrollment (symmetric key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IndividualEnrollment {
    pub registration_id: String,
    pub device_id: Option<String>,
    pub primary_key: String,
    pub secondary_key: String,
}

/// A DPS enrollment group (symmetric key); device keys are derived per registration id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupEnrollment {
    pub group_id: String,
    pub primary_key: String,
    pub secondary_key: String,
}

/// Everything kept across restarts when persistence is on.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub devices: BTreeMap<String, Device>,
    pub individual: BTreeMap<String, IndividualEnrollment>,
    pub groups: BTreeMap<String, GroupEnrollment>,
    /// DPS registration states by lower-cased registration id.
    pub registrations: BTreeMap<String, Value>,
    pub etag_counter: u64,
}

/// Commands to a live MQTT connection task.
#[derive(Debug)]
pub(crate) enum SessionCmd {
    Publish(Publish),
    /// New C2D messages may be deliverable.
    C2dWake,
    Close(String),
}

pub(crate) struct Session {
    pub conn_id: u64,
    /// `se` of the token the connection authenticated with.
    pub token_expiry: u64,
    pub tx: mpsc::UnboundedSender<SessionCmd>,
    pub subs: Subs,
}

/// A fault currently applied to a device (or, with id `*`, to all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActiveFault {
    /// Connections are refused with CONNACK 5.
    RefuseConnect,
    /// TCP connections are closed without CONNACK.
    MqttDown,
}

pub(crate) struct PendingMethod {
    pub device_id: String,
    pub reply: oneshot::Sender<(i64, Value)>,
}

pub(crate) struct State {
    pub p: Persisted,
    pub policies: Vec<Policy>,
    pub sessions: HashMap<String, Session>,
    pub pending_methods: HashMap<String, PendingMethod>,
    pub faults: HashMap<String, (ActiveFault, Instant)>,
    pub dps_operations: HashMap<String, crate::dps::Operation>,
    next_rid: u64,
}

impl State {
    pub fn next_etag(&mut self) -> u64 {
        self.p.etag_counter += 1;
        self.p.etag_counter
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn is_connected(&self, id: &str) -> bool {
        self.sessions.contains_key(id)
    }

    /// Sends a desired-properties notification if the device listens for them. Called
    /// with the lock held by the update, so notifications go out in version order.
    pub fn notify_desired(&self, device_id: &str, notification: &Value) {
        if let Some(s) = self.sessions.get(device_id).filter(|s| s.subs.desired) {
            let version = notification
                .get("$version")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
            let _ = s.tx.send(SessionCmd::Publish(Publish::new(
                topic,
                QoS::AtMostOnce,
                notification.to_string(),
            )));
        }
    }

    /// The fault in force for `device_id`, if any (device-specific or global).
    pub fn fault(&self, device_id: &str) -> Option<ActiveFault> {
        let now = Instant::now();
        [device_id, "*"].iter().find_map(|k| {
            self.faults
                .get(*k)
                .filter(|(_, until)| *until > now)
                .map(|(f, _)| *f)
        })
    }
}

/// Error from the in-process control operations (also surfaced by the control API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("device {0} not found")]
    DeviceNotFound(String),
    #[error("device {0} already exists")]
    DeviceExists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("device {0} already has {MAX_C2D_QUEUE} cloud-to-device messages queued")]
    QueueFull(String),
    #[error("message larger than {MAX_C2D_BYTES} bytes, or properties too long for an MQTT topic")]
    MessageTooLarge,
}

/// Outcome of a direct method invocation that did not get a device response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MethodError {
    DeviceNotFound,
    NotOnline(Duration),
    Timeout(Duration),
}

/// How a device authenticated its MQTT connection.
pub(crate) struct DeviceAuth {
    pub expiry: u64,
    /// `"device"` for device keys, `"hub"` for a hub policy (stamped on D2C messages).
    pub scope: &'static str,
    pub generation_id: String,
}

pub(crate) struct Shared {
    pub hostname: String,
    pub host_aliases: Vec<String>,
    pub scope_id: String,
    pub state: Mutex<State>,
    pub events: EventLog,
    /// Added to the wall clock for token checks (control API clock skew).
    pub clock_offset: AtomicI64,
    pub token_grace: Duration,
    pub persist_path: Option<PathBuf>,
    pub dirty: Notify,
    /// Flips to true when the hub shuts down; connection tasks watch it.
    pub shutdown: watch::Receiver<bool>,
    next_conn_id: AtomicU64,
    /// Misbehaviour switched on by tests through the control API.
    pub test_faults: Mutex<TestFaults>,
}

/// Service misbehaviour that IoT Hub shows under load or failure, on demand.
#[derive(Default)]
pub(crate) struct TestFaults {
    /// Devices whose twin GET/PATCH requests get no response.
    pub withhold_twin: std::collections::HashSet<String>,
    /// How many more DPS operation polls are answered 429 with `Retry-After`.
    pub dps_throttled_polls: u32,
    /// Devices whose CONNACK comes this much later, as from a slow hub.
    pub connack_delay: std::collections::HashMap<String, Duration>,
    /// Replaces IoT Hub's one-minute C2D lock (to test redelivery without waiting).
    pub c2d_lock: Option<Duration>,
}

/// Fixed settings of a hub, for [`Shared::new`].
pub(crate) struct HubSettings {
    pub hostname: String,
    pub host_aliases: Vec<String>,
    pub scope_id: String,
    pub token_grace: Duration,
    pub persist_path: Option<PathBuf>,
}

impl Shared {
    pub fn new(
        settings: HubSettings,
        policies: Vec<Policy>,
        persisted: Persisted,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let HubSettings {
            hostname,
            host_aliases,
            scope_id,
            token_grace,
            persist_path,
        } = settings;
        Shared {
            hostname,
            host_aliases,
            scope_id,
            state: Mutex::new(State {
                p: persisted,
                policies,
                sessions: HashMap::new(),
                pending_methods: HashMap::new(),
                faults: HashMap::new(),
                dps_operations: HashMap::new(),
                next_rid: 0,
            }),
            events: EventLog::new(),
            clock_offset: AtomicI64::new(0),
            token_grace,
            persist_path,
            dirty: Notify::new(),
            shutdown,
            next_conn_id: AtomicU64::new(1),
            test_faults: Mutex::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Marks persistent state as changed (the saver task coalesces writes).
    pub fn changed(&self) {
        if self.persist_path.is_some() {
            self.dirty.notify_one();
        }
    }

    /// Wall-clock seconds as the hub sees them (with the control API's skew).
    pub fn now_secs(&self) -> u64 {
        unix_secs(SystemTime::now())
            .saturating_add_signed(self.clock_offset.load(Ordering::Relaxed))
    }

    pub fn new_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a device's MQTT password: device keys, or a policy with DeviceConnect.
    pub fn authenticate_device(
        &self,
        device_id: &str,
        password: &str,
    ) -> Result<DeviceAuth, SasError> {
        let token = SasToken::parse(password)?;
        if !token.covers(&self.host_aliases, &["devices", device_id]) {
            return Err(SasError::WrongResource);
        }
        let st = self.lock();
        let device =
            st.p.devices
                .get(device_id)
                .filter(|d| d.enabled)
                .ok_or(SasError::UnknownDevice)?;
        let now = self.now_secs();
        let scope = match &token.key_name {
            None => {
                token.verify(&device.keys(), now)?;
                "device"
            }
            Some(name) => {
                let policy = st.policy(name).ok_or(SasError::UnknownKeyName)?;
                if !policy.allows(Permission::DeviceConnect) {
                    return Err(SasError::Forbidden);
                }
                token.verify(&[&policy.primary_key, &policy.secondary_key], now)?;
                "hub"
            }
        };
        if token.expiry <= device.token_floor {
            return Err(SasError::Expired);
        }
        Ok(DeviceAuth {
            expiry: token.expiry,
            scope,
            generation_id: device.generation_id.clone(),
        })
    }

    /// Checks a service `Authorization` header for any of `permissions` on `path`.
    pub fn authenticate_service(
        &self,
        header: &str,
        path: &[&str],
        permissions: &[Permission],
    ) -> Result<(), SasError> {
        let token = SasToken::parse(header)?;
        if !token.covers(&self.host_aliases, path) {
            return Err(SasError::WrongResource);
        }
        let st = self.lock();
        let policy = token
            .key_name
            .as_deref()
            .and_then(|n| st.policy(n))
            .ok_or(SasError::UnknownKeyName)?;
        token.verify(
            &[&policy.primary_key, &policy.secondary_key],
            self.now_secs(),
        )?;
        if !permissions.iter().any(|p| policy.allows(*p)) {
            return Err(SasError::Forbidden);
        }
        Ok(())
    }

    /// Registers a live connection, dropping any previous one of the same device
    /// ("one active MQTT connection per device"). Returns CONNACK's session-present flag
    /// and the subscriptions the session starts with.
    pub fn open_session(
        &self,
        device_id: &str,
        conn_id: u64,
        token_expiry: u64,
        tx: mpsc::UnboundedSender<SessionCmd>,
        clean_session: bool,
    ) -> (bool, Subs) {
        let mut st = self.lock();
        if let Some(old) = st.sessions.remove(device_id) {
            let _ = old.tx.send(SessionCmd::Close(
                "ConnectionForcefullyClosedOnNewConnection".into(),
            ));
        }
        let now = iso8601(SystemTime::now());
        let Some(device) = st.p.devices.get_mut(device_id) else {
            return (false, Subs::default());
        };
        release_in_flight(device, &self.events);
        device.connection_state_updated = now.clone();
        device.last_activity = now;
        let (present, subs) = if clean_session {
            // CleanSession=1 ends the stored session and purges its C2D queue.
            for m in device.c2d.drain(..) {
                self.events.record(
                    device_id,
                    EventKind::C2dFeedback {
                        message_id: m.message_id,
                        status: "Purged",
                    },
                );
            }
            device.persistent_subs = None;
            (false, Subs::default())
        } else {
            let subs = device.persistent_subs.unwrap_or_default();
            let present = device.persistent_subs.is_some();
            device.persistent_subs = Some(subs);
            (present, subs)
        };
        st.sessions.insert(
            device_id.to_string(),
            Session {
                conn_id,
                token_expiry,
                tx,
                subs,
            },
        );
        drop(st);
        self.changed();
        self.events
            .record(device_id, EventKind::Connected { clean_session });
        (present, subs)
    }

    /// Ends a connection's registration (if it is still the current one).
    pub fn close_session(&self, device_id: &str, conn_id: u64, reason: &str) {
        let mut st = self.lock();
        if st
            .sessions
            .get(device_id)
            .is_none_or(|s| s.conn_id != conn_id)
        {
            return;
        }
        st.sessions.remove(device_id);
        if let Some(device) = st.p.devices.get_mut(device_id) {
            release_in_flight(device, &self.events);
            device.connection_state_updated = iso8601(SystemTime::now());
        }
        drop(st);
        self.events.record(
            device_id,
            EventKind::Disconnected {
                reason: reason.to_string(),
            },
        );
    }

    pub fn set_subs(&self, device_id: &str, conn_id: u64, subs: Subs) {
        let mut st = self.lock();
        match st.sessions.get_mut(device_id) {
            Some(s) if s.conn_id == conn_id => s.subs = subs,
            _ => return,
        }
        if let Some(d) =
            st.p.devices
                .get_mut(device_id)
                .filter(|d| d.persistent_subs.is_some())
        {
            d.persistent_subs = Some(subs);
        }
    }

    pub fn touch_activity(&self, device_id: &str) {
        if let Some(d) = self.lock().p.devices.get_mut(device_id) {
            d.last_activity = iso8601(SystemTime::now());
        }
    }

    /// Asks a device's connection to close (fault injection, deletion, token expiry).
    pub fn disconnect(&self, device_id: &str, reason: &str) -> bool {
        let st = self.lock();
        st.sessions
            .get(device_id)
            .map(|s| s.tx.send(SessionCmd::Close(reason.to_string())).is_ok())
            .unwrap_or(false)
    }

    /// Enqueues a C2D message (fails at 50 queued, like IoT Hub's 403004).
    pub fn enqueue_c2d(&self, device_id: &str, req: C2dRequest) -> Result<String, ControlError> {
        if req.body.len() > MAX_C2D_BYTES {
            return Err(ControlError::MessageTooLarge);
        }
        let now = SystemTime::now();
        let mut st = self.lock();
        let device =
            st.p.devices
                .get_mut(device_id)
                .ok_or_else(|| ControlError::DeviceNotFound(device_id.into()))?;
        expire_c2d(device, now, &self.events);
        if device.c2d.len() >= MAX_C2D_QUEUE {
            return Err(ControlError::QueueFull(device_id.into()));
        }
        let msg = C2dMessage::new(req, now);
        // The properties travel in the topic, whose length is a u16 in MQTT.
        if msg.topic(device_id).len() > usize::from(u16::MAX) {
            return Err(ControlError::MessageTooLarge);
        }
        let id = msg.message_id.clone();
        device.c2d.push_back(msg);
        if let Some(s) = st.sessions.get(device_id) {
            let _ = s.tx.send(SessionCmd::C2dWake);
        }
        drop(st);
        self.changed();
        Ok(id)
    }

    /// Marks deliverable C2D messages in flight and returns their PUBLISH packets.
    /// `alloc` hands out packet ids; delivery needs a C2D subscription.
    pub fn take_c2d(
        &self,
        device_id: &str,
        conn_id: u64,
        mut alloc: impl FnMut() -> u16,
    ) -> Vec<Publish> {
        let mut st = self.lock();
        let st = &mut *st;
        if !st
            .sessions
            .get(device_id)
            .is_some_and(|s| s.conn_id == conn_id && s.subs.c2d)
        {
            return Vec::new();
        }
        let Some(device) = st.p.devices.get_mut(device_id) else {
            return Vec::new();
        };
        let now = SystemTime::now();
        expire_c2d(device, now, &self.events);
        // A delivery whose lock expired without PUBACK is abandoned: the message goes out
        // again (a late PUBACK of the old delivery completes nothing), or is dead-lettered
        // after the maximum delivery count.
        let lock_expired = |m: &C2dMessage| m.in_flight.is_some() && m.locked_until.is_some_and(|t| t <= now);
        let (dead, kept): (VecDeque<_>, VecDeque<_>) =
            device.c2d.drain(..).partition(|m| lock_expired(m) && m.delivery_count >= C2D_MAX_DELIVERY_COUNT);
        device.c2d = kept;
        for m in dead {
            self.events.record(&device.id, EventKind::C2dFeedback { message_id: m.message_id, status: "DeliveryCountExceeded" });
        }
        let lock = self.test_faults.lock().ok().and_then(|f| f.c2d_lock).unwrap_or(C2D_LOCK);
        let mut out = Vec::new();
        for m in device.c2d.iter_mut().filter(|m| m.in_flight.is_none() || lock_expired(m)) {
            let pkid = alloc();
            m.in_flight = Some(pkid);
            m.locked_until = Some(now + lock);
            m.delivery_count += 1;
            let mut p = Publish::new(m.topic(device_id), QoS::AtLeastOnce, m.body.clone());
            p.pkid = pkid;
            p.dup = m.delivery_count > 1;
            out.push(p);
        }
        out
    }

    /// Time until the earliest lock of a delivered C2D message of `device_id` expires.
    pub fn next_c2d_lock_expiry(&self, device_id: &str) -> Option<Duration> {
        let st = self.lock();
        let now = SystemTime::now();
        st.p.devices
            .get(device_id)?
            .c2d
            .iter()
            .filter(|m| m.in_flight.is_some())
            .filter_map(|m| m.locked_until)
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
            .min()
    }

    /// PUBACK of a C2D delivery: completes the message.
    pub fn complete_c2d(&self, device_id: &str, pkid: u16) {
        let mut st = self.lock();
        let Some(device) = st.p.devices.get_mut(device_id) else {
            return;
        };
        if let Some(pos) = device.c2d.iter().position(|m| m.in_flight == Some(pkid))
            && let Some(m) = device.c2d.remove(pos)
        {
            drop(st);
            self.changed();
            self.events.record(
                device_id,
                EventKind::C2dFeedback {
                    message_id: m.message_id,
                    status: "Success",
                },
            );
        }
    }

    /// Device twin GET over MQTT.
    pub fn twin_device_view(&self, device_id: &str) -> Option<Value> {
        self.lock()
            .p
            .devices
            .get(device_id)
            .map(|d| d.twin.device_view())
    }

    /// Reported-properties patch from a device; returns the new reported version.
    pub fn patch_reported(&self, device_id: &str, patch: &Value) -> Result<u64, TwinError> {
        let now = iso8601(SystemTime::now());
        let version = {
            let mut st = self.lock();
            let device =
                st.p.devices
                    .get_mut(device_id)
                    .ok_or(TwinError::NotAnObject)?;
            device.twin.patch_reported(patch, &now)?
        };
        self.changed();
        let mut recorded = patch.clone();
        if let Some(m) = recorded.as_object_mut() {
            m.insert("$version".into(), version.into());
        }
        self.events.record(
            device_id,
            EventKind::TwinChange {
                section: "reported",
                version,
                patch: recorded,
            },
        );
        Ok(version)
    }

    /// Invokes a direct method and waits for the device's answer.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        name: &str,
        payload: &Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<(i64, Value), MethodError> {
        let connect_deadline = tokio::time::Instant::now() + connect_timeout;
        let (rid, rx) = loop {
            {
                let mut st = self.lock();
                if !st.p.devices.contains_key(device_id) {
                    return Err(MethodError::DeviceNotFound);
                }
                if let Some(tx) = st
                    .sessions
                    .get(device_id)
                    .filter(|s| s.subs.methods)
                    .map(|s| s.tx.clone())
                {
                    st.next_rid += 1;
                    let rid = st.next_rid.to_string();
                    let (reply, rx) = oneshot::channel();
                    st.pending_methods.insert(
                        rid.clone(),
                        PendingMethod {
                            device_id: device_id.into(),
                            reply,
                        },
                    );
                    let topic = format!("$iothub/methods/POST/{name}/?$rid={rid}");
                    let _ = tx.send(SessionCmd::Publish(Publish::new(
                        topic,
                        QoS::AtMostOnce,
                        payload.to_string(),
                    )));
                    break (rid, rx);
                }
            }
            if tokio::time::Instant::now() >= connect_deadline {
                return Err(MethodError::NotOnline(connect_timeout));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                self.lock().pending_methods.remove(&rid);
                Err(MethodError::Timeout(response_timeout))
            }
        }
    }

    /// A device's `$iothub/methods/res/{status}/?$rid=` answer.
    pub fn method_response(&self, device_id: &str, rid: &str, status: i64, payload: Value) {
        let mut st = self.lock();
        // Only the device the request went to may answer it.
        if st
            .pending_methods
            .get(rid)
            .is_some_and(|p| p.device_id == device_id)
            && let Some(p) = st.pending_methods.remove(rid)
        {
            let _ = p.reply.send((status, payload));
        }
    }
}

/// A disconnect puts delivered-but-unacknowledged C2D messages back in the queue
/// (dead-lettering those delivered too often).
fn release_in_flight(device: &mut Device, events: &EventLog) {
    let (dead, kept): (VecDeque<_>, VecDeque<_>) = device
        .c2d
        .drain(..)
        .partition(|m| m.in_flight.is_some() && m.delivery_count >= C2D_MAX_DELIVERY_COUNT);
    device.c2d = kept;
    for m in device.c2d.iter_mut() {
        m.in_flight = None;
        m.locked_until = None;
    }
    for m in dead {
        events.record(
            &device.id,
            EventKind::C2dFeedback {
                message_id: m.message_id,
                status: "DeliveryCountExceeded",
            },
        );
    }
}

fn expire_c2d(device: &mut Device, now: SystemTime, events: &EventLog) {
    let (expired, kept): (VecDeque<_>, VecDeque<_>) = device
        .c2d
        .drain(..)
        .partition(|m| m.expired(now) && m.in_flight.is_none());
    device.c2d = kept;
    for m in expired {
        events.record(
            &device.id,
            EventKind::C2dFeedback {
                message_id: m.message_id,
                status: "Expired",
            },
        );
    }
}
