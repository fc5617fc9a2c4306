//! Cheap per-agent counters (relaxed atomics), read by the management API's Prometheus
//! endpoint.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the event latency histogram, seconds.
pub const LATENCY_BUCKETS: [f64; 8] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0];

/// One agent's counters since the host started.
#[derive(Default)]
pub struct AgentMetrics {
    events: AtomicU64,
    /// Calls into the agent (`start`, and one `on-event` per burst of events).
    calls: AtomicU64,
    /// Time the guest ran (`start` and events, pauses between ticks left out), ns: the
    /// agent's CPU use, since guest code never blocks its thread.
    busy_ns: AtomicU64,
    /// Events per bucket of [`LATENCY_BUCKETS`], each counted in the first bucket it fits
    /// (one atomic add per event; [`AgentMetrics::snapshot`] makes them cumulative).
    latency: [AtomicU64; LATENCY_BUCKETS.len()],
    memory_bytes: AtomicU64,
    log_lines: AtomicU64,
    log_dropped: AtomicU64,
    http_requests: AtomicU64,
    http_refused: AtomicU64,
    limit_refused: AtomicU64,
    mqtt_messages: AtomicU64,
    mqtt_pauses: AtomicU64,
    device_messages: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    pub events: u64,
    /// Calls into the agent: `start`, and one per burst of events (see `events.next`).
    pub calls: u64,
    pub busy_seconds: f64,
    /// Cumulative counts for each bound of [`LATENCY_BUCKETS`].
    pub latency_buckets: Vec<u64>,
    pub memory_bytes: u64,
    pub log_lines: u64,
    pub log_dropped: u64,
    pub http_requests: u64,
    /// Outgoing requests refused: not allowed or over the rate.
    pub http_refused: u64,
    /// Calls refused at one of the agent's limits (`limits.mqtt_connections`, `limits.timers`).
    pub limit_refused: u64,
    pub mqtt_messages: u64,
    /// Times an MQTT connection stopped reading because the agent had too many messages
    /// waiting (the broker then holds the rest).
    pub mqtt_pauses: u64,
    pub device_messages: u64,
}

/// What an agent counts besides events.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    Call,
    LogLine,
    LogDropped,
    HttpRequest,
    HttpRefused,
    LimitRefused,
    MqttMessage,
    MqttPause,
    DeviceMessage,
}

impl AgentMetrics {
    /// One event (or `start`) took `took` from call to return, `ran` of it running.
    pub(crate) fn event(&self, took: Duration, ran: Duration) {
        self.events.fetch_add(1, Relaxed);
        self.busy_ns.fetch_add(ran.as_nanos() as u64, Relaxed);
        let secs = took.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|bound| secs <= *bound) {
            self.latency[bucket].fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn add(&self, what: Count) {
        let counter = match what {
            Count::Call => &self.calls,
            Count::LogLine => &self.log_lines,
            Count::LogDropped => &self.log_dropped,
            Count::HttpRequest => &self.http_requests,
            Count::HttpRefused => &self.http_refused,
            Count::LimitRefused => &self.limit_refused,
            Count::MqttMessage => &self.mqtt_messages,
            Count::MqttPause => &self.mqtt_pauses,
            Count::DeviceMessage => &self.device_messages,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn set_memory(&self, bytes: usize) {
        self.memory_bytes.store(bytes as u64, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            events: self.events.load(Relaxed),
            calls: self.calls.load(Relaxed),
            busy_seconds: self.busy_ns.load(Relaxed) as f64 / 1e9,
            latency_buckets: self
                .latency
                .iter()
                .scan(0, |sum, c| {
                    *sum += c.load(Relaxed);
                    Some(*sum)
                })
                .collect(),
            memory_bytes: self.memory_bytes.load(Relaxed),
            log_lines: self.log_lines.load(Relaxed),
            log_dropped: self.log_dropped.load(Relaxed),
            http_requests: self.http_requests.load(Relaxed),
            http_refused: self.http_refused.load(Relaxed),
            limit_refused: self.limit_refused.load(Relaxed),
            mqtt_messages: self.mqtt_messages.load(Relaxed),
            mqtt_pauses: self.mqtt_pauses.load(Relaxed),
            device_messages: self.device_messages.load(Relaxed),
        }
    }
}
