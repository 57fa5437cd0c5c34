//! KubeEdge device twins on the agent's MQTT connection: requests on
//! `$hw/events/device/{id}/twin/{update|get}` become shadow updates and reads, answered on
//! KubeEdge's result, document and delta topics. The payload rules live in
//! [`edgesync_protocol::kubeedge`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use edgesync_protocol::identity::{self, Dialect, Name};
use edgesync_protocol::kubeedge::{self, TwinOp, TwinTopic};
use edgesync_protocol::mqtt::Rejected;
use edgesync_protocol::shadow::{ShadowDocument, ShadowError, UpdateRequest};
use rumqttc::{Publish, QoS};
use serde_json::Value;
use tracing::warn;

use super::processor::{Processor, store_unavailable};
use super::responder::Responder;
use super::{DevicePublisher, Job, Pending};
use crate::store::UpdateOutcome;

/// Twin devices remembered at most (their reply topics); beyond, deltas for new ones go to
/// the shadow topics until the agent restarts. The store's device cap is far lower by default.
const MAX_REMEMBERED: usize = 100_000;

/// Which devices speak the twin dialect, and the id form their topics use, so desired
/// changes reach them as `twin/update/delta`. Learned from their requests since the start.
#[derive(Debug, Default)]
pub struct Twins {
    ids: Mutex<HashMap<String, String>>,
}

impl Twins {
    fn remember(&self, device: &str, id: &str) {
        let mut ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ids.get(device).is_none_or(|known| known != id) && ids.len() < MAX_REMEMBERED {
            ids.insert(device.to_owned(), id.to_owned());
        }
    }

    fn id(&self, device: &str) -> Option<String> {
        let ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.get(device).cloned()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Processor {
    /// Validates a twin request and queues it to the store; the event id travels as the
    /// job's client token.
    pub(super) async fn twin(&self, t: &TwinTopic, publish: &Publish) -> (Pending, Option<String>) {
        let event_id = kubeedge::event_id(&publish.payload, &self.limits);
        if let Err(e) = identity::device_id(Name::KubeEdge(&t.device)) {
            let e = ShadowError::from(e);
            super::refused(&self.metrics, e.reason(), &publish.topic, &e.to_string());
            return (
                Pending::Reject(Rejected::from_error(&e, None)),
                Some(event_id),
            );
        }
        if let Some(twins) = &self.twins {
            twins.remember(&t.device, &t.id);
        }
        match t.op {
            TwinOp::Get => match self
                .store
                .submit_get(t.device.clone(), Dialect::KubeEdge)
                .await
            {
                Ok(rx) => (Pending::Get(rx), Some(event_id)),
                Err(e) => (Pending::Got(Err(e)), Some(event_id)),
            },
            TwinOp::Update => match kubeedge::parse_update(&publish.payload, &self.limits) {
                Err(e) => {
                    super::refused(&self.metrics, e.reason(), &publish.topic, &e.to_string());
                    (
                        Pending::Reject(Rejected::from_error(&e, None)),
                        Some(event_id),
                    )
                }
                Ok(u) => {
                    let req = UpdateRequest {
                        reported: Some(u.reported),
                        client_token: None,
                        version: None,
                        connected: None,
                        dialect: Dialect::KubeEdge,
                    };
                    match self.store.submit_update(t.device.clone(), req, true).await {
                        Ok(rx) => (Pending::Update(rx), Some(event_id)),
                        Err(_) => (Pending::Reject(store_unavailable(None)), Some(event_id)),
                    }
                }
            },
        }
    }
}

impl DevicePublisher {
    /// Publishes `twin/update/delta` to a device known to speak the twin dialect; false when
    /// it is not one.
    pub(super) fn publish_twin_delta(&self, device: &str, doc: &ShadowDocument) -> bool {
        let Some(id) = self.twins.as_ref().and_then(|t| t.id(device)) else {
            return false;
        };
        if let Some(body) = kubeedge::delta(device, doc, now_ms()) {
            let topic = kubeedge::reply_topic(&id, "update/delta");
            self.publish_counted(
                topic,
                QoS::AtLeastOnce,
                body.to_string().into_bytes(),
                &self.metrics.deltas_published,
            );
        }
        true
    }
}

impl Responder {
    /// Waits for a twin request's outcome and answers it; returns whether the message may be
    /// acked.
    pub(super) async fn run_twin(&self, t: &TwinTopic, job: &mut Job) -> bool {
        let event_id = job.client_token.clone().unwrap_or_default();
        let result = match t.op {
            TwinOp::Update => "update/result",
            TwinOp::Get => "get/result",
        };
        let now = now_ms();
        let error = |code: u16, reason: &str| kubeedge::error_result(&event_id, code, reason, now);
        match std::mem::replace(&mut job.pending, Pending::Done) {
            Pending::Reject(r) => {
                self.twin_reply(&t.id, result, &error(r.code, &r.message));
                true
            }
            Pending::Got(Err(_)) => {
                let r = store_unavailable(None);
                self.twin_reply(&t.id, result, &error(r.code, &r.message));
                true
            }
            Pending::Get(rx) => {
                let body = match rx.await {
                    Ok(Ok(Some(doc))) => kubeedge::get_result(&event_id, Some(&doc), now),
                    Ok(Ok(None)) => error(404, &format!("Device {} not found", t.device)),
                    _ => error(503, &store_unavailable(None).message),
                };
                self.twin_reply(&t.id, result, &body);
                true
            }
            Pending::Update(rx) => match rx.await {
                Ok(Ok(UpdateOutcome::Accepted { applied, current })) => {
                    self.accepted(applied.changed);
                    let patch = kubeedge::parse_update(&job.publish.payload, &Default::default())
                        .map(|u| u.reported)
                        .unwrap_or_default();
                    self.twin_reply(
                        &t.id,
                        result,
                        &kubeedge::update_result(&event_id, &patch, now),
                    );
                    if let (Some(previous), Some(current)) = (&applied.previous, &current) {
                        let doc = kubeedge::document(&event_id, &patch, previous, current, now);
                        self.twin_reply(&t.id, "update/document", &doc);
                    }
                    self.delta_due(&t.device, applied.changed, current.as_ref())
                        .await;
                    true
                }
                Ok(Ok(UpdateOutcome::Rejected(e))) => {
                    self.metrics.reject(e.reason());
                    self.twin_reply(&t.id, result, &error(e.code(), &e.to_string()));
                    true
                }
                Ok(Ok(UpdateOutcome::DeviceLimit)) => {
                    self.device_limit(&t.device);
                    self.twin_reply(
                        &t.id,
                        result,
                        &error(503, "agent device limit reached (store.max_devices)"),
                    );
                    true
                }
                Ok(Err(e)) => {
                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    self.redeliver.notify_one();
                    warn!(device = t.device, error = %e, "Update not committed; leaving it unacknowledged for redelivery");
                    self.twin_reply(&t.id, result, &error(503, &store_unavailable(None).message));
                    false
                }
                Err(_) => {
                    self.redeliver.notify_one();
                    false
                }
            },
            _ => true,
        }
    }

    fn twin_reply(&self, id: &str, suffix: &str, body: &Value) {
        let topic = kubeedge::reply_topic(id, suffix);
        if self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, body.to_string())
            .is_err()
        {
            self.metrics.replies_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
