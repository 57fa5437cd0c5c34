//! The rules for each report of a batch, as pure functions: what is decided before any
//! lookup, what the reported Device decides, and what the status writer's outcome means for
//! the answer. `reports.rs` does the I/O around them (reading the body, looking up and
//! registering Devices, waiting for the writer, events and metrics).

use std::collections::HashMap;

use edgesync_crds::{Device, DeviceStatus};
use edgesync_protocol::limits::{self, Limits};
use edgesync_protocol::wire::{Report, ReportStatus};
use serde_json::Map;

use crate::stamp::{CONFLICT, Stamp, Verdict, conflict_message, judge};
use crate::writer::Outcome;

/// A report answered without (another) write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settled {
    pub status: ReportStatus,
    /// The rejection reason counted in `edgesync_controller_reports_rejected_total`.
    pub code: Option<&'static str>,
    pub reason: String,
}

impl Settled {
    fn stale(reason: impl Into<String>) -> Self {
        Self {
            status: ReportStatus::Stale,
            code: None,
            reason: reason.into(),
        }
    }

    /// Rejected for `code`; the reason starts with it, as agents log it.
    fn rejected(code: &'static str, why: impl std::fmt::Display) -> Self {
        Self {
            status: ReportStatus::Rejected,
            code: Some(code),
            reason: format!("{code}: {why}"),
        }
    }
}

/// The newest version of each device in a batch.
pub(super) fn newest_versions(reports: &[Report]) -> HashMap<String, u64> {
    let mut newest: HashMap<String, u64> = HashMap::new();
    for r in reports {
        let v = newest.entry(r.device.clone()).or_default();
        *v = (*v).max(r.version);
    }
    newest
}

/// The checks that need no lookup, in order: a newer version of the device in the same batch
/// (stale), a version Kubernetes cannot hold, an invalid device id, a state beyond `limits`.
/// `None`: the report goes on to its Device. A report that can never be written is refused
/// here, before auto-registration could create its Device.
pub(super) fn precheck(
    report: &Report,
    newest: &HashMap<String, u64>,
    limits: &Limits,
) -> Option<Settled> {
    if newest
        .get(&report.device)
        .is_some_and(|v| *v > report.version)
    {
        return Some(Settled::stale(
            "a newer version of this device is in the same batch",
        ));
    }
    if report.version == 0 || report.version > i64::MAX as u64 {
        return Some(Settled::rejected(
            "invalid_version",
            format!(
                "{} is outside 1..={} (a Kubernetes int64)",
                report.version,
                i64::MAX
            ),
        ));
    }
    if let Err(e) = limits::validate_device_id(&report.device) {
        return Some(Settled::rejected("invalid_device_id", e));
    }
    let state_ok = limits::check_state(&report.reported, limits).and_then(|()| {
        edgesync_protocol::shadow::check_size(&Map::new(), &report.reported, limits)
    });
    if let Err(e) = state_ok {
        let code = if e.is_too_large() {
            "too_large"
        } else {
            "invalid_state"
        };
        return Some(Settled::rejected(code, e));
    }
    if let Some(Err(e)) = report.rejection.as_ref().map(|r| r.check()) {
        return Some(Settled::rejected("invalid_rejection", e));
    }
    None
}

/// What the reported Device decides, as cached: another node's device is forbidden, and the
/// status settles retries and stale reports without a write (a stamp's state never changes
/// once written, so a lagging cache cannot mislead this). `None`: write it.
pub(super) fn against_device(
    report: &Report,
    stamp: Stamp,
    epoch: &str,
    (namespace, node): (&str, &str),
    (owner, status): (&str, Option<&DeviceStatus>),
) -> Option<Settled> {
    if owner != node {
        return Some(Settled::rejected(
            "forbidden",
            format!(
                "device {namespace}/{} belongs to node {owner}, not {node}",
                report.device
            ),
        ));
    }
    match judge(status, stamp, |held| *held == report.reported) {
        Verdict::Newer => None,
        Verdict::Same => Some(Settled {
            status: ReportStatus::Accepted,
            code: None,
            reason: String::new(),
        }),
        Verdict::Older(_) => Some(Settled::stale("a newer report is already durable")),
        Verdict::Conflict => Some(Settled::rejected(
            CONFLICT,
            conflict_message(namespace, &report.device, report.version, epoch),
        )),
    }
}

/// The note of a `DesiredRefused` Event, when `report` carries a refusal of the Device's
/// current generation that its status does not show yet (a repeat of the same refusal in
/// later reports is not news; Events are paced per Device besides).
pub(super) fn refusal_news(report: &Report, device: &Device) -> Option<String> {
    let r = report.rejection.as_ref()?;
    if Some(r.desired_generation) != device.metadata.generation {
        return None;
    }
    let shown = device
        .status
        .as_ref()
        .and_then(|s| s.desired_rejection.as_ref())
        .is_some_and(|held| held.generation == r.desired_generation && held.code == r.code);
    if shown {
        return None;
    }
    Some(crate::device_status::refusal_message(r))
}

