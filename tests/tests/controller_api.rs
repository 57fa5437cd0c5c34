//! The controller's HTTP API against a real kube-apiserver: authentication, per-report
//! validation and ownership, durability of 2xx answers, never-regress under duplicate and
//! reordered batches, auto-registration, per-node rate limits, and request limits.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::time::Duration;

use edgesync_crds::{Device, EdgeNode};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, batch, create_devices, create_node, post_batch, post_raw, report,
};
use edgesync_e2e::wait;
use kube::Api;
use serde_json::json;

async fn status_version(api: &Api<Device>, name: &str) -> Option<u64> {
    api.get(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.reported_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_failure_is_401_and_changes_nothing() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("auth");
    let other = cp.namespace("auth-other");
    create_node(cp, &ns.name, "edge-a", "token-a", "");
    create_node(cp, &ns.name, "edge-b", "token-b", "");
    // The same node name in another namespace, with its own token.
    create_node(cp, &other.name, "edge-a", "token-other", "");
    create_devices(cp, &ns.name, "edge-a", &["press-1".into()]);
    let c = Controller::start(cp, &["--token-cache-seconds", "1"]);
    let url = c.url();
    let body =
        || serde_json::to_vec(&batch(1, vec![report("press-1", 1, json!({"t":1}))])).unwrap();

    let cases: [(&str, &str, Option<&str>); 6] = [
        ("no token", "edge-a", None),
        ("wrong token", "edge-a", Some("nope")),
        ("empty token", "edge-a", Some("")),
        ("another node's token", "edge-a", Some("token-b")),
        ("unknown node", "edge-z", Some("token-a")),
        (
            "token of the same node name in another namespace",
            "edge-a",
            Some("token-other"),
        ),
    ];
    let mut messages = std::collections::BTreeSet::new();
    for (what, node, token) in cases {
        let a = post_raw(&url, &ns.name, node, token, body(), false).await;
        assert_eq!(a.status, 401, "{what}: {a:?}");
        assert_eq!(a.code(), "unauthorized", "{what}");
        let message = a.body["error"]["message"].as_str().unwrap().to_owned();
        // Nothing that tells an unauthenticated caller whether the node exists or which
        // Secret holds its token.
        assert!(!message.contains("edge-"), "{what}: {message}");
        messages.insert(message);
    }
    assert_eq!(
        messages.len(),
        1,
        "one answer for every cause: {messages:?}"
    );
    // The other namespace's token is valid only there.
    let a = post_raw(
        &url,
        &other.name,
        "edge-a",
        Some("token-other"),
        serde_json::to_vec(&batch(1, vec![])).unwrap(),
        false,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    assert_eq!(
        status_version(&api, "press-1").await,
        None,
        "nothing was written"
    );
    assert!(c.metric("edgesync_controller_auth_failures_total").await >= 6.0);

    // Rotation: the new token works at once, the old one stops working.
    let out = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: edge-a-token\n  namespace: {}\nstringData:\n  token: rotated\n", ns.name),
    );
    assert!(out.status.success());
    wait::until(
        "rotated token accepted",
        Duration::from_secs(10),
        || async {
            let a = post_raw(&url, &ns.name, "edge-a", Some("rotated"), body(), false).await;
            (a.status == 200).then_some(())
        },
    )
    .await;
    wait::until("old token refused", Duration::from_secs(10), || async {
        let a = post_raw(&url, &ns.name, "edge-a", Some("token-a"), body(), false).await;
        (a.status == 401).then_some(())
    })
    .await;
    assert!(
        !std::fs::read_to_string(c.process.log_path())
            .unwrap()
            .contains("token-a"),
        "a token value appeared in the controller log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_means_durable_and_versions_never_regress() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("durable");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    create_node(cp, &ns.name, "edge-2", "t2", "");
    let mine: Vec<String> = (0..20).map(|i| format!("dev-{i}")).collect();
    create_devices(cp, &ns.name, "edge-1", &mine);
    create_devices(cp, &ns.name, "edge-2", &["foreign".into()]);
    let c = Controller::start(cp, &[]);
    let url = c.url();
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);

    let reports = mine
        .iter()
        .map(|d| report(d, 5, json!({"v":5, "name": d})))
        .collect();
    let a = post_batch(&url, &ns.name, "edge-1", "t1", &batch(1, reports)).await;
    assert_eq!(a.status, 200, "{a:?}");
    for (i, d) in mine.iter().enumerate() {
        assert_eq!(a.result(i), "accepted");
        // Read straight from the API server right after the answer: durable, not eventually.
        let dev = api.get(d).await.unwrap();
        let st = dev.status.unwrap();
        assert_eq!(st.reported_version, Some(5), "{d}");
        assert_eq!(st.reported.unwrap()["name"], json!(d));
    }

    // The same batch again (a retry after a lost answer): accepted, and no write at all.
    let rv_before = api.get("dev-0").await.unwrap().metadata.resource_version;
    let writes_before = c.metric("edgesync_controller_status_writes_total").await;
    let again = mine
        .iter()
        .map(|d| report(d, 5, json!({"v":5, "name": d})))
        .collect();
    let a = post_batch(&url, &ns.name, "edge-1", "t1", &batch(1, again)).await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    assert_eq!(
        api.get("dev-0").await.unwrap().metadata.resource_version,
        rv_before
    );
    assert_eq!(
        c.metric("edgesync_controller_status_writes_total").await,
        writes_before
    );

    // Reordered: version 7 arrives, then 6. The older one is stale and changes nothing.
    let a = post_batch(
        &url,
        &ns.name,
        "edge-1",
        "t1",
        &batch(2, vec![report("dev-1", 7, json!({"v":7}))]),
    )
    .await;
    assert_eq!(a.result(0), "accepted");
    let a = post_batch(
        &url,
        &ns.name,
        "edge-1",
        "t1",
        &batch(3, vec![report("dev-1", 6, json!({"v":6}))]),
    )
    .await;
    assert_eq!((a.status, a.result(0)), (200, "stale"), "{a:?}");
    let st = api.get("dev-1").await.unwrap().status.unwrap();
    assert_eq!(
        (st.reported_version, st.reported.unwrap()["v"].clone()),
        (Some(7), json!(7))
    );

    // Full replacement: a key the device no longer reports disappears from status.
    let a = post_batch(
        &url,
        &ns.name,
        "edge-1",
        "t1",
        &batch(4, vec![report("dev-2", 8, json!({"only": true}))]),
    )
    .await;
    assert_eq!(a.result(0), "accepted");
    assert_eq!(
        api.get("dev-2")
            .await
            .unwrap()
            .status
            .unwrap()
            .reported
            .unwrap(),
        json!({"only": true}).as_object().unwrap().clone()
    );

    // One bad report among good ones: only it is rejected; its neighbours are written.
    let deep = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{"l":{"m":{"n":{"o":{"p":{"q":{"r":1}}}}}}}}}}}}}}}}}});
    let a = post_batch(
        &url,
        &ns.name,
        "edge-1",
        "t1",
        &batch(
            5,
            vec![
                report("dev-3", 9, json!({"ok": 1})),
                report("foreign", 9, json!({"evil": 1})),
                report("not-registered", 9, json!({})),
                report("Bad_Id!", 9, json!({})),
                report("dev-4", 9, deep),
                report("dev-5", 9, json!({"big": "x".repeat(70 * 1024)})),
                report("dev-6", 9, json!({"ok": 1})),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let reasons: Vec<(&str, String)> = (0..7)
        .map(|i| {
            (
                a.result(i),
                a.body["results"][i]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("accepted", String::new()),
            ("rejected", "forbidden".into()),
            ("rejected", "unknown_device".into()),
            ("rejected", "invalid_device_id".into()),
            ("rejected", "invalid_state".into()),
            ("rejected", "too_large".into()),
            ("accepted", String::new()),
        ]
    );
    let foreign: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    assert_eq!(
        status_version(&foreign, "foreign").await,
        None,
        "another node's device untouched"
    );
    assert!(
        api.get_opt("not-registered").await.unwrap().is_none(),
        "no auto-registration by default"
    );
    assert_eq!(status_version(&api, "dev-4").await, Some(5));
    assert_eq!(status_version(&api, "dev-6").await, Some(9));

    // Whole-request errors: JSON bodies with codes, nothing written.
    let a = post_raw(
        &url,
        &ns.name,
        "edge-1",
        Some("t1"),
        b"{not json".to_vec(),
        false,
    )
    .await;
    assert_eq!((a.status, a.code()), (400, "malformed"));
    let a = post_raw(
        &url,
        &ns.name,
        "edge-1",
        Some("t1"),
        b"\x1f\x8b garbage".to_vec(),
        true,
    )
    .await;
    assert_eq!((a.status, a.code()), (400, "malformed"));
    let huge = vec![b' '; 17 * 1024 * 1024];
    let a = post_raw(&url, &ns.name, "edge-1", Some("t1"), huge, false).await;
    assert_eq!((a.status, a.code()), (413, "too_large"));
    // A gzip bomb is cut off at the same limit after decoding.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; 20 * 1024 * 1024]).unwrap();
    let a = post_raw(
        &url,
        &ns.name,
        "edge-1",
        Some("t1"),
        gz.finish().unwrap(),
        true,
    )
    .await;
    assert_eq!((a.status, a.code()), (413, "too_large"));
    // A well-formed gzip batch is fine.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(
        &serde_json::to_vec(&batch(6, vec![report("dev-7", 10, json!({"z": 1}))])).unwrap(),
    )
    .unwrap();
    let a = post_raw(
        &url,
        &ns.name,
        "edge-1",
        Some("t1"),
        gz.finish().unwrap(),
        true,
    )
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    assert_eq!(status_version(&api, "dev-7").await, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_registration_and_node_limits() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("autoreg");
    create_node(
        cp,
        &ns.name,
        "edge-auto",
        "ta",
        "  autoRegisterDevices: true",
    );
    create_node(
        cp,
        &ns.name,
        "edge-slow",
        "ts",
        "  limits:\n    reportsPerSecond: 1\n    burst: 3\n    maxReportsPerBatch: 5",
    );
    let c = Controller::start(cp, &[]);
    let url = c.url();
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);

    let a = post_batch(
        &url,
        &ns.name,
        "edge-auto",
        "ta",
        &batch(1, vec![report("new-sensor", 1, json!({"t": 20}))]),
    )
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    let d = api.get("new-sensor").await.unwrap();
    assert_eq!(d.spec.node_name, "edge-auto");
    assert_eq!(d.status.unwrap().reported_version, Some(1));

    // Too many reports in one batch for this node: 413, nothing written.
    let six = (0..6)
        .map(|i| report(&format!("s-{i}"), 1, json!({})))
        .collect();
    let a = post_batch(&url, &ns.name, "edge-slow", "ts", &batch(1, six)).await;
    assert_eq!((a.status, a.code()), (413, "too_many_reports"), "{a:?}");
    // 3 reports fit the burst; the next batch is refused with Retry-After.
    let three = (0..3)
        .map(|i| report(&format!("s-{i}"), 1, json!({})))
        .collect();
    let a = post_batch(&url, &ns.name, "edge-slow", "ts", &batch(2, three)).await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = post_batch(
        &url,
        &ns.name,
        "edge-slow",
        "ts",
        &batch(3, vec![report("s-0", 2, json!({}))]),
    )
    .await;
    assert_eq!((a.status, a.code()), (429, "rate_limited"), "{a:?}");
    assert!(a.retry_after.is_some_and(|s| (1..=2).contains(&s)), "{a:?}");
    // Without auto-registration, those unknown devices were rejected, not created.
    assert!(api.get_opt("s-0").await.unwrap().is_none());

    // Versions a Kubernetes int64 cannot hold are rejected before auto-registration: no
    // Device is created for a report that can never be written.
    for (i, version) in [1u64 << 63, u64::MAX].into_iter().enumerate() {
        let name = format!("huge-{i}");
        let a = post_batch(
            &url,
            &ns.name,
            "edge-auto",
            "ta",
            &batch(10 + i as u64, vec![report(&name, version, json!({}))]),
        )
        .await;
        assert_eq!((a.status, a.result(0)), (200, "rejected"), "{a:?}");
        assert!(a.body.to_string().contains("invalid_version"), "{a:?}");
        assert!(
            api.get_opt(&name).await.unwrap().is_none(),
            "{name} created"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_agent_api_and_bad_certificates_stop_start_up() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("tls");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    create_devices(cp, &ns.name, "edge-1", &["secure-1".into()]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = edgesync_e2e::controller::self_signed_cert(dir.path());
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let c = Controller::spawn(cp, &["--tls-cert", &cert, "--tls-key", &key]);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let https = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let base = format!("https://{}", c.addr);
    wait::until("HTTPS /readyz", Duration::from_secs(30), || async {
        let r = match https.get(format!("{base}/readyz")).send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("HTTPS /readyz: {e:?}");
                return None;
            }
        };
        (r.status() == 200).then_some(())
    })
    .await;
    let body =
        serde_json::to_vec(&batch(1, vec![report("secure-1", 1, json!({"ok": true}))])).unwrap();
    let r = https
        .post(format!(
            "{base}{}",
            edgesync_protocol::wire::reports_path(&ns.name, "edge-1")
        ))
        .bearer_auth("t1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port gets no answer.
    let plain = edgesync_e2e::controller::client()
        .get(format!("{}/healthz", c.url()))
        .send()
        .await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));

    // A missing key file is a start-up error that names the option.
    let mut bad = Controller::spawn(
        cp,
        &["--tls-cert", &cert, "--tls-key", "/nonexistent/key.pem"],
    );
    wait::until(
        "controller with a bad key to exit",
        Duration::from_secs(20),
        || {
            let running = bad.process.is_running();
            async move { (!running).then_some(()) }
        },
    )
    .await;
    let log = std::fs::read_to_string(bad.process.log_path()).unwrap();
    assert!(log.contains("--tls-key"), "{log}");
}

/// `batch` from an agent database with epoch `epoch`.
fn batch_from(
    epoch: &str,
    seq: u64,
    reports: Vec<edgesync_protocol::wire::Report>,
) -> edgesync_protocol::wire::ReportBatch {
    let mut b = batch(seq, reports);
    b.epoch = epoch.to_owned();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_epochs_order_reports_across_reinstalls_and_refuse_conflicts() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("epochs");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    create_devices(cp, &ns.name, "edge-1", &["press".into(), "oven".into()]);
    let c = Controller::start(cp, &[]);
    let url = c.url();
    let client = cp.client().await;
    let devices: Api<Device> = Api::namespaced(client.clone(), &ns.name);
    let nodes: Api<EdgeNode> = Api::namespaced(client, &ns.name);
    let post = |b: edgesync_protocol::wire::ReportBatch| {
        let url = url.clone();
        let ns = ns.name.clone();
        async move { post_batch(&url, &ns, "edge-1", "t1", &b).await }
    };
    let status = |name: &'static str| {
        let devices = devices.clone();
        async move { devices.get(name).await.unwrap().status.unwrap() }
    };

    // An agent that predates epochs wrote version 40.
    let a = post(batch(1, vec![report("press", 40, json!({"n": 40}))])).await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    assert_eq!(status("press").await.reported_epoch, None);

    // Upgraded in place: the same database now has an epoch and carries on at version 41.
    let first = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let a = post(batch_from(
        first,
        2,
        vec![report("press", 41, json!({"n": 41}))],
    ))
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    let st = status("press").await;
    assert_eq!(
        (
            st.reported_version,
            st.reported_epoch.as_deref(),
            st.reported_epoch_generation
        ),
        (Some(41), Some(first), Some(1))
    );
    let en = nodes.get("edge-1").await.unwrap().status.unwrap();
    assert_eq!(
        (en.agent_epoch.as_deref(), en.agent_epoch_generation),
        (Some(first), Some(1))
    );

    // The same epoch and version with another body is a conflict: refused, counted, unwritten.
    let a = post(batch_from(
        first,
        3,
        vec![report("press", 41, json!({"n": -1}))],
    ))
    .await;
    assert_eq!((a.status, a.result(0)), (200, "rejected"), "{a:?}");
    assert!(
        a.body["results"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("conflict:"),
        "{a:?}"
    );
    assert_eq!(status("press").await.reported.unwrap()["n"], json!(41));
    assert_eq!(
        c.metric("edgesync_controller_reports_rejected_total{reason=\"conflict\"}")
            .await,
        1.0
    );
    // The same body again is a retry: accepted, nothing written.
    let writes = c.metric("edgesync_controller_status_writes_total").await;
    let a = post(batch_from(
        first,
        4,
        vec![report("press", 41, json!({"n": 41}))],
    ))
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    assert_eq!(
        c.metric("edgesync_controller_status_writes_total").await,
        writes
    );

    // Reinstalled: a new database starts again at version 1 and is written at once, where a
    // version-only order would answer `stale` until it passed 41.
    let second = "ffeeddccbbaa99887766554433221100";
    let a = post(batch_from(
        second,
        1,
        vec![
            report("press", 1, json!({"n": 1001})),
            report("oven", 1, json!({"t": 180})),
        ],
    ))
    .await;
    assert_eq!(
        (a.status, a.result(0), a.result(1)),
        (200, "accepted", "accepted"),
        "{a:?}"
    );
    let st = status("press").await;
    assert_eq!(
        (
            st.reported_version,
            st.reported_epoch.as_deref(),
            st.reported_epoch_generation
        ),
        (Some(1), Some(second), Some(2))
    );
    assert_eq!(st.reported.unwrap()["n"], json!(1001));
    let en = nodes.get("edge-1").await.unwrap().status.unwrap();
    assert_eq!(
        (
            en.agent_epoch.as_deref(),
            en.agent_epoch_generation,
            en.retired_agent_epochs
        ),
        (Some(second), Some(2), vec![first.to_owned()])
    );
    assert_eq!(
        c.metric("edgesync_controller_agent_epoch_changes_total")
            .await,
        2.0
    );

    // A third epoch right after: a node cannot cycle epochs batch after batch (each switch
    // costs API calls and retires an epoch); refused, and nothing changes.
    let a = post(batch_from(
        "0123456789abcdef0123456789abcdef",
        2,
        vec![report("press", 1, json!({"n": -3}))],
    ))
    .await;
    assert_eq!(
        (a.status, a.code()),
        (429, "epoch_switch_too_soon"),
        "{a:?}"
    );
    assert!(a.retry_after.is_some(), "{a:?}");
    assert_eq!(status("press").await.reported.unwrap()["n"], json!(1001));
    assert_eq!(
        nodes
            .get("edge-1")
            .await
            .unwrap()
            .status
            .unwrap()
            .agent_epoch
            .as_deref(),
        Some(second)
    );
    assert_eq!(
        c.metric("edgesync_controller_epoch_switches_throttled_total")
            .await,
        1.0
    );

    // The old database, still running somewhere, is refused as a whole (409) and changes
    // nothing: neither its reports nor the node's heartbeat.
    let mut old = batch_from(first, 5, vec![report("press", 42, json!({"n": 42}))]);
    old.agent.version = "old-install".into();
    let a = post(old).await;
    assert_eq!((a.status, a.code()), (409, "epoch_superseded"), "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retiredAgentEpochs"),
        "{a:?}"
    );
    assert_eq!(status("press").await.reported.unwrap()["n"], json!(1001));
    assert_eq!(
        c.metric("edgesync_controller_superseded_epoch_batches_total")
            .await,
        1.0
    );
    // An agent without epochs cannot come back over the new epoch either.
    let a = post(batch(6, vec![report("press", 500, json!({"n": 500}))])).await;
    assert_eq!((a.status, a.result(0)), (200, "stale"), "{a:?}");
    // Heartbeats never rewrote the epoch record (they patch the rest of the status).
    let a = post(batch_from(
        second,
        2,
        vec![report("press", 2, json!({"n": 1002}))],
    ))
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");
    let en = nodes.get("edge-1").await.unwrap().status.unwrap();
    assert_eq!(en.agent_epoch.as_deref(), Some(second));
    assert_ne!(en.agent_version.as_deref(), Some("old-install"));

    // A malformed epoch is a malformed batch.
    let a = post(batch_from("no spaces", 7, vec![])).await;
    assert_eq!((a.status, a.code()), (400, "malformed"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_budget_grows_while_writes_wait_for_it() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("budget");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    let names: Vec<String> = (0..200).map(|i| format!("m-{i}")).collect();
    create_devices(cp, &ns.name, "edge-1", &names);
    let c = Controller::start(
        cp,
        &[
            "--write-qps",
            "20",
            "--write-burst",
            "20",
            "--write-qps-max",
            "400",
        ],
    );
    assert_eq!(c.metric("edgesync_controller_write_budget_qps").await, 20.0);
    // An agent with more to write than 20/s: every device changes in every batch.
    let (url, ns_name) = (c.url(), ns.name.clone());
    let load = tokio::spawn(async move {
        for seq in 1u64.. {
            let reports = names
                .iter()
                .map(|d| report(d, seq, json!({ "n": seq })))
                .collect();
            let _ = post_batch(&url, &ns_name, "edge-1", "t1", &batch(seq, reports)).await;
        }
    });
    let grown = wait::until(
        "the write budget to grow past 40/s",
        Duration::from_secs(60),
        || async {
            let qps = c.metric("edgesync_controller_write_budget_qps").await;
            (qps > 40.0).then_some(qps)
        },
    )
    .await;
    load.abort();
    assert!(grown <= 400.0, "{grown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_report_in_a_later_batch_answers_the_older_one_without_its_write() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("supersede");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    let names: Vec<String> = (0..6).map(|i| format!("s-{i}")).collect();
    create_devices(cp, &ns.name, "edge-1", &names);
    // One writer at two writes a second, in submission order: s-5, last of the first batch,
    // is still queued seconds after that batch arrived.
    let c = Controller::start(
        cp,
        &[
            "--write-concurrency",
            "1",
            "--write-qps",
            "2",
            "--write-qps-min",
            "2",
            "--write-qps-max",
            "2",
            "--write-burst",
            "1",
            "--durable-wait-seconds",
            "60",
        ],
    );
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let (url, ns_name) = (c.url(), ns.name.clone());
    let first = tokio::spawn(async move {
        let reports = names
            .iter()
            .map(|d| report(d, 1, json!({ "n": 1 })))
            .collect();
        post_batch(&url, &ns_name, "edge-1", "t1", &batch(1, reports)).await
    });
    wait::until(
        "the first batch is received",
        Duration::from_secs(30),
        || async {
            (c.metric("edgesync_controller_reports_received_total").await >= 6.0).then_some(())
        },
    )
    .await;
    // The same node's newer state of s-5, while the first batch still waits for writes.
    let second = post_batch(
        &c.url(),
        &ns.name,
        "edge-1",
        "t1",
        &batch(2, vec![report("s-5", 2, json!({ "n": 2 }))]),
    )
    .await;
    assert_eq!(
        (second.status, second.result(0)),
        (200, "accepted"),
        "{second:?}"
    );
    // Durable when answered, and the newest state.
    assert_eq!(status_version(&api, "s-5").await, Some(2));
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    let results: Vec<&str> = (0..6).map(|i| first.result(i)).collect();
    assert_eq!(
        results,
        [
            "accepted", "accepted", "accepted", "accepted", "accepted", "stale"
        ]
    );
    let reason = first.body["results"][5]["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("superseded by version 2"), "{reason}");
    assert_eq!(
        c.metric("edgesync_controller_reports_superseded_total")
            .await,
        1.0
    );
    // Its older state was never written over the newer one, and never written at all.
    assert_eq!(status_version(&api, "s-5").await, Some(2));
    assert_eq!(
        c.metric("edgesync_controller_status_writes_total").await,
        6.0
    );
}

/// A batch in flight when the controller is told to stop (a rolling restart) is still
/// written and answered 200: the status writers outlive the drain of the connections, rather
/// than leaving the batch to wait for writers that are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_at_sigterm_is_written_and_answered() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("drain");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    let names: Vec<String> = (0..30).map(|i| format!("d-{i}")).collect();
    create_devices(cp, &ns.name, "edge-1", &names);
    // 10 writes/s: the batch takes about 3 s to become durable, well within the drain.
    let mut c = Controller::start(
        cp,
        &[
            "--write-qps",
            "10",
            "--write-qps-min",
            "10",
            "--write-qps-max",
            "10",
            "--write-burst",
            "1",
        ],
    );
    let reports = names
        .iter()
        .map(|d| report(d, 1, json!({"v": 1})))
        .collect();
    let (url, namespace) = (c.url(), ns.name.clone());
    let post = tokio::spawn(async move {
        post_batch(&url, &namespace, "edge-1", "t1", &batch(1, reports)).await
    });
    wait::until(
        "the first status write",
        Duration::from_secs(30),
        || async {
            (c.metric("edgesync_controller_status_writes_total").await >= 1.0).then_some(())
        },
    )
    .await;
    let status = tokio::task::block_in_place(|| c.process.stop());
    let a = post.await.unwrap();
    let log = c.process.log_tail(30);
    assert_eq!(a.status, 200, "{a:?}\n{log}");
    for i in 0..names.len() {
        assert_eq!(a.result(i), "accepted", "{a:?}");
    }
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    for d in &names {
        assert_eq!(status_version(&api, d).await, Some(1), "{d}");
    }
}

/// The reported document is replaced whole and recorded by the API server's field management
/// as one field: a Device's `managedFields` does not list each leaf of each device's state
/// (which made it about half of every stored Device), and a key the device dropped is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reported_document_is_one_managed_field_and_replaced_whole() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("managed");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    create_devices(cp, &ns.name, "edge-1", &["cnc-1".into()]);
    let c = Controller::start(cp, &[]);
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let mut state: serde_json::Map<String, serde_json::Value> = (0..24)
        .map(|i| (format!("metric{i:02}"), json!(i)))
        .collect();
    state.insert("axes".into(), json!({"x": 1.5, "y": -2.5}));
    for version in 1..=2u64 {
        if version == 2 {
            state.remove("metric00");
            state.insert("spindleRpm".into(), json!(1200));
        }
        let answer = post_batch(
            &c.url(),
            &ns.name,
            "edge-1",
            "t1",
            &batch(version, vec![report("cnc-1", version, json!(state))]),
        )
        .await;
        assert_eq!(
            (answer.status, answer.result(0)),
            (200, "accepted"),
            "{answer:?}"
        );
    }
    let device = api.get("cnc-1").await.unwrap();
    let status = device.status.unwrap();
    assert_eq!(status.reported_version, Some(2));
    assert_eq!(
        status.reported.unwrap(),
        state,
        "the stored document is exactly the last report"
    );
    let entries = device.metadata.managed_fields.unwrap_or_default();
    let reported: Vec<&serde_json::Value> = entries
        .iter()
        .filter_map(|e| e.fields_v1.as_ref())
        .filter_map(|f| f.0.pointer("/f:status/f:reported"))
        .collect();
    assert_eq!(
        reported,
        [&json!({})],
        "status.reported must be managed as one field by one manager: {entries:?}"
    );
}
