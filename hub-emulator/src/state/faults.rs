//! Fault-injection settings the front ends consult: faults applied through the control
//! API or device messages, and misbehaviour switched on by tests. Plain data below the
//! state core, which holds it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A fault currently applied to a device (or, with id `*`, to all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActiveFault {
    /// Connections are refused with CONNACK 5.
    RefuseConnect,
    /// TCP connections are closed without CONNACK.
    MqttDown,
    /// Connections are accepted, but telemetry closes the connection without a PUBACK:
    /// over MQTT, IoT Hub signals throttling only by closing.
    Throttled,
}

/// Service misbehaviour that IoT Hub shows under load or failure, on demand.
#[derive(Default)]
pub(crate) struct TestFaults {
    /// Devices whose twin GET/PATCH requests get no response.
    pub withhold_twin: HashSet<String>,
    /// How many more DPS operation polls are answered 429 with `Retry-After`.
    pub dps_throttled_polls: u32,
    /// Devices whose CONNACK comes this much later, as from a slow hub.
    pub connack_delay: HashMap<String, Duration>,
    /// Replaces IoT Hub's one-minute C2D lock (to test redelivery without waiting).
    pub c2d_lock: Option<Duration>,
}
