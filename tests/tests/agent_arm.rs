//! The agent as it ships for ARM (release-small, cross-built by `make arm`), running on an
//! emulated aarch64 and armv7 machine with its embedded broker: devices on the host publish
//! through forwarded ports, kill -9 inside the guest and power cuts of the whole machine lose
//! nothing acknowledged, and the uplink reaches a real controller and kube-apiserver on the
//! host.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgesync_crds::Device;
use edgesync_e2e::agent::{AgentConfig, http_get};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, create_node};
use edgesync_e2e::crash_publisher::{Acked, publish_through_crashes};
use edgesync_e2e::vm::{HOST_FROM_GUEST, Vm, make_disk};
use edgesync_e2e::wait;
use kube::Api;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use tokio::task::block_in_place;

const GUEST_MQTT: u16 = 1883;
const GUEST_HTTP: u16 = 9100;
const CONFIG: &str = "/etc/edgesync/agent.toml";
const TOKEN_FILE: &str = "/etc/edgesync/token";
const START_AGENT: &str =
    "edgesync-agent run --config /etc/edgesync/agent.toml >>/var/log/agent.log 2>&1 &";
/// The crash round: a few devices, a few hundred messages, two kills mid-stream. Emulation
/// runs the agent several times slower than native, so this is smaller than the native test.
const DEVICES: u64 = 5;
const MESSAGES: u64 = 500;
const KILLS: u64 = 2;
const POWER_CUTS: u64 = 2;
/// Rounds (one message per device) per phase between power cuts.
const ROUNDS: u64 = 100;

