//! Node heartbeats: every authorised batch refreshes the EdgeNode's status (last heartbeat,
//! agent version, pending devices, oldest pending age, `Ready=True`, and the store's
//! conditions: `StoreWritable`, `StoreIntact`, `DeviceCapacity`), written at most once per
//! `--heartbeat-write-seconds` per node, on its own task so it never waits behind device
//! writes. A node coming back, or a condition changing status, is written within a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::{
    CONDITION_DEVICE_CAPACITY, CONDITION_READY, CONDITION_STORE_INTACT, CONDITION_STORE_WRITABLE,
    EdgeNode, EdgeNodeStatus, condition_status, set_condition,
};
use edgesync_protocol::wire::AgentHealth;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Throttled EdgeNode status writer.
pub struct Heartbeats {
    client: Client,
    interval: Duration,
    last_write: Mutex<HashMap<(String, String), Instant>>,
    metrics: Arc<Metrics>,
    tasks: tokio_util::task::TaskTracker,
    events: crate::events::Events,
}

impl Heartbeats {
    /// Writes at most once per `interval` per node.
    pub fn new(
        client: Client,
        interval: Duration,
        metrics: Arc<Metrics>,
        tasks: tokio_util::task::TaskTracker,
        events: crate::events::Events,
    ) -> Self {
        Self {
            client,
            interval,
            last_write: Mutex::new(HashMap::new()),
            metrics,
            tasks,
            events,
        }
    }

    /// Records a heartbeat from `node` (the cached EdgeNode) carrying `health`.
    pub fn beat(&self, node: &EdgeNode, health: &AgentHealth) {
        let namespace = node.metadata.namespace.clone().unwrap_or_default();
        let name = node.metadata.name.clone().unwrap_or_default();
        let old = node.status.clone().unwrap_or_default();
        let was_ready = condition_status(&old.conditions, CONDITION_READY) == Some("True");
        let now = Time(Timestamp::now());
        let mut status = old.clone();
        status.last_heartbeat_time = Some(now.clone());
        status.agent_version = Some(health.version.clone());
        status.pending_devices = Some(health.pending_devices);
        status.oldest_pending_age_seconds = Some(health.oldest_pending_age_seconds);
        let message = if health.mqtt_connected {
            "The agent is sending batches".to_owned()
        } else {
            "The agent is sending batches but is not connected to its MQTT broker".to_owned()
        };
        set_condition(
            &mut status.conditions,
            CONDITION_READY,
            true,
            "Heartbeat",
            &message,
            None,
            now.clone(),
        );
        store_conditions(&mut status.conditions, health, &now);
        let flipped = [
            CONDITION_READY,
            CONDITION_STORE_WRITABLE,
            CONDITION_STORE_INTACT,
            CONDITION_DEVICE_CAPACITY,
        ]
        .iter()
        .any(|c| condition_status(&old.conditions, c) != condition_status(&status.conditions, c));
        {
            let mut last = self.last_write.lock().unwrap_or_else(|e| e.into_inner());
            let at = Instant::now();
            let key = (namespace.clone(), name.clone());
            // A node coming back, or a condition changing, is written within a second; a
            // steady one at the interval.
            let gap = if flipped {
                Duration::from_secs(1)
            } else {
                self.interval
            };
            if last.get(&key).is_some_and(|t| at.duration_since(*t) < gap) {
                return;
            }
            last.insert(key, at);
        }
        if !was_ready {
            info!(namespace, node = name, "Edge node is reporting (Ready)");
            self.events.transition(
                node,
                kube::runtime::events::EventType::Normal,
                "NodeReady",
                format!("{message}; agent {}", health.version),
            );
        }
        for (type_, what) in [
            (CONDITION_STORE_WRITABLE, "its database cannot commit"),
            (CONDITION_STORE_INTACT, "its database has lost commits"),
            (CONDITION_DEVICE_CAPACITY, "it is at its device limit"),
        ] {
            let before = condition_status(&old.conditions, type_);
            let after = condition_status(&status.conditions, type_);
            if after == Some("False") && before != Some("False") {
                let message = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == type_)
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                warn!(
                    namespace,
                    node = name,
                    condition = type_,
                    message,
                    "Edge node reports that {what}"
                );
            } else if before == Some("False") && after == Some("True") {
                info!(
                    namespace,
                    node = name,
                    condition = type_,
                    "Edge node recovered"
                );
            }
        }
        let api: Api<EdgeNode> = Api::namespaced(self.client.clone(), &namespace);
        let metrics = Arc::clone(&self.metrics);
        self.tasks.spawn(async move {
            if let Err(e) = write_status(&api, &name, &status).await {
                warn!(namespace, node = name, error = %e, "EdgeNode heartbeat write failed");
            } else {
                metrics.node_status_writes.inc();
            }
        });
    }
}

/// Longest condition message taken from an agent (the rest is cut).
const MAX_MESSAGE: usize = 1024;

/// Sets the store's conditions from the agent's health. Agents too old to report a field
/// leave its condition untouched.
fn store_conditions(
    conditions: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    health: &AgentHealth,
    now: &Time,
) {
    let (writable, reason, message) = match &health.store_error {
        None => (
            true,
            "Committing",
            "The agent's database commits".to_owned(),
        ),
        Some(e) => (
            false,
            "CommitFailing",
            format!(
                "The agent's database cannot commit, so device messages are not acknowledged and wait in the broker; free space or fix the disk under data_dir and ingest resumes by itself: {}",
                cut(e)
            ),
        ),
    };
    set_condition(
        conditions,
        CONDITION_STORE_WRITABLE,
        writable,
        reason,
        &message,
        None,
        now.clone(),
    );
    let (intact, reason, message) = if health.lost_commits == 0 {
        (
            true,
            "NoLossDetected",
            "No lost commits detected".to_owned(),
        )
    } else {
        (
            false,
            "CommitsLost",
            format!(
                "{} commits lost: {}",
                health.lost_commits,
                cut(health.lost_commits_detail.as_deref().unwrap_or(""))
            ),
        )
    };
    set_condition(
        conditions,
        CONDITION_STORE_INTACT,
        intact,
        reason,
        &message,
        None,
        now.clone(),
    );
    if health.max_devices > 0 {
        let room = health.devices < health.max_devices;
        let (reason, message) = if room {
            (
                "BelowLimit",
                format!(
                    "{} of at most {} devices",
                    health.devices, health.max_devices
                ),
            )
        } else {
            (
                "LimitReached",
                format!(
                    "{} of at most {} devices (store.max_devices): updates from new devices are rejected ({} since the agent started); raise store.max_devices",
                    health.devices, health.max_devices, health.device_limit_rejections
                ),
            )
        };
        set_condition(
            conditions,
            CONDITION_DEVICE_CAPACITY,
            room,
            reason,
            &message,
            None,
            now.clone(),
        );
    }
}

/// `s` cut to [`MAX_MESSAGE`] bytes at a character boundary.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(MAX_MESSAGE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Replaces the EdgeNode's status fields with `status` (a merge patch: the conditions list is
/// replaced as a whole, which is intended: the controller owns all of it). The agent epoch
/// fields are left out: `status` is a copy of a cached object, and only `epoch` writes them,
/// with a precondition, so a lagging cache cannot bring a superseded epoch back.
pub async fn write_status(
    api: &Api<EdgeNode>,
    name: &str,
    status: &EdgeNodeStatus,
) -> Result<(), kube::Error> {
    let status = EdgeNodeStatus {
        agent_epoch: None,
        agent_epoch_generation: None,
        retired_agent_epochs: Vec::new(),
        ..status.clone()
    };
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
