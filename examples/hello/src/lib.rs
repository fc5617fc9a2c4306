//! Logs, schedules timers, and cancels one of them before it fires.

use tether_guest::{imp, server};

fn start() {
    server::log(format!("hello from {}", tether_guest::server::agent_id()));
    imp::wakeup(0.2, || server::log("timer 1 fired"));
    imp::wakeup(0.4, || server::log("timer 2 fired"));
    let doomed = imp::wakeup(0.3, || server::log("cancelled timer fired"));
    imp::cancel_wakeup(doomed);
    // A timer that re-arms itself: a heartbeat every 5 s.
    fn tick(n: u32) {
        server::log(format!("tick {n}"));
        imp::wakeup(5.0, move || tick(n + 1));
    }
    imp::wakeup(0.6, || tick(1));
}

tether_guest::agent!(start);
