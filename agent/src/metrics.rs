//! The agent's metrics: one registry, rendered in the OpenMetrics text format by
//! [`Metrics::render`].
//!
//! Every metric is registered once, in [`Metrics::new`], with its name and help; the code
//! that counts holds a typed handle (counter, gauge, histogram). Families with a fixed set
//! of labels are created with all of them, so each starts at zero and `rate()` works from
//! the first scrape. Values that live elsewhere (the store's health) are read at scrape
//! time through a [`Collector`] registered with [`Metrics::register_collector`].

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the latency buckets: by the millisecond below 10 ms (where an
/// idle plant's publish-to-status time is spent, stage by stage), finer than a second (HTTP
/// round trips), then by the second up to 30 s (a batch waiting for the controller's durable
/// writes under a saturated write budget).
const LATENCY_BUCKETS: [f64; 22] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0,
    4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0,
];

/// A label set of one label, both parts fixed at compile time.
type Label = [(&'static str, &'static str); 1];

/// A counter per value of one label.
type Counters = Family<Label, Counter>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// MQTT messages received (all topics we subscribe to).
    pub mqtt_received: Counter,
    /// Updates accepted and committed.
    pub updates_accepted: Counter,
    /// Updates rejected, by reason.
    updates_rejected: Counters,
    /// Broker connection state (1 connected).
    pub mqtt_connected: Gauge,
    /// MQTT connection errors.
    pub mqtt_connection_errors: Counter,
    /// 1 when the last request to the controller got an HTTP answer.
    pub cloud_connected: Gauge,
    /// Batches sent (including heartbeats).
    pub batches_sent: Counter,
    /// Batch attempts that failed and will be retried.
    pub batches_retried: Counter,
    /// Reports acknowledged as accepted.
    pub reports_accepted: Counter,
    /// Reports acknowledged as stale.
    pub reports_stale: Counter,
    /// Reports the controller rejected (dropped).
    pub reports_rejected: Counter,
    /// Durable versions the controller told (each ends its device's rows up to it).
    pub durable_acks: Counter,
    /// Devices whose report a live answer accepted, awaiting a durable version.
    pub awaiting_durable: Gauge,
    /// Reports sent again because no durable version came in time or the live state that
    /// held them was lost.
    pub live_resends: Counter,
    /// Seconds spent waiting on the upstream rate limit.
    pub rate_limited_seconds: Counter<f64, AtomicU64>,
    /// Desired-state events received.
    pub desired_events: Counter,
    /// Deltas published to devices.
    pub deltas_published: Counter,
    /// Replies to devices dropped because the MQTT request queue was full.
    pub replies_dropped: Counter,
    /// PUBACKs not sent because the MQTT request queue was full (redelivered later).
    pub acks_deferred: Counter,
    /// Store commits that failed.
    pub store_errors: Counter,
    /// Reconnects made so the broker resends messages whose commit had failed.
    pub mqtt_redeliveries: Counter,
    /// Batch round-trip latency.
    batch_latency: Histogram,
    /// From a device message's arrival to its acknowledgement.
    message_ack_latency: Histogram,
    /// From a device becoming pending to the batch carrying it.
    report_wait: Histogram,
    /// Embedded broker: connected clients (the agent's own connection included).
    pub broker_clients: Gauge,
    /// Embedded broker: PUBLISH packets received from clients.
    pub broker_messages_in: Counter,
    /// Embedded broker: QoS0 messages dropped for a subscriber that does not keep up.
    pub broker_dropped_qos0: Counter,
    /// Embedded broker: QoS1 messages dropped for a session whose queue was full.
    pub broker_dropped_queue: Counter,
    /// Embedded broker: times each limit was hit, indexed by [`BrokerLimit`].
    broker_limit_hits: [Counter; BrokerLimit::ALL.len()],
    /// Embedded broker: actions refused by authentication or the ACL, indexed by
    /// [`BrokerDenial`].
    broker_denied: [Counter; BrokerDenial::ALL.len()],
    /// Embedded broker: clients paused because their messages wait for the agent's commit.
    pub broker_paused: Counter,
    /// Sparkplug B messages used only in part, by issue.
    sparkplug_issues: Counters,
    /// Sparkplug B rebirth requests published.
    pub sparkplug_rebirths: Counter,
    /// Sparkplug B commands (NCMD/DCMD) published for desired changes.
    pub sparkplug_writes: Counter,
    /// Sparkplug B edge nodes remembered.
    sparkplug_edge_nodes: Gauge,
}