/// `mosquitto_pub` (Debian's Mosquitto clients, installed by `make deps`) at QoS1: it returns
/// once the broker has acknowledged, which for the agent's broker means committed.
fn mosquitto_pub(port: u16, topic: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-i", "arm-test-pub", "-t", topic, "-m", payload])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients, or `make deps`)");
    assert!(
        out.status.success(),
        "mosquitto_pub {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest agent's shadow documents of `devices`, read with its own CLI (`shadow get`).
fn shadows(vm: &mut Vm, devices: &[String]) -> HashMap<String, Value> {
    let list = devices.join(" ");
    let out = vm.sh(&format!(
        "for d in {list}; do echo \"@@device $d\"; edgesync-agent shadow get \"$d\" --config {CONFIG} || true; done"
    ));
    let mut docs = HashMap::new();
    for chunk in out.split("@@device ").skip(1) {
        let (name, json) = chunk.split_once('\n').unwrap_or((chunk, ""));
        match serde_json::from_str::<Value>(json) {
            Ok(doc) => {
                docs.insert(name.trim().to_owned(), doc);
            }
            // Shown, so that a missing shadow and an unreadable answer can be told apart.
            Err(e) => eprintln!(
                "shadow get {} in the guest: {e}; it printed {json:?}",
                name.trim()
            ),
        }
    }
    docs
}

fn counter(docs: &HashMap<String, Value>, device: &str) -> Option<u64> {
    docs.get(device)?["state"]["reported"]["n"].as_u64()
}

/// kill -9 of the guest's agent, returning once the process is gone.
fn kill_9(vm: &mut Vm) {
    vm.sh(
        "p=$(pidof edgesync-agent) && kill -9 $p && while kill -0 $p 2>/dev/null; do usleep 10000; done",
    );
}

/// Fails unless the guest's database holds every counter the publisher had acknowledged
/// (read with the agent stopped).
fn assert_nothing_lost(vm: &mut Vm, acked: &Acked, devices: &[String], when: &str) {
    let snapshot = acked.max_by_device.lock().unwrap().clone();
    let stored = block_in_place(|| shadows(vm, devices));
    let lost: Vec<_> = snapshot
        .iter()
        .filter(|(d, n)| counter(&stored, d).is_none_or(|s| s < **n))
        .map(|(d, n)| (d.clone(), counter(&stored, d), *n))
        .collect();
    if !lost.is_empty() {
        // The log is on the guest's RAM file system: gone after a power cut.
        let (_, log) = block_in_place(|| vm.run("cat /var/log/agent.log", Duration::from_secs(30)));
        panic!("{when}: acknowledged but not committed (device, stored, acked): {lost:?}\n{log}");
    }
}

/// Fails unless each device's stored counter is the last one published.
fn assert_final_states(vm: &mut Vm, last: &HashMap<String, u64>, triple: &str) {
    let devices: Vec<String> = last.keys().cloned().collect();
    let stored = block_in_place(|| shadows(vm, &devices));
    for (d, n) in last {
        assert_eq!(
            counter(&stored, d),
            Some(*n),
            "{triple}: final state of {d}"
        );
    }
}

/// The guest's agent config: embedded broker and HTTP endpoint on every guest address (the
/// guest's ports are reachable only through the host's loopback forwards).
fn guest_config() -> AgentConfig {
    let mut config = AgentConfig::embedded(Path::new("/var/lib/edgesync"), GUEST_MQTT);
    config.listen_host = "0.0.0.0".into();
    config.http_port = Some(GUEST_HTTP);
    config.extra = "[broker]\nallow_anonymous = true\n".into();
    config
}

/// Waits until the guest agent's /readyz (through the forwarded port) answers 200; on timeout
/// fails with the guest's agent log.
async fn wait_ready(vm: &mut Vm, http: u16) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut checks = 0u32;
    while !http_get(http, "/readyz").starts_with("HTTP/1.1 200") {
        checks += 1;
        let exited = checks.is_multiple_of(20)
            && block_in_place(|| vm.run("pidof edgesync-agent", Duration::from_secs(30)).0 != 0);
        if exited || Instant::now() > deadline {
            let log = block_in_place(|| vm.sh("cat /var/log/agent.log"));
            panic!("the guest agent exited or was not ready within 90 s; its log:\n{log}");
        }
        // Re-check pace only; the deadline decides.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn agent_under_emulation(triple: &str) {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("arm");
    let token = format!("token-{}", ns.name);
    create_node(
        cp,
        &ns.name,
        "edge-1",
        &token,
        "  autoRegisterDevices: true",
    );
    let controller = Controller::start(
        cp,
        &[
            "--lease-name",
            "edgesync-arm",
            "--lease-namespace",
            &ns.name,
        ],
    );
    let mut config = guest_config();
    config.namespace = ns.name.clone();
    config.cloud = Some((
        format!("http://{HOST_FROM_GUEST}:{}", controller.addr.port()),
        TOKEN_FILE.into(),
    ));
    let files = [
        (CONFIG, config.to_toml()),
        (TOKEN_FILE, format!("{token}\n")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
    let mut vm = block_in_place(|| Vm::boot(triple, &files, &[GUEST_MQTT, GUEST_HTTP]));
    let mqtt = vm.host_port(GUEST_MQTT);
    let http = vm.host_port(GUEST_HTTP);

    let started = Instant::now();
    block_in_place(|| vm.sh(START_AGENT));
    wait_ready(&mut vm, http).await;
    eprintln!("{triple}: agent ready {:?} after start", started.elapsed());

    // Plain JSON on an ingest topic, and a shadow update, from Mosquitto's own client.
    block_in_place(|| {
        mosquitto_pub(
            mqtt,
            "factory/press-1/state",
            r#"{"temp":21.5,"mode":"auto"}"#,
        );
        mosquitto_pub(
            mqtt,
            "edgesync/press-2/shadow/update",
            r#"{"state":{"reported":{"rpm":1200}},"clientToken":"t1"}"#,
        );
    });
    // Acknowledged means committed: no waiting.
    let docs = block_in_place(|| shadows(&mut vm, &["press-1".into(), "press-2".into()]));
    assert_eq!(
        docs.get("press-1").map(|d| &d["state"]["reported"]),
        Some(&json!({"temp": 21.5, "mode": "auto"})),
        "{docs:?}"
    );
    assert_eq!(
        docs.get("press-2").map(|d| &d["state"]["reported"]),
        Some(&json!({"rpm": 1200})),
        "{docs:?}"
    );

    // kill -9 inside the guest while a device publishes: nothing it had acknowledged is lost.
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i}")).collect();
    let acked = Acked::new();
    let publisher = tokio::spawn(publish_through_crashes(
        mqtt,
        DEVICES,
        MESSAGES,
        acked.clone(),
    ));
    for k in 1..=KILLS {
        let at = MESSAGES * k / (KILLS + 1) + DEVICES / 3;
        acked.at_least(at, "publisher progress").await;
        block_in_place(|| kill_9(&mut vm));
        assert_nothing_lost(&mut vm, &acked, &devices, &format!("{triple} kill {k}"));
        block_in_place(|| vm.sh(START_AGENT));
    }
    let last = publisher.await.unwrap();
    assert_final_states(&mut vm, &last, triple);

    // The uplink: every device's final state reaches Kubernetes through the real controller.
    let api: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let mut expected: HashMap<String, Value> = last
        .iter()
        .map(|(d, n)| (d.clone(), json!({"n": n, "pad": "x".repeat(200)})))
        .collect();
    expected.insert("press-1".into(), json!({"temp": 21.5, "mode": "auto"}));
    expected.insert("press-2".into(), json!({"rpm": 1200}));
    wait::until(
        "every Device in Kubernetes shows the guest's last state",
        Duration::from_secs(120),
        || {
            let api = api.clone();
            let expected = expected.clone();
            async move {
                let list = api.list(&Default::default()).await.ok()?;
                let matching = list.items.iter().filter(|d| {
                    let name = d.metadata.name.as_deref().unwrap_or_default();
                    let reported = d.status.as_ref().and_then(|s| s.reported.clone());
                    expected
                        .get(name)
                        .is_some_and(|want| reported.is_some_and(|r| Value::Object(r) == *want))
                });
                (matching.count() == expected.len()).then_some(())
            }
        },
    )
    .await;

    let rss = block_in_place(|| vm.sh("grep VmRSS /proc/$(pidof edgesync-agent)/status"));
    eprintln!(
        "{triple}: agent {} after the run; whole test {:?}",
        rss.trim(),
        started.elapsed()
    );
}

/// Power cuts of the whole emulated machine (the emulator is killed: the guest's page cache is
/// gone, its disk keeps what reached it) while a device publishes at QoS1: with the default
/// `durability = "power-loss-safe"`, nothing acknowledged is lost.
async fn power_cuts(triple: &str) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("data.img");
    make_disk(&disk, 64);
    let toml = guest_config().to_toml();
    let files = [(CONFIG, toml.as_str())];
    let mut vm = block_in_place(|| {
        Vm::boot_with_disk(triple, &files, &[GUEST_MQTT, GUEST_HTTP], Some(&disk))
    });
    let (mqtt, http) = (vm.host_port(GUEST_MQTT), vm.host_port(GUEST_HTTP));
    block_in_place(|| vm.sh(START_AGENT));
    wait_ready(&mut vm, http).await;

    let devices: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i}")).collect();
    let acked = Acked::new();
    for k in 0..=POWER_CUTS {
        let publisher = tokio::spawn(publish_rounds(mqtt, k * ROUNDS, acked.clone()));
        if k == POWER_CUTS {
            let last = publisher
                .await
                .unwrap()
                .expect("no power cut in the last phase");
            assert_final_states(&mut vm, &last, triple);
            break;
        }
        // Mid-round, so that messages are in flight when the power goes.
        let at = acked.count() + DEVICES * ROUNDS / 2 + DEVICES / 3;
        acked.at_least(at, "publisher progress").await;
        vm = block_in_place(|| vm.power_cycle());
        // The cut ended the publisher's connection: no acknowledgement arrives after it.
        assert!(
            publisher.await.unwrap().is_none(),
            "the publisher outlived the power cut"
        );
        assert_nothing_lost(
            &mut vm,
            &acked,
            &devices,
            &format!("{triple} power cut {}", k + 1),
        );
        block_in_place(|| vm.sh(START_AGENT));
        wait_ready(&mut vm, http).await;
    }
}

