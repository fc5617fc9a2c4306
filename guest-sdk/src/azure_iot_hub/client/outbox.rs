//! The client's durable outbox (beyond 5.1.0). With [`ClientOptions::outbox`], a message
//! accepted by `send_message` is in the agent's durable queue before the call returns. It
//! is published whenever the client is connected, in order and at QoS 1, and leaves the
//! queue only once IoT Hub has acknowledged it. What a crashed instance or a stopped host
//! left in the queue is sent by the next instance's client.
//!
//! Each message carries a `$.mid` given at acceptance. A message published, then
//! published again after a crash that came before its acknowledgement, is therefore
//! recognisable as a duplicate.
//!
//! [`ClientOptions::outbox`]: super::ClientOptions::outbox

use std::collections::BTreeMap;

use super::state::OnSent;
use super::topics;
use crate::azure_iot_hub::{ERROR_GENERAL, ERROR_OUTBOX_FULL, Message};
use crate::queue::{Queue, QueueError};

/// Entries read from the queue at a time when a client starts.
const LOAD_BATCH: u32 = 256;

/// The property IoT Hub reads as the message id.
const MESSAGE_ID: &str = "$.mid";

/// A message in the outbox.
enum Payload {
    /// Accepted by this client: the agent's callback gets the message back. The property
    /// bag is kept as encoded for the queue, to be published as it is.
    Accepted { message: Message, on_sent: OnSent, bag: String },
    /// Left by an earlier instance: sent without a callback.
    Restored { bag: String, body: Vec<u8> },
}

struct Item {
    payload: Payload,
    in_flight: bool,
}

/// Why a message was not accepted: the code for `on_sent`, and what to log.
pub(super) struct Refusal {
    pub code: i32,
    pub message: Message,
    pub on_sent: OnSent,
    pub cause: QueueError,
}

/// What the outbox holds and publishes.
pub(super) struct Outbox {
    queue: Queue,
    /// Not yet acknowledged, by queue id: the order they were accepted in.
    items: BTreeMap<u64, Item>,
    /// Every item below this id is being published: the search for the next one starts
    /// here, not at the oldest of up to `max_pending_send_requests` in flight.
    unsent_from: u64,
    /// Message ids are `{prefix}-{n}`; the prefix is random per client, so that ids stay
    /// unique across restarts without being stored.
    prefix: String,
    next: u64,
}

impl Outbox {
    /// The outbox in queue `name`, with what earlier instances left there; also returns
    /// how many that was, or why they could not be read.
    pub(super) fn open(name: &str, random: u64) -> (Outbox, Result<usize, QueueError>) {
        let mut outbox = Outbox { queue: Queue::open(name), items: BTreeMap::new(), unsent_from: 0, prefix: format!("{random:016x}"), next: 0 };
        let loaded = outbox.load();
        (outbox, loaded)
    }

    fn load(&mut self) -> Result<usize, QueueError> {
        let mut after = 0;
        loop {
            let batch = self.queue.entries(after, LOAD_BATCH)?;
            let Some(last) = batch.last() else { return Ok(self.items.len()) };
            after = last.id;
            for entry in batch {
                let payload = match decode(&entry.payload) {
                    Some((bag, body)) => Payload::Restored { bag: bag.to_owned(), body: body.to_vec() },
                    // Written by this module only. Dropping an entry it cannot read would
                    // lose it, and keeping it unsent would block the outbox: it is sent as
                    // it is, as a body without properties, and said so.
                    None => {
                        crate::server::error(format!("[AzureIoTHubMQTTClient] outbox: entry {} is not in the outbox's format; sending it as a plain body", entry.id));
                        Payload::Restored { bag: String::new(), body: entry.payload }
                    }
                };
                self.items.insert(entry.id, Item { payload, in_flight: false });
            }
        }
    }