/// A limit of the embedded broker (the `limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerLimit {
    /// `broker.max_connections`: the connection was closed at once.
    Connections,
    /// `broker.max_connect_bytes`: a CONNECT too large.
    ConnectBytes,
    /// `broker.connect_timeout_secs`: no CONNECT in time.
    ConnectTimeout,
    /// `broker.max_packet_bytes`: the connection was closed.
    PacketSize,
    /// `broker.max_topic_bytes` / `max_topic_levels`: refused topic or filter.
    Topic,
    /// `broker.max_subscriptions_per_client`: SUBACK failure.
    Subscriptions,
    /// `broker.max_session_queue_bytes`: a QoS1 message for a session dropped.
    SessionQueue,
    /// `broker.max_queued_bytes`: a QoS1 message dropped (all sessions together).
    QueuedBytes,
    /// `broker.max_write_backlog_bytes`: a QoS0 message dropped, or a client not reading
    /// its acknowledgements disconnected.
    WriteBacklog,
    /// `broker.max_retained_bytes`: a retained message not kept.
    Retained,
    /// `broker.max_sessions`: a new session refused.
    Sessions,
    /// A persistent session removed after `broker.session_expiry_secs`.
    SessionExpiry,
    /// Accept failed (out of file descriptors and the like).
    Accept,
    /// `broker.max_client_bytes_per_sec`: reading from a client paused to hold it to its rate.
    ReadRate,
    /// A SUBSCRIBE's retained messages cut short at the per-packet scan budget.
    RetainedScan,
    /// `broker.max_sessions_per_user`: a user's new persistent session refused.
    UserSessions,
    /// `broker.max_pending_connections`: the oldest connection still without a CONNECT
    /// closed to make room for a new one.
    PendingConnections,
    /// `broker.max_password_checks`: a CONNECT refused because every password check slot
    /// was busy.
    PasswordChecks,
}

impl BrokerLimit {
    /// Every limit, in declaration order (the index into the counters).
    pub const ALL: [BrokerLimit; 18] = [
        Self::Connections,
        Self::ConnectBytes,
        Self::ConnectTimeout,
        Self::PacketSize,
        Self::Topic,
        Self::Subscriptions,
        Self::SessionQueue,
        Self::QueuedBytes,
        Self::WriteBacklog,
        Self::Retained,
        Self::Sessions,
        Self::SessionExpiry,
        Self::Accept,
        Self::ReadRate,
        Self::RetainedScan,
        Self::UserSessions,
        Self::PendingConnections,
        Self::PasswordChecks,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::ConnectBytes => "connect_bytes",
            Self::ConnectTimeout => "connect_timeout",
            Self::PacketSize => "packet_size",
            Self::Topic => "topic",
            Self::Subscriptions => "subscriptions",
            Self::SessionQueue => "session_queue_bytes",
            Self::QueuedBytes => "queued_bytes",
            Self::WriteBacklog => "write_backlog_bytes",
            Self::Retained => "retained_bytes",
            Self::Sessions => "sessions",
            Self::SessionExpiry => "session_expiry",
            Self::Accept => "accept_error",
            Self::ReadRate => "read_rate",
            Self::RetainedScan => "retained_scan",
            Self::UserSessions => "user_sessions",
            Self::PendingConnections => "pending_connections",
            Self::PasswordChecks => "password_checks",
        }
    }
}

/// What the embedded broker refused a client (the `action` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerDenial {
    /// CONNECT refused: bad credentials, the agent's reserved client id, another user's
    /// session, or an anonymous client where identities are required.
    Connect,
    /// PUBLISH outside the client's ACL.
    Publish,
    /// SUBSCRIBE outside the client's ACL.
    Subscribe,
    /// A will topic outside the client's ACL (CONNECT refused).
    Will,
    /// A TLS handshake that failed (no, untrusted or expired client certificate, or not
    /// TLS at all), or a client certificate that names nobody.
    Tls,
}

