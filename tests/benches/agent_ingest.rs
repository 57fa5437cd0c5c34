//! `make bench`: the agent's MQTT ingest against the raw limits of this machine.
//!
//! Measured in one run, on the same Mosquitto configuration:
//! - broker alone: a bare rumqttc subscriber draining N queued messages (QoS1 with manual
//!   acks, and QoS0);
//! - SQLite alone: upserting N ~250-byte documents in transactions of 1000 with
//!   `synchronous=FULL` (the agent's default durability);
//! - the agent (release binary) draining the same N queued messages into SQLite, every message
//!   committed before its ack;
//! - the agent's RSS idle and under a paced 10k msg/s load, and the binary size;
//! - the agent with its embedded broker, devices publishing live at QoS1: the rate at which
//!   their messages are acknowledged, each only after its commit.
//!
//! The queue is filled while the consumer is offline (persistent session), so each figure is
//! the consumer's throughput, not the publisher's.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edgesync_e2e::agent::{AgentConfig, agent_binary, spawn_agent};
use edgesync_e2e::measure::{aim, scaled};
use edgesync_e2e::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const DEVICES: usize = 1000;
const MESSAGES_DEFAULT: usize = 200_000;

/// Messages per run (`BENCH_MESSAGES` overrides).
fn messages() -> usize {
    std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(scaled(MESSAGES_DEFAULT, 20_000))
}

fn payload(i: usize) -> Vec<u8> {
    // ~250 bytes of typical PLC state.
    format!(
        "{{\"seq\":{i},\"temperatureC\":{:.2},\"pressureBar\":{:.3},\"rpm\":{},\"state\":\"running\",\"alarm\":false,\"counters\":{{\"good\":{},\"scrap\":{}}},\"operator\":\"line-3-shift-b\",\"firmware\":\"4.2.17\",\"ts\":\"2026-11-28T06:00:00Z\"}}",
        20.0 + (i % 100) as f64 / 10.0,
        1.0 + (i % 1000) as f64 / 1000.0,
        1000 + i % 500,
        i * 3,
        i % 7
    )
    .into_bytes()
}

async fn connect(
    id: &str,
    port: u16,
    clean: bool,
    manual_acks: bool,
) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean)
        .set_manual_acks(manual_acks)
        .set_keep_alive(Duration::from_secs(60))
        .set_inflight(1000);
    let (c, mut el) = AsyncClient::new(o, 100_000);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
            return (c, el);
        }
    }
}

/// Creates the persistent session for `id` subscribed to the ingest topic, then leaves.
async fn register(id: &str, port: u16) {
    let (c, mut el) = connect(id, port, false, true).await;
    c.subscribe("factory/+/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    c.disconnect().await.unwrap();
    loop {
        match el.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

async fn fill(port: u16, qos: QoS) {
    let (c, mut el) = connect("filler", port, true, false).await;
    let pump = tokio::spawn(async move {
        let mut acked = 0;
        while acked < messages() {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::PubAck(_)) => acked += 1,
                Event::Outgoing(rumqttc::Outgoing::Publish(_)) if qos == QoS::AtMostOnce => {
                    acked += 1
                }
                _ => {}
            }
        }
        // Let QoS0 publishes reach the broker: a final QoS1 marker round trip.
        el
    });
    for i in 0..messages() {
        c.publish(
            format!("factory/dev-{}/state", i % DEVICES),
            qos,
            false,
            payload(i),
        )
        .await
        .unwrap();
    }
    let mut el = pump.await.unwrap();
    c.publish("bench/marker", QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
}

/// Drains the queued messages; returns (messages received, rate). QoS0 messages may be
/// dropped by the broker, so the drain ends when nothing arrived for 2 s.
async fn bare_subscriber(port: u16, qos: QoS) -> (usize, f64) {
    register("bare", port).await;
    fill(port, qos).await;
    let start = Instant::now();
    let (c, mut el) = connect("bare", port, false, true).await;
    // One task polls and forwards, the consumer acks: polling and acking in one loop can
    // fill rumqttc's request channel and stall (the same split the agent uses).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev
                && tx.send(p).is_err()
            {
                break;
            }
        }
    });
    let mut got = 0;
    let mut last = start;
    while got < messages() {
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(p)) => {
                got += 1;
                last = Instant::now();
                c.ack(&p).await.unwrap();
            }
            _ => break,
        }
    }
    pump.abort();
    (got, got as f64 / (last - start).as_secs_f64())
}

