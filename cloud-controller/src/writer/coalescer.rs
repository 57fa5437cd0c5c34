//! The status writer's bookkeeping, as a pure type: which report of each device waits for a
//! write (latest wins), which devices are queued or being written, who waits for which stamp,
//! and what each answer settles. No I/O and no clock (arrival times are arguments); the
//! writer around it does the API calls, sends the answers and counts them.
//!
//! A waiter is any [`Handle`]: the writer's is a oneshot sender, a test's a plain number.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{DeviceKey, Outcome, conflict};
use crate::stamp::{Stamp, Stamped};

/// Whoever waits for a report's fate.
pub trait Handle {
    /// Nobody listens any more (its batch gave up): it need not be kept.
    fn is_closed(&self) -> bool;
}

impl<T> Handle for tokio::sync::oneshot::Sender<T> {
    fn is_closed(&self) -> bool {
        tokio::sync::oneshot::Sender::is_closed(self)
    }
}

/// The newest report of a device not yet written.
#[derive(Debug)]
pub struct Pending {
    pub node: String,
    pub report: Stamped,
}

/// One report's waiter.
#[derive(Debug)]
pub struct Waiter<H> {
    pub stamp: Stamp,
    pub node: String,
    pub arrived: Instant,
    pub handle: H,
}

/// Answers to send: each waiter with its outcome.
pub type Answers<H> = Vec<(Waiter<H>, Outcome)>;

/// The coalescing state of every device.
#[derive(Debug)]
pub struct Coalescer<H> {
    pending: HashMap<DeviceKey, Pending>,
    waiters: HashMap<DeviceKey, Vec<Waiter<H>>>,
    queue: VecDeque<DeviceKey>,
    queued: HashSet<DeviceKey>,
    busy: HashSet<DeviceKey>,
    /// Newest stamp this replica knows to be durable, per device.
    durable: HashMap<DeviceKey, Stamp>,
    /// Shortest time between two writes of one device (zero: none).
    min_interval: Duration,
    /// When each device was last written (kept only with a `min_interval`).
    last_write: HashMap<DeviceKey, Instant>,
    /// Queued devices whose `min_interval` has not run out, by when it does.
    deferred: BTreeSet<(Instant, DeviceKey)>,
}

impl<H> Default for Coalescer<H> {
    fn default() -> Self {
        Self::new(Duration::ZERO)
    }
}

impl<H> Coalescer<H> {
    /// An empty coalescer writing each device at most once per `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Self {
            pending: HashMap::new(),
            waiters: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            busy: HashSet::new(),
            durable: HashMap::new(),
            min_interval,
            last_write: HashMap::new(),
            deferred: BTreeSet::new(),
        }
    }

    /// When the next deferred device may be written, if one waits for its interval.
    pub fn next_due(&self) -> Option<Instant> {
        self.deferred.first().map(|(at, _)| *at)
    }
}

impl<H: Handle> Coalescer<H> {
    /// Takes `report` of device `key` from `node`, waited for by `handle`; `known_durable` is
    /// the stamp the cache shows as written, if any. Returns the answers due now (this
    /// report's, when it needs no write; older reports of the same node it supersedes) and
    /// whether a worker must be woken.
    pub fn submit(
        &mut self,
        key: DeviceKey,
        node: &str,
        report: Stamped,
        known_durable: Option<Stamp>,
        handle: H,
        now: Instant,
    ) -> (Answers<H>, bool) {
        let stamp = report.stamp;
        let waiter = Waiter {
            stamp,
            node: node.to_owned(),
            arrived: now,
            handle,
        };
        let durable = self
            .durable
            .get(&key)
            .copied()
            .max(known_durable)
            .unwrap_or_default();
        // An equal stamp goes on to the write, which compares the bodies.
        if durable > stamp {
            return (vec![(waiter, Outcome::Durable(durable))], false);
        }
        if let Some(p) = self.pending.get(&key)
            && p.report.stamp == stamp
            && p.report.reported != report.reported
        {
            let outcome = conflict(&key, &report);
            return (vec![(waiter, outcome)], false);
        }
        let newer_pending = self
            .pending
            .get(&key)
            .is_some_and(|p| p.report.stamp >= stamp);
        let waiters = self.waiters.entry(key.clone()).or_default();
        let answers = if newer_pending {
            Vec::new()
        } else {
            settle_superseded(waiters, node, stamp)
        };
        waiters.push(waiter);
        if !newer_pending {
            self.pending.insert(
                key.clone(),
                Pending {
                    node: node.to_owned(),
                    report,
                },
            );
        }
        let wake = !self.queued.contains(&key) && !self.busy.contains(&key);
        if wake {
            self.queued.insert(key.clone());
            self.queue.push_back(key);
        }
        (answers, wake)
    }

