//! Durable FIFOs kept by the host (beyond imp): an outbox that loses nothing.
//!
//! An entry appended to a [`Queue`] is on the host's disk when [`Queue::append`] returns.
//! It survives disconnects, crashes and restarts of the agent, deploys of new versions and
//! a `kill -9` of the host, until the agent removes it. Each entry gets an id; ids increase
//! across all of the agent's queues and are never reused. All of an agent's queues share
//! one byte quota (`limits.queue_bytes`, 16 MiB unless the operator says otherwise); one
//! entry is at most 1 MiB, or the quota if that is smaller.
//!
//! The usual pattern: append before sending, remove once the other side acknowledged,
//! and send again what is left after a restart.
//!
//! ```no_run
//! use tether_guest::queue::Queue;
//!
//! let outbox = Queue::open("outbox");
//! let id = outbox.append(b"{\"temp\":21.5}")?;
//! // ... publish it; when the broker acknowledges:
//! outbox.remove(id)?;
//! // After a restart, what was not acknowledged, oldest first, 16 at a time:
//! let mut after = 0;
//! loop {
//!     let batch = outbox.entries(after, 16)?;
//!     let Some(last) = batch.last() else { break };
//!     after = last.id;
//!     for entry in &batch {
//!         // ... publish entry.payload again
//!     }
//! }
//! # Ok::<(), tether_guest::queue::QueueError>(())
//! ```

use crate::bindings::tether::agent::queue as wit;

/// One of the agent's queues, by name. Opening is free: the host keeps the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    name: String,
}

/// An entry of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id: greater than the id of every entry appended before it, to any queue.
    pub id: u64,
    /// What was appended.
    pub payload: Vec<u8>,
}

/// The agent's use of all its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Entries over all the queues.
    pub entries: u64,
    /// Payload bytes over all the queues: what counts against the quota.
    pub bytes: u64,
    /// The agent's quota, payload bytes (`limits.queue_bytes`).
    pub quota: u64,
}

/// Why a queue call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The entry would take the agent's queues over their quota; nothing was appended.
    #[error("the agent's queues are full (limits.queue_bytes); remove acknowledged entries or raise the quota")]
    QuotaExceeded,
    /// The entry is over the largest allowed (1 MiB, or the quota if smaller); nothing
    /// was appended.
    #[error("the entry is larger than a queue entry may be (1 MiB, or limits.queue_bytes if smaller); split it")]
    TooLarge,
    /// The queue's name is empty or longer than 64 bytes.
    #[error("a queue name must be 1 to 64 bytes long")]
    InvalidName,
    /// The host could not read or write its queue store; its log says why.
    #[error("the host could not read or write the queue store; see the agent's log")]
    Io,
}

impl From<wit::QueueError> for QueueError {
    fn from(e: wit::QueueError) -> Self {
        match e {
            wit::QueueError::QuotaExceeded => QueueError::QuotaExceeded,
            wit::QueueError::TooLarge => QueueError::TooLarge,
            wit::QueueError::InvalidName => QueueError::InvalidName,
            wit::QueueError::Io => QueueError::Io,
        }
    }
}

impl Queue {
    /// The agent's queue `name` (1 to 64 bytes). It makes no host call: a queue exists
    /// while it has entries, and a bad name is reported by the first call.
    pub fn open(name: &str) -> Queue {
        Queue { name: name.to_owned() }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends `payload`; it is durable when this returns. Returns its id.
    pub fn append(&self, payload: &[u8]) -> Result<u64, QueueError> {
        Ok(wit::append(&self.name, payload)?)
    }

    /// Removes entry `id`; false if it was not in this queue. The removal is written with
    /// the next append or when the current event ends: a host killed in between keeps the
    /// entry, and the agent sees it again (an outbox resends it, as a duplicate).
    pub fn remove(&self, id: u64) -> Result<bool, QueueError> {
        Ok(wit::remove(&self.name, id)?)
    }

    /// Up to `max` entries with an id greater than `after` (0 for the first), oldest
    /// first. The agent's memory must hold them: ask for a few at a time.
    pub fn entries(&self, after: u64, max: u32) -> Result<Vec<Entry>, QueueError> {
        let entries = wit::entries(&self.name, after, max)?;
        Ok(entries.into_iter().map(|e| Entry { id: e.id, payload: e.payload }).collect())
    }
}

/// The agent's use of all its queues, and its quota.
pub fn stats() -> Result<Stats, QueueError> {
    let s = wit::stats()?;
    Ok(Stats { entries: s.entries, bytes: s.bytes, quota: s.quota })
}
