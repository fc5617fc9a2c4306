//! Background work that ends with its owner.

/// A task that is aborted when its owner drops this, so that an agent's timers and
/// connections end with the instance that started them.
pub(crate) struct TaskGuard(tokio::task::AbortHandle);

impl TaskGuard {
    /// Spawns `future` on `io`, the host's runtime (whichever thread the calling guest
    /// code runs on).
    pub fn spawn<F>(io: &tokio::runtime::Handle, future: F) -> TaskGuard
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        TaskGuard(io.spawn(future).abort_handle())
    }
}

impl From<tokio::task::JoinHandle<()>> for TaskGuard {
    /// Guards a task spawned elsewhere (such as [`AgentLane::spawn`](super::lanes::AgentLane::spawn)).
    fn from(task: tokio::task::JoinHandle<()>) -> TaskGuard {
        TaskGuard(task.abort_handle())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
