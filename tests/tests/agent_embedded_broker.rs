//! The agent's embedded broker (`mqtt.embedded = true`) with real MQTT clients over TCP:
//! kill -9 of the agent (and so of its broker) loses no message a device had acknowledged;
//! credentials and the protocol version are checked; devices can talk to each other, with
//! retained messages.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use edgesync_agent::config::Settings;
use edgesync_e2e::agent::{AgentConfig, spawn_agent};
use edgesync_e2e::crash_publisher::{Acked, publish_through_crashes};
use edgesync_e2e::device::TestDevice;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEVICES: u64 = 20;
const MESSAGES: u64 = 3000;
const KILLS: u64 = 4;

fn shadow_n(db: &Path, device: &str) -> Option<u64> {
    let doc = edgesync_agent::cli::shadow_get(db, device).ok()??;
    doc["state"]["reported"]["n"].as_u64()
}

/// Devices whose stored counter is below what the publisher had acknowledged.
fn uncommitted(db: &Path, acked: &HashMap<String, u64>) -> Vec<(String, Option<u64>, u64)> {
    acked
        .iter()
        .filter(|(d, n)| shadow_n(db, d).is_none_or(|stored| stored < **n))
        .map(|(d, n)| (d.clone(), shadow_n(db, d), *n))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_and_its_broker_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let config = AgentConfig::embedded(dir.path(), port);
    let db = dir.path().join("edgesync-agent.db");
    let mut agent = spawn_agent(&config);
    let mut probe = TestDevice::connect("probe", port, "edgesync/probe/shadow/#").await;
    probe.wait_for_agent("edgesync", "probe").await;

    let acked = Acked::new();
    let publisher = tokio::spawn(publish_through_crashes(
        port,
        DEVICES,
        MESSAGES,
        acked.clone(),
    ));
    for k in 1..=KILLS {
        // Mid-round, so that messages are in flight when the agent dies.
        let at = MESSAGES * k / (KILLS + 1) + DEVICES / 3;
        acked.at_least(at, "publisher progress").await;
        agent.kill9();
        // Read while the agent is dead, with messages in flight: whatever the device had
        // had acknowledged must already be committed.
        let snapshot = acked.max_by_device.lock().unwrap().clone();
        let lost = uncommitted(&db, &snapshot);
        if !lost.is_empty() {
            agent.dump_log();
            panic!("kill {k}: acknowledged but not committed: (device, stored, acked) {lost:?}");
        }
        agent.restart();
    }
    let last = publisher.await.unwrap();

    // No waiting here either: when the last acknowledgement has arrived, every shadow is final.
    let wrong: Vec<_> = last
        .iter()
        .filter(|(d, n)| shadow_n(&db, d) != Some(**n))
        .map(|(d, n)| {
            let doc = edgesync_agent::cli::shadow_get(&db, d).ok().flatten();
            let version = doc.as_ref().and_then(|d| d["version"].as_u64());
            (d.clone(), shadow_n(&db, d), *n, version)
        })
        .collect();
    if !wrong.is_empty() {
        agent.dump_log();
        panic!("final state: (device, stored, last published, version) {wrong:?}");
    }
    agent.stop();
}

/// Connects with `credentials`; returns the CONNACK outcome and the running client.
async fn connect(
    port: u16,
    id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(opts, 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, el)),
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                return Err(ConnectionError::ConnectionRefused(code));
            }
            // Not listening yet (the agent is starting): try again.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => panic!("no CONNACK from the embedded broker within 20 s"),
        }
    }
}

/// Polls `el` until a publish on `topic` arrives; returns it.
async fn next_publish(el: &mut EventLoop, topic: &str) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap()
                && p.topic == topic
            {
                return p;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no message on {topic} within 20 s"))
}

