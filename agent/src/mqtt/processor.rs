//! The processor: routes each message, validates it against the limits, and queues it to
//! the store without waiting for the commit, so many messages share one commit.

use std::sync::Arc;

use edgesync_protocol::Limits;
use edgesync_protocol::identity::{self, Dialect, Name};
use edgesync_protocol::mqtt::{IngestPattern, Rejected, ShadowOp, parse_shadow_topic};
use edgesync_protocol::shadow::{ShadowError, UpdateRequest};
use rumqttc::Publish;
use tokio::sync::mpsc;

use super::{Job, Many, Pending, Route, Sparkplug, Twins};
use crate::metrics::Metrics;
use crate::store::Store;

pub(super) struct Processor {
    pub(super) prefix: String,
    pub(super) ingest: Vec<IngestPattern>,
    pub(super) sparkplug: Option<Arc<Sparkplug>>,
    pub(super) twins: Option<Arc<Twins>>,
    pub(super) limits: Limits,
    pub(super) store: Store,
    pub(super) metrics: Arc<Metrics>,
}

impl Processor {
    fn route(&self, topic: &str) -> Route {
        if let Some((device, op)) = parse_shadow_topic(&self.prefix, topic) {
            return Route::Shadow {
                device: device.to_owned(),
                op,
            };
        }
        for p in &self.ingest {
            if let Some(device) = p.device(topic) {
                return Route::Ingest {
                    device: device.to_owned(),
                };
            }
        }
        if self.sparkplug.as_ref().is_some_and(|s| s.matches(topic)) {
            return Route::Sparkplug;
        }
        if self.twins.is_some()
            && let Some(t) = edgesync_protocol::kubeedge::parse_topic(topic)
        {
            return Route::Twin(t);
        }
        Route::Unknown
    }

    pub(super) async fn run(self, mut intake: mpsc::Receiver<Publish>, jobs: mpsc::Sender<Job>) {
        while let Some(publish) = intake.recv().await {
            let route = self.route(&publish.topic);
            let (pending, client_token) = self.process(&route, &publish).await;
            if jobs
                .send(Job {
                    publish,
                    route,
                    client_token,
                    pending,
                })
                .await
                .is_err()
            {
                break;
            }
        }
    }

    async fn process(&self, route: &Route, publish: &Publish) -> (Pending, Option<String>) {
        let (device, parsed) = match route {
            Route::Unknown => return (Pending::Done, None),
            Route::Sparkplug => return (self.sparkplug(publish).await, None),
            Route::Twin(t) => return self.twin(t, publish).await,
            Route::Shadow {
                device,
                op: ShadowOp::Get,
            } => {
                if let Err(e) = identity::device_id(Name::Native(device)) {
                    return (self.reject(&ShadowError::from(e), None), None);
                }
                // Not awaited here: the responder waits for it in order, while this stage
                // goes on queuing other devices' updates into the same commit.
                return match self.store.submit_get(device.clone(), Dialect::Native).await {
                    Ok(rx) => (Pending::Get(rx), None),
                    Err(e) => (Pending::Got(Err(e)), None),
                };
            }
            Route::Shadow {
                device,
                op: ShadowOp::Update,
            } => (device, UpdateRequest::parse(&publish.payload, &self.limits)),
            Route::Ingest { device } => (
                device,
                UpdateRequest::parse_plain(&publish.payload, &self.limits),
            ),
        };
        if let Err(e) = identity::device_id(Name::Native(device)) {
            let token = parsed.ok().and_then(|r| r.client_token);
            return (self.reject(&ShadowError::from(e), token.clone()), token);
        }
        match parsed {
            Err(e) => (self.reject(&e, None), None),
            Ok(req) => {
                let token = req.client_token.clone();
                let full_reply = matches!(route, Route::Shadow { .. });
                match self
                    .store
                    .submit_update(device.clone(), req, full_reply)
                    .await
                {
                    Ok(rx) => (Pending::Update(rx), token),
                    Err(_) => (Pending::Reject(store_unavailable(token.clone())), token),
                }
            }
        }
    }

    /// Queues the updates of a Sparkplug B message, one per device it concerns.
    async fn sparkplug(&self, publish: &Publish) -> Pending {
        let Some(sparkplug) = &self.sparkplug else {
            return Pending::Done;
        };
        let Some(handled) = sparkplug.handle(&publish.topic, &publish.payload, &self.limits) else {
            return Pending::Done;
        };
        let mut many = Many {
            updates: Vec::with_capacity(handled.updates.len()),
            unqueued: false,
            command: handled.rebirth,
        };
        for (device, req) in handled.updates {
            match self.store.submit_update(device.clone(), req, false).await {
                Ok(rx) => many.updates.push((device, rx)),
                Err(_) => many.unqueued = true,
            }
        }
        Pending::Many(Box::new(many))
    }

    fn reject(&self, err: &ShadowError, client_token: Option<String>) -> Pending {
        self.metrics.reject(err.reason());
        Pending::Reject(Rejected::from_error(err, client_token))
    }
}

pub(super) fn store_unavailable(client_token: Option<String>) -> Rejected {
    Rejected {
        code: 503,
        message: "shadow store unavailable; retry later".to_owned(),
        client_token,
    }
}
