//! The shapes the `devicestates` API answers in, as the API server's own: objects, lists,
//! server-side Tables (what `kubectl get` prints), watch events, discovery and errors. Pure:
//! callers pass the time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIResource, APIResourceList, ListMeta, ObjectMeta, Status,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::store::{DeviceState, Key, Page};

/// The API group.
pub const GROUP: &str = "live.edgesync.io";
/// Its only version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every object.
pub const API_VERSION: &str = "live.edgesync.io/v1alpha1";
/// The resource.
pub const RESOURCE: &str = "devicestates";
/// Its kind.
pub const KIND: &str = "DeviceState";

/// The object for one device, at the resource version it changed at.
pub fn object(key: &Key, state: &DeviceState, resource_version: impl std::fmt::Display) -> Value {
    let metadata = ObjectMeta {
        name: Some(key.1.clone()),
        namespace: Some(key.0.clone()),
        labels: (!state.labels.is_empty()).then(|| (*state.labels).clone()),
        resource_version: Some(resource_version.to_string()),
        ..ObjectMeta::default()
    };
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "node": &*state.node,
        "reported": state.reported,
        "version": {
            "epochGeneration": state.stamp.generation,
            "version": state.stamp.version,
        },
        "reportedAt": state.reported_at,
        "observedDesiredGeneration": state.observed_desired_generation,
        "receivedAt": rfc3339(state.received_at_ms),
        "online": state.online,
        "inSync": state.in_sync,
    })
}

/// A list page as `DeviceStateList`.
pub fn list<R: std::fmt::Display>(page: &Page<R>) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "DeviceStateList",
        "metadata": list_meta(page),
        "items": page
            .items
            .iter()
            .map(|(key, state, rv)| object(key, state, rv))
            .collect::<Vec<_>>(),
    })
}

fn list_meta<R: std::fmt::Display>(page: &Page<R>) -> ListMeta {
    ListMeta {
        resource_version: Some(page.resource_version.to_string()),
        continue_: page.continue_token.clone(),
        ..ListMeta::default()
    }
}

/// A list page as the Table `kubectl get` asks for (`Accept: ...;as=Table;g=meta.k8s.io`):
/// the Device's printer columns, the age of the state instead of the object's, and each
/// row's object as the metadata kubectl needs (or whole, with `include_object`).
pub fn table<R: std::fmt::Display>(page: &Page<R>, now_ms: i64, include_object: bool) -> Value {
    let column = |name: &str, kind: &str, priority: u8, description: &str| {
        json!({"name": name, "type": kind, "format": if name == "Name" { "name" } else { "" },
               "priority": priority, "description": description})
    };
    let rows: Vec<Value> = page
        .items
        .iter()
        .map(|(key, state, rv)| {
            let condition = |v: Option<bool>| match v {
                Some(true) => "True",
                Some(false) => "False",
                None => "Unknown",
            };
            let whole = object(key, state, rv);
            let object = if include_object {
                whole
            } else {
                json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadata",
                    "metadata": whole["metadata"],
                })
            };
            json!({
                "cells": [
                    key.1,
                    &*state.node,
                    condition(state.online),
                    condition(state.in_sync),
                    state.stamp.version,
                    age(now_ms - state.received_at_ms),
                ],
                "object": object,
            })
        })
        .collect();
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "Table",
        "metadata": list_meta(page),
        "columnDefinitions": [
            column("Name", "string", 0, "The Device's name."),
            column("Node", "string", 0, "The EdgeNode that reports it."),
            column("Online", "string", 0, "Whether the device is connected, as its agent said."),
            column("In-Sync", "string", 0, "Whether reported matches desired."),
            column("Version", "integer", 1, "Shadow version of the reported state."),
            column("State-Age", "string", 0, "Time since the controller received this state."),
        ],
        "rows": rows,
    })
}

/// A watch event line (`ADDED`, `MODIFIED`, `DELETED` with the object, `BOOKMARK` with its
/// resource version only), as the API server streams them.
pub fn watch_event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

/// A bookmark at `resource_version`: a client resuming from it misses nothing.
pub fn bookmark(resource_version: impl std::fmt::Display) -> Value {
    watch_event(
        "BOOKMARK",
        json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"resourceVersion": resource_version.to_string()},
        }),
    )
}

