//! Where a report sits in its device's history, and how it compares with what the Device's
//! status already holds.
//!
//! A report is stamped `(epoch generation, version)`: the generation is its agent epoch's
//! place among the node's epochs (0 for agents that predate epochs, and for statuses they
//! wrote), the version counts within that epoch. Stamps order reports lexicographically, so a
//! reinstalled agent (a newer epoch) supersedes the old one even though its versions restart
//! at 1, and within one epoch the versions never regress.

use std::sync::Arc;

use edgesync_crds::DeviceStatus;
use edgesync_protocol::rejection::Rejection;
use edgesync_protocol::wire::Report;
use serde_json::{Map, Value};

use crate::doc::Doc;

/// A report's place in its device's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Stamp {
    /// The report's agent epoch generation (the node's count of epochs).
    pub generation: u64,
    /// The shadow version within that epoch.
    pub version: u64,
}

impl Stamp {
    /// The stamp of version `version` in the epoch of generation `generation`.
    pub fn new(generation: u64, version: u64) -> Self {
        Self {
            generation,
            version,
        }
    }

    /// The stamp of what a Device's status holds ((0, 0) when it holds nothing).
    pub fn of_status(status: Option<&DeviceStatus>) -> Self {
        status.map_or_else(Self::default, |s| Self {
            generation: s.reported_epoch_generation.unwrap_or(0),
            version: s.reported_version.unwrap_or(0),
        })
    }
}

/// An accepted report with its batch's epoch and its stamp, as the controller keeps it until
/// its status is written: the reported document compact, and shared with the live state.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// The shadow version the agent sent.
    pub version: u64,
    /// The reported document.
    pub reported: Doc,
    /// When the device reported it (RFC 3339, as the agent sent it).
    pub reported_at: String,
    /// The Device generation whose desired state the agent had applied.
    pub observed_desired_version: i64,
    /// Whether the device is connected, as its agent said (`None`: not said).
    pub connected: Option<bool>,
    /// The device's refusal of its desired generation, while it holds one.
    pub rejection: Option<Rejection>,
    /// The batch's agent epoch (empty from agents that predate epochs).
    pub epoch: Arc<str>,
    /// `(epoch generation, version)`.
    pub stamp: Stamp,
}

impl Stamped {
    /// `report`, sent in a batch of agent epoch `epoch`, stamped `stamp`.
    pub fn new(report: &Report, epoch: Arc<str>, stamp: Stamp) -> Self {
        Self {
            version: report.version,
            reported: Doc::of(&report.reported),
            reported_at: report.reported_at.clone(),
            observed_desired_version: report.observed_desired_version,
            connected: report.connected,
            rejection: report.rejection.clone(),
            epoch,
            stamp,
        }
    }
}

/// How a report compares with a Device's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The report is newer: write it.
    Newer,
    /// The status holds this very report already (a retried batch): nothing to write.
    Same,
    /// The status holds another body under the same stamp. Within one epoch a version names
    /// one state, so one of the two is wrong (the agent's database lost commits, or it was
    /// restored from a copy); neither is written over the other.
    Conflict,
    /// The status holds a newer report: this one is stale.
    Older(Stamp),
}

/// Reason code of a report whose stamp already holds another state.
pub const CONFLICT: &str = "conflict";

/// Why a report was refused as a [`Verdict::Conflict`].
pub fn conflict_message(namespace: &str, device: &str, version: u64, epoch: &str) -> String {
    let epoch = if epoch.is_empty() { "(none)" } else { epoch };
    format!(
        "device {namespace}/{device} already holds another state at version {version} of agent \
         epoch {epoch}: one version names one state, so the agent's database no longer matches \
         what it reported (lost commits, or restored from a copy); its next update is written"
    )
}

/// Compares a report stamped `stamp` against `status`; `same_body` tells whether a status
/// reported document is the report's (asked only when the stamps are equal).
pub fn judge(
    status: Option<&DeviceStatus>,
    stamp: Stamp,
    same_body: impl FnOnce(&Map<String, Value>) -> bool,
) -> Verdict {
    let current = Stamp::of_status(status);
    match stamp.cmp(&current) {
        std::cmp::Ordering::Greater => Verdict::Newer,
        std::cmp::Ordering::Less => Verdict::Older(current),
        std::cmp::Ordering::Equal => {
            if status
                .and_then(|s| s.reported.as_ref())
                .is_some_and(same_body)
            {
                Verdict::Same
            } else {
                Verdict::Conflict
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(generation: Option<u64>, version: u64, reported: Value) -> DeviceStatus {
        DeviceStatus {
            reported: reported.as_object().cloned(),
            reported_version: Some(version),
            reported_epoch_generation: generation,
            ..DeviceStatus::default()
        }
    }

    /// Whether a status document is `v`.
    fn body(v: Value) -> impl FnOnce(&Map<String, Value>) -> bool {
        let want = v.as_object().cloned().unwrap_or_default();
        move |held| *held == want
    }

    fn stamp(generation: u64, version: u64) -> Stamp {
        Stamp::new(generation, version)
    }

    #[test]
    fn versions_order_reports_within_an_epoch() {
        let s = status(Some(1), 5, json!({"a": 5}));
        assert_eq!(
            judge(Some(&s), stamp(1, 6), body(json!({}))),
            Verdict::Newer
        );
        assert_eq!(
            judge(Some(&s), stamp(1, 4), body(json!({"a": 4}))),
            Verdict::Older(stamp(1, 5))
        );
        assert_eq!(
            judge(Some(&s), stamp(1, 5), body(json!({"a": 5}))),
            Verdict::Same
        );
        assert_eq!(
            judge(Some(&s), stamp(1, 5), body(json!({"a": 6}))),
            Verdict::Conflict
        );
    }

    #[test]
    fn a_newer_epoch_supersedes_whatever_its_versions() {
        let s = status(Some(1), 900, json!({"a": 900}));
        assert_eq!(
            judge(Some(&s), stamp(2, 1), body(json!({"a": 1}))),
            Verdict::Newer
        );
        // And an older epoch never comes back over a newer one.
        let s = status(Some(2), 1, json!({"a": 1}));
        assert_eq!(
            judge(Some(&s), stamp(1, 901), body(json!({"a": 901}))),
            Verdict::Older(stamp(2, 1))
        );
    }

    #[test]
    fn statuses_and_agents_from_before_epochs_order_by_version() {
        // Written by an agent without epochs: generation 0.
        let s = status(None, 7, json!({"a": 7}));
        assert_eq!(
            judge(Some(&s), stamp(0, 6), body(json!({}))),
            Verdict::Older(stamp(0, 7))
        );
        assert_eq!(
            judge(Some(&s), stamp(0, 8), body(json!({}))),
            Verdict::Newer
        );
        // The first agent with an epoch supersedes it.
        assert_eq!(
            judge(Some(&s), stamp(1, 1), body(json!({}))),
            Verdict::Newer
        );
        // Nothing written yet.
        assert_eq!(judge(None, stamp(0, 1), body(json!({}))), Verdict::Newer);
    }
}
