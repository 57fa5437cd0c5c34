//! Whether the store can commit, for `/readyz`, the metrics and the MQTT driver's recovery.
//!
//! Set by the writer thread after every transaction: a failed one (disk full, I/O error)
//! marks the store failing with its error; the next successful one clears it. Also carries
//! what the heartbeat reports about the store: lost commits found at start (see `witness`)
//! and how close the device count is to `store.max_devices`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The store's ability to commit.
#[derive(Debug, Default)]
pub struct StoreHealth {
    failing: AtomicBool,
    failed_commits: AtomicU64,
    /// Transactions committed, and those of them fsynced.
    commits: AtomicU64,
    synced_commits: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// `journal_mode` and `synchronous` as read back from the writer's connection.
    pragmas: OnceLock<(String, i64)>,
    /// Commits found lost at start (0: none), until the alarm is cleared.
    lost_commits: AtomicU64,
    lost_detail: Mutex<Option<String>>,
    devices: AtomicU64,
    max_devices: AtomicU64,
    /// Devices with a pending report, and when the oldest of them was enqueued (ms since
    /// the epoch, 0: none), as of the last commit.
    outbox_pending: AtomicU64,
    outbox_oldest_ms: AtomicI64,
}

impl StoreHealth {
    pub(super) fn failed(&self, error: &str) {
        self.failed_commits.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_owned());
        }
        self.failing.store(true, Ordering::Release);
    }

    pub(super) fn set_pragmas(&self, journal: String, synchronous: i64) {
        let _ = self.pragmas.set((journal, synchronous));
    }

    pub(super) fn set_lost_commits(&self, lost: u64, detail: String) {
        self.lost_commits.store(lost, Ordering::Relaxed);
        if let Ok(mut d) = self.lost_detail.lock() {
            *d = Some(detail);
        }
    }

    pub(super) fn set_devices(&self, devices: usize, max: usize) {
        self.devices.store(devices as u64, Ordering::Relaxed);
        self.max_devices.store(max as u64, Ordering::Relaxed);
    }

    pub(super) fn set_outbox(&self, pending: u64, oldest_ms: Option<i64>) {
        self.outbox_pending.store(pending, Ordering::Relaxed);
        self.outbox_oldest_ms
            .store(oldest_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// The outbox as of the last commit: devices with a pending report, and the age of the
    /// oldest of them in seconds. Kept by the writer after each commit that changed rows,
    /// so that the uplink reads it without a round trip to the writer thread (two per batch
    /// before, each waking it).
    pub fn outbox(&self) -> (u64, u64) {
        let oldest = self.outbox_oldest_ms.load(Ordering::Relaxed);
        (
            self.outbox_pending.load(Ordering::Relaxed),
            super::age_seconds((oldest != 0).then_some(oldest)),
        )
    }

    /// Commits the database was found to have lost, with what the detection found; `None`
    /// while no loss was ever detected (or the alarm was cleared).
    pub fn lost_commits(&self) -> Option<(u64, String)> {
        let lost = self.lost_commits.load(Ordering::Relaxed);
        (lost > 0).then(|| {
            let detail = self.lost_detail.lock().ok().and_then(|d| d.clone());
            (lost, detail.unwrap_or_default())
        })
    }

    /// Devices with a shadow, and `store.max_devices`.
    pub fn devices(&self) -> (u64, u64) {
        (
            self.devices.load(Ordering::Relaxed),
            self.max_devices.load(Ordering::Relaxed),
        )
    }

    pub(super) fn committed(&self, synced: bool) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        if synced {
            self.synced_commits.fetch_add(1, Ordering::Relaxed);
        }
        if self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("The store commits again");
        }
    }

    /// Whether the last transaction failed.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Why the store cannot commit, while it cannot.
    pub fn problem(&self) -> Option<String> {
        if !self.is_failing() {
            return None;
        }
        let last = self.last_error.lock().ok().and_then(|l| l.clone());
        Some(last.unwrap_or_else(|| "unknown error".to_owned()))
    }
}

/// The store's health as metrics, read at each scrape.
impl Collector for StoreHealth {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut e,
            "edgesync_agent_store_commit_failing",
            "1 while the database cannot commit (disk full, I/O error): ingest is paused, nothing is acknowledged.",
            u64::from(self.is_failing()),
        )?;
        counter(
            &mut e,
            "edgesync_agent_store_failed_commits",
            "Transactions the database refused.",
            self.failed_commits.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "edgesync_agent_store_commits",
            "Transactions committed (each holds every message that arrived while the previous one committed).",
            self.commits.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "edgesync_agent_store_synced_commits",
            "Commits fsynced before they were acknowledged (store.durability = power-loss-safe).",
            self.synced_commits.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut e,
            "edgesync_agent_store_lost_commits",
            "Commits the database was found to have lost at start (its -wal deleted, an older copy restored); stays until `edgesync-agent store clear-lost-commits`.",
            self.lost_commits.load(Ordering::Relaxed),
        )?;
        let (pending, oldest_age) = self.outbox();
        gauge(
            &mut e,
            "edgesync_agent_outbox_pending_devices",
            "Devices with a report not yet acknowledged by the controller.",
            pending,
        )?;
        gauge(
            &mut e,
            "edgesync_agent_outbox_oldest_pending_age_seconds",
            "Age of the oldest unacknowledged report.",
            oldest_age,
        )?;
        let (devices, max) = self.devices();
        gauge(
            &mut e,
            "edgesync_agent_store_devices",
            "Devices with a shadow.",
            devices,
        )?;
        gauge(
            &mut e,
            "edgesync_agent_store_max_devices",
            "store.max_devices: updates from further new devices are rejected.",
            max,
        )?;
        if let Some((journal, synchronous)) = self.pragmas.get() {
            let level = match synchronous {
                0 => "off",
                1 => "normal",
                2 => "full",
                3 => "extra",
                _ => "unknown",
            };
            let info = ConstGauge::new(1i64);
            let mut m = e.encode_descriptor(
                "edgesync_agent_store_info",
                "The database's durability settings, as read back from the agent's own connection.",
                None,
                info.metric_type(),
            )?;
            let labels = [("journal_mode", journal.as_str()), ("synchronous", level)];
            info.encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_until_the_next_commit() {
        let h = StoreHealth::default();
        assert_eq!(h.problem(), None);
        h.failed("database or disk is full");
        assert_eq!(h.problem().as_deref(), Some("database or disk is full"));
        let h = std::sync::Arc::new(h);
        let metrics = crate::metrics::Metrics::new();
        metrics.register_collector(std::sync::Arc::clone(&h));
        let text = metrics.render();
        assert!(
            text.contains("edgesync_agent_store_commit_failing 1"),
            "{text}"
        );
        assert!(text.contains("edgesync_agent_store_failed_commits_total 1"));
        h.set_outbox(3, Some(crate::store::now_ms()));
        assert!(
            metrics
                .render()
                .contains("edgesync_agent_outbox_pending_devices 3"),
            "the outbox is read at the scrape, whether or not an uplink runs"
        );
        h.committed(true);
        h.committed(false);
        assert_eq!(h.problem(), None);
        let text = metrics.render();
        assert!(
            text.contains("edgesync_agent_store_commits_total 2"),
            "{text}"
        );
        assert!(
            text.contains("edgesync_agent_store_synced_commits_total 1"),
            "{text}"
        );
    }
}
