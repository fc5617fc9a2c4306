//! Timers (imp: `imp.wakeup`, `imp.cancelwakeup`) and time.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::bindings::tether::agent::timers;

thread_local! {
    static PENDING: RefCell<BTreeMap<u64, Box<dyn FnOnce()>>> = RefCell::default();
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
///
/// When the agent already has as many timers pending as its host allows
/// (`limits.timers`), nothing is scheduled, as imp returns null, and the host's log says
/// so; [`try_wakeup`] reports it instead.
pub fn wakeup(seconds: f64, callback: impl FnOnce() + 'static) -> Timer {
    try_wakeup(seconds, callback).unwrap_or(Timer(0))
}

/// Why [`try_wakeup`] scheduled nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    /// The agent has as many timers pending as its host allows (`limits.timers`); cancel
    /// some, or let them fire, first.
    #[error("too many timers pending")]
    TooManyTimers,
}

/// Like [`wakeup`], but says when nothing was scheduled (beyond imp).
///
/// ```no_run
/// match tether_guest::imp::try_wakeup(1.0, || ()) {
///     Ok(_timer) => {}
///     Err(e) => tether_guest::server::error(format!("no timer: {e}")),
/// }
/// ```
pub fn try_wakeup(seconds: f64, callback: impl FnOnce() + 'static) -> Result<Timer, TimerError> {
    let id = timers::wakeup(seconds).map_err(|timers::TimerError::TooManyTimers| TimerError::TooManyTimers)?;
    PENDING.with_borrow_mut(|p| p.insert(id, Box::new(callback)));
    Ok(Timer(id))
}

/// Waits `seconds` (beyond imp: the async form of [`wakeup`]). Dropping the future
/// before it is done cancels the timer.
///
/// ```no_run
/// tether_guest::task::spawn(async {
///     if let Err(e) = tether_guest::imp::sleep(0.5).await {
///         tether_guest::server::error(format!("no timer: {e}"));
///     }
/// });
/// ```
pub fn sleep(seconds: f64) -> Sleep {
    let (tx, rx) = crate::task::oneshot();
    let timer = try_wakeup(seconds, move || {
        tx.send(());
    });
    Sleep { timer: timer.map(Some), rx }
}

/// The future of [`sleep`]: `Ok(())` once the time has passed, or the reason no timer
/// could be set.
#[must_use = "a sleep does nothing unless awaited"]
pub struct Sleep {
    /// `None` once fired.
    timer: Result<Option<Timer>, TimerError>,
    rx: crate::task::Receiver<()>,
}

impl std::future::Future for Sleep {
    type Output = Result<(), TimerError>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        if let Err(e) = self.timer {
            return std::task::Poll::Ready(Err(e));
        }
        // The sender lives in the timer's callback, which only a fire or our own cancel
        // in `drop` removes: a fire sends first, so the channel cannot end unsent here.
        let ready = std::pin::Pin::new(&mut self.rx).poll(cx).is_ready();
        if !ready {
            return std::task::Poll::Pending;
        }
        self.timer = Ok(None);
        std::task::Poll::Ready(Ok(()))
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Ok(Some(timer)) = self.timer {
            cancel_wakeup(timer);
        }
    }
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
