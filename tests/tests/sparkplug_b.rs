//! Sparkplug B end to end: an edge node from an independent implementation (pysparkplug)
//! publishes births, alias-only data, a sequence gap and deaths through Mosquitto; the agent
//! reports them to the controller, which writes Device status; a desired change comes back to
//! the edge node as a DCMD.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgesync_crds::Device;
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::device::TestDevice;
use edgesync_e2e::sparkplug::EdgeNode;
use edgesync_e2e::stack::{Stack, StackOptions};
use edgesync_e2e::wait;
use kube::Api;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

/// Waits until Device `name` satisfies `check` and returns it.
async fn device_until(
    devices: &Api<Device>,
    what: &str,
    name: &str,
    check: impl Fn(&Device) -> bool,
) -> Device {
    wait::until(what, DEADLINE, || async {
        let d = devices.get(name).await.ok()?;
        check(&d).then_some(d)
    })
    .await
}

fn reported(d: &Device) -> Value {
    Value::Object(
        d.status
            .as_ref()
            .and_then(|s| s.reported.clone())
            .unwrap_or_default(),
    )
}

fn online(d: &Device) -> Option<(String, String)> {
    let c = d
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Online")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparkplug_edge_node_reaches_kubernetes_and_desired_values_return_as_dcmd() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(
        cp,
        "sparkplug",
        StackOptions {
            node_spec: "  autoRegisterDevices: true".into(),
            agent_toml: "[[ingest]]\nformat = \"sparkplug-b\"\ngroup = \"Plant1\"\nrebirth_interval_ms = 200\n".into(),
            ..StackOptions::default()
        },
    )
    .await;
    let devices = stack.devices().await;
    let mut edge = EdgeNode::start(stack.broker.port(), "Plant1", "GW1").await;

    // Births declare the metrics with aliases; data carries aliases only.
    edge.send("birth").await;
    edge.send("data Press_1 temperature=21.5 count=7").await;
    let press1 = json!({
        "temperature": 21.5, "count": 7, "running": true, "name": "press one",
        "Config": {"setpoint": 1.5}
    });
    device_until(
        &devices,
        "gw1.press-1 shows its metrics",
        "gw1.press-1",
        |d| reported(d) == press1 && online(d).is_some_and(|(s, _)| s == "True"),
    )
    .await;
    device_until(
        &devices,
        "gw1.press-2 shows its birth",
        "gw1.press-2",
        |d| reported(d) == json!({"temperature": 19.5}),
    )
    .await;
    device_until(&devices, "the edge node's own metrics", "gw1", |d| {
        reported(d) == json!({"Properties": {"Firmware": "1.2.3"}})
    })
    .await;
    let table = cp.kubectl_ok(&["-n", &stack.ns.name, "get", "devices", "--no-headers"]);
    for name in ["gw1 ", "gw1.press-1 ", "gw1.press-2 "] {
        assert!(
            table.lines().any(|l| l.starts_with(name)),
            "kubectl get devices lists {name}: {table}"
        );
    }

    // Not Sparkplug B at all, and a metric with an alias no birth declared: refused or left
    // out, nothing else changes.
    let rogue = TestDevice::connect("rogue", stack.broker.port(), "rogue/none").await;
    rogue
        .publish(
            "spBv1.0/Plant1/DDATA/GW1/Press_1",
            b"{\"temperature\": 99}".to_vec(),
        )
        .await;

    // A sequence gap: the agent keeps the values it can resolve and asks for a rebirth,
    // which the edge node answers with its births.
    edge.send("skip 3").await;
    edge.send("data Press_1 temperature=22.5").await;
    edge.expect("ncmd Node Control/Rebirth=True", DEADLINE)
        .await;
    edge.expect("reborn", DEADLINE).await;
    let d = device_until(&devices, "the gapped message's value", "gw1.press-1", |d| {
        reported(d)["temperature"] == json!(22.5)
    })
    .await;
    assert_eq!(reported(&d)["count"], json!(7), "{:?}", reported(&d));

    // A desired change reaches the edge node as a DCMD with the birth's datatype (Float).
    cp.patch_device(
        &stack.ns.name,
        "gw1.press-1",
        r#"{"spec":{"desired":{"Config":{"setpoint":2.5}}}}"#,
    );
    edge.expect("dcmd Press_1 Config/setpoint=2.5", DEADLINE)
        .await;

    // DDEATH: the device is offline while its node and the other device stay online.
    edge.send("ddeath Press_1").await;
    device_until(
        &devices,
        "gw1.press-1 offline after DDEATH",
        "gw1.press-1",
        |d| online(d) == Some(("False".into(), "DeviceDisconnected".into())),
    )
    .await;
    let other = devices.get("gw1.press-2").await.unwrap();
    assert_eq!(online(&other).unwrap().0, "True");

    // Born again: online again, and the desired value still differs, so the DCMD is sent
    // again with the birth.
    edge.send("birth").await;
    device_until(
        &devices,
        "gw1.press-1 online after DBIRTH",
        "gw1.press-1",
        |d| online(d).is_some_and(|(s, _)| s == "True"),
    )
    .await;
    edge.expect("dcmd Press_1 Config/setpoint=2.5", DEADLINE)
        .await;

    // The connection drops: the broker publishes the node's will (NDEATH), and the node and
    // all its devices go offline.
    edge.send("die").await;
    for name in ["gw1", "gw1.press-1", "gw1.press-2"] {
        device_until(&devices, "offline after NDEATH", name, |d| {
            online(d) == Some(("False".into(), "DeviceDisconnected".into()))
        })
        .await;
    }
    let node = cp.kubectl_ok(&[
        "-n",
        &stack.ns.name,
        "get",
        "edgenode",
        "edge-1",
        "--no-headers",
    ]);
    assert_eq!(
        node.split_whitespace().nth(1),
        Some("True"),
        "the edge node (the agent) is still Ready: {node}"
    );
    let log = std::fs::read_to_string(stack.agent.log_path()).unwrap_or_default();
    assert!(
        log.contains("sparkplug_decode"),
        "the rogue message is refused and logged"
    );
}