impl BrokerDenial {
    /// Every action, in declaration order (the index into the counters).
    pub const ALL: [BrokerDenial; 5] = [
        Self::Connect,
        Self::Publish,
        Self::Subscribe,
        Self::Will,
        Self::Tls,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
            Self::Will => "will",
            Self::Tls => "tls",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric` under `name` and returns it (a handle sharing its value).
fn add<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers a family of counters with one label, and returns the counter of each of
/// `values` (created now, so each is exported from the start).
fn labelled<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = add(registry, name, help, Counters::default());
    values.map(|v| family.get_or_create(&[(label, v)]).clone())
}

/// Registers a family of counters with one open set of values, `known` created now.
fn open_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    known: &[&'static str],
) -> Counters {
    let family = add(registry, name, help, Counters::default());
    for v in known {
        drop(family.get_or_create(&[(label, *v)]));
    }
    family
}

impl Metrics {
    /// Every metric, registered with its name and help. Counters are named without
    /// `_total`: the OpenMetrics encoder appends it to the samples.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let r = &mut r;
        let counter =
            |r: &mut Registry, name: &str, help: &str| add(r, name, help, Counter::default());
        let gauge = |r: &mut Registry, name: &str, help: &str| add(r, name, help, Gauge::default());
        let mqtt_received = counter(
            r,
            "edgesync_agent_mqtt_messages_received",
            "MQTT messages received on subscribed topics.",
        );
        let updates_accepted = counter(
            r,
            "edgesync_agent_updates_accepted",
            "Shadow updates accepted and committed to SQLite.",
        );
        let updates_rejected = open_family(
            r,
            "edgesync_agent_updates_rejected",
            "Shadow updates rejected, by reason.",
            "reason",
            &["malformed", "device_limit"],
        );
        let sparkplug_issues = open_family(
            r,
            "edgesync_agent_sparkplug_issues",
            "Sparkplug B messages used only in part (seq gaps, unknown aliases, unmapped metrics...), by issue.",
            "issue",
            &["seq_gap", "unknown_alias"],
        );
        let [sparkplug_rebirths, sparkplug_writes] = labelled(
            r,
            "edgesync_agent_sparkplug_commands",
            "Sparkplug B commands published: rebirth requests and writes of desired values.",
            "command",
            ["rebirth", "write"],
        );
        let sparkplug_edge_nodes = gauge(
            r,
            "edgesync_agent_sparkplug_edge_nodes",
            "Sparkplug B edge nodes whose births the agent remembers.",
        );
        let mqtt_connected = gauge(
            r,
            "edgesync_agent_mqtt_connected",
            "1 when connected to the MQTT broker.",
        );
        let mqtt_connection_errors = counter(
            r,
            "edgesync_agent_mqtt_connection_errors",
            "MQTT connection errors (each followed by a reconnect).",
        );
        let cloud_connected = gauge(
            r,
            "edgesync_agent_cloud_connected",
            "1 when the last controller request got an HTTP answer.",
        );
        let batches_sent = counter(
            r,
            "edgesync_agent_batches_sent",
            "Report batches sent upstream (heartbeats included).",
        );
        let batches_retried = counter(
            r,
            "edgesync_agent_batches_retried",
            "Batch attempts that failed and will be retried.",
        );
        let [reports_accepted, reports_stale, reports_rejected] = labelled(
            r,
            "edgesync_agent_reports",
            "Reports acknowledged by the controller, by result.",
            "result",
            ["accepted", "stale", "rejected"],
        );
        let durable_acks = counter(
            r,
            "edgesync_agent_durable_acks",
            "Durable versions the controller told after live answers (each lets the outbox drop a device's rows up to it).",
        );
        let awaiting_durable = gauge(
            r,
            "edgesync_agent_awaiting_durable",
            "Devices whose report the controller holds live, awaiting a durable version (their rows stay in the outbox).",
        );
        let live_resends = counter(
            r,
            "edgesync_agent_live_resends",
            "Reports sent again after a live answer: no durable version within uplink.durable_timeout_secs, or the controller's live state was lost (a restart, another replica).",
        );
        let rate_limited_seconds = add(
            r,
            "edgesync_agent_rate_limited_seconds",
            "Time spent waiting on the upstream rate limit.",
            Counter::<f64, AtomicU64>::default(),
        );
        let desired_events = counter(
            r,
            "edgesync_agent_desired_events",
            "Desired-state events received from the controller.",
        );
        let deltas_published = counter(
            r,
            "edgesync_agent_deltas_published",
            "Delta messages published to devices.",
        );
        let replies_dropped = counter(
            r,
            "edgesync_agent_replies_dropped",
            "Replies to devices dropped because the MQTT request queue was full.",
        );
        let acks_deferred = counter(
            r,
            "edgesync_agent_acks_deferred",
            "PUBACKs not sent because the MQTT request queue was full; the broker redelivers those messages.",
        );
        let store_errors = counter(
            r,
            "edgesync_agent_store_errors",
            "SQLite transactions that failed (nothing in them was acknowledged).",
        );
        let mqtt_redeliveries = counter(
            r,
            "edgesync_agent_mqtt_redeliveries",
            "Reconnects to the broker made so it resends messages whose commit had failed.",
        );
        let broker_clients = gauge(
            r,
            "edgesync_agent_broker_clients",
            "Embedded broker: connected MQTT clients (the agent included; 0 with an external broker).",
        );
        let broker_messages_in = counter(
            r,
            "edgesync_agent_broker_messages_received",
            "Embedded broker: PUBLISH packets received from clients.",
        );
        let [broker_dropped_qos0, broker_dropped_queue] = labelled(
            r,
            "edgesync_agent_broker_messages_dropped",
            "Embedded broker: messages dropped, by reason (qos0_backlog: a subscriber not reading; queue_full: a session's or all sessions' queued bytes at their limit).",
            "reason",
            ["qos0_backlog", "queue_full"],
        );
        let broker_limit_hits = labelled(
            r,
            "edgesync_agent_broker_limit_hits",
            "Embedded broker: times a configured limit ([broker] max_*) refused, dropped or closed something, by limit.",
            "limit",
            BrokerLimit::ALL.map(BrokerLimit::label),
        );
        let broker_denied = labelled(
            r,
            "edgesync_agent_broker_denied",
            "Embedded broker: client actions refused by authentication or the ACL, by action.",
            "action",
            BrokerDenial::ALL.map(BrokerDenial::label),
        );
        let broker_paused = counter(
            r,
            "edgesync_agent_broker_client_pauses",
            "Embedded broker: times reading from a client paused because its messages wait for the agent's commit (backpressure, nothing lost).",
        );
        let batch_latency = add(
            r,
            "edgesync_agent_batch_latency_seconds",
            "Round trip of one report batch to the controller.",
            Histogram::new(LATENCY_BUCKETS),
        );
        let message_ack_latency = add(
            r,
            "edgesync_agent_message_ack_seconds",
            "From a device message's arrival at the agent to its acknowledgement to the broker: queueing, applying it, and the store's group commit (fsync with store.durability = power-loss-safe).",
            Histogram::new(LATENCY_BUCKETS),
        );
        let report_wait = add(
            r,
            "edgesync_agent_report_wait_seconds",
            "From a device's change being applied in the store's transaction to the start of the batch carrying it: the commit, then the uplink's linger, rate limits, device_min_interval and in-flight window (a device already pending counts from its oldest unsent change).",
            Histogram::new(LATENCY_BUCKETS),
        );
        Self {
            registry: Mutex::new(std::mem::take(r)),
            mqtt_received,
            updates_accepted,
            updates_rejected,
            mqtt_connected,
            mqtt_connection_errors,
            cloud_connected,
            batches_sent,
            batches_retried,
            durable_acks,
            awaiting_durable,
            live_resends,
            reports_accepted,
            reports_stale,
            reports_rejected,
            rate_limited_seconds,
            desired_events,
            deltas_published,
            replies_dropped,
            acks_deferred,
            store_errors,
            mqtt_redeliveries,
            batch_latency,
            message_ack_latency,
            report_wait,
            broker_clients,
            broker_messages_in,
            broker_dropped_qos0,
            broker_dropped_queue,
            broker_limit_hits,
            broker_denied,
            broker_paused,
            sparkplug_issues,
            sparkplug_rebirths,
            sparkplug_writes,
            sparkplug_edge_nodes,
        }
    }

    /// Adds metrics read at scrape time from state kept elsewhere.
    pub fn register_collector(&self, collector: impl Collector) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(Box::new(collector));
    }

    /// Counts a hit of an embedded-broker limit.
    pub fn broker_limit(&self, limit: BrokerLimit) {
        self.broker_limit_hits[limit as usize].inc();
    }

    /// Counts an action the embedded broker refused.
    pub fn broker_denied(&self, action: BrokerDenial) {
        self.broker_denied[action as usize].inc();
    }

    /// Times `limit` was hit.
    pub fn broker_limit_count(&self, limit: BrokerLimit) -> u64 {
        self.broker_limit_hits[limit as usize].get()
    }

    /// Counts a rejected update.
    pub fn reject(&self, reason: &'static str) {
        self.updates_rejected
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Updates rejected so far for `reason`.
    pub fn rejections(&self, reason: &'static str) -> u64 {
        self.updates_rejected
            .get(&[("reason", reason)])
            .map_or(0, |c| c.get())
    }

    /// Counts a Sparkplug B issue; returns how many of its kind there have been.
    pub fn sparkplug_issue(&self, issue: &'static str) -> u64 {
        self.sparkplug_issues
            .get_or_create(&[("issue", issue)])
            .inc()
            + 1
    }

    /// Sets the number of Sparkplug B edge nodes remembered.
    pub fn set_sparkplug_edge_nodes(&self, n: u64) {
        self.sparkplug_edge_nodes
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records one batch's round trip.
    pub fn observe_batch_latency(&self, took: Duration) {
        self.batch_latency.observe(took.as_secs_f64());
    }

    /// Records one device message's time to its acknowledgement.
    pub fn observe_message_ack(&self, took: Duration) {
        self.message_ack_latency.observe(took.as_secs_f64());
    }

    /// Records how long one report waited in the outbox before a batch took it.
    pub fn observe_report_wait(&self, waited: Duration) {
        self.report_wait.observe(waited.as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_labels_are_indexed_in_declaration_order() {
        for (i, l) in BrokerLimit::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i);
        }
        for (i, a) in BrokerDenial::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i);
        }
        let m = Metrics::default();
        m.broker_limit(BrokerLimit::Accept);
        let text = m.render();
        assert!(
            text.contains("edgesync_agent_broker_limit_hits_total{limit=\"accept_error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("edgesync_agent_broker_limit_hits_total{limit=\"sessions\"} 0"),
            "every limit is exported from the start: {text}"
        );
    }

    #[test]
    fn renders_openmetrics_text() {
        let m = Metrics::default();
        m.updates_accepted.inc_by(3);
        m.reject("too_deep");
        assert_eq!(m.rejections("too_deep"), 1);
        assert_eq!(m.sparkplug_issue("seq_gap"), 1);
        assert_eq!(m.sparkplug_issue("seq_gap"), 2);
        m.observe_batch_latency(Duration::from_millis(30));
        m.mqtt_connected.set(1);
        let text = m.render();
        assert!(
            text.contains("# TYPE edgesync_agent_updates_accepted counter"),
            "{text}"
        );
        assert!(
            text.contains("edgesync_agent_updates_accepted_total 3"),
            "{text}"
        );
        assert!(text.contains("edgesync_agent_updates_rejected_total{reason=\"too_deep\"} 1"));
        assert!(text.contains("edgesync_agent_updates_rejected_total{reason=\"malformed\"} 0"));
        assert!(text.contains("edgesync_agent_sparkplug_issues_total{issue=\"seq_gap\"} 2"));
        assert!(text.contains("edgesync_agent_mqtt_connected 1"), "{text}");
        assert!(text.contains("edgesync_agent_batch_latency_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("edgesync_agent_batch_latency_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
