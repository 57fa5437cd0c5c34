//! Kubernetes Events an operator sees in `kubectl describe`, against a real API server: a
//! device registered by its node, a report for another node's device, a node going offline
//! and coming back, and a device out of sync for longer than the configured time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, batch, create_devices, create_node, post_batch, report,
};
use edgesync_e2e::wait;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

/// `kubectl describe` of `kind/name` once its Events section shows `reason`.
async fn described_with(cp: &ControlPlane, ns: &str, object: &str, reason: &str) -> String {
    wait::until(
        &format!("kubectl describe {object} shows a {reason} event"),
        DEADLINE,
        || async {
            let out = cp.kubectl_ok(&["-n", ns, "describe", object]);
            let events = out.split("Events:").nth(1)?.to_owned();
            events.contains(reason).then_some(events)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_events_for_registration_rejections_liveness_and_sync() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("events");
    create_node(cp, &ns.name, "edge-a", "ta", "  autoRegisterDevices: true");
    create_node(cp, &ns.name, "edge-b", "tb", "");
    create_devices(cp, &ns.name, "edge-b", &["b-owned".to_owned()]);
    let c = Controller::start(
        cp,
        &[
            "--lease-name",
            "events-test",
            "--lease-namespace",
            &ns.name,
            "--offline-after-seconds",
            "3",
            "--out-of-sync-event-seconds",
            "1",
        ],
    );
    let url = c.url();

    // edge-a reports a new device (registered) and edge-b's device (rejected).
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
    let events = described_with(cp, &ns.name, "device/a-new", "Registered").await;
    assert!(events.contains("edge-a"), "{events}");
    let events = described_with(cp, &ns.name, "device/b-owned", "ReportRejected").await;
    assert!(events.contains("belongs to node edge-b"), "{events}");
    described_with(cp, &ns.name, "edgenode/edge-a", "ReportsRejected").await;
    described_with(cp, &ns.name, "edgenode/edge-a", "NodeReady").await;

    // A desired value the device does not report: InSync=False, then OutOfSync after 1 s.
    cp.patch_device(&ns.name, "a-new", r#"{"spec":{"desired":{"speed":5}}}"#);
    let events = described_with(cp, &ns.name, "device/a-new", "OutOfSync").await;
    assert!(events.contains("Out of sync for"), "{events}");

    // edge-a goes silent: offline after 3 s; then it reports again.
    let offline = described_with(cp, &ns.name, "edgenode/edge-a", "NodeOffline").await;
    assert!(offline.contains("No batch from the agent"), "{offline}");
    let back = post_batch(&url, &ns.name, "edge-a", "ta", &batch(2, vec![])).await;
    assert_eq!(back.status, 200);
    wait::until(
        "a second NodeReady after the node is back",
        DEADLINE,
        || async {
            let out = cp.kubectl_ok(&[
                "-n",
                &ns.name,
                "get",
                "events.events.k8s.io",
                "--field-selector",
                "regarding.name=edge-a,reason=NodeReady",
                "-o",
                "name",
            ]);
            let ready_after_offline = out.lines().count() >= 2
                || cp
                    .kubectl_ok(&["-n", &ns.name, "describe", "edgenode/edge-a"])
                    .split("Events:")
                    .nth(1)
                    .is_some_and(|e| e.matches("NodeReady").count() >= 2 || e.contains("(x2 over"));
            ready_after_offline.then_some(())
        },
    )
    .await;
    assert!(c.metric("edgesync_controller_events_total").await >= 6.0);
}
