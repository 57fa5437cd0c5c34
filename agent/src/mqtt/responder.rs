//! The responder: takes messages in arrival order, waits for each one's commit, publishes
//! the replies, and only then acks the message to the broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use edgesync_protocol::mqtt::{DocumentsMessage, Rejected, ShadowOp, UpdateAccepted, reply_topic};
use edgesync_protocol::shadow::ShadowDocument;
use rumqttc::{AsyncClient, QoS};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::processor::store_unavailable;
use super::{DevicePublisher, Job, Many, Pending, Route};
use crate::metrics::Metrics;
use crate::store::{StoreError, UpdateOutcome};

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

impl Responder {
    pub(super) async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(mut job) = jobs.recv().await {
            if self.run_job(&mut job).await {
                // After commit (or for messages that are rejected and never stored): ack.
                if self.client.try_ack(&job.publish).is_err() {
                    self.metrics.acks_deferred.fetch_add(1, Ordering::Relaxed);
                    warn_unbounded_window(&self.metrics);
                }
            }
        }
    }

    /// Sends replies; returns whether the message may be acked.
    async fn respond(&self, job: &Job) -> bool {
        let (device, op) = match &job.route {
            Route::Shadow { device, op } => (device.as_str(), Some(*op)),
            Route::Ingest { device } => (device.as_str(), None),
            Route::Sparkplug | Route::Twin(_) | Route::Unknown => return true,
        };
        match &job.pending {
            Pending::Done => true,
            Pending::Reject(r) => {
                if let Some(op) = op {
                    self.reply(device, op, "rejected", r, QoS::AtMostOnce).await;
                } else {
                    debug!(device, code = r.code, message = %r.message, "Plain ingest message rejected");
                }
                true
            }
            Pending::Got(Ok(Some(doc))) => {
                self.reply(
                    device,
                    ShadowOp::Get,
                    "accepted",
                    &get_document(doc),
                    QoS::AtMostOnce,
                )
                .await;
                true
            }
            Pending::Got(Ok(None)) => {
                let r = Rejected {
                    code: 404,
                    message: format!("no shadow for device {device}"),
                    client_token: None,
                };
                self.reply(device, ShadowOp::Get, "rejected", &r, QoS::AtMostOnce)
                    .await;
                true
            }
            Pending::Got(Err(_)) => {
                self.reply(
                    device,
                    ShadowOp::Get,
                    "rejected",
                    &store_unavailable(None),
                    QoS::AtMostOnce,
                )
                .await;
                true
            }
            Pending::Update(_) | Pending::Get(_) | Pending::Many(_) => {
                unreachable!("updates and reads are resolved by the caller")
            }
        }
    }

    async fn reply<T: serde::Serialize>(
        &self,
        device: &str,
        op: ShadowOp,
        suffix: &str,
        body: &T,
        qos: QoS,
    ) {
        let topic = reply_topic(&self.prefix, device, op, suffix);
        if let Ok(payload) = serde_json::to_vec(body)
            && self.client.try_publish(topic, qos, false, payload).is_err()
        {
            self.metrics.replies_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Responder {
    /// Waits for the job's outcome and replies; returns whether the message may be acked.
    async fn run_job(&self, job: &mut Job) -> bool {
        if let Route::Twin(t) = &job.route {
            let t = t.clone();
            return self.run_twin(&t, job).await;
        }
        let rx = match std::mem::replace(&mut job.pending, Pending::Done) {
            Pending::Update(rx) => rx,
            Pending::Get(rx) => {
                // A read is acked whatever its outcome: there is nothing to redeliver.
                job.pending = Pending::Got(rx.await.unwrap_or(Err(StoreError::Closed)));
                return self.respond(job).await;
            }
            Pending::Many(many) => return self.run_many(*many).await,
            other => {
                job.pending = other;
                return self.respond(job).await;
            }
        };
        let (device, op) = match &job.route {
            Route::Shadow { device, op } => (device.clone(), Some(*op)),
            Route::Ingest { device } => (device.clone(), None),
            Route::Sparkplug | Route::Twin(_) | Route::Unknown => return true,
        };
        let token = job.client_token.clone();
        match rx.await {
            Ok(Ok(UpdateOutcome::Accepted { applied, current })) => {
                self.accepted(applied.changed);
                if op.is_some()
                    && let Some(current) = &current
                {
                    let accepted = UpdateAccepted {
                        state: reported_state(&job.publish.payload),
                        version: current.version,
                        timestamp: current.timestamp,
                        client_token: token,
                    };
                    self.reply(
                        &device,
                        ShadowOp::Update,
                        "accepted",
                        &accepted,
                        QoS::AtMostOnce,
                    )
                    .await;
                    if applied.changed {
                        let docs = DocumentsMessage {
                            previous: applied.previous.unwrap_or_default(),
                            current: current.clone(),
                            timestamp: current.timestamp,
                        };
                        self.reply(
                            &device,
                            ShadowOp::Update,
                            "documents",
                            &docs,
                            QoS::AtMostOnce,
                        )
                        .await;
                    }
                }
                self.delta_due(&device, applied.changed, current.as_ref())
                    .await;
                true
            }
            Ok(Ok(UpdateOutcome::Rejected(e))) => {
                self.metrics.reject(e.reason());
                if op.is_some() {
                    self.reply(
                        &device,
                        ShadowOp::Update,
                        "rejected",
                        &Rejected::from_error(&e, token),
                        QoS::AtMostOnce,
                    )
                    .await;
                }
                true
            }
            Ok(Ok(UpdateOutcome::DeviceLimit)) => {
                self.device_limit(&device);
                if op.is_some() {
                    let r = Rejected {
                        code: 503,
                        message: "agent device limit reached (store.max_devices)".into(),
                        client_token: token,
                    };
                    self.reply(&device, ShadowOp::Update, "rejected", &r, QoS::AtMostOnce)
                        .await;
                }
                true
            }
            Ok(Err(e)) => {
                // Not committed: do not ack; the driver reconnects once the store commits
                // again, and the broker resends it.
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                self.redeliver.notify_one();
                warn!(device, error = %e, "Update not committed; leaving it unacknowledged for redelivery");
                if op.is_some() {
                    self.reply(
                        &device,
                        ShadowOp::Update,
                        "rejected",
                        &store_unavailable(token),
                        QoS::AtMostOnce,
                    )
                    .await;
                }
                false
            }
            Err(_) => {
                // The store dropped the reply (its transaction failed before this one was
                // applied): the same as not committed.
                self.redeliver.notify_one();
                false
            }
        }
    }
}

impl Responder {
    /// Counts an accepted update and wakes the uplink when it changed something.
    pub(super) fn accepted(&self, changed: bool) {
        self.metrics
            .updates_accepted
            .fetch_add(1, Ordering::Relaxed);
        if changed {
            self.on_change.notify_one();
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

    /// Waits for each device's update from one message (Sparkplug B), then publishes its
    /// command; returns whether the message may be acked (every update committed or refused
    /// for good).
    async fn run_many(&self, many: Many) -> bool {
        let mut ack = !many.unqueued;
        for (device, rx) in many.updates {
            match rx.await {
                Ok(Ok(UpdateOutcome::Accepted { applied, current })) => {
                    self.accepted(applied.changed);
                    self.delta_due(&device, applied.changed, current.as_ref())
                        .await;
                }
                Ok(Ok(UpdateOutcome::Rejected(e))) => self.metrics.reject(e.reason()),
                Ok(Ok(UpdateOutcome::DeviceLimit)) => self.device_limit(&device),
                Ok(Err(e)) => {
                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(device, error = %e, "Update not committed; leaving the message unacknowledged for redelivery");
                    ack = false;
                }
                Err(_) => ack = false,
            }
        }
        if !ack {
            self.redeliver.notify_one();
        }
        if let Some(c) = many.command {
            self.publisher
                .publish_command(c, &self.metrics.sparkplug_rebirths);
        }
        ack
    }
}

/// Logs (once per 10 000 occurrences) that acks could not be queued: the broker sends faster
/// than rumqttc flushes acks, which means its in-flight window is unbounded.
fn warn_unbounded_window(metrics: &Metrics) {
    let n = metrics.acks_deferred.load(Ordering::Relaxed);
    if n % 10_000 == 1 {
        warn!(
            deferred = n,
            "MQTT acks are backing up; those messages will be redelivered after a reconnect. Bound the broker's in-flight window (Mosquitto: max_inflight_messages 1000)"
        );
    }
}

/// `{"reported": ...}` echoed from the request for `update/accepted`.
fn reported_state(payload: &[u8]) -> Map<String, Value> {
    let mut out = Map::new();
    if let Ok(Value::Object(mut root)) = serde_json::from_slice::<Value>(payload)
        && let Some(Value::Object(mut state)) = root.remove("state")
        && let Some(reported) = state.remove("reported")
    {
        out.insert("reported".into(), reported);
    }
    out
}

/// The `get/accepted` document: the shadow plus its current delta.
fn get_document(doc: &ShadowDocument) -> Value {
    let mut v = serde_json::to_value(doc).unwrap_or(Value::Null);
    let delta = doc.delta();
    if !delta.is_empty()
        && let Some(state) = v.get_mut("state").and_then(Value::as_object_mut)
    {
        state.insert("delta".into(), Value::Object(delta));
    }
    v
}
