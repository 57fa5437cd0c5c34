//! One Device's state for people: desired, reported and delta flattened to dotted paths, and
//! the conditions that say whether it is online and in sync.

use edgesync_crds::{CONDITION_IN_SYNC, CONDITION_ONLINE, Device, condition_status};
use edgesync_protocol::merge::delta;
use serde_json::{Map, Value, json};

/// `(path, value)` for every leaf of `obj`; arrays are leaves, shown as JSON.
pub fn flatten(obj: &Map<String, Value>) -> Vec<(String, String)> {
    fn walk(obj: &Map<String, Value>, prefix: &str, out: &mut Vec<(String, String)>) {
        for (k, v) in obj {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(inner) if !inner.is_empty() => walk(inner, &path, out),
                Value::String(s) => out.push((path, s.clone())),
                other => out.push((path, other.to_string())),
            }
        }
    }
    let mut out = Vec::new();
    walk(obj, "", &mut out);
    out
}

/// The Device's desired, reported and delta maps.
pub fn state(d: &Device) -> (Map<String, Value>, Map<String, Value>, Map<String, Value>) {
    let desired = d.spec.desired.clone().unwrap_or_default();
    let reported = d
        .status
        .as_ref()
        .and_then(|s| s.reported.clone())
        .unwrap_or_default();
    let delta = delta(&desired, &reported);
    (desired, reported, delta)
}

/// `Online` and `InSync` statuses (`Unknown` when absent).
pub fn conditions(d: &Device) -> (String, String) {
    let c = d
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    (
        condition_status(c, CONDITION_ONLINE)
            .unwrap_or("Unknown")
            .to_owned(),
        condition_status(c, CONDITION_IN_SYNC)
            .unwrap_or("Unknown")
            .to_owned(),
    )
}

/// The whole view as one JSON object (`-o json|yaml`).
pub fn view(d: &Device) -> Value {
    let (desired, reported, delta) = state(d);
    let (online, in_sync) = conditions(d);
    let s = d.status.clone().unwrap_or_default();
    json!({
        "name": d.metadata.name, "namespace": d.metadata.namespace, "node": d.spec.node_name,
        "online": online, "inSync": in_sync, "generation": d.metadata.generation,
        "observedDesiredGeneration": s.observed_desired_generation,
        "reportedVersion": s.reported_version,
        "lastReportTime": s.last_report_time.map(|t| t.0.to_string()),
        "desired": desired, "reported": reported, "delta": delta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_by_dotted_path() {
        let v = json!({"motor": {"speed": 5, "mode": "auto"}, "tags": [1, 2], "on": true});
        assert_eq!(
            flatten(v.as_object().unwrap()),
            vec![
                ("motor.mode".to_owned(), "auto".to_owned()),
                ("motor.speed".to_owned(), "5".to_owned()),
                ("on".to_owned(), "true".to_owned()),
                ("tags".to_owned(), "[1,2]".to_owned()),
            ]
        );
    }
}
