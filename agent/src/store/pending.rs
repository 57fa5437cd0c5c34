//! The writer's copy of the `outbox` table in memory: which devices have a pending report,
//! their newest version and since when, in the order batches take them.
//!
//! The table stays the durable truth, written in the same transactions; this copy is changed
//! with it and reloaded from it when a transaction fails. It exists because reading a batch
//! scanned the table in SQLite, and counting it after every commit scanned it again: at
//! 1,000 devices x 1 Hz those two scans were a fifth of the agent's CPU.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Pending devices: each one's newest unacknowledged version and enqueue time (ms since the
/// epoch), ordered by enqueue time, then name (as `ORDER BY enqueued_at_ms, device`). Both
/// indexes share one copy of each name.
#[derive(Debug, Default)]
pub(super) struct Pending {
    rows: HashMap<Arc<str>, Row>,
    by_age: BTreeSet<(i64, Arc<str>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    version: u64,
    enqueued_at_ms: i64,
}

impl Pending {
    /// From the rows of the table, as (device, version, enqueued_at_ms).
    pub(super) fn from_rows(rows: impl IntoIterator<Item = (String, u64, i64)>) -> Self {
        let mut pending = Self::default();
        for (device, version, enqueued_at_ms) in rows {
            pending.insert(
                device.into(),
                Row {
                    version,
                    enqueued_at_ms,
                },
            );
        }
        pending
    }

    /// Adds a row to both indexes (replacing the map's entry; the caller removes an older
    /// entry of the ordered set).
    fn insert(&mut self, device: Arc<str>, row: Row) {
        self.by_age.insert((row.enqueued_at_ms, device.clone()));
        self.rows.insert(device, row);
    }

    /// A device changed: its newest version is pending. A device already pending keeps its
    /// enqueue time (as `UPSERT_OUTBOX` does), so the oldest age measures how long the uplink
    /// has been behind.
    pub(super) fn upsert(&mut self, device: &str, version: u64, now_ms: i64) {
        if let Some(row) = self.rows.get_mut(device) {
            row.version = version;
            return;
        }
        self.insert(
            device.into(),
            Row {
                version,
                enqueued_at_ms: now_ms,
            },
        );
    }

    /// The controller acknowledged `version` of `device`, from a batch read at `read_ms`: the
    /// row goes if its version is covered (`DELETE_ACKED`); otherwise the device changed
    /// while in flight, and its age restarts at the read (`RESTART_PENDING_AGE`).
    pub(super) fn ack(&mut self, device: &str, version: u64, read_ms: i64) {
        let Some((name, row)) = self.rows.get_key_value(device) else {
            return;
        };
        let (name, row) = (name.clone(), *row);
        if row.version <= version {
            self.rows.remove(device);
        } else if read_ms > row.enqueued_at_ms {
            self.insert(
                name.clone(),
                Row {
                    enqueued_at_ms: read_ms,
                    ..row
                },
            );
        } else {
            return;
        }
        self.by_age.remove(&(row.enqueued_at_ms, name));
    }

    /// Pending devices, oldest first, each with its enqueue time.
    pub(super) fn oldest_first(&self) -> impl Iterator<Item = (&str, i64)> {
        self.by_age.iter().map(|(at, device)| (&**device, *at))
    }

    /// How many devices are pending, and the oldest enqueue time.
    pub(super) fn count_oldest(&self) -> (u64, Option<i64>) {
        (
            self.rows.len() as u64,
            self.by_age.first().map(|(at, _)| *at),
        )
    }

    /// `device`'s pending version, if any.
    #[cfg(test)]
    pub(super) fn version(&self, device: &str) -> Option<u64> {
        self.rows.get(device).map(|r| r.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(p: &Pending) -> Vec<&str> {
        p.oldest_first().map(|(device, _)| device).collect()
    }

    #[test]
    fn a_pending_device_keeps_its_age_and_takes_its_newest_version() {
        let mut p = Pending::default();
        p.upsert("b", 1, 100);
        p.upsert("a", 1, 200);
        p.upsert("b", 2, 300);
        assert_eq!(order(&p), ["b", "a"]);
        assert_eq!(p.version("b"), Some(2));
        assert_eq!(p.count_oldest(), (2, Some(100)));
    }

    #[test]
    fn equal_ages_are_ordered_by_name() {
        let p = Pending::from_rows([("c".into(), 1, 5), ("a".into(), 1, 5), ("b".into(), 1, 4)]);
        assert_eq!(order(&p), ["b", "a", "c"]);
    }

    #[test]
    fn an_ack_removes_only_covered_versions_and_restarts_the_age_of_the_rest() {
        let mut p = Pending::default();
        p.upsert("a", 3, 100);
        p.upsert("b", 5, 150);
        p.upsert("c", 1, 160);
        // Covered: gone.
        p.ack("a", 3, 400);
        // Changed while in flight: stays, its age restarts at the batch's read.
        p.ack("b", 4, 400);
        // An older read never makes a row younger than it is.
        p.ack("c", 0, 120);
        // Not pending at all: nothing happens.
        p.ack("z", 9, 400);
        assert_eq!(p.version("a"), None);
        assert_eq!(p.version("b"), Some(5));
        assert_eq!(order(&p), ["c", "b"]);
        assert_eq!(p.count_oldest(), (2, Some(160)));
        assert_eq!(p.by_age.len(), p.rows.len());
    }

    #[test]
    fn empty() {
        let mut p = Pending::default();
        assert_eq!(p.count_oldest(), (0, None));
        p.upsert("a", 1, 1);
        p.ack("a", 1, 2);
        assert_eq!(p.count_oldest(), (0, None));
        assert!(p.by_age.is_empty());
    }
}
