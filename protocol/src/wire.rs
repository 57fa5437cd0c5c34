//! Agent <-> controller wire types (HTTP, JSON, camelCase), exactly as DESIGN.md specifies.
//!
//! - `POST /v1/namespaces/{ns}/nodes/{node}/reports` carries a [`ReportBatch`] and is answered
//!   with a [`ReportBatchResponse`] (one [`ReportResult`] per report) or an [`ErrorBody`].
//! - `GET /v1/namespaces/{ns}/nodes/{node}/desired?since=CURSOR` streams [`DesiredEvent`]s as
//!   NDJSON (one JSON object per line).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::rejection::Rejection;

/// Path of the reports endpoint for a node.
pub fn reports_path(namespace: &str, node: &str) -> String {
    format!("/v1/namespaces/{namespace}/nodes/{node}/reports")
}

/// Path of the desired-state stream for a node.
pub fn desired_path(namespace: &str, node: &str) -> String {
    format!("/v1/namespaces/{namespace}/nodes/{node}/desired")
}

/// One upload from an agent: its health plus the latest pending report of each device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatch {
    /// Increases per node with every batch and survives agent restarts.
    pub seq: u64,
    /// The agent instance's epoch: chosen when its database is created, so it changes when
    /// the agent is reinstalled or its database recreated, which restarts its versions at 1.
    /// The controller orders a device's reports by `(epoch, version)` and lets a node's new
    /// epoch supersede the old one. Empty from agents that predate epochs (versions alone
    /// then order the reports).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// The agent's health, used as the node heartbeat.
    pub agent: AgentHealth,
    /// At most one report per device.
    pub reports: Vec<Report>,
    /// The agent takes live answers: `accepted` then means "applied to the controller's live
    /// state", and the answer (this one or a later one) lists in
    /// [`ReportBatchResponse::durable`] the versions that have since become durable. The
    /// agent keeps each report until a durable version covers it. Without it, a batch is
    /// answered once its reports are durable.
    #[serde(default, skip_serializing_if = "is_false")]
    pub live: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

/// Longest epoch a batch may carry.
pub const MAX_EPOCH_BYTES: usize = 64;

/// An epoch for a new agent database, from 128 random bits the caller draws.
pub fn epoch_from_random(bits: u128) -> String {
    format!("{bits:032x}")
}

/// Checks a batch's epoch: at most [`MAX_EPOCH_BYTES`] of ASCII letters, digits, `-`, `_`
/// and `.` (empty means an agent that predates epochs).
///
/// # Errors
/// Which rule the epoch breaks.
pub fn check_epoch(epoch: &str) -> Result<(), &'static str> {
    if epoch.len() > MAX_EPOCH_BYTES {
        return Err("must be at most 64 characters");
    }
    if !epoch
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("may contain only ASCII letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Agent health carried by every batch (an empty batch is a heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentHealth {
    /// Agent version string.
    pub version: String,
    /// Devices with a pending (unacknowledged) report.
    pub pending_devices: u64,
    /// Age of the oldest pending report in seconds.
    pub oldest_pending_age_seconds: u64,
    /// Whether the agent is connected to its MQTT broker.
    #[serde(default)]
    pub mqtt_connected: bool,
    /// Seconds since the agent started.
    #[serde(default)]
    pub uptime_seconds: u64,
    /// Set while the agent's database cannot commit (disk full, I/O error): why. Ingest is
    /// paused and nothing is acknowledged to devices until it commits again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Commits the agent's database was found to have lost at start (0: none); stays set
    /// until the operator clears the alarm on the node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_commits: u64,
    /// What the lost-commit detection found, for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_commits_detail: Option<String>,
    /// Devices with a shadow on the agent (0 when not reported).
    #[serde(default)]
    pub devices: u64,
    /// The agent's device cap, `store.max_devices` (0 when not reported).
    #[serde(default)]
    pub max_devices: u64,
    /// Updates refused because the device cap was reached, since the agent started.
    #[serde(default)]
    pub device_limit_rejections: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The full reported state of one device at one shadow version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Device id (the `Device` object name).
    pub device: String,
    /// Shadow version this state belongs to.
    pub version: u64,
    /// Full reported state (not a patch), so any single report is enough to converge.
    pub reported: Map<String, Value>,
    /// When the device reported it (RFC 3339).
    pub reported_at: String,
    /// The `Device` generation whose `spec.desired` the agent has applied (0 = none).
    #[serde(default)]
    pub observed_desired_version: i64,
    /// Whether the device itself is connected, for devices whose protocol says so
    /// (Sparkplug B births and deaths): `false` makes the Device `Online=False` while its node
    /// is up. Absent: the device is online whenever its node is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// The device's refusal of a desired generation (`shadow/desired/reject`), while it holds
    /// one. Absent from agents that predate refusals; older controllers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Rejection>,
}

