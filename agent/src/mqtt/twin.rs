//! KubeEdge device twins on the agent's MQTT connection: requests on
//! `$hw/events/device/{id}/twin/{update|get}` become shadow updates and reads, answered on
//! KubeEdge's result, document and delta topics. The payload rules live in
//! [`edgesync_protocol::kubeedge`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use edgesync_protocol::identity::{self, Dialect, Name};
use edgesync_protocol::kubeedge::{self, TwinOp, TwinTopic};
use edgesync_protocol::mqtt::Rejected;
use edgesync_protocol::shadow::{ShadowDocument, ShadowError, UpdateRequest};
use rumqttc::{Publish, QoS};
use serde_json::Value;

use super::processor::{Processor, store_unavailable};
use super::responder::{Responder, Settled};
use super::{DevicePublisher, StoreReply};
use crate::store::{StoreError, UpdateOutcome};

/// The agent's subscriptions for the dialect.
pub(super) fn filters() -> Vec<String> {
    kubeedge::subscriptions()
}

/// A twin request between the processor and the responder.
pub(super) struct Waiting {
    topic: TwinTopic,
    /// The request's event id, echoed in every answer.
    event_id: String,
    state: State,
}

enum State {
    /// Refused before reaching the store.
    Rejected(Rejected),
    Update(StoreReply<UpdateOutcome>),
    Get(StoreReply<Option<ShadowDocument>>),
}

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
    /// Validates a twin request on `topic`, if it is one, and queues it to the store.
    pub(super) async fn twin(&self, publish: &Publish) -> Option<Waiting> {
        let twins = self.twins.as_ref()?;
        let t = kubeedge::parse_topic(&publish.topic)?;
        let event_id = kubeedge::event_id(&publish.payload, &self.limits);
        let waiting = |topic, state| Waiting {
            topic,
            event_id,
            state,
        };
        if let Err(e) = identity::device_id(Name::KubeEdge(&t.device)) {
            let e = ShadowError::from(e);
            super::refused(&self.metrics, e.reason(), &publish.topic, &e.to_string());
            return Some(waiting(t, State::Rejected(Rejected::from_error(&e, None))));
        }
        twins.remember(&t.device, &t.id);
        let state = match t.op {
            TwinOp::Get => match self
                .store
                .submit_get(t.device.clone(), Dialect::KubeEdge)
                .await
            {
                Ok(rx) => State::Get(rx),
                Err(_) => State::Rejected(store_unavailable(None)),
            },
            TwinOp::Update => match kubeedge::parse_update(&publish.payload, &self.limits) {
                Err(e) => {
                    super::refused(&self.metrics, e.reason(), &publish.topic, &e.to_string());
                    State::Rejected(Rejected::from_error(&e, None))
                }
                Ok(u) => {
                    let req = UpdateRequest {
                        reported: Some(u.reported),
                        client_token: None,
                        version: None,
                        connected: None,
                        dialect: Dialect::KubeEdge,
                    };
                    State::Update(self.store.submit_update(t.device.clone(), req, true).await)
                }
            },
        };
        Some(waiting(t, state))
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
    pub(super) async fn twin(&self, publish: &Publish, w: Waiting) -> bool {
        let Waiting {
            topic: t,
            event_id,
            state,
        } = w;
        let result = match t.op {
            TwinOp::Update => "update/result",
            TwinOp::Get => "get/result",
        };
        let now = now_ms();
        let error = |code: u16, reason: &str| kubeedge::error_result(&event_id, code, reason, now);
        match state {
            State::Rejected(r) => {
                self.twin_reply(&t.id, result, &error(r.code, &r.message));
                true
            }
            // A read is acked whatever its outcome: there is nothing to redeliver.
            State::Get(rx) => {
                let body = match rx.await.unwrap_or(Err(StoreError::Closed)) {
                    Ok(Some(doc)) => kubeedge::get_result(&event_id, Some(&doc), now),
                    Ok(None) => error(404, &format!("Device {} not found", t.device)),
                    Err(_) => error(503, &store_unavailable(None).message),
                };
                self.twin_reply(&t.id, result, &body);
                true
            }
            State::Update(rx) => match self.settle(&t.device, rx).await {
                Settled::Accepted { applied, current } => {
                    let patch = kubeedge::parse_update(&publish.payload, &Default::default())
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
                Settled::Refused(r) => {
                    self.twin_reply(&t.id, result, &error(r.code, &r.message));
                    true
                }
                Settled::NotCommitted { replied } => {
                    if replied {
                        let r = store_unavailable(None);
                        self.twin_reply(&t.id, result, &error(r.code, &r.message));
                    }
                    false
                }
            },
        }
    }

    fn twin_reply(&self, id: &str, suffix: &str, body: &Value) {
        let topic = kubeedge::reply_topic(id, suffix);
        self.publish_reply(topic, QoS::AtMostOnce, body.to_string().into_bytes());
    }
}
