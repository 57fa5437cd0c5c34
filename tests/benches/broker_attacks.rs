//! `make bench`: good devices' ingest through the embedded broker while an attacker on the
//! plant network does its worst, one attack at a time.
//!
//! Four well-behaved devices publish QoS1 shadow reports (each PUBACK comes only after the
//! agent's commit) for a fixed window; their acknowledged rate under each attack is reported
//! as a ratio to their rate with no attack, with the agent's peak RSS. The attacks are those
//! of `tests/tests/broker_hardening.rs` and `broker_second_round.rs` at bench scale, with
//! default `[broker]` limits (a password file or a Sparkplug B mapping where the attack needs
//! one). The
//! attackers run in this process, on the same two cores as the agent and the devices.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync_e2e::agent::{AgentConfig, spawn_agent};
use edgesync_e2e::measure::scaled;
use edgesync_e2e::mosquitto::pbkdf2_password_line;
use edgesync_e2e::raw_mqtt::{RawClient, connect_packet, encode, rss_kib};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, Subscribe};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const GOOD_DEVICES: usize = 4;
/// Warm-up before measuring (shorter in a smoke run).
fn warmup() -> Duration {
    scaled(Duration::from_secs(1), Duration::from_millis(300))
}
/// Measuring window per attack (shorter in a smoke run).
fn window() -> Duration {
    scaled(Duration::from_secs(5), Duration::from_secs(1))
}
const AGENT_ID: &str = "edgesync-agent-edge-1";

