//! Where an agent's queues are kept, behind a trait so that another backend (a cluster's
//! NATS JetStream, say) needs no change to the capability.

use crate::bindings::queue::{Entry, QueueStats};

/// The largest entry, bytes, unless the agent's quota is smaller: one entry never takes a
/// large share of a 64 MiB agent's memory when it is read back.
const MAX_ENTRY_BYTES: u64 = 1024 * 1024;

/// The longest queue name, bytes.
const MAX_NAME_BYTES: usize = 64;

/// Quota bytes per entry an agent may keep: an entry costs the host a row whatever its
/// payload, so empty entries are not free. 262,144 entries at 16 MiB.
pub(crate) const QUOTA_BYTES_PER_ENTRY: u64 = 64;

/// The entries a quota allows: one per [`QUOTA_BYTES_PER_ENTRY`], and at least 16 so that
/// a small quota still holds a few small entries.
pub(crate) fn max_entries(quota: u64) -> u64 {
    (quota / QUOTA_BYTES_PER_ENTRY).max(16)
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    /// The agent's queues would exceed its quota of bytes, or of entries
    /// ([`max_entries`]); nothing was appended.
    #[error("the queues would exceed their quota of {quota} bytes")]
    QuotaExceeded { quota: u64 },
    /// One entry over [`largest_entry`]; nothing was appended.
    #[error("an entry of {len} bytes is over the largest of {max} bytes")]
    TooLarge { len: usize, max: u64 },
    /// An empty name, or one over [`MAX_NAME_BYTES`].
    #[error("a queue name is 1 to {MAX_NAME_BYTES} bytes")]
    InvalidName,
    /// The backend could not read or write.
    #[error(transparent)]
    Io(Box<dyn std::error::Error + Send + Sync>),
}

/// An agent's durable FIFOs, shared by the agent's instances. Every backend enforces the
/// same rules: [`check_name`], [`largest_entry`] and the quota over all the queues.
pub(crate) trait Backend: Send + Sync {
    /// Appends `payload` to queue `name`; durable when it returns. Ids increase across
    /// all of the agent's queues and are never reused.
    fn append(&self, name: &str, payload: &[u8]) -> Result<u64, QueueError>;
    /// Removes entry `id` of queue `name`; false if it was not there. The removal may be
    /// written later, by [`Backend::settle`] at the latest: until then a host that dies
    /// keeps the entry, which comes back when the queue is read again.
    fn remove(&self, name: &str, id: u64) -> Result<bool, QueueError>;
    /// Up to `max` entries of queue `name` with an id over `after`, oldest first.
    fn entries(&self, name: &str, after: u64, max: u32) -> Result<Vec<Entry>, QueueError>;
    /// Entries and payload bytes over all the queues, and the quota.
    fn stats(&self) -> Result<QueueStats, QueueError>;
    /// Writes the removals not yet written; called when the agent's event ends.
    fn settle(&self) -> Result<(), QueueError>;
    /// Whether [`Backend::settle`] has anything to write. Cheap and never blocking: it is
    /// asked after every event, and most events remove nothing.
    fn unsettled(&self) -> bool;
    /// Where the queues are kept, for log lines.
    fn location(&self) -> String;
}

/// Refuses a name that is empty or over [`MAX_NAME_BYTES`].
pub(crate) fn check_name(name: &str) -> Result<(), QueueError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(QueueError::InvalidName);
    }
    Ok(())
}

/// Checks an append of `payload` to queue `name` against the name and size rules; its
/// length, for the quota check the backend makes against what it holds.
pub(crate) fn check_append(name: &str, payload: &[u8], quota: u64) -> Result<u64, QueueError> {
    check_name(name)?;
    let len = payload.len() as u64;
    let max = largest_entry(quota);
    if len > max {
        return Err(QueueError::TooLarge { len: payload.len(), max });
    }
    Ok(len)
}

/// Whether `entries` holding `bytes` leave room under `quota` for one more of `len`.
pub(crate) fn room_for(entries: u64, bytes: u64, len: u64, quota: u64) -> Result<(), QueueError> {
    if bytes.saturating_add(len) > quota || entries >= max_entries(quota) {
        return Err(QueueError::QuotaExceeded { quota });
    }
    Ok(())
}

/// The largest entry an agent with `quota` may append: [`MAX_ENTRY_BYTES`] or the quota,
/// whichever is smaller.
pub(crate) fn largest_entry(quota: u64) -> u64 {
    MAX_ENTRY_BYTES.min(quota)
}
