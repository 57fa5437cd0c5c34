//! Commit pacing (`store.min_commit_interval_ms`), as a pure rule over injected time.
//!
//! Under a stream of device messages (the previous commit of one was less than the interval
//! ago) a group waits out the rest of the interval before it commits, so that a steady
//! trickle shares one fsync instead of paying one each; an idle store commits at once. Only a
//! trickle is paced: when the last group was large, messages already queue up while a commit
//! runs (clients with many messages in flight wait on our acknowledgements), and waiting would
//! only cap their rate at their in-flight window per interval.

use std::time::{Duration, Instant};

/// Groups of device messages smaller than this are a trickle, which pacing gathers into fewer
/// fsyncs; larger ones come from clients already waiting on commits.
const PACE_BELOW: usize = 32;
/// A paced group of at least this many device messages means a steady stream (from about 800
/// messages/s at the default interval, and until it falls below about 200/s under the wide
/// one), which is then paced at `PACE_WIDE_FACTOR` times the interval, so each fsync is
/// shared by that many times more messages. An fsync and its WAL frames were a third of the
/// agent's CPU at 1,000 messages/s, and every fsync wears the flash of an edge box. The price
/// is a few more intervals before an acknowledgement, and a client held back by a small
/// in-flight window (4 to 31 messages, such as Mosquitto's default of 20) gets at most its
/// window per wide interval (1,000 messages/s for 20); a larger window is not paced at all
/// (`PACE_BELOW`), and a shorter interval raises the cap. A slower trickle keeps the short
/// interval and its latency.
const PACE_WIDER_FROM: usize = 4;
/// How much wider a steady stream's interval is (20 ms at the default 5 ms).
const PACE_WIDE_FACTOR: u32 = 4;

/// When the next group of device messages may commit.
#[derive(Debug)]
pub(super) struct Pacer {
    min_interval: Duration,
    /// When the last group of device messages committed.
    last_commit: Instant,
    /// How many commands it held.
    last_group: usize,
}

impl Pacer {
    /// A pacer at `now`, after no commit: the first group commits at once.
    pub(super) fn new(min_interval: Duration, now: Instant) -> Self {
        Self {
            min_interval,
            last_commit: now.checked_sub(min_interval).unwrap_or(now),
            last_group: 0,
        }
    }

    /// Until when a group holding device messages gathers more before it commits; `None`
    /// to commit at once.
    pub(super) fn hold_until(&self) -> Option<Instant> {
        if self.last_group >= PACE_BELOW {
            return None;
        }
        let interval = if self.last_group >= PACE_WIDER_FROM {
            self.min_interval * PACE_WIDE_FACTOR
        } else {
            self.min_interval
        };
        Some(self.last_commit + interval)
    }

    /// Records a group of `len` commands holding device messages, committed at `now`.
    pub(super) fn committed(&mut self, len: usize, now: Instant) {
        self.last_group = len;
        self.last_commit = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(5);

    #[test]
    fn an_idle_store_commits_at_once_and_a_trickle_waits_out_the_interval() {
        let t0 = Instant::now();
        let mut p = Pacer::new(INTERVAL, t0);
        assert!(p.hold_until().is_some_and(|t| t <= t0), "idle: at once");
        p.committed(1, t0);
        assert_eq!(p.hold_until(), Some(t0 + INTERVAL), "right behind a commit");
        p.committed(3, t0 + INTERVAL);
        assert_eq!(p.hold_until(), Some(t0 + INTERVAL * 2));
    }

    #[test]
    fn a_steady_stream_waits_four_intervals() {
        let t0 = Instant::now();
        let mut p = Pacer::new(INTERVAL, t0);
        p.committed(PACE_WIDER_FROM, t0);
        assert_eq!(p.hold_until(), Some(t0 + INTERVAL * 4));
        p.committed(PACE_BELOW - 1, t0);
        assert_eq!(p.hold_until(), Some(t0 + INTERVAL * 4));
        p.committed(PACE_WIDER_FROM - 1, t0);
        assert_eq!(p.hold_until(), Some(t0 + INTERVAL), "back to a trickle");
    }

    #[test]
    fn after_a_large_group_the_next_is_not_held_back() {
        let t0 = Instant::now();
        let mut p = Pacer::new(INTERVAL, t0);
        p.committed(PACE_BELOW, t0);
        assert_eq!(p.hold_until(), None);
        p.committed(1, t0);
        assert!(p.hold_until().is_some());
    }
}
