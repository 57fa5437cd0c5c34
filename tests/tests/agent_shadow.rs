//! The agent's device-facing shadow protocol against Debian's Mosquitto: round trips, deltas,
//! conflicts, and every rejection path, with good messages around bad ones unaffected.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgesync_agent::config::Settings;
use edgesync_e2e::agent::AgentConfig;
use edgesync_e2e::contract::ContractServer;
use edgesync_e2e::device::TestDevice;
use edgesync_e2e::mosquitto::Mosquitto;
use edgesync_e2e::wait;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct RunningAgent {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

fn start(config: &AgentConfig) -> RunningAgent {
    let settings = Settings::parse(&config.to_toml()).unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        edgesync_agent::app::run(settings, token)
            .await
            .map_err(|e| format!("{e:#}"))
    });
    RunningAgent { shutdown, task }
}

impl RunningAgent {
    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("agent stops within 20 s");
        r.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_round_trip_conflicts_and_every_rejection() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let agent = start(&AgentConfig::new(dir.path(), &broker.url()));
    round_trip_conflicts_and_rejections(broker.port()).await;
    agent.stop().await;
}

/// The same protocol through the agent's embedded broker (`mqtt.embedded = true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_round_trip_conflicts_and_every_rejection_via_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let agent = start(&AgentConfig::embedded(dir.path(), port));
    round_trip_conflicts_and_rejections(port).await;
    agent.stop().await;
}

async fn round_trip_conflicts_and_rejections(port: u16) {
    let mut dev = TestDevice::connect("device-1", port, "edgesync/+/shadow/#").await;
    let missing = dev.wait_for_agent("edgesync", "nobody").await;
    assert_eq!(missing["code"], 404);

    let t = |s: &str| format!("edgesync/press-1/shadow/{s}");
    dev.publish(
        &t("update"),
        json!({"state":{"reported":{"temp":21,"motor":{"rpm":1200}}},"clientToken":"t1"})
            .to_string(),
    )
    .await;
    let accepted = dev.expect(&t("update/accepted")).await;
    assert_eq!(
        (accepted["version"].clone(), accepted["clientToken"].clone()),
        (json!(1), json!("t1"))
    );
    assert_eq!(accepted["state"]["reported"]["motor"]["rpm"], 1200);
    let docs = dev.expect(&t("update/documents")).await;
    assert_eq!(
        (
            docs["previous"]["version"].clone(),
            docs["current"]["version"].clone()
        ),
        (json!(0), json!(1))
    );

    // Optimistic concurrency: a stale version is 409, the current one is accepted.
    dev.publish(
        &t("update"),
        json!({"state":{"reported":{"temp":99}},"version":7,"clientToken":"c"}).to_string(),
    )
    .await;
    let r = dev.expect(&t("update/rejected")).await;
    assert_eq!(
        (r["code"].clone(), r["clientToken"].clone()),
        (json!(409), json!("c"))
    );
    dev.publish(
        &t("update"),
        json!({"state":{"reported":{"temp":22,"motor":{"dir":"cw"}}},"version":1}).to_string(),
    )
    .await;
    assert_eq!(dev.expect(&t("update/accepted")).await["version"], 2);

    // Every rejection path: a reply with code and message, nothing stored.
    let deep = json!({"state":{"reported":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}});
    let big = format!(
        "{{\"state\":{{\"reported\":{{\"blob\":\"{}\"}}}}}}",
        "x".repeat(130 * 1024)
    );
    let cases: Vec<(String, Vec<u8>, u64, &str)> = vec![
        (t("update"), b"not json".to_vec(), 400, "invalid JSON"),
        (t("update"), b"[1,2]".to_vec(), 400, "JSON object"),
        (
            t("update"),
            json!({"state":{"reported":5}}).to_string().into_bytes(),
            400,
            "state.reported",
        ),
        (t("update"), deep.to_string().into_bytes(), 400, "nested"),
        (t("update"), big.into_bytes(), 413, "larger than the limit"),
        (
            t("update"),
            json!({"state":{"reported":{"k":"v".repeat(9000)}}})
                .to_string()
                .into_bytes(),
            413,
            "8192",
        ),
        (
            t("update"),
            json!({"state":{"desired":{"speed":1}}})
                .to_string()
                .into_bytes(),
            400,
            "owned by the cloud",
        ),
        (
            t("update"),
            json!({"state":{"reported":{"$x":1}}})
                .to_string()
                .into_bytes(),
            400,
            "reserved",
        ),
        (
            t("update"),
            json!({"state":{"reported":{}},"clientToken":"t".repeat(65)})
                .to_string()
                .into_bytes(),
            400,
            "clientToken",
        ),
        (
            "edgesync/Bad_Id/shadow/update".into(),
            json!({"state":{"reported":{"a":1}}})
                .to_string()
                .into_bytes(),
            400,
            "invalid device id",
        ),
    ];
    for (topic, payload, code, msg) in cases {
        dev.publish(&topic, payload).await;
        let r = dev.expect(&format!("{topic}/rejected")).await;
        assert_eq!(r["code"], code, "{topic}: {r}");
        assert!(
            r["message"].as_str().unwrap().contains(msg),
            "{r} should mention {msg}"
        );
    }

    // A plain publisher's JSON is merged as reported state, no envelope needed.
    dev.publish(
        "factory/oven-3/state",
        json!({"tempC": 180, "door": "closed"}).to_string(),
    )
    .await;
    dev.publish("factory/oven-3/state", "garbage").await;
    dev.publish("factory/oven-3/state", json!({"door": null}).to_string())
        .await;
    // The two good messages land in order around the bad one.
    let got = wait_version(&mut dev, "oven-3", 2).await;
    assert_eq!(got["state"]["reported"], json!({"tempC": 180}));

    // press-1 holds exactly the accepted updates.
    dev.publish(&t("get"), "{}").await;
    let doc = dev.expect(&t("get/accepted")).await;
    assert_eq!(doc["version"], 2);
    assert_eq!(
        doc["state"]["reported"],
        json!({"temp":22,"motor":{"rpm":1200,"dir":"cw"}})
    );
    assert!(doc["metadata"]["reported"]["motor"]["rpm"]["timestamp"].is_u64());
}

