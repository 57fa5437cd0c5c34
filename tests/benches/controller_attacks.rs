//! `make bench` (controller under attack): a good agent's batches while hostile clients on the
//! agents' network do their worst, one attack at a time, against a real kube-apiserver.
//!
//! The good agent posts batches of 10 reports of new versions back to back, each answered
//! once durable. For each attack: its batches/s, p50 and p99 latency against the same with no
//! attack, answers other than 200, and the controller's RSS and open file descriptors (idle,
//! then peak). A fresh controller with default options runs each attack; the attackers run in
//! this process, on the same two cores as the controller and the API server.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, batch, client, create_devices, create_node, report};
use edgesync_e2e::measure::{percentile_ms, scaled};
use edgesync_e2e::raw_mqtt::rss_kib;
use edgesync_protocol::wire;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Warm-up before measuring (shorter in a smoke run).
fn warmup() -> Duration {
    scaled(Duration::from_secs(1), Duration::from_millis(300))
}
/// Measuring window per attack (shorter in a smoke run).
fn window() -> Duration {
    scaled(Duration::from_secs(6), Duration::from_secs(1))
}
const GOOD_DEVICES: usize = 10;
/// Devices of the compromised node, each reported with ~30 KB: a 14.7 MB batch.
const BIG_DEVICES: usize = 500;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

struct Good {
    latencies: Vec<Duration>,
    others: Vec<u16>,
}

