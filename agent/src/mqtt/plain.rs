//! Plain JSON publishers: the configured `[[ingest]]` mappings (`format = "json"`), such as
//! `factory/{device}/state`. Any JSON object published there is merged into the device's
//! reported state; nothing is answered (such devices do not listen), and a refusal is counted
//! and logged. Their deltas go out on the shadow topics.

use edgesync_protocol::identity::{self, Name};
use edgesync_protocol::mqtt::IngestPattern;
use edgesync_protocol::shadow::{ShadowError, UpdateRequest};
use rumqttc::Publish;
use tracing::debug;

use super::StoreReply;
use super::processor::Processor;
use super::responder::{Responder, Settled};
use crate::store::UpdateOutcome;

/// The agent's subscriptions for the mappings.
pub(super) fn filters(mappings: &[IngestPattern]) -> impl Iterator<Item = String> + '_ {
    mappings.iter().map(IngestPattern::filter)
}

/// A plain message between the processor and the responder.
pub(super) struct Waiting {
    device: String,
    state: State,
}

enum State {
    /// Refused (counted and logged): acked, since sending it again cannot change that.
    Refused,
    Update(StoreReply<UpdateOutcome>),
}

impl Processor {
    /// Validates a message on a mapped topic, if it is on one, and queues it to the store.
    pub(super) async fn plain(&self, publish: &Publish) -> Option<Waiting> {
        let device = self.ingest.iter().find_map(|p| p.device(&publish.topic))?;
        let refused = Waiting {
            device: device.to_owned(),
            state: State::Refused,
        };
        if let Err(e) = identity::device_id(Name::Native(device)) {
            self.reject(&ShadowError::from(e), None);
            return Some(refused);
        }
        let req = match UpdateRequest::parse_plain(&publish.payload, &self.limits) {
            Ok(req) => req,
            Err(e) => {
                self.reject(&e, None);
                return Some(refused);
            }
        };
        // Not awaited here: the responder waits for it in order, while this stage goes on
        // queuing other devices' updates into the same commit.
        let rx = self
            .store
            .submit_update(device.to_owned(), req, false)
            .await;
        Some(Waiting {
            device: device.to_owned(),
            state: State::Update(rx),
        })
    }
}

impl Responder {
    /// Waits for a plain message's commit; returns whether it may be acked.
    pub(super) async fn plain(&self, w: Waiting) -> bool {
        let rx = match w.state {
            State::Update(rx) => rx,
            State::Refused => {
                debug!(device = w.device, "Plain ingest message rejected");
                return true;
            }
        };
        match self.settle(&w.device, rx).await {
            Settled::Accepted { applied, current } => {
                self.delta_due(&w.device, applied.changed, current.as_ref())
                    .await;
                true
            }
            Settled::Refused(_) => true,
            Settled::NotCommitted { .. } => false,
        }
    }
}
