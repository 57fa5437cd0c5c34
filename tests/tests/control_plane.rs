//! The real Kubernetes control plane from the harness, exercised the way operators and the
//! controller use it: kubectl with the committed CRDs and examples, and kube-rs.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use edgesync_crds::{Device, DeviceStatus};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::{wait, workspace_root};
use futures_util::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

fn examples(name: &str) -> String {
    workspace_root()
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn control_plane_starts_with_crds_established() {
    let cp = ControlPlane::shared();
    let out = cp.kubectl_ok(&[
        "get",
        "crd",
        "devices.edgesync.io",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
    ]);
    assert_eq!(out, "True");
    let version = cp.kubectl_ok(&["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&version).unwrap();
    let pinned = include_str!("../../hack/versions.env")
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .unwrap();
    assert_eq!(v["serverVersion"]["gitVersion"], format!("v{pinned}"));
    assert_eq!(v["clientVersion"]["gitVersion"], format!("v{pinned}"));
    eprintln!("control plane start time: {:.2?}", cp.started_in());
}

#[test]
fn kubectl_shows_printer_columns_for_examples() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("printer-columns");
    cp.kubectl_ok(&[
        "apply",
        "-n",
        &ns.name,
        "-f",
        &examples("edgenode.yaml"),
        "-f",
        &examples("devices.yaml"),
        "-f",
        &examples("devicerollout.yaml"),
    ]);

    let table = cp.kubectl_ok(&["get", "devices", "-n", &ns.name]);
    let header = table.lines().next().unwrap();
    for col in ["NAME", "NODE", "ONLINE", "IN-SYNC", "LAST-REPORT", "AGE"] {
        assert!(header.contains(col), "missing {col} in: {header}");
    }
    assert!(
        !header.contains("VERSION"),
        "VERSION is a wide column: {header}"
    );
    assert!(
        table.contains("press-1") && table.contains("oven-3"),
        "{table}"
    );
    assert!(table.contains("edge-1"), "{table}");

    let wide = cp.kubectl_ok(&["get", "dev", "-o", "wide", "-n", &ns.name]);
    assert!(wide.lines().next().unwrap().contains("VERSION"), "{wide}");

    // The example rollout as the API server validates it (no controller runs here).
    let rollouts = cp.kubectl_ok(&["get", "dro", "-n", &ns.name]);
    let header = rollouts.lines().next().unwrap();
    for col in [
        "NAME", "PHASE", "STEP", "UPDATED", "IN-SYNC", "FAILED", "AGE",
    ] {
        assert!(header.contains(col), "missing {col} in: {header}");
    }
    assert!(rollouts.contains("line-a-speed"), "{rollouts}");

    let nodes = cp.kubectl_ok(&["get", "en", "-n", &ns.name]);
    let header = nodes.lines().next().unwrap();
    for col in ["NAME", "READY", "PENDING", "LAST-HEARTBEAT", "AGE"] {
        assert!(header.contains(col), "missing {col} in: {header}");
    }
}

#[test]
fn apiserver_rejects_device_without_node_name_and_bad_limits() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("validation");
    let out = cp.kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        "apiVersion: edgesync.io/v1alpha1\nkind: Device\nmetadata: {name: orphan}\nspec:\n  desired: {a: 1}\n",
    );
    assert!(
        !out.status.success(),
        "a Device without spec.nodeName must be rejected"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.nodeName: Required value"), "{stderr}");

    let out = cp.kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        "apiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata: {name: edge-x}\nspec:\n  tokenSecretRef: {name: s}\n  limits: {reportsPerSecond: 0}\n",
    );
    assert!(!out.status.success(), "reportsPerSecond 0 must be rejected");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.limits.reportsPerSecond"), "{stderr}");

    // Nothing was created.
    let list = cp.kubectl_ok(&["get", "devices,edgenodes", "-n", &ns.name, "-o", "name"]);
    assert_eq!(list.trim(), "");
}