async fn wait_version(dev: &mut TestDevice, device: &str, version: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        dev.publish(&format!("edgesync/{device}/shadow/get"), "{}")
            .await;
        let got = dev
            .expect(&format!("edgesync/{device}/shadow/get/accepted"))
            .await;
        if got["version"] == version {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device} never reached version {version}: {got}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_becomes_a_delta_and_is_kept_while_offline() {
    let broker = Mosquitto::start();
    let cloud = ContractServer::start("secret-token").await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "secret-token\n").unwrap();
    let mut config = AgentConfig::new(&dir.path().join("data"), &broker.url());
    config.cloud = Some((cloud.url(), token_file));
    config.extra = "[uplink]\nbatch_window_ms = 20\n".into();
    let agent = start(&config);
    let mut dev =
        TestDevice::connect("press-1-dev", broker.port(), "edgesync/press-1/shadow/#").await;
    dev.wait_for_agent("edgesync", "press-1").await;

    dev.publish(
        "edgesync/press-1/shadow/update",
        json!({"state":{"reported":{"speed":1000,"mode":"auto"}}}).to_string(),
    )
    .await;
    dev.expect("edgesync/press-1/shadow/update/accepted").await;

    cloud.set_desired(
        "press-1",
        2,
        json!({"speed":1200,"mode":"auto"})
            .as_object()
            .unwrap()
            .clone(),
    );
    let delta = dev.expect("edgesync/press-1/shadow/update/delta").await;
    assert_eq!(delta["state"], json!({"speed":1200}));

    // The agent reports the observed generation upstream.
    wait::until(
        "observed generation 2 reported",
        Duration::from_secs(20),
        || async { (cloud.seen().observed_generation.get("press-1") == Some(&2)).then_some(()) },
    )
    .await;

    // The device refuses generation 2: stored, answered, and reported upstream with the
    // shadow's next version. Refusals of a generation it does not hold change nothing.
    assert_eq!(delta["desiredGeneration"], json!(2));
    for (generation, code, answer) in [
        (1, "out_of_range", 409),
        (3, "out_of_range", 400),
        (2, "Out Of Range", 400),
    ] {
        dev.publish(
            "edgesync/press-1/shadow/desired/reject",
            json!({"desiredGeneration": generation, "code": code, "clientToken": "r0"}).to_string(),
        )
        .await;
        let refused = dev
            .expect("edgesync/press-1/shadow/desired/reject/rejected")
            .await;
        assert_eq!(
            refused["code"],
            json!(answer),
            "{generation} {code}: {refused}"
        );
    }
    dev.publish(
        "edgesync/press-1/shadow/desired/reject",
        json!({"desiredGeneration": 2, "code": "out_of_range",
            "message": "speed 1200 is above 1100", "clientToken": "r1"})
        .to_string(),
    )
    .await;
    let accepted = dev
        .expect("edgesync/press-1/shadow/desired/reject/accepted")
        .await;
    assert_eq!(accepted["desiredGeneration"], json!(2));
    assert_eq!(accepted["clientToken"], json!("r1"));
    wait::until(
        "the refusal reported upstream",
        Duration::from_secs(20),
        || async {
            let seen = cloud.seen();
            let r = seen.rejection.get("press-1")?.clone()?;
            let version = seen.latest.get("press-1")?.0;
            (r.desired_generation == 2 && r.code == "out_of_range")
                .then_some(version == accepted["version"].as_u64().unwrap())
        },
    )
    .await
    .then_some(())
    .expect("the report carrying the refusal is the shadow's version after it");

    // Uplink gone: a device that (re)connects still gets the stored desired state.
    drop(cloud);
    let mut late = TestDevice::connect(
        "press-1-late",
        broker.port(),
        "edgesync/press-1/shadow/get/#",
    )
    .await;
    late.publish("edgesync/press-1/shadow/get", "{}").await;
    let doc = late.expect("edgesync/press-1/shadow/get/accepted").await;
    assert_eq!(doc["state"]["desired"], json!({"speed":1200,"mode":"auto"}));
    assert_eq!(doc["state"]["delta"], json!({"speed":1200}));
    assert_eq!(doc["rejection"]["code"], json!("out_of_range"), "{doc}");

    // The device catches up; the delta empties.
    dev.publish(
        "edgesync/press-1/shadow/update",
        json!({"state":{"reported":{"speed":1200}}}).to_string(),
    )
    .await;
    dev.expect("edgesync/press-1/shadow/update/accepted").await;
    late.publish("edgesync/press-1/shadow/get", "{}").await;
    let doc = late.expect("edgesync/press-1/shadow/get/accepted").await;
    assert!(doc["state"].get("delta").is_none(), "{doc}");
    agent.stop().await;
}

