//! The hub's state shared by the MQTT, REST and control front ends: identity registry,
//! twins, C2D queues, live sessions, pending direct methods, faults.
//!
//! One `std::sync::Mutex` guards it; it is never held across an `.await`, and every
//! operation is short, so contention stays low even with many devices.
//!
//! This file is the core: [`Shared`] and the lock-guarded [`State`]. The data it holds
//! is defined in the modules below it (`policy`, `device`, `session`, `faults`,
//! `provisioning`), and the operations on it in modules above it that add `impl Shared`
//! blocks (`auth`, `connections`, `c2d`, `twins`, `methods`), so no file here needs one
//! that needs it back.

pub(crate) mod auth;
mod c2d;
mod connections;
pub(crate) mod device;
pub(crate) mod faults;
pub(crate) mod methods;
pub(crate) mod policy;
pub(crate) mod provisioning;
pub(crate) mod session;
mod twins;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::events::EventLog;
use crate::feedback::FeedbackQueue;
use crate::messages::{MAX_C2D_BYTES, MAX_C2D_QUEUE};
use crate::metrics::HubMetrics;
use crate::util::{lock, unix_secs};
use device::Device;
use faults::{ActiveFault, TestFaults};
use policy::Policy;
use provisioning::{GroupEnrollment, IndividualEnrollment, Operation};
use session::{PendingMethod, Session};

/// Everything kept across restarts when persistence is on.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub devices: BTreeMap<String, Device>,
    pub individual: BTreeMap<String, IndividualEnrollment>,
    pub groups: BTreeMap<String, GroupEnrollment>,
    /// DPS registration states by lower-cased registration id.
    pub registrations: BTreeMap<String, Value>,
    pub etag_counter: u64,
    /// Verified CAs for `certificateAuthority` devices, by SHA-256 thumbprint.
    #[serde(default)]
    pub cas: BTreeMap<String, crate::x509::RegisteredCa>,
}

pub(crate) struct State {
    pub p: Persisted,
    pub policies: Vec<Policy>,
    pub sessions: HashMap<String, Session>,
    pub pending_methods: HashMap<String, PendingMethod>,
    pub faults: HashMap<String, (ActiveFault, Instant)>,
    pub dps_operations: HashMap<String, Operation>,
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

pub(crate) struct Shared {
    pub hostname: String,
    pub host_aliases: Vec<String>,
    pub scope_id: String,
    pub state: Mutex<State>,
    pub events: EventLog,
    /// Counters for `/emulator/metrics`.
    pub metrics: HubMetrics,
    /// Feedback records of C2D messages sent with `iothub-ack`.
    pub feedback: FeedbackQueue,
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
        let metrics = HubMetrics::default();
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
            events: EventLog::new(metrics.events()),
            metrics,
            feedback: FeedbackQueue::default(),
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
}
