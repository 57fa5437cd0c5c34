//! The `EdgeNode` resource: one edge agent, the Secret holding its token, and its limits.

// Several `printcolumn(...)` entries with the same keys are intended; clippy reads them as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Configuration of an edge node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "EdgeNode",
    namespaced,
    status = "EdgeNodeStatus",
    shortname = "en",
    doc = "An edge node running the edgesync agent",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pendingDevices"
    ),
    printcolumn(
        name = "Last-Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeatTime"
    ),
    printcolumn(
        name = "Agent",
        type_ = "string",
        json_path = ".status.agentVersion",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeSpec {
    /// The Secret (in this namespace) whose value the agent presents as its bearer token.
    pub token_secret_ref: SecretKeyRef,
    /// Create a Device for an unknown device id this node reports, instead of rejecting it.
    #[serde(default)]
    pub auto_register_devices: bool,
    /// Ingestion limits for this node; controller defaults apply where unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<EdgeNodeLimits>,
}

/// A key in a Secret of the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_owned()
}

/// Per-node ingestion limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeLimits {
    /// Sustained device reports per second accepted from this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub reports_per_second: Option<u32>,
    /// Reports that may arrive at once above the sustained rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Maximum reports in one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_reports_per_batch: Option<u32>,
    /// Seconds without a heartbeat before the node and its devices are marked offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub offline_after_seconds: Option<u32>,
}

/// Observed state of an edge node, written by the controller from agent heartbeats.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeStatus {
    /// When the agent last sent a batch (every batch is a heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Version the agent reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Devices with a report the agent has not delivered yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_devices: Option<u64>,
    /// Age of the oldest undelivered report, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_seconds: Option<u64>,
    /// Epoch of the agent database now reporting for this node. A batch with another epoch
    /// means the agent was reinstalled or its database recreated: it becomes the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_epoch: Option<String>,
    /// How many epochs this node has had (1 for its first); orders a device's reports across
    /// reinstalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_epoch_generation: Option<u64>,
    /// Epochs superseded by a later one, newest first (at most 16). Batches carrying one are
    /// refused with 409: an agent still running with a retired epoch is a second agent using
    /// this node's identity, or one restored from an old backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_agent_epochs: Vec<String>,
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
