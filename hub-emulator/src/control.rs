//! In-process control of the emulator (the same operations the HTTPS control API
//! exposes): C2D send, observed events, connection state, fault injection, clock skew.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventFilter, EventKind};
use crate::messages::C2dRequest;
use crate::state::device::{Device, valid_device_id};
use crate::state::faults::ActiveFault;
use crate::state::provisioning::{GroupEnrollment, IndividualEnrollment};
use crate::state::session::SessionCmd;
use crate::state::{ControlError, Shared};
use crate::util::{b64_decode, new_key};

/// Faults that can be injected, named like IoT Hub's `AzIoTHub_FaultOperationType`
/// values (protocol notes §1.12). AMQP-only faults do not apply to MQTT devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop the TCP connection.
    KillTcp,
    /// Drop MQTT connections and refuse new ones for the duration.
    ShutDownMqtt,
    /// Drop the connection and answer CONNECT with CONNACK 5 for the duration.
    InvokeAuthError,
    /// Drop the connection; for the duration, telemetry closes the connection again
    /// without a PUBACK (over MQTT, IoT Hub signals throttling only by closing).
    InvokeThrottling,
}

impl Fault {
    /// Parses an `AzIoTHub_FaultOperationType` value; `None` for unknown or AMQP-only.
    pub fn from_operation_type(s: &str) -> Option<Fault> {
        match s {
            "KillTcp" => Some(Fault::KillTcp),
            "ShutDownMqtt" => Some(Fault::ShutDownMqtt),
            "InvokeAuthError" => Some(Fault::InvokeAuthError),
            "InvokeThrottling" => Some(Fault::InvokeThrottling),
            _ => None,
        }
    }
}

/// Longest fault duration or delay honoured (values come from device messages).
pub(crate) const MAX_FAULT_TIME: Duration = Duration::from_secs(24 * 3600);

impl Shared {
    /// Applies `fault` to one device, or with `None` to every device, for at most
    /// [`MAX_FAULT_TIME`].
    pub(crate) fn apply_fault(&self, device_id: Option<&str>, fault: Fault, duration: Duration) {
        let duration = duration.min(MAX_FAULT_TIME);
        let key = device_id.unwrap_or("*").to_string();
        let active = match fault {
            Fault::KillTcp => None,
            Fault::ShutDownMqtt => Some(ActiveFault::MqttDown),
            Fault::InvokeAuthError => Some(ActiveFault::RefuseConnect),
            Fault::InvokeThrottling => Some(ActiveFault::Throttled),
        };
        let mut st = self.lock();
        if let Some(active) = active {
            st.faults.insert(key, (active, Instant::now() + duration));
        }
        let reason = format!("{fault:?}");
        for (id, s) in &st.sessions {
            if device_id.is_none_or(|d| d == id) {
                let _ = s.tx.send(SessionCmd::Close(reason.clone()));
            }
        }
    }
}

/// A DPS symmetric-key enrollment to add. Keys are generated when absent. In JSON
/// (control API): `{"type":"individual","registrationId":..,"deviceId":..}` or
/// `{"type":"group","groupId":..}`, optional `primaryKey`/`secondaryKey`.
#[derive(Debug, Clone, Deserialize)]
// Unknown fields are refused: an `attestation` (X.509, TPM) the emulator does not serve
// would otherwise become a symmetric-key enrollment with generated keys.
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum Enrollment {
    /// One device; `device_id` defaults to the registration id.
    Individual {
        registration_id: String,
        device_id: Option<String>,
        primary_key: Option<String>,
        secondary_key: Option<String>,
    },
    /// Any registration id whose key is HMAC-SHA256(group key, registration id).
    Group {
        group_id: String,
        primary_key: Option<String>,
        secondary_key: Option<String>,
    },
}

/// An added enrollment with its (possibly generated) keys.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentInfo {
    /// Registration id (individual) or group id.
    pub id: String,
    pub primary_key: String,
    pub secondary_key: String,
}

/// A registered device and ready-made credentials.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub device_id: String,
    pub primary_key: String,
    pub secondary_key: String,
    /// `HostName=localhost;DeviceId=..;SharedAccessKey=..` (primary key).
    pub connection_string: String,
}

/// A CA registered for `certificateAuthority` devices.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaInfo {
    /// SHA-256 of the certificate (uppercase hex).
    pub thumbprint: String,
    pub subject: String,
}

/// Keys must be base64 of 16 to 64 bytes; absent keys are generated.
fn key_or_new(key: Option<String>) -> Result<String, ControlError> {
    match key {
        None => Ok(new_key()),
        Some(k) if b64_decode(&k).is_some_and(|b| (16..=64).contains(&b.len())) => Ok(k),
        Some(_) => Err(ControlError::Invalid(
            "keys must be base64 of 16 to 64 bytes".into(),
        )),
    }
}

/// Cheap, cloneable handle for driving the emulator from the same process.
#[derive(Clone)]
pub struct Control {
    pub(crate) shared: Arc<Shared>,
}

