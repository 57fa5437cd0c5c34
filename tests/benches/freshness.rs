//! `make bench` (freshness): publish -> Device status time, end to end through separate real
//! processes (Mosquitto, the agent, the controller, kube-apiserver), measured the way an
//! outside probe would: devices publish plain JSON over MQTT at a paced rate, and a watch on
//! the Devices sees each state arrive. In the same run, a watch of the live state
//! (`devicestates.live.edgesync.io`, through the API server's aggregation layer) sees each
//! state too: the two paths, side by side.
//!
//! Fleets: 100 devices x 1 Hz and 1,000 devices x 1 Hz (`FRESHNESS_FLEETS` overrides, e.g.
//! `100,1000`; `FRESHNESS_CONTROLLER_ARGS` adds controller options,
//! `FRESHNESS_AGENT_TOML` agent config sections, `\n` for newlines). A publish counts as
//! fresh once the status shows it or a later state of the same device (a coalesced state is
//! superseded, not lost). Reported: how long until every device had a status (their
//! registration, which happens once per device), then, over a steady run after a warm-up,
//! p50 and p99, API writes per update, the agent's CPU, and what the load costs another
//! client of the API server: the p99 of a loop of ConfigMap GETs during the run, against the
//! same loop on a quiet server. The CPU of the controller, the API server and etcd, and the
//! share of the machine busy during the run, say where the machine's CPU went and whether
//! that client's wait is for a CPU.
//!
//! Both API clients are what they would be in a cluster: the controller has the identity
//! `deploy/` gives it (its ServiceAccount's RBAC, its writes in the priority level of
//! `deploy/base/flowcontrol.yaml`), and the other client is a ServiceAccount too, in the API
//! server's usual level for service accounts. Neither is the harness's admin, whose requests
//! API Priority and Fairness exempts.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_e2e::bystander;
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::measure::{
    TICKS_PER_SECOND, aim, busy_share, cpu_ticks, machine_ticks, percentile_ms, scaled,
};
use edgesync_e2e::stack::{Stack, StackOptions};
use futures_util::StreamExt as _;
use kube::runtime::{WatchStreamExt as _, watcher};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;

/// Measured publishing time per fleet, after every device has a status and the warm-up
/// (shorter in a smoke run).
fn run() -> Duration {
    scaled(Duration::from_secs(20), Duration::from_secs(4))
}

/// Publishes in this time after every device has a status are not counted.
fn warmup() -> Duration {
    scaled(Duration::from_secs(3), Duration::from_secs(1))
}

/// Publish times per device, by sequence number, and the latencies measured so far, for
/// each path.
#[derive(Default)]
struct Ledger {
    published: HashMap<String, Vec<(u64, Instant)>>,
    /// The same publishes, consumed by the live state's watch.
    published_live: HashMap<String, Vec<(u64, Instant)>>,
    live_latencies: Vec<Duration>,
    /// Devices whose status the watch has shown.
    with_status: HashSet<String>,
    /// Publishes from this moment on are measured.
    measure_from: Option<Instant>,
    latencies: Vec<Duration>,
    /// Measured publishes.
    count: u64,
}

/// One fleet's figures.
struct Fleet {
    row: String,
    p50: f64,
    p99: f64,
    /// The live path: p50 and p99, ms.
    live: (f64, f64),
    /// The agent's CPU, share of one core.
    cpu: f64,
    /// Another client's GET p99 on a quiet API server and during the load, ms.
    bystander: (f64, f64),
}

/// Every publish of `name` up to `n` is now seen: their latencies, for the measured ones.
fn seen_up_to(
    published: &mut HashMap<String, Vec<(u64, Instant)>>,
    name: &str,
    n: u64,
    measure_from: Option<Instant>,
    seen: Instant,
    latencies: &mut Vec<Duration>,
) {
    if let Some(list) = published.get_mut(name) {
        for (_, at) in list.iter().filter(|(k, _)| *k <= n) {
            if measure_from.is_some_and(|m| *at >= m) {
                latencies.push(seen - *at);
            }
        }
        list.retain(|(k, _)| *k > n);
    }
}

/// Follows the live state's DeviceStates in `ns` through the API server.
fn watch_live(
    client: kube::Client,
    ns: &str,
    ledger: Arc<Mutex<Ledger>>,
) -> tokio::task::JoinHandle<()> {
    let api = edgesync_e2e::live::devicestates(client, ns);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let Ok(o) = item else { continue };
            let seen = Instant::now();
            let Some(n) = o.data["reported"]["n"].as_u64() else {
                continue;
            };
            let name = o.metadata.name.unwrap_or_default();
            let mut l = ledger.lock().unwrap();
            let Ledger {
                published_live,
                measure_from,
                live_latencies,
                ..
            } = &mut *l;
            seen_up_to(
                published_live,
                &name,
                n,
                *measure_from,
                seen,
                live_latencies,
            );
        }
    })
}

