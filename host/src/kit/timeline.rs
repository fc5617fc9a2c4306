//! An agent's recent traffic at its two edges, for the console's timeline: device messages
//! in and out on the serial line, and MQTT messages in and out with the broker's
//! acknowledgements. Merged with the agent's log by time, it lets a reading be followed
//! from the serial line to the cloud.
//!
//! It records only while someone watches (a console page asked for it within the last
//! [`WATCH`]): an agent nobody looks at pays one atomic read per message, and holds no
//! entries, so 100,000 idle agents keep their memory.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Entries kept per agent.
const CAPACITY: usize = 200;
/// Bytes of a payload shown.
const PREVIEW: usize = 160;
/// How long one look keeps the recording on.
pub const WATCH: Duration = Duration::from_secs(60);

/// Where an entry happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// The serial line: a device message.
    Device,
    /// The MQTT broker (IoT Hub, or any broker the agent uses).
    Broker,
}

/// One message at an edge.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub edge: Edge,
    /// `true`: towards the agent.
    pub inbound: bool,
    /// The device message's name, the MQTT topic, or what the broker acknowledged.
    pub what: String,
    /// The payload's first bytes, as text.
    pub preview: String,
}

/// One agent's timeline.
#[derive(Default)]
pub struct Timeline {
    /// Until when (ms since the epoch) to record.
    watched_until: AtomicU64,
    entries: Mutex<VecDeque<Entry>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The payload's first bytes: as text if they are UTF-8, else in hex (device messages are
/// often binary), marked when cut.
fn preview(payload: &[u8]) -> String {
    let head = &payload[..payload.len().min(PREVIEW)];
    let text = match std::str::from_utf8(head) {
        Ok(text) => Some(text),
        // Text whose cut fell inside a character: up to that character.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    let (mut text, cut) = match text {
        Some(text) => (text.to_owned(), text.len()),
        None => {
            let shown = payload.len().min(PREVIEW / 3);
            let hex: Vec<String> = payload[..shown].iter().map(|b| format!("{b:02x}")).collect();
            (format!("({} bytes) {}", payload.len(), hex.join(" ")), shown)
        }
    };
    if cut < payload.len() {
        text.push('…');
    }
    text
}

impl Timeline {
    /// Records one message if someone is watching; `payload` is cut to a preview.
    pub(crate) fn record(&self, edge: Edge, inbound: bool, what: &str, payload: &[u8]) {
        if !self.watching() {
            return;
        }
        let now = now_ms();
        let preview = preview(payload);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == CAPACITY {
            entries.pop_front();
        }
        entries.push_back(Entry { at_ms: now, edge, inbound, what: what.to_owned(), preview });
    }

    /// Whether [`Timeline::record`] would keep an entry now: lets a caller skip the copy
    /// it would need for one.
    pub(crate) fn watching(&self) -> bool {
        let until = self.watched_until.load(Relaxed);
        // 0: nobody has looked lately. Every message asks, so the clock is read only
        // while someone may be watching.
        if until == 0 {
            return false;
        }
        if now_ms() <= until {
            return true;
        }
        // Lost to a new `watch` in between, it is read again next time: no harm.
        let _ = self.watched_until.compare_exchange(until, 0, Relaxed, Relaxed);
        false
    }

    /// The entries, oldest first; and recording goes on for [`WATCH`] from now.
    pub fn watch(&self) -> Vec<Entry> {
        self.watched_until.store(now_ms() + WATCH.as_millis() as u64, Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let list = entries.iter().cloned().collect();
        // Once nobody has looked for a while, the old entries are of no use either.
        if entries.len() == CAPACITY {
            entries.shrink_to_fit();
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_records_only_while_watched_and_keeps_the_newest() {
        let timeline = Timeline::default();
        timeline.record(Edge::Device, true, "temperature", b"21.5");
        assert!(timeline.watch().is_empty(), "nobody watched: nothing kept");
        timeline.record(Edge::Device, true, "temperature", b"21.5");
        timeline.record(Edge::Broker, false, "devices/d/messages/events/", &[b'x'; 400]);
        let entries = timeline.watch();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].edge, entries[0].inbound, entries[0].what.as_str(), entries[0].preview.as_str()), (Edge::Device, true, "temperature", "21.5"));
        assert_eq!(entries[1].preview.chars().count(), PREVIEW + 1, "cut, and marked as cut");
        timeline.record(Edge::Device, true, "reading", &[0xfb, 0x40, 0x34]);
        assert_eq!(timeline.watch().last().map(|e| e.preview.clone()).as_deref(), Some("(3 bytes) fb 40 34"), "binary in hex");
        for i in 0..CAPACITY + 5 {
            timeline.record(Edge::Device, false, &i.to_string(), b"");
        }
        let entries = timeline.watch();
        assert_eq!(entries.len(), CAPACITY);
        assert_eq!(entries[CAPACITY - 1].what, (CAPACITY + 4).to_string());
    }

    #[test]
    fn a_lapsed_watch_stops_recording_and_reading_the_clock() {
        let timeline = Timeline::default();
        assert!(timeline.watch().is_empty());
        assert!(timeline.watching());
        // The watch ran out a moment ago.
        timeline.watched_until.store(now_ms() - 1, Relaxed);
        timeline.record(Edge::Device, true, "late", b"");
        assert!(!timeline.watching());
        assert_eq!(timeline.watched_until.load(Relaxed), 0, "marked as not watched: no clock reading next time");
        assert!(timeline.watch().is_empty(), "nothing kept after the watch lapsed");
    }
}