/// The controller's answer to a [`ReportBatch`]: one result per report, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatchResponse {
    /// Echo of the batch `seq`.
    pub seq: u64,
    /// One result per report.
    pub results: Vec<ReportResult>,
    /// Set when the batch was answered live: the identity of the live state its accepted
    /// reports were applied to. It changes when that state is lost (the controller
    /// restarted, or another replica answers): the agent then sends again the reports it
    /// holds that no durable version covers yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<String>,
    /// Versions of this node's devices (in the batch's epoch) that became durable since the
    /// node was last told: each covers that device's reports up to its version, whichever
    /// batch carried them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub durable: Vec<Durable>,
}

/// A device's version that is durable (in the Device's status, or superseded there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Durable {
    /// Device id.
    pub device: String,
    /// Every report of the device up to this version is durable or superseded.
    pub version: u64,
}

/// The fate of one report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportResult {
    /// Device id.
    pub device: String,
    /// Version of the report this result is for.
    pub version: u64,
    /// Outcome.
    pub status: ReportStatus,
    /// Why, for `rejected` (and informative for `stale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Outcome of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReportStatus {
    /// Durable in the Kubernetes API.
    Accepted,
    /// A newer version is already durable; this one was not written.
    Stale,
    /// Will never be accepted as sent (unknown device, another node's device, invalid).
    Rejected,
}

/// One line of the desired-state NDJSON stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum DesiredEvent {
    /// Desired state of one device (during a snapshot or after a change).
    #[serde(rename_all = "camelCase")]
    Desired {
        /// Device id.
        device: String,
        /// `metadata.generation` of the Device.
        generation: i64,
        /// `spec.desired` (empty when unset).
        desired: Map<String, Value>,
        /// Cursor to resume after this event.
        cursor: String,
    },
    /// The device's Device was deleted or moved to another node.
    #[serde(rename_all = "camelCase")]
    Removed {
        /// Device id.
        device: String,
        /// Cursor to resume after this event.
        cursor: String,
    },
    /// End of the initial snapshot: every device of the node has been sent once.
    #[serde(rename_all = "camelCase")]
    SnapshotComplete {
        /// Cursor to resume from.
        cursor: String,
    },
    /// Periodic keep-alive carrying the latest cursor.
    #[serde(rename_all = "camelCase")]
    Bookmark {
        /// Cursor to resume from.
        cursor: String,
    },
}

impl DesiredEvent {
    /// The cursor to resume the stream after this event (empty on snapshot lines).
    pub fn cursor(&self) -> &str {
        match self {
            DesiredEvent::Desired { cursor, .. }
            | DesiredEvent::Removed { cursor, .. }
            | DesiredEvent::SnapshotComplete { cursor }
            | DesiredEvent::Bookmark { cursor } => cursor,
        }
    }
}

