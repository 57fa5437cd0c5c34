//! The native shadow dialect: `{prefix}/{device}/shadow/update`, `.../shadow/get` and
//! `.../shadow/desired/reject`, answered on `.../accepted`, `.../rejected`, `.../documents`,
//! and deltas on `.../update/delta` (the device-facing contract in DESIGN.md).

use edgesync_protocol::identity::{self, Dialect, Name};
use edgesync_protocol::mqtt::{
    DeltaMessage, DocumentsMessage, RejectAccepted, Rejected, ShadowOp, UpdateAccepted,
    parse_shadow_topic, reply_topic,
};
use edgesync_protocol::rejection::RejectRequest;
use edgesync_protocol::shadow::{ShadowDocument, ShadowError, UpdateRequest};
use rumqttc::{Publish, QoS};
use serde_json::{Map, Value};

use super::processor::{Processor, store_unavailable};
use super::responder::{Responder, Settled};
use super::{DevicePublisher, StoreReply};
use crate::store::{StoreError, UpdateOutcome};

/// The agent's subscriptions for the dialect.
pub(super) fn filters(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}/+/shadow/update"),
        format!("{prefix}/+/shadow/get"),
        format!("{prefix}/+/shadow/desired/reject"),
    ]
}

/// A shadow request between the processor and the responder.
pub(super) struct Waiting {
    device: String,
    op: ShadowOp,
    client_token: Option<String>,
    state: State,
}

enum State {
    /// Refused before reaching the store.
    Rejected(Rejected),
    Update(StoreReply<UpdateOutcome>),
    Get(StoreReply<Option<ShadowDocument>>),
    /// A refusal of the desired generation named.
    Reject(StoreReply<UpdateOutcome>, i64),
}

impl Processor {
    /// Validates a shadow request on `topic`, if it is one, and queues it to the store.
    pub(super) async fn shadow(&self, publish: &Publish) -> Option<Waiting> {
        let (device, op) = parse_shadow_topic(&self.prefix, &publish.topic)?;
        let waiting = |client_token, state| Waiting {
            device: device.to_owned(),
            op,
            client_token,
            state,
        };
        if let Err(e) = identity::device_id(Name::Native(device)) {
            let token = match op {
                ShadowOp::Update => UpdateRequest::parse(&publish.payload, &self.limits)
                    .ok()
                    .and_then(|r| r.client_token),
                ShadowOp::Reject => RejectRequest::parse(&publish.payload, &self.limits)
                    .ok()
                    .and_then(|r| r.client_token),
                ShadowOp::Get => None,
            };
            let rejected = self.reject(&ShadowError::from(e), token.clone());
            return Some(waiting(token, State::Rejected(rejected)));
        }
        Some(match op {
            // Not awaited here: the responder waits for it in order, while this stage goes on
            // queuing other devices' updates into the same commit.
            ShadowOp::Get => match self
                .store
                .submit_get(device.to_owned(), Dialect::Native)
                .await
            {
                Ok(rx) => waiting(None, State::Get(rx)),
                Err(_) => waiting(None, State::Rejected(store_unavailable(None))),
            },
            ShadowOp::Update => match UpdateRequest::parse(&publish.payload, &self.limits) {
                Err(e) => waiting(None, State::Rejected(self.reject(&e, None))),
                Ok(req) => {
                    let token = req.client_token.clone();
                    let rx = self.store.submit_update(device.to_owned(), req, true).await;
                    waiting(token, State::Update(rx))
                }
            },
            ShadowOp::Reject => match RejectRequest::parse(&publish.payload, &self.limits) {
                Err(e) => waiting(None, State::Rejected(self.reject(&e, None))),
                Ok(req) => {
                    let token = req.client_token.clone();
                    let generation = req.desired_generation;
                    let rx = self.store.submit_reject(device.to_owned(), req).await;
                    waiting(token, State::Reject(rx, generation))
                }
            },
        })
    }
}