/// Drives `el` until the SUBACK arrives.
async fn subscribed(client: &AsyncClient, el: &mut EventLoop, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !matches!(el.poll().await.unwrap(), Event::Incoming(Packet::SubAck(_))) {}
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_enforced_and_devices_talk_to_each_other_with_retained_messages() {
    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let toml = format!(
        "node = \"edge-1\"\nnamespace = \"plant-a\"\ndata_dir = \"{}\"\n[mqtt]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\nusername = \"plant\"\npassword = \"s3cret\"\n[http]\nlisten = \"\"\n",
        dir.path().display()
    );
    let settings = Settings::parse(&toml).unwrap();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edgesync_agent::app::run(settings, shutdown.clone()));

    for creds in [None, Some(("plant", "wrong")), Some(("other", "s3cret"))] {
        match connect(port, "intruder", creds).await {
            Err(ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::BadUserNamePassword, "{creds:?}");
            }
            Err(e) => panic!("{creds:?}: expected a refusal, got {e}"),
            Ok(_) => panic!("{creds:?}: connected without the right credentials"),
        }
    }

    // An MQTT 5 client is told the protocol version is not supported (not misparsed).
    let mut v5 = rumqttc::v5::MqttOptions::new("v5-client", "127.0.0.1", port);
    v5.set_credentials("plant", "s3cret");
    let (_v5_client, mut v5_el) = rumqttc::v5::AsyncClient::new(v5, 10);
    match tokio::time::timeout(Duration::from_secs(20), v5_el.poll()).await {
        Ok(Err(rumqttc::v5::ConnectionError::ConnectionRefused(code))) => assert_eq!(
            code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::UnsupportedProtocolVersion
        ),
        other => panic!("an MQTT 5 client must be refused: {other:?}"),
    }

    let good = Some(("plant", "s3cret"));
    let (panel, mut panel_el) = connect(port, "panel", good).await.unwrap();
    subscribed(&panel, &mut panel_el, "line/+/alarm").await;
    let (press, mut press_el) = connect(port, "press", good).await.unwrap();
    // The pump reports each PUBACK: the broker has routed (and retained) that message.
    let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    let press_pump = tokio::spawn(async move {
        while let Ok(e) = press_el.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = e {
                let _ = acked_tx.send(());
            }
        }
    });
    press
        .publish("line/1/alarm", QoS::AtLeastOnce, false, "overheat")
        .await
        .unwrap();
    press
        .publish("line/1/config", QoS::AtLeastOnce, true, "speed=3")
        .await
        .unwrap();
    let alarm = next_publish(&mut panel_el, "line/1/alarm").await;
    assert_eq!(
        (&alarm.payload[..], alarm.retain),
        (&b"overheat"[..], false)
    );

    // A subscriber arriving later (once the configuration is retained) gets it, flagged as
    // retained.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(20), acked.recv())
            .await
            .expect("the press's messages acknowledged within 20 s");
    }
    let (late, mut late_el) = connect(port, "late", good).await.unwrap();
    subscribed(&late, &mut late_el, "line/#").await;
    let cfg = next_publish(&mut late_el, "line/1/config").await;
    assert_eq!((&cfg.payload[..], cfg.retain), (&b"speed=3"[..], true));

    // The agent itself authenticates with the same credentials and serves shadows.
    let (dev, mut dev_el) = connect(port, "m1", good).await.unwrap();
    subscribed(&dev, &mut dev_el, "edgesync/m1/shadow/#").await;
    dev.publish(
        "edgesync/m1/shadow/update",
        QoS::AtLeastOnce,
        false,
        json!({"state":{"reported":{"on":true}}}).to_string(),
    )
    .await
    .unwrap();
    let accepted = next_publish(&mut dev_el, "edgesync/m1/shadow/update/accepted").await;
    let v: serde_json::Value = serde_json::from_slice(&accepted.payload).unwrap();
    assert_eq!(v["version"], 1);

    press_pump.abort();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent stops within 20 s")
        .unwrap()
        .unwrap();
}
