//! The agent's metrics, rendered in the Prometheus text format by [`Metrics::render`].
//!
//! Plain atomics rather than a metrics library: the set is small and fixed, labels are bounded
//! (reject reasons, batch outcomes), and the agent's binary stays small.

use std::collections::BTreeMap;

pub use edgesync_protocol::prom::Histogram;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Every metric the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// MQTT messages received (all topics we subscribe to).
    pub mqtt_received: AtomicU64,
    /// Updates accepted and committed.
    pub updates_accepted: AtomicU64,
    /// Updates rejected, by reason.
    pub updates_rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Broker connection state.
    pub mqtt_connected: AtomicBool,
    /// MQTT connection errors.
    pub mqtt_connection_errors: AtomicU64,
    /// Whether the last request to the controller got an HTTP answer.
    pub cloud_connected: AtomicBool,
    /// Batches sent (including heartbeats).
    pub batches_sent: AtomicU64,
    /// Batch attempts that failed and will be retried.
    pub batches_retried: AtomicU64,
    /// Reports acknowledged as accepted.
    pub reports_accepted: AtomicU64,
    /// Reports acknowledged as stale.
    pub reports_stale: AtomicU64,
    /// Reports the controller rejected (dropped).
    pub reports_rejected: AtomicU64,
    /// Time spent waiting on the upstream rate limit.
    pub rate_limited_micros: AtomicU64,
    /// Devices with a pending report.
    pub outbox_pending: AtomicU64,
    /// Age of the oldest pending report.
    pub outbox_oldest_age_seconds: AtomicU64,
    /// Desired-state events received.
    pub desired_events: AtomicU64,
    /// Deltas published to devices.
    pub deltas_published: AtomicU64,
    /// Replies to devices dropped because the MQTT request queue was full.
    pub replies_dropped: AtomicU64,
    /// PUBACKs not sent because the MQTT request queue was full (redelivered later).
    pub acks_deferred: AtomicU64,
    /// Store commits that failed.
    pub store_errors: AtomicU64,
    /// Reconnects made so the broker resends messages whose commit had failed.
    pub mqtt_redeliveries: AtomicU64,
    /// Batch round-trip latency.
    pub batch_latency: Histogram,
    /// Embedded broker: connected clients (the agent's own connection included).
    pub broker_clients: AtomicU64,
    /// Embedded broker: PUBLISH packets received from clients.
    pub broker_messages_in: AtomicU64,
    /// Embedded broker: QoS0 messages dropped for a subscriber that does not keep up.
    pub broker_dropped_qos0: AtomicU64,
    /// Embedded broker: QoS1 messages dropped for a session whose queue was full.
    pub broker_dropped_queue: AtomicU64,
    /// Embedded broker: times each limit was hit, indexed by [`BrokerLimit`].
    pub broker_limit_hits: [AtomicU64; BrokerLimit::ALL.len()],
    /// Embedded broker: actions refused by authentication or the ACL, indexed by
    /// [`BrokerDenial`].
    pub broker_denied: [AtomicU64; BrokerDenial::ALL.len()],
    /// Embedded broker: clients paused because their messages wait for the agent's commit.
    pub broker_paused: AtomicU64,
    /// Sparkplug B messages used only in part, by issue.
    pub sparkplug_issues: Mutex<BTreeMap<&'static str, u64>>,
    /// Sparkplug B rebirth requests published.
    pub sparkplug_rebirths: AtomicU64,
    /// Sparkplug B commands (NCMD/DCMD) published for desired changes.
    pub sparkplug_writes: AtomicU64,
    /// Sparkplug B edge nodes remembered.
    pub sparkplug_edge_nodes: AtomicU64,
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

