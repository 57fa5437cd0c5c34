//! `make bench`: Sparkplug B ingest against plain JSON, in the same run, through the same
//! Mosquitto into the same agent (both mappings configured).
//!
//! 1,000 devices, 10 metrics per message. The JSON message is an object of the 10 values; the
//! Sparkplug B message is a DDATA carrying the 10 metrics by alias (as edge nodes send them
//! after their births), preceded in the queue by the node's NBIRTH and the 1,000 DBIRTHs. Both
//! are published at QoS 1 while the agent is away and queued on its persistent session, so
//! each figure is the agent draining the queue, every message committed before its ack.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::time::{Duration, Instant};

use edgesync_e2e::agent::{AgentConfig, agent_binary, metric};
use edgesync_e2e::measure::scaled;
use edgesync_e2e::mosquitto::Mosquitto;
use edgesync_e2e::process::{ManagedProcess, ProcessSpec};
use edgesync_protocol::sparkplug::proto::{Metric, MetricValue, Payload, datatype};
use prost::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const DEVICES: usize = 1000;
const METRICS: usize = 10;
const GROUP: &str = "Bench";
const NODE: &str = "GW";
const TS: u64 = 1_796_000_000_000;

fn messages() -> usize {
    scaled(100_000, 10_000)
}

/// Metric `m`'s value in message `i`: alternately Double, Int64 and Boolean.
fn value(i: usize, m: usize) -> (u32, MetricValue, serde_json::Value) {
    match m % 3 {
        0 => {
            let v = 20.0 + (i % 100) as f64 / 8.0;
            (datatype::DOUBLE, MetricValue::DoubleValue(v), v.into())
        }
        1 => (
            datatype::INT64,
            MetricValue::LongValue((i * 3) as u64),
            (i * 3).into(),
        ),
        _ => (
            datatype::BOOLEAN,
            MetricValue::BooleanValue(i.is_multiple_of(2)),
            (i.is_multiple_of(2)).into(),
        ),
    }
}

fn alias(device: usize, m: usize) -> u64 {
    (device * METRICS + m + 1) as u64
}

fn json_load() -> Vec<(String, Vec<u8>)> {
    (0..messages())
        .map(|i| {
            let obj: serde_json::Map<_, _> = (0..METRICS)
                .map(|m| (format!("metric{m}"), value(i, m).2))
                .collect();
            (
                format!("factory/dev-{}/state", i % DEVICES),
                serde_json::to_vec(&obj).unwrap(),
            )
        })
        .collect()
}

fn sparkplug_load() -> Vec<(String, Vec<u8>)> {
    let mut seq = 0u64;
    let mut next = || {
        let s = seq;
        seq = (seq + 1) % 256;
        Some(s)
    };
    let bd_seq = Metric {
        name: Some("bdSeq".into()),
        datatype: Some(datatype::INT64),
        value: Some(MetricValue::LongValue(0)),
        ..Metric::default()
    };
    let payload = |seq, metrics| {
        Payload {
            timestamp: Some(TS),
            metrics,
            seq,
            ..Payload::default()
        }
        .encode_to_vec()
    };
    let mut out = vec![(
        format!("spBv1.0/{GROUP}/NBIRTH/{NODE}"),
        payload(next(), vec![bd_seq]),
    )];
    for d in 0..DEVICES {
        let metrics = (0..METRICS)
            .map(|m| {
                let (dt, v, _) = value(0, m);
                Metric {
                    name: Some(format!("metric{m}")),
                    alias: Some(alias(d, m)),
                    timestamp: Some(TS),
                    datatype: Some(dt),
                    value: Some(v),
                    ..Metric::default()
                }
            })
            .collect();
        out.push((
            format!("spBv1.0/{GROUP}/DBIRTH/{NODE}/dev-{d}"),
            payload(next(), metrics),
        ));
    }
    for i in 0..messages() {
        let d = i % DEVICES;
        let metrics = (0..METRICS)
            .map(|m| Metric {
                alias: Some(alias(d, m)),
                timestamp: Some(TS + i as u64),
                value: Some(value(i, m).1),
                ..Metric::default()
            })
            .collect();
        out.push((
            format!("spBv1.0/{GROUP}/DDATA/{NODE}/dev-{d}"),
            payload(next(), metrics),
        ));
    }
    out
}

