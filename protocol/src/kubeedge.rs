//! KubeEdge's device twin topics and payloads, so mappers and devices written for KubeEdge's
//! edge core talk to edgesync unchanged.
//!
//! Topics: `$hw/events/device/{id}/twin/update` and `.../twin/get` in, with replies on
//! `.../twin/update/result`, `.../twin/update/document`, `.../twin/update/delta` and
//! `.../twin/get/result`. `{id}` is the device name, or `{namespace}/{name}` as newer KubeEdge
//! releases publish it; replies use the form the request used.
//!
//! Twin values are strings on the wire. A `metadata.type` of `int`/`integer`,
//! `float`/`double` or `boolean` stores the value as a JSON number or boolean, so the Device
//! status holds typed values; anything else (`string`, `bytes`, none) stores the string. A
//! `deleted` type or a `null` twin removes the key. Values sent back (`actual`, `expected`,
//! `delta`) are strings again: strings as they are, anything else as its JSON text.

use serde_json::{Map, Value, json};

use crate::limits::{self, Limits};
use crate::shadow::{ShadowDocument, ShadowError};

/// The topic prefix of every device twin topic.
pub const PREFIX: &str = "$hw/events/device/";

/// The subscriptions: updates and gets, for both id forms.
pub fn subscriptions() -> Vec<String> {
    ["update", "get"]
        .iter()
        .flat_map(|op| {
            [
                format!("{PREFIX}+/twin/{op}"),
                format!("{PREFIX}+/+/twin/{op}"),
            ]
        })
        .collect()
}

/// A twin request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinOp {
    /// `twin/update`
    Update,
    /// `twin/get`
    Get,
}

/// A parsed twin topic: the device name and the id as the topic carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinTopic {
    /// The id as written in the topic (`name` or `namespace/name`), for the replies.
    pub id: String,
    /// The device name (the edgesync device id).
    pub device: String,
    /// The request.
    pub op: TwinOp,
}

/// Parses `$hw/events/device/{id}/twin/{update|get}`; `None` for any other topic.
pub fn parse_topic(topic: &str) -> Option<TwinTopic> {
    let rest = topic.strip_prefix(PREFIX)?;
    let (id, op) = if let Some(id) = rest.strip_suffix("/twin/update") {
        (id, TwinOp::Update)
    } else {
        (rest.strip_suffix("/twin/get")?, TwinOp::Get)
    };
    let device = match id.split_once('/') {
        None => id,
        Some((ns, name)) if !ns.is_empty() && !name.contains('/') => name,
        Some(_) => return None,
    };
    (!device.is_empty()).then(|| TwinTopic {
        id: id.to_owned(),
        device: device.to_owned(),
        op,
    })
}

/// A reply topic: `$hw/events/device/{id}/twin/{suffix}` (`update/result`, `get/result`...).
pub fn reply_topic(id: &str, suffix: &str) -> String {
    format!("{PREFIX}{id}/twin/{suffix}")
}

/// A parsed `twin/update`.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinUpdate {
    /// Echoed in the replies.
    pub event_id: String,
    /// Merge patch for the reported state.
    pub reported: Map<String, Value>,
}

