//! Time host calls spend blocked on the disk. An fsync on a busy disk can take a second;
//! the agent's event must not be charged for it as CPU (see `runtime::sched`), or an agent
//! that saves would be stopped for "CPU limit exceeded" whenever the disk is slow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::runtime::RuntimeFlavor;

/// One agent's blocked time, summed; shared by its capabilities and its CPU clock.
#[derive(Clone, Default)]
pub(crate) struct Blocking(Arc<AtomicU64>);

impl Blocking {
    /// Runs `f`, a call that blocks the thread on I/O, counting how long it took. On a
    /// multi-threaded runtime the thread's other tasks (other agents, the agents' URLs)
    /// are handed to another thread first, so that one agent's fsyncs do not hold them up.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let multi = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        let result = if multi { tokio::task::block_in_place(f) } else { f() };
        self.0.fetch_add(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX), Relaxed);
        result
    }

    /// The blocked time so far.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.0.load(Relaxed))
    }
}
