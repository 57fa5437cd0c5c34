//! Rate limiting shared by the agent (upstream reports/s and bytes/s) and the controller
//! (per-node reports/s, global Kubernetes write budget).

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens (going into debt if needed) and returns how long to wait before the
    /// work they pay for may start. Requests larger than the burst are allowed, paid over time.
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes `n` tokens only if they are available now; otherwise takes nothing and returns how
    /// long until they would be (for answering 429 with `Retry-After`). A request larger than
    /// the burst is admitted once the bucket is full and leaves it in debt, so it is paid for
    /// by the requests after it instead of being refused forever.
    pub fn try_take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let need = n.min(self.burst);
        if self.tokens >= need {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / self.rate))
        }
    }

    /// How long until `n` tokens (at most the burst) are available; takes nothing. Lets a
    /// server refuse work before paying for it (reading a request body).
    pub fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        let need = n.min(self.burst);
        if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate)
        }
    }

    /// Changes the rate and burst from `now` on (tokens earned so far are kept, up to the new
    /// burst).
    pub fn set_rate(&mut self, rate: f64, burst: f64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst;
        self.tokens = self.tokens.min(burst);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

/// Lets a repeated log line through at most once per interval and counts the ones held back,
/// so a flood of bad requests costs one line per interval, not one per request.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    interval: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(held back since the last line)` when a line may be logged now; `None` (and one
    /// more held back) otherwise.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!(t.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(t.allow(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn token_bucket_allows_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        assert_eq!(b.take(100.0, t0), Duration::ZERO);
        assert_eq!(b.take(50.0, t0), Duration::from_millis(500));
        // After one second, 100 more tokens arrived; the debt of 50 is paid.
        assert_eq!(b.take(50.0, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn try_take_refuses_without_taking_and_admits_oversized_requests_when_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 20.0, t0);
        assert_eq!(b.try_take(20.0, t0), Ok(()));
        assert_eq!(b.try_take(5.0, t0), Err(Duration::from_millis(500)));
        // Nothing was taken by the refusal.
        assert_eq!(b.try_take(5.0, t0 + Duration::from_millis(500)), Ok(()));
        // A request larger than the burst waits for a full bucket, not forever...
        assert_eq!(
            b.try_take(100.0, t0 + Duration::from_millis(500)),
            Err(Duration::from_secs(2))
        );
        let full = t0 + Duration::from_millis(2500);
        assert_eq!(b.try_take(100.0, full), Ok(()));
        // ...and the requests after it pay its debt.
        assert_eq!(b.try_take(1.0, full), Err(Duration::from_millis(8100)));
        assert_eq!(b.wait_for(1.0, full), Duration::from_millis(8100));
        assert_eq!(
            b.wait_for(1.0, full + Duration::from_millis(8100)),
            Duration::ZERO
        );
    }
}