/// The well-behaved devices: each publishes its reports at QoS1 with up to 100 in flight.
/// Returns the acknowledged rate over [`window()`], after [`warmup()`].
async fn good_rate(port: u16, round: usize, login: Option<(&str, &str)>) -> f64 {
    let login = login.map(|(u, p)| (u.to_owned(), p.to_owned()));
    let acked = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut devices = JoinSet::new();
    for k in 0..GOOD_DEVICES {
        let (acked, stop, login) = (acked.clone(), stop.clone(), login.clone());
        devices.spawn(async move {
            let id = format!("good-{round}-{k}");
            let mut o = MqttOptions::new(&id, "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(60)).set_inflight(100);
            if let Some((user, pass)) = login {
                o.set_credentials(user, pass);
            }
            let (c, mut el) = AsyncClient::new(o, 1000);
            let topic = format!("edgesync/{id}/shadow/update");
            let publisher = tokio::spawn(async move {
                for n in 0u64.. {
                    let body =
                        format!(r#"{{"state":{{"reported":{{"seq":{n},"temperatureC":21.5}}}}}}"#);
                    if c.publish(&topic, QoS::AtLeastOnce, false, body)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    e = el.poll() => match e {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => panic!("good device {k} lost its connection: {e}"),
                    },
                }
            }
            publisher.abort();
        });
    }
    tokio::time::sleep(warmup()).await;
    let start = acked.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(window()).await;
    let rate = (acked.load(Ordering::Relaxed) - start) as f64 / t0.elapsed().as_secs_f64();
    stop.cancel();
    while devices.join_next().await.is_some() {}
    rate
}

fn publish_packet(topic: &str, qos: QoS, pkid: u16, payload: Vec<u8>, retain: bool) -> Packet {
    let mut p = Publish::new(topic, qos, payload);
    p.pkid = pkid;
    p.retain = retain;
    Packet::Publish(p)
}

/// Starts one attack; it runs until `stop`. Returns once it is in effect.
async fn start_attack(name: &str, port: u16, stop: CancellationToken, tasks: &mut JoinSet<()>) {
    match name {
        "none" | "none (again)" => {}
        "hijack: reconnects with the agent's client id" => {
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let login = Some(("$edgesync-agent", "guess"));
                    let (_c, _code) =
                        RawClient::connect(port, connect_packet(AGENT_ID, false, login, None))
                            .await;
                }
            });
        }
        "get loop: one device asks shadow/get nonstop, 100 in flight" => {
            let reported = serde_json::json!({"mode": "auto", "setpoint": 21.5});
            let getter = edgesync_e2e::device::GetLoop::start(port, "getter", reported, stop).await;
            tasks.spawn(async move {
                let _ = getter.task.await;
            });
        }
        "subscribe flood: new filters on a persistent session" => {
            tasks.spawn(async move {
                let (mut c, _) =
                    RawClient::connect(port, connect_packet("subflood", false, None, None)).await;
                for i in 1u32.. {
                    if stop.is_cancelled() {
                        return;
                    }
                    let mut s = Subscribe::new(format!("sf/{i}/#"), QoS::AtLeastOnce);
                    s.pkid = (i % 65_000 + 1) as u16;
                    if !c.send_raw(&encode(&Packet::Subscribe(s))).await {
                        return;
                    }
                    let _ = c.recv(Duration::from_secs(5)).await;
                }
            });
        }
        "retained flood: 500 KB retained messages" => {
            tasks.spawn(async move {
                let (mut c, _) =
                    RawClient::connect(port, connect_packet("retainer", true, None, None)).await;
                // Encoded once: the attacker's own cost is its socket writes.
                let packets: Vec<_> = (0..64)
                    .map(|i| {
                        let body = vec![b'r'; 500 * 1024];
                        encode(&publish_packet(
                            &format!("ret/{i}"),
                            QoS::AtMostOnce,
                            0,
                            body,
                            true,
                        ))
                    })
                    .collect();
                for p in packets.iter().cycle() {
                    if stop.is_cancelled() || !c.send_raw(p).await {
                        return;
                    }
                }
            });
        }
        "pipelining: 100 KB QoS1 messages, acks never read" => {
            tasks.spawn(async move {
                let (mut c, _) =
                    RawClient::connect(port, connect_packet("piper", true, None, None)).await;
                let packets: Vec<_> = (1..=64u16)
                    .map(|i| {
                        let body = vec![b'p'; 100 * 1024];
                        encode(&publish_packet(
                            &format!("pipe/{i}"),
                            QoS::AtLeastOnce,
                            i,
                            body,
                            false,
                        ))
                    })
                    .collect();
                for p in packets.iter().cycle() {
                    // Blocks once the broker pauses this client; abort_all ends it.
                    if stop.is_cancelled() || !c.send_raw(p).await {
                        return;
                    }
                }
            });
        }
        "slow subscriber: # at QoS1, never reads" => {
            let (mut c, _) =
                RawClient::connect(port, connect_packet("sloth", false, None, None)).await;
            let mut s = Subscribe::new("#", QoS::AtLeastOnce);
            s.pkid = 1;
            c.send(&Packet::Subscribe(s)).await;
            tasks.spawn(async move {
                stop.cancelled().await;
                drop(c);
            });
        }
        "half-sent CONNECTs: 500 sockets, 60 KB each" => {
            let mut held = Vec::new();
            for _ in 0..500 {
                let mut c = RawClient::open(port).await;
                // A CONNECT announcing 63 KB (within broker.max_connect_bytes), of which
                // 60 KB is sent; held until broker.connect_timeout_secs.
                let mut head = vec![0x10u8, 0x80, 0xf8, 0x03];
                head.extend(vec![0u8; 60 * 1024]);
                let _ = c.send_raw(&head).await;
                held.push(c);
            }
            tasks.spawn(async move {
                stop.cancelled().await;
                drop(held);
            });
        }
        "session flood: 5,000 persistent sessions subscribed to #" => {
            let mut set = JoinSet::new();
            for w in 0..50 {
                set.spawn(async move {
                    for i in 0..100 {
                        let id = format!("ghost-{w}-{i}");
                        let (mut c, _) =
                            RawClient::connect(port, connect_packet(&id, false, None, None)).await;
                        let mut s = Subscribe::new("#", QoS::AtLeastOnce);
                        s.pkid = 1;
                        c.send(&Packet::Subscribe(s)).await;
                        let _ = c.recv(Duration::from_secs(10)).await;
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
        "repeated filter: 10 clients subscribe cfg/# x100,000 (5 retained), never read" => {
            retain_small(port, 5).await;
            let mut held = Vec::new();
            for g in 0..10 {
                let hello = connect_packet(&format!("greedy-{g}"), true, None, None);
                let (mut c, _) = RawClient::connect(port, hello).await;
                let filters = (0..100_000)
                    .map(|_| rumqttc::SubscribeFilter::new("cfg/#".into(), QoS::AtLeastOnce));
                let mut s = Subscribe::new_many(filters);
                s.pkid = 1;
                c.send(&Packet::Subscribe(s)).await;
                held.push(c);
            }
            tasks.spawn(async move {
                stop.cancelled().await;
                drop(held);
            });
        }
        "filter scan: 64 wildcard filters vs 5,000 retained, resubscribed nonstop" => {
            retain_small(port, 5_000).await;
            tasks.spawn(async move {
                let (mut c, _) =
                    RawClient::connect(port, connect_packet("scanner", true, None, None)).await;
                let filters = (0..64).map(|i| {
                    rumqttc::SubscribeFilter::new(format!("+/{i}/none/#"), QoS::AtLeastOnce)
                });
                let mut s = Subscribe::new_many(filters);
                s.pkid = 1;
                let packet = encode(&Packet::Subscribe(s));
                while !stop.is_cancelled() {
                    if !c.send_raw(&packet).await {
                        return;
                    }
                    let _ = c.recv(Duration::from_secs(10)).await;
                }
            });
        }
        "ping flood: PINGREQs never read" => {
            tasks.spawn(async move {
                let pings: Vec<u8> = [0xC0u8, 0x00].repeat(64 * 1024);
                while !stop.is_cancelled() {
                    let (mut c, _) =
                        RawClient::connect(port, connect_packet("pinger", true, None, None)).await;
                    while !stop.is_cancelled() && c.send_raw(&pings).await {}
                }
            });
        }
        "idle sockets: 900 never sending CONNECT" => {
            let mut held = Vec::new();
            for _ in 0..900 {
                held.push(RawClient::open(port).await);
            }
            tasks.spawn(async move {
                stop.cancelled().await;
                drop(held);
            });
        }
        "password guessing: 4 clients vs a 200,000-iteration user" => {
            for g in 0..4 {
                let stop = stop.clone();
                tasks.spawn(async move {
                    while !stop.is_cancelled() {
                        let guess =
                            connect_packet(&format!("g{g}"), true, Some(("slow", "x")), None);
                        let _ = RawClient::connect(port, guess).await;
                    }
                });
            }
        }
        "sparkplug: DBIRTHs declaring 120 KB metric names" => {
            tasks.spawn(async move {
                let (mut c, _) =
                    RawClient::connect(port, connect_packet("spam-node", true, None, None)).await;
                for i in 0u64.. {
                    if stop.is_cancelled() {
                        return;
                    }
                    let name = format!("{i}{}", "n".repeat(120 * 1024));
                    let metric = edgesync_protocol::sparkplug::proto::Metric {
                        name: Some(name),
                        alias: Some(i),
                        datatype: Some(edgesync_protocol::sparkplug::proto::datatype::DOUBLE),
                        value: Some(
                            edgesync_protocol::sparkplug::proto::MetricValue::DoubleValue(1.0),
                        ),
                        ..Default::default()
                    };
                    let body = prost::Message::encode_to_vec(
                        &edgesync_protocol::sparkplug::proto::Payload {
                            seq: Some(i % 256),
                            metrics: vec![metric],
                            ..Default::default()
                        },
                    );
                    let topic = format!("spBv1.0/g/DBIRTH/spam/d{i}");
                    let p = publish_packet(&topic, QoS::AtMostOnce, 0, body, false);
                    if !c.send_raw(&encode(&p)).await {
                        return;
                    }
                }
            });
        }
        other => unreachable!("{other}"),
    }
}

/// `n` small retained messages under `ret/<k>/v`.
async fn retain_small(port: u16, n: usize) {
    let (mut c, _) = RawClient::connect(port, connect_packet("retainer", true, None, None)).await;
    for k in 0..n {
        let mut p = Publish::new(format!("ret/{k}/v"), QoS::AtLeastOnce, "on");
        p.retain = true;
        p.pkid = (k % 60_000 + 1) as u16;
        c.send(&Packet::Publish(p)).await;
        let _ = c.recv(Duration::from_secs(10)).await;
    }
}

/// The `[broker]` / `[[ingest]]` settings an attack needs, and the good devices' login.
fn setup(attack: &str, dir: &std::path::Path) -> (String, Option<(&'static str, &'static str)>) {
    match attack {
        a if a.starts_with("password guessing") => {
            let file = dir.join("passwd");
            let good = pbkdf2_password_line("good", "pw", 101);
            let slow = pbkdf2_password_line("slow", "right", 200_000);
            std::fs::write(&file, format!("{good}{slow}")).unwrap();
            let extra = format!(
                "[broker]\npassword_file = \"{}\"\nmax_password_iterations = 200000\n",
                file.display()
            );
            (extra, Some(("good", "pw")))
        }
        a if a.starts_with("sparkplug") => (
            "[[ingest]]\nformat = \"sparkplug-b\"\nmax_metrics_per_node = 100\n".into(),
            None,
        ),
        _ => (String::new(), None),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    const ATTACKS: [&str; 16] = [
        "none",
        "get loop: one device asks shadow/get nonstop, 100 in flight",
        "hijack: reconnects with the agent's client id",
        "subscribe flood: new filters on a persistent session",
        "retained flood: 500 KB retained messages",
        "pipelining: 100 KB QoS1 messages, acks never read",
        "slow subscriber: # at QoS1, never reads",
        "half-sent CONNECTs: 500 sockets, 60 KB each",
        "session flood: 5,000 persistent sessions subscribed to #",
        "repeated filter: 10 clients subscribe cfg/# x100,000 (5 retained), never read",
        "filter scan: 64 wildcard filters vs 5,000 retained, resubscribed nonstop",
        "ping flood: PINGREQs never read",
        "idle sockets: 900 never sending CONNECT",
        "password guessing: 4 clients vs a 200,000-iteration user",
        "sparkplug: DBIRTHs declaring 120 KB metric names",
        // The first round also warms the page cache and the allocator: measured again last,
        // the baseline is the mean of both.
        "none (again)",
    ];
    println!(
        "edgesync embedded broker under attack: {GOOD_DEVICES} good devices, QoS1 shadow reports, {} s per attack, default [broker] limits",
        window().as_secs()
    );
    let mut rows = Vec::new();
    let mut baselines = Vec::new();
    // EDGESYNC_BENCH_ATTACKS=word,word: only the attacks whose names contain one (and the
    // baseline), to measure one change quickly.
    let only: Vec<String> = std::env::var("EDGESYNC_BENCH_ATTACKS")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    for (round, attack) in ATTACKS.iter().enumerate() {
        let is_baseline = attack.starts_with("none");
        if !is_baseline && !only.is_empty() && !only.iter().any(|w| attack.contains(w.as_str())) {
            continue;
        }
        // A fresh agent per attack, so none inherits another's sessions or retained bytes.
        let dir = tempfile::tempdir().unwrap();
        let port = edgesync_e2e::free_port();
        let (extra, login) = setup(attack, dir.path());
        let mut config = AgentConfig::embedded(dir.path(), port);
        config.extra = extra;
        let mut agent = spawn_agent(&config);
        let pid = agent.pid().unwrap();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let idle = rss_kib(pid);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        start_attack(attack, port, stop.clone(), &mut tasks).await;
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let rate = good_rate(port, round, login).await;
        stop.cancel();
        sampler.await.unwrap();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if is_baseline {
            baselines.push(rate);
        }
        let peak = peak.load(Ordering::Relaxed);
        eprintln!("{attack}: {rate:.0}/s, RSS {idle} -> {peak} KiB");
        rows.push((attack, rate, idle, peak, agent.is_running()));
        agent.stop();
    }
    let baseline = baselines.iter().sum::<f64>() / baselines.len() as f64;
    println!();
    println!(
        "| attack | good devices' acknowledged msg/s | vs no attack (mean of both rounds without) | agent RSS idle -> peak, MiB |"
    );
    println!("|---|---|---|---|");
    for (attack, rate, idle, peak, alive) in rows {
        let alive = if alive { "" } else { " (agent died)" };
        println!(
            "| {attack}{alive} | {rate:.0} | {:.0}% | {:.1} -> {:.1} |",
            100.0 * rate / baseline,
            idle as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
}
