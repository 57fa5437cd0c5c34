//! What a report makes of a Device's status: reported state, its stamp, the report time, the
//! observed desired generation, the device's refusal of its desired state, and the `Online`,
//! `InSync` and `DesiredAccepted` conditions.

use edgesync_crds::{
    CONDITION_DESIRED_ACCEPTED, CONDITION_IN_SYNC, CONDITION_ONLINE, DesiredRejection, Device,
    DeviceStatus, set_condition,
};
use edgesync_protocol::merge::delta;
use edgesync_protocol::rejection::Rejection;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::stamp::Stamped;

/// `Online=False` reason for a device its own protocol reports disconnected while its edge
/// node is up; node liveness leaves it alone (only the device's next report clears it).
pub const REASON_DEVICE_DISCONNECTED: &str = "DeviceDisconnected";

/// Writes a report into a Device's status: reported state and stamp, report time, observed
/// desired generation, `Online=True` and `InSync` from the delta between desired and reported.
pub fn apply_report(device: &mut Device, report: &Stamped) {
    let now = Time(Timestamp::now());
    let generation = device.metadata.generation.unwrap_or(0);
    let desired = device.spec.desired.clone().unwrap_or_default();
    let status = device.status.get_or_insert_with(DeviceStatus::default);
    let reported = report.reported.parse();
    status.reported_version = Some(report.version);
    // Statuses from agents that predate epochs carry none, and order by version alone.
    let has_epoch = !report.epoch.is_empty();
    status.reported_epoch = has_epoch.then(|| report.epoch.to_string());
    status.reported_epoch_generation = has_epoch.then_some(report.stamp.generation);
    status.last_report_time = Some(
        report
            .reported_at
            .parse::<Timestamp>()
            .map(Time)
            .unwrap_or_else(|_| now.clone()),
    );
    status.observed_desired_generation = Some(report.observed_desired_version);
    let (online, reason, message) = if report.connected == Some(false) {
        (
            false,
            REASON_DEVICE_DISCONNECTED,
            "The edge node is up but reports the device disconnected (a Sparkplug B death certificate)",
        )
    } else {
        (true, "Reporting", "The device's edge node is reporting it")
    };
    set_condition(
        &mut status.conditions,
        CONDITION_ONLINE,
        online,
        reason,
        message,
        None,
        now.clone(),
    );
    let (in_sync, reason, message) = in_sync(
        generation,
        report.observed_desired_version,
        &desired,
        &reported,
    );
    status.reported = Some(reported);
    set_condition(
        &mut status.conditions,
        CONDITION_IN_SYNC,
        in_sync,
        reason,
        &message,
        Some(generation),
        now.clone(),
    );
    status.desired_rejection = report.rejection.as_ref().map(desired_rejection);
    let (accepted, reason, message) = desired_accepted(generation, report.rejection.as_ref());
    set_condition(
        &mut status.conditions,
        CONDITION_DESIRED_ACCEPTED,
        accepted,
        &reason,
        &message,
        Some(generation),
        now,
    );
}

fn desired_rejection(r: &Rejection) -> DesiredRejection {
    DesiredRejection {
        generation: r.desired_generation,
        code: r.code.clone(),
        message: r.message.clone(),
        time: i64::try_from(r.timestamp)
            .ok()
            .and_then(|s| Timestamp::from_second(s).ok())
            .map(Time),
    }
}

/// `DesiredAccepted`: False while the device refuses the Device's current generation (the
/// reason is the device's code, in the condition's CamelCase); a refusal of an older
/// generation no longer counts.
pub fn desired_accepted(generation: i64, rejection: Option<&Rejection>) -> (bool, String, String) {
    match rejection {
        Some(r) if r.desired_generation == generation => {
            (false, camel_case(&r.code), refusal_message(r))
        }
        _ => (
            true,
            "NotRefused".to_owned(),
            "The device has not refused the desired state".to_owned(),
        ),
    }
}

/// A refusal for people, in the condition's message and the Event's note.
pub fn refusal_message(r: &Rejection) -> String {
    let message = if r.message.is_empty() {
        String::new()
    } else {
        format!(": {}", r.message)
    };
    format!(
        "The device refused desired generation {} ({}){message}",
        r.desired_generation, r.code
    )
}

/// `out_of_range` as `OutOfRange`: condition reasons must start with a letter and hold only
/// letters, digits and `_` (and CamelCase is Kubernetes' style); a code of digits only gets
/// a prefix.
fn camel_case(code: &str) -> String {
    let mut out = String::with_capacity(code.len() + 8);
    for part in code.split('_').filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert_str(0, "Refused");
    }
    out
}

