//! `make bench` (fleet scale): 100 edge nodes x 1,000 devices (100,000 Devices) against the
//! real API server, with one controller.
//!
//! Reported: the time to create the Devices; the controller's time from start to ready, and
//! again after a restart, and until its live state holds every device again; its RSS when
//! ready and at its peak; the desired-stream snapshots of all nodes; the fan-out latency of
//! a `spec.desired` change to each node's stream; under 100 load generators speaking the
//! agent protocol, each sending a fifth of its 1,000 devices' state every second (20,000
//! updates/s), first with durable answers (the status path) and then with live answers: the
//! updates answered, status writes/s, the CPU of the controller, the API server and etcd,
//! and, for live answers, the freshness of a watch of the live API through the API server;
//! and the first page of live-state selectors over the whole fleet. Then scale-out: replicas
//! with `--shards` added one at a time (1, 2, 3) to the same fleet, each step's time to
//! share the shards and cache every Device once, the replicas' RSS, and the same load sent
//! to the first replica (which forwards the others' nodes); then the third replica killed
//! (kill -9) under that load, with the live state watched through the API server: batches
//! refused, the time until its nodes are answered again, and live freshness meanwhile.
//!
//! A smoke run uses 5 nodes x 100 devices.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync_crds::{Device, DeviceSpec};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, DesiredStream, client, live_batch, report};
use edgesync_e2e::measure::{TICKS_PER_SECOND, aim, cpu_ticks, percentile_ms, scaled};
use edgesync_e2e::raw_mqtt::rss_kib;
use edgesync_protocol::wire::{self, DesiredEvent};
use futures_util::StreamExt as _;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

