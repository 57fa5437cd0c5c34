//! The controller facing hostile and slow clients on the agents' network, against a real
//! kube-apiserver: idle sockets, slowloris headers and slow-drip bodies are closed on their
//! timeouts while good batches flow; a socket flood under a 1,024 open-files limit does not
//! take it off the air; unknown nodes and wrong tokens do not turn into API server traffic;
//! and a node over its rate, or a full body budget, is refused before its body is read.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, batch, client, create_node, metric_value, post_batch, post_raw, report,
};
use edgesync_e2e::wait;
use edgesync_protocol::wire;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const STEP: Duration = Duration::from_secs(20);

/// Whether the server closes `s` within `deadline` (whatever it sends first, such as a 408);
/// returns what it sent.
async fn closed_within(s: &mut TcpStream, deadline: Duration) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + deadline;
    loop {
        let left = end.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// The head of a report POST for `node` (HTTP/1.1), without its body.
fn post_head(ns: &str, node: &str, token: &str, content_length: usize) -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: controller\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n",
        wire::reports_path(ns, node)
    )
}

/// Sum of the API server's `apiserver_request_total` for single-object GETs of `resource`.
async fn apiserver_gets(cp: &ControlPlane, resource: &str) -> f64 {
    let req = axum::http::Request::get("/metrics")
        .body(Vec::new())
        .unwrap();
    let text = cp.client().await.request_text(req).await.unwrap();
    let resource = format!("resource=\"{resource}\"");
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(&resource)
                && l.contains("verb=\"GET\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let r = client()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed_while_good_batches_flow() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("slowclients");
    create_node(cp, &ns.name, "edge-1", "t1", "  autoRegisterDevices: true");
    let ops = SocketAddr::from(([127, 0, 0, 1], edgesync_e2e::free_port()));
    let c = Controller::start(
        cp,
        &[
            "--http-header-timeout-seconds",
            "2",
            "--http-body-timeout-seconds",
            "2",
            "--http-idle-timeout-seconds",
            "4",
            "--metrics-listen",
            &ops.to_string(),
        ],
    );
    let addr = c.addr;
    let (ns_name, head) = (ns.name.clone(), post_head(&ns.name, "edge-1", "t1", 1000));

    // 300 idle sockets, 100 slowloris clients dripping header bytes, 50 dripping bodies.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut drips = JoinSet::new();
    for i in 0..150 {
        let head = head.clone();
        drips.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let (prefix, drip): (Vec<u8>, u8) = if i < 100 {
                (
                    b"POST /v1/namespaces/x/nodes/y/reports HTTP/1.1\r\nX-Slow: ".to_vec(),
                    b'a',
                )
            } else {
                (head.into_bytes(), b' ')
            };
            s.write_all(&prefix).await.unwrap();
            let started = Instant::now();
            // One byte every 300 ms until the server hangs up (or 30 s pass: a failure).
            while started.elapsed() < Duration::from_secs(30) {
                if s.write_all(&[drip]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => {
                        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                        return (i, started.elapsed(), Some(answer));
                    }
                    Err(_) => {}
                }
            }
            (i, started.elapsed(), None)
        });
    }

    // Good batches are answered meanwhile.
    let a = post_batch(
        &c.url(),
        &ns_name,
        "edge-1",
        "t1",
        &batch(1, vec![report("press-1", 1, json!({"rpm": 1200}))]),
    )
    .await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"), "{a:?}");

    while let Some(done) = drips.join_next().await {
        let (i, took, answer) = done.unwrap();
        assert!(
            took < Duration::from_secs(15),
            "dripping client {i} was held for {took:?}"
        );
        if i >= 100 {
            let answer = answer.unwrap_or_default();
            assert!(
                answer.starts_with("HTTP/1.1 408"),
                "slow body {i}: {answer}"
            );
        }
    }
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(10)).await.is_some(),
            "idle socket {i} still open"
        );
    }

    // The counts are on the operations listener, and only there.
    let text = client()
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timed_out = metric_value(&text, "edgesync_controller_connections_timed_out_total");
    assert!(timed_out >= 400.0, "timed out: {timed_out}");
    let body = metric_value(&text, "edgesync_controller_body_timeouts_total");
    assert!(body >= 50.0, "body timeouts: {body}");
    assert_eq!(get_status(addr, "/metrics").await, Some(404));
    assert_eq!(get_status(ops, "/readyz").await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_flood_under_a_1024_open_files_limit_does_not_take_the_controller_down() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("nofile");
    create_node(cp, &ns.name, "edge-1", "t1", "  autoRegisterDevices: true");
    let c = Controller::start_with_open_files(cp, &["--http-header-timeout-seconds", "3"], 1024);
    let addr = c.addr;
    let log = c.process.log_tail(200);
    assert!(
        log.contains("open-files limit is too low for --max-connections"),
        "the cap is lowered to fit the limit, and the log says so: {log}"
    );

    // 1,100 unauthenticated sockets that send nothing: more than the process has files.
    let mut flood = Vec::new();
    for _ in 0..1100 {
        match TcpStream::connect(addr).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect failed (the test's own limit?): {e}"),
        }
    }
    // A good batch gets through within a few header timeouts, retried as an agent would.
    let started = Instant::now();
    let mut n = 0;
    let status = wait::until("a good batch during the flood", STEP, || {
        n += 1;
        let url = c.url();
        let (ns, seq) = (ns.name.clone(), n);
        async move {
            let body = batch(seq, vec![report("press-1", seq, json!({ "n": seq }))]);
            let r = client()
                .post(format!("{url}{}", wire::reports_path(&ns, "edge-1")))
                .bearer_auth("t1")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            (r.status().as_u16() == 200).then_some(200)
        }
    })
    .await;
    assert_eq!(status, 200);
    eprintln!(
        "good batch answered {} ms into a 1,100-socket flood",
        started.elapsed().as_millis()
    );
    assert_eq!(get_status(addr, "/healthz").await, Some(200));
    let refused = c
        .metric("edgesync_controller_connections_refused_total")
        .await;
    assert!(refused > 0.0, "refusals at the cap are counted");
    assert!(c.process.log_tail(50).contains("--max-connections reached"));
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_nodes_and_wrong_tokens_do_not_turn_into_api_server_requests() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("amplify");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    let c = Controller::start(cp, &[]);
    let url = c.url();
    let nodes_before = apiserver_gets(cp, "edgenodes").await;
    let secrets_before = apiserver_gets(cp, "secrets").await;

    // 2,000 requests for random node names, 50 at a time.
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..2000u32 {
        if set.len() >= 50 {
            set.join_next().await.unwrap().unwrap();
        }
        let (url, ns) = (url.clone(), ns.name.clone());
        set.spawn(async move {
            let a = post_raw(
                &url,
                &ns,
                &format!("ghost-{i}"),
                Some("x"),
                b"{}".to_vec(),
                false,
            )
            .await;
            assert_eq!(a.status, 401, "{a:?}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    // 1,000 concurrent requests with a wrong token for a real node.
    for _ in 0..1000 {
        let (url, ns) = (url.clone(), ns.name.clone());
        set.spawn(async move {
            let a = post_raw(&url, &ns, "edge-1", Some("wrong"), b"{}".to_vec(), false).await;
            assert_eq!(a.status, 401, "{a:?}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let node_gets = apiserver_gets(cp, "edgenodes").await - nodes_before;
    let secret_gets = apiserver_gets(cp, "secrets").await - secrets_before;
    eprintln!(
        "API GETs for 3,000 unauthenticated requests: edgenodes {node_gets}, secrets {secret_gets}"
    );
    // Lookups of uncached nodes are held to a burst of 20 and 5/s (against 2,000 before);
    // other tests share this API server, so the bounds leave room for their own reads.
    let budget = 20.0 + 5.0 * elapsed;
    assert!(
        node_gets < budget + 20.0,
        "EdgeNode GETs: {node_gets} in {elapsed:.1} s"
    );
    assert!(secret_gets < 30.0, "Secret GETs: {secret_gets}");
    let skipped = c
        .metric("edgesync_controller_unknown_node_lookups_skipped_total")
        .await;
    assert!(skipped >= 1900.0, "skipped lookups: {skipped}");
    assert_eq!(
        c.metric("edgesync_controller_auth_failures_total").await,
        3000.0
    );
    let logged = c
        .process
        .log_tail(100_000)
        .matches("authentication failed")
        .count();
    assert!(logged <= 5, "authentication failures logged {logged} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rate_and_over_budget_batches_are_refused_before_their_body_is_read() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("beforebody");
    create_node(
        cp,
        &ns.name,
        "slow",
        "ts",
        "  autoRegisterDevices: true\n  limits:\n    reportsPerSecond: 1\n    burst: 1",
    );
    for (node, token) in [("fast", "tf"), ("other", "to"), ("third", "t3")] {
        create_node(cp, &ns.name, node, token, "  autoRegisterDevices: true");
    }
    let c = Controller::start(
        cp,
        &[
            "--max-body-bytes-in-flight",
            "2097152",
            "--max-body-bytes-in-flight-per-node",
            "1048576",
        ],
    );
    let a = post_batch(
        &c.url(),
        &ns.name,
        "slow",
        "ts",
        &batch(1, vec![report("m-1", 1, json!({}))]),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");

    // The node's bucket is empty: a 15 MB batch is refused on its headers alone.
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(post_head(&ns.name, "slow", "ts", 15_000_000).as_bytes())
        .await
        .unwrap();
    let answer = closed_or_answered(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );

    // A request declaring 1 MiB, whose body never comes, holds its node's whole body budget,
    // so that node's next batch is answered 503 before its body is read.
    let holder = hold_body_budget(c.addr, &ns.name, "fast", "tf").await;
    let busy = refused_before_body(c.addr, &ns.name, "fast", "tf").await;
    assert!(
        busy.contains("--max-body-bytes-in-flight-per-node"),
        "{busy}"
    );
    // One node holding its share does not starve the others.
    let a = post_batch(
        &c.url(),
        &ns.name,
        "other",
        "to",
        &batch(1, vec![report("o-1", 1, json!({}))]),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    // Two nodes' shares make the whole budget: a third node is refused too.
    let second_holder = hold_body_budget(c.addr, &ns.name, "other", "to").await;
    let busy = refused_before_body(c.addr, &ns.name, "third", "t3").await;
    assert!(busy.contains("--max-body-bytes-in-flight allows"), "{busy}");
    drop(second_holder);
    drop(holder);
    let text = c.metrics().await;
    assert!(
        metric_value(
            &text,
            "edgesync_controller_requests_shed_total{reason=\"node_rate\"}"
        ) >= 1.0
    );
    assert!(
        metric_value(
            &text,
            "edgesync_controller_requests_shed_total{reason=\"body_budget\"}"
        ) >= 1.0
    );
    assert!(
        metric_value(
            &text,
            "edgesync_controller_requests_shed_total{reason=\"node_body_budget\"}"
        ) >= 1.0
    );
}

/// A request for `node` declaring a 1 MiB body that never comes.
async fn hold_body_budget(addr: SocketAddr, ns: &str, node: &str, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(post_head(ns, node, token, 1_048_576).as_bytes())
        .await
        .unwrap();
    s
}

/// Waits until a small batch for `node` is answered 503 (until a holder's reservation is in,
/// probes go through and are answered 400 for their garbage body); returns the answer.
async fn refused_before_body(addr: SocketAddr, ns: &str, node: &str, token: &str) -> String {
    wait::until("a 503 while the budget is held", STEP, || {
        let head = post_head(ns, node, token, 10);
        async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(head.as_bytes()).await.ok()?;
            s.write_all(b"0123456789").await.ok()?;
            let answer = closed_or_answered(&mut s).await;
            answer.starts_with("HTTP/1.1 503").then_some(answer)
        }
    })
    .await
}

/// Reads the start of an answer (waiting at most 5 s).
async fn closed_or_answered(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 8192];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Ok(Err(e)) => format!("read error: {e}"),
        Err(_) => "no answer within 5 s".to_owned(),
    }
}