/// The JSON error body of every non-2xx answer: `{"error":{"code":"..","message":".."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Machine-readable code plus a message for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code such as `unauthorized`, `rate_limited`, `kubernetes_unavailable`.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn report_batch_matches_design_example() {
        let text = r#"{"seq":42,"agent":{"version":"0.1.0","pendingDevices":2,"oldestPendingAgeSeconds":3},
            "reports":[{"device":"press-1","version":7,"reported":{"temp":21},"reportedAt":"2026-11-28T06:00:00Z","observedDesiredVersion":3}]}"#;
        let batch: ReportBatch = serde_json::from_str(text).unwrap();
        assert_eq!(batch.seq, 42);
        assert_eq!(batch.reports[0].device, "press-1");
        assert_eq!(batch.reports[0].observed_desired_version, 3);
        let v = serde_json::to_value(&batch).unwrap();
        assert_eq!(v["reports"][0]["reportedAt"], "2026-11-28T06:00:00Z");
        assert_eq!(v["agent"]["pendingDevices"], 2);
    }

    #[test]
    fn results_and_errors_shape() {
        let r = ReportBatchResponse {
            seq: 1,
            results: vec![
                ReportResult {
                    device: "a".into(),
                    version: 2,
                    status: ReportStatus::Accepted,
                    reason: None,
                },
                ReportResult {
                    device: "b".into(),
                    version: 1,
                    status: ReportStatus::Rejected,
                    reason: Some("device b belongs to node n2".into()),
                },
            ],
            live: None,
            durable: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"seq":1,"results":[{"device":"a","version":2,"status":"accepted"},{"device":"b","version":1,"status":"rejected","reason":"device b belongs to node n2"}]})
        );
        // A live answer names its live state and lists what became durable.
        let live = ReportBatchResponse {
            live: Some("7f".into()),
            durable: vec![Durable {
                device: "c".into(),
                version: 9,
            }],
            ..r
        };
        let v = serde_json::to_value(&live).unwrap();
        assert_eq!(v["live"], "7f");
        assert_eq!(v["durable"], json!([{"device":"c","version":9}]));
        // An answer from a controller that predates live answers reads as durable.
        let old: ReportBatchResponse = serde_json::from_str(r#"{"seq":1,"results":[]}"#).unwrap();
        assert_eq!((old.live, old.durable.len()), (None, 0));
        assert_eq!(
            serde_json::to_value(ErrorBody::new("unauthorized", "bad token")).unwrap(),
            json!({"error":{"code":"unauthorized","message":"bad token"}})
        );
    }

    #[test]
    fn desired_events_are_tagged_ndjson_lines() {
        let e = DesiredEvent::Desired {
            device: "a".into(),
            generation: 2,
            desired: Map::new(),
            cursor: "c1".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"desired","device":"a","generation":2,"desired":{},"cursor":"c1"}"#
        );
        let b: DesiredEvent =
            serde_json::from_str(r#"{"type":"snapshotComplete","cursor":"9"}"#).unwrap();
        assert_eq!(b, DesiredEvent::SnapshotComplete { cursor: "9".into() });
        assert_eq!(
            reports_path("plant-a", "edge-1"),
            "/v1/namespaces/plant-a/nodes/edge-1/reports"
        );
    }

    #[test]
    fn epochs_are_checked_and_optional() {
        let e = epoch_from_random(u128::MAX);
        assert_eq!(e.len(), 32);
        assert_eq!(check_epoch(&e), Ok(()));
        assert_eq!(check_epoch(""), Ok(()));
        assert!(check_epoch(&"a".repeat(65)).is_err());
        assert!(check_epoch("a b").is_err());
        assert!(check_epoch("é").is_err());
        // Older agents send no epoch; an empty one is not sent.
        let b: ReportBatch =
            serde_json::from_str(r#"{"seq":1,"agent":{"version":"0.1.0","pendingDevices":0,"oldestPendingAgeSeconds":0},"reports":[]}"#)
                .unwrap();
        assert_eq!(b.epoch, "");
        assert!(!serde_json::to_string(&b).unwrap().contains("epoch"));
    }

    proptest! {
        #[test]
        fn report_round_trips(device in "[a-z0-9-]{1,20}", version in any::<u64>(), seq in any::<u64>(), g in any::<i64>()) {
            let batch = ReportBatch {
                seq,
                epoch: epoch_from_random(u128::from(seq)),
                agent: AgentHealth::default(),
                reports: vec![Report { device, version, reported: Map::new(), reported_at: "2026-01-01T00:00:00Z".into(), observed_desired_version: g, connected: None, rejection: None }],
                live: seq % 2 == 0,
            };
            let back: ReportBatch = serde_json::from_str(&serde_json::to_string(&batch).unwrap()).unwrap();
            prop_assert_eq!(back, batch);
        }
    }
}