/// A device looping on `shadow/get` (100 requests in flight, nonstop) while another device
/// publishes: every one of the other device's messages is acknowledged after its commit and
/// stored, and the looping device keeps getting committed documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_looping_on_get_does_not_hold_up_other_devices() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let config = AgentConfig::embedded(dir.path(), port);
    let mut agent = edgesync_e2e::agent::spawn_agent(&config);
    edgesync_e2e::wait::port_open("the embedded broker", port, Duration::from_secs(30)).await;

    let stop = CancellationToken::new();
    let getter =
        edgesync_e2e::device::GetLoop::start(port, "getter", json!({"mode": "auto"}), stop.clone())
            .await;
    let answers = getter.answers.clone();
    wait::until(
        "the getter to be answered",
        Duration::from_secs(30),
        || async { (answers.load(Ordering::Relaxed) >= 100).then_some(()) },
    )
    .await;

    // Meanwhile another device publishes 2,000 QoS1 messages, 100 in flight.
    const N: u64 = 2000;
    let mut o = MqttOptions::new("line-1", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60)).set_inflight(100);
    let (c, mut el) = AsyncClient::new(o, 1000);
    let publisher = tokio::spawn(async move {
        for n in 1..=N {
            c.publish(
                format!("factory/press-{}/state", n % 20),
                QoS::AtLeastOnce,
                false,
                json!({ "n": n }).to_string(),
            )
            .await
            .unwrap();
        }
    });
    let before = answers.load(Ordering::Relaxed);
    let mut acked = 0;
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        while acked < N {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await;
    assert!(all.is_ok(), "only {acked} of {N} acknowledged within 60 s");
    publisher.await.unwrap();
    let during = answers.load(Ordering::Relaxed) - before;
    stop.cancel();
    getter.task.await.unwrap();
    assert_eq!(acked, N);
    assert!(
        during > 0,
        "the getter was answered while the other device published"
    );
    let db = dir.path().join(edgesync_agent::config::DB_FILE);
    for d in 0..20 {
        let last = (1..=N).filter(|n| n % 20 == d).max().unwrap();
        let doc = edgesync_agent::cli::shadow_get(&db, &format!("press-{d}"))
            .unwrap()
            .unwrap();
        assert_eq!(doc["state"]["reported"]["n"], last, "press-{d}: {doc}");
    }
    agent.stop();
}

/// Many ingest mappings: the agent's subscriptions are queued without waiting on the MQTT
/// request channel only its own driver drains (one SUBSCRIBE carrying every filter), and a
/// message on the last mapping is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_ingest_mappings_are_all_subscribed() {
    const MAPPINGS: usize = 500;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(dir.path(), &broker.url());
    for i in 0..MAPPINGS {
        config.extra.push_str(&format!(
            "[[ingest]]\ntopic = \"line-{i}/{{device}}/state\"\n"
        ));
    }
    let agent = start(&config);
    let mut probe = TestDevice::connect("probe", broker.port(), "edgesync/probe/shadow/#").await;
    probe.wait_for_agent("edgesync", "probe").await;
    let dev = TestDevice::connect("plc", broker.port(), "unused/#").await;
    let db = dir.path().join(edgesync_agent::config::DB_FILE);
    for i in [0, MAPPINGS / 2, MAPPINGS - 1] {
        dev.publish(
            &format!("line-{i}/press-{i}/state"),
            json!({ "line": i }).to_string(),
        )
        .await;
        let doc = wait::until(
            &format!("a message on mapping {i} stored"),
            Duration::from_secs(20),
            || async { edgesync_agent::cli::shadow_get(&db, &format!("press-{i}")).ok()? },
        )
        .await;
        assert_eq!(doc["state"]["reported"]["line"], i, "{doc}");
    }
    agent.stop().await;
}
