//! A count shared by one agent's parts up to a limit: bytes of bodies waiting, requests
//! in progress, payloads queued for sending. Each taker holds a [`Share`], given back when
//! it is dropped, so that nothing taken can leak past an early return or an abort.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What is in use of something counted.
#[derive(Clone, Default)]
pub(crate) struct Budget(Arc<AtomicUsize>);

impl Budget {
    /// Takes `n` if what is in use stays within `max`.
    pub fn take(&self, n: usize, max: usize) -> Option<Share> {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(n).filter(|total| *total <= max)).ok()?;
        Some(Share { budget: self.0.clone(), n })
    }

    /// What is in use now.
    pub fn used(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Part of a [`Budget`], given back on drop.
pub(crate) struct Share {
    budget: Arc<AtomicUsize>,
    n: usize,
}

impl Share {
    /// Keeps `n` of the share (never more than it has).
    pub fn shrink_to(&mut self, n: usize) {
        let freed = self.n.saturating_sub(n);
        self.budget.fetch_sub(freed, Ordering::AcqRel);
        self.n -= freed;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_given_back_and_the_limit_holds() {
        let budget = Budget::default();
        let mut a = budget.take(60, 100).expect("fits");
        assert!(budget.take(41, 100).is_none());
        let b = budget.take(40, 100).expect("fits exactly");
        a.shrink_to(10);
        assert_eq!(budget.used(), 50);
        drop((a, b));
        assert_eq!(budget.used(), 0);
    }
}
