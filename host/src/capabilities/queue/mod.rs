//! The `queue` capability (beyond imp): durable FIFOs per agent under one byte quota, kept
//! by a [`Backend`] so that where they live can change without touching the rest.

mod backend;
mod sqlite;

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::queue::{self as wit, Entry, QueueStats};
use crate::kit::blocking::Blocking;
use crate::kit::log::{Level, Logger};
pub(crate) use backend::{Backend, QueueError, check_append, check_name, room_for};
pub(crate) use sqlite::SqliteQueues;

/// The capability's state in an instance: the agent's queues, which outlive it.
pub(crate) struct Queues {
    backend: Arc<dyn Backend>,
    log: Logger,
    blocking: Blocking,
}

impl Queues {
    pub fn new(backend: Arc<dyn Backend>, log: Logger, blocking: Blocking) -> Queues {
        Queues { backend, log, blocking }
    }

    /// Writes what the agent removed during the event that just ended, so that a host that
    /// dies later does not send it again. Most events remove nothing: those do not pay for
    /// [`Blocking::run`], which hands the thread's other tasks to another thread.
    pub fn settle(&self) {
        if !self.backend.unsettled() {
            return;
        }
        if let Err(e) = self.blocking.run(|| self.backend.settle()) {
            self.refusal(e);
        }
    }

    /// The agent's answer to `e`; the host's own failures are logged, as the agent only
    /// learns that there was one.
    fn refusal(&self, e: QueueError) -> wit::QueueError {
        match e {
            QueueError::QuotaExceeded { .. } => wit::QueueError::QuotaExceeded,
            QueueError::TooLarge { .. } => wit::QueueError::TooLarge,
            QueueError::InvalidName => wit::QueueError::InvalidName,
            QueueError::Io(e) => {
                self.log.write(Level::Error, &format!("queue: cannot use {}: {e}", self.backend.location()));
                wit::QueueError::Io
            }
        }
    }
}

// Synchronous host calls: the guest waits until the backend has made the entry durable,
// which is the promise of `append` (the SQLite backend says what that costs).
impl wit::Host for Queues {
    fn append(&mut self, name: String, payload: Vec<u8>) -> Result<u64, wit::QueueError> {
        self.blocking.run(|| self.backend.append(&name, &payload)).map_err(|e| self.refusal(e))
    }

    fn remove(&mut self, name: String, id: u64) -> Result<bool, wit::QueueError> {
        self.blocking.run(|| self.backend.remove(&name, id)).map_err(|e| self.refusal(e))
    }

    fn entries(&mut self, name: String, after: u64, max: u32) -> Result<Vec<Entry>, wit::QueueError> {
        self.blocking.run(|| self.backend.entries(&name, after, max)).map_err(|e| self.refusal(e))
    }

    fn stats(&mut self) -> Result<QueueStats, wit::QueueError> {
        self.blocking.run(|| self.backend.stats()).map_err(|e| self.refusal(e))
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Queues) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Queues>>(linker, get)
}
