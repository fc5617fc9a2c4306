//! A short history of every agent's counters for the console's plots, so that they show
//! something without Prometheus. One sample per interval (10 s by default, the last
//! [`SAMPLES`]), kept in fixed-size rings of small integers: under 1 KiB per agent, idle or
//! not, which the density benchmark measures.
//!
//! Counters are kept as their low 32 bits and diffed with wrapping arithmetic, which is
//! exact as long as one interval adds less than 2^32, and halves what each agent keeps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::kit::metrics::LATENCY_BUCKETS;
use crate::runtime::agent::AgentStatus;
use crate::runtime::host::AgentReport;

/// Samples kept per agent: four minutes at the default interval. With the ring's other
/// fields, its box and its map entry, an agent's history comes to about 850 bytes.
pub const SAMPLES: usize = 24;

/// What happened in one interval.
#[derive(Clone, Copy, Default)]
struct Sample {
    events: u32,
    mqtt: u32,
    device: u32,
    http: u32,
    /// Microseconds the agent's code ran.
    busy_us: u32,
    memory_kib: u32,
    /// Indexes into [`LATENCY_BUCKETS`] of the interval's median and 99th percentile event
    /// time; `LATENCY_BUCKETS.len()` is "longer than the last bound", `u8::MAX` "no events".
    p50: u8,
    p99: u8,
    restarts: u8,
    up: bool,
}

/// Counters as last read, low 32 bits each.
#[derive(Clone, Copy, Default)]
struct Last {
    events: u32,
    mqtt: u32,
    device: u32,
    http: u32,
    busy_us: u32,
    restarts: u32,
    buckets: [u32; LATENCY_BUCKETS.len()],
}

/// One agent's ring.
struct Ring {
    samples: [Sample; SAMPLES],
    /// Where the next sample goes.
    next: u8,
    len: u8,
    last: Last,
}

fn low(n: u64) -> u32 {
    n as u32
}

impl Last {
    fn of(r: &AgentReport) -> Last {
        let m = &r.metrics;
        let mut buckets = [0; LATENCY_BUCKETS.len()];
        for (slot, count) in buckets.iter_mut().zip(&m.latency_buckets) {
            *slot = low(*count);
        }
        Last {
            events: low(m.events),
            mqtt: low(m.mqtt_messages),
            device: low(m.device_messages),
            http: low(m.http_requests),
            busy_us: low((m.busy_seconds * 1e6) as u64),
            restarts: r.restarts,
            buckets,
        }
    }
}

/// The bucket index below which `share` of the interval's `events` fell.
fn quantile(buckets: &[u32; LATENCY_BUCKETS.len()], events: u32, share: f64) -> u8 {
    if events == 0 {
        return u8::MAX;
    }
    let wanted = (f64::from(events) * share).ceil() as u32;
    buckets.iter().position(|&count| count >= wanted).unwrap_or(LATENCY_BUCKETS.len()) as u8
}

impl Ring {
    fn new(r: &AgentReport) -> Ring {
        Ring { samples: [Sample::default(); SAMPLES], next: 0, len: 0, last: Last::of(r) }
    }

    fn push(&mut self, r: &AgentReport) {
        let now = Last::of(r);
        let was = self.last;
        let events = now.events.wrapping_sub(was.events);
        let mut buckets = [0; LATENCY_BUCKETS.len()];
        for (i, slot) in buckets.iter_mut().enumerate() {
            *slot = now.buckets[i].wrapping_sub(was.buckets[i]);
        }
        self.samples[usize::from(self.next)] = Sample {
            events,
            mqtt: now.mqtt.wrapping_sub(was.mqtt),
            device: now.device.wrapping_sub(was.device),
            http: now.http.wrapping_sub(was.http),
            busy_us: now.busy_us.wrapping_sub(was.busy_us),
            memory_kib: u32::try_from(r.metrics.memory_bytes / 1024).unwrap_or(u32::MAX),
            p50: quantile(&buckets, events, 0.5),
            p99: quantile(&buckets, events, 0.99),
            restarts: u8::try_from(now.restarts.wrapping_sub(was.restarts)).unwrap_or(u8::MAX),
            up: r.status == AgentStatus::Running,
        };
        self.last = now;
        self.next = ((usize::from(self.next) + 1) % SAMPLES) as u8;
        self.len = (usize::from(self.len) + 1).min(SAMPLES) as u8;
    }

    /// The samples, oldest first.
    fn ordered(&self) -> impl Iterator<Item = &Sample> {
        let start = (usize::from(self.next) + SAMPLES - usize::from(self.len)) % SAMPLES;
        (0..usize::from(self.len)).map(move |i| &self.samples[(start + i) % SAMPLES])
    }
}

/// Every agent's ring, and when the last sample was taken.
pub struct History {
    interval: Duration,
    /// Boxed, so that the map's spare capacity costs a pointer per slot, not a ring.
    rings: Mutex<(HashMap<String, Box<Ring>>, SystemTime)>,
}

impl History {
    /// An empty history sampled every `interval`.
    pub fn new(interval: Duration) -> History {
        History { interval, rings: Mutex::new((HashMap::new(), UNIX_EPOCH)) }
    }

    /// How often [`History::sample`] should be called.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Takes one sample of every agent in `reports`; an agent seen for the first time
    /// starts its ring with this reading, and agents no longer reported are dropped.
    pub fn sample(&self, reports: &[AgentReport]) {
        let mut guard = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let (rings, at) = &mut *guard;
        if rings.len() > reports.len() {
            let live: std::collections::HashSet<&str> = reports.iter().map(|r| r.id.as_str()).collect();
            rings.retain(|id, _| live.contains(id.as_str()));
        }
        for r in reports {
            match rings.get_mut(&r.id) {
                Some(ring) => ring.push(r),
                None => {
                    rings.insert(r.id.clone(), Box::new(Ring::new(r)));
                }
            }
        }
        *at = SystemTime::now();
    }

