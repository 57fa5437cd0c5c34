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
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::config::SparkplugSettings;
use crate::metrics::Metrics;

/// The Sparkplug B host application's memory, shared by the intake (which learns from
/// births) and the desired-state publisher (which writes commands with what they declared).
#[derive(Debug)]
pub struct Sparkplug {
    host: Mutex<Host>,
    group: Option<String>,
    metrics: Arc<Metrics>,
}

/// What one Sparkplug message asks the store and the broker to do.
pub(super) struct Handled {
    /// One update per device the message is about.
    pub(super) updates: Vec<(String, UpdateRequest)>,
    /// A rebirth request to publish.
    pub(super) rebirth: Option<Command>,
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
    pub(super) fn matches(&self, topic: &str) -> bool {
        topic::parse(topic).is_some_and(|t| self.group.as_deref().is_none_or(|g| g == t.group))
    }

    /// Handles one message; `None` when it was refused as a whole (counted and logged).
    pub(super) fn handle(&self, topic: &str, payload: &[u8], limits: &Limits) -> Option<Handled> {
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
    pub(super) fn command(
        &self,
        device: &str,
        delta: &Map<String, Value>,
    ) -> Option<Option<Command>> {
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
