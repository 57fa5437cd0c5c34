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
}

impl Metrics {
    /// Counts a rejected update.
    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut m) = self.updates_rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
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
        let _ = writeln!(
            out,
            "# HELP edgesync_agent_broker_messages_dropped_total Embedded broker: messages dropped, by reason (qos0_backlog: a subscriber not reading; queue_full: 10000 QoS1 messages already queued for a session).\n# TYPE edgesync_agent_broker_messages_dropped_total counter"
        );
        for (reason, v) in [
            ("qos0_backlog", &self.broker_dropped_qos0),
            ("queue_full", &self.broker_dropped_queue),
        ] {
            let _ = writeln!(
                out,
                "edgesync_agent_broker_messages_dropped_total{{reason=\"{reason}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.batch_latency.render(
            &mut out,
            "edgesync_agent_batch_latency_seconds",
            "Round trip of one report batch to the controller.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
