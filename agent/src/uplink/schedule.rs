//! When the uplink sends what: every timing rule of the uplink as one pure state machine.
//! Time is an argument (`now`), never read here, and the jitter is injected, so each rule is
//! a fast unit test.
//!
//! The rules: a batch may start while fewer than `max_in_flight` are out and no retry delay
//! is running; it skips devices a batch in flight already carries at that version and devices
//! sent within `device_min_interval`; it pays the reports/s and bytes/s token buckets before
//! it goes; a heartbeat goes out after `heartbeat` without any batch. A change waits `linger`
//! on an idle link and the batch window while a batch is out. An answer settles the batch: a
//! 2xx resets the backoff and restores the batch size, a retryable failure waits the next
//! backoff delay (or `Retry-After`), 413 halves the batch size, a refusal waits the longest
//! delay. A live answer's accepted reports are held as live marks until a durable version
//! covers them (skipped by reads meanwhile, polled for with empty batches every
//! `durable_poll`), and go out again after `durable_timeout` or when answers come from
//! another live state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgesync_protocol::rate::TokenBucket;

use super::answer::{LiveAccepted, Outcome};
use crate::backoff::{Backoff, Jitter};
use crate::config::UplinkSettings;
use crate::store::InFlight;

/// A batch this large means the link is under load: the next one waits for
/// `min_batch_interval`.
const LOADED: usize = 3;

/// What the next batch reads from the outbox.
#[derive(Debug)]
pub struct Read {
    /// Reports at most (halved after a 413).
    pub max_reports: usize,
    /// Devices to leave out, with the version already on its way (`u64::MAX`: all versions).
    pub skip: Arc<InFlight>,
    /// When the outbox has nothing to send: send a heartbeat instead.
    pub heartbeat: bool,
}

