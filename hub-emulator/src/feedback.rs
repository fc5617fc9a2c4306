//! The service-bound C2D feedback queue (`/messages/serviceBound/feedback`, protocol
//! notes §1.11, §2.2): outcome records of C2D messages sent with `iothub-ack`, handed to
//! the service in locked batches it completes or abandons.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use crate::util::{iso8601, lock, new_uuid};

/// "batched per 64 records": the most records one feedback message carries.
const MAX_BATCH: usize = 64;
/// Feedback lock: "5..300 s default 60".
pub(crate) const FEEDBACK_LOCK: Duration = Duration::from_secs(60);
/// Feedback TTL: "default 1 h"; records and batches older than this are dropped.
const FEEDBACK_TTL: Duration = Duration::from_secs(3600);

/// Whether a message's `iothub-ack` asks for feedback on an outcome: `positive` for
/// `Success` only, `negative` for every other outcome, `full` for both.
fn wanted(ack: &str, status: &str) -> bool {
    match ack {
        "full" => true,
        "positive" => status == "Success",
        "negative" => status != "Success",
        _ => false,
    }
}

/// One batch handed out by [`FeedbackQueue::receive`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeedbackBatch {
    pub lock_token: String,
    pub message_id: String,
    pub enqueued_time: String,
    pub delivery_count: u32,
    /// JSON array of feedback records.
    pub body: Value,
}

struct Record {
    created: Instant,
    json: Value,
}

struct Batch {
    created: Instant,
    message_id: String,
    enqueued_time: String,
    records: Vec<Value>,
    delivery_count: u32,
    /// Token and lock expiry of the current delivery, if any.
    lock: Option<(String, Instant)>,
}

#[derive(Default)]
struct Inner {
    pending: VecDeque<Record>,
    batches: VecDeque<Batch>,
}

/// The hub-wide feedback queue; its lock is a leaf (taken under the state lock).
#[derive(Default)]
pub(crate) struct FeedbackQueue {
    inner: Mutex<Inner>,
}

impl FeedbackQueue {
    /// Records the outcome `status` of C2D message `message_id` if its `ack` asks for it.
    pub fn offer(
        &self,
        device_id: &str,
        generation_id: &str,
        message_id: &str,
        ack: &str,
        status: &str,
    ) {
        if !wanted(ack, status) {
            return;
        }
        let json = json!({
            "originalMessageId": message_id,
            "enqueuedTimeUtc": iso8601(SystemTime::now()),
            "statusCode": status,
            "description": status,
            "deviceId": device_id,
            "deviceGenerationId": generation_id,
        });
        lock(&self.inner).pending.push_back(Record {
            created: Instant::now(),
            json,
        });
    }

    /// Hands out the oldest unlocked batch (made from waiting records if none is
    /// left), locked for `lock_for`; `None` when there is no feedback.
    pub fn receive(&self, lock_for: Duration) -> Option<FeedbackBatch> {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let fresh = |created: Instant| now.duration_since(created) < FEEDBACK_TTL;
        inner.pending.retain(|r| fresh(r.created));
        inner.batches.retain(|b| fresh(b.created));
        let unlocked = |b: &Batch| b.lock.as_ref().is_none_or(|(_, until)| *until <= now);
        let index = match inner.batches.iter().position(unlocked) {
            Some(i) => i,
            None if inner.pending.is_empty() => return None,
            None => {
                let take = inner.pending.len().min(MAX_BATCH);
                let records = inner.pending.drain(..take).map(|r| r.json).collect();
                inner.batches.push_back(Batch {
                    created: now,
                    message_id: new_uuid(),
                    enqueued_time: iso8601(SystemTime::now()),
                    records,
                    delivery_count: 0,
                    lock: None,
                });
                inner.batches.len() - 1
            }
        };
        let batch = inner.batches.get_mut(index)?;
        let token = new_uuid();
        batch.lock = Some((token.clone(), now + lock_for));
        batch.delivery_count += 1;
        Some(FeedbackBatch {
            lock_token: token,
            message_id: batch.message_id.clone(),
            enqueued_time: batch.enqueued_time.clone(),
            delivery_count: batch.delivery_count,
            body: Value::Array(batch.records.clone()),
        })
    }

    /// Completes (removes) the batch locked with `token`; false if the lock is unknown
    /// or expired.
    pub fn complete(&self, token: &str) -> bool {
        let mut inner = lock(&self.inner);
        match Self::locked(&inner, token) {
            Some(i) => inner.batches.remove(i).is_some(),
            None => false,
        }
    }

    /// Abandons the lock `token`: the batch can be received again at once.
    pub fn abandon(&self, token: &str) -> bool {
        let mut inner = lock(&self.inner);
        match Self::locked(&inner, token).and_then(|i| inner.batches.get_mut(i)) {
            Some(batch) => {
                batch.lock = None;
                true
            }
            None => false,
        }
    }

    /// Index of the batch whose current, unexpired lock is `token`.
    fn locked(inner: &Inner, token: &str) -> Option<usize> {
        let now = Instant::now();
        inner.batches.iter().position(|b| {
            b.lock
                .as_ref()
                .is_some_and(|(t, until)| t == token && *until > now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_modes_select_outcomes() {
        let q = FeedbackQueue::default();
        for (ack, status) in [
            ("none", "Success"),
            ("positive", "Success"),
            ("positive", "Expired"),
            ("negative", "Success"),
            ("negative", "DeliveryCountExceeded"),
            ("full", "Purged"),
        ] {
            q.offer("d", "1", &format!("{ack}-{status}"), ack, status);
        }
        let batch = q.receive(FEEDBACK_LOCK).unwrap();
        let ids: Vec<&str> = batch
            .body
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["originalMessageId"].as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "positive-Success",
                "negative-DeliveryCountExceeded",
                "full-Purged"
            ]
        );
    }

    #[test]
    fn locks_abandon_complete_and_expiry() {
        let q = FeedbackQueue::default();
        assert_eq!(q.receive(FEEDBACK_LOCK), None);
        for i in 0..70 {
            q.offer("d", "1", &i.to_string(), "full", "Success");
        }
        let first = q.receive(FEEDBACK_LOCK).unwrap();
        assert_eq!(first.body.as_array().unwrap().len(), MAX_BATCH);
        let second = q.receive(FEEDBACK_LOCK).unwrap();
        assert_eq!(second.body.as_array().unwrap().len(), 6);
        assert_eq!(q.receive(FEEDBACK_LOCK), None, "both batches are locked");
        assert!(q.abandon(&first.lock_token));
        assert!(!q.complete(&first.lock_token), "an abandoned lock is gone");
        let again = q.receive(FEEDBACK_LOCK).unwrap();
        assert_eq!(
            (&again.message_id, again.delivery_count),
            (&first.message_id, 2)
        );
        assert_ne!(again.lock_token, first.lock_token);
        assert!(q.complete(&again.lock_token));
        assert!(q.complete(&second.lock_token));
        assert_eq!(q.receive(FEEDBACK_LOCK), None);
        // An expired lock makes the batch receivable again and its token useless.
        q.offer("d", "1", "late", "full", "Success");
        let short = q.receive(Duration::ZERO).unwrap();
        assert!(!q.complete(&short.lock_token));
        assert_eq!(q.receive(FEEDBACK_LOCK).unwrap().message_id, short.message_id);
    }
}