/// What the writer's outcome for the report stamped `stamp` means for its answer: `Ok(None)`
/// keeps it accepted, `Ok(Some(_))` changes it, `Err` fails the whole batch as unavailable.
pub(super) fn written(stamp: Stamp, outcome: Outcome) -> Result<Option<Settled>, String> {
    match outcome {
        Outcome::Durable(d) if d == stamp => Ok(None),
        Outcome::Durable(_) => Ok(Some(Settled::stale("a newer report is already durable"))),
        // The agent keeps the newer report until that one's batch is answered.
        Outcome::Superseded(newer) => Ok(Some(Settled::stale(format!(
            "superseded by version {} of the same device, queued for writing",
            newer.version
        )))),
        Outcome::Rejected(code, message) => Ok(Some(Settled::rejected(code, message))),
        Outcome::Unavailable(m) => Err(m),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn report(device: &str, version: u64, reported: serde_json::Value) -> Report {
        Report {
            device: device.into(),
            version,
            reported: reported.as_object().unwrap().clone(),
            reported_at: "2026-12-07T00:00:00Z".into(),
            observed_desired_version: 0,
            connected: None,
            rejection: None,
        }
    }

    fn code(s: Option<Settled>) -> Option<(ReportStatus, Option<&'static str>)> {
        s.map(|s| (s.status, s.code))
    }

    #[test]
    fn reports_that_can_never_be_written_are_refused_before_any_lookup() {
        let limits = Limits {
            max_state_bytes: 64,
            ..Limits::default()
        };
        let batch = [
            report("a", 1, json!({})),
            report("a", 2, json!({})),
            report("b", 0, json!({})),
            report("c", u64::MAX, json!({})),
            report("Not_A_Name", 1, json!({})),
            report("d", 1, json!({"big": "x".repeat(100)})),
            report("e", 1, json!({"$bad": 1})),
            report("f", 1, json!({"t": 20})),
            Report {
                rejection: Some(edgesync_protocol::rejection::Rejection {
                    desired_generation: 2,
                    code: "Not A Code".into(),
                    message: String::new(),
                    timestamp: 1,
                }),
                ..report("g", 1, json!({}))
            },
        ];
        let newest = newest_versions(&batch);
        let codes: Vec<_> = batch
            .iter()
            .map(|r| code(precheck(r, &newest, &limits)))
            .collect();
        assert_eq!(
            codes,
            [
                Some((ReportStatus::Stale, None)),
                None,
                Some((ReportStatus::Rejected, Some("invalid_version"))),
                Some((ReportStatus::Rejected, Some("invalid_version"))),
                Some((ReportStatus::Rejected, Some("invalid_device_id"))),
                Some((ReportStatus::Rejected, Some("too_large"))),
                Some((ReportStatus::Rejected, Some("invalid_state"))),
                None,
                Some((ReportStatus::Rejected, Some("invalid_rejection"))),
            ]
        );
        let reason = precheck(&batch[2], &newest, &limits).unwrap().reason;
        assert!(
            reason.starts_with("invalid_version: 0 is outside"),
            "{reason}"
        );
    }

    #[test]
    fn another_nodes_device_is_forbidden_and_a_new_report_is_written() {
        let r = report("d", 3, json!({"t": 20}));
        let stamp = Stamp::new(1, 3);
        let at = ("ns", "n1");
        let forbidden = against_device(&r, stamp, "e", at, ("n2", None)).unwrap();
        assert_eq!(forbidden.code, Some("forbidden"));
        assert!(
            forbidden.reason.contains("belongs to node n2, not n1"),
            "{}",
            forbidden.reason
        );
        assert_eq!(against_device(&r, stamp, "e", at, ("n1", None)), None);
    }

    #[test]
    fn a_refusal_is_news_once_and_only_for_the_current_generation() {
        let mut device: Device = serde_json::from_value(json!({
            "apiVersion": "edgesync.io/v1alpha1", "kind": "Device",
            "metadata": {"name": "d", "generation": 3},
            "spec": {"nodeName": "n"}
        }))
        .unwrap();
        let refusal = |generation| edgesync_protocol::rejection::Rejection {
            desired_generation: generation,
            code: "out_of_range".into(),
            message: "too fast".into(),
            timestamp: 1,
        };
        let mut r = report("d", 5, json!({}));
        assert_eq!(refusal_news(&r, &device), None);
        r.rejection = Some(refusal(2));
        assert_eq!(refusal_news(&r, &device), None, "an older generation");
        r.rejection = Some(refusal(3));
        assert_eq!(
            refusal_news(&r, &device).as_deref(),
            Some("The device refused desired generation 3 (out_of_range): too fast")
        );
        device.status = Some(DeviceStatus {
            desired_rejection: Some(edgesync_crds::DesiredRejection {
                generation: 3,
                code: "out_of_range".into(),
                message: "too fast".into(),
                time: None,
            }),
            ..DeviceStatus::default()
        });
        assert_eq!(refusal_news(&r, &device), None, "already shown");
    }

    #[test]
    fn writer_outcomes_become_answers() {
        let stamp = Stamp::new(2, 7);
        assert_eq!(written(stamp, Outcome::Durable(stamp)), Ok(None));
        let newer = written(stamp, Outcome::Durable(Stamp::new(2, 9))).unwrap();
        assert_eq!(code(newer), Some((ReportStatus::Stale, None)));
        let superseded = written(stamp, Outcome::Superseded(Stamp::new(2, 8)))
            .unwrap()
            .unwrap();
        assert!(
            superseded.reason.contains("version 8"),
            "{}",
            superseded.reason
        );
        let refused = written(stamp, Outcome::Rejected("invalid", "bad".into())).unwrap();
        assert_eq!(refused.map(|s| s.reason), Some("invalid: bad".to_owned()));
        assert_eq!(
            written(stamp, Outcome::Unavailable("down".into())),
            Err("down".to_owned())
        );
    }
}