    /// The next device to write at `now` and its newest report; the device is busy until
    /// [`Coalescer::finish`]. A device written less than `min_interval` ago waits (still
    /// queued, so its newer reports coalesce) until [`Coalescer::next_due`].
    pub fn take(&mut self, now: Instant) -> Option<(DeviceKey, Pending)> {
        while let Some((at, _)) = self.deferred.first()
            && *at <= now
        {
            if let Some((_, key)) = self.deferred.pop_first() {
                self.queue.push_front(key);
            }
        }
        while let Some(key) = self.queue.pop_front() {
            if let Some(due) = self
                .last_write
                .get(&key)
                .map(|t| *t + self.min_interval)
                .filter(|due| *due > now)
            {
                self.deferred.insert((due, key));
                continue;
            }
            self.queued.remove(&key);
            if let Some(p) = self.pending.remove(&key) {
                self.busy.insert(key.clone());
                return Some((key, p));
            }
        }
        None
    }

    /// Records the outcome of writing `attempted` for `key`: returns the waiters it settles
    /// (every one up to the durable stamp, or up to `attempted` on failure) and whether a
    /// worker must be woken (a newer report arrived during the write).
    pub fn finish(
        &mut self,
        key: DeviceKey,
        attempted: Stamp,
        outcome: &Outcome,
        now: Instant,
    ) -> (Answers<H>, bool) {
        self.busy.remove(&key);
        if !self.min_interval.is_zero() {
            // Entries whose interval ran out are kept no longer than needed.
            if self.last_write.len() >= 1024 && self.last_write.len() > 2 * self.busy.len() {
                let min = self.min_interval;
                self.last_write
                    .retain(|_, t| now.saturating_duration_since(*t) < min);
            }
            self.last_write.insert(key.clone(), now);
        }
        let settled_up_to = match outcome {
            Outcome::Durable(v) => {
                let d = self.durable.entry(key.clone()).or_default();
                *d = (*d).max(*v);
                *v
            }
            _ => attempted,
        };
        let mut answers = Vec::new();
        if let Some(waiters) = self.waiters.get_mut(&key) {
            let mut keep = Vec::with_capacity(waiters.len());
            for w in waiters.drain(..) {
                if w.stamp <= settled_up_to {
                    answers.push((w, outcome.clone()));
                } else if !w.handle.is_closed() {
                    keep.push(w);
                }
            }
            *waiters = keep;
            if waiters.is_empty() {
                self.waiters.remove(&key);
            }
        }
        let wake = self.pending.contains_key(&key) && self.queued.insert(key.clone());
        if wake {
            self.queue.push_back(key);
        }
        (answers, wake)
    }

