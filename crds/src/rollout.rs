//! The `DeviceRollout` resource: one desired-state change applied to the Devices a selector
//! picks, in waves, halting (and reverting, when asked) when devices refuse it or miss their
//! deadline (docs/rollouts.md).
//!
//! `spec` is written by operators and by `kubectl edgesync rollout pause|resume|abort`;
//! `status` only by the controller, and it is all a new leader needs to go on.

// Several `printcolumn(...)` entries with the same keys are intended; clippy reads them as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A staged change of the Devices' desired state.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "DeviceRollout",
    namespaced,
    status = "DeviceRolloutStatus",
    shortname = "dro",
    doc = "A desired-state change rolled out to selected Devices in waves, with a halt on failures",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.currentStep"),
    printcolumn(
        name = "Selected",
        type_ = "integer",
        json_path = ".status.selected",
        priority = "1"
    ),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.touched"),
    printcolumn(name = "In-Sync", type_ = "integer", json_path = ".status.updated"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRolloutSpec {
    /// Which Devices of the rollout's namespace it changes. The set is taken when the rollout
    /// starts: Devices created after that are not part of it.
    pub selector: LabelSelector,
    /// A JSON merge patch (RFC 7396) applied to each selected Device's `spec.desired`.
    #[schemars(schema_with = "crate::preserve_unknown_object")]
    pub desired: Map<String, Value>,
    /// Seconds a patched device has to become In-Sync before it counts as failed.
    #[serde(default = "default_deadline")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: u32,
    /// Waves, failure budget, revert and offline devices.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Set by `kubectl edgesync rollout pause` (true) and `resume` (false): no new device is
    /// patched while true. The controller sets it at a step that asks to `pause`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Set by `kubectl edgesync rollout abort`: the rollout ends, patching no further device
    /// and, with `revertOnFailure`, putting back the values of those it patched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort: bool,
}

fn default_deadline() -> u32 {
    300
}

/// How the change is staged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// The waves, in order. Without steps, one wave of every selected device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<RolloutStep>,
    /// How many devices of one wave may fail (refuse, or miss the deadline) before the
    /// rollout halts: a number, or a share of the wave (`"5%"`, rounded down). Default 0:
    /// the first failure halts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string")]
    pub max_failures: Option<IntOrPercent>,
    /// On a halt or an abort, put back each patched device's previous values (unless
    /// someone changed them since).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert_on_failure: bool,
    /// What a patched device that is offline means for its wave: `Fail` (the default) lets
    /// its deadline pass and count as a failure; `Wait` counts it as done for the wave, and
    /// the device takes the change when it returns.
    #[serde(default)]
    pub offline: OfflinePolicy,
}

/// One wave.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// How many of the selected devices are patched once this step is done, counting the
    /// steps before it: a number, or a share of the selected devices (`"10%"`, rounded up).
    #[schemars(schema_with = "int_or_string")]
    pub devices: IntOrPercent,
    /// Seconds to wait after the wave is done before the next one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_seconds: Option<u32>,
    /// Wait after the wave for `kubectl edgesync rollout resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause: bool,
}

/// A number (`5`) or a percentage (`"10%"`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrPercent {
    /// A number.
    Int(u64),
    /// A percentage, or a number written as a string.
    Text(String),
}

impl IntOrPercent {
    /// As written, for messages and parsing (`5`, `10%`).
    pub fn text(&self) -> String {
        match self {
            Self::Int(n) => n.to_string(),
            Self::Text(t) => t.clone(),
        }
    }
}

/// The schema Kubernetes uses for int-or-string fields.
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true
    })
}

/// What an offline device means for its wave.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OfflinePolicy {
    /// It misses its deadline and counts as failed.
    #[default]
    Fail,
    /// It counts as done for the wave and takes the change when it returns.
    Wait,
}

/// Where a rollout is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Waiting for another rollout over the same devices and keys (see the `Blocked`
    /// condition).
    Pending,
    /// Patching devices, or waiting for a wave to be In-Sync.
    Progressing,
    /// Waiting for `kubectl edgesync rollout resume`.
    Paused,
    /// Stopped by failures: no further device is patched.
    Halted,
    /// Every selected device is patched and In-Sync (or offline, with `offline: Wait`).
    Complete,
    /// Stopped by `kubectl edgesync rollout abort`.
    Aborted,
}

impl RolloutPhase {
    /// Whether the rollout has ended: it patches nothing more (a revert may still run).
    pub fn ended(self) -> bool {
        matches!(self, Self::Halted | Self::Complete | Self::Aborted)
    }
}

/// Progress, written by the controller; a new leader goes on from it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRolloutStatus {
    /// Where the rollout is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// When it started: Devices created after this are not part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// How many Devices it selected when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<u64>,
    /// The step being worked on (1-based); its wave is patched, then waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<u32>,
    /// When the current step's wave was done (In-Sync or failed), for `pauseSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_done_time: Option<Time>,
    /// The step whose `pause` has been taken (so a resume goes on past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_step: Option<u32>,
    /// Devices patched so far.
    #[serde(default)]
    pub touched: u64,
    /// Of those, In-Sync with the rollout's change.
    #[serde(default)]
    pub updated: u64,
    /// Of those, failed: refused the change, or missed the deadline.
    #[serde(default)]
    pub failed: u64,
    /// Devices whose previous values were put back after a halt or an abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted: Option<u64>,
    /// The first failures, for `kubectl edgesync rollout status` (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<RolloutFailure>,
    /// The `metadata.generation` of the spec this status follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Progressing`, `Halted` and `Blocked`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One device's failure.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutFailure {
    /// The Device.
    pub device: String,
    /// The wave it was patched in (1-based).
    pub step: u32,
    /// The device's refusal code, or `deadline_exceeded`.
    pub code: String,
    /// The device's message, or how long it was waited for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn rollout_crd_has_what_kubectl_users_rely_on() {
        let crd = serde_json::to_value(DeviceRollout::crd()).unwrap();
        let cols = crate::kubectl_basics(&crd, "dro");
        let version = &crd["spec"]["versions"][0];
        for want in ["Phase", "Step", "Updated", "In-Sync", "Failed", "Age"] {
            assert!(
                cols.contains(&want),
                "missing printer column {want}: {cols:?}"
            );
        }
        let step = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["strategy"]
            ["properties"]["steps"]["items"]["properties"]["devices"];
        assert_eq!(step["x-kubernetes-int-or-string"], true);
    }

    #[test]
    fn counts_read_as_numbers_or_shares() {
        let spec: DeviceRolloutSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"line": "a"}},
            "desired": {"speed": 1500},
            "strategy": {"steps": [{"devices": 1}, {"devices": "10%", "pauseSeconds": 60}],
                         "maxFailures": "5%", "offline": "Wait"}
        }))
        .unwrap();
        assert_eq!(spec.progress_deadline_seconds, 300);
        assert_eq!(spec.strategy.steps[0].devices, IntOrPercent::Int(1));
        assert_eq!(spec.strategy.steps[1].devices.text(), "10%");
        assert_eq!(spec.strategy.offline, OfflinePolicy::Wait);
        assert!(!spec.paused && !spec.abort);
    }
}