impl Control {
    /// Registers a device with generated keys.
    pub fn create_device(&self, device_id: &str) -> Result<DeviceInfo, ControlError> {
        if !valid_device_id(device_id) {
            return Err(ControlError::Invalid(format!(
                "invalid device id {device_id}"
            )));
        }
        let mut st = self.shared.lock();
        if st.p.devices.contains_key(device_id) {
            return Err(ControlError::DeviceExists(device_id.into()));
        }
        let etag = st.next_etag();
        st.p.devices
            .insert(device_id.into(), Device::new(device_id, etag, None, None));
        drop(st);
        self.shared.changed();
        self.shared
            .events
            .record(device_id, EventKind::DeviceCreated);
        self.device_info(device_id)
            .ok_or_else(|| ControlError::DeviceNotFound(device_id.into()))
    }

    /// Registers a CA certificate (PEM) as verified: `certificateAuthority` devices whose
    /// chain leads to it may connect. Registering it again changes nothing.
    pub fn add_ca(&self, pem: &str) -> Result<CaInfo, ControlError> {
        let (thumbprint, ca) = crate::x509::RegisteredCa::parse(pem)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let info = CaInfo {
            thumbprint: thumbprint.clone(),
            subject: ca.subject.clone(),
        };
        self.shared.lock().p.cas.insert(thumbprint, ca);
        self.shared.changed();
        Ok(info)
    }

    /// Credentials of a registered device.
    pub fn device_info(&self, device_id: &str) -> Option<DeviceInfo> {
        let st = self.shared.lock();
        let d = st.p.devices.get(device_id)?;
        let primary_key = d.primary_key.clone().unwrap_or_default();
        // X.509 devices have no key; Azure's connection strings say `x509=true` instead.
        let credential = match d.primary_key {
            Some(_) => format!("SharedAccessKey={primary_key}"),
            None => "x509=true".into(),
        };
        Some(DeviceInfo {
            device_id: device_id.into(),
            connection_string: format!(
                "HostName={};DeviceId={device_id};{credential}",
                self.shared.hostname
            ),
            primary_key,
            secondary_key: d.secondary_key.clone().unwrap_or_default(),
        })
    }

    /// Adds (or replaces) a DPS enrollment.
    pub fn add_enrollment(&self, enrollment: Enrollment) -> Result<EnrollmentInfo, ControlError> {
        match enrollment {
            Enrollment::Individual {
                registration_id,
                device_id,
                primary_key,
                secondary_key,
            } => {
                if !crate::dps::valid_registration_id(&registration_id) {
                    return Err(ControlError::Invalid(format!(
                        "invalid registration id {registration_id}"
                    )));
                }
                if device_id.as_deref().is_some_and(|d| !valid_device_id(d)) {
                    return Err(ControlError::Invalid("invalid device id".into()));
                }
                let e = IndividualEnrollment {
                    registration_id,
                    device_id,
                    primary_key: key_or_new(primary_key)?,
                    secondary_key: key_or_new(secondary_key)?,
                };
                let info = EnrollmentInfo {
                    id: e.registration_id.clone(),
                    primary_key: e.primary_key.clone(),
                    secondary_key: e.secondary_key.clone(),
                };
                self.shared.add_individual(e);
                Ok(info)
            }
            Enrollment::Group {
                group_id,
                primary_key,
                secondary_key,
            } => {
                if group_id.is_empty() || group_id.len() > 128 {
                    return Err(ControlError::Invalid("invalid group id".into()));
                }
                let g = GroupEnrollment {
                    group_id,
                    primary_key: key_or_new(primary_key)?,
                    secondary_key: key_or_new(secondary_key)?,
                };
                let info = EnrollmentInfo {
                    id: g.group_id.clone(),
                    primary_key: g.primary_key.clone(),
                    secondary_key: g.secondary_key.clone(),
                };
                self.shared.add_group(g);
                Ok(info)
            }
        }
    }

    /// An individual (or else group) enrollment with this id, with its keys.
    pub fn enrollment(&self, id: &str) -> Option<EnrollmentInfo> {
        let st = self.shared.lock();
        if let Some(e) = st.p.individual.get(id) {
            return Some(EnrollmentInfo { id: e.registration_id.clone(), primary_key: e.primary_key.clone(), secondary_key: e.secondary_key.clone() });
        }
        st.p.groups.get(id).map(|g| EnrollmentInfo { id: g.group_id.clone(), primary_key: g.primary_key.clone(), secondary_key: g.secondary_key.clone() })
    }

    /// Queues a cloud-to-device message; returns its message id.
    pub fn send_c2d(&self, device_id: &str, msg: C2dRequest) -> Result<String, ControlError> {
        self.shared.enqueue_c2d(device_id, msg)
    }

    /// Events after cursor `since` (0 = from the start), oldest first.
    pub fn events(&self, since: u64, filter: &EventFilter) -> Vec<Event> {
        self.shared.events.since(since, filter)
    }

