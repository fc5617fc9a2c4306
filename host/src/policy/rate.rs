//! Token buckets for the per-agent rates (outgoing HTTP, log lines).

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A rate: `burst` credits, refilled at `per_sec` (imp's HTTP rate is 40 at 2/s).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub burst: u32,
    pub per_sec: f64,
}

/// The credits left of one rate.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: Rate,
    credits: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate) -> TokenBucket {
        TokenBucket { rate, credits: rate.burst.into(), at: Instant::now() }
    }

    /// Takes one credit if there is one.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate.per_sec;
        self.credits = (self.credits + refill).min(self.rate.burst.into());
        self.at = now;
        if self.credits >= 1.0 {
            self.credits -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut bucket = TokenBucket::new(Rate { burst: 3, per_sec: 1000.0 });
        assert!(bucket.take() && bucket.take() && bucket.take());
        assert!(!bucket.take());
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(bucket.take());
    }
}