/// Shards of the scale-out phase: an even share for 1, 2 and 3 replicas.
const SHARDS: u32 = 24;

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
                ns = ns.name,
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
                let mut d = Device::new(
                    &format!("n{}-d{}", i / per, i % per),
                    DeviceSpec {
                        node_name: format!("node-{}", i / per),
                        desired: None,
                        reporting: None,
                    },
                );
                // A 1% sample the live freshness watch follows.
                if i % 100 == 0 {
                    d.metadata.labels = Some([("sample".to_owned(), "yes".to_owned())].into());
                }
                api.create(&PostParams::default(), &d).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let created = created.elapsed();

    // Built (if its sources changed) before the clock starts: start -> ready once counted a
    // release build of the controller (100-217 s).
    let _ = edgesync_e2e::controller::controller_binary();
    let started = Instant::now();
    let live_port = edgesync_e2e::free_port();
    let live_listen = format!("127.0.0.1:{live_port}");
    let mut c = Controller::spawn_with_log(&cp, &["--live-listen", &live_listen], "info");
    let to_ready = ready_after(&c, started).await;
    edgesync_e2e::live::register(&cp, live_port);
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

    // The same load on both paths: agents that wait for durable answers (the status path),
    // then agents that take live answers, whose states a watch of the live API follows.
    let durable = load_phase(&cp, &c, &ns.name, false, false, ready_rss, 0).await;
    let live = load_phase(&cp, &c, &ns.name, true, true, ready_rss, 1000).await;
    // What the live state holds in memory, by its own count.
    let live_devices = c.metric("edgesync_controller_live_devices").await;
    let state_bytes = c.metric("edgesync_controller_live_state_bytes").await;
    let window_bytes = c.metric("edgesync_controller_live_window_bytes").await;
    let peak_pending = durable.peak_pending.max(live.peak_pending);

    // Selectors over the whole fleet, first page (500) through the API server: one that
    // fills its page at once, and one that matches nothing, so every device is looked at.
    let selectors = [
        ("where=temperatureC%3E20", "every device matches"),
        ("where=n%3C0", "no device matches (the whole fleet scanned)"),
    ];
    let mut selector_rows = Vec::new();
    for (query, what) in selectors {
        let mut took = Vec::new();
        for _ in 0..scaled(20, 3) {
            let t = Instant::now();
            let path = format!(
                "/apis/live.edgesync.io/v1alpha1/namespaces/{}/devicestates?limit=500&{query}",
                ns.name
            );
            cp.kubectl_ok(&["get", "--raw", &path]);
            took.push(t.elapsed());
        }
        took.sort();
        selector_rows.push((what, percentile_ms(&took, 0.5), percentile_ms(&took, 0.99)));
    }
    let peak_rss = durable.peak_rss.max(live.peak_rss);

    // The statuses catch up once the load stops: every device's newest report written.
    let load_end = Instant::now();
    let caught_up = loop {
        let pending = c.metric("edgesync_controller_writer_pending_devices").await;
        if pending == 0.0 {
            break load_end.elapsed();
        }
        assert!(
            load_end.elapsed() < Duration::from_secs(600),
            "{pending} devices still wait for their status write 10 min after the load"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // A restart with the whole fleet in the API server.
    c.process.stop();
    let restarted = Instant::now();
    c.process.restart();
    let to_ready_again = ready_after(&c, restarted).await;
    // The live state rebuilt from the Device statuses: every device that had reported (a
    // smoke run's short load does not reach every device).
    let rebuilt = loop {
        let held = c.metric("edgesync_controller_live_devices").await;
        if held >= live_devices {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(300),
            "the live state holds {held} of the {live_devices} devices it held before, 5 min after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Scale-out: the same fleet over 1, 2 and 3 replicas sharing it by shard.
    c.process.stop();
    let (labelled, scale_out, killed) = scale_out(&cp, &ns.name).await;

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
        "| controller restart -> live state holds every device again (from the statuses) | {:.1} s |",
        rebuilt.as_secs_f64()
    );
    println!("| writer backlog peak (devices; bounded by the fleet) | {peak_pending} |");
    println!(
        "| after the load: every device's newest report in its status (the writer's backlog drained) | {:.1} s |",
        caught_up.as_secs_f64()
    );
    println!(
        "| live state: devices, states' bytes (bytes per device), watch window's bytes | {live_devices:.0}, {:.1} MiB ({:.0}), {:.1} MiB |",
        state_bytes / 1048576.0,
        state_bytes / live_devices.max(1.0),
        window_bytes / 1048576.0
    );
    for (what, p50, p99) in &selector_rows {
        println!("| live list, first page of 500, {what}: p50 / p99 | {p50:.0} / {p99:.0} ms |");
    }
    println!();
    println!(
        "Load: every node sends a fifth of its {per} devices each second ({:.0} updates/s offered), for {} s per path. Live freshness: from a batch's send to its state in a watch of the live API through the API server (a 1% sample of devices, by label).",
        (n_nodes * per) as f64 / 5.0,
        load_secs()
    );
    println!();
    println!(
        "| path | updates/s answered | status writes/s | batches not 2xx | controller CPU | API server CPU | etcd CPU | controller RSS peak, MiB | live p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, p) in [
        ("durable answers (before)", &durable),
        ("live answers", &live),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {} | {:.0}% | {:.0}% | {:.0}% | {:.0} | {} |",
            p.updates_per_s,
            p.writes_per_s,
            p.refused,
            100.0 * p.cpu.0,
            100.0 * p.cpu.1,
            100.0 * p.cpu.2,
            p.peak_rss as f64 / 1024.0,
            p.live
                .map_or_else(|| "-".to_owned(), |(a, b)| format!("{a:.0} / {b:.0}")),
        );
    }
    println!();
    println!(
        "Scale-out: replicas with `--shards {SHARDS}` (and `--live-listen`) added one at a time to the same fleet, whose objects the first labels with their shards (through its write budget, defaults); the same load sent to the first replica, which forwards other replicas' nodes to them (live answers)."
    );
    println!();
    println!(
        "The first replica labelled the {} Devices and {} EdgeNodes with their shards in {:.1} s; it was then restarted, as a deployment runs once labelled (labelling holds the unlabelled objects in memory too).",
        nodes() * per_node(),
        nodes(),
        labelled.as_secs_f64()
    );
    println!();
    println!(
        "| replicas | start -> every shard served, every Device cached once (1 replica: its restart) | Devices cached per replica | RSS per replica when settled, MiB | RSS peak per replica under load, MiB | updates/s answered | batches not 2xx | forwarded by the first |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &scale_out {
        let mib = |v: &[u64]| {
            v.iter()
                .map(|k| format!("{:.0}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "| {} | {:.1} s | {} | {} | {} | {:.0} | {} | {:.0} |",
            r.replicas,
            r.settled.as_secs_f64(),
            r.cached
                .iter()
                .map(|c| format!("{c:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            mib(&r.settled_rss),
            mib(&r.peak_rss),
            r.load.updates_per_s,
            r.load.refused,
            r.forwarded,
        );
    }
    println!();
    println!(
        "kill -9 of the third replica {} s into {KILL_PHASE_SECS} s of the same load through the first, with the live state watched through the API server (reaching the first replica, which merges every replica's watch):",
        KILL_AFTER.as_secs()
    );
    println!();
    println!(
        "| updates/s answered | batches not 2xx (503 while the shards move) | kill -> last batch refused | live p50 / p99 ms, whole phase |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {:.0} | {} | {} | {} |",
        killed.load.updates_per_s,
        killed.load.refused,
        killed.handover.map_or_else(
            || "none refused".to_owned(),
            |d| format!("{:.1} s", d.as_secs_f64())
        ),
        killed
            .load
            .live
            .map_or_else(|| "-".to_owned(), |(a, b)| format!("{a:.0} / {b:.0}")),
    );
    println!();
    aim(
        "controller RSS <= 512 MiB with the whole fleet",
        &format!("{:.0} MiB peak", peak_rss as f64 / 1024.0),
        peak_rss <= 512 * 1024,
    );
    let live_p99 = live.live.map_or(f64::INFINITY, |(_, p99)| p99);
    aim(
        &format!(
            "{} Devices, {:.0} updates/s offered: live p99 <= 1 s",
            n_nodes * per,
            (n_nodes * per) as f64 / 5.0
        ),
        &format!(
            "{live_p99:.0} ms, {:.0} updates/s answered",
            live.updates_per_s
        ),
        live_p99 <= 1000.0,
    );
    let (_, _, scan_p99) = selector_rows[1];
    aim(
        &format!(
            "a selector over {} devices: first page p99 <= 1 s",
            n_nodes * per
        ),
        &format!("{scan_p99:.0} ms (whole fleet scanned)"),
        scan_p99 <= 1000.0,
    );
}

/// What one load phase measured.
struct Phase {
    updates_per_s: f64,
    writes_per_s: f64,
    refused: u64,
    /// The first and last batch not answered 2xx.
    refusals: Option<(Instant, Instant)>,
    /// Controller, API server, etcd: share of one core.
    cpu: (f64, f64, f64),
    peak_rss: u64,
    peak_pending: u64,
    /// Live freshness p50 and p99, ms (live answers only).
    live: Option<(f64, f64)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every node sends a fifth of its devices each second (each device every 5 s), with live
/// answers or durable ones, for `load_secs()`; a node waits for each answer before its next
/// batch, as an agent's in-flight window would make it.
async fn load_phase(
    cp: &ControlPlane,
    c: &Controller,
    ns: &str,
    live: bool,
    follow_live: bool,
    ready_rss: u64,
    version_base: u64,
) -> Phase {
    load_phase_for(
        cp,
        c,
        ns,
        (live, follow_live),
        ready_rss,
        version_base,
        load_secs(),
    )
    .await
}

/// [`load_phase`] for `secs` seconds.
async fn load_phase_for(
    cp: &ControlPlane,
    c: &Controller,
    ns: &str,
    (live, follow_live): (bool, bool),
    ready_rss: u64,
    version_base: u64,
    secs: u64,
) -> Phase {
    let (n_nodes, per) = (nodes(), per_node());
    let pid = c.process.pid().unwrap();
    let writes_before = c.metric("edgesync_controller_status_writes_total").await;
    let peak_rss = Arc::new(AtomicU64::new(ready_rss));
    let peak_pending = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
    let answered = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let phase_start_ms = now_ms();
    let watch = follow_live.then(|| {
        let (latencies, ns) = (latencies.clone(), ns.to_owned());
        let kubeconfig = cp.kubeconfig().to_path_buf();
        tokio::spawn(async move {
            let client = ControlPlane::client_from(&kubeconfig).await;
            let api = edgesync_e2e::live::devicestates(client, &ns);
            let config = watcher::Config::default().labels("sample=yes");
            let stream = watcher(api, config).default_backoff().applied_objects();
            let mut stream = std::pin::pin!(stream);
            // A relist (after a 410) shows states already seen again: each state counts once,
            // when first seen (a 410 would count too: its relist shows nothing newer).
            let mut seen: std::collections::HashMap<String, u64> = Default::default();
            while let Some(item) = stream.next().await {
                let Ok(o) = item else { continue };
                let (Some(sent), Some(n)) = (
                    o.data["reported"]["sentMs"].as_u64(),
                    o.data["reported"]["n"].as_u64(),
                ) else {
                    continue;
                };
                let last = seen.entry(o.metadata.name.unwrap_or_default()).or_default();
                // The watch's initial list shows states of the phase before: not this one's.
                if n > *last && sent >= phase_start_ms {
                    *last = n;
                    let took = now_ms().saturating_sub(sent);
                    latencies.lock().unwrap().push(Duration::from_millis(took));
                }
            }
        })
    });
    let cpu_before = (
        cpu_ticks(pid),
        cpu_ticks(cp.apiserver_pid().unwrap()),
        cpu_ticks(cp.etcd_pid().unwrap()),
    );
    let load_start = Instant::now();
    let mut agents = Vec::new();
    for k in 0..n_nodes {
        let (url, ns_name) = (c.url(), ns.to_owned());
        let (refused, answered, latencies) = (refused.clone(), answered.clone(), latencies.clone());
        let refusals = refusals.clone();
        agents.push(tokio::spawn(async move {
            let http = client();
            // Staggered over the first second.
            tokio::time::sleep(Duration::from_millis((k as u64 * 1000) / n_nodes as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let fifth = per.div_ceil(5);
            let epoch = format!("{:032x}", k + 1);
            let mut seq = 0u64;
            while load_start.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                seq += 1;
                let part = (seq as usize - 1) % 5;
                let reports = (part * fifth..((part + 1) * fifth).min(per))
                    .map(|d| {
                        // Each device's version counts its own reports, on from the phase
                        // before (one agent epoch throughout, as one agent would keep).
                        let version = (seq - 1) / 5 + 1 + version_base;
                        report(
                            &format!("n{k}-d{d}"),
                            version,
                            json!({"n": version, "temperatureC": 21.5, "sentMs": now_ms()}),
                        )
                    })
                    .collect::<Vec<_>>();
                let sent = reports.len() as u64;
                let mut b = live_batch(seq, &epoch, reports);
                b.live = live;
                let r = http
                    .post(format!(
                        "{url}{}",
                        wire::reports_path(&ns_name, &format!("node-{k}"))
                    ))
                    .bearer_auth(format!("token-{k}"))
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&b).unwrap())
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    answered.fetch_add(sent, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    let mut span = refusals.lock().unwrap();
                    *span = Some(span.map_or((now, now), |(first, _)| (first, now)));
                }
            }
            drop(latencies);
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
    let elapsed = load_start.elapsed().as_secs_f64();
    let share = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / elapsed;
    let cpu = (
        share(cpu_ticks(pid) - cpu_before.0),
        share(cpu_ticks(cp.apiserver_pid().unwrap()) - cpu_before.1),
        share(cpu_ticks(cp.etcd_pid().unwrap()) - cpu_before.2),
    );
    let writes = c.metric("edgesync_controller_status_writes_total").await - writes_before;
    sampler.abort();
    if let Some(w) = watch {
        // The last states of the phase reach the watch.
        tokio::time::sleep(Duration::from_secs(2)).await;
        w.abort();
    }
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    Phase {
        updates_per_s: answered.load(Ordering::Relaxed) as f64 / elapsed,
        writes_per_s: writes / elapsed,
        refused: refused.load(Ordering::Relaxed),
        refusals: *refusals.lock().unwrap(),
        cpu,
        peak_rss: peak_rss.load(Ordering::Relaxed),
        peak_pending: peak_pending.load(Ordering::Relaxed),
        live: (live && !l.is_empty()).then(|| (percentile_ms(&l, 0.5), percentile_ms(&l, 0.99))),
    }
}

/// One step of the scale-out phase.
struct ScaleStep {
    replicas: usize,
    settled: Duration,
    cached: Vec<f64>,
    settled_rss: Vec<u64>,
    peak_rss: Vec<u64>,
    load: Phase,
    forwarded: f64,
}

/// Replicas with `--shards` added one at a time to the fleet: after each, the time until the
/// shards are shared and every Device is cached by exactly one replica, each replica's RSS
/// then, and under the load sent to the first replica. Also returned: the time the first
/// replica took to label the fleet (after which it is restarted and measured).
async fn scale_out(cp: &ControlPlane, ns: &str) -> (Duration, Vec<ScaleStep>, KillStep) {
    let total = (nodes() * per_node()) as f64;
    let mut replicas: Vec<Controller> = Vec::new();
    let mut live_ports = Vec::new();
    let mut steps = Vec::new();
    let mut labelled = None;
    for m in 1..=3usize {
        let started = Instant::now();
        let live_port = edgesync_e2e::free_port();
        live_ports.push(live_port);
        let live_listen = format!("127.0.0.1:{live_port}");
        let identity = format!("replica-{m}");
        replicas.push(Controller::spawn_with_log(
            cp,
            &[
                "--shards",
                &SHARDS.to_string(),
                "--lease-name",
                "fleet",
                "--identity",
                &identity,
                "--live-listen",
                &live_listen,
            ],
            "info",
        ));
        replicas[m - 1].wait_serving();
        let fair = f64::from(SHARDS.div_ceil(m as u32));
        let cached = loop {
            let mut cached = Vec::new();
            let (mut nodes_cached, mut served, mut fair_each) = (0.0, 0.0, true);
            for r in &replicas {
                let text = r.metrics().await;
                let value = |series| edgesync_e2e::controller::metric_value(&text, series);
                cached.push(value("edgesync_controller_cached_devices"));
                nodes_cached += value("edgesync_controller_cached_nodes");
                let s = value("edgesync_controller_shards_served");
                served += s;
                fair_each &= s <= fair;
            }
            // Every shard served by one replica, whose caches hold only its shards: every
            // Device and EdgeNode cached exactly once (the first step also waits for the
            // leader to label the fleet).
            if cached.iter().sum::<f64>() == total
                && nodes_cached == nodes() as f64
                && served == f64::from(SHARDS)
                && fair_each
            {
                break cached;
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "{m} replicas: shards not settled in 15 min (Devices cached {cached:?}, shards served {served})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let mut settled = started.elapsed();
        let mut cached = cached;
        if m == 1 {
            // The first replica labelled the fleet, holding the unlabelled objects too while
            // it did: measured after a restart, as a deployment runs once labelled.
            labelled = Some(settled);
            replicas[0].process.stop();
            let restarted = Instant::now();
            replicas[0].process.restart();
            replicas[0].wait_serving();
            cached = loop {
                let text = replicas[0].metrics().await;
                let value = |series| edgesync_e2e::controller::metric_value(&text, series);
                if value("edgesync_controller_shards_served") == f64::from(SHARDS)
                    && value("edgesync_controller_cached_devices") == total
                {
                    break vec![total];
                }
                assert!(
                    restarted.elapsed() < Duration::from_secs(300),
                    "the first replica not serving every shard 5 min after its restart"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            settled = restarted.elapsed();
        }
        let pids: Vec<u32> = replicas.iter().map(|r| r.pid().unwrap()).collect();
        let settled_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
        let peaks = Arc::new(std::sync::Mutex::new(settled_rss.clone()));
        let sampler = {
            let (peaks, pids) = (Arc::clone(&peaks), pids.clone());
            tokio::spawn(async move {
                loop {
                    for (i, p) in pids.iter().enumerate() {
                        let mut peaks = peaks.lock().unwrap();
                        peaks[i] = peaks[i].max(rss_kib(*p));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let first = &replicas[0];
        let forwarded_before = first
            .metric(r#"edgesync_controller_forwarded_requests_total{result="answered"}"#)
            .await;
        let load = load_phase(
            cp,
            first,
            ns,
            true,
            false,
            settled_rss[0],
            1000 * (m as u64 + 1),
        )
        .await;
        sampler.abort();
        let forwarded = first
            .metric(r#"edgesync_controller_forwarded_requests_total{result="answered"}"#)
            .await
            - forwarded_before;
        let peak_rss = peaks.lock().unwrap().clone();
        steps.push(ScaleStep {
            replicas: m,
            settled,
            cached,
            settled_rss,
            peak_rss,
            load,
            forwarded,
        });
    }
    // kill -9 of the third replica while the load goes on through the first, the live state
    // watched through the API server (which reaches the first replica: a merged watch).
    edgesync_e2e::live::register(cp, live_ports[0]);
    let mut victim = replicas.pop().unwrap();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(KILL_AFTER).await;
        victim.process.kill9();
        (victim, Instant::now())
    });
    let rss = rss_kib(replicas[0].pid().unwrap());
    let load = load_phase_for(
        cp,
        &replicas[0],
        ns,
        (true, true),
        rss,
        5000,
        KILL_PHASE_SECS,
    )
    .await;
    let (_victim, killed_at) = killer.await.unwrap();
    let handover = load
        .refusals
        .map(|(_, last)| last.saturating_duration_since(killed_at));
    (
        labelled.unwrap_or_default(),
        steps,
        KillStep { load, handover },
    )
}

/// A replica killed 5 s into a load phase of 45 s: long enough for its shards to be taken
/// over (the Lease duration, 15 s, and a round) within it.
const KILL_AFTER: Duration = Duration::from_secs(5);
const KILL_PHASE_SECS: u64 = 45;

/// The kill -9 step of the scale-out phase.
struct KillStep {
    load: Phase,
    /// From the kill to the last batch refused (its nodes' shards taken over).
    handover: Option<Duration>,
}
