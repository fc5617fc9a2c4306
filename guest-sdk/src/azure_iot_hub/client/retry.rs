//! Reconnecting by itself (beyond 5.1.0, whose client leaves a lost connection to the
//! agent): which connect failures are worth another attempt, and how long to wait before
//! it: exponential backoff with jitter and a cap, as the Azure device SDKs do.

/// How the client reconnects after a lost connection ([`ClientOptions::reconnect`]).
///
/// [`ClientOptions::reconnect`]: super::ClientOptions::reconnect
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reconnect {
    /// The wait before the first attempt, s; each failure doubles it. Default 1.
    pub min_delay: f64,
    /// The longest wait between attempts, s. Default 60.
    pub max_delay: f64,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { min_delay: 1.0, max_delay: 60.0 }
    }
}

/// A connection counts as healthy, and the backoff starts again from `min_delay`, once it
/// has lasted this long or IoT Hub has acknowledged a message on it: a hub that drops
/// every connection soon after accepting it (throttling) meets a growing wait.
const STABLE_SECS: f64 = 10.0;

/// CONNACK 5 ("not authorized") refusals in a row taken as transient once the client has
/// connected with its key before. IoT Hub answers 5 for every refused CONNECT, so a key
/// that worked may be refused for a while; a device disabled or deleted is refused for
/// good, and after this many the client stops rather than hammer the hub.
const REFUSALS_TOLERATED: u32 = 5;

/// What to do after a failed connect attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A transient failure: try again after [`Backoff::delay`].
    Retry,
    /// It will not heal by itself (bad key, disabled or deleted device, refused protocol):
    /// report it once and stop.
    GiveUp,
}

/// The reconnect history of one client.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    /// Failed attempts and short-lived connections in a row.
    failures: u32,
    /// CONNACK 5 refusals in a row.
    refusals: u32,
    ever_connected: bool,
    connected_at: Option<f64>,
    /// IoT Hub acknowledged a message on the current connection.
    proven: bool,
}

impl Backoff {
    /// The client connected at `now`.
    pub(super) fn connected(&mut self, now: f64) {
        self.ever_connected = true;
        self.refusals = 0;
        self.connected_at = Some(now);
        self.proven = false;
    }

    /// IoT Hub acknowledged a message.
    pub(super) fn acked(&mut self) {
        self.proven = true;
    }

    /// The connection was lost at `now`.
    pub(super) fn lost(&mut self, now: f64) {
        let healthy = self.proven || self.connected_at.is_some_and(|at| now - at >= STABLE_SECS);
        self.failures = if healthy { 0 } else { self.failures + 1 };
        self.connected_at = None;
    }

    /// A connect attempt failed with `code` (an MQTT connect code).
    pub(super) fn failed(&mut self, code: i32) -> Outcome {
        self.failures += 1;
        match code {
            // Protocol version, client id, user name or password refused: the request
            // itself is wrong.
            1 | 2 | 4 => Outcome::GiveUp,
            5 if !self.ever_connected => Outcome::GiveUp,
            5 => {
                self.refusals += 1;
                if self.refusals >= REFUSALS_TOLERATED { Outcome::GiveUp } else { Outcome::Retry }
            }
            _ => Outcome::Retry,
        }
    }

    /// The wait before the next attempt, s, for `random` in [0, 1): half the backoff plus
    /// a random part of the other half, so that many devices cut off together do not
    /// come back together.
    pub(super) fn delay(&self, settings: &Reconnect, random: f64) -> f64 {
        let doublings = i32::try_from(self.failures.saturating_sub(1).min(30)).unwrap_or(30);
        let base = (settings.min_delay * 2f64.powi(doublings)).min(settings.max_delay).max(0.0);
        base / 2.0 + base / 2.0 * random.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_with_each_failure_up_to_the_cap_with_jitter() {
        let settings = Reconnect { min_delay: 1.0, max_delay: 8.0 };
        let mut b = Backoff::default();
        b.connected(0.0);
        b.lost(1.0);
        let waits: Vec<(f64, f64)> = (0..6)
            .map(|_| {
                let range = (b.delay(&settings, 0.0), b.delay(&settings, 0.999_999));
                assert_eq!(b.failed(-1), Outcome::Retry);
                range
            })
            .collect();
        assert_eq!(waits[0].0, 0.5);
        assert!((waits[0].1 - 1.0).abs() < 1e-5);
        assert_eq!(waits[1].0, 1.0);
        assert_eq!(waits[3].0, 4.0);
        assert_eq!(waits[5].0, 4.0, "capped at max_delay: {waits:?}");
    }

    #[test]
    fn a_healthy_connection_starts_the_backoff_again_a_short_one_does_not() {
        let settings = Reconnect::default();
        let mut b = Backoff::default();
        b.connected(0.0);
        b.lost(20.0);
        assert_eq!(b.delay(&settings, 0.0), 0.5);
        b.failed(-1);
        b.failed(-1);
        b.connected(30.0);
        b.lost(31.0);
        assert_eq!(b.delay(&settings, 0.0), 2.0, "dropped after a second: the wait keeps growing");
        b.connected(40.0);
        b.acked();
        b.lost(41.0);
        assert_eq!(b.delay(&settings, 0.0), 0.5, "a message got through: healthy");
    }

    #[test]
    fn errors_that_will_not_heal_are_given_up_on() {
        for code in [1, 2, 4] {
            assert_eq!(Backoff::default().failed(code), Outcome::GiveUp);
        }
        assert_eq!(Backoff::default().failed(5), Outcome::GiveUp, "a key that never worked");
        assert_eq!(Backoff::default().failed(-1), Outcome::Retry);
        assert_eq!(Backoff::default().failed(3), Outcome::Retry, "server unavailable");
        let mut b = Backoff::default();
        b.connected(0.0);
        b.lost(100.0);
        let outcomes: Vec<Outcome> = (0..REFUSALS_TOLERATED).map(|_| b.failed(5)).collect();
        assert_eq!(outcomes.last(), Some(&Outcome::GiveUp));
        assert!(outcomes[..outcomes.len() - 1].iter().all(|o| *o == Outcome::Retry), "{outcomes:?}");
    }
}