/// One publishing phase on one connection (no reconnect, so every PUBACK maps to its message
/// without depending on the client library's resend order): rounds `base..base + ROUNDS`, one
/// message per device per round at QoS1, each round acknowledged before the next. Returns
/// each device's last counter, or None when the connection broke first.
async fn publish_rounds(port: u16, base: u64, acked: Arc<Acked>) -> Option<HashMap<String, u64>> {
    let mut opts = MqttOptions::new(format!("power-cut-{base}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(DEVICES as u16);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let mut last = HashMap::new();
    for n in base..base + ROUNDS {
        let mut in_flight = HashMap::new();
        let mut sent = 0;
        for d in 0..DEVICES {
            let device = format!("dev-{d}");
            client
                .publish(
                    format!("factory/{device}/state"),
                    QoS::AtLeastOnce,
                    false,
                    json!({"n": n}).to_string(),
                )
                .await
                .unwrap();
            last.insert(device, n);
        }
        let mut pending = DEVICES;
        while pending > 0 {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    in_flight.insert(pkid, format!("dev-{sent}"));
                    sent += 1;
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let device = in_flight
                        .remove(&ack.pkid)
                        .expect("a PUBACK for a message sent");
                    acked.record(device, n);
                    pending -= 1;
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
    Some(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_loses_nothing_acknowledged_in_power_cuts() {
    power_cuts("aarch64-unknown-linux-gnu").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_loses_nothing_acknowledged_in_power_cuts() {
    power_cuts("armv7-unknown-linux-gnueabihf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_emulation_keeps_what_it_acknowledged_and_reports_upstream() {
    agent_under_emulation("aarch64-unknown-linux-gnu").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_under_emulation_keeps_what_it_acknowledged_and_reports_upstream() {
    agent_under_emulation("armv7-unknown-linux-gnueabihf").await;
}
