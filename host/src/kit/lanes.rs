//! Where an agent's tasks run: on the host's runtime, or, while the agent is heavy, with it
//! on the slow lane (see `runtime::sched`). An agent's MQTT connections follow it there, so
//! that a flooding agent and its connection share a thread instead of handing every message
//! across.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::Poll;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The host's runtime and, if it is on, the slow lane's.
#[derive(Clone)]
pub(crate) struct Lanes {
    io: Handle,
    lane: Option<Handle>,
}

impl Lanes {
    pub fn new(io: Handle, lane: Option<Handle>) -> Lanes {
        Lanes { io, lane }
    }

    /// Spawns `task` on the host's runtime; whenever it pauses with `slow` set, it moves to
    /// the slow lane, and back when it pauses with `slow` clear. The task is owned by the
    /// host's runtime: aborting the handle ends it wherever it runs (at its next pause).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static, slow: Arc<AtomicBool>) -> JoinHandle<()> {
        let Some(lane) = self.lane.clone() else {
            return self.io.spawn(task);
        };
        self.io.spawn(async move {
            let mut task: Task = Box::pin(task);
            loop {
                task = match until(task, &slow, true).await {
                    Some(task) => task,
                    None => return,
                };
                let slow = slow.clone();
                let mut moved = AbortOnDrop(lane.spawn(async move { until(task, &slow, false).await }));
                task = match (&mut moved.0).await {
                    Ok(Some(task)) => task,
                    Ok(None) => return,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => return,
                };
            }
        })
    }
}

/// One agent's place: its tasks go where the agent runs.
#[derive(Clone)]
pub(crate) struct AgentLane {
    pub lanes: Lanes,
    /// Set while the agent belongs in the slow lane.
    pub slow: Arc<AtomicBool>,
}

impl AgentLane {
    /// Spawns `task` to follow the agent between the lanes.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        self.lanes.spawn(task, self.slow.clone())
    }
}

/// Polls `task` until it ends (`None`) or pauses with `slow` equal to `leave_when`.
async fn until(mut task: Task, slow: &AtomicBool, leave_when: bool) -> Option<Task> {
    let ended = std::future::poll_fn(|cx| match task.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(true),
        Poll::Pending if slow.load(Relaxed) == leave_when => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    })
    .await;
    (!ended).then_some(task)
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