impl Metrics {
    /// Counts a hit of an embedded-broker limit.
    pub fn broker_limit(&self, limit: BrokerLimit) {
        self.broker_limit_hits[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an action the embedded broker refused.
    pub fn broker_denied(&self, action: BrokerDenial) {
        self.broker_denied[action as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Times `limit` was hit.
    pub fn broker_limit_count(&self, limit: BrokerLimit) -> u64 {
        self.broker_limit_hits[limit as usize].load(Ordering::Relaxed)
    }

    /// Counts a rejected update.
    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut m) = self.updates_rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts a Sparkplug B issue; returns how many of its kind there have been.
    pub fn sparkplug_issue(&self, issue: &'static str) -> u64 {
        self.sparkplug_issues.lock().map_or(0, |mut m| {
            let n = m.entry(issue).or_default();
            *n += 1;
            *n
        })
    }

    /// Sets the number of Sparkplug B edge nodes remembered.
    pub fn set_sparkplug_edge_nodes(&self, n: u64) {
        self.sparkplug_edge_nodes.store(n, Ordering::Relaxed);
    }

    /// Updates rejected so far for `reason`.
    pub fn rejections(&self, reason: &str) -> u64 {
        self.updates_rejected
            .lock()
            .map_or(0, |m| m.get(reason).copied().unwrap_or(0))
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "edgesync_agent_mqtt_messages_received_total",
            "MQTT messages received on subscribed topics.",
            &self.mqtt_received,
        );
        counter(
            &mut out,
            "edgesync_agent_updates_accepted_total",
            "Shadow updates accepted and committed to SQLite.",
            &self.updates_accepted,
        );
        let _ = writeln!(
            out,
            "# HELP edgesync_agent_updates_rejected_total Shadow updates rejected, by reason.\n# TYPE edgesync_agent_updates_rejected_total counter"
        );
        if let Ok(m) = self.updates_rejected.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "edgesync_agent_updates_rejected_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP edgesync_agent_sparkplug_issues_total Sparkplug B messages used only in part (seq gaps, unknown aliases, unmapped metrics...), by issue.\n# TYPE edgesync_agent_sparkplug_issues_total counter"
        );
        if let Ok(m) = self.sparkplug_issues.lock() {
            for (issue, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "edgesync_agent_sparkplug_issues_total{{issue=\"{issue}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP edgesync_agent_sparkplug_commands_total Sparkplug B commands published: rebirth requests and writes of desired values.\n# TYPE edgesync_agent_sparkplug_commands_total counter"
        );
        for (command, v) in [
            ("rebirth", &self.sparkplug_rebirths),
            ("write", &self.sparkplug_writes),
        ] {
            let _ = writeln!(
                out,
                "edgesync_agent_sparkplug_commands_total{{command=\"{command}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        gauge(
            &mut out,
            "edgesync_agent_sparkplug_edge_nodes",
            "Sparkplug B edge nodes whose births the agent remembers.",
            self.sparkplug_edge_nodes.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "edgesync_agent_mqtt_connected",
            "1 when connected to the MQTT broker.",
            u64::from(self.mqtt_connected.load(Ordering::Relaxed)),
        );
        counter(
            &mut out,
            "edgesync_agent_mqtt_connection_errors_total",
            "MQTT connection errors (each followed by a reconnect).",
            &self.mqtt_connection_errors,
        );
        gauge(
            &mut out,
            "edgesync_agent_cloud_connected",
            "1 when the last controller request got an HTTP answer.",
            u64::from(self.cloud_connected.load(Ordering::Relaxed)),
        );
        counter(
            &mut out,
            "edgesync_agent_batches_sent_total",
            "Report batches sent upstream (heartbeats included).",
            &self.batches_sent,
        );
        counter(
            &mut out,
            "edgesync_agent_batches_retried_total",
            "Batch attempts that failed and will be retried.",
            &self.batches_retried,
        );
        let _ = writeln!(
            out,
            "# HELP edgesync_agent_reports_total Reports acknowledged by the controller, by result.\n# TYPE edgesync_agent_reports_total counter"
        );
        for (result, v) in [
            ("accepted", &self.reports_accepted),
            ("stale", &self.reports_stale),
            ("rejected", &self.reports_rejected),
        ] {
            let _ = writeln!(
                out,
                "edgesync_agent_reports_total{{result=\"{result}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgesync_agent_rate_limited_seconds_total Time spent waiting on the upstream rate limit.\n# TYPE edgesync_agent_rate_limited_seconds_total counter\nedgesync_agent_rate_limited_seconds_total {}",
            self.rate_limited_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        gauge(
            &mut out,
            "edgesync_agent_outbox_pending_devices",
            "Devices with a report not yet acknowledged by the controller.",
            self.outbox_pending.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "edgesync_agent_outbox_oldest_pending_age_seconds",
            "Age of the oldest unacknowledged report.",
            self.outbox_oldest_age_seconds.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "edgesync_agent_desired_events_total",
            "Desired-state events received from the controller.",
            &self.desired_events,
        );
        counter(
            &mut out,
            "edgesync_agent_deltas_published_total",
            "Delta messages published to devices.",
            &self.deltas_published,
        );
        counter(
            &mut out,
            "edgesync_agent_replies_dropped_total",
            "Replies to devices dropped because the MQTT request queue was full.",
            &self.replies_dropped,
        );
        counter(
            &mut out,
            "edgesync_agent_acks_deferred_total",
            "PUBACKs not sent because the MQTT request queue was full; the broker redelivers those messages.",
            &self.acks_deferred,
        );
        counter(
            &mut out,
            "edgesync_agent_store_errors_total",
            "SQLite transactions that failed (nothing in them was acknowledged).",
            &self.store_errors,
        );
        counter(
            &mut out,
            "edgesync_agent_mqtt_redeliveries_total",
            "Reconnects to the broker made so it resends messages whose commit had failed.",
            &self.mqtt_redeliveries,
        );
        gauge(
            &mut out,
            "edgesync_agent_broker_clients",
            "Embedded broker: connected MQTT clients (the agent included; 0 with an external broker).",
            self.broker_clients.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "edgesync_agent_broker_messages_received_total",
            "Embedded broker: PUBLISH packets received from clients.",
            &self.broker_messages_in,
        );
        labeled_counter(
            &mut out,
            "edgesync_agent_broker_messages_dropped_total",
            "Embedded broker: messages dropped, by reason (qos0_backlog: a subscriber not reading; queue_full: a session's or all sessions' queued bytes at their limit).",
            "reason",
            [
                ("qos0_backlog", &self.broker_dropped_qos0),
                ("queue_full", &self.broker_dropped_queue),
            ],
        );
        labeled_counter(
            &mut out,
            "edgesync_agent_broker_limit_hits_total",
            "Embedded broker: times a configured limit ([broker] max_*) refused, dropped or closed something, by limit.",
            "limit",
            BrokerLimit::ALL
                .iter()
                .map(|l| l.label())
                .zip(&self.broker_limit_hits),
        );
        labeled_counter(
            &mut out,
            "edgesync_agent_broker_denied_total",
            "Embedded broker: client actions refused by authentication or the ACL, by action.",
            "action",
            BrokerDenial::ALL
                .iter()
                .map(|a| a.label())
                .zip(&self.broker_denied),
        );
        counter(
            &mut out,
            "edgesync_agent_broker_client_pauses_total",
            "Embedded broker: times reading from a client paused because its messages wait for the agent's commit (backpressure, nothing lost).",
            &self.broker_paused,
        );
        self.batch_latency.render(
            &mut out,
            "edgesync_agent_batch_latency_seconds",
            "Round trip of one report batch to the controller.",
        );
        out
    }
}

/// A counter with one label, one line per value.
fn labeled_counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, &'a AtomicU64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, v) in values {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{value}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert!(
            m.render()
                .contains("edgesync_agent_broker_limit_hits_total{limit=\"accept_error\"} 1")
        );
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.updates_accepted.fetch_add(3, Ordering::Relaxed);
        m.reject("too_deep");
        m.batch_latency.observe(Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("edgesync_agent_updates_accepted_total 3"));
        assert!(text.contains("edgesync_agent_updates_rejected_total{reason=\"too_deep\"} 1"));
        assert!(text.contains("edgesync_agent_batch_latency_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("edgesync_agent_batch_latency_seconds_bucket{le=\"0.025\"} 0"));
    }
}
