//! Retry delays shared by every reconnecting component: exponential, capped, full jitter.
//!
//! Full jitter (uniform in `[0, cap]`) keeps a fleet that lost its link together from
//! retrying in lockstep. The uplink takes its schedule from `backon`; the broker and
//! desired-stream reconnects use [`Reconnect`].

use std::time::Duration;

/// A uniformly random delay in `[0, cap]`.
pub fn full_jitter(cap: Duration) -> Duration {
    cap.mul_f64(fastrand::f64())
}

/// Delay before the next reconnect: doubles per consecutive failure from `min`, capped at
/// `max`, with full jitter; reset after a success.
#[derive(Debug, Clone)]
pub struct Reconnect {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Reconnect {
    /// A schedule between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let cap = self
            .min
            .saturating_mul(1 << self.failures.min(6))
            .min(self.max);
        full_jitter(cap)
    }

    /// Records a success: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_within_cap() {
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_secs(2)) <= Duration::from_secs(2));
        }
    }

    #[test]
    fn reconnect_delay_is_capped_and_resets() {
        let mut r = Reconnect::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..20 {
            assert!(r.failed() <= Duration::from_secs(1));
        }
        r.reset();
        assert!(r.failed() <= Duration::from_millis(200));
    }
}
