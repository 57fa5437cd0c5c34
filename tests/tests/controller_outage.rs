//! The controller while the API server is down: batches are answered 503 quickly (not hung),
//! nothing is acknowledged that is not durable, and everything recovers when the API server
//! returns; and a controller that never reached it still stops at once. Runs on a control
//! plane of its own, since it stops the API server.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgesync_crds::Device;
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, batch, create_devices, create_node, post_batch, report,
};
use edgesync_e2e::wait;
use kube::Api;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_outage_gives_fast_503_and_recovers() {
    let cp = ControlPlane::start();
    let ns = cp.namespace("outage");
    create_node(&cp, &ns.name, "edge-1", "t1", "");
    let names: Vec<String> = (0..5).map(|i| format!("o-{i}")).collect();
    create_devices(&cp, &ns.name, "edge-1", &names);
    let c = Controller::start(&cp, &[]);
    // A second replica, stopped during the outage.
    let mut second = Controller::start(&cp, &[]);
    let url = c.url();
    let send = |v: u64| {
        let reports = names
            .iter()
            .map(|d| report(d, v, json!({"v": v})))
            .collect();
        batch(v, reports)
    };
    assert_eq!(
        post_batch(&url, &ns.name, "edge-1", "t1", &send(1))
            .await
            .status,
        200
    );

    cp.stop_apiserver();
    for v in 2..5 {
        let started = Instant::now();
        let a = post_batch(&url, &ns.name, "edge-1", "t1", &send(v)).await;
        let took = started.elapsed();
        assert_eq!(
            (a.status, a.code()),
            (503, "kubernetes_unavailable"),
            "{a:?}"
        );
        assert!(a.retry_after.is_some(), "503 carries Retry-After");
        assert!(took < Duration::from_secs(5), "503 took {took:?}");
    }
    // A replica stopped meanwhile, with a batch refused and its retries pending, stops at
    // once with every task ended.
    let a = post_batch(&second.url(), &ns.name, "edge-1", "t1", &send(4)).await;
    assert_eq!(a.status, 503, "{a:?}");
    let stopping = Instant::now();
    second.process.stop();
    let took = stopping.elapsed();
    let log = second.process.log_tail(40);
    assert!(
        log.contains("Stopped") && !log.contains("did not stop within the shutdown deadline"),
        "no clean stop:\n{log}"
    );
    assert!(
        took < Duration::from_secs(5),
        "stopping took {took:?}:\n{log}"
    );
    // The controller stays alive and says it cannot reach Kubernetes.
    assert!(
        c.metrics()
            .await
            .contains("edgesync_controller_kubernetes_up 0")
    );

    cp.restart_apiserver();
    let a = wait::until(
        "a batch is accepted again",
        Duration::from_secs(60),
        || async {
            let a = post_batch(&url, &ns.name, "edge-1", "t1", &send(5)).await;
            (a.status == 200).then_some(a)
        },
    )
    .await;
    assert_eq!(a.result(0), "accepted");
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    for d in &names {
        let st = api.get(d).await.unwrap().status.unwrap();
        assert_eq!(
            (st.reported_version, st.reported.unwrap()["v"].clone()),
            (Some(5), json!(5))
        );
    }
    // Its caches recovered too: a device created after the outage is known.
    create_devices(&cp, &ns.name, "edge-1", &["late".into()]);
    let a = post_batch(
        &url,
        &ns.name,
        "edge-1",
        "t1",
        &batch(6, vec![report("late", 1, json!({}))]),
    )
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
}

/// A controller whose API server never answers still stops promptly on SIGTERM, every task
/// ended: none may wait for caches that never fill (a pod stuck in Terminating for its whole
/// grace period otherwise, and killed rather than stopped).
#[test]
fn a_controller_that_never_reached_kubernetes_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: every connection is refused.
    let port = edgesync_e2e::free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: gone
  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}
users:
- name: u
  user: {{token: t}}
contexts:
- name: gone
  context: {{cluster: gone, user: u}}
current-context: gone
"
        ),
    )
    .unwrap();
    // The controller's default log filter, as deployed.
    let mut c = Controller::spawn_with_kubeconfig(&kubeconfig, &[], "");
    c.wait_serving();
    wait::until_blocking(
        "the controller has tried to list from the API server",
        Duration::from_secs(30),
        || {
            c.process
                .log_tail(200)
                .contains("watch failed; retrying")
                .then_some(())
        },
    )
    .unwrap();

    let stopping = Instant::now();
    c.process.stop();
    let took = stopping.elapsed();
    let log = c.process.log_tail(40);
    assert!(log.contains("Stopped"), "no clean stop:\n{log}");
    assert!(
        !log.contains("did not stop within the shutdown deadline"),
        "tasks left running at shutdown:\n{log}"
    );
    assert!(
        took < Duration::from_secs(5),
        "stopping took {took:?}:\n{log}"
    );
    // Each failed request is logged once, by the controller, with what it was for: not
    // again by kube as an error without context.
    let log = c.process.log_tail(10_000);
    assert!(!log.contains("ERROR"), "errors logged:\n{log}");
}

/// Without credentials the controller exits at once with one line that says what to do, each
/// cause said once (kube's config error quotes its causes, which used to be printed again).
#[test]
fn a_controller_without_credentials_says_so_once() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("no-such-kubeconfig");
    let out = std::process::Command::new(edgesync_e2e::controller::controller_binary())
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &missing)
        .env("HOME", home.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("no Kubernetes credentials found: set KUBECONFIG"),
        "{text}"
    );
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "a cause said more than once:\n{text}"
    );
}
