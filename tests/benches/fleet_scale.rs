//! `make bench` (fleet scale): 100 edge nodes x 1,000 devices (100,000 Devices) against the
//! real API server, with one controller.
//!
//! Reported: the time to create the Devices; the controller's time from start to ready, and
//! again after a restart; its RSS when ready and at its peak; the desired-stream snapshots of
//! all nodes; the fan-out latency of a `spec.desired` change to each node's stream; and,
//! under 100 agents each sending its 1,000 devices' state every 10 s, the status writes/s
//! against the write budget and the writer's backlog.
//!
//! A smoke run uses 5 nodes x 100 devices.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync_crds::{Device, DeviceSpec};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, DesiredStream, batch, client, report};
use edgesync_e2e::measure::{aim, percentile_ms, scaled};
use edgesync_e2e::raw_mqtt::rss_kib;
use edgesync_protocol::wire::{self, DesiredEvent};
use futures_util::StreamExt as _;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

fn nodes() -> usize {
    scaled(100, 5)
}

fn per_node() -> usize {
    scaled(1000, 100)
}

fn load_secs() -> u64 {
    scaled(20, 3)
}

/// Waits for `/readyz` (up to 5 minutes) and returns how long it took from `since`.
async fn ready_after(c: &Controller, since: Instant) -> Duration {
    let http = client();
    loop {
        let ok = http
            .get(format!("{}/readyz", c.url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(300),
            "controller not ready in 5 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (n_nodes, per) = (nodes(), per_node());
    let cp = ControlPlane::start();
    let ns = cp.namespace("fleet");
    println!(
        "edgesync fleet scale: {n_nodes} nodes x {per} devices = {} Devices, one controller",
        n_nodes * per
    );
    let yaml: String = (0..n_nodes)
        .map(|k| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: node-{k}-token\n  namespace: {ns}\nstringData:\n  token: token-{k}\n---\napiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: node-{k}\n  namespace: {ns}\nspec:\n  tokenSecretRef:\n    name: node-{k}-token\n---\n",
                ns = ns.name
            )
        })
        .collect();
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    assert!(out.status.success(), "{out:?}");
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let created = Instant::now();
    futures_util::stream::iter(0..n_nodes * per)
        .map(|i| {
            let api = api.clone();
            async move {
                let d = Device::new(
                    &format!("n{}-d{}", i / per, i % per),
                    DeviceSpec {
                        node_name: format!("node-{}", i / per),
                        desired: None,
                        reporting: None,
                    },
                );
                api.create(&PostParams::default(), &d).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let created = created.elapsed();

    let started = Instant::now();
    let mut c = Controller::spawn_with_log(&cp, &[], "info");
    let to_ready = ready_after(&c, started).await;
    let pid = c.process.pid().unwrap();
    let ready_rss = rss_kib(pid);

    // Every node's desired stream: its snapshot first.
    let snap = Instant::now();
    let mut streams = Vec::new();
    for k in 0..n_nodes {
        let mut s = DesiredStream::open(
            &c.url(),
            &ns.name,
            &format!("node-{k}"),
            &format!("token-{k}"),
            None,
        )
        .await
        .unwrap();
        loop {
            if let DesiredEvent::SnapshotComplete { .. } = s.next(Duration::from_secs(60)).await {
                break;
            }
        }
        streams.push(s);
    }
    let snapshots = snap.elapsed();

    // Fan-out: one device of every node gets a new spec.desired; each node's stream sees it.
    let patched = Instant::now();
    let patches: Vec<_> = (0..n_nodes)
        .map(|k| {
            let api = api.clone();
            tokio::spawn(async move {
                let patch = json!({"spec": {"desired": {"setpoint": 42}}});
                api.patch(
                    &format!("n{k}-d0"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .unwrap();
            })
        })
        .collect();
    let mut fanout = Vec::new();
    let mut waiting = Vec::new();
    for (k, mut s) in streams.into_iter().enumerate() {
        waiting.push(tokio::spawn(async move {
            loop {
                if let DesiredEvent::Desired { device, .. } =
                    s.next_change(Duration::from_secs(60)).await
                    && device == format!("n{k}-d0")
                {
                    return patched.elapsed();
                }
            }
        }));
    }
    for p in patches {
        p.await.unwrap();
    }
    for w in waiting {
        fanout.push(w.await.unwrap());
    }
    fanout.sort();

    // Load: every agent sends all its devices every 10 s (staggered), for load_secs().
    let writes_before = c.metric("edgesync_controller_status_writes_total").await;
    let peak_rss = Arc::new(AtomicU64::new(ready_rss));
    let peak_pending = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let load_start = Instant::now();
    let mut agents = Vec::new();
    for k in 0..n_nodes {
        let (url, ns_name, refused) = (c.url(), ns.name.clone(), refused.clone());
        agents.push(tokio::spawn(async move {
            let http = client();
            // Staggered over the first 10 s (or the whole load, if shorter).
            let spread = load_secs().min(10) * 1000;
            tokio::time::sleep(Duration::from_millis((k as u64 * spread) / n_nodes as u64)).await;
            let mut round = 1u64;
            while load_start.elapsed() < Duration::from_secs(load_secs()) {
                let reports = (0..per)
                    .map(|d| {
                        report(
                            &format!("n{k}-d{d}"),
                            round,
                            json!({"n": round, "temperatureC": 21.5}),
                        )
                    })
                    .collect();
                let body = serde_json::to_vec(&batch(round, reports)).unwrap();
                let r = http
                    .post(format!(
                        "{url}{}",
                        wire::reports_path(&ns_name, &format!("node-{k}"))
                    ))
                    .bearer_auth(format!("token-{k}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status().is_success()) {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                round += 1;
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }));
    }
    let sampler = {
        let (peak_rss, peak_pending, url) = (peak_rss.clone(), peak_pending.clone(), c.url());
        tokio::spawn(async move {
            let http = client();
            loop {
                peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                if let Ok(r) = http.get(format!("{url}/metrics")).send().await
                    && let Ok(text) = r.text().await
                {
                    let pending = edgesync_e2e::controller::metric_value(
                        &text,
                        "edgesync_controller_writer_pending_devices",
                    );
                    peak_pending.fetch_max(pending as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    for a in agents {
        a.await.unwrap();
    }
    let load_elapsed = load_start.elapsed().as_secs_f64();
    let writes = c.metric("edgesync_controller_status_writes_total").await - writes_before;
    let budget = c.metric("edgesync_controller_write_budget_qps").await;
    sampler.abort();

    // A restart with the whole fleet in the API server.
    c.process.stop();
    let restarted = Instant::now();
    c.process.restart();
    let to_ready_again = ready_after(&c, restarted).await;
    let peak_rss = peak_rss.load(Ordering::Relaxed);

    println!();
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| Devices created (64 at a time) | {} in {:.1} s ({:.0}/s) |",
        n_nodes * per,
        created.as_secs_f64(),
        (n_nodes * per) as f64 / created.as_secs_f64()
    );
    println!(
        "| controller start -> ready | {:.1} s |",
        to_ready.as_secs_f64()
    );
    println!(
        "| controller restart -> ready | {:.1} s |",
        to_ready_again.as_secs_f64()
    );
    println!(
        "| controller RSS when ready, MiB | {:.1} |",
        ready_rss as f64 / 1024.0
    );
    println!(
        "| controller RSS peak under load, MiB | {:.1} |",
        peak_rss as f64 / 1024.0
    );
    println!(
        "| {n_nodes} desired-stream snapshots, one after another | {:.1} s |",
        snapshots.as_secs_f64()
    );
    println!(
        "| desired fan-out to {n_nodes} nodes, p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        percentile_ms(&fanout, 0.5),
        percentile_ms(&fanout, 0.99),
        percentile_ms(&fanout, 1.0)
    );
    println!(
        "| load: each node's {per} devices every 10 s for {} s, status writes/s | {:.0} (budget now {budget:.0}/s) |",
        load_secs(),
        writes / load_elapsed
    );
    println!(
        "| writer backlog peak (devices; bounded by the fleet) | {} |",
        peak_pending.load(Ordering::Relaxed)
    );
    println!(
        "| batches not answered 2xx | {} |",
        refused.load(Ordering::Relaxed)
    );
    println!();
    aim(
        "controller RSS <= 512 MiB with the whole fleet",
        &format!("{:.0} MiB peak", peak_rss as f64 / 1024.0),
        peak_rss <= 512 * 1024,
    );
}