    /// Devices with a report waiting for a write.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Settles the waiters of `node` older than `newer`, which that node has just submitted: the
/// node's agent holds `newer` until its own batch is answered, and resends it should that fail,
/// so nothing is lost by letting the older reports go. Waiters of another node (a device moved
/// between nodes) keep waiting for a write; closed ones are dropped.
fn settle_superseded<H: Handle>(
    waiters: &mut Vec<Waiter<H>>,
    node: &str,
    newer: Stamp,
) -> Answers<H> {
    if waiters.is_empty() {
        return Vec::new();
    }
    let (settled, kept): (Vec<_>, Vec<_>) = std::mem::take(waiters)
        .into_iter()
        .partition(|w| w.stamp < newer && w.node == node);
    *waiters = kept.into_iter().filter(|w| !w.handle.is_closed()).collect();
    settled
        .into_iter()
        .map(|w| (w, Outcome::Superseded(newer)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use edgesync_protocol::wire::Report;
    use serde_json::json;

    use super::*;

    /// A waiter in a test: its number, and whether it still listens.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Id(u32, bool);

    impl Handle for Id {
        fn is_closed(&self) -> bool {
            !self.1
        }
    }

    fn key(name: &str) -> DeviceKey {
        ("ns".to_owned(), name.to_owned())
    }

    fn report(version: u64, temp: i64) -> Stamped {
        let report = Report {
            device: "d".into(),
            version,
            reported: json!({"temp": temp}).as_object().unwrap().clone(),
            reported_at: "2026-12-07T00:00:00Z".into(),
            observed_desired_version: 0,
            connected: None,
            rejection: None,
        };
        Stamped::new(&report, Arc::from("e"), Stamp::new(1, version))
    }

    fn ids(answers: &Answers<Id>) -> Vec<(u32, Outcome)> {
        answers
            .iter()
            .map(|(w, o)| (w.handle.0, o.clone()))
            .collect()
    }

    fn submit(c: &mut Coalescer<Id>, node: &str, version: u64, id: u32) -> (Answers<Id>, bool) {
        c.submit(
            key("d"),
            node,
            report(version, 20),
            None,
            Id(id, true),
            Instant::now(),
        )
    }

    #[test]
    fn the_latest_report_wins_and_one_write_settles_every_waiter_up_to_it() {
        let mut c = Coalescer::default();
        assert!(submit(&mut c, "n1", 1, 1).1, "a new device wakes a worker");
        let (superseded, wake) = submit(&mut c, "n1", 2, 2);
        assert!(!wake, "already queued");
        assert_eq!(
            ids(&superseded),
            [(1, Outcome::Superseded(Stamp::new(1, 2)))]
        );
        assert_eq!(c.pending(), 1, "one write per device");
        let (k, p) = c.take(Instant::now()).unwrap();
        assert_eq!(p.report.stamp, Stamp::new(1, 2));
        assert!(c.take(Instant::now()).is_none());
        let durable = Outcome::Durable(Stamp::new(1, 2));
        let (answers, wake) = c.finish(k, Stamp::new(1, 2), &durable, Instant::now());
        assert_eq!(ids(&answers), [(2, durable)]);
        assert!(!wake);
    }

    #[test]
    fn a_report_older_than_what_is_durable_is_answered_without_a_write() {
        let mut c = Coalescer::default();
        submit(&mut c, "n1", 5, 1);
        let (k, _) = c.take(Instant::now()).unwrap();
        c.finish(
            k,
            Stamp::new(1, 5),
            &Outcome::Durable(Stamp::new(1, 5)),
            Instant::now(),
        );
        let (answers, wake) = submit(&mut c, "n1", 4, 2);
        assert_eq!(ids(&answers), [(2, Outcome::Durable(Stamp::new(1, 5)))]);
        assert!(!wake);
        assert_eq!(c.pending(), 0);
        // The cache's knowledge counts too.
        let (answers, _) = c.submit(
            key("e"),
            "n1",
            report(1, 20),
            Some(Stamp::new(1, 9)),
            Id(3, true),
            Instant::now(),
        );
        assert_eq!(ids(&answers), [(3, Outcome::Durable(Stamp::new(1, 9)))]);
    }

    #[test]
    fn the_same_stamp_with_another_body_is_a_conflict() {
        let mut c = Coalescer::default();
        submit(&mut c, "n1", 3, 1);
        let (answers, _) = c.submit(
            key("d"),
            "n1",
            report(3, 99),
            None,
            Id(2, true),
            Instant::now(),
        );
        assert!(matches!(ids(&answers)[..], [(2, Outcome::Rejected(..))]));
        assert_eq!(c.pending(), 1, "the first report still waits for its write");
    }

    #[test]
    fn a_report_arriving_during_a_write_is_written_next_and_waits_for_its_own_write() {
        let mut c = Coalescer::default();
        submit(&mut c, "n1", 1, 1);
        let (k, _) = c.take(Instant::now()).unwrap();
        let (_, wake) = submit(&mut c, "n1", 2, 2);
        assert!(!wake, "busy: the finish requeues it");
        assert!(
            c.take(Instant::now()).is_none(),
            "never two writes of one device at once"
        );
        let durable = Outcome::Durable(Stamp::new(1, 1));
        let (answers, wake) = c.finish(k, Stamp::new(1, 1), &durable, Instant::now());
        assert!(answers.is_empty(), "1 was superseded already; 2 is newer");
        assert!(wake);
        assert_eq!(
            c.take(Instant::now()).unwrap().1.report.stamp,
            Stamp::new(1, 2)
        );
    }

    #[test]
    fn a_failed_write_answers_only_up_to_what_it_attempted() {
        let mut c = Coalescer::default();
        submit(&mut c, "n1", 1, 1);
        let (k, _) = c.take(Instant::now()).unwrap();
        // Another node's newer report of the device (it moved) waits on.
        submit(&mut c, "n2", 2, 2);
        let failed = Outcome::Unavailable("API server down".into());
        let (answers, wake) = c.finish(k, Stamp::new(1, 1), &failed, Instant::now());
        assert_eq!(ids(&answers), [(1, failed)]);
        assert!(wake);
    }

    #[test]
    fn a_newer_report_of_the_same_node_settles_only_older_waiters_of_that_node() {
        let waiter = |version, node: &str, id, listening| Waiter {
            stamp: Stamp::new(1, version),
            node: node.to_owned(),
            arrived: Instant::now(),
            handle: Id(id, listening),
        };
        let mut waiters = vec![
            waiter(3, "n1", 1, true),
            waiter(5, "n1", 2, true),
            waiter(2, "n2", 3, true),
            waiter(4, "n2", 4, false),
        ];
        let answers = settle_superseded(&mut waiters, "n1", Stamp::new(1, 5));
        assert_eq!(ids(&answers), [(1, Outcome::Superseded(Stamp::new(1, 5)))]);
        // Equal stamps wait for the write; another node's report is never answered for it,
        // and a waiter nobody listens to any more is dropped.
        let left: Vec<u32> = waiters.iter().map(|w| w.handle.0).collect();
        assert_eq!(left, [2, 3]);
    }

    #[test]
    fn a_device_is_written_at_most_once_per_min_interval_and_coalesces_meanwhile() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut c: Coalescer<Id> = Coalescer::new(second);
        let a = key("d");
        c.submit(a.clone(), "n", report(1, 1), None, Id(1, true), t0);
        let (k, _) = c.take(t0).unwrap();
        c.finish(k, Stamp::new(1, 1), &Outcome::Durable(Stamp::new(1, 1)), t0);
        // Two more reports within the interval: held, and only the newest is written.
        c.submit(a.clone(), "n", report(2, 2), None, Id(2, true), t0);
        c.submit(a, "n", report(3, 3), None, Id(3, true), t0);
        assert!(c.take(t0 + second / 2).is_none());
        assert_eq!(c.next_due(), Some(t0 + second));
        let (_, p) = c.take(t0 + second).unwrap();
        assert_eq!(p.report.stamp, Stamp::new(1, 3));
        assert_eq!(c.next_due(), None);
    }
}