/// Publishes `load` at QoS 1, in order, and returns once the broker has acked all of it.
async fn fill(port: u16, load: Vec<(String, Vec<u8>)>) {
    let mut o = MqttOptions::new("filler", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut el) = AsyncClient::new(o, 100_000);
    let n = load.len();
    let pump = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    });
    for (topic, payload) in load {
        c.publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    pump.await.unwrap();
    let _ = c.disconnect().await;
}

/// Restarts the agent and times it committing `updates` more updates.
async fn drain(agent: &mut ManagedProcess, http: u16, updates: usize) -> f64 {
    let before = metric(http, "edgesync_agent_updates_accepted_total").unwrap_or(0.0);
    let start = Instant::now();
    agent.restart();
    let target = before + updates as f64;
    loop {
        let done = metric(http, "edgesync_agent_updates_accepted_total").unwrap_or(0.0);
        if done >= target {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the agent committed {} of {updates} updates in 300 s",
            done - before
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    updates as f64 / secs
}

#[tokio::main]
async fn main() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let dir = tempfile::tempdir().unwrap();
    let http = edgesync_e2e::free_port();
    let mut cfg = AgentConfig::new(dir.path(), &broker.url());
    cfg.node = "bench-sparkplug".into();
    cfg.http_port = Some(http);
    cfg.extra = format!("[[ingest]]\nformat = \"sparkplug-b\"\ngroup = \"{GROUP}\"\n");
    let path = cfg.write();
    let spec = ProcessSpec::new("edgesync-agent", agent_binary())
        .arg("run")
        .arg("--config")
        .arg(path.as_os_str())
        .env("RUST_LOG", "warn");
    let mut agent = ManagedProcess::spawn(spec, dir.path());
    // Its persistent session and subscriptions exist once a probe message is committed.
    let started = Instant::now();
    while metric(http, "edgesync_agent_mqtt_connected") != Some(1.0) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fill(
        port,
        vec![("factory/probe/state".into(), b"{\"p\":1}".to_vec())],
    )
    .await;
    while metric(http, "edgesync_agent_updates_accepted_total").unwrap_or(0.0) < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "probe not committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let json = json_load();
    let json_bytes: usize = json.iter().map(|(_, p)| p.len()).sum::<usize>() / json.len();
    agent.stop();
    fill(port, json).await;
    let json_rate = drain(&mut agent, http, messages()).await;
    eprintln!("json: {json_rate:.0} msg/s");

    let spb = sparkplug_load();
    let spb_bytes: usize = spb[1 + DEVICES..]
        .iter()
        .map(|(_, p)| p.len())
        .sum::<usize>()
        / messages();
    agent.stop();
    fill(port, spb).await;
    // The DBIRTHs are updates too (the NBIRTH, with no state, is not).
    let spb_rate = drain(&mut agent, http, messages() + DEVICES).await;
    eprintln!("sparkplug: {spb_rate:.0} msg/s");
    let issues = edgesync_e2e::agent::metrics(http)
        .lines()
        .filter(|l| l.starts_with("edgesync_agent_sparkplug_issues_total{"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    agent.stop();

    println!(
        "edgesync Sparkplug B ingest against JSON: {} messages per format, {DEVICES} devices, {METRICS} metrics per message, QoS 1 queued on the agent's session, drained by the release agent",
        messages()
    );
    println!();
    println!("| format | bytes per message | messages/s | metrics/s | vs JSON |");
    println!("|---|---|---|---|---|");
    println!(
        "| JSON object on `factory/{{device}}/state` | {json_bytes} | {json_rate:.0} | {:.0} | 1.00 |",
        json_rate * METRICS as f64
    );
    println!(
        "| Sparkplug B DDATA, metrics by alias | {spb_bytes} | {spb_rate:.0} | {:.0} | {:.2} |",
        spb_rate * METRICS as f64,
        spb_rate / json_rate
    );
    println!();
    println!(
        "Sparkplug issues during the run (none expected): {}",
        if issues.is_empty() {
            "none".to_owned()
        } else {
            issues.join(", ")
        }
    );
}
