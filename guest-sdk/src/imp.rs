//! Timers (imp: `imp.wakeup`, `imp.cancelwakeup`) and time.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::bindings::tether::agent::timers;

thread_local! {
    static PENDING: RefCell<HashMap<u64, Box<dyn FnOnce()>>> = RefCell::default();
}

/// A scheduled wakeup, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timer(u64);

/// Calls `callback` after `seconds` (fractions allowed).
///
/// ```no_run
/// let t = tether_guest::imp::wakeup(0.5, || tether_guest::server::log("tick"));
/// tether_guest::imp::cancel_wakeup(t);
/// ```
pub fn wakeup(seconds: f64, callback: impl FnOnce() + 'static) -> Timer {
    let id = timers::wakeup(seconds);
    PENDING.with_borrow_mut(|p| p.insert(id, Box::new(callback)));
    Timer(id)
}

/// Cancels a wakeup; no effect if it has fired already.
pub fn cancel_wakeup(timer: Timer) {
    PENDING.with_borrow_mut(|p| p.remove(&timer.0));
    timers::cancel(timer.0);
}

/// Seconds since the Unix epoch (imp: `time()`).
pub fn time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn fire(id: u64) {
    // Taken out before the call: the callback may schedule or cancel other timers.
    if let Some(callback) = PENDING.with_borrow_mut(|p| p.remove(&id)) {
        callback()
    }
}