fn sqlite_alone() -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;").unwrap();
    let start = Instant::now();
    for chunk in (0..messages()).collect::<Vec<_>>().chunks(1000) {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut st = tx.prepare_cached("INSERT INTO t (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v").unwrap();
            for i in chunk {
                st.execute(rusqlite::params![
                    format!("dev-{}", i % DEVICES),
                    String::from_utf8(payload(*i)).unwrap()
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    messages() as f64 / start.elapsed().as_secs_f64()
}

fn scrape(port: u16, metric: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(metric).and_then(|v| v.trim().parse().ok()))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct AgentRun {
    received: usize,
    rate: f64,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
}

async fn agent(port: u16, qos: QoS) -> AgentRun {
    let dir = tempfile::tempdir().unwrap();
    let http = edgesync_e2e::free_port();
    let mut cfg = AgentConfig::new(dir.path(), &format!("mqtt://127.0.0.1:{port}"));
    // A node (and so an MQTT session) of its own per run.
    cfg.node = format!(
        "bench-{}",
        if qos == QoS::AtLeastOnce { "q1" } else { "q0" }
    );
    if let Ok(d) = std::env::var("BENCH_DURABILITY") {
        cfg.extra = format!("[store]\ndurability = \"{d}\"\n");
    }
    let toml = cfg.to_toml().replace(
        "[http]\nlisten = \"\"",
        &format!("[http]\nlisten = \"127.0.0.1:{http}\""),
    );
    std::fs::write(dir.path().join("agent.toml"), toml).unwrap();
    // Start once to create the persistent session, then stop it and queue the load.
    let spec = |dir: &std::path::Path| {
        edgesync_e2e::process::ProcessSpec::new("edgesync-agent", agent_binary())
            .arg("run")
            .arg("--config")
            .arg(dir.join("agent.toml").as_os_str())
            .env("RUST_LOG", "warn")
    };
    let mut p = edgesync_e2e::process::ManagedProcess::spawn(spec(dir.path()), dir.path());
    while scrape(http, "edgesync_agent_mqtt_connected ") != Some(1.0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait until its subscriptions exist: a probe message must be counted.
    let (c, mut el) = connect("probe", port, true, false).await;
    c.publish(
        "factory/probe/state",
        QoS::AtLeastOnce,
        false,
        b"{\"p\":1}".to_vec(),
    )
    .await
    .unwrap();
    while scrape(http, "edgesync_agent_updates_accepted_total ").unwrap_or(0.0) < 1.0 {
        let _ = tokio::time::timeout(Duration::from_millis(20), el.poll()).await;
    }
    let idle_rss_kib = rss_kib(p.pid().unwrap());
    p.stop();
    fill(port, qos).await;

    let start = Instant::now();
    p.restart();
    let pid = p.pid().unwrap();
    let mut peak = 0;
    let (mut count, mut last_change, mut last_count) = (0.0, start, -1.0);
    loop {
        peak = peak.max(rss_kib(pid));
        count = scrape(http, "edgesync_agent_updates_accepted_total ").unwrap_or(count);
        if count != last_count {
            last_count = count;
            last_change = Instant::now();
        }
        // Everything committed, or (QoS0, where the broker may drop) nothing new for 2 s.
        if count >= messages() as f64
            || last_change.elapsed() > Duration::from_secs(2) && count > 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "agent did not drain the queue in 300 s"
        );
    }
    let received = count as usize;
    let rate = count / (last_change - start).as_secs_f64();
    if received < messages() {
        p.dump_log();
    }
    p.stop();
    AgentRun {
        received,
        rate,
        idle_rss_kib,
        peak_rss_kib: peak,
    }
}

/// RSS while publishers push a paced 10k msg/s for 5 s.
async fn agent_paced_rss(port: u16) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let http = edgesync_e2e::free_port();
    let mut cfg = AgentConfig::new(dir.path(), &format!("mqtt://127.0.0.1:{port}"));
    cfg.node = "bench-paced".into();
    let toml = cfg.to_toml().replace(
        "[http]\nlisten = \"\"",
        &format!("[http]\nlisten = \"127.0.0.1:{http}\""),
    );
    std::fs::write(dir.path().join("agent.toml"), toml).unwrap();
    let p = spawn_agent_raw(dir.path());
    while scrape(http, "edgesync_agent_mqtt_connected ") != Some(1.0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c, mut el) = connect("paced", port, true, false).await;
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let start = Instant::now();
    let mut peak = 0;
    let mut i = 0usize;
    while start.elapsed() < scaled(Duration::from_secs(5), Duration::from_secs(1)) {
        // 100 messages every 10 ms = 10k msg/s.
        for _ in 0..100 {
            c.publish(
                format!("factory/dev-{}/state", i % DEVICES),
                QoS::AtLeastOnce,
                false,
                payload(i),
            )
            .await
            .unwrap();
            i += 1;
        }
        peak = peak.max(rss_kib(p.pid().unwrap()));
        let next = Duration::from_millis(10) * (i / 100) as u32;
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    pump.abort();
    peak
}

/// The agent with its embedded broker: 4 publishers push the messages at QoS1 (a device's
/// PUBACK comes only after the agent's commit), so the publishers' acknowledged rate is the
/// durable end-to-end rate. Returns (messages acknowledged, rate, agent's committed count).
async fn agent_embedded() -> (usize, f64, f64) {
    const PUBLISHERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let http = edgesync_e2e::free_port();
    let mqtt = edgesync_e2e::free_port();
    let toml = AgentConfig::embedded(dir.path(), mqtt).to_toml().replace(
        "[http]\nlisten = \"\"",
        &format!("[http]\nlisten = \"127.0.0.1:{http}\""),
    );
    std::fs::write(dir.path().join("agent.toml"), toml).unwrap();
    let mut p = spawn_agent_raw(dir.path());
    while scrape(http, "edgesync_agent_mqtt_connected ") != Some(1.0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let per = messages() / PUBLISHERS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..PUBLISHERS {
        tasks.push(tokio::spawn(async move {
            let (c, mut el) = connect(&format!("pub-{k}"), mqtt, true, false).await;
            let pump = tokio::spawn(async move {
                let mut acked = 0;
                while acked < per {
                    if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                        acked += 1;
                    }
                }
                acked
            });
            for i in 0..per {
                let n = k * per + i;
                c.publish(
                    format!("factory/dev-{}/state", n % DEVICES),
                    QoS::AtLeastOnce,
                    false,
                    payload(n),
                )
                .await
                .unwrap();
            }
            pump.await.unwrap()
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    let rate = acked as f64 / start.elapsed().as_secs_f64();
    let committed = scrape(http, "edgesync_agent_updates_accepted_total ").unwrap_or(0.0);
    p.stop();
    (acked, rate, committed)
}

fn spawn_agent_raw(dir: &std::path::Path) -> edgesync_e2e::process::ManagedProcess {
    let spec = edgesync_e2e::process::ProcessSpec::new("edgesync-agent", agent_binary())
        .arg("run")
        .arg("--config")
        .arg(dir.join("agent.toml").as_os_str())
        .env("RUST_LOG", "warn");
    edgesync_e2e::process::ManagedProcess::spawn(spec, dir)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = spawn_agent; // the helper the tests use; the bench needs a custom http port
    let bin = agent_binary();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let broker = Mosquitto::start_with("queue_qos0_messages true\n");
    let port = broker.port();
    println!(
        "edgesync agent ingest benchmark: {} messages, {DEVICES} devices, ~{} B JSON",
        messages(),
        payload(12345).len()
    );

    let sqlite = sqlite_alone();
    eprintln!("sqlite alone: {sqlite:.0}/s");
    let (bare_q1_n, bare_q1) = bare_subscriber(port, QoS::AtLeastOnce).await;
    eprintln!("bare QoS1: {bare_q1:.0}/s ({bare_q1_n} received)");
    let (bare_q0_n, bare_q0) = bare_subscriber(port, QoS::AtMostOnce).await;
    eprintln!("bare QoS0: {bare_q0:.0}/s ({bare_q0_n} received)");
    let agent_q1 = agent(port, QoS::AtLeastOnce).await;
    eprintln!(
        "agent QoS1: {:.0}/s ({} committed)",
        agent_q1.rate, agent_q1.received
    );
    let agent_q0 = agent(port, QoS::AtMostOnce).await;
    eprintln!(
        "agent QoS0: {:.0}/s ({} committed)",
        agent_q0.rate, agent_q0.received
    );
    let paced_rss = agent_paced_rss(port).await;
    let (emb_acked, emb_rate, emb_committed) = agent_embedded().await;
    eprintln!(
        "agent, embedded broker QoS1: {emb_rate:.0}/s ({emb_acked} acknowledged, {emb_committed} committed)"
    );

    println!();
    println!("| measurement | value | ratio |");
    println!("|---|---|---|");
    println!("| SQLite alone, upserts/s (txn of 1000, synchronous=FULL) | {sqlite:.0} | |");
    println!(
        "| bare rumqttc subscriber, QoS1 manual acks, msg/s ({bare_q1_n} delivered) | {bare_q1:.0} | |"
    );
    println!("| bare rumqttc subscriber, QoS0, msg/s ({bare_q0_n} delivered) | {bare_q0:.0} | |");
    println!(
        "| agent QoS1 (ack after fsync'd commit), msg/s ({} committed) | {:.0} | {:.0}% of bare QoS1 |",
        agent_q1.received,
        agent_q1.rate,
        100.0 * agent_q1.rate / bare_q1
    );
    println!(
        "| agent QoS0, msg/s ({} committed) | {:.0} | {:.0}% of bare QoS0 |",
        agent_q0.received,
        agent_q0.rate,
        100.0 * agent_q0.rate / bare_q0
    );
    println!(
        "| agent vs SQLite alone (QoS1) | | {:.0}% |",
        100.0 * agent_q1.rate / sqlite
    );
    println!(
        "| agent with its embedded broker: 4 publishers, QoS1, each PUBACK after the commit, msg/s ({emb_acked} acknowledged, {emb_committed} committed) | {emb_rate:.0} | {:.0}% of the agent behind Mosquitto |",
        100.0 * emb_rate / agent_q1.rate
    );
    println!(
        "| agent RSS idle, MiB | {:.1} | |",
        agent_q1.idle_rss_kib as f64 / 1024.0
    );
    println!(
        "| agent RSS peak while draining (QoS1), MiB | {:.1} | |",
        agent_q1.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "| agent RSS peak at paced 10k msg/s, MiB | {:.1} | |",
        paced_rss as f64 / 1024.0
    );
    println!(
        "| agent binary (release profile, stripped), MB | {:.2} | |",
        size as f64 / 1e6
    );
    println!();
    aim(
        "agent QoS1 behind Mosquitto >= 150,000 msg/s durable",
        &format!("{:.0} msg/s", agent_q1.rate),
        agent_q1.rate >= 150_000.0,
    );
    aim(
        "agent with its embedded broker >= 100,000 msg/s end to end",
        &format!("{emb_rate:.0} msg/s"),
        emb_rate >= 100_000.0,
    );
}
