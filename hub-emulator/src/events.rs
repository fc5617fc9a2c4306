//! What the hub observed, for the control API: telemetry, twin changes, connection
//! changes and C2D outcomes, in order, with a cursor (`seq`) for `?since=` reads.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::metrics::Kind;

/// Oldest events are dropped beyond this many, or beyond this many bytes of message
/// bodies, so a long-running emulator stays bounded.
const CAPACITY: usize = 10_000;
const CAPACITY_BYTES: usize = 64 * 1024 * 1024;

/// One observed event. `seq` increases by one per event, starting at 1.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub seq: u64,
    /// ISO 8601 UTC time the hub recorded it.
    pub time: String,
    pub device_id: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The event's payload; serialized with a `type` tag (`telemetry`, `twinChange`, ...).
#[derive(Debug, Clone, Serialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum EventKind {
    /// A device-to-cloud message. `body` is set when the payload is UTF-8.
    Telemetry {
        body: Option<String>,
        body_base64: String,
        /// Application properties; `None` for a property sent without `=`.
        properties: BTreeMap<String, Option<String>>,
        /// `messageId`, `contentType`, ..., plus the hub-stamped `iothub-*` values.
        system_properties: BTreeMap<String, String>,
    },
    /// A twin section changed; `patch` is the change as applied (with `$version`).
    TwinChange {
        section: &'static str,
        version: u64,
        patch: Value,
    },
    Connected {
        clean_session: bool,
    },
    Disconnected {
        reason: String,
    },
    /// Final state of a C2D message: `Success`, `Expired`, `DeliveryCountExceeded`, `Purged`.
    C2dFeedback {
        message_id: String,
        status: &'static str,
    },
    DeviceCreated,
    DeviceDeleted,
}

impl EventKind {
    /// Bytes of message body held by the event (what dominates memory).
    fn body_bytes(&self) -> usize {
        match self {
            EventKind::Telemetry {
                body, body_base64, ..
            } => body.as_ref().map_or(0, String::len) + body_base64.len(),
            _ => 0,
        }
    }

    /// The `type` tag, for filtering.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Telemetry { .. } => "telemetry",
            EventKind::TwinChange { .. } => "twinChange",
            EventKind::Connected { .. } => "connected",
            EventKind::Disconnected { .. } => "disconnected",
            EventKind::C2dFeedback { .. } => "c2dFeedback",
            EventKind::DeviceCreated => "deviceCreated",
            EventKind::DeviceDeleted => "deviceDeleted",
        }
    }
}

/// Filter for reads: device and event type are optional.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub device_id: Option<String>,
    pub kind: Option<String>,
}

impl EventFilter {
    fn matches(&self, e: &Event) -> bool {
        self.device_id.as_ref().is_none_or(|d| *d == e.device_id)
            && self.kind.as_ref().is_none_or(|k| k == e.kind.type_name())
    }
}

pub(crate) struct EventLog {
    /// Events recorded by type, for `/emulator/metrics`.
    counts: Family<Kind, Counter>,
    /// Events and the total of their `body_bytes`.
    events: Mutex<(VecDeque<Event>, usize)>,
    last_seq: watch::Sender<u64>,
}

impl EventLog {
    pub fn new(counts: Family<Kind, Counter>) -> Self {
        EventLog {
            counts,
            events: Mutex::new((VecDeque::new(), 0)),
            last_seq: watch::Sender::new(0),
        }
    }

    pub fn record(&self, device_id: &str, kind: EventKind) {
        self.counts.get_or_create(&Kind::new(kind.type_name())).inc();
        let mut guard = crate::util::lock(&self.events);
        let (events, bytes) = &mut *guard;
        let seq = *self.last_seq.borrow() + 1;
        *bytes += kind.body_bytes();
        events.push_back(Event {
            seq,
            time: crate::util::iso8601(SystemTime::now()),
            device_id: device_id.to_string(),
            kind,
        });
        while events.len() > CAPACITY || *bytes > CAPACITY_BYTES {
            let Some(old) = events.pop_front() else { break };
            *bytes -= old.kind.body_bytes();
        }
        self.last_seq.send_replace(seq);
    }

    /// Events with `seq > since` matching `filter`, oldest first.
    pub fn since(&self, since: u64, filter: &EventFilter) -> Vec<Event> {
        let guard = crate::util::lock(&self.events);
        guard
            .0
            .iter()
            .filter(|e| e.seq > since && filter.matches(e))
            .cloned()
            .collect()
    }

    /// Like [`EventLog::since`], but waits up to `wait` for at least one event.
    pub async fn wait_since(&self, since: u64, filter: &EventFilter, wait: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.last_seq.subscribe();
        loop {
            let found = self.since(since, filter);
            if !found.is_empty() {
                return found;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Vec::new(),
            }
        }
    }

    pub fn last_seq(&self) -> u64 {
        *self.last_seq.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry(n: usize) -> EventKind {
        EventKind::Telemetry {
            body: None,
            body_base64: "x".repeat(n),
            properties: BTreeMap::new(),
            system_properties: BTreeMap::new(),
        }
    }

    #[test]
    fn log_is_bounded_by_count_and_bytes() {
        let log = EventLog::new(Family::default());
        for _ in 0..CAPACITY + 5 {
            log.record("d", EventKind::DeviceCreated);
        }
        let all = log.since(0, &EventFilter::default());
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 6);
        for _ in 0..3 {
            log.record("d", telemetry(CAPACITY_BYTES / 2));
        }
        let kept = log.since(
            0,
            &EventFilter {
                kind: Some("telemetry".into()),
                ..Default::default()
            },
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(log.last_seq(), CAPACITY as u64 + 8);
    }
}