/// The good agent: batches of [`GOOD_DEVICES`] new versions, back to back, for [`window()`]
/// after [`warmup()`].
async fn good_agent(url: &str, ns: &str, seq: &AtomicU64) -> Good {
    let http = client();
    let started = Instant::now();
    let mut good = Good {
        latencies: Vec::new(),
        others: Vec::new(),
    };
    while started.elapsed() < warmup() + window() {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let reports = (0..GOOD_DEVICES)
            .map(|d| {
                report(
                    &format!("good-{d}"),
                    n,
                    json!({"n": n, "temperatureC": 21.5}),
                )
            })
            .collect();
        let body = serde_json::to_vec(&batch(n, reports)).unwrap();
        let t = Instant::now();
        let status = http
            .post(format!("{url}{}", wire::reports_path(ns, "edge-1")))
            .bearer_auth("good-token")
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        if started.elapsed() < warmup() {
            continue;
        }
        if status == 200 {
            good.latencies.push(t.elapsed());
        } else {
            good.others.push(status);
            // As an agent would: back off a little before retrying.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    good.latencies.sort();
    good
}

/// Connects, sends `prefix`, then one byte of `drip` every `every` until the server closes
/// the socket; then again, until `stop`.
async fn dripper(
    addr: std::net::SocketAddr,
    prefix: Vec<u8>,
    drip: u8,
    every: Duration,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if s.write_all(&prefix).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                _ = tokio::time::sleep(every) => {
                    if drip != 0 && s.write_all(&[drip]).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

fn head(ns: &str, node: &str, token: &str, content_length: usize) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: controller\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n",
        wire::reports_path(ns, node)
    )
    .into_bytes()
}

/// `n` clients posting back to back until `stop`; request `i` of client `w` goes to the node,
/// with the token and body, that `request(w, i)` gives.
fn posters(
    tasks: &mut JoinSet<()>,
    n: u64,
    url: &str,
    ns: &str,
    stop: &CancellationToken,
    request: impl Fn(u64, u64) -> (String, &'static str, Vec<u8>) + Clone + Send + 'static,
) {
    for w in 0..n {
        let (url, ns, stop, request) =
            (url.to_owned(), ns.to_owned(), stop.clone(), request.clone());
        tasks.spawn(async move {
            let http = client();
            for i in 0u64.. {
                if stop.is_cancelled() {
                    return;
                }
                let (node, token, body) = request(w, i);
                let _ = http
                    .post(format!("{url}{}", wire::reports_path(&ns, &node)))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
            }
        });
    }
}

/// Starts one attack; it runs until `stop`.
async fn start_attack(
    name: &str,
    url: &str,
    addr: std::net::SocketAddr,
    ns: &str,
    big: &Arc<Vec<u8>>,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    match name {
        "none" => {}
        "idle sockets: 3,000 connections that send nothing" => {
            for _ in 0..3000 {
                tasks.spawn(dripper(
                    addr,
                    Vec::new(),
                    0,
                    Duration::from_secs(1),
                    stop.clone(),
                ));
            }
        }
        "slowloris: 500 clients sending a header byte a second" => {
            let prefix = b"POST /v1/namespaces/x/nodes/y/reports HTTP/1.1\r\nX-Slow: ".to_vec();
            for _ in 0..500 {
                tasks.spawn(dripper(
                    addr,
                    prefix.clone(),
                    b'a',
                    Duration::from_secs(1),
                    stop.clone(),
                ));
            }
        }
        "slow bodies: 100 authenticated 1 MiB bodies at a byte a second" => {
            let prefix = head(ns, "edge-evil", "evil-token", 1 << 20);
            for _ in 0..100 {
                tasks.spawn(dripper(
                    addr,
                    prefix.clone(),
                    b' ',
                    Duration::from_secs(1),
                    stop.clone(),
                ));
            }
        }
        "large batches: 8 authenticated 14.7 MB batches at a time" => {
            let big = big.clone();
            posters(tasks, 8, url, ns, stop, move |_, _| {
                ("edge-evil".to_owned(), "evil-token", big.to_vec())
            });
        }
        "unknown nodes: 50 concurrent requests for random node names" => {
            posters(tasks, 50, url, ns, stop, |w, i| {
                (format!("ghost-{w}-{i}"), "x", b"{}".to_vec())
            });
        }
        "wrong tokens: 50 concurrent requests for the good node" => {
            posters(tasks, 50, url, ns, stop, |_, _| {
                ("edge-1".to_owned(), "wrong", b"{}".to_vec())
            });
        }
        other => unreachable!("{other}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    const ATTACKS: [&str; 7] = [
        "none",
        "idle sockets: 3,000 connections that send nothing",
        "slowloris: 500 clients sending a header byte a second",
        "slow bodies: 100 authenticated 1 MiB bodies at a byte a second",
        "large batches: 8 authenticated 14.7 MB batches at a time",
        "unknown nodes: 50 concurrent requests for random node names",
        "wrong tokens: 50 concurrent requests for the good node",
    ];
    let cp = ControlPlane::shared();
    let ns = cp.namespace("bench-attacks");
    create_node(cp, &ns.name, "edge-1", "good-token", "");
    create_node(cp, &ns.name, "edge-evil", "evil-token", "");
    let good: Vec<String> = (0..GOOD_DEVICES).map(|d| format!("good-{d}")).collect();
    create_devices(cp, &ns.name, "edge-1", &good);
    let bigs: Vec<String> = (0..BIG_DEVICES).map(|d| format!("big-{d}")).collect();
    create_devices(cp, &ns.name, "edge-evil", &bigs);
    let pad = "x".repeat(30 * 1000);
    let reports = bigs
        .iter()
        .map(|d| report(d, 1, json!({ "pad": pad })))
        .collect();
    let big = Arc::new(serde_json::to_vec(&batch(1, reports)).unwrap());
    println!(
        "edgesync controller under attack: a good agent posting {GOOD_DEVICES}-report batches back to back, {} s per attack, default options; the large batch is {:.1} MB",
        window().as_secs(),
        big.len() as f64 / 1e6
    );
    let seq = AtomicU64::new(1);
    let mut rows = Vec::new();
    for attack in ATTACKS {
        let c = Controller::start_with_log(cp, &[], "info");
        let (url, addr) = (c.url(), c.addr);
        let pid = c.process.pid().unwrap();
        // The compromised node's devices are written once, so its batches are retries that
        // cost parsing, not writes.
        let first = client()
            .post(format!(
                "{url}{}",
                wire::reports_path(&ns.name, "edge-evil")
            ))
            .bearer_auth("evil-token")
            .body(big.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(first.status().as_u16(), 200);
        let (idle_rss, idle_fds) = (rss_kib(pid), open_fds(pid));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        start_attack(attack, &url, addr, &ns.name, &big, &stop, &mut tasks).await;
        let (peak_rss, peak_fds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let sampler = {
            let (peak_rss, peak_fds, stop) = (peak_rss.clone(), peak_fds.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    peak_fds.fetch_max(open_fds(pid) as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let g = good_agent(&url, &ns.name, &seq).await;
        stop.cancel();
        sampler.await.unwrap();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        eprintln!(
            "{attack}: {} batches, p99 {:.1} ms, others {:?}",
            g.latencies.len(),
            percentile_ms(&g.latencies, 0.99),
            g.others
        );
        rows.push((
            attack,
            g,
            idle_rss,
            peak_rss.load(Ordering::Relaxed),
            idle_fds,
            peak_fds.load(Ordering::Relaxed),
        ));
        drop(c);
    }
    let base = &rows[0].1;
    let (base_rate, base_p99) = (
        base.latencies.len() as f64 / window().as_secs_f64(),
        percentile_ms(&base.latencies, 0.99),
    );
    println!();
    println!(
        "| attack | good batches/s | p50 ms | p99 ms | p99 vs none | not 200 | controller RSS idle -> peak, MiB | open fds idle -> peak |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (attack, g, idle_rss, peak_rss, idle_fds, peak_fds) in rows {
        let rate = g.latencies.len() as f64 / window().as_secs_f64();
        let p99 = percentile_ms(&g.latencies, 0.99);
        println!(
            "| {attack} | {rate:.0} ({:.0}%) | {:.1} | {p99:.1} | {:.1}x | {} | {:.1} -> {:.1} | {idle_fds} -> {peak_fds} |",
            100.0 * rate / base_rate,
            percentile_ms(&g.latencies, 0.5),
            p99 / base_p99,
            g.others.len(),
            idle_rss as f64 / 1024.0,
            peak_rss as f64 / 1024.0,
        );
    }
}