#[test]
fn status_patch_keeps_generation_and_desired_is_kept_unpruned() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("status-generation");
    let desired = json!({
        "speed": 1200,
        "recipe": {"steps": [{"t": 10, "temp": 180.5}, {"t": 20, "temp": null}], "name": "bake"},
        "flags": [true, false],
        "deep": {"a": {"b": {"c": {"d": "e"}}}}
    });
    let device = json!({
        "apiVersion": "edgesync.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": "press-9"},
        "spec": {"nodeName": "edge-1", "desired": desired}
    });
    cp.kubectl_stdin(&["apply", "-n", &ns.name, "-f", "-"], &device.to_string());

    let get = |path: &str| {
        cp.kubectl_ok(&[
            "get",
            "device",
            "press-9",
            "-n",
            &ns.name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    assert_eq!(get("{.metadata.generation}"), "1");
    let stored: serde_json::Value = serde_json::from_str(&get("{.spec.desired}")).unwrap();
    // kubectl apply drops null members (it treats them as "delete"), which is also what
    // edgesync makes of a null desired field: no opinion. Everything else must survive unpruned.
    let mut expected = desired.clone();
    expected["recipe"]["steps"][1]
        .as_object_mut()
        .unwrap()
        .remove("temp");
    assert_eq!(
        stored, expected,
        "free-form spec.desired must survive unpruned"
    );

    cp.kubectl_ok(&[
        "patch",
        "device",
        "press-9",
        "-n",
        &ns.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"reportedVersion":3,"reported":{"speed":1100,"x":{"y":[1]}}}}"#,
    ]);
    assert_eq!(get("{.status.reportedVersion}"), "3");
    assert_eq!(
        get("{.metadata.generation}"),
        "1",
        "status writes must not bump generation"
    );
    let reported: serde_json::Value = serde_json::from_str(&get("{.status.reported}")).unwrap();
    assert_eq!(reported, json!({"speed":1100,"x":{"y":[1]}}));

    // A spec change does bump it: that is the desired version agents acknowledge.
    cp.kubectl_ok(&[
        "patch",
        "device",
        "press-9",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"spec":{"desired":{"speed":1300}}}"#,
    ]);
    assert_eq!(get("{.metadata.generation}"), "2");
}

#[tokio::test]
async fn kube_rs_create_patch_status_and_watch() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("kube-rs");
    let client = cp.client().await;
    let devices: Api<Device> = Api::namespaced(client, &ns.name);

    let mut device: Device = serde_json::from_value(json!({
        "apiVersion": "edgesync.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": "sensor-1"},
        "spec": {"nodeName": "edge-1", "desired": {"rate": 5}}
    }))
    .unwrap();
    device = devices
        .create(&PostParams::default(), &device)
        .await
        .unwrap();
    assert_eq!(device.metadata.generation, Some(1));

    let status = DeviceStatus {
        reported: Some(json!({"rate": 5}).as_object().unwrap().clone()),
        reported_version: Some(7),
        ..Default::default()
    };
    let patched = devices
        .patch_status(
            "sensor-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().reported_version, Some(7));
    assert_eq!(patched.metadata.generation, Some(1));

    // Watch from now on, then change desired: the event carries the new generation.
    let mut stream = watcher(devices.clone(), watcher::Config::default()).boxed();
    let init_done = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = stream.next().await {
            if matches!(ev, Ok(watcher::Event::InitDone)) {
                return true;
            }
        }
        false
    })
    .await
    .expect("watch initial list within 30 s");
    assert!(init_done);

    devices
        .patch(
            "sensor-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"desired": {"rate": 10}}})),
        )
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(d)) = ev
                && d.metadata.generation == Some(2)
            {
                return d;
            }
        }
        panic!("watch stream ended");
    })
    .await
    .expect("watch event for the desired change within 30 s");
    assert_eq!(seen.spec.desired.unwrap()["rate"], 10);

    // And a plain poll agrees, with the status untouched by the spec change.
    let got = wait::until(
        "status to keep reportedVersion 7",
        Duration::from_secs(10),
        || {
            let devices = devices.clone();
            async move { devices.get("sensor-1").await.ok() }
        },
    )
    .await;
    assert_eq!(got.status.unwrap().reported_version, Some(7));
}

/// The API server runs with a front proxy, as clusters with API aggregation do, and the live
/// state's authentication reads its settings from the ConfigMap every aggregated server
/// reads: the CA, the one allowed proxy name and the X-Remote-* headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_servers_learn_the_front_proxy_from_the_cluster() {
    use edgesync_controller::live::authn::RequestHeader;
    use k8s_openapi::api::core::v1::ConfigMap;
    let cp = ControlPlane::shared();
    let maps: Api<ConfigMap> = Api::namespaced(cp.client().await, "kube-system");
    let auth = wait::until(
        "kube-apiserver publishes extension-apiserver-authentication",
        Duration::from_secs(30),
        || async {
            maps.get_opt("extension-apiserver-authentication")
                .await
                .ok()
                .flatten()
                .and_then(|m| m.data)
                .filter(|d| d.contains_key("requestheader-client-ca-file"))
        },
    )
    .await;
    let rh = RequestHeader::from_configmap(&auth).unwrap();
    assert!(
        rh.client_ca_pem.contains("BEGIN CERTIFICATE"),
        "{}",
        rh.client_ca_pem
    );
    assert_eq!(
        rh.allowed_names,
        [edgesync_e2e::cluster::FRONT_PROXY_CLIENT]
    );
    assert_eq!(rh.username_headers, ["X-Remote-User"]);
    assert_eq!(rh.group_headers, ["X-Remote-Group"]);
    assert_eq!(rh.extra_prefixes, ["X-Remote-Extra-"]);
}
