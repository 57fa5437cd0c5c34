//! End to end with the Kubernetes API server stopped and restarted under load: the controller
//! answers 503, the agent backs off and keeps everything in its outbox, and all devices
//! converge afterwards with no version regressed. Uses a control plane of its own.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::stack::{Stack, StackOptions, VersionObserver, publish_acked, wait_reported};
use edgesync_e2e::wait;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restart_under_load_converges() {
    let cp = ControlPlane::start();
    let stack = Stack::start(
        &cp,
        "e2e-apiserver",
        StackOptions {
            node_spec: "  autoRegisterDevices: true".into(),
            ..StackOptions::default()
        },
    )
    .await;
    let devices = stack.devices().await;
    let port = stack.broker.port();
    let batch = |n: u64| -> (Vec<(String, String)>, HashMap<String, Value>) {
        let msgs = (0..30)
            .map(|d| {
                (
                    format!("factory/dev-{d}/state"),
                    json!({"n": n}).to_string(),
                )
            })
            .collect();
        let last = (0..30).map(|d| (format!("dev-{d}"), json!(n))).collect();
        (msgs, last)
    };
    let (msgs, last) = batch(0);
    publish_acked(port, "apiserver-publisher", msgs).await;
    wait_reported(&devices, "n", &last, Duration::from_secs(60)).await;
    let observer = VersionObserver::start(devices.clone());

    cp.stop_apiserver();
    let stopped = Instant::now();
    for n in 1..=5 {
        let (msgs, _) = batch(n);
        publish_acked(port, "apiserver-publisher", msgs).await;
    }
    // The controller refuses with 503 rather than acknowledging what it cannot write.
    wait::until(
        "the controller to answer 503",
        Duration::from_secs(30),
        || async {
            let m = stack.controller.metrics().await;
            m.lines()
                .any(|l| l.starts_with("edgesync_controller_batches_total{code=\"503\"}"))
                .then_some(())
        },
    )
    .await;
    let pending = edgesync_agent::cli::outbox(&stack.agent_db()).unwrap();
    assert_eq!(pending["pendingDevices"], 30, "{pending}");

    cp.restart_apiserver();
    let restarted = Instant::now();
    let (msgs, last) = batch(6);
    publish_acked(port, "apiserver-publisher", msgs).await;
    wait_reported(&devices, "n", &last, Duration::from_secs(90)).await;
    observer.assert_never_regressed();
    println!(
        "API server down {:?}; converged {:?} after its restart",
        restarted - stopped,
        restarted.elapsed()
    );
}
