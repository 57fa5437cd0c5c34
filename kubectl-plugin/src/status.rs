//! `kubectl edgesync status`: the fleet per namespace and edge node.

use std::collections::BTreeMap;

use edgesync_crds::{
    CONDITION_IN_SYNC, CONDITION_ONLINE, CONDITION_READY, Device, EdgeNode, condition_status,
};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::cli::Output;
use crate::table::{cell, print};

#[derive(Default)]
struct Counts {
    devices: usize,
    online: usize,
    in_sync: usize,
}

/// Prints the summary of `namespace`, or of every namespace when `None`.
///
/// # Errors
/// When the API server refuses the lists.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let (nodes, devices): (Api<EdgeNode>, Api<Device>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let nodes = nodes.list(&ListParams::default()).await?.items;
    let mut counts: BTreeMap<(String, String), Counts> = BTreeMap::new();
    for d in devices.list(&ListParams::default()).await?.items {
        let c = counts
            .entry((d.namespace().unwrap_or_default(), d.spec.node_name.clone()))
            .or_default();
        let conditions = d
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        c.devices += 1;
        c.online += usize::from(condition_status(conditions, CONDITION_ONLINE) == Some("True"));
        c.in_sync += usize::from(condition_status(conditions, CONDITION_IN_SYNC) == Some("True"));
    }
    let mut rows = Vec::new();
    let mut objects = Vec::new();
    let mut seen = Vec::new();
    for n in &nodes {
        let key = (n.namespace().unwrap_or_default(), n.name_any());
        let c = counts
            .get(&key)
            .map_or((0, 0, 0), |c| (c.devices, c.online, c.in_sync));
        let s = n.status.clone().unwrap_or_default();
        let ready = condition_status(&s.conditions, CONDITION_READY)
            .unwrap_or("Unknown")
            .to_owned();
        let heartbeat = s.last_heartbeat_time.as_ref().map(|t| t.0.to_string());
        let mut row = vec![
            key.1.clone(),
            ready.clone(),
            c.0.to_string(),
            c.1.to_string(),
            c.2.to_string(),
            cell(s.pending_devices),
            cell(s.oldest_pending_age_seconds.map(|a| format!("{a}s"))),
            cell(heartbeat.clone()),
        ];
        if output == Some(Output::Wide) {
            row.push(cell(s.agent_version.clone()));
        }
        if namespace.is_none() {
            row.insert(0, key.0.clone());
        }
        rows.push(row);
        objects.push(json!({
            "namespace": key.0, "node": key.1, "ready": ready, "devices": c.0, "online": c.1,
            "inSync": c.2, "pendingDevices": s.pending_devices,
            "oldestPendingAgeSeconds": s.oldest_pending_age_seconds,
            "lastHeartbeatTime": heartbeat, "agentVersion": s.agent_version,
        }));
        seen.push(key);
    }
    // Devices naming a node that does not exist are shown too: they can never report.
    for (key, c) in counts.iter().filter(|(k, _)| !seen.contains(k)) {
        let mut row = vec![
            format!("{} (no EdgeNode)", key.1),
            "Unknown".into(),
            c.devices.to_string(),
            c.online.to_string(),
            c.in_sync.to_string(),
            cell(None::<u64>),
            cell(None::<u64>),
            cell(None::<u64>),
        ];
        if output == Some(Output::Wide) {
            row.push(cell(None::<u64>));
        }
        if namespace.is_none() {
            row.insert(0, key.0.clone());
        }
        rows.push(row);
        objects.push(
            json!({"namespace": key.0, "node": key.1, "ready": "Unknown", "devices": c.devices,
            "online": c.online, "inSync": c.in_sync, "edgeNodeMissing": true}),
        );
    }
    let mut headers = vec![
        "NODE",
        "READY",
        "DEVICES",
        "ONLINE",
        "IN-SYNC",
        "PENDING",
        "OLDEST-PENDING",
        "LAST-HEARTBEAT",
    ];
    if output == Some(Output::Wide) {
        headers.push("AGENT");
    }
    if namespace.is_none() {
        headers.insert(0, "NAMESPACE");
    }
    if rows.is_empty() && !matches!(output, Some(Output::Json | Output::Yaml)) {
        eprintln!(
            "No edge nodes found in {}.",
            namespace.map_or_else(|| "any namespace".to_owned(), |n| format!("namespace {n}"))
        );
        return Ok(());
    }
    print(output, &headers, &rows, serde_json::Value::Array(objects));
    Ok(())
}
