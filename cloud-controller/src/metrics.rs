//! The controller's metrics: one registry, rendered in the OpenMetrics text format by
//! [`Metrics::render`].
//!
//! Every metric is registered once, in [`Metrics::new`], with its name and help; the code
//! that counts holds a typed handle. Families with a known set of labels are created with
//! them, so each starts at zero. Values owned elsewhere (the write budget, leadership) are
//! read at scrape time through collectors registered by [`Metrics::watch_budget`] and
//! [`Metrics::watch_leadership`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::budget::WriteBudget;
use crate::lease::Leadership;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the latency buckets: by the millisecond below 10 ms (an idle
/// fleet's report is written in a few), finer than a second (HTTP round trips, single
/// writes), then by the second up to 30 s (the time a report waits for its coalesced
/// Kubernetes write under a saturated budget).
const LATENCY_BUCKETS: [f64; 22] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0,
    4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0,
];

/// A counter per value of one label.
type Counters = Family<[(&'static str, &'static str); 1], Counter>;

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Batches answered, by HTTP status.
    batches: Family<[(&'static str, u16); 1], Counter>,
    /// Reports received in well-formed, authorised batches.
    pub reports_received: Counter,
    /// Reports accepted.
    pub reports_accepted: Counter,
    /// Reports already superseded by a newer durable version.
    pub reports_stale: Counter,
    /// All reports rejected (the `rejected` result).
    reports_rejected_all: Counter,
    /// Of the stale reports, those the same node replaced with a newer one before they were
    /// written.
    pub reports_superseded: Counter,
    /// Reports rejected, by reason code.
    reports_rejected: Counters,
    /// Requests refused with 401.
    pub auth_failures: Counter,
    /// Lookups of EdgeNodes missing from the cache that were answered without asking the API
    /// server (negative cache or lookup budget).
    pub unknown_node_lookups_skipped: Counter,
    /// Connections being served.
    pub connections_open: Gauge,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Connections closed for a slow TLS handshake, slow headers or idleness.
    pub connections_timed_out: Counter,
    /// `accept` failures (out of file descriptors).
    pub accept_errors: Counter,
    /// Requests shed before reading their body, by reason (`node_rate`, `body_budget`).
    requests_shed: Counters,
    /// Requests whose body did not arrive within `--http-body-timeout-seconds`.
    pub body_timeouts: Counter,
    /// Requests refused with 429 by a node's token bucket.
    pub node_rate_limited: Counter,
    /// Batches answered 429 because their writes did not finish within the durable wait.
    pub write_backlog_refusals: Counter,
    /// Device status writes that reached the API server successfully.
    pub status_writes: Counter,
    /// Status writes that hit a resourceVersion conflict and were retried.
    pub status_write_conflicts: Counter,
    /// Status writes that failed (API server unreachable or error).
    pub status_write_errors: Counter,
    /// Devices with a report waiting to be written.
    pub writer_pending: Gauge,
    /// Devices created by auto-registration.
    pub devices_registered: Counter,
    /// Kubernetes Events queued for publishing.
    pub events_emitted: Counter,
    /// Events not emitted: paced (one per object and reason per minute) or the queue full.
    pub events_dropped: Counter,
    /// Nodes that started reporting with a new agent epoch (a reinstall or a new database).
    pub agent_epoch_changes: Counter,
    /// Batches refused with 409 because they carried a node's retired agent epoch.
    pub superseded_epoch_batches: Counter,
    /// Batches refused with 429 because their node switched epochs too recently.
    pub epoch_switches_throttled: Counter,
    /// EdgeNode status writes (heartbeats, Ready transitions).
    pub node_status_writes: Counter,
    /// Device condition writes by the liveness loop (Online/InSync).
    pub condition_writes: Counter,
    /// Device writes by DeviceRollouts: a change with its mark, or a revert.
    pub rollout_device_writes: Counter,
    /// DeviceRollout status writes.
    pub rollout_status_writes: Counter,
    /// Open desired-state streams.
    pub desired_streams: Gauge,
    /// Desired-state events sent.
    pub desired_events: Counter,
    /// 1 when the last Kubernetes call succeeded.
    pub kubernetes_up: Gauge,
    /// Live API requests served, by verb.
    live_requests: Counters,
    /// Live API requests refused, by reason.
    live_refused: Counters,
    /// Shards this replica took or gave up.
    shard_changes: Counters,
    /// Requests for another replica's shard, by result.
    forwarded: Counters,
    /// Shard labels written on EdgeNodes and Devices.
    pub shard_labels_written: Counter,
    /// Durable acknowledgements told to agents.
    pub durable_acks_told: Counter,
    /// Durable acknowledgements dropped because --max-durable-acks were owed.
    pub durable_acks_dropped: Counter,
    /// Open watches of the live API.
    pub live_watches: Gauge,
    /// Live watches ended because they fell behind the change window (410).
    pub live_watches_expired: Counter,
    /// Time from a report's arrival to its durable write (or supersession).
    report_durable_latency: Histogram,
    /// Duration of one status write call.
    status_write_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric` under `name` and returns it (a handle sharing its value).
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Every metric, registered with its name and help. Counters are named without
    /// `_total`: the OpenMetrics encoder appends it to the samples.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let r = &mut registry;
        let counter =
            |r: &mut Registry, name: &str, help: &str| add(r, name, help, Counter::default());
        let gauge = |r: &mut Registry, name: &str, help: &str| add(r, name, help, Gauge::default());
        let batches: Family<[(&'static str, u16); 1], Counter> = add(
            r,
            "edgesync_controller_batches",
            "Report batches answered, by HTTP status.",
            Family::default(),
        );
        // The answers an agent is told how to handle (DESIGN.md), each exported from the start.
        for code in [200, 400, 401, 403, 408, 409, 413, 429, 503] {
            drop(batches.get_or_create(&[("code", code)]));
        }
        let reports_received = counter(
            r,
            "edgesync_controller_reports_received",
            "Reports received in authorised, well-formed batches.",
        );
        let reports_superseded = counter(
            r,
            "edgesync_controller_reports_superseded",
            "Reports answered stale before any write because their node sent a newer report of the device (included in the stale results).",
        );
        let results: Counters = add(
            r,
            "edgesync_controller_report_results",
            "Report results sent to agents, by result.",
            Family::default(),
        );
        let [reports_accepted, reports_stale, reports_rejected_all] =
            ["accepted", "stale", "rejected"]
                .map(|v| results.get_or_create(&[("result", v)]).clone());
        let reports_rejected: Counters = add(
            r,
            "edgesync_controller_reports_rejected",
            "Reports rejected, by reason.",
            Family::default(),
        );
        // Known from the start, so an alert on it has a series before the first rejection.
        drop(reports_rejected.get_or_create(&[("reason", "forbidden")]));
        let auth_failures = counter(
            r,
            "edgesync_controller_auth_failures",
            "Requests refused with 401 (missing, wrong or unverifiable token, unknown node).",
        );
        let unknown_node_lookups_skipped = counter(
            r,
            "edgesync_controller_unknown_node_lookups_skipped",
            "Requests for EdgeNodes missing from the cache answered 401 without an API call (recently looked up, or over the lookup budget).",
        );
        let connections_refused = counter(
            r,
            "edgesync_controller_connections_refused",
            "Connections closed at once because --max-connections were open.",
        );
        let connections_timed_out = counter(
            r,
            "edgesync_controller_connections_timed_out",
            "Connections closed for a slow TLS handshake, slow request headers, or no traffic for --http-idle-timeout-seconds.",
        );
        let accept_errors = counter(
            r,
            "edgesync_controller_accept_errors",
            "Failed accepts (out of file descriptors: raise the open-files limit or lower --max-connections).",
        );
        let body_timeouts = counter(
            r,
            "edgesync_controller_body_timeouts",
            "Requests answered 408 because their body did not arrive within --http-body-timeout-seconds.",
        );
        let node_rate_limited = counter(
            r,
            "edgesync_controller_node_rate_limited",
            "Requests refused with 429 by a node's token bucket.",
        );
        let write_backlog_refusals = counter(
            r,
            "edgesync_controller_write_backlog_refusals",
            "Batches answered 429 because their status writes did not finish in time.",
        );
        let status_writes = counter(
            r,
            "edgesync_controller_status_writes",
            "Device status writes accepted by the API server.",
        );
        let status_write_conflicts = counter(
            r,
            "edgesync_controller_status_write_conflicts",
            "Device status writes retried after a resourceVersion conflict.",
        );
        let status_write_errors = counter(
            r,
            "edgesync_controller_status_write_errors",
            "Device status writes that failed (API server unreachable or refusing).",
        );
        let devices_registered = counter(
            r,
            "edgesync_controller_devices_registered",
            "Devices created by auto-registration.",
        );
        let events_emitted = counter(
            r,
            "edgesync_controller_events",
            "Kubernetes Events emitted on Devices and EdgeNodes.",
        );
        let events_dropped = counter(
            r,
            "edgesync_controller_events_dropped",
            "Events not emitted: one per object and reason per minute at most, or the publishing queue full.",
        );
        let agent_epoch_changes = counter(
            r,
            "edgesync_controller_agent_epoch_changes",
            "Nodes whose agent started reporting with a new epoch (reinstalled, or its database recreated); its reports supersede the old epoch's.",
        );
        let superseded_epoch_batches = counter(
            r,
            "edgesync_controller_superseded_epoch_batches",
            "Batches refused with 409 because they carried a retired agent epoch: a second agent runs with the node's identity, or one restored from an old backup.",
        );
        let epoch_switches_throttled = counter(
            r,
            "edgesync_controller_epoch_switches_throttled",
            "Batches answered 429 because their node already switched to a new agent epoch within --agent-epoch-switch-seconds.",
        );
        let node_status_writes = counter(
            r,
            "edgesync_controller_node_status_writes",
            "EdgeNode status writes (heartbeats and Ready transitions).",
        );
        let condition_writes = counter(
            r,
            "edgesync_controller_condition_writes",
            "Device Online/InSync condition writes by the liveness loop.",
        );
        let rollout_device_writes = counter(
            r,
            "edgesync_controller_rollout_device_writes",
            "Device writes by DeviceRollouts: one per device patched (the change and its mark in one write), one per device reverted.",
        );
        let rollout_status_writes = counter(
            r,
            "edgesync_controller_rollout_status_writes",
            "DeviceRollout status writes.",
        );
        let desired_events = counter(
            r,
            "edgesync_controller_desired_events",
            "Desired-state events sent to agents.",
        );
        let requests_shed: Counters = add(
            r,
            "edgesync_controller_requests_shed",
            "Report batches answered before their body was read, by reason: node_rate (the node's token bucket is empty), body_budget (--max-body-bytes-in-flight reached).",
            Family::default(),
        );
        for reason in ["node_rate", "body_budget"] {
            drop(requests_shed.get_or_create(&[("reason", reason)]));
        }
        let connections_open = gauge(
            r,
            "edgesync_controller_connections_open",
            "Connections being served.",
        );
        let writer_pending = gauge(
            r,
            "edgesync_controller_writer_pending_devices",
            "Devices with a report waiting for its status write.",
        );
        let desired_streams = gauge(
            r,
            "edgesync_controller_desired_streams",
            "Open desired-state streams (connected agents).",
        );
        let kubernetes_up = gauge(
            r,
            "edgesync_controller_kubernetes_up",
            "1 when the last call to the Kubernetes API succeeded.",
        );
        let live_requests: Counters = add(
            r,
            "edgesync_controller_live_requests",
            "Requests to the live API (devicestates) served, by verb.",
            Family::default(),
        );
        for verb in ["get", "list", "watch", "discovery"] {
            drop(live_requests.get_or_create(&[("verb", verb)]));
        }
        let live_refused: Counters = add(
            r,
            "edgesync_controller_live_refused",
            "Requests to the live API refused, by reason: unauthenticated (no front-proxy certificate or user), forbidden (SubjectAccessReview), too_many_watches (--live-max-watches), bad_request, unavailable (no SubjectAccessReview answer).",
            Family::default(),
        );
        for reason in [
            "unauthenticated",
            "forbidden",
            "too_many_watches",
            "bad_request",
            "unavailable",
        ] {
            drop(live_refused.get_or_create(&[("reason", reason)]));
        }
        let shard_changes: Counters = add(
            r,
            "edgesync_controller_shard_changes",
            "Shards this replica took (taken) or gave up (given_up: released above its fair share, lost, or at shutdown), with --shards.",
            Family::default(),
        );
        for change in ["taken", "given_up"] {
            drop(shard_changes.get_or_create(&[("change", change)]));
        }
        let forwarded: Counters = add(
            r,
            "edgesync_controller_forwarded_requests",
            "Requests for nodes of another replica's shard, with --shards: answered by the owner (answered), or answered 503 here because the owner could not be reached (unreachable), did not answer within --forward-timeout-seconds (timed_out), --max-forwards were in flight (busy), or the shard had no owner to serve it (moving: a hand-over).",
            Family::default(),
        );
        for result in ["answered", "unreachable", "timed_out", "busy", "moving"] {
            drop(forwarded.get_or_create(&[("result", result)]));
        }
        let shard_labels_written = counter(
            r,
            "edgesync_controller_shard_labels_written",
            "Shard labels written on EdgeNodes and Devices, with --shards: new objects (by the leader), all of them after --shards changed, and Devices moved to another node (by their shard's owner).",
        );
        let durable_acks_told = counter(
            r,
            "edgesync_controller_durable_acks_told",
            "Durable versions told to agents that take live answers (each lets the agent drop a report it kept).",
        );
        let durable_acks_dropped = counter(
            r,
            "edgesync_controller_durable_acks_dropped",
            "Durable versions not remembered because --max-durable-acks were owed: those agents send the reports again after their timeout (raise --max-durable-acks to fit the fleet's devices).",
        );
        let live_watches = gauge(
            r,
            "edgesync_controller_live_watches",
            "Open watches of the live API.",
        );
        let live_watches_expired = counter(
            r,
            "edgesync_controller_live_watches_expired",
            "Live watches ended with 410 Gone because they fell behind the change window (--live-window-changes, --live-window-bytes): slow clients, or a window too small for the update rate.",
        );
        let report_durable_latency = add(
            r,
            "edgesync_controller_report_durable_seconds",
            "Time from a report's arrival to its durable status write (or supersession).",
            Histogram::new(LATENCY_BUCKETS),
        );
        let status_write_latency = add(
            r,
            "edgesync_controller_status_write_seconds",
            "Duration of one Device status write call.",
            Histogram::new(LATENCY_BUCKETS),
        );
        Self {
            registry: Mutex::new(registry),
            batches,
            reports_received,
            reports_accepted,
            reports_stale,
            reports_rejected_all,
            reports_superseded,
            reports_rejected,
            auth_failures,
            unknown_node_lookups_skipped,
            connections_open,
            connections_refused,
            connections_timed_out,
            accept_errors,
            requests_shed,
            body_timeouts,
            node_rate_limited,
            write_backlog_refusals,
            status_writes,
            status_write_conflicts,
            status_write_errors,
            writer_pending,
            devices_registered,
            events_emitted,
            events_dropped,
            agent_epoch_changes,
            superseded_epoch_batches,
            epoch_switches_throttled,
            node_status_writes,
            condition_writes,
            rollout_device_writes,
            rollout_status_writes,
            desired_streams,
            desired_events,
            kubernetes_up,
            live_requests,
            live_refused,
            shard_changes,
            forwarded,
            shard_labels_written,
            durable_acks_told,
            durable_acks_dropped,
            live_watches,
            live_watches_expired,
            report_durable_latency,
            status_write_latency,
        }
    }

    fn register_collector(&self, collector: impl Collector) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(Box::new(collector));
    }

    /// Exports the write budget's current rate.
    pub fn watch_budget(&self, budget: Arc<WriteBudget>) {
        self.register_collector(BudgetRate(budget));
    }

    /// Exports whether this replica leads.
    pub fn watch_leadership(&self, leader: Arc<Leadership>) {
        self.register_collector(Leader(leader));
    }

    /// Counts a rejected report.
    pub fn reject(&self, reason: &'static str) {
        self.reports_rejected
            .get_or_create(&[("reason", reason)])
            .inc();
        self.reports_rejected_all.inc();
    }

    /// Counts a request shed before its body was read.
    pub fn shed(&self, reason: &'static str) {
        self.requests_shed
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counts a live API request served.
    pub fn live_request(&self, verb: &'static str) {
        self.live_requests.get_or_create(&[("verb", verb)]).inc();
    }

    /// Counts a live API request refused.
    pub fn live_refused(&self, reason: &'static str) {
        self.live_refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts a request for another replica's shard.
    pub fn forwarded(&self, result: &'static str) {
        self.forwarded.get_or_create(&[("result", result)]).inc();
    }

    /// Counts a shard taken or given up.
    pub fn shard_changes(&self, change: &'static str) {
        self.shard_changes
            .get_or_create(&[("change", change)])
            .inc();
    }

    /// Exports the shards owned, read at each scrape.
    pub fn watch_shards(&self, shards: Arc<crate::shard::leases::Shards>) {
        self.register_collector(OwnedShards(shards));
    }

    /// Exports the caches' sizes, read at each scrape.
    pub fn watch_caches(&self, caches: crate::cache::Caches) {
        self.register_collector(CacheSize(caches));
    }

    /// Exports the live state's size, read at each scrape.
    pub fn watch_live(&self, live: Arc<crate::live::state::Live>) {
        self.register_collector(LiveSize(live));
    }

    /// Counts an answered batch.
    pub fn batch(&self, status: u16) {
        self.batches.get_or_create(&[("code", status)]).inc();
    }

    /// Records the time from a report's arrival to its durable write.
    pub fn observe_report_durable(&self, took: Duration) {
        self.report_durable_latency.observe(took.as_secs_f64());
    }

    /// Records one status write call.
    pub fn observe_status_write(&self, took: Duration) {
        self.status_write_latency.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Encodes one gauge sample read at scrape time.
fn const_gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// The write budget's rate, read at each scrape.
#[derive(Debug)]
struct BudgetRate(Arc<WriteBudget>);

impl Collector for BudgetRate {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        const_gauge(
            &mut e,
            "edgesync_controller_write_budget_qps",
            "The write budget's current rate, writes per second (adapted to the API server).",
            self.0.rate().round() as i64,
        )
    }
}

/// Leadership, read at each scrape (no stale copy after a pause).
#[derive(Debug)]
struct Leader(Arc<Leadership>);

impl Collector for Leader {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        const_gauge(
            &mut e,
            "edgesync_controller_leader",
            "1 when this replica runs the singleton loops.",
            i64::from(self.0.is_leader()),
        )
    }
}

/// Shards owned, read at each scrape (an owned shard ends at its deadline, not at a write).
#[derive(Debug)]
struct OwnedShards(Arc<crate::shard::leases::Shards>);

impl Collector for OwnedShards {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        const_gauge(
            &mut e,
            "edgesync_controller_shards_owned",
            "Shards this replica owns now (of --shards).",
            self.0.owned().len() as i64,
        )?;
        const_gauge(
            &mut e,
            "edgesync_controller_shards_served",
            "Shards this replica owns and serves: its caches have listed their objects (a shard just taken is owned but not yet served; its requests get shard_moving meanwhile).",
            self.0.served() as i64,
        )
    }
}

/// The caches' sizes, read at each scrape.
struct CacheSize(crate::cache::Caches);

impl std::fmt::Debug for CacheSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheSize")
    }
}

impl Collector for CacheSize {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        const_gauge(
            &mut e,
            "edgesync_controller_cached_devices",
            "Devices in this replica's cache (every Device, or with --shards those of its shards).",
            self.0.devices.state().len() as i64,
        )?;
        const_gauge(
            &mut e,
            "edgesync_controller_cached_nodes",
            "EdgeNodes in this replica's cache (every EdgeNode, or with --shards those of its shards).",
            self.0.nodes.state().len() as i64,
        )
    }
}

/// The live state's size, read at each scrape.
#[derive(Debug)]
struct LiveSize(Arc<crate::live::state::Live>);

impl Collector for LiveSize {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (devices, state_bytes, window, window_bytes) = {
            let s = self.0.read();
            (s.len(), s.state_bytes(), s.window_len(), s.window_bytes())
        };
        const_gauge(
            &mut e,
            "edgesync_controller_live_devices",
            "Devices in the live state.",
            devices as i64,
        )?;
        const_gauge(
            &mut e,
            "edgesync_controller_live_state_bytes",
            "About how many bytes the live states hold (reported documents as JSON, labels, fixed fields).",
            state_bytes as i64,
        )?;
        const_gauge(
            &mut e,
            "edgesync_controller_live_window_changes",
            "Changes in the live watch window (a watch can resume from any of them).",
            window as i64,
        )?;
        const_gauge(
            &mut e,
            "edgesync_controller_live_window_bytes",
            "About how many bytes of replaced states the live watch window keeps (bounded by --live-window-bytes).",
            window_bytes as i64,
        )
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
        m.reports_accepted.inc_by(5);
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
        assert!(text.contains("edgesync_controller_requests_shed_total{reason=\"body_budget\"} 0"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
