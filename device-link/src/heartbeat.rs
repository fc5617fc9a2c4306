//! Liveness timing as a pure state machine: the caller passes `now` (monotonic
//! milliseconds), so host and firmware drive it from whatever clock they have.

/// What the caller should do after [`Heartbeat::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Nothing is due.
    Idle,
    /// Send a PING now.
    SendPing,
    /// Nothing was received for the timeout: the peer is gone.
    Dead,
}

/// Heartbeat timer: a PING goes out whenever nothing has been heard for `interval_ms` (or
/// the sender is stalled on flow control), at most once per interval; silence for
/// `timeout_ms` means the peer is dead.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    interval_ms: u64,
    timeout_ms: u64,
    last_rx: u64,
    last_ping: u64,
}

impl Heartbeat {
    /// A heartbeat with the given interval and timeout (the timeout should span a few intervals).
    pub const fn new(interval_ms: u32, timeout_ms: u32) -> Self {
        Heartbeat {
            interval_ms: interval_ms as u64,
            timeout_ms: timeout_ms as u64,
            last_rx: 0,
            last_ping: 0,
        }
    }

    /// Restarts the timers, e.g. when a session starts.
    pub fn start(&mut self, now_ms: u64) {
        self.last_rx = now_ms;
        self.last_ping = now_ms;
    }

    /// Records that a valid frame arrived.
    pub fn received(&mut self, now_ms: u64) {
        self.last_rx = self.last_rx.max(now_ms);
    }

    /// Decides what is due at `now_ms`. `stalled` asks for a PING even while frames arrive,
    /// because a sender blocked on a full window needs the PONG's flow state to recover
    /// credit that lost frames would otherwise hold forever.
    pub fn poll(&mut self, now_ms: u64, stalled: bool) -> HeartbeatAction {
        if now_ms.saturating_sub(self.last_rx) >= self.timeout_ms {
            return HeartbeatAction::Dead;
        }
        let quiet = now_ms.saturating_sub(self.last_rx) >= self.interval_ms;
        if (quiet || stalled) && now_ms.saturating_sub(self.last_ping) >= self.interval_ms {
            self.last_ping = now_ms;
            return HeartbeatAction::SendPing;
        }
        HeartbeatAction::Idle
    }

    /// The next time `poll` could return something other than `Idle`.
    pub fn next_deadline(&self) -> u64 {
        let ping = self
            .last_ping
            .max(self.last_rx)
            .saturating_add(self.interval_ms);
        ping.min(self.last_rx.saturating_add(self.timeout_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_when_quiet_then_declares_dead() {
        let mut hb = Heartbeat::new(1000, 3000);
        hb.start(10_000);
        assert_eq!(hb.poll(10_500, false), HeartbeatAction::Idle);
        assert_eq!(hb.next_deadline(), 11_000);
        assert_eq!(hb.poll(11_000, false), HeartbeatAction::SendPing);
        assert_eq!(hb.poll(11_500, false), HeartbeatAction::Idle);
        assert_eq!(hb.poll(12_000, false), HeartbeatAction::SendPing);
        assert_eq!(hb.poll(12_999, false), HeartbeatAction::Idle);
        assert_eq!(hb.poll(13_000, false), HeartbeatAction::Dead);
    }

    #[test]
    fn traffic_keeps_it_alive_without_pings() {
        let mut hb = Heartbeat::new(1000, 3000);
        hb.start(0);
        for t in (0..20_000).step_by(500) {
            hb.received(t);
            assert_eq!(hb.poll(t + 100, false), HeartbeatAction::Idle);
        }
    }

    #[test]
    fn stalled_sender_pings_despite_traffic() {
        let mut hb = Heartbeat::new(1000, 3000);
        hb.start(0);
        hb.received(900);
        assert_eq!(hb.poll(950, true), HeartbeatAction::Idle);
        hb.received(1000);
        assert_eq!(hb.poll(1000, true), HeartbeatAction::SendPing);
    }

    #[test]
    fn clock_going_backwards_does_not_panic_or_kill() {
        let mut hb = Heartbeat::new(1000, 3000);
        hb.start(5000);
        assert_eq!(hb.poll(100, false), HeartbeatAction::Idle);
    }
}