    /// Keeps `message` durably, with a message id if it has none.
    pub(super) fn accept(&mut self, mut message: Message, on_sent: OnSent) -> Result<(), Refusal> {
        if !message.properties().contains_key(MESSAGE_ID) {
            self.next += 1;
            message.set_property(MESSAGE_ID, format!("{}-{}", self.prefix, self.next));
        }
        let bag = topics::encode_properties(message.properties());
        match self.queue.append(&encode(&bag, message.body())) {
            Ok(id) => {
                self.items.insert(id, Item { payload: Payload::Accepted { message, on_sent, bag }, in_flight: false });
                Ok(())
            }
            Err(cause) => {
                let code = if matches!(cause, QueueError::QuotaExceeded) { ERROR_OUTBOX_FULL } else { ERROR_GENERAL };
                Err(Refusal { code, message, on_sent, cause })
            }
        }
    }

    /// The oldest message not being published, now marked as being published: its id,
    /// property bag and body.
    pub(super) fn next_to_send(&mut self) -> Option<(u64, String, Vec<u8>)> {
        let (id, item) = self.items.range_mut(self.unsent_from..).find(|(_, item)| !item.in_flight)?;
        item.in_flight = true;
        self.unsent_from = *id + 1;
        let (bag, body) = match &item.payload {
            Payload::Accepted { message, bag, .. } => (bag.clone(), message.body().to_vec()),
            Payload::Restored { bag, body } => (bag.clone(), body.clone()),
        };
        Some((*id, bag, body))
    }

    /// Whether message `id` is being published.
    pub(super) fn in_flight(&self, id: u64) -> bool {
        self.items.get(&id).is_some_and(|item| item.in_flight)
    }

    /// IoT Hub acknowledged message `id`: it leaves the queue. Returns the agent's
    /// callback with its message, if this client accepted it, and whether the removal was
    /// written (if not, the message is sent again by a later instance).
    pub(super) fn acked(&mut self, id: u64) -> (Option<(Message, OnSent)>, Result<bool, QueueError>) {
        let removed = self.queue.remove(id);
        let done = match self.items.remove(&id).map(|item| item.payload) {
            Some(Payload::Accepted { message, on_sent, .. }) => Some((message, on_sent)),
            _ => None,
        };
        (done, removed)
    }

    /// Message `id` was not acknowledged: it waits to be published again.
    pub(super) fn failed(&mut self, id: u64) {
        if let Some(item) = self.items.get_mut(&id) {
            item.in_flight = false;
            self.unsent_from = self.unsent_from.min(id);
        }
    }

    /// The connection is gone: nothing is being published any more.
    pub(super) fn all_back(&mut self) {
        for item in self.items.values_mut() {
            item.in_flight = false;
        }
        self.unsent_from = 0;
    }

    /// Messages not yet acknowledged.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }
}

/// An entry: the property bag's length (4 bytes, little-endian), the bag, the body.
fn encode(bag: &str, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(bag.len()).unwrap_or(u32::MAX);
    let mut entry = Vec::with_capacity(4 + bag.len() + body.len());
    entry.extend_from_slice(&len.to_le_bytes());
    entry.extend_from_slice(bag.as_bytes());
    entry.extend_from_slice(body);
    entry
}

fn decode(entry: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::try_from(u32::from_le_bytes(entry.get(..4)?.try_into().ok()?)).ok()?;
    let bag = std::str::from_utf8(entry.get(4..4 + len)?).ok()?;
    Some((bag, entry.get(4 + len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_the_bag_and_the_body() {
        let entry = encode("%24.mid=a-1&unit=C", b"22.5");
        assert_eq!(decode(&entry), Some(("%24.mid=a-1&unit=C", &b"22.5"[..])));
        assert_eq!(decode(&encode("", b"")), Some(("", &b""[..])));
        assert_eq!(decode(b"\xff\xff\xff\xffx"), None, "a bag longer than the entry");
        assert_eq!(decode(b"ab"), None);
    }
}
