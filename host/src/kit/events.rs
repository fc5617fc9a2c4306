//! Posting events to an agent's queue without knowing the queue: a capability defines its
//! own event type `E` and is handed an [`Events<E>`]; the runtime, which composes the
//! capabilities, implements [`Sink<E>`] for its queue and turns each `E` into the WIT
//! event just before delivery.

use std::sync::Arc;

/// Where events of type `E` go: the runtime's agent queue.
pub(crate) trait Sink<E>: Send + Sync {
    /// Queues `event` for the instance `generation` (`None`: whichever instance runs at
    /// delivery). False once the agent is gone.
    fn post(&self, generation: Option<u64>, event: E) -> bool;
}

/// Posts one capability's events to one instance of an agent.
pub(crate) struct Events<E> {
    sink: Arc<dyn Sink<E>>,
    generation: Option<u64>,
}

// Derived `Clone` would require `E: Clone`.
impl<E> Clone for Events<E> {
    fn clone(&self) -> Self {
        Events { sink: self.sink.clone(), generation: self.generation }
    }
}

impl<E> Events<E> {
    /// Events for instance `generation`: events of an instance that has since crashed
    /// refer to timers and requests that no longer exist, and are dropped.
    pub fn new(sink: Arc<dyn Sink<E>>, generation: u64) -> Self {
        Events { sink, generation: Some(generation) }
    }

    /// Events for whichever instance runs at delivery: for what outlives an instance, like
    /// the device channel or an incoming request.
    pub fn any_instance(sink: Arc<dyn Sink<E>>) -> Self {
        Events { sink, generation: None }
    }

    /// Queues an event; once the agent is gone there is no one left to tell.
    pub fn post(&self, event: E) {
        self.sink.post(self.generation, event);
    }

    /// Queues an event; false when the agent is gone, for a caller that must answer for it.
    pub fn try_post(&self, event: E) -> bool {
        self.sink.post(self.generation, event)
    }
}
