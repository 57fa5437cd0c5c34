//! Helpers for standard Kubernetes `Condition`s: set one without churning
//! `lastTransitionTime` when its status did not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The status (`"True"`, `"False"`, `"Unknown"`) of condition `type_`, if present.
pub fn condition_status<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

/// Sets a condition. `lastTransitionTime` moves only when the status changes, as API
/// conventions require; reason, message and observed generation are always updated.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    is_true: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if is_true { "True" } else { "False" };
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let changed = existing.status != status
            || existing.reason != reason
            || existing.message != message
            || existing.observed_generation != observed_generation;
        if existing.status != status {
            existing.last_transition_time = now;
        }
        existing.status = status.to_owned();
        existing.reason = reason.to_owned();
        existing.message = message.to_owned();
        existing.observed_generation = observed_generation;
        changed
    } else {
        conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation,
            last_transition_time: now,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Online",
            true,
            "Heartbeat",
            "ok",
            None,
            t(10)
        ));
        assert!(!set_condition(
            &mut c,
            "Online",
            true,
            "Heartbeat",
            "ok",
            None,
            t(20)
        ));
        assert_eq!(c[0].last_transition_time, t(10));
        assert!(set_condition(
            &mut c,
            "Online",
            false,
            "NoHeartbeat",
            "silent",
            None,
            t(30)
        ));
        assert_eq!(c[0].last_transition_time, t(30));
        assert_eq!(condition_status(&c, "Online"), Some("False"));
        assert_eq!(condition_status(&c, "InSync"), None);
    }
}
