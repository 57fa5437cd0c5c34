//! Sparkplug B on the agent's MQTT connection. The rules live in
//! [`edgesync_protocol::sparkplug`]; this module feeds them the messages, turns what they
//! say into store updates, counts and logs what was wrong, and builds the commands (rebirth
//! requests, and DCMDs for desired changes) the agent publishes.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use edgesync_protocol::Limits;
use edgesync_protocol::limits::check_state;
use edgesync_protocol::shadow::{ShadowError, UpdateRequest};
use edgesync_protocol::sparkplug::{Command, Host, topic};
use rumqttc::Publish;
use serde_json::{Map, Value};
use tracing::{debug, warn};

use super::processor::Processor;
use super::responder::{Responder, Settled};
use super::{DevicePublisher, StoreReply};
use crate::config::SparkplugSettings;
use crate::metrics::Metrics;
use crate::store::UpdateOutcome;

/// The agent's subscriptions for the mapping: births, deaths and data of its group (all
/// groups when none is set).
pub(super) fn filters(settings: &SparkplugSettings) -> Vec<String> {
    topic::subscriptions(settings.group.as_deref())
}

/// The Sparkplug B host application's memory, shared by the intake (which learns from
/// births) and the desired-state publisher (which writes commands with what they declared).
#[derive(Debug)]
pub struct Sparkplug {
    host: Mutex<Host>,
    group: Option<String>,
    metrics: Arc<Metrics>,
}

/// What one Sparkplug message asks the store and the broker to do.
struct Handled {
    /// One update per device the message is about.
    updates: Vec<(String, UpdateRequest)>,
    /// A rebirth request to publish.
    rebirth: Option<Command>,
}

/// The updates one message made, each awaited before the message is acked.
pub(super) struct Waiting {
    updates: Vec<(String, StoreReply<UpdateOutcome>)>,
    /// Published once the updates are committed.
    command: Option<Command>,
}

impl Sparkplug {
    /// Empty memory for the configured mapping.
    pub fn new(settings: &SparkplugSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            host: Mutex::new(Host::new(settings.host)),
            group: settings.group.clone(),
            metrics,
        }
    }

    /// Whether `topic` is one of ours.
    fn matches(&self, topic: &str) -> bool {
        topic::parse(topic).is_some_and(|t| self.group.as_deref().is_none_or(|g| g == t.group))
    }

    /// Handles one message; `None` when it was refused as a whole (counted and logged).
    fn handle(&self, topic: &str, payload: &[u8], limits: &Limits) -> Option<Handled> {
        let parsed = topic::parse(topic)?;
        if payload.len() > limits.max_payload_bytes {
            let e = ShadowError::from(edgesync_protocol::LimitError::PayloadTooLarge {
                size: payload.len(),
                max: limits.max_payload_bytes,
            });
            self.refuse(topic, e.reason(), &e.to_string());
            return None;
        }
        let outcome = {
            let mut host = self
                .host
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let outcome = host.handle(&parsed, payload, now_ms());
            self.metrics
                .set_sparkplug_edge_nodes(host.edge_nodes() as u64);
            outcome
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                self.refuse(topic, e.reason(), &e.to_string());
                return None;
            }
        };
        for issue in &outcome.issues {
            let n = self.metrics.sparkplug_issue(issue.reason());
            // Sparse: the 1st, 2nd, 4th, 8th... of each kind, so a flood cannot fill the log.
            if n.is_power_of_two() {
                warn!(topic, issue = ?issue, occurrences = n, "Sparkplug B message not fully usable (edgesync_agent_sparkplug_issues_total)");
            } else {
                debug!(topic, issue = ?issue, "Sparkplug B message not fully usable");
            }
        }
        let mut updates = Vec::with_capacity(outcome.updates.len());
        for u in outcome.updates {
            if let Err(e) = check_state(&u.reported, limits) {
                let e = ShadowError::from(e);
                self.refuse(topic, e.reason(), &format!("device {}: {e}", u.device));
                continue;
            }
            updates.push((
                u.device,
                UpdateRequest {
                    reported: Some(u.reported),
                    client_token: None,
                    version: None,
                    connected: Some(u.connected),
                    dialect: edgesync_protocol::identity::Dialect::Sparkplug,
                },
            ));
        }
        Some(Handled {
            updates,
            rebirth: outcome.rebirth,
        })
    }

    /// The command writing `delta` to `device`: `None` when the device is not a Sparkplug
    /// device heard since the agent started (the caller then uses the shadow topics),
    /// `Some(None)` when nothing in `delta` is a writable metric.
    fn command(&self, device: &str, delta: &Map<String, Value>) -> Option<Option<Command>> {
        let host = self
            .host
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !host.knows(device) {
            return None;
        }
        let mut skipped = Vec::new();
        let cmd = host.command(device, delta, now_ms(), &mut skipped);
        if !skipped.is_empty() {
            debug!(
                device,
                ?skipped,
                "Desired values with no Sparkplug metric of a writable type in the device's birth are not sent"
            );
        }
        Some(cmd)
    }

    fn refuse(&self, topic: &str, reason: &'static str, message: &str) {
        super::refused(
            &self.metrics,
            reason,
            topic,
            &format!("Sparkplug B: {message}"),
        );
    }
}

