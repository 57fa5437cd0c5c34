//! The controller with the identity `deploy/` gives it: the `edgesync-controller`
//! ServiceAccount, allowed only what `deploy/base/rbac.yaml` grants, its writes classified by
//! `deploy/base/flowcontrol.yaml`. Every other test runs the controller as the harness's
//! admin, which RBAC never refuses and API Priority and Fairness exempts; this one proves the
//! manifests fit what the controller really does, against a real API server: every kind of
//! request it makes is allowed, and its writes land in the priority level meant for them.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, DesiredStream, batch, create_devices, create_node, post_batch, report,
};
use edgesync_e2e::wait;
use edgesync_protocol::wire::DesiredEvent;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

/// Requests the API server dispatched in the `edgesync-controller` priority level through the
/// FlowSchema of the same name.
fn dispatched_in_own_level(cp: &ControlPlane) -> f64 {
    cp.kubectl_ok(&["get", "--raw", "/metrics"])
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_flowcontrol_dispatched_requests_total{")
                && l.contains("flow_schema=\"edgesync-controller\"")
                && l.contains("priority_level=\"edgesync-controller\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// The reasons of the Events about `object` (`kind/name`) in `ns`.
fn event_reasons(cp: &ControlPlane, ns: &str, name: &str) -> String {
    cp.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "events.events.k8s.io",
        "--field-selector",
        &format!("regarding.name={name}"),
        "-o",
        "jsonpath={.items[*].reason}",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_controller_is_allowed_all_it_does_and_writes_in_its_own_priority_level() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("deployed");
    create_node(cp, &ns.name, "edge-a", "ta", "  autoRegisterDevices: true");
    create_node(cp, &ns.name, "edge-b", "tb", "");
    create_devices(cp, &ns.name, "edge-b", &["b-owned".to_owned()]);
    // The deployed Role allows Leases in the controller's own namespace only.
    let lease = format!("deployed-{}", ns.name);
    let c = Controller::start_deployed(
        cp,
        &[
            "--lease-name",
            &lease,
            "--lease-namespace",
            "edgesync-system",
            "--offline-after-seconds",
            "3",
        ],
    );
    let url = c.url();
    let before = dispatched_in_own_level(cp);

    // Node tokens (Secret get), auto-registration (Device create), a status write, a
    // rejection, and their Events.
    let a = post_batch(
        &url,
        &ns.name,
        "edge-a",
        "ta",
        &batch(
            1,
            vec![
                report("a-new", 1, json!({"speed": 3})),
                report("b-owned", 1, json!({"speed": 4})),
            ],
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.result(0), a.result(1)),
        (200, "accepted", "rejected"),
        "{a:?}"
    );
    wait::until("a-new's status at version 1", DEADLINE, || async {
        let v = cp.kubectl_ok(&[
            "-n",
            &ns.name,
            "get",
            "device",
            "a-new",
            "-o",
            "jsonpath={.status.reportedVersion}",
        ]);
        (v.trim() == "1").then_some(())
    })
    .await;

    // The desired stream (Device list and watch) carries an operator's edit.
    let mut stream = DesiredStream::open(&url, &ns.name, "edge-a", "ta", None)
        .await
        .unwrap();
    loop {
        if matches!(
            stream.next_change(DEADLINE).await,
            DesiredEvent::SnapshotComplete { .. }
        ) {
            break;
        }
    }
    cp.patch_device(&ns.name, "a-new", r#"{"spec":{"desired":{"speed":5}}}"#);
    let change = stream.next_change(DEADLINE).await;
    assert!(
        matches!(&change, DesiredEvent::Desired { device, .. } if device == "a-new"),
        "{change:?}"
    );
    drop(stream);

    // Liveness: the leader (a Lease in edgesync-system) writes edge-a's status Ready, then
    // Offline once it stays silent.
    wait::until(
        "edge-a's NodeReady and NodeOffline events",
        DEADLINE,
        || async {
            let reasons = event_reasons(cp, &ns.name, "edge-a");
            (reasons.contains("NodeReady") && reasons.contains("NodeOffline")).then_some(())
        },
    )
    .await;
    let reasons = event_reasons(cp, &ns.name, "a-new");
    assert!(reasons.contains("Registered"), "{reasons}");
    let reasons = event_reasons(cp, &ns.name, "b-owned");
    assert!(reasons.contains("ReportRejected"), "{reasons}");
    assert_eq!(c.metric("edgesync_controller_leader").await, 1.0);

    // Nothing it tried was refused.
    assert_eq!(
        c.metric("edgesync_controller_status_write_errors_total")
            .await,
        0.0
    );
    assert_eq!(
        c.metric("edgesync_controller_events_dropped_total").await,
        0.0
    );
    let log = std::fs::read_to_string(c.process.log_path()).unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
        .collect();
    assert!(
        refused.is_empty(),
        "the deployed RBAC refused the controller:\n{}",
        refused.join("\n")
    );

    // Its writes went through its own priority level, not an exempt or shared one.
    let after = dispatched_in_own_level(cp);
    assert!(
        after > before,
        "no request dispatched in the edgesync-controller priority level ({before} -> {after})"
    );
}