/// `InSync`: the agent has applied the current desired generation and the device reports
/// every desired value.
pub fn in_sync(
    generation: i64,
    observed: i64,
    desired: &serde_json::Map<String, serde_json::Value>,
    reported: &serde_json::Map<String, serde_json::Value>,
) -> (bool, &'static str, String) {
    if observed < generation {
        return (
            false,
            "DesiredNotObserved",
            format!(
                "The edge node has applied desired generation {observed}, not yet {generation}"
            ),
        );
    }
    let d = delta(desired, reported);
    if d.is_empty() {
        (
            true,
            "InSync",
            "The device reports every desired value".into(),
        )
    } else {
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.truncate(5);
        (
            false,
            "ReportedDiffers",
            format!(
                "Reported state differs from desired at: {}",
                keys.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::Stamp;
    use edgesync_crds::{DeviceSpec, condition_status};
    use edgesync_protocol::wire::Report;
    use serde_json::json;

    fn report(version: u64, reported: serde_json::Value, observed: i64) -> Stamped {
        let report = Report {
            device: "d".into(),
            version,
            reported: reported.as_object().cloned().unwrap_or_default(),
            reported_at: "2026-11-28T10:00:00Z".into(),
            observed_desired_version: observed,
            connected: None,
            rejection: None,
        };
        Stamped::new(&report, "e1".into(), Stamp::new(3, version))
    }

    #[test]
    fn report_sets_status_and_conditions() {
        let mut d = Device::new(
            "d",
            DeviceSpec {
                node_name: "n".into(),
                desired: json!({"speed": 5}).as_object().cloned(),
                reporting: None,
            },
        );
        d.metadata.generation = Some(2);
        apply_report(&mut d, &report(7, json!({"speed": 3}), 2));
        let s = d.status.as_ref().unwrap();
        assert_eq!(s.reported_version, Some(7));
        assert_eq!(s.reported_epoch.as_deref(), Some("e1"));
        assert_eq!(s.reported_epoch_generation, Some(3));
        assert_eq!(condition_status(&s.conditions, "Online"), Some("True"));
        assert_eq!(condition_status(&s.conditions, "InSync"), Some("False"));
        apply_report(&mut d, &report(8, json!({"speed": 5, "temp": 1}), 2));
        let s = d.status.as_ref().unwrap();
        assert_eq!(condition_status(&s.conditions, "InSync"), Some("True"));
        assert_eq!(
            s.last_report_time.as_ref().unwrap().0.to_string(),
            "2026-11-28T10:00:00Z"
        );
        // A newer desired generation not yet observed is not in sync, whatever is reported.
        let (ok, reason, _) = in_sync(3, 2, &serde_json::Map::new(), &serde_json::Map::new());
        assert!(!ok);
        assert_eq!(reason, "DesiredNotObserved");
    }

    #[test]
    fn a_refusal_of_the_current_generation_shows_until_a_newer_one() {
        let mut d = Device::new(
            "d",
            DeviceSpec {
                node_name: "n".into(),
                desired: json!({"speed": 9000}).as_object().cloned(),
                reporting: None,
            },
        );
        d.metadata.generation = Some(4);
        let mut refused = report(6, json!({"speed": 3}), 4);
        refused.rejection = Some(Rejection {
            desired_generation: 4,
            code: "out_of_range".into(),
            message: "speed 9000 is above 6000".into(),
            timestamp: 1_764_309_600,
        });
        apply_report(&mut d, &refused);
        let s = d.status.as_ref().unwrap();
        let r = s.desired_rejection.as_ref().unwrap();
        assert_eq!((r.generation, r.code.as_str()), (4, "out_of_range"));
        assert_eq!(
            r.time.as_ref().unwrap().0.to_string(),
            "2025-11-28T06:00:00Z"
        );
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_DESIRED_ACCEPTED)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "OutOfRange")
        );
        assert!(
            c.message.contains("speed 9000 is above 6000"),
            "{}",
            c.message
        );

        // The Device moved on to generation 5 before the agent did: no longer counts.
        d.metadata.generation = Some(5);
        let mut later = report(7, json!({"speed": 3}), 4);
        later.rejection = refused.rejection.clone();
        apply_report(&mut d, &later);
        let s = d.status.as_ref().unwrap();
        assert_eq!(
            condition_status(&s.conditions, "DesiredAccepted"),
            Some("True")
        );
        // The agent applied generation 5: its report carries no refusal, and none is shown.
        apply_report(&mut d, &report(8, json!({"speed": 3}), 5));
        let s = d.status.as_ref().unwrap();
        assert_eq!(s.desired_rejection, None);
        assert_eq!(
            condition_status(&s.conditions, "DesiredAccepted"),
            Some("True")
        );
    }

    #[test]
    fn refusal_codes_become_condition_reasons() {
        assert_eq!(camel_case("out_of_range"), "OutOfRange");
        assert_eq!(camel_case("busy"), "Busy");
        assert_eq!(camel_case("a__b_"), "AB");
        assert_eq!(camel_case("42"), "Refused42");
        assert_eq!(camel_case("_"), "Refused");
    }

    #[test]
    fn a_device_reported_disconnected_is_offline_until_it_reports_again() {
        let mut d = Device::new(
            "d",
            DeviceSpec {
                node_name: "n".into(),
                desired: None,
                reporting: None,
            },
        );
        let mut down = report(4, json!({"speed": 3}), 0);
        down.connected = Some(false);
        apply_report(&mut d, &down);
        let s = d.status.as_ref().unwrap();
        assert_eq!(condition_status(&s.conditions, "Online"), Some("False"));
        assert!(
            s.conditions
                .iter()
                .any(|c| c.reason == REASON_DEVICE_DISCONNECTED)
        );
        let mut up = report(5, json!({"speed": 3}), 0);
        up.connected = Some(true);
        apply_report(&mut d, &up);
        let s = d.status.as_ref().unwrap();
        assert_eq!(condition_status(&s.conditions, "Online"), Some("True"));
    }
}