    /// Agent `id`'s history as columns for a plot: per second rates, CPU as a share of
    /// one core, and event times in seconds (`null` for an interval without events).
    pub fn columns(&self, id: &str) -> serde_json::Value {
        let guard = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let (rings, at) = &*guard;
        let secs = self.interval.as_secs_f64();
        let end = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let samples: Vec<&Sample> = rings.get(id).map(|r| r.ordered().collect()).unwrap_or_default();
        let n = samples.len();
        let column = |f: &dyn Fn(&Sample) -> serde_json::Value| samples.iter().map(|s| f(s)).collect::<Vec<_>>();
        let rate = |n: u32| json!(f64::from(n) / secs);
        let time = |i: u8| match LATENCY_BUCKETS.get(usize::from(i)) {
            Some(bound) => json!(bound),
            None if i == u8::MAX => serde_json::Value::Null,
            // Past the last bound: shown at twice it, which a plot can still draw.
            None => json!(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] * 2.0),
        };
        json!({
            "interval_s": secs,
            "t": (0..n).map(|i| end - secs * (n - 1 - i) as f64).collect::<Vec<_>>(),
            "events": column(&|s| rate(s.events)),
            "mqtt": column(&|s| rate(s.mqtt)),
            "device": column(&|s| rate(s.device)),
            "http": column(&|s| rate(s.http)),
            "cpu": column(&|s| json!(f64::from(s.busy_us) / 1e6 / secs)),
            "memory_bytes": column(&|s| json!(u64::from(s.memory_kib) * 1024)),
            "p50_s": column(&|s| time(s.p50)),
            "p99_s": column(&|s| time(s.p99)),
            "restarts": column(&|s| json!(s.restarts)),
            "up": column(&|s| json!(s.up)),
        })
    }

    /// Agent `id`'s MQTT and device messages per second, oldest first: the overview's
    /// sparkline.
    pub fn messages(&self, id: &str) -> Vec<f64> {
        let guard = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let secs = self.interval.as_secs_f64();
        guard.0.get(id).map(|r| r.ordered().map(|s| f64::from(s.mqtt.saturating_add(s.device)) / secs).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::metrics::MetricsSnapshot;

    fn report(events: u64, fast: u64, mqtt: u64) -> AgentReport {
        // `fast` events took under the first bound, the rest over the last.
        let metrics = MetricsSnapshot { events, mqtt_messages: mqtt, busy_seconds: events as f64 * 0.001, latency_buckets: vec![fast; LATENCY_BUCKETS.len()], memory_bytes: 65536, ..Default::default() };
        AgentReport { id: "a".into(), status: AgentStatus::Running, restarts: 0, device_connected: None, module_digest: String::new(), slow_lane: false, metrics }
    }

    #[test]
    fn samples_are_rates_over_the_interval_and_the_ring_keeps_the_newest() {
        let history = History::new(Duration::from_secs(10));
        history.sample(&[report(0, 0, 0)]);
        assert_eq!(history.columns("a")["t"].as_array().map(Vec::len), Some(0), "the first reading only starts the ring");
        history.sample(&[report(100, 100, 50)]);
        let c = history.columns("a");
        assert_eq!(c["events"][0], 10.0);
        assert_eq!(c["mqtt"][0], 5.0);
        assert_eq!(c["cpu"][0], 0.01);
        assert_eq!(c["memory_bytes"][0], 65536);
        assert_eq!(c["p50_s"][0], LATENCY_BUCKETS[0]);
        // 200 more events, 100 of them slow: the median is fast, the 99th slow.
        history.sample(&[report(300, 200, 50)]);
        let c = history.columns("a");
        assert_eq!(c["p50_s"][1], LATENCY_BUCKETS[0]);
        assert_eq!(c["p99_s"][1], LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] * 2.0);
        history.sample(&[report(300, 200, 50)]);
        assert_eq!(history.columns("a")["p50_s"][2], serde_json::Value::Null, "no events");
        for i in 0..SAMPLES as u64 {
            history.sample(&[report(1000 + i * 10, 1000 + i * 10, 50)]);
        }
        let c = history.columns("a");
        assert_eq!(c["events"].as_array().map(Vec::len), Some(SAMPLES));
        assert_eq!(c["events"][SAMPLES - 1], 1.0, "the newest last");
        assert_eq!(history.messages("a").len(), SAMPLES);
        history.sample(&[]);
        assert_eq!(history.messages("a").len(), 0, "a removed agent is forgotten");
    }

    #[test]
    fn counters_that_pass_32_bits_still_diff() {
        let history = History::new(Duration::from_secs(1));
        history.sample(&[report(u64::from(u32::MAX) - 5, 0, 0)]);
        history.sample(&[report(u64::from(u32::MAX) + 5, 0, 0)]);
        assert_eq!(history.columns("a")["events"][0], 10.0);
    }

    #[test]
    fn an_agent_keeps_under_a_kibibyte() {
        // The ring, its allocation's header, the map slot (at most half empty) and the id.
        let slot = std::mem::size_of::<String>() + std::mem::size_of::<Box<Ring>>();
        assert!(std::mem::size_of::<Ring>() + 16 + 2 * slot + 32 < 1024, "{}", std::mem::size_of::<Ring>());
    }
}