/// The uplink's timing state.
#[derive(Debug)]
pub struct Schedule {
    settings: UplinkSettings,
    backoff: Backoff,
    /// No batch starts before this (a retry delay).
    not_before: Instant,
    batch_max: usize,
    batches_in_flight: usize,
    /// The newest version of each device that a batch in flight carries or a live state
    /// holds (a live mark, below). Shared with the store's batch read, which drops its
    /// reference before answering: updates then change the map in place instead of copying
    /// it.
    devices_in_flight: Arc<InFlight>,
    /// When each device last went out (only with a `device_min_interval`).
    last_sent: HashMap<String, Instant>,
    /// When the last batch or heartbeat went out.
    last_activity: Instant,
    /// Reports a live answer accepted, awaiting a durable version: each device's version
    /// and when it was accepted. Reads skip them as they skip devices in flight; one goes
    /// out again when no durable version came within `durable_timeout`, or when answers
    /// come from another live state (the one that held it is gone).
    live: HashMap<String, (u64, Instant)>,
    /// The live state the marks in `live` were accepted by.
    live_id: Option<String>,
    /// No mark times out before this (the earliest accepted plus `durable_timeout`, or
    /// earlier when that mark has since gone): marks are looked through only then.
    next_expiry: Option<Instant>,
    /// A read was held back by `min_batch_interval`: the uplink wakes when it ends.
    gap_wait: bool,
    /// Reports the last batch carried.
    last_batch_reports: usize,
    /// Live marks given up since the last [`Schedule::take_resent`] (timed out, or their
    /// live state gone).
    resent: u64,
    reports: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl Schedule {
    /// A schedule starting at `now`: a heartbeat is due at once.
    pub fn new(settings: UplinkSettings, now: Instant, jitter: Jitter) -> Self {
        let reports = settings
            .reports_per_second
            .map(|r| TokenBucket::new(f64::from(r), f64::from(r), now));
        let bytes = settings
            .bytes_per_second
            .map(|b| TokenBucket::new(b as f64, b as f64, now));
        Self {
            backoff: Backoff::with_jitter(settings.retry_initial, settings.retry_max, jitter),
            not_before: now,
            batch_max: settings.batch_max_reports,
            batches_in_flight: 0,
            devices_in_flight: Arc::default(),
            last_sent: HashMap::new(),
            last_activity: now.checked_sub(settings.heartbeat).unwrap_or(now),
            live: HashMap::new(),
            live_id: None,
            next_expiry: None,
            gap_wait: false,
            last_batch_reports: 0,
            resent: 0,
            reports,
            bytes,
            settings,
        }
    }

    /// What the next batch reads, when one may start at `now`.
    pub fn next(&mut self, now: Instant) -> Option<Read> {
        if self.batches_in_flight >= self.settings.max_in_flight || now < self.not_before {
            return None;
        }
        if now < self.gap_until() {
            // Something may be waiting to go: look again when the gap ends.
            self.gap_wait = true;
            return None;
        }
        // This read looks at everything waiting; an empty one must not wake the uplink again.
        self.gap_wait = false;
        self.expire_live(now);
        let mut skip = Arc::clone(&self.devices_in_flight);
        let min = self.settings.device_min_interval;
        if !min.is_zero() {
            self.last_sent
                .retain(|_, sent| now.saturating_duration_since(*sent) < min);
            Arc::make_mut(&mut skip).extend(self.last_sent.keys().map(|d| (d.clone(), u64::MAX)));
        }
        Some(Read {
            max_reports: self.batch_max,
            skip,
            heartbeat: self.heartbeat_due(now),
        })
    }

    /// Whether the bytes/s limit needs each batch's size.
    pub fn counts_bytes(&self) -> bool {
        self.bytes.is_some()
    }

    /// Charges a batch of `reports` reports and `bytes` bytes to the rate limits; how long it
    /// must wait before it goes.
    pub fn admit(&mut self, reports: usize, bytes: usize, now: Instant) -> Duration {
        let by_reports = self
            .reports
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(reports as f64, now));
        let by_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(bytes as f64, now));
        by_reports.max(by_bytes)
    }

    /// Records a batch (or heartbeat) carrying `covered` going out at `now`.
    pub fn sent(&mut self, covered: &[(String, u64)], now: Instant) {
        self.batches_in_flight += 1;
        self.last_activity = now;
        self.gap_wait = false;
        self.last_batch_reports = covered.len();
        let in_flight = Arc::make_mut(&mut self.devices_in_flight);
        for (device, version) in covered {
            let newest = in_flight.entry(device.clone()).or_default();
            *newest = (*newest).max(*version);
            if !self.settings.device_min_interval.is_zero() {
                self.last_sent.insert(device.clone(), now);
            }
        }
    }

    /// Records the answer to a batch that carried `covered`; returns how long no batch may
    /// start (zero when the next may start at once).
    pub fn settle(
        &mut self,
        covered: &[(String, u64)],
        outcome: &Outcome,
        now: Instant,
    ) -> Duration {
        self.batches_in_flight = self.batches_in_flight.saturating_sub(1);
        if let Outcome::Acked { live, durable, .. } = outcome {
            self.settle_live(live.as_ref(), durable, now);
        }
        let in_flight = Arc::make_mut(&mut self.devices_in_flight);
        for (device, version) in covered {
            // A newer batch may carry the device too, or a live state hold this version.
            let held = self.live.get(device).is_some_and(|(v, _)| v == version);
            if in_flight.get(device) == Some(version) && !held {
                in_flight.remove(device);
            }
        }
        let delay = match outcome {
            Outcome::Acked { .. } => {
                self.backoff.reset();
                self.batch_max = (self.batch_max * 2).min(self.settings.batch_max_reports);
                Duration::ZERO
            }
            Outcome::Retry { after, .. } => after.unwrap_or_else(|| self.backoff.failed()),
            Outcome::TooLarge => {
                self.batch_max = (self.batch_max / 2).max(1);
                Duration::ZERO
            }
            Outcome::Refused { .. } => self.backoff.longest(),
        };
        self.not_before = now + delay;
        delay
    }

    /// Under load (the last batch carried [`LOADED`] reports or more), the next batch starts
    /// no sooner than `min_batch_interval` after it: live answers come back in milliseconds,
    /// and without a gap every few changes would go out in a request of their own. A light
    /// link (a change or two at a time) sends each at once.
    fn gap_until(&self) -> Instant {
        if self.last_batch_reports >= LOADED {
            self.last_activity + self.settings.min_batch_interval
        } else {
            self.last_activity
        }
    }

    /// Gives up live marks held longer than `durable_timeout`: their devices go out again.
    fn expire_live(&mut self, now: Instant) {
        if self.next_expiry.is_none_or(|at| now < at) {
            return;
        }
        let timeout = self.settings.durable_timeout;
        let skip = Arc::make_mut(&mut self.devices_in_flight);
        let mut resent = 0;
        self.live.retain(|device, (version, at)| {
            let keep = now.saturating_duration_since(*at) < timeout;
            if !keep {
                resent += 1;
                if skip.get(device) == Some(version) {
                    skip.remove(device);
                }
            }
            keep
        });
        self.resent += resent;
        self.next_expiry = self.live.values().map(|(_, at)| *at + timeout).min();
    }

    /// Ends the live mark of `device` (its skip entry too, unless a newer version is in
    /// flight).
    fn end_mark(skip: &mut InFlight, device: &str, version: u64) {
        if skip.get(device).is_some_and(|held| *held <= version) {
            skip.remove(device);
        }
    }

    /// Records what a 2xx answer says of the live state: reports it accepted (live), and
    /// versions now durable, which end their marks.
    fn settle_live(
        &mut self,
        live: Option<&LiveAccepted>,
        durable: &[(String, u64)],
        now: Instant,
    ) {
        let skip = Arc::make_mut(&mut self.devices_in_flight);
        if let Some(live) = live {
            if self.live_id.as_deref() != Some(live.id.as_str()) {
                // Another live state: what the old one held is gone, so it goes out again.
                self.resent += self.live.len() as u64;
                for (device, (version, _)) in self.live.drain() {
                    Self::end_mark(skip, &device, version);
                }
                self.live_id = Some(live.id.clone());
            }
            for (device, version) in &live.accepted {
                let mark = self.live.entry(device.clone()).or_insert((*version, now));
                if *version >= mark.0 {
                    *mark = (*version, now);
                }
                let held = skip.entry(device.clone()).or_default();
                *held = (*held).max(*version);
            }
            if !live.accepted.is_empty() {
                let expiry = now + self.settings.durable_timeout;
                self.next_expiry = Some(self.next_expiry.map_or(expiry, |e| e.min(expiry)));
            }
        }
        for (device, version) in durable {
            if self
                .live
                .get(device)
                .is_some_and(|(held, _)| held <= version)
            {
                self.live.remove(device);
                Self::end_mark(skip, device, *version);
            }
        }
    }

    /// Devices a live state holds, awaiting a durable version.
    pub fn awaiting_durable(&self) -> usize {
        self.live.len()
    }

    /// Live marks given up since the last call (each device goes out again).
    pub fn take_resent(&mut self) -> u64 {
        std::mem::take(&mut self.resent)
    }

    /// How long a change waits before it is read: `linger` on an idle link, the batch window
    /// while a batch is out (so changes gather into the next one). `None` while the in-flight
    /// window is full: the next answer wakes the uplink.
    pub fn change_delay(&self) -> Option<Duration> {
        if self.batches_in_flight >= self.settings.max_in_flight {
            None
        } else if self.batches_in_flight == 0 {
            Some(self.settings.linger)
        } else {
            Some(self.settings.batch_window)
        }
    }

    /// When to look again if nothing else happens (no change, no answer): the end of a retry
    /// delay, a due heartbeat, or a device's minimum interval running out. With the in-flight
    /// window full only an answer can start a batch, so no interval wakes the uplink then
    /// (one that ran out would wake it again and again).
    pub fn wake_at(&self, now: Instant) -> Option<Instant> {
        let retry = (self.not_before > now).then_some(self.not_before);
        let window_open = self.batches_in_flight < self.settings.max_in_flight;
        let heartbeat =
            (self.batches_in_flight == 0).then(|| self.last_activity + self.heartbeat_interval());
        // A live mark that times out makes its device pending again.
        let expiry = self.next_expiry.filter(|_| window_open);
        let gap = self
            .gap_wait
            .then(|| self.gap_until())
            .filter(|_| window_open);
        let interval = self
            .last_sent
            .values()
            .min()
            .map(|sent| *sent + self.settings.device_min_interval)
            .filter(|_| window_open);
        [retry, heartbeat, interval, expiry, gap]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.max(retry.unwrap_or(at)))
    }

    /// Reports per batch now (halved after a 413, doubled back after each 2xx).
    pub fn batch_max(&self) -> usize {
        self.batch_max
    }

    fn heartbeat_due(&self, now: Instant) -> bool {
        self.batches_in_flight == 0
            && now.saturating_duration_since(self.last_activity) >= self.heartbeat_interval()
    }

    /// The heartbeat interval, or the durable poll while a live state holds reports: an
    /// empty batch then fetches the durable versions owed, so the outbox empties soon after
    /// the writes even when no other change goes out.
    fn heartbeat_interval(&self) -> Duration {
        if self.live.is_empty() {
            self.settings.heartbeat
        } else {
            self.settings.heartbeat.min(self.settings.durable_poll)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings() -> UplinkSettings {
        UplinkSettings {
            batch_window: ms(50),
            linger: ms(0),
            batch_max_reports: 100,
            batch_max_bytes: 1 << 20,
            reports_per_second: None,
            bytes_per_second: None,
            device_min_interval: Duration::ZERO,
            max_in_flight: 2,
            retry_initial: ms(100),
            retry_max: ms(1000),
            heartbeat: Duration::from_secs(30),
            gzip: false,
            live_answers: true,
            durable_timeout: Duration::from_secs(120),
            durable_poll: Duration::from_secs(1),
            min_batch_interval: Duration::ZERO,
        }
    }

    fn schedule(settings: UplinkSettings, t0: Instant) -> Schedule {
        Schedule::new(settings, t0, |d| d)
    }

    fn one(device: &str, version: u64) -> Vec<(String, u64)> {
        vec![(device.to_owned(), version)]
    }

    fn acked(covered: usize) -> Outcome {
        Outcome::Acked {
            covered,
            live: None,
            durable: Vec::new(),
        }
    }

    fn retry() -> Outcome {
        Outcome::Retry {
            after: None,
            reason: "HTTP 503".into(),
        }
    }

    #[test]
    fn failures_back_off_exponentially_and_an_ack_resets_the_schedule() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..5 {
            assert!(s.next(now).is_some());
            s.sent(&one("a", 1), now);
            let delay = s.settle(&one("a", 1), &retry(), now);
            assert!(
                s.next(now + delay - ms(1)).is_none(),
                "no batch during the delay"
            );
            assert_eq!(s.wake_at(now), Some(now + delay));
            delays.push(delay);
            now += delay;
        }
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800), ms(1000)]);

        s.next(now).unwrap();
        s.sent(&one("a", 1), now);
        assert_eq!(s.settle(&one("a", 1), &acked(1), now), ms(0));
        s.sent(&one("a", 2), now);
        assert_eq!(
            s.settle(&one("a", 2), &retry(), now),
            ms(100),
            "after a success the next failure starts from retry_initial again"
        );
    }

    #[test]
    fn retry_after_is_honoured_and_refusals_wait_the_longest_delay() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        s.sent(&[], t0);
        let after = Outcome::Retry {
            after: Some(Duration::from_secs(7)),
            reason: "HTTP 429".into(),
        };
        assert_eq!(s.settle(&[], &after, t0), Duration::from_secs(7));
        s.sent(&[], t0);
        let refused = Outcome::Refused {
            status: 401,
            body: String::new(),
        };
        assert_eq!(s.settle(&[], &refused, t0), ms(1000));
    }

    #[test]
    fn too_large_halves_the_batch_and_acks_grow_it_back() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        for expected in [50, 25, 12] {
            s.sent(&[], t0);
            assert_eq!(s.settle(&[], &Outcome::TooLarge, t0), ms(0), "no wait");
            assert_eq!(s.next(t0).unwrap().max_reports, expected);
        }
        for expected in [24, 48, 96, 100, 100] {
            s.sent(&[], t0);
            s.settle(&[], &acked(0), t0);
            assert_eq!(s.next(t0).unwrap().max_reports, expected);
        }
    }

    #[test]
    fn at_most_max_in_flight_batches_and_changes_gather_while_one_is_out() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        assert_eq!(s.change_delay(), Some(ms(0)), "an idle link sends at once");
        s.sent(&one("a", 1), t0);
        assert_eq!(s.change_delay(), Some(ms(50)), "the batch window");
        assert!(s.next(t0).is_some());
        s.sent(&one("b", 1), t0);
        assert!(s.next(t0).is_none(), "two in flight");
        assert_eq!(s.change_delay(), None);
        s.settle(&one("a", 1), &acked(1), t0);
        assert!(s.next(t0).is_some());
        assert_eq!(s.change_delay(), Some(ms(50)), "one still out");
    }

    #[test]
    fn devices_in_flight_are_skipped_until_their_own_batch_is_answered() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        s.sent(&one("a", 1), t0);
        assert_eq!(s.next(t0).unwrap().skip.get("a"), Some(&1));
        // A newer version of `a` goes out in a second batch...
        s.sent(&one("a", 2), t0);
        // ...and the first batch's answer does not clear it.
        s.settle(&one("a", 1), &acked(1), t0);
        assert_eq!(s.next(t0).unwrap().skip.get("a"), Some(&2));
        s.settle(&one("a", 2), &retry(), t0);
        assert!(s.next(t0 + ms(100)).unwrap().skip.is_empty());
    }

    #[test]
    fn heartbeats_follow_a_quiet_heartbeat_interval_with_nothing_in_flight() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        assert!(s.next(t0).unwrap().heartbeat, "due at start");
        s.sent(&[], t0);
        assert!(!s.next(t0).unwrap().heartbeat, "one is out");
        s.settle(&[], &acked(0), t0);
        let thirty = Duration::from_secs(30);
        assert_eq!(s.wake_at(t0), Some(t0 + thirty));
        assert!(!s.next(t0 + thirty - ms(1)).unwrap().heartbeat);
        assert!(s.next(t0 + thirty).unwrap().heartbeat);
        // Any batch counts as activity.
        s.sent(&one("a", 1), t0 + ms(10));
        assert_eq!(s.wake_at(t0 + ms(10)), None, "an answer wakes the uplink");
        s.settle(&one("a", 1), &acked(1), t0 + ms(20));
        assert_eq!(s.wake_at(t0 + ms(20)), Some(t0 + ms(10) + thirty));
    }

    #[test]
    fn a_device_goes_out_at_most_once_per_min_interval() {
        let t0 = Instant::now();
        let mut s = schedule(
            UplinkSettings {
                device_min_interval: Duration::from_secs(1),
                ..settings()
            },
            t0,
        );
        s.sent(&one("a", 1), t0);
        s.settle(&one("a", 1), &acked(1), t0 + ms(5));
        let skip = s.next(t0 + ms(999)).unwrap().skip;
        assert_eq!(skip.get("a"), Some(&u64::MAX), "any version of a waits");
        assert_eq!(s.wake_at(t0 + ms(999)), Some(t0 + Duration::from_secs(1)));
        assert!(s.next(t0 + Duration::from_secs(1)).unwrap().skip.is_empty());
    }

    #[test]
    fn a_full_window_waits_for_an_answer_not_for_intervals_that_ran_out() {
        let t0 = Instant::now();
        let mut s = schedule(
            UplinkSettings {
                device_min_interval: ms(100),
                max_in_flight: 1,
                ..settings()
            },
            t0,
        );
        s.sent(&one("a", 1), t0);
        // Long after a's interval ran out, the one batch is still out.
        let later = t0 + Duration::from_secs(10);
        assert!(s.next(later).is_none());
        assert_eq!(s.wake_at(later), None, "only the answer can start a batch");
        s.settle(&one("a", 1), &acked(1), later);
        assert!(s.next(later).unwrap().skip.is_empty());
    }

    #[test]
    fn rate_limits_delay_batches_beyond_their_budget() {
        let t0 = Instant::now();
        let mut s = schedule(
            UplinkSettings {
                reports_per_second: Some(100),
                bytes_per_second: Some(10_000),
                ..settings()
            },
            t0,
        );
        assert!(s.counts_bytes());
        assert_eq!(s.admit(100, 1000, t0), ms(0), "one second's burst");
        assert_eq!(s.admit(50, 0, t0), ms(500), "reports/s");
        assert_eq!(
            s.admit(0, 20_000, t0),
            ms(1100),
            "bytes/s: 9,000 left of the burst"
        );
        let mut unlimited = schedule(settings(), t0);
        assert!(!unlimited.counts_bytes());
        assert_eq!(unlimited.admit(1_000_000, usize::MAX, t0), ms(0));
    }

    #[test]
    fn a_retry_delay_holds_back_heartbeats_and_intervals_too() {
        let t0 = Instant::now();
        let mut s = schedule(
            UplinkSettings {
                heartbeat: ms(10),
                ..settings()
            },
            t0,
        );
        s.sent(&[], t0);
        let delay = s.settle(&[], &retry(), t0);
        assert_eq!(s.wake_at(t0), Some(t0 + delay));
        assert!(s.next(t0 + ms(50)).is_none());
    }

    fn live(id: &str, accepted: &[(&str, u64)], durable: &[(&str, u64)]) -> Outcome {
        let pairs = |v: &[(&str, u64)]| v.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect();
        Outcome::Acked {
            covered: 0,
            live: Some(LiveAccepted {
                id: id.into(),
                accepted: pairs(accepted),
            }),
            durable: pairs(durable),
        }
    }

    #[test]
    fn live_reports_are_skipped_until_a_durable_version_covers_them() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        s.sent(&one("a", 3), t0);
        s.settle(&one("a", 3), &live("L1", &[("a", 3)], &[]), t0);
        assert_eq!(s.awaiting_durable(), 1);
        // Held live: not read again at that version (a newer one still goes).
        assert_eq!(s.next(t0).unwrap().skip.get("a"), Some(&3));
        // An older durable version does not cover it; version 3 does.
        s.sent(&[], t0);
        s.settle(&[], &live("L1", &[], &[("a", 2)]), t0);
        assert_eq!(s.awaiting_durable(), 1);
        s.sent(&[], t0);
        s.settle(&[], &live("L1", &[], &[("a", 3)]), t0);
        assert_eq!(s.awaiting_durable(), 0);
        assert!(s.next(t0).unwrap().skip.is_empty());
        assert_eq!(s.take_resent(), 0);
    }

    #[test]
    fn live_reports_go_out_again_after_the_timeout_or_when_the_live_state_changes() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        s.sent(&one("a", 1), t0);
        s.settle(&one("a", 1), &live("L1", &[("a", 1), ("b", 1)], &[]), t0);
        // Answers from another live state: what L1 held is gone.
        s.sent(&one("c", 1), t0);
        s.settle(&one("c", 1), &live("L2", &[("c", 1)], &[]), t0);
        assert_eq!(s.take_resent(), 2);
        let skip = s.next(t0).unwrap().skip;
        assert_eq!((skip.get("a"), skip.get("c")), (None, Some(&1)));
        // No durable version within the timeout: c goes out again, and the uplink wakes
        // for it.
        let timeout = Duration::from_secs(120);
        assert!(s.wake_at(t0).unwrap() <= t0 + timeout);
        assert!(s.next(t0 + timeout).unwrap().skip.is_empty());
        assert_eq!(s.take_resent(), 1);
        assert_eq!(s.awaiting_durable(), 0);
    }

    #[test]
    fn reports_held_live_are_polled_for_with_empty_batches() {
        let t0 = Instant::now();
        let mut s = schedule(settings(), t0);
        s.sent(&one("a", 1), t0);
        s.settle(&one("a", 1), &live("L1", &[("a", 1)], &[]), t0);
        // The durable poll (1 s), not the 30 s heartbeat.
        assert_eq!(s.wake_at(t0), Some(t0 + Duration::from_secs(1)));
        assert!(!s.next(t0 + ms(999)).unwrap().heartbeat);
        assert!(s.next(t0 + Duration::from_secs(1)).unwrap().heartbeat);
        s.sent(&[], t0 + Duration::from_secs(1));
        s.settle(
            &[],
            &live("L1", &[], &[("a", 1)]),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            s.wake_at(t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(31)),
            "nothing held: back to the heartbeat"
        );
    }

    #[test]
    fn under_load_batches_start_at_most_once_per_min_batch_interval() {
        let t0 = Instant::now();
        let mut s = schedule(
            UplinkSettings {
                min_batch_interval: ms(10),
                ..settings()
            },
            t0,
        );
        // A light link: a change or two at a time go at once.
        assert!(s.next(t0).is_some());
        s.sent(&one("z", 1), t0);
        s.settle(&one("z", 1), &live("L1", &[("z", 1)], &[]), t0 + ms(1));
        assert!(s.next(t0 + ms(1)).is_some());
        // A batch of three: the next waits for the gap, and the uplink wakes for it.
        let three = [
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 1),
        ];
        s.sent(&three, t0);
        s.settle(&three, &live("L1", &[("a", 1)], &[]), t0 + ms(2));
        assert!(s.next(t0 + ms(3)).is_none());
        assert_eq!(s.wake_at(t0 + ms(3)), Some(t0 + ms(10)));
        assert!(s.next(t0 + ms(10)).is_some());
        // That read found nothing to send: nothing wakes the uplink before the durable poll.
        assert_eq!(s.wake_at(t0 + ms(10)), Some(t0 + Duration::from_secs(1)));
        // Live marks stay out of reads until their durable version: no copy of the map.
        assert_eq!(s.next(t0 + ms(10)).unwrap().skip.get("a"), Some(&1));
    }
}
