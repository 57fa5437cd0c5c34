//! Retry delays shared by every reconnecting component (uplink, broker client, desired
//! stream): exponential from `min`, doubling, capped at `max` (the schedule is `backon`'s), then
//! full jitter.
//!
//! Full jitter (uniform in `[0, delay]`) keeps a fleet that lost its link together from
//! retrying in lockstep. `backon`'s own jitter adds up to one more delay on top instead, so
//! the lockstep's lower bound stays; that is why the jitter is applied here. The jitter is a
//! plain function so tests replace it with the identity and see the schedule itself.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Spreads a delay; [`full_jitter`] in production.
pub type Jitter = fn(Duration) -> Duration;

/// A uniformly random delay in `[0, cap]`.
pub fn full_jitter(cap: Duration) -> Duration {
    cap.mul_f64(fastrand::f64())
}

/// Delay before the next attempt: doubles per consecutive failure from `min`, capped at
/// `max`, jittered; [`Backoff::reset`] after a success starts again from `min`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    schedule: ExponentialBackoff,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A schedule between `min` and `max` with full jitter.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_jitter(min, max, full_jitter)
    }

    /// A schedule between `min` and `max`, spread by `jitter`.
    pub fn with_jitter(min: Duration, max: Duration, jitter: Jitter) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Self {
            schedule: builder.build(),
            builder,
            max,
            jitter,
        }
    }

    /// Records a failure and returns how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        let delay = self.schedule.next().unwrap_or(self.max);
        // Whole microseconds: the schedule's float arithmetic leaves nanosecond dust.
        (self.jitter)(Duration::from_micros(delay.as_micros() as u64))
    }

    /// Records a success: the next failure waits `min` (jittered) again.
    pub fn reset(&mut self) {
        self.schedule = self.builder.build();
    }

    /// The longest delay, jittered: for failures that retrying soon cannot fix.
    pub fn longest(&self) -> Duration {
        (self.jitter)(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn full_jitter_stays_within_cap() {
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_secs(2)) <= Duration::from_secs(2));
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_a_reset_starts_over() {
        let mut b = Backoff::with_jitter(ms(100), ms(1000), |d| d);
        let delays: Vec<Duration> = (0..6).map(|_| b.failed()).collect();
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        b.reset();
        assert_eq!(b.failed(), ms(100), "a reset must start from min");
        assert_eq!(b.longest(), ms(1000));
    }

    #[test]
    fn jitter_spreads_each_delay() {
        let mut b = Backoff::with_jitter(ms(100), ms(1000), |d| d / 2);
        assert_eq!((b.failed(), b.failed()), (ms(50), ms(100)));
        let mut r = Backoff::new(ms(100), ms(1000));
        assert!((0..50).all(|_| r.failed() <= ms(1000)));
    }
}
