//! The controller's metrics, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use edgesync_protocol::prom::{self, Histogram};

/// Every metric the controller exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Batches received, by HTTP status class of the answer.
    pub batches: Mutex<BTreeMap<u16, u64>>,
    /// Reports received in well-formed, authorised batches.
    pub reports_received: AtomicU64,
    /// Report results, by outcome.
    pub reports_accepted: AtomicU64,
    /// Reports already superseded by a newer durable version.
    pub reports_stale: AtomicU64,
    /// Of the stale reports, those the same node replaced with a newer one before they were
    /// written.
    pub reports_superseded: AtomicU64,
    /// Reports rejected, by reason code.
    pub reports_rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused with 401.
    pub auth_failures: AtomicU64,
    /// Lookups of EdgeNodes missing from the cache that were answered without asking the API
    /// server (negative cache or lookup budget).
    pub unknown_node_lookups_skipped: AtomicU64,
    /// Connections being served.
    pub connections_open: AtomicU64,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed for a slow TLS handshake, slow headers or idleness.
    pub connections_timed_out: AtomicU64,
    /// `accept` failures (out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Requests shed before reading their body, by reason (`node_rate`, `body_budget`).
    pub requests_shed: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests whose body did not arrive within `--http-body-timeout-seconds`.
    pub body_timeouts: AtomicU64,
    /// Requests refused with 429 by a node's token bucket.
    pub node_rate_limited: AtomicU64,
    /// Batches answered 429 because their writes did not finish within the durable wait.
    pub write_backlog_refusals: AtomicU64,
    /// Device status writes that reached the API server successfully.
    pub status_writes: AtomicU64,
    /// Status writes that hit a resourceVersion conflict and were retried.
    pub status_write_conflicts: AtomicU64,
    /// Status writes that failed (API server unreachable or error).
    pub status_write_errors: AtomicU64,
    /// Devices with a report waiting to be written.
    pub writer_pending: AtomicU64,
    /// Devices created by auto-registration.
    pub devices_registered: AtomicU64,
    /// Kubernetes Events queued for publishing.
    pub events_emitted: AtomicU64,
    /// Events not emitted: paced (one per object and reason per minute) or the queue full.
    pub events_dropped: AtomicU64,
    /// Nodes that started reporting with a new agent epoch (a reinstall or a new database).
    pub agent_epoch_changes: AtomicU64,
    /// Batches refused with 409 because they carried a node's retired agent epoch.
    pub superseded_epoch_batches: AtomicU64,
    /// Batches refused with 429 because their node switched epochs too recently.
    pub epoch_switches_throttled: AtomicU64,
    /// EdgeNode status writes (heartbeats, Ready transitions).
    pub node_status_writes: AtomicU64,
    /// Device condition writes by the liveness loop (Online/InSync).
    pub condition_writes: AtomicU64,
    /// Open desired-state streams.
    pub desired_streams: AtomicU64,
    /// Desired-state events sent.
    pub desired_events: AtomicU64,
    /// The write budget, read when rendered.
    pub write_budget: std::sync::OnceLock<std::sync::Arc<crate::budget::WriteBudget>>,
    /// This replica's leadership, read when rendered (no stale copy after a pause).
    pub leader: std::sync::OnceLock<std::sync::Arc<crate::lease::Leadership>>,
    /// Whether the last Kubernetes call succeeded.
    pub kubernetes_up: AtomicBool,
    /// Time from a report's arrival to its durable write (or supersession).
    pub report_durable_latency: Histogram,
    /// Duration of one status write call.
    pub status_write_latency: Histogram,
}

