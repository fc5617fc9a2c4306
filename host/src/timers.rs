//! The `timers` capability: tokio sleeps that post a `timer` event.

use std::collections::HashMap;
use std::time::Duration;

use crate::agent::AgentCtx;
use crate::events::{HostEvent, TaskGuard};

/// imp's largest wakeup interval, s.
const MAX_SECONDS: f64 = 10_737_418.0;

/// An instance's pending timers; dropping it cancels them all.
#[derive(Default)]
pub(crate) struct Timers {
    next_id: u64,
    active: HashMap<u64, TaskGuard>,
}

impl Timers {
    /// Called when a timer's event is about to be delivered: false if it was cancelled
    /// after it fired but before the agent got to it.
    pub fn fired(&mut self, id: u64) -> bool {
        self.active.remove(&id).is_some()
    }
}

impl crate::bindings::timers::Host for AgentCtx {
    fn wakeup(&mut self, seconds: f64) -> u64 {
        // NaN and negative intervals mean "now", as imp clamps them.
        let seconds = if seconds.is_finite() { seconds.clamp(0.0, MAX_SECONDS) } else if seconds > 0.0 { MAX_SECONDS } else { 0.0 };
        let timers = &mut self.timers;
        timers.next_id += 1;
        let id = timers.next_id;
        let events = self.events.clone();
        let task = TaskGuard::spawn(&self.agent.host.io, async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            events.post(HostEvent::Timer(id));
        });
        timers.active.insert(id, task);
        id
    }

    fn cancel(&mut self, id: u64) -> bool {
        self.timers.active.remove(&id).is_some()
    }
}
