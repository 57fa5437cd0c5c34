//! What a report makes of a Device's status: reported state, its stamp, the report time, the
//! observed desired generation, and the `Online` and `InSync` conditions.

use edgesync_crds::{CONDITION_IN_SYNC, CONDITION_ONLINE, Device, DeviceStatus, set_condition};
use edgesync_protocol::merge::delta;
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
        now,
    );
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
