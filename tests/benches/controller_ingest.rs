//! `make bench` (controller part): report ingestion against a real kube-apiserver.
//!
//! 1. Saturation: 10,000 Devices, concurrent clients pushing batches of new versions as fast
//!    as they are answered: reports/s answered 2xx, API-server writes/s (must stay within the
//!    write budget), 429s.
//! 2. Paced fleets at 1 Hz per device, 1,000 and 10,000 devices: API writes per device update,
//!    p99 time from a report's arrival to its durable write, and the kube-apiserver process's
//!    CPU.
//!
//! The controller runs with its default (adaptive) write budget unless `BENCH_WRITE_QPS` sets
//! a fixed one.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync_crds::{Device, DeviceSpec};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, batch, client, create_node, metric_value, report};
use edgesync_e2e::measure::{TICKS_PER_SECOND, cpu_ticks, histogram_buckets, quick, scaled};
use edgesync_protocol::wire;
use futures_util::StreamExt as _;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// The state the front-door phase re-sends, already durable at version 1.
fn front_door_state() -> serde_json::Value {
    json!({"temperatureC": 21.5, "rpm": 1200, "state": "running"})
}

/// Devices (a smoke run uses fewer).
fn devices() -> usize {
    scaled(10_000, 300)
}
const BATCH: usize = 1000;
const CLIENTS: usize = 8;
/// Seconds of each phase.
fn phase_secs() -> u64 {
    scaled(20, 3)
}

/// p99 from a Prometheus histogram's cumulative buckets (upper bound of the bucket).
fn p99(metrics: &str, name: &str, before: &[(f64, f64)]) -> String {
    let buckets = histogram_buckets(metrics, name);
    let delta: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, b)| *b),
            )
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    if total == 0.0 {
        return "n/a".into();
    }
    delta
        .iter()
        .find(|(_, c)| *c >= 0.99 * total)
        .map_or("> 10 s".into(), |(le, _)| {
            if le.is_infinite() {
                "> 10 s".into()
            } else {
                format!("<= {le} s")
            }
        })
}

struct Window {
    writes: f64,
    cpu: u64,
    at: Instant,
    hist: Vec<(f64, f64)>,
}

