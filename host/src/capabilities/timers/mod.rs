//! The `timers` capability: tokio sleeps that post a `timer` event.

use std::collections::HashMap;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::events::Event;
use crate::bindings::timers::{self as wit, TimerError};
use crate::kit::Handles;
use crate::kit::events::Events;
use crate::kit::log::Quiet;
use crate::kit::tasks::TaskGuard;

/// imp's largest wakeup interval, s.
const MAX_SECONDS: f64 = 10_737_418.0;

/// The event a timer posts when it fires.
pub(crate) struct Fired(pub u64);

/// An instance's pending timers; dropping it cancels them all.
pub(crate) struct Timers {
    handles: Handles,
    events: Events<Fired>,
    next_id: u64,
    /// Scheduled, or fired and not yet delivered: each a task and memory of the host's.
    active: HashMap<u64, TaskGuard>,
    /// `limits.timers`.
    max: usize,
    /// When the log last said that `max` was reached.
    full: Quiet,
}

impl Timers {
    pub fn new(handles: Handles, events: Events<Fired>, max: usize) -> Timers {
        Timers { handles, events, next_id: 0, active: HashMap::new(), max, full: Quiet::default() }
    }

    /// The event to deliver for a fired timer: `None` if it was cancelled after it fired
    /// but before the agent got to it.
    pub fn prepare(&mut self, Fired(id): Fired) -> Option<Event> {
        self.active.remove(&id).is_some().then_some(Event::Timer(id))
    }
}

impl wit::Host for Timers {
    fn wakeup(&mut self, seconds: f64) -> Result<u64, TimerError> {
        if self.active.len() >= self.max {
            let n = self.max;
            self.handles.log.limit_refused(&self.full, || format!("timers: wakeup refused: {n} timers pending, the most limits.timers allows"));
            return Err(TimerError::TooManyTimers);
        }
        // NaN and negative intervals mean "now", as imp clamps them.
        let seconds = if seconds.is_finite() { seconds.clamp(0.0, MAX_SECONDS) } else if seconds > 0.0 { MAX_SECONDS } else { 0.0 };
        self.next_id += 1;
        let id = self.next_id;
        let events = self.events.clone();
        let task = TaskGuard::spawn(&self.handles.io, async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            events.post(Fired(id));
        });
        self.active.insert(id, task);
        Ok(id)
    }

    fn cancel(&mut self, id: u64) -> bool {
        self.active.remove(&id).is_some()
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Timers) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Timers>>(linker, get)
}
