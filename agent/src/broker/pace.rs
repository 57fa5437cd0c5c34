//! A per-connection read budget (token bucket): `broker.max_client_bytes_per_sec`, with a
//! burst of one second's worth. A client beyond it is read more slowly, so TCP pushes back
//! on it and a single flooding client cannot starve the others of CPU.
//!
//! Twenty lines of arithmetic on a caller-supplied clock; a rate-limiting crate (governor)
//! would bring its own clock and concurrency machinery for a budget only one task touches.

use std::time::{Duration, Instant};

/// Bytes a connection may still read now.
#[derive(Debug)]
pub struct ReadBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl ReadBudget {
    /// A full budget of `bytes_per_sec`, or `None` for no limit (zero).
    pub fn new(bytes_per_sec: u64, now: Instant) -> Option<Self> {
        (bytes_per_sec > 0).then(|| {
            let rate = bytes_per_sec as f64;
            Self {
                rate,
                burst: rate,
                tokens: rate,
                last: now,
            }
        })
    }

    /// Takes `bytes` just read; returns how long to wait before reading again when the
    /// budget is overdrawn.
    pub fn spend(&mut self, bytes: usize, now: Instant) -> Option<Duration> {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.burst) - bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_burst_passes_then_reads_are_paced_to_the_rate() {
        let t0 = Instant::now();
        assert!(ReadBudget::new(0, t0).is_none());
        let mut b = ReadBudget::new(1000, t0).unwrap();
        assert_eq!(b.spend(1000, t0), None, "one second's worth at once");
        let wait = b.spend(500, t0).unwrap();
        assert_eq!(wait, Duration::from_millis(500));
        // After waiting, the debt is paid; the refill never exceeds the burst.
        let t1 = t0 + wait;
        assert_eq!(b.spend(0, t1), None);
        assert_eq!(b.spend(1000, t1 + Duration::from_secs(60)), None);
        assert!(b.spend(1, t1 + Duration::from_secs(60)).is_some());
    }
}
