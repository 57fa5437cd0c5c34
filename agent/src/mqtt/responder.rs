//! The responder: takes messages in arrival order, waits for each one's commit, has its
//! dialect answer it, and only then acks the message to the broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use edgesync_protocol::mqtt::Rejected;
use edgesync_protocol::shadow::{Applied, ShadowDocument};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tracing::warn;

use super::{DevicePublisher, Job, StoreReply, Waiting};
use crate::metrics::Metrics;
use crate::store::UpdateOutcome;

/// At most one device-cap warning per this interval.
const DEVICE_CAP_WARN_INTERVAL_MS: u64 = 10_000;

pub(super) struct Responder {
    pub(super) client: AsyncClient,
    /// Deltas and Sparkplug B commands.
    pub(super) publisher: DevicePublisher,
    pub(super) prefix: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) on_change: Arc<tokio::sync::Notify>,
    /// Told when a message was left unacknowledged because its commit failed.
    pub(super) redeliver: Arc<tokio::sync::Notify>,
    /// For rate-limited warnings.
    pub(super) started: std::time::Instant,
    /// When the device-cap warning was last logged (ms since `started`; 0: never).
    pub(super) device_cap_warned_ms: std::sync::atomic::AtomicU64,
}

/// What became of one device's update, common to every dialect: counted, logged and the
/// uplink woken here; each dialect then answers in its own shapes.
// Matched at once by its caller, never stored: boxing the large variant would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
pub(super) enum Settled {
    /// Committed.
    Accepted {
        applied: Applied,
        current: Option<ShadowDocument>,
    },
    /// Refused for good (invalid, conflicting, or beyond the device cap); nothing stored.
    Refused(Rejected),
    /// Not committed: the message must not be acked, so the broker sends it again.
    /// `replied`: the store answered with an error the device may be told about (rather
    /// than dropping the request with its failed transaction).
    NotCommitted { replied: bool },
}

impl Responder {
    pub(super) async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(job) = jobs.recv().await {
            let publish = &job.publish;
            let stored = !matches!(job.waiting, Waiting::Nothing);
            let ack = match job.waiting {
                Waiting::Shadow(w) => self.shadow(publish, w).await,
                Waiting::Plain(w) => self.plain(w).await,
                Waiting::Sparkplug(w) => self.sparkplug(w).await,
                Waiting::Twin(w) => self.twin(publish, w).await,
                Waiting::Nothing => true,
            };
            if ack && stored {
                self.metrics.observe_message_ack(job.received.elapsed());
            }
            // After commit (or for messages that are refused and never stored): ack.
            if ack && self.client.try_ack(publish).is_err() {
                self.metrics.acks_deferred.inc();
                warn_unbounded_window(&self.metrics);
            }
        }
    }

    /// Waits for `device`'s update to commit, and counts what became of it.
    pub(super) async fn settle(&self, device: &str, rx: StoreReply<UpdateOutcome>) -> Settled {
        match rx.await {
            Ok(Ok(UpdateOutcome::Accepted { applied, current })) => {
                self.metrics.updates_accepted.inc();
                if applied.changed {
                    self.on_change.notify_one();
                }
                Settled::Accepted { applied, current }
            }
            Ok(Ok(UpdateOutcome::Rejected(e))) => {
                self.metrics.reject(e.reason());
                Settled::Refused(Rejected::from_error(&e, None))
            }
            Ok(Ok(UpdateOutcome::DeviceLimit)) => {
                self.device_limit(device);
                Settled::Refused(Rejected {
                    code: 503,
                    message: "agent device limit reached (store.max_devices)".into(),
                    client_token: None,
                })
            }
            Ok(Err(e)) => {
                // The driver reconnects once the store commits again, and the broker resends.
                self.metrics.store_errors.inc();
                self.redeliver.notify_one();
                warn!(device, error = %e, "Update not committed; leaving it unacknowledged for redelivery");
                Settled::NotCommitted { replied: true }
            }
            Err(_) => {
                // The store dropped the reply (its transaction failed before this one was
                // applied): the same as not committed.
                self.redeliver.notify_one();
                Settled::NotCommitted { replied: false }
            }
        }
    }

    /// Queues a reply to a device without waiting, counting it when the queue is full.
    pub(super) fn publish_reply(&self, topic: String, qos: QoS, payload: Vec<u8>) {
        if self.client.try_publish(topic, qos, false, payload).is_err() {
            self.metrics.replies_dropped.inc();
        }
    }

    /// Publishes the delta after an accepted change, when desired and reported differ.
    pub(super) async fn delta_due(
        &self,
        device: &str,
        changed: bool,
        current: Option<&ShadowDocument>,
    ) {
        if changed
            && let Some(current) = current
            && !current.state.desired.is_empty()
            && !current.delta().is_empty()
        {
            self.publisher.publish_delta(device, current).await;
        }
    }

    /// Counts an update refused by the device cap, and warns once per interval, not per
    /// message: a plant past the cap sends many.
    pub(super) fn device_limit(&self, device: &str) {
        self.metrics.reject("device_limit");
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.device_cap_warned_ms.load(Ordering::Relaxed);
        if last == 0 || now_ms.saturating_sub(last) >= DEVICE_CAP_WARN_INTERVAL_MS {
            self.device_cap_warned_ms
                .store(now_ms.max(1), Ordering::Relaxed);
            warn!(
                device,
                "Device limit reached (store.max_devices): updates for new devices are rejected and not stored; raise store.max_devices (see edgesync_agent_updates_rejected_total{{reason=\"device_limit\"}})"
            );
        }
    }
}

/// Logs (once per 10 000 occurrences) that acks could not be queued: the broker sends faster
/// than rumqttc flushes acks, which means its in-flight window is unbounded.
fn warn_unbounded_window(metrics: &Metrics) {
    let n = metrics.acks_deferred.get();
    if n % 10_000 == 1 {
        warn!(
            deferred = n,
            "MQTT acks are backing up; those messages will be redelivered after a reconnect. Bound the broker's in-flight window (Mosquitto: max_inflight_messages 1000)"
        );
    }
}