impl Metrics {
    /// Counts a rejected report.
    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut m) = self.reports_rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts a request shed before its body was read.
    pub fn shed(&self, reason: &'static str) {
        if let Ok(mut m) = self.requests_shed.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts an answered batch.
    pub fn batch(&self, status: u16) {
        if let Ok(mut m) = self.batches.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let batches: Vec<(String, u64)> = self
            .batches
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default();
        prom::family(
            &mut out,
            "edgesync_controller_batches_total",
            "counter",
            "Report batches answered, by HTTP status.",
            "code",
            batches.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        prom::counter(
            &mut out,
            "edgesync_controller_reports_received_total",
            "Reports received in authorised, well-formed batches.",
            load(&self.reports_received),
        );
        prom::counter(
            &mut out,
            "edgesync_controller_reports_superseded_total",
            "Reports answered stale before any write because their node sent a newer report of \
             the device (included in the stale results).",
            load(&self.reports_superseded),
        );
        let mut results = vec![
            ("accepted", load(&self.reports_accepted)),
            ("stale", load(&self.reports_stale)),
        ];
        let rejected: u64 = self
            .reports_rejected
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or_default();
        results.push(("rejected", rejected));
        prom::family(
            &mut out,
            "edgesync_controller_report_results_total",
            "counter",
            "Report results sent to agents, by result.",
            "result",
            results,
        );
        let reasons: Vec<(&str, u64)> = self
            .reports_rejected
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        prom::family(
            &mut out,
            "edgesync_controller_reports_rejected_total",
            "counter",
            "Reports rejected, by reason.",
            "reason",
            reasons,
        );
        for (name, help, v) in [
            (
                "edgesync_controller_auth_failures_total",
                "Requests refused with 401 (missing, wrong or unverifiable token, unknown node).",
                &self.auth_failures,
            ),
            (
                "edgesync_controller_unknown_node_lookups_skipped_total",
                "Requests for EdgeNodes missing from the cache answered 401 without an API call (recently looked up, or over the lookup budget).",
                &self.unknown_node_lookups_skipped,
            ),
            (
                "edgesync_controller_connections_refused_total",
                "Connections closed at once because --max-connections were open.",
                &self.connections_refused,
            ),
            (
                "edgesync_controller_connections_timed_out_total",
                "Connections closed for a slow TLS handshake, slow request headers, or no traffic for --http-idle-timeout-seconds.",
                &self.connections_timed_out,
            ),
            (
                "edgesync_controller_accept_errors_total",
                "Failed accepts (out of file descriptors: raise the open-files limit or lower --max-connections).",
                &self.accept_errors,
            ),
            (
                "edgesync_controller_body_timeouts_total",
                "Requests answered 408 because their body did not arrive within --http-body-timeout-seconds.",
                &self.body_timeouts,
            ),
            (
                "edgesync_controller_node_rate_limited_total",
                "Requests refused with 429 by a node's token bucket.",
                &self.node_rate_limited,
            ),
            (
                "edgesync_controller_write_backlog_refusals_total",
                "Batches answered 429 because their status writes did not finish in time.",
                &self.write_backlog_refusals,
            ),
            (
                "edgesync_controller_status_writes_total",
                "Device status writes accepted by the API server.",
                &self.status_writes,
            ),
            (
                "edgesync_controller_status_write_conflicts_total",
                "Device status writes retried after a resourceVersion conflict.",
                &self.status_write_conflicts,
            ),
            (
                "edgesync_controller_status_write_errors_total",
                "Device status writes that failed (API server unreachable or refusing).",
                &self.status_write_errors,
            ),
            (
                "edgesync_controller_devices_registered_total",
                "Devices created by auto-registration.",
                &self.devices_registered,
            ),
            (
                "edgesync_controller_events_total",
                "Kubernetes Events emitted on Devices and EdgeNodes.",
                &self.events_emitted,
            ),
            (
                "edgesync_controller_events_dropped_total",
                "Events not emitted: one per object and reason per minute at most, or the publishing queue full.",
                &self.events_dropped,
            ),
            (
                "edgesync_controller_agent_epoch_changes_total",
                "Nodes whose agent started reporting with a new epoch (reinstalled, or its database recreated); its reports supersede the old epoch's.",
                &self.agent_epoch_changes,
            ),
            (
                "edgesync_controller_superseded_epoch_batches_total",
                "Batches refused with 409 because they carried a retired agent epoch: a second agent runs with the node's identity, or one restored from an old backup.",
                &self.superseded_epoch_batches,
            ),
            (
                "edgesync_controller_epoch_switches_throttled_total",
                "Batches answered 429 because their node already switched to a new agent epoch within --agent-epoch-switch-seconds.",
                &self.epoch_switches_throttled,
            ),
            (
                "edgesync_controller_node_status_writes_total",
                "EdgeNode status writes (heartbeats and Ready transitions).",
                &self.node_status_writes,
            ),
            (
                "edgesync_controller_condition_writes_total",
                "Device Online/InSync condition writes by the liveness loop.",
                &self.condition_writes,
            ),
            (
                "edgesync_controller_desired_events_total",
                "Desired-state events sent to agents.",
                &self.desired_events,
            ),
        ] {
            prom::counter(&mut out, name, help, load(v));
        }
        let shed: Vec<(&str, u64)> = self
            .requests_shed
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        prom::family(
            &mut out,
            "edgesync_controller_requests_shed_total",
            "counter",
            "Report batches answered before their body was read, by reason: node_rate (the node's token bucket is empty), body_budget (--max-body-bytes-in-flight reached).",
            "reason",
            shed,
        );
        prom::gauge(
            &mut out,
            "edgesync_controller_connections_open",
            "Connections being served.",
            load(&self.connections_open),
        );
        prom::gauge(
            &mut out,
            "edgesync_controller_writer_pending_devices",
            "Devices with a report waiting for its status write.",
            load(&self.writer_pending),
        );
        prom::gauge(
            &mut out,
            "edgesync_controller_desired_streams",
            "Open desired-state streams (connected agents).",
            load(&self.desired_streams),
        );
        prom::gauge(
            &mut out,
            "edgesync_controller_leader",
            "1 when this replica runs the singleton loops.",
            u64::from(self.leader.get().is_some_and(|l| l.is_leader())),
        );
        prom::gauge(
            &mut out,
            "edgesync_controller_write_budget_qps",
            "The write budget's current rate, writes per second (adapted to the API server).",
            self.write_budget
                .get()
                .map_or(0, |b| b.rate().round() as u64),
        );
        prom::gauge(
            &mut out,
            "edgesync_controller_kubernetes_up",
            "1 when the last call to the Kubernetes API succeeded.",
            u64::from(self.kubernetes_up.load(Ordering::Relaxed)),
        );
        self.report_durable_latency.render(
            &mut out,
            "edgesync_controller_report_durable_seconds",
            "Time from a report's arrival to its durable status write (or supersession).",
        );
        self.status_write_latency.render(
            &mut out,
            "edgesync_controller_status_write_seconds",
            "Duration of one Device status write call.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families() {
        let m = Metrics::default();
        m.reject("forbidden");
        m.batch(200);
        m.batch(200);
        m.reports_accepted.fetch_add(5, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("edgesync_controller_batches_total{code=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("edgesync_controller_reports_rejected_total{reason=\"forbidden\"} 1")
        );
        assert!(text.contains("edgesync_controller_report_results_total{result=\"accepted\"} 5"));
        assert!(text.contains("edgesync_controller_report_results_total{result=\"rejected\"} 1"));
    }
}