/// Parses a `twin/update` payload into a reported-state patch, checked against the limits.
/// `expected` values in it are ignored: desired state belongs to the cloud.
///
/// # Errors
/// [`ShadowError::Malformed`] naming what is wrong (the reply's `reason`), or a limit.
pub fn parse_update(payload: &[u8], limits: &Limits) -> Result<TwinUpdate, ShadowError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(limits::LimitError::PayloadTooLarge {
            size: payload.len(),
            max: limits.max_payload_bytes,
        }
        .into());
    }
    let bad = |m: String| ShadowError::Malformed(m);
    let mut root = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(root)) => root,
        Ok(_) => return Err(bad("payload must be a JSON object".into())),
        Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
    };
    let event_id = match root.remove("event_id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("event_id must be a string".into())),
    };
    if event_id.len() > limits.max_client_token_bytes {
        return Err(bad(format!(
            "event_id longer than {} bytes",
            limits.max_client_token_bytes
        )));
    }
    let Some(Value::Object(twin)) = root.remove("twin") else {
        return Err(bad("Update twin error, key:twin does not exist".into()));
    };
    let mut reported = Map::new();
    for (key, t) in twin {
        let value = match t {
            Value::Null => Value::Null,
            Value::Object(mut t) => {
                let kind = t
                    .get("metadata")
                    .and_then(|m| m.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_ascii_lowercase();
                match t.remove("actual") {
                    None => continue, // an expected-only twin: nothing reported
                    Some(Value::Null) => Value::Null,
                    Some(Value::Object(mut actual)) => match actual.remove("value") {
                        None | Some(Value::Null) => Value::Null,
                        Some(Value::String(v)) => typed(&key, &v, &kind)?,
                        Some(_) => {
                            return Err(bad(format!(
                                "twin '{key}': actual.value must be a string"
                            )));
                        }
                    },
                    Some(_) => {
                        return Err(bad(format!("twin '{key}': actual must be an object")));
                    }
                }
            }
            _ => return Err(bad(format!("twin '{key}' must be an object or null"))),
        };
        reported.insert(key, value);
    }
    limits::check_state(&reported, limits)?;
    Ok(TwinUpdate { event_id, reported })
}

/// A twin value as stored, by its declared type.
fn typed(key: &str, v: &str, kind: &str) -> Result<Value, ShadowError> {
    let wrong = |what: &str| {
        ShadowError::Malformed(format!("twin '{key}': the value is not {what}: {v:?}"))
    };
    Ok(match kind {
        "int" | "integer" => v
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| wrong("int or integer"))?,
        "float" | "double" => v
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| wrong("float or double"))?,
        "boolean" => match v {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(wrong("boolean")),
        },
        "deleted" => Value::Null,
        _ => Value::String(v.to_owned()),
    })
}

/// A stored value as a twin value string.
pub fn wire_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn twin_value(v: &Value, ts_ms: u64) -> Value {
    json!({"value": wire_value(v), "metadata": {"timestamp": ts_ms}})
}

/// `twin/update/result` for an accepted update: the twins it carried, with their values now.
pub fn update_result(event_id: &str, patch: &Map<String, Value>, now_ms: u64) -> Value {
    let twin: Map<String, Value> = patch
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), json!({"actual": twin_value(v, now_ms)})))
        .collect();
    json!({"event_id": event_id, "timestamp": now_ms, "twin": twin})
}

/// `twin/update/result` or `twin/get/result` for a refused request (KubeEdge's error shape:
/// an HTTP-style `code` and a `reason`, no `twin`).
pub fn error_result(event_id: &str, code: u16, reason: &str, now_ms: u64) -> Value {
    json!({"event_id": event_id, "timestamp": now_ms, "code": code, "reason": reason})
}

/// The `event_id` of a request, whatever else it holds, to echo in its reply: empty when
/// there is none, or when it is longer than `limits.max_client_token_bytes` (a reply never
/// echoes unbounded input; such a request is refused anyway).
pub fn event_id(payload: &[u8], limits: &Limits) -> String {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("event_id")?.as_str().map(str::to_owned))
        .filter(|id| id.len() <= limits.max_client_token_bytes)
        .unwrap_or_default()
}

/// `twin/update/document`: each twin the update touched, before and after (`null` when
/// absent).
pub fn document(
    event_id: &str,
    patch: &Map<String, Value>,
    previous: &ShadowDocument,
    current: &ShadowDocument,
    now_ms: u64,
) -> Value {
    let side = |doc: &ShadowDocument, key: &str| match doc.state.reported.get(key) {
        Some(v) => json!({"actual": twin_value(v, doc.timestamp * 1000)}),
        None => Value::Null,
    };
    let twin: Map<String, Value> = patch
        .keys()
        .map(|k| {
            (
                k.clone(),
                json!({"last": side(previous, k), "current": side(current, k)}),
            )
        })
        .collect();
    json!({"event_id": event_id, "timestamp": now_ms, "twin": twin})
}

