//! The global budget of Kubernetes writes per second, shared by every writer of this replica
//! (device status, liveness conditions), adapted to what the API server gives.
//!
//! Once a second the rate is reconsidered from the status writes of that second:
//! - any write refused for overload (429 from API Priority and Fairness, 5xx, a timeout):
//!   halve it;
//! - more than a tenth slower than `--write-latency-target-ms`: cut it by a fifth, since
//!   with a bounded number of writers, a slower API server is a saturated one;
//! - otherwise, if writers had to wait for the budget (there is more to write than it
//!   allows), grow it: doubling each second until the first time it had to shrink (as TCP's
//!   slow start: 200/s reaches 1,000/s in 3 s), by a quarter after that.
//!
//! always within `--write-qps-min` and `--write-qps-max`. Setting both to the same value
//! gives a fixed budget.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync_protocol::rate::TokenBucket;

/// How often the rate is reconsidered.
const ADAPT_EVERY: Duration = Duration::from_secs(1);

/// How a write went, for the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered (written or refused on its merits, such as a conflict) in this time.
    Answered(Duration),
    /// Refused for overload (429, 5xx) or timed out.
    Overloaded,
}

/// The rate's bounds and the latency that counts as slow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Lowest rate, writes per second.
    pub min: f64,
    /// Highest rate, writes per second.
    pub max: f64,
    /// A write slower than this counts as a sign of saturation.
    pub latency_target: Duration,
}

/// What one second of writes looked like.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Writes answered.
    pub answered: u32,
    /// Of those, slower than the target.
    pub slow: u32,
    /// Writes refused for overload.
    pub overloaded: u32,
    /// Whether a writer had to wait for the budget.
    pub waited: bool,
}

/// Where the budget is in its life: doubling until it first had to shrink, then careful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No shrink yet: grow fast.
    SlowStart,
    /// Has shrunk at least once: grow by a quarter.
    Steady,
}

/// The next rate and phase after `window` at `rate` (pure: the adaptation rule).
pub fn next_rate(rate: f64, phase: Phase, window: Window, bounds: Bounds) -> (f64, Phase) {
    let (next, phase) = if window.overloaded > 0 {
        (rate * 0.5, Phase::Steady)
    } else if window.slow * 10 > window.answered {
        (rate * 0.8, Phase::Steady)
    } else if window.waited && window.answered > 0 {
        let factor = if phase == Phase::SlowStart { 2.0 } else { 1.25 };
        (rate * factor, phase)
    } else {
        (rate, phase)
    };
    (next.clamp(bounds.min, bounds.max), phase)
}

#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    rate: f64,
    phase: Phase,
    window: Window,
    since: Instant,
}

/// The adaptive write budget.
#[derive(Debug)]
pub struct WriteBudget {
    state: Mutex<State>,
    bounds: Bounds,
    burst: f64,
    /// The current rate in milli-writes per second, for the metric.
    rate_milli: AtomicU64,
}

impl WriteBudget {
    /// Starts at `qps` writes per second (clamped to `bounds`) with bursts of `burst`.
    pub fn new(qps: f64, burst: u32, bounds: Bounds) -> Self {
        let rate = qps.clamp(bounds.min, bounds.max);
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                bucket: TokenBucket::new(rate, f64::from(burst), now),
                rate,
                phase: Phase::SlowStart,
                window: Window::default(),
                since: now,
            }),
            bounds,
            burst: f64::from(burst),
            rate_milli: AtomicU64::new((rate * 1000.0) as u64),
        }
    }

    /// A budget that never changes: `qps` writes per second.
    pub fn fixed(qps: f64, burst: u32) -> Self {
        Self::new(
            qps,
            burst,
            Bounds {
                min: qps,
                max: qps,
                latency_target: Duration::MAX,
            },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until one more write is within budget.
    pub async fn acquire(&self) {
        let wait = {
            let mut st = self.lock();
            let wait = st.bucket.take(1.0, Instant::now());
            if !wait.is_zero() {
                st.window.waited = true;
            }
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Records how a write went; reconsiders the rate once a second.
    pub fn record(&self, signal: Signal) {
        let mut st = self.lock();
        match signal {
            Signal::Answered(latency) => {
                st.window.answered += 1;
                if latency > self.bounds.latency_target {
                    st.window.slow += 1;
                }
            }
            Signal::Overloaded => st.window.overloaded += 1,
        }
        let now = Instant::now();
        if now.duration_since(st.since) < ADAPT_EVERY {
            return;
        }
        let (rate, phase) = next_rate(st.rate, st.phase, st.window, self.bounds);
        st.phase = phase;
        if rate != st.rate {
            st.rate = rate;
            st.bucket.set_rate(rate, self.burst, now);
            self.rate_milli
                .store((rate * 1000.0) as u64, Ordering::Relaxed);
        }
        st.window = Window::default();
        st.since = now;
    }

    /// The current rate, writes per second.
    pub fn rate(&self) -> f64 {
        self.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        min: 10.0,
        max: 1000.0,
        latency_target: Duration::from_millis(200),
    };

    fn window(answered: u32, slow: u32, overloaded: u32, waited: bool) -> Window {
        Window {
            answered,
            slow,
            overloaded,
            waited,
        }
    }

    fn next(rate: f64, phase: Phase, w: Window) -> (f64, Phase) {
        next_rate(rate, phase, w, BOUNDS)
    }

    #[test]
    fn grows_only_while_the_budget_is_what_holds_writes_back() {
        use Phase::{SlowStart, Steady};
        // Doubling until the first shrink, then by a quarter.
        assert_eq!(
            next(200.0, SlowStart, window(200, 0, 0, true)),
            (400.0, SlowStart)
        );
        assert_eq!(
            next(200.0, Steady, window(200, 0, 0, true)),
            (250.0, Steady)
        );
        // Not the limit: no reason to grow.
        assert_eq!(
            next(200.0, SlowStart, window(50, 0, 0, false)),
            (200.0, SlowStart)
        );
        // Never above the maximum.
        assert_eq!(
            next(990.0, Steady, window(990, 0, 0, true)),
            (1000.0, Steady)
        );
    }

    #[test]
    fn backs_off_on_overload_and_on_rising_latency_and_then_grows_carefully() {
        use Phase::{SlowStart, Steady};
        assert_eq!(
            next(800.0, SlowStart, window(700, 0, 1, true)),
            (400.0, Steady)
        );
        assert_eq!(
            next(800.0, SlowStart, window(100, 11, 0, true)),
            (640.0, Steady)
        );
        // A few slow writes among many are noise.
        assert_eq!(
            next(500.0, Steady, window(100, 10, 0, true)),
            (625.0, Steady)
        );
        // Never below the minimum.
        assert_eq!(next(12.0, Steady, window(5, 0, 3, true)), (10.0, Steady));
    }

    #[test]
    fn a_fixed_budget_stays_put() {
        let b = WriteBudget::fixed(200.0, 400);
        for _ in 0..3 {
            b.record(Signal::Overloaded);
        }
        assert_eq!(b.rate(), 200.0);
    }
}
