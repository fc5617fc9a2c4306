//! The emulator's own metrics, in OpenMetrics text (prometheus-client): what it saw
//! happen (events by type, refused and throttled connections, direct methods and their
//! latency) as counters kept while it runs, and what it holds now (devices, connections,
//! C2D queues) read from its state at each scrape. Served at `/emulator/metrics` with the
//! control token, and on the hub page of `tether hub`.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// A label set of one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Kind {
    kind: &'static str,
}

/// Counters kept as the hub runs.
#[derive(Debug)]
pub(crate) struct HubMetrics {
    /// Events recorded, by type: `telemetry`, `twinChange`, `connected`, ... (the event
    /// log counts into it: [`HubMetrics::events`]).
    events: Family<Kind, Counter>,
    /// Device and DPS connections refused, by reason.
    refused: Family<Kind, Counter>,
    /// Connections closed for going over a throttling limit.
    throttled: Counter,
    /// Cloud-to-device messages accepted into a device's queue.
    c2d_enqueued: Counter,
    /// Direct methods invoked through the service API, by outcome.
    methods: Family<Kind, Counter>,
    /// Time from a method's invocation to the device's answer (or the timeout).
    method_seconds: Histogram,
}

/// Every value the `kind` labels take, so that each series exists from the start at 0
/// (a query over a refusal that never happened returns 0, not nothing).
const EVENT_KINDS: [&str; 7] = ["telemetry", "twinChange", "connected", "disconnected", "c2dFeedback", "deviceCreated", "deviceDeleted"];
const REFUSALS: [&str; 5] = ["device_auth", "dps_auth", "protocol_version", "fault_mqtt_down", "fault_auth_error"];
const METHOD_OUTCOMES: [&str; 5] = ["answered", "timeout", "not_online", "device_not_found", "response_too_large"];

impl Default for HubMetrics {
    fn default() -> Self {
        let metrics = HubMetrics {
            events: Family::default(),
            refused: Family::default(),
            throttled: Counter::default(),
            c2d_enqueued: Counter::default(),
            methods: Family::default(),
            method_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        };
        for (family, kinds) in [(&metrics.events, &EVENT_KINDS[..]), (&metrics.refused, &REFUSALS[..]), (&metrics.methods, &METHOD_OUTCOMES[..])] {
            for kind in kinds {
                drop(family.get_or_create(&Kind { kind }));
            }
        }
        metrics
    }
}

impl Kind {
    pub fn new(kind: &'static str) -> Kind {
        Kind { kind }
    }
}

impl HubMetrics {
    /// The family the event log counts events into, by type.
    pub fn events(&self) -> Family<Kind, Counter> {
        self.events.clone()
    }

    pub fn refused(&self, kind: &'static str) {
        self.refused.get_or_create(&Kind { kind }).inc();
    }

    pub fn throttled(&self) {
        self.throttled.inc();
    }

    pub fn c2d_enqueued(&self) {
        self.c2d_enqueued.inc();
    }

    /// A direct method ended with `outcome` (`answered`, `timeout`, `not_connected`, ...)
    /// after `took`.
    pub fn method(&self, outcome: &'static str, took: Duration) {
        self.methods.get_or_create(&Kind { kind: outcome }).inc();
        self.method_seconds.observe(took.as_secs_f64());
    }

    /// Registers the counters in `registry` (families share their values with `self`).
    fn register(&self, registry: &mut Registry) {
        registry.register("tether_hub_events", "Events the hub recorded, by type (telemetry, twinChange, connected, disconnected, c2dFeedback, ...)", self.events.clone());
        registry.register("tether_hub_connections_refused", "Device and DPS connections refused, by reason", self.refused.clone());
        registry.register("tether_hub_throttled", "Connections closed for going over a throttling limit", self.throttled.clone());
        registry.register("tether_hub_c2d_enqueued", "Cloud-to-device messages accepted into a device's queue (their ends are c2dFeedback events)", self.c2d_enqueued.clone());
        registry.register("tether_hub_methods", "Direct methods invoked through the service API, by outcome", self.methods.clone());
        registry.register_with_unit("tether_hub_method", "Time from a direct method's invocation to the device's answer or the timeout", Unit::Seconds, self.method_seconds.clone());
    }
}

/// What the hub holds at the scrape.
#[derive(Debug)]
pub(crate) struct Holdings {
    pub devices: u64,
    pub connections: u64,
    /// Per device with messages waiting: its id and their number.
    pub c2d_queued: Vec<(String, u64)>,
}

impl Collector for Holdings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = ConstGauge::new(self.devices as i64);
        devices.encode(encoder.encode_descriptor("tether_hub_devices", "Devices in the registry", None, devices.metric_type())?)?;
        let connections = ConstGauge::new(self.connections as i64);
        connections.encode(encoder.encode_descriptor("tether_hub_connections", "Live device MQTT connections", None, connections.metric_type())?)?;
        let mut family = encoder.encode_descriptor("tether_hub_c2d_queued", "Cloud-to-device messages waiting for a device, per device that has any", None, prometheus_client::metrics::MetricType::Gauge)?;
        for (device, queued) in &self.c2d_queued {
            let labels = [("device", device.as_str())];
            ConstGauge::new(*queued as i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The metrics as OpenMetrics text.
pub(crate) fn render(metrics: &HubMetrics, holdings: Holdings) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(holdings));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_holdings_render_as_openmetrics() {
        let metrics = HubMetrics::default();
        metrics.events().get_or_create(&Kind::new("telemetry")).inc_by(2);
        metrics.refused("auth");
        metrics.throttled();
        metrics.c2d_enqueued();
        metrics.method("answered", Duration::from_millis(3));
        let text = render(&metrics, Holdings { devices: 2, connections: 1, c2d_queued: vec![("d1".into(), 3)] }).expect("renders");
        for line in [
            r#"tether_hub_events_total{kind="telemetry"} 2"#,
            r#"tether_hub_connections_refused_total{kind="auth"} 1"#,
            "tether_hub_throttled_total 1",
            "tether_hub_c2d_enqueued_total 1",
            r#"tether_hub_methods_total{kind="answered"} 1"#,
            "tether_hub_method_seconds_count 1",
            r#"tether_hub_method_seconds_bucket{le="0.005"} 1"#,
            "tether_hub_devices 2",
            "tether_hub_connections 1",
            r#"tether_hub_methods_total{kind="timeout"} 0"#,
            r#"tether_hub_c2d_queued{device="d1"} 3"#,
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
    }
}