async fn window(c: &Controller, pid: u32) -> Window {
    let m = c.metrics().await;
    Window {
        writes: metric_value(&m, "edgesync_controller_status_writes_total"),
        cpu: cpu_ticks(pid),
        at: Instant::now(),
        hist: histogram_buckets(&m, "edgesync_controller_report_durable_seconds"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cp = ControlPlane::start();
    let ns = cp.namespace("bench");
    create_node(
        &cp,
        &ns.name,
        "edge-1",
        "bench-token",
        "  limits:\n    reportsPerSecond: 100000000\n    burst: 100000000\n    maxReportsPerBatch: 10000",
    );
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let created = Instant::now();
    futures_util::stream::iter(0..devices())
        .map(|i| {
            let api = api.clone();
            async move {
                let d = Device::new(
                    &format!("d-{i}"),
                    DeviceSpec {
                        node_name: "edge-1".into(),
                        desired: None,
                        reporting: None,
                    },
                );
                api.create(&PostParams::default(), &d).await.unwrap();
                // Version 1 is already durable: the front-door run below re-sends it.
                let mut d = api.get(&format!("d-{i}")).await.unwrap();
                d.status = Some(edgesync_crds::DeviceStatus {
                    reported: front_door_state().as_object().cloned(),
                    reported_version: Some(1),
                    ..Default::default()
                });
                api.replace_status(&format!("d-{i}"), &PostParams::default(), &d)
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    println!("created {} Devices in {:.1?}", devices(), created.elapsed());

    let mut args = vec![];
    let qps = std::env::var("BENCH_WRITE_QPS").ok();
    if let Some(q) = &qps {
        // A fixed budget (min = max).
        args.extend([
            "--write-qps",
            q.as_str(),
            "--write-qps-min",
            q.as_str(),
            "--write-qps-max",
            q.as_str(),
            "--write-burst",
            q.as_str(),
        ]);
    }
    let c = Controller::start(&cp, &args);
    let pid = cp.apiserver_pid().unwrap();
    let url = Arc::new(c.url());
    let ns_name = Arc::new(ns.name.clone());
    let versions: Arc<Vec<AtomicU64>> =
        Arc::new((0..devices()).map(|_| AtomicU64::new(0)).collect());

    // 0. Front door: batches re-sending versions that are already durable (what an agent's
    // retry after a lost answer looks like): auth, parsing, validation, ownership and the
    // version check, with no API write to wait for.
    c.wait_ready();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + scaled(Duration::from_secs(10), Duration::from_secs(2));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let (url, ns_name, answered) = (url.clone(), ns_name.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let http = client();
            let reports: Vec<_> = (0..BATCH)
                .map(|j| {
                    report(
                        &format!("d-{}", (k * BATCH + j) % devices()),
                        1,
                        front_door_state(),
                    )
                })
                .collect();
            let body = serde_json::to_vec(&batch(1, reports)).unwrap();
            while Instant::now() < stop {
                let r = http
                    .post(format!("{url}{}", wire::reports_path(&ns_name, "edge-1")))
                    .bearer_auth("bench-token")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                assert!(status.is_success(), "{status}: {text}");
                answered.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "front door, {CLIENTS} clients x {BATCH}-report batches of already-durable versions: {:.0} reports/s answered 2xx (no API writes needed)",
        answered.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
    );
    for v in versions.iter() {
        v.store(1, Ordering::Relaxed);
    }

    // 1. Saturation.
    let ok_reports = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let before = window(&c, pid).await;
    let stop = Instant::now() + Duration::from_secs(phase_secs());
    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let (url, ns_name, versions, ok_reports, refused) = (
            url.clone(),
            ns_name.clone(),
            versions.clone(),
            ok_reports.clone(),
            refused.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let http = client();
            let mut round = 0usize;
            while Instant::now() < stop {
                let reports = (0..BATCH)
                    .map(|j| {
                        let d = (k * BATCH + round * BATCH * CLIENTS + j) % devices();
                        let v = versions[d].fetch_add(1, Ordering::Relaxed) + 1;
                        report(
                            &format!("d-{d}"),
                            v,
                            json!({"v": v, "temperatureC": 21.5, "rpm": 1200, "state": "running"}),
                        )
                    })
                    .collect();
                round += 1;
                let body = serde_json::to_vec(&batch(round as u64, reports)).unwrap();
                let r = http
                    .post(format!("{url}{}", wire::reports_path(&ns_name, "edge-1")))
                    .bearer_auth("bench-token")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                if r.status().is_success() {
                    ok_reports.fetch_add(BATCH as u64, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = window(&c, pid).await;
    let secs = (after.at - before.at).as_secs_f64();
    let writes = after.writes - before.writes;
    let (n_devices, n_secs) = (devices(), phase_secs());
    println!(
        "saturation, {n_devices} devices, {CLIENTS} clients x {BATCH}-report batches, {n_secs} s: \
         {:.0} reports/s answered 2xx, {} batches refused (429/503), {:.0} API writes/s (budget {}), \
         kube-apiserver CPU {:.0}%",
        ok_reports.load(Ordering::Relaxed) as f64 / secs,
        refused.load(Ordering::Relaxed),
        writes / secs,
        qps.as_deref().unwrap_or("adaptive from 200/s, burst 400"),
        (after.cpu - before.cpu) as f64 / TICKS_PER_SECOND / secs * 100.0,
    );
    // Let the backlog drain before the paced runs.
    let drain = if qps.is_some() || quick() { 5 } else { 60 };
    tokio::time::sleep(Duration::from_secs(drain)).await;

    // 2. Paced fleets at 1 Hz per device.
    let fleets = if quick() {
        vec![devices()]
    } else {
        vec![1000, devices()]
    };
    for fleet in fleets {
        let before = window(&c, pid).await;
        let sent = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        // One agent-like client per 1000 devices, one batch per second each.
        for k in 0..fleet.div_ceil(1000) {
            let (url, ns_name, versions, sent, refused) = (
                url.clone(),
                ns_name.clone(),
                versions.clone(),
                sent.clone(),
                refused.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let http = client();
                for s in 0..phase_secs() {
                    tokio::time::sleep_until(start + Duration::from_secs(s)).await;
                    let reports: Vec<_> = (k * 1000..((k + 1) * 1000).min(fleet))
                        .map(|d| {
                            let v = versions[d].fetch_add(1, Ordering::Relaxed) + 1;
                            report(&format!("d-{d}"), v, json!({"v": v, "temperatureC": 21.5}))
                        })
                        .collect();
                    sent.fetch_add(reports.len() as u64, Ordering::Relaxed);
                    let body = serde_json::to_vec(&batch(s, reports)).unwrap();
                    let http = http.clone();
                    let url = format!("{url}{}", wire::reports_path(&ns_name, "edge-1"));
                    let refused = refused.clone();
                    // Like an agent with batches in flight: do not wait for the answer to send the next second.
                    tokio::spawn(async move {
                        let r = http
                            .post(url)
                            .bearer_auth("bench-token")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        if !r.status().is_success() {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Let the writes in flight finish (a batch waits at most the 10 s durable wait).
        tokio::time::sleep(scaled(Duration::from_secs(11), Duration::from_secs(3))).await;
        let after = window(&c, pid).await;
        let secs = (after.at - before.at).as_secs_f64();
        let writes = after.writes - before.writes;
        let updates = sent.load(Ordering::Relaxed) as f64;
        let m = c.metrics().await;
        let n_secs = phase_secs();
        println!(
            "paced {fleet} devices x 1 Hz for {n_secs} s: {updates:.0} updates -> {writes:.0} API writes \
             ({:.3} writes per update, {:.0} writes/s), p99 arrival->durable {}, batches refused {}, \
             kube-apiserver CPU {:.0}% (over {secs:.0} s incl. drain)",
            writes / updates,
            writes / secs,
            p99(
                &m,
                "edgesync_controller_report_durable_seconds",
                &before.hist
            ),
            refused.load(Ordering::Relaxed),
            (after.cpu - before.cpu) as f64 / TICKS_PER_SECOND / secs * 100.0,
        );
    }
}
