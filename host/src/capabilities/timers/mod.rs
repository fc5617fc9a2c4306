//! The `timers` capability: tokio sleeps that post a `timer` event.

use std::collections::HashMap;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::events::Event;
use crate::bindings::timers as wit;
use crate::kit::events::Events;
use crate::kit::tasks::TaskGuard;

/// imp's largest wakeup interval, s.
const MAX_SECONDS: f64 = 10_737_418.0;

/// The event a timer posts when it fires.
pub(crate) struct Fired(pub u64);

/// An instance's pending timers; dropping it cancels them all.
pub(crate) struct Timers {
    io: tokio::runtime::Handle,
    events: Events<Fired>,
    next_id: u64,
    active: HashMap<u64, TaskGuard>,
}

impl Timers {
    pub fn new(io: tokio::runtime::Handle, events: Events<Fired>) -> Timers {
        Timers { io, events, next_id: 0, active: HashMap::new() }
    }

    /// The event to deliver for a fired timer: `None` if it was cancelled after it fired
    /// but before the agent got to it.
    pub fn prepare(&mut self, Fired(id): Fired) -> Option<Event> {
        self.active.remove(&id).is_some().then_some(Event::Timer(id))
    }
}

impl wit::Host for Timers {
    fn wakeup(&mut self, seconds: f64) -> u64 {
        // NaN and negative intervals mean "now", as imp clamps them.
        let seconds = if seconds.is_finite() { seconds.clamp(0.0, MAX_SECONDS) } else if seconds > 0.0 { MAX_SECONDS } else { 0.0 };
        self.next_id += 1;
        let id = self.next_id;
        let events = self.events.clone();
        let task = TaskGuard::spawn(&self.io, async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            events.post(Fired(id));
        });
        self.active.insert(id, task);
        id
    }

    fn cancel(&mut self, id: u64) -> bool {
        self.active.remove(&id).is_some()
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Timers) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Timers>>(linker, get)
}