/// `GET /apis/live.edgesync.io/v1alpha1`: the resource and its verbs, for discovery.
pub fn resources() -> APIResourceList {
    APIResourceList {
        group_version: API_VERSION.into(),
        resources: vec![APIResource {
            name: RESOURCE.into(),
            singular_name: "devicestate".into(),
            namespaced: true,
            kind: KIND.into(),
            verbs: ["get", "list", "watch"].map(String::from).to_vec(),
            short_names: Some(vec!["ds".into()]),
            categories: Some(vec!["edgesync".into()]),
            ..APIResource::default()
        }],
    }
}

/// An error as the API server answers one (`kind: Status`): `reason` is its
/// `StatusReason` (`NotFound`, `Expired` for 410, `BadRequest`, `Forbidden`...).
pub fn status(code: u16, reason: &str, message: &str) -> Status {
    Status {
        code: Some(i32::from(code)),
        message: Some(message.to_owned()),
        reason: Some(reason.to_owned()),
        status: Some("Failure".into()),
        ..Status::default()
    }
}

/// ms since the epoch as RFC 3339 (UTC, to the millisecond).
fn rfc3339(ms: i64) -> String {
    Timestamp::from_millisecond(ms).map_or_else(|_| String::new(), |t| t.to_string())
}

/// An age as kubectl prints one: `45s`, `12m`, `5h`, `3d`.
fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7_200 => format!("{}m", s / 60),
        7_200..172_800 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::Stamp;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn page() -> Page {
        let state = DeviceState {
            labels: Arc::new(BTreeMap::from([("line".to_owned(), "a".to_owned())])),
            node: "edge-1".into(),
            reported: crate::doc::Doc::of(json!({"speed": 3}).as_object().unwrap()),
            stamp: Stamp::new(2, 41),
            reported_at: "2026-12-07T08:00:00Z".into(),
            observed_desired_generation: 1,
            received_at_ms: 1_796_630_400_250,
            online: Some(true),
            in_sync: None,
        };
        Page {
            items: vec![(
                Arc::new(("plant-a".to_owned(), "press-1".to_owned())),
                Arc::new(state),
                17,
            )],
            resource_version: 20,
            continue_token: Some("plant-a/press-1".into()),
        }
    }

    #[test]
    fn objects_and_lists_look_like_the_api_servers() {
        let l = list(&page());
        assert_eq!(l["kind"], "DeviceStateList");
        assert_eq!(l["metadata"]["resourceVersion"], "20");
        assert_eq!(l["metadata"]["continue"], "plant-a/press-1");
        let o = &l["items"][0];
        assert_eq!(o["apiVersion"], API_VERSION);
        assert_eq!(o["metadata"]["name"], "press-1");
        assert_eq!(o["metadata"]["namespace"], "plant-a");
        assert_eq!(o["metadata"]["labels"]["line"], "a");
        assert_eq!(o["metadata"]["resourceVersion"], "17");
        assert_eq!(o["version"], json!({"epochGeneration": 2, "version": 41}));
        assert_eq!(o["receivedAt"], "2026-12-07T08:00:00.25Z");
        assert_eq!(o["reported"]["speed"], 3);
    }

    #[test]
    fn tables_carry_the_printer_columns_and_partial_objects() {
        let p = page();
        let t = table(&p, p.items[0].1.received_at_ms + 125_000, false);
        assert_eq!(t["kind"], "Table");
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            names,
            ["Name", "Node", "Online", "In-Sync", "Version", "State-Age"]
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["press-1", "edge-1", "True", "Unknown", 41, "2m"])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let whole = table(&p, 0, true);
        assert_eq!(whole["rows"][0]["object"]["kind"], KIND);
    }

    #[test]
    fn events_discovery_and_errors() {
        assert_eq!(bookmark(9)["type"], "BOOKMARK");
        assert_eq!(bookmark(9)["object"]["metadata"]["resourceVersion"], "9");
        let r = resources();
        assert_eq!(r.resources[0].verbs, ["get", "list", "watch"]);
        let gone = serde_json::to_value(status(410, "Expired", "too old")).unwrap();
        assert_eq!(gone["code"], 410);
        assert_eq!(gone["reason"], "Expired");
        for (ms, text) in [
            (0, "0s"),
            (119_999, "119s"),
            (120_000, "2m"),
            (7_200_000, "2h"),
        ] {
            assert_eq!(age(ms), text);
        }
        assert_eq!(age(3 * 86_400_000), "3d");
    }
}
