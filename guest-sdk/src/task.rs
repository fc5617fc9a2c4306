//! async/await over the same host events (beyond imp): [`spawn`] a future, and `.await`
//! timers ([`crate::imp::sleep`]), HTTP requests ([`crate::http::Request::send`]), device
//! requests ([`crate::device::Request`]) and the AzureIoTHub
//! [`DeviceClient`](crate::azure_iot_hub::DeviceClient).
//!
//! There is no thread and no new host call: the host still delivers one event at a time.
//! After the start function and after each event, every task that the event woke runs
//! until it waits again. A task that never waits holds the agent like a callback that
//! never returns, and the host's event deadline ends it the same way.
//!
//! ```no_run
//! use tether_guest::{http, imp, server, task};
//!
//! fn start() {
//!     task::spawn(async {
//!         loop {
//!             match http::get("https://example.com/", &[]).send().await {
//!                 Ok(r) => server::log(format!("status {}", r.statuscode)),
//!                 Err(e) => server::error(format!("{e}")),
//!             }
//!             if imp::sleep(60.0).await.is_err() {
//!                 break;
//!             }
//!         }
//!     });
//! }
//! tether_guest::agent!(start);
//! ```
//!
//! The executor is `futures`' `LocalPool`, run until it stalls at the end of each event.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures::executor::{LocalPool, LocalSpawner};
use futures::task::LocalSpawnExt;

/// The pool, and a spawner of its own: tasks spawn while the pool is running them.
struct Executor {
    pool: RefCell<LocalPool>,
    spawner: LocalSpawner,
}

thread_local! {
    static EXECUTOR: Executor = {
        let pool = LocalPool::new();
        let spawner = pool.spawner();
        Executor { pool: RefCell::new(pool), spawner }
    };
}

/// Runs `future` as a background task of the agent: it starts at the end of the current
/// event (or of the start function) and goes on at each event that wakes it.
///
/// ```no_run
/// tether_guest::task::spawn(async {
///     let _ = tether_guest::imp::sleep(1.0).await;
///     tether_guest::server::log("a second later");
/// });
/// ```
pub fn spawn(future: impl Future<Output = ()> + 'static) {
    // Fails only once the pool is gone, when the agent's thread is ending.
    if EXECUTOR.with(|e| e.spawner.spawn_local(future)).is_err() {
        crate::server::error("task not started: the agent is shutting down");
    }
}

/// Runs every task that can make progress. Called by the dispatcher after each event;
/// re-entry (a task's poll never delivers events) cannot happen.
pub(crate) fn run_ready() {
    EXECUTOR.with(|e| e.pool.borrow_mut().run_until_stalled());
}

/// One value handed from a callback to the task awaiting it. Hand-written rather than
/// `futures::channel::oneshot`, which is made for threads (an `Arc`, locks and a second
/// waker slot per call): every awaited call of the SDK makes one, and an agent has one
/// thread.
struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The sender is gone, sent or not.
    closed: bool,
}

/// The callback's half: [`Sender::send`] once, or drop it to say nothing will come.
pub(crate) struct Sender<T>(Rc<RefCell<Slot<T>>>);

/// The awaiting half: `Some(value)`, or `None` if the sender was dropped unsent (the
/// callback went away, which only happens when the agent is ending).
pub(crate) struct Receiver<T>(Rc<RefCell<Slot<T>>>);

/// A sender and its receiver.
pub(crate) fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Rc::new(RefCell::new(Slot { value: None, waker: None, closed: false }));
    (Sender(slot.clone()), Receiver(slot))
}

impl<T> Sender<T> {
    /// Hands `value` over and wakes the task waiting for it.
    pub(crate) fn send(self, value: T) {
        self.0.borrow_mut().value = Some(value);
        // Drop closes and wakes.
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.0.borrow_mut();
            slot.closed = true;
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut slot = self.0.borrow_mut();
        if let Some(value) = slot.value.take() {
            return Poll::Ready(Some(value));
        }
        if slot.closed {
            return Poll::Ready(None);
        }
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}
