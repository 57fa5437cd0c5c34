//! Node heartbeats: every authorised batch refreshes the EdgeNode's status (last heartbeat,
//! agent version, pending devices, oldest pending age, `Ready=True`), written at most once per
//! `--heartbeat-write-seconds` per node, on its own task so it never waits behind device writes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::{CONDITION_READY, EdgeNode, EdgeNodeStatus, set_condition};
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
}

impl Heartbeats {
    /// Writes at most once per `interval` per node.
    pub fn new(client: Client, interval: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            interval,
            last_write: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Records a heartbeat from `node` (the cached EdgeNode) carrying `health`.
    pub fn beat(&self, node: &EdgeNode, health: &AgentHealth) {
        let namespace = node.metadata.namespace.clone().unwrap_or_default();
        let name = node.metadata.name.clone().unwrap_or_default();
        let was_ready = node
            .status
            .as_ref()
            .and_then(|s| edgesync_crds::condition_status(&s.conditions, CONDITION_READY))
            == Some("True");
        {
            let mut last = self.last_write.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let key = (namespace.clone(), name.clone());
            // A node coming back is written within a second; a healthy one at the interval.
            let gap = if was_ready {
                self.interval
            } else {
                Duration::from_secs(1)
            };
            if last.get(&key).is_some_and(|t| now.duration_since(*t) < gap) {
                return;
            }
            last.insert(key, now);
        }
        let mut status = node.status.clone().unwrap_or_default();
        let now = Time(Timestamp::now());
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
            now,
        );
        if !was_ready {
            info!(namespace, node = name, "Edge node is reporting (Ready)");
        }
        let api: Api<EdgeNode> = Api::namespaced(self.client.clone(), &namespace);
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            if let Err(e) = write_status(&api, &name, &status).await {
                warn!(namespace, node = name, error = %e, "EdgeNode heartbeat write failed");
            } else {
                metrics.node_status_writes.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Replaces the EdgeNode's status fields with `status` (a merge patch: the conditions list is
/// replaced as a whole, which is intended: the controller owns all of it).
pub async fn write_status(
    api: &Api<EdgeNode>,
    name: &str,
    status: &EdgeNodeStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