/// The twins of a document: `expected` from desired, `actual` from reported, top-level keys.
fn twins(doc: &ShadowDocument, keys: impl Iterator<Item = String>) -> Map<String, Value> {
    let ts = doc.timestamp * 1000;
    keys.map(|k| {
        let mut t = Map::new();
        if let Some(v) = doc.state.desired.get(&k) {
            t.insert("expected".into(), twin_value(v, ts));
        }
        if let Some(v) = doc.state.reported.get(&k) {
            t.insert("actual".into(), twin_value(v, ts));
        }
        (k, Value::Object(t))
    })
    .collect()
}

/// `twin/get/result`: every twin of the document.
pub fn get_result(event_id: &str, doc: Option<&ShadowDocument>, now_ms: u64) -> Value {
    let twin = doc.map_or_else(Map::new, |d| {
        let mut keys: Vec<String> = d.state.desired.keys().cloned().collect();
        keys.extend(
            d.state
                .reported
                .keys()
                .filter(|k| !d.state.desired.contains_key(*k))
                .cloned(),
        );
        twins(d, keys.into_iter())
    });
    json!({"event_id": event_id, "timestamp": now_ms, "twin": twin})
}

/// `twin/update/delta` when desired and reported differ: the twins with an expected value
/// that the device does not report yet, and `delta` mapping each to its expected string.
/// `None` when there is no difference. Its `event_id` names the device and shadow version.
pub fn delta(device: &str, doc: &ShadowDocument, now_ms: u64) -> Option<Value> {
    let delta = doc.delta();
    if delta.is_empty() {
        return None;
    }
    let strings: Map<String, Value> = delta
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(wire_value(v))))
        .collect();
    Some(json!({
        "event_id": format!("{device}-{}", doc.version),
        "timestamp": now_ms,
        "twin": twins(doc, delta.keys().cloned()),
        "delta": strings,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_never_echoes_an_oversized_event_id() {
        let limits = Limits::default();
        let long = "e".repeat(900_000);
        let payload = format!(r#"{{"event_id":"{long}","twin":{{}}}}"#);
        assert_eq!(event_id(payload.as_bytes(), &limits), "");
        assert_eq!(event_id(br#"{"event_id":"e1"}"#, &limits), "e1");
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// Valid requests to mutate, so the generator reaches past the first byte.
        const SEEDS: [&str; 3] = [
            r#"{"event_id":"e1","timestamp":1,"twin":{"temp":{"actual":{"value":"21"},"metadata":{"type":"int"}}}}"#,
            r#"{"event_id":"e2","twin":{"mode":{"actual":{"value":"auto"}}}}"#,
            r#"{"event_id":"e3"}"#,
        ];

        proptest! {
            /// Arbitrary and mutated payloads and topics: never a panic, and a refusal's
            /// message and echoed event id stay short whatever the input's size.
            #[test]
            fn fuzz_twin_decoders(
                payload in crate::fuzzing::bytes(SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect()),
                topic in "\\$hw/events/device/[a-z/+#]{0,24}/twin/(update|get|[a-z]{0,6})",
            ) {
                let limits = Limits::default();
                let _ = parse_topic(&topic);
                prop_assert!(event_id(&payload, &limits).len() <= limits.max_client_token_bytes);
                if let Err(e) = parse_update(&payload, &limits) {
                    prop_assert!(e.to_string().len() <= 1024, "{}", e);
                }
            }
        }
    }

    #[test]
    fn topics_in_both_id_forms() {
        let t = parse_topic("$hw/events/device/press-1/twin/update").unwrap();
        assert_eq!(
            (t.id.as_str(), t.device.as_str(), t.op),
            ("press-1", "press-1", TwinOp::Update)
        );
        let t = parse_topic("$hw/events/device/plant/press-1/twin/get").unwrap();
        assert_eq!(
            (t.id.as_str(), t.device.as_str(), t.op),
            ("plant/press-1", "press-1", TwinOp::Get)
        );
        for bad in [
            "$hw/events/device/press-1/twin/update/result",
            "$hw/events/device//twin/update",
            "$hw/events/device/a/b/c/twin/update",
            "$hw/events/device/press-1/state/update",
        ] {
            assert_eq!(parse_topic(bad), None, "{bad}");
        }
        assert_eq!(
            reply_topic("plant/press-1", "get/result"),
            "$hw/events/device/plant/press-1/twin/get/result"
        );
        assert_eq!(subscriptions().len(), 4);
    }

    #[test]
    fn updates_store_typed_values() {
        let payload = br#"{"event_id":"e1","timestamp":1,"twin":{
            "temperature":{"actual":{"value":"23.5","metadata":{"timestamp":1}},"metadata":{"type":"float"}},
            "count":{"actual":{"value":"7"},"metadata":{"type":"int"}},
            "on":{"actual":{"value":"true"},"metadata":{"type":"boolean"}},
            "mode":{"actual":{"value":"auto"},"expected":{"value":"manual"},"optional":true},
            "old":null,
            "onlyExpected":{"expected":{"value":"1"}}}}"#;
        let u = parse_update(payload, &Limits::default()).unwrap();
        assert_eq!(u.event_id, "e1");
        assert_eq!(
            Value::Object(u.reported),
            json!({"temperature": 23.5, "count": 7, "on": true, "mode": "auto", "old": null})
        );
    }

    #[test]
    fn bad_updates_say_what_is_wrong() {
        let limits = Limits::default();
        let reason = |p: &[u8]| parse_update(p, &limits).unwrap_err().to_string();
        assert!(reason(b"{").contains("invalid JSON"));
        assert!(reason(br#"{"event_id":"x"}"#).contains("key:twin does not exist"));
        assert!(reason(br#"{"twin":{"t":{"actual":{"value":23}}}}"#).contains("must be a string"));
        assert!(
            reason(br#"{"twin":{"t":{"actual":{"value":"hot"},"metadata":{"type":"int"}}}}"#)
                .contains("not int")
        );
        assert!(
            reason(br#"{"twin":{"t":{"actual":{"value":"1"},"metadata":{"type":"boolean"}}}}"#)
                .contains("not boolean")
        );
        let e = parse_update(br#"{"twin":{"$t":{"actual":{"value":"1"}}}}"#, &limits).unwrap_err();
        assert_eq!(e.code(), 400, "{e}");
        let e = parse_update(b"[]", &limits).unwrap_err();
        let r = error_result("x", e.code(), &e.to_string(), 5);
        assert_eq!(r["code"], 400);
        assert_eq!(r["event_id"], "x");
        assert!(r.get("twin").is_none());
    }

    #[test]
    fn replies_carry_strings() {
        let mut doc = ShadowDocument::default();
        doc.state.desired = json!({"speed": 1500, "mode": "auto"})
            .as_object()
            .unwrap()
            .clone();
        doc.state.reported = json!({"speed": 900, "mode": "auto", "t": 1.5})
            .as_object()
            .unwrap()
            .clone();
        doc.version = 4;
        doc.timestamp = 10;
        let d = delta("press-1", &doc, 99).unwrap();
        assert_eq!(d["delta"], json!({"speed": "1500"}));
        assert_eq!(d["event_id"], "press-1-4");
        assert_eq!(d["twin"]["speed"]["expected"]["value"], "1500");
        assert_eq!(d["twin"]["speed"]["actual"]["value"], "900");
        let g = get_result("g1", Some(&doc), 99);
        assert_eq!(g["twin"].as_object().unwrap().len(), 3);
        assert_eq!(g["twin"]["t"]["actual"]["value"], "1.5");
        assert!(g["twin"]["t"].get("expected").is_none());
        assert_eq!(get_result("g2", None, 1)["twin"], json!({}));
        let r = update_result("e", json!({"t": 2.5, "gone": null}).as_object().unwrap(), 7);
        assert_eq!(
            r["twin"],
            json!({"t": {"actual": {"value": "2.5", "metadata": {"timestamp": 7}}}})
        );
        doc.state.desired.clear();
        assert!(delta("press-1", &doc, 1).is_none());
    }
}