async fn fleet(cp: &'static ControlPlane, devices: usize) -> Fleet {
    let live_port = edgesync_e2e::free_port();
    let mut controller_args: Vec<String> = std::env::var("FRESHNESS_CONTROLLER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    controller_args.extend(["--live-listen".to_owned(), format!("127.0.0.1:{live_port}")]);
    let stack = Stack::start(
        cp,
        &format!("fresh-{devices}"),
        StackOptions {
            node_spec: "  autoRegisterDevices: true".into(),
            controller_args,
            agent_toml: std::env::var("FRESHNESS_AGENT_TOML")
                .unwrap_or_default()
                .replace("\\n", "\n"),
            // As deploy/ runs it: its RBAC, and its writes in their own priority level.
            deployed_identity: true,
            ..StackOptions::default()
        },
    )
    .await;
    // This fleet's controller serves the live API.
    edgesync_e2e::live::register(cp, live_port);
    let api = stack.devices().await;
    let other = bystander::identity(cp, &stack.ns.name);
    let quiet = bystander::get_latencies(&other, &stack.ns.name, Duration::from_secs(5)).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let started = Instant::now();
    let watch = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(d)) = stream.next().await {
                let seen = Instant::now();
                let Some(n) = d
                    .status
                    .and_then(|s| s.reported)
                    .and_then(|r| r.get("n").and_then(serde_json::Value::as_u64))
                else {
                    continue;
                };
                let name = d.metadata.name.unwrap_or_default();
                let mut l = ledger.lock().unwrap();
                let Ledger {
                    published,
                    with_status,
                    measure_from,
                    latencies,
                    ..
                } = &mut *l;
                seen_up_to(published, &name, n, *measure_from, seen, latencies);
                if !with_status.contains(&name) {
                    with_status.insert(name);
                }
            }
        })
    };
    let live_watch = watch_live(cp.client().await, &stack.ns.name, ledger.clone());
    let agent_pid = stack.agent.pid().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // One MQTT client per 100 devices; each device publishes once a second, spread evenly.
    let mut publishers = Vec::new();
    for c in 0..devices.div_ceil(100) {
        let names: Vec<String> = (c * 100..((c + 1) * 100).min(devices))
            .map(|d| format!("dev-{d}"))
            .collect();
        let mut o = MqttOptions::new(
            format!("fleet-{devices}-{c}"),
            "127.0.0.1",
            stack.broker.port(),
        );
        o.set_keep_alive(Duration::from_secs(30)).set_inflight(200);
        let (client, mut el) = AsyncClient::new(o, 1000);
        publishers.push(tokio::spawn(
            async move { while el.poll().await.is_ok() {} },
        ));
        let ledger = ledger.clone();
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            let gap = Duration::from_secs(1) / names.len() as u32;
            let mut tick = tokio::time::interval(gap);
            for n in 1u64.. {
                for name in &names {
                    tick.tick().await;
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    {
                        let mut l = ledger.lock().unwrap();
                        if l.measure_from.is_some() {
                            l.count += 1;
                        }
                        let now = Instant::now();
                        l.published.entry(name.clone()).or_default().push((n, now));
                        l.published_live
                            .entry(name.clone())
                            .or_default()
                            .push((n, now));
                    }
                    let body = json!({"n": n, "temperatureC": 21.5}).to_string();
                    if client
                        .publish(
                            format!("factory/{name}/state"),
                            QoS::AtLeastOnce,
                            false,
                            body,
                        )
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }));
    }
    // Every device registers (a Device is created) with its first report: a one-time cost,
    // reported apart from the steady state measured after it.
    let deadline = started + Duration::from_secs(120);
    while ledger.lock().unwrap().with_status.len() < devices {
        assert!(
            Instant::now() < deadline,
            "{devices} devices did not all get a status within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let onboarded = started.elapsed();
    tokio::time::sleep(warmup()).await;
    let writes_before = stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await;
    let apiserver_pid = cp.apiserver_pid().expect("the API server runs");
    let etcd_pid = cp.etcd_pid().expect("etcd runs");
    let controller_pid = stack.controller.pid().expect("the controller runs");
    let cpu_before = (
        cpu_ticks(agent_pid),
        cpu_ticks(apiserver_pid),
        machine_ticks(),
        cpu_ticks(controller_pid),
        cpu_ticks(etcd_pid),
    );
    ledger.lock().unwrap().measure_from = Some(Instant::now());
    let busy = bystander::get_latencies(&other, &stack.ns.name, run()).await;
    let share = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / run().as_secs_f64();
    let cpu = share(cpu_ticks(agent_pid) - cpu_before.0);
    let apiserver_cpu = share(cpu_ticks(apiserver_pid) - cpu_before.1);
    let controller_cpu = share(cpu_ticks(controller_pid) - cpu_before.3);
    let etcd_cpu = share(cpu_ticks(etcd_pid) - cpu_before.4);
    let machine_busy = busy_share(cpu_before.2, machine_ticks());
    stop.store(true, Ordering::Relaxed);
    // Let the last states land, then stop.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let writes = stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await
        - writes_before;
    for p in publishers {
        p.abort();
    }
    watch.abort();
    live_watch.abort();
    let mut l = ledger.lock().unwrap();
    let updates = l.count;
    let unseen: usize = l.published.values().map(Vec::len).sum();
    let unseen_live: usize = l.published_live.values().map(Vec::len).sum();
    l.latencies.sort();
    l.live_latencies.sort();
    let (p50, p99) = (
        percentile_ms(&l.latencies, 0.5),
        percentile_ms(&l.latencies, 0.99),
    );
    let live = (
        percentile_ms(&l.live_latencies, 0.5),
        percentile_ms(&l.live_latencies, 0.99),
    );
    let bystander = (percentile_ms(&quiet, 0.99), percentile_ms(&busy, 0.99));
    let row = format!(
        "| {devices} devices x 1 Hz | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.1}% | {:.1} -> {:.1} | {:.0}% | {:.0}% | {:.0}% | {:.0}% |",
        onboarded.as_secs_f64(),
        live.0,
        live.1,
        p50,
        p99,
        if unseen == 0 && unseen_live == 0 {
            "yes".to_owned()
        } else {
            format!("no ({unseen} never in a status, {unseen_live} never live)")
        },
        writes / updates.max(1) as f64,
        100.0 * cpu,
        bystander.0,
        bystander.1,
        100.0 * controller_cpu,
        100.0 * apiserver_cpu,
        100.0 * etcd_cpu,
        100.0 * machine_busy,
    );
    Fleet {
        row,
        p50,
        p99,
        live,
        cpu,
        bystander,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let fleets: Vec<usize> = std::env::var("FRESHNESS_FLEETS")
        .unwrap_or_else(|_| scaled("100,1000", "100").into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cp = ControlPlane::shared();
    println!(
        "edgesync freshness: MQTT publish -> DeviceState (live state) and Device status, each seen by a watch through the API server, {} s per fleet once every device has a status ({} s warm-up), default options",
        run().as_secs(),
        warmup().as_secs()
    );
    let mut judged = Vec::new();
    for devices in fleets {
        judged.push((devices, fleet(cp, devices).await));
    }
    println!();
    println!(
        "| load | every device has a status after, s | live p50 ms | live p99 ms | status p50 ms | status p99 ms | converged | API writes per update | agent CPU (one core = 100%) | another client's GET p99 ms, quiet -> during | controller CPU | API server CPU | etcd CPU | machine CPU busy (both cores) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (_, f) in &judged {
        println!("{}", f.row);
    }
    println!();
    // The API server's write ceiling, from the apiserver_ceiling bench of the same run.
    let ceiling: Option<f64> = std::env::var("EDGESYNC_WRITE_CEILING")
        .ok()
        .and_then(|v| v.parse().ok());
    for (devices, f) in judged {
        let Fleet { p50, p99, .. } = f;
        if devices == 1000 {
            aim(
                "1000 devices x 1 Hz: publish -> DeviceState watch event p99 <= 100 ms",
                &format!(
                    "p99 {:.0} ms (status path, same run: {p99:.0} ms)",
                    f.live.1
                ),
                f.live.1 <= 100.0,
            );
            aim(
                "agent CPU at 1000 devices x 1 Hz <= 5% of a core",
                &format!("{:.1}%", 100.0 * f.cpu),
                f.cpu <= 0.05,
            );
            // "Keep their p99": within twice the quiet figure.
            aim(
                "another client's GET p99 during the 1000-device load within 2 x its quiet p99",
                &format!("{:.1} -> {:.1} ms", f.bystander.0, f.bystander.1),
                f.bystander.1 <= 2.0 * f.bystander.0,
            );
        }
        match devices {
            100 => aim(
                "100 devices x 1 Hz: p50 <= 10 ms and p99 <= 40 ms",
                &format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
                p50 <= 10.0 && p99 <= 40.0,
            ),
            n => match ceiling {
                Some(c) => {
                    let bound = (1.2 * n as f64 / c + 1.0) * 1000.0;
                    aim(
                        &format!(
                            "{n} devices x 1 Hz: p99 <= 1.2 x {n} / {c:.0} writes/s + 1 s = {bound:.0} ms"
                        ),
                        &format!("p99 {p99:.0} ms"),
                        p99 <= bound,
                    );
                }
                None => println!(
                    "- aim for {n} devices not judged: set EDGESYNC_WRITE_CEILING (make bench does, from apiserver_ceiling)"
                ),
            },
        }
    }
}