    /// Like [`Control::events`], waiting up to `wait` for the first match.
    pub async fn wait_events(
        &self,
        since: u64,
        filter: &EventFilter,
        wait: Duration,
    ) -> Vec<Event> {
        self.shared.events.wait_since(since, filter, wait).await
    }

    /// The emulator's metrics in OpenMetrics text (docs/hub-emulator.md, metrics).
    pub fn metrics_text(&self) -> String {
        let holdings = {
            let st = self.shared.lock();
            crate::metrics::Holdings {
                devices: st.p.devices.len() as u64,
                connections: st.sessions.len() as u64,
                c2d_queued: st.p.devices.values().filter(|d| !d.c2d.is_empty()).map(|d| (d.id.clone(), d.c2d.len() as u64)).collect(),
            }
        };
        // Writing to a String cannot fail; an encoder error would be a bug, shown as such.
        crate::metrics::render(&self.shared.metrics, holdings).unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n# EOF\n"))
    }

    /// Cursor of the newest event (to read only what happens from now on).
    pub fn last_event_seq(&self) -> u64 {
        self.shared.events.last_seq()
    }

    /// Whether the device has a live MQTT connection.
    pub fn is_connected(&self, device_id: &str) -> bool {
        self.shared.lock().is_connected(device_id)
    }

    /// Drops a device's connection (as `KillTcp`); false if it was not connected.
    pub fn disconnect(&self, device_id: &str) -> bool {
        self.shared.disconnect(device_id, "KillTcp")
    }

    /// Injects a fault for one device (`Some`) or all devices (`None`).
    pub fn inject_fault(&self, device_id: Option<&str>, fault: Fault, duration: Duration) {
        self.shared.apply_fault(device_id, fault, duration);
    }

    /// Withholds (or, with `false`, resumes) the responses to a device's twin GET and
    /// PATCH requests, as a hub that lost them would: the device's requests time out.
    pub fn withhold_twin_responses(&self, device_id: &str, withhold: bool) {
        if let Ok(mut f) = self.shared.test_faults.lock() {
            if withhold {
                f.withhold_twin.insert(device_id.to_owned());
            } else {
                f.withhold_twin.remove(device_id);
            }
        }
    }

    /// Sets how long a delivered C2D message waits for its PUBACK before it is delivered
    /// again (IoT Hub: one minute), so tests need not wait a minute.
    pub fn set_c2d_lock(&self, lock: Duration) {
        if let Ok(mut f) = self.shared.test_faults.lock() {
            f.c2d_lock = Some(lock);
        }
    }

    /// Delays a device's CONNACK by `delay` (zero: no delay), as a slow hub would.
    pub fn delay_connack(&self, device_id: &str, delay: Duration) {
        if let Ok(mut f) = self.shared.test_faults.lock() {
            if delay.is_zero() {
                f.connack_delay.remove(device_id);
            } else {
                f.connack_delay.insert(device_id.to_owned(), delay);
            }
        }
    }

    /// Answers the next `polls` DPS operation-status requests with 429 and `Retry-After`,
    /// as a throttled DPS does.
    pub fn throttle_dps_polls(&self, polls: u32) {
        if let Ok(mut f) = self.shared.test_faults.lock() {
            f.dps_throttled_polls = polls;
        }
    }

    /// Expires the device's current tokens now: its connection is dropped as at token
    /// expiry and tokens expiring no later than the current one are refused afterwards.
    pub fn expire_token(&self, device_id: &str) -> Result<(), ControlError> {
        let mut st = self.shared.lock();
        let floor = st
            .sessions
            .get(device_id)
            .map(|s| s.token_expiry)
            // A certificate session has no token: refusing every token up to "never"
            // would lock the device out of SAS for good.
            .filter(|&e| e != crate::state::auth::NO_TOKEN_EXPIRY)
            .unwrap_or(0)
            .max(self.shared.now_secs());
        let device =
            st.p.devices
                .get_mut(device_id)
                .ok_or_else(|| ControlError::DeviceNotFound(device_id.into()))?;
        device.token_floor = floor;
        if let Some(s) = st.sessions.get(device_id) {
            let _ = s.tx.send(SessionCmd::Close("SAS token expired".into()));
        }
        Ok(())
    }

    /// Moves the hub's clock for token checks by `offset_secs` (absolute, not cumulative);
    /// connections whose token is then expired are dropped.
    pub fn set_clock_offset(&self, offset_secs: i64) {
        self.shared
            .clock_offset
            .store(offset_secs, Ordering::Relaxed);
        let now = self.shared.now_secs();
        let grace = self.shared.token_grace.as_secs();
        let st = self.shared.lock();
        for s in st
            .sessions
            .values()
            .filter(|s| s.token_expiry.saturating_add(grace) <= now)
        {
            let _ = s.tx.send(SessionCmd::Close("SAS token expired".into()));
        }
    }
}
