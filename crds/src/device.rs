//! The `Device` resource: one shop-floor device, owned by one edge node.
//!
//! `spec` is written by operators (`nodeName`, `desired`); `status` only by the controller,
//! from agent reports, through the status subresource so that status writes never bump
//! `metadata.generation` (which is the desired-state version agents acknowledge).

// Several `printcolumn(...)` entries with the same keys are intended; clippy reads them as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Desired configuration of a device.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "Device",
    namespaced,
    status = "DeviceStatus",
    shortname = "dev",
    doc = "A shop-floor device whose state edgesync keeps in sync with an edge node",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "Online",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Online\")].status"
    ),
    printcolumn(
        name = "In-Sync",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"InSync\")].status"
    ),
    printcolumn(
        name = "Last-Report",
        type_ = "date",
        json_path = ".status.lastReportTime"
    ),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.reportedVersion",
        priority = "1",
        description = "Shadow version of the reported state"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Name of the EdgeNode (same namespace) whose agent owns this device.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Desired state, free-form JSON. Every change bumps `metadata.generation` and flows down to
    /// the device as a delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::preserve_unknown_object")]
    pub desired: Option<Map<String, Value>>,
    /// Per-device overrides of how often the agent reports this device upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting: Option<ReportingOverrides>,
}

/// Per-device reporting overrides.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportingOverrides {
    /// Minimum seconds between two upstream reports of this device (latest state wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_interval_seconds: Option<u32>,
}

/// Observed state of a device, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Last reported state (free-form JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::replaced_whole_object")]
    pub reported: Option<Map<String, Value>>,
    /// Shadow version of `reported`. Never decreases within one agent epoch; a node's newer
    /// epoch (a reinstalled agent) starts again from its own versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_version: Option<u64>,
    /// Epoch of the agent database that sent `reported` (absent from agents that predate
    /// epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_epoch: Option<String>,
    /// The place of `reportedEpoch` among its node's epochs (see the EdgeNode's
    /// `agentEpochGeneration`): reports are ordered by this, then by version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_epoch_generation: Option<u64>,
    /// When the device last reported, as stamped by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
    /// The `metadata.generation` whose `spec.desired` the agent has applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired_generation: Option<i64>,
    /// The device's refusal of the desired generation its agent holds, while it holds one
    /// (the device published `shadow/desired/reject`); a newer desired generation clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_rejection: Option<DesiredRejection>,
    /// `Online`, `InSync` and `DesiredAccepted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A device's refusal of a desired generation, as its edge node reported it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredRejection {
    /// The `metadata.generation` whose `spec.desired` the device refused.
    pub generation: i64,
    /// Why, for machines (`[a-z0-9_]`, at most 64 characters); also the condition's reason.
    #[schemars(length(max = 64))]
    pub code: String,
    /// Why, for people (at most 256 bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256))]
    pub message: String,
    /// When the edge node took the refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}