impl Responder {
    /// Waits for a shadow request's outcome and replies; returns whether the message may be
    /// acked.
    pub(super) async fn shadow(&self, publish: &Publish, w: Waiting) -> bool {
        let Waiting {
            device,
            op,
            client_token,
            state,
        } = w;
        match state {
            State::Rejected(r) => {
                self.shadow_reply(&device, op, "rejected", &r);
                true
            }
            // A read is acked whatever its outcome: there is nothing to redeliver.
            State::Get(rx) => {
                match rx.await.unwrap_or(Err(StoreError::Closed)) {
                    Ok(Some(doc)) => {
                        self.shadow_reply(&device, op, "accepted", &get_document(&doc))
                    }
                    Ok(None) => self.shadow_reply(
                        &device,
                        op,
                        "rejected",
                        &Rejected {
                            code: 404,
                            message: format!("no shadow for device {device}"),
                            client_token: None,
                        },
                    ),
                    Err(_) => self.shadow_reply(&device, op, "rejected", &store_unavailable(None)),
                }
                true
            }
            State::Update(rx) => match self.settle(&device, rx).await {
                Settled::Accepted { applied, current } => {
                    if let Some(current) = &current {
                        let accepted = UpdateAccepted {
                            state: reported_state(&publish.payload),
                            version: current.version,
                            timestamp: current.timestamp,
                            client_token,
                        };
                        self.shadow_reply(&device, op, "accepted", &accepted);
                        if applied.changed {
                            let docs = DocumentsMessage {
                                previous: applied.previous.unwrap_or_default(),
                                current: current.clone(),
                                timestamp: current.timestamp,
                            };
                            self.shadow_reply(&device, op, "documents", &docs);
                        }
                    }
                    self.delta_due(&device, applied.changed, current.as_ref())
                        .await;
                    true
                }
                other => self.not_accepted(&device, op, client_token, other),
            },
            State::Reject(rx, desired_generation) => match self.settle(&device, rx).await {
                Settled::Accepted { current, .. } => {
                    let accepted = RejectAccepted {
                        desired_generation,
                        version: current.map_or(0, |c| c.version),
                        client_token,
                    };
                    self.shadow_reply(&device, op, "accepted", &accepted);
                    true
                }
                other => self.not_accepted(&device, op, client_token, other),
            },
        }
    }

    /// Answers a request the store refused or did not commit; returns whether the message
    /// may be acked (not when it was not committed: the broker sends it again).
    fn not_accepted(
        &self,
        device: &str,
        op: ShadowOp,
        client_token: Option<String>,
        settled: Settled,
    ) -> bool {
        match settled {
            Settled::Accepted { .. } => true,
            Settled::Refused(rejected) => {
                self.shadow_reply(
                    device,
                    op,
                    "rejected",
                    &Rejected {
                        client_token,
                        ..rejected
                    },
                );
                true
            }
            Settled::NotCommitted { replied } => {
                if replied {
                    self.shadow_reply(device, op, "rejected", &store_unavailable(client_token));
                }
                false
            }
        }
    }

    fn shadow_reply<T: serde::Serialize>(
        &self,
        device: &str,
        op: ShadowOp,
        suffix: &str,
        body: &T,
    ) {
        let topic = reply_topic(&self.prefix, device, op, suffix);
        if let Ok(payload) = serde_json::to_vec(body) {
            self.publish_reply(topic, QoS::AtMostOnce, payload);
        }
    }
}

impl DevicePublisher {
    /// Publishes `update/delta` (QoS1: desired state must reach the device). Dropped when the
    /// request queue is full: the device still gets it from shadow/get or with its next
    /// accepted update.
    pub(super) fn publish_shadow_delta(
        &self,
        device: &str,
        doc: &ShadowDocument,
        delta: Map<String, Value>,
    ) {
        let msg = DeltaMessage {
            state: delta,
            version: doc.version,
            desired_generation: doc.desired_generation,
            timestamp: doc.timestamp,
        };
        let topic = reply_topic(&self.prefix, device, ShadowOp::Update, "delta");
        let Ok(payload) = serde_json::to_vec(&msg) else {
            return;
        };
        self.publish_counted(
            topic,
            QoS::AtLeastOnce,
            payload,
            &self.metrics.deltas_published,
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