impl Processor {
    /// Queues the updates of a Sparkplug B message, if it is one: one per device it
    /// concerns, which is known only once it is decoded.
    pub(super) async fn sparkplug(&self, publish: &Publish) -> Option<Waiting> {
        let sparkplug = self
            .sparkplug
            .as_ref()
            .filter(|s| s.matches(&publish.topic))?;
        let Some(handled) = sparkplug.handle(&publish.topic, &publish.payload, &self.limits) else {
            return Some(Waiting {
                updates: Vec::new(),
                command: None,
            });
        };
        let mut waiting = Waiting {
            updates: Vec::with_capacity(handled.updates.len()),
            command: handled.rebirth,
        };
        for (device, req) in handled.updates {
            let rx = self.store.submit_update(device.clone(), req, false).await;
            waiting.updates.push((device, rx));
        }
        Some(waiting)
    }
}

impl Responder {
    /// Waits for each device's update from one message, then publishes its command; returns
    /// whether the message may be acked (every update committed or refused for good).
    pub(super) async fn sparkplug(&self, w: Waiting) -> bool {
        // `settle` has asked for a redelivery of what was not committed.
        let mut ack = true;
        for (device, rx) in w.updates {
            match self.settle(&device, rx).await {
                Settled::Accepted { applied, current } => {
                    self.delta_due(&device, applied.changed, current.as_ref())
                        .await;
                }
                Settled::Refused(_) => {}
                Settled::NotCommitted { .. } => ack = false,
            }
        }
        if let Some(c) = w.command {
            self.publisher
                .publish_command(c, &self.metrics.sparkplug_rebirths);
        }
        ack
    }
}

impl DevicePublisher {
    /// Writes `delta` to a Sparkplug B device heard since the agent started as a DCMD (NCMD
    /// for an edge node) with the metrics its birth declared; false when it is not one.
    pub(super) fn publish_sparkplug_delta(&self, device: &str, delta: &Map<String, Value>) -> bool {
        let Some(command) = self
            .sparkplug
            .as_ref()
            .and_then(|s| s.command(device, delta))
        else {
            return false;
        };
        if let Some(c) = command {
            self.publish_command(c, &self.metrics.sparkplug_writes);
        }
        true
    }

    /// Publishes a Sparkplug B command at QoS 0, as the specification requires of commands
    /// (a lost one is sent again with the next change or birth), and counts it in `counter`.
    fn publish_command(&self, c: Command, counter: &prometheus_client::metrics::counter::Counter) {
        self.publish_counted(c.topic, rumqttc::QoS::AtMostOnce, c.payload, counter);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