/// The default deployment: the agent's embedded broker. Births, alias-only data and the
/// will (NDEATH) go through it to the shadows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_carries_births_data_and_the_will() {
    use edgesync_e2e::agent::{AgentConfig, spawn_agent};
    let dir = tempfile::tempdir().unwrap();
    let port = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(dir.path(), port);
    config.extra = "[[ingest]]\nformat = \"sparkplug-b\"\n".into();
    let agent = spawn_agent(&config);
    let mut probe = TestDevice::connect("probe", port, "edgesync/probe/shadow/#").await;
    probe.wait_for_agent("edgesync", "probe").await;
    let db = config.data_dir.join("edgesync-agent.db");
    let shadow = |device: &str| {
        edgesync_agent::cli::shadow_get(&db, device)
            .ok()
            .flatten()
            .unwrap_or_default()
    };

    let mut edge = EdgeNode::start(port, "Line7", "PLC-4").await;
    edge.send("birth").await;
    edge.send("data Press_1 temperature=30.5 running=false")
        .await;
    wait::until("the data is in the shadow", DEADLINE, || async {
        let doc = shadow("plc-4.press-1");
        (doc["state"]["reported"]["temperature"] == json!(30.5)
            && doc["state"]["reported"]["running"] == json!(false)
            && doc["connected"] == json!(true))
        .then_some(())
    })
    .await;
    edge.send("die").await;
    wait::until(
        "the will marks both devices disconnected",
        DEADLINE,
        || async {
            (shadow("plc-4.press-1")["connected"] == json!(false)
                && shadow("plc-4.press-2")["connected"] == json!(false)
                && shadow("plc-4")["connected"] == json!(false))
            .then_some(())
        },
    )
    .await;
    drop(agent);
}
