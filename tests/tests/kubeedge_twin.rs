//! KubeEdge device twins end to end: `mosquitto_pub` sends KubeEdge's documented twin
//! payloads through Mosquitto; `mosquitto_sub` sees the agent's replies on KubeEdge's result,
//! document and delta topics; the state reaches the Device in Kubernetes, and a desired
//! change comes back as `twin/update/delta`.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::stack::{Stack, StackOptions};
use edgesync_e2e::wait;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const DEADLINE: Duration = Duration::from_secs(30);

fn publish(port: u16, topic: &str, payload: &str) {
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .output()
        .expect("mosquitto_pub (hack/ensure-mosquitto.sh installs it)");
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

/// `mosquitto_sub -v` on the twin reply topics, read line by line.
struct Sub {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Sub {
    /// Subscribes, and returns once a probe message proves the subscription is in place.
    async fn start(port: u16) -> Sub {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v", "-q", "1"])
            .args(["-t", "$hw/events/device/#", "-t", "twin-test/ready"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub (hack/ensure-mosquitto.sh installs it)");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut sub = Sub {
            _child: child,
            lines,
        };
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            publish(port, "twin-test/ready", "x");
            let next = tokio::time::timeout(Duration::from_millis(200), sub.lines.next_line());
            if let Ok(Ok(Some(line))) = next.await
                && line.starts_with("twin-test/ready")
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto_sub did not subscribe within {DEADLINE:?}"
            );
        }
        sub
    }

    /// The payload of the next message on `topic` (others are skipped).
    async fn expect(&mut self, topic: &str) -> Value {
        let found = tokio::time::timeout(DEADLINE, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Some(payload) = line.strip_prefix(topic).and_then(|r| r.strip_prefix(' ')) {
                    return serde_json::from_str(payload).unwrap();
                }
            }
            panic!("mosquitto_sub ended");
        });
        found
            .await
            .unwrap_or_else(|_| panic!("no message on {topic} within {DEADLINE:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeedge_twin_messages_reach_kubernetes_and_desired_values_return_as_delta() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(
        cp,
        "twin",
        StackOptions {
            node_spec: "  autoRegisterDevices: true".into(),
            agent_toml: "[[ingest]]\nformat = \"kubeedge-twin\"\n".into(),
            ..StackOptions::default()
        },
    )
    .await;
    let port = stack.broker.port();
    let devices = stack.devices().await;
    let mut sub = Sub::start(port).await;
    // Probes still queued are skipped: the replies below are matched by topic.

    // A mapper's update, as KubeEdge documents it (values are strings, typed by metadata).
    publish(
        port,
        "$hw/events/device/press-1/twin/update",
        r#"{"event_id":"ev-1","timestamp":1700000000000,"twin":{"temperature":{"actual":{"value":"23.5","metadata":{"timestamp":1700000000000}},"expected":{"value":"25"},"optional":true,"metadata":{"type":"float"}},"mode":{"actual":{"value":"auto"},"metadata":{"type":"string"}}}}"#,
    );
    let result = sub
        .expect("$hw/events/device/press-1/twin/update/result")
        .await;
    assert_eq!(result["event_id"], "ev-1");
    assert_eq!(result["twin"]["temperature"]["actual"]["value"], "23.5");
    let doc = sub
        .expect("$hw/events/device/press-1/twin/update/document")
        .await;
    assert_eq!(doc["twin"]["mode"]["last"], Value::Null);
    assert_eq!(doc["twin"]["mode"]["current"]["actual"]["value"], "auto");
    wait::until("press-1 reported in Kubernetes", DEADLINE, || async {
        let d = devices.get("press-1").await.ok()?;
        (Value::Object(d.status?.reported?) == json!({"temperature": 23.5, "mode": "auto"}))
            .then_some(())
    })
    .await;

    // twin/get answers with every twin.
    publish(
        port,
        "$hw/events/device/press-1/twin/get",
        r#"{"event_id":"g-1","timestamp":1}"#,
    );
    let got = sub
        .expect("$hw/events/device/press-1/twin/get/result")
        .await;
    assert_eq!(got["event_id"], "g-1");
    assert_eq!(got["twin"]["temperature"]["actual"]["value"], "23.5");

    // Bad input: a numeric value (KubeEdge's values are strings) is refused with a code and
    // reason, and nothing changes.
    publish(
        port,
        "$hw/events/device/press-1/twin/update",
        r#"{"event_id":"ev-bad","timestamp":1,"twin":{"temperature":{"actual":{"value":99}}}}"#,
    );
    let bad = sub
        .expect("$hw/events/device/press-1/twin/update/result")
        .await;
    assert_eq!(
        (bad["event_id"].as_str(), bad["code"].as_u64()),
        (Some("ev-bad"), Some(400)),
        "{bad}"
    );
    assert!(
        bad["reason"].as_str().unwrap().contains("must be a string"),
        "{bad}"
    );
    publish(
        port,
        "$hw/events/device/press-1/twin/get",
        r#"{"event_id":"g-2"}"#,
    );
    let got = sub
        .expect("$hw/events/device/press-1/twin/get/result")
        .await;
    assert_eq!(
        got["twin"]["temperature"]["actual"]["value"], "23.5",
        "unchanged: {got}"
    );

    // The namespace/name form of newer KubeEdge releases: replies use the same form.
    let ns_topic = format!("$hw/events/device/{}/press-2/twin/update", stack.ns.name);
    publish(
        port,
        &ns_topic,
        r#"{"event_id":"ev-2","twin":{"count":{"actual":{"value":"7"},"metadata":{"type":"int"}}}}"#,
    );
    let result = sub.expect(&format!("{ns_topic}/result")).await;
    assert_eq!(result["twin"]["count"]["actual"]["value"], "7");
    wait::until("press-2 reported in Kubernetes", DEADLINE, || async {
        let d = devices.get("press-2").await.ok()?;
        (Value::Object(d.status?.reported?) == json!({"count": 7})).then_some(())
    })
    .await;

    // A desired change reaches the device as twin/update/delta, values as strings.
    cp.patch_device(
        &stack.ns.name,
        "press-1",
        r#"{"spec":{"desired":{"temperature":25}}}"#,
    );
    let delta = sub
        .expect("$hw/events/device/press-1/twin/update/delta")
        .await;
    assert_eq!(delta["delta"], json!({"temperature": "25"}), "{delta}");
    assert_eq!(delta["twin"]["temperature"]["expected"]["value"], "25");
    assert_eq!(delta["twin"]["temperature"]["actual"]["value"], "23.5");
}
