//! End to end, the happy path: 200 devices publish plain JSON and shadow updates through
//! Mosquitto to the agent, which reports to the controller, which writes Device status; then a
//! `kubectl patch` of `spec.desired` travels back down to the device as a delta.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgesync_crds::condition_status;
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::device::TestDevice;
use edgesync_e2e::stack::{Stack, StackOptions};
use edgesync_e2e::wait;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

const DEVICES: usize = 200;
const ROUNDS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_to_kubernetes_and_desired_back_to_the_device() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let stack = Stack::start(
        cp,
        "e2e-happy",
        StackOptions {
            node_spec: "  autoRegisterDevices: true".into(),
            ..StackOptions::default()
        },
    )
    .await;
    let mut probe = TestDevice::connect("probe", stack.broker.port(), "edgesync/+/shadow/#").await;
    probe.wait_for_agent("edgesync", "nobody").await;

    // Every device publishes ROUNDS states; even devices as plain JSON, odd ones through the
    // shadow protocol. QoS1, every publish acknowledged by the broker.
    let mut opts = MqttOptions::new("fleet", "127.0.0.1", stack.broker.port());
    opts.set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let pump = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < DEVICES * ROUNDS as usize {
            if let Event::Incoming(Packet::PubAck(_)) =
                el.poll().await.expect("publisher connection")
            {
                acked += 1;
            }
        }
    });
    for round in 0..ROUNDS {
        for d in 0..DEVICES {
            let state = json!({"n": round, "temp": 20 + d, "line": format!("L{}", d % 4)});
            let (topic, payload) = if d % 2 == 0 {
                (format!("factory/dev-{d}/state"), state.to_string())
            } else {
                (
                    format!("edgesync/dev-{d}/shadow/update"),
                    json!({"state": {"reported": state}}).to_string(),
                )
            };
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    }
    tokio::time::timeout(Duration::from_secs(60), pump)
        .await
        .expect("broker acks every publish")
        .unwrap();

    let devices = stack.devices().await;
    let converged = wait::until(
        "every Device shows its last published state",
        Duration::from_secs(90),
        || {
            let devices = devices.clone();
            async move {
                let list = devices.list(&Default::default()).await.ok()?;
                let done = list.items.iter().filter(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.reported.as_ref())
                        .is_some_and(|r| r["n"] == json!(ROUNDS - 1))
                });
                (list.items.len() == DEVICES && done.count() == DEVICES).then_some(list)
            }
        },
    )
    .await;
    for d in &converged.items {
        let name = d.metadata.name.clone().unwrap();
        let i: usize = name.trim_start_matches("dev-").parse().unwrap();
        let reported = d.status.as_ref().unwrap().reported.clone().unwrap();
        assert_eq!(
            serde_json::Value::Object(reported),
            json!({"n": ROUNDS - 1, "temp": 20 + i, "line": format!("L{}", i % 4)}),
            "{name}"
        );
        assert_eq!(d.spec.node_name, "edge-1");
    }
    let reached = started.elapsed();

    // kubectl shows them Online and In-Sync.
    wait::until(
        "kubectl get devices shows Online and In-Sync",
        Duration::from_secs(30),
        || async {
            let out = cp.kubectl_ok(&["-n", &stack.ns.name, "get", "devices", "--no-headers"]);
            let rows: Vec<&str> = out.lines().collect();
            let good = rows.iter().filter(|r| {
                let cols: Vec<&str> = r.split_whitespace().collect();
                cols.get(2) == Some(&"True") && cols.get(3) == Some(&"True")
            });
            (rows.len() == DEVICES && good.count() == DEVICES).then_some(())
        },
    )
    .await;

    // An operator sets a desired value: the device gets it as a delta.
    let mut dev = TestDevice::connect(
        "dev-7-client",
        stack.broker.port(),
        "edgesync/dev-7/shadow/#",
    )
    .await;
    let patched = Instant::now();
    cp.patch_device(
        &stack.ns.name,
        "dev-7",
        r#"{"spec":{"desired":{"speed":1500}}}"#,
    );
    let delta = dev.expect("edgesync/dev-7/shadow/update/delta").await;
    let delta_latency = patched.elapsed();
    assert_eq!(delta["state"], json!({"speed": 1500}));
    let d = devices.get("dev-7").await.unwrap();
    wait::until(
        "InSync=False while the device differs",
        Duration::from_secs(20),
        || async {
            let d = devices.get("dev-7").await.ok()?;
            (condition_status(&d.status?.conditions, "InSync") == Some("False")).then_some(())
        },
    )
    .await;

    // The device applies it and reports: In-Sync again, observed generation recorded.
    dev.publish(
        "edgesync/dev-7/shadow/update",
        json!({"state":{"reported":{"speed":1500}}}).to_string(),
    )
    .await;
    wait::until(
        "InSync=True after the device reports the desired value",
        Duration::from_secs(30),
        || async {
            let d = devices.get("dev-7").await.ok()?;
            let st = d.status?;
            (condition_status(&st.conditions, "InSync") == Some("True")
                && st.reported?["speed"] == json!(1500))
            .then_some(())
        },
    )
    .await;
    let st = devices.get("dev-7").await.unwrap().status.unwrap();
    assert_eq!(st.observed_desired_generation, d.metadata.generation);

    // A value the machine cannot take: the device refuses it over MQTT, and the Device says
    // so (`status.desiredRejection`, `DesiredAccepted=False` with the device's code).
    cp.patch_device(
        &stack.ns.name,
        "dev-7",
        r#"{"spec":{"desired":{"speed":9000}}}"#,
    );
    let delta = dev.expect("edgesync/dev-7/shadow/update/delta").await;
    assert_eq!(delta["state"], json!({"speed": 9000}));
    let refused = delta["desiredGeneration"]
        .as_i64()
        .expect("the delta names its generation");
    dev.publish(
        "edgesync/dev-7/shadow/desired/reject",
        json!({"desiredGeneration": refused, "code": "out_of_range",
            "message": "speed 9000 is above 6000"})
        .to_string(),
    )
    .await;
    dev.expect("edgesync/dev-7/shadow/desired/reject/accepted")
        .await;
    let accepted = |d: &edgesync_crds::Device| {
        let st = d.status.as_ref()?;
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == edgesync_crds::CONDITION_DESIRED_ACCEPTED)?;
        Some((
            c.status.clone(),
            c.reason.clone(),
            st.desired_rejection.clone(),
        ))
    };
    let (_, _, rejection) = wait::until(
        "DesiredAccepted=False with the device's code",
        Duration::from_secs(30),
        || async {
            let d = devices.get("dev-7").await.ok()?;
            accepted(&d).filter(|(status, reason, _)| status == "False" && reason == "OutOfRange")
        },
    )
    .await;
    let rejection = rejection.expect("status.desiredRejection");
    wait::until(
        "kubectl describe shows a DesiredRefused Event with the device's message",
        Duration::from_secs(30),
        || async {
            let out = cp.kubectl_ok(&["-n", &stack.ns.name, "describe", "device/dev-7"]);
            let events = out.split("Events:").nth(1)?.to_owned();
            (events.contains("DesiredRefused") && events.contains("speed 9000 is above 6000"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        (rejection.generation, rejection.message.as_str()),
        (refused, "speed 9000 is above 6000")
    );
    // A newer desired value is a new question: once the agent applies it, the refusal goes.
    cp.patch_device(
        &stack.ns.name,
        "dev-7",
        r#"{"spec":{"desired":{"speed":5000}}}"#,
    );
    dev.expect("edgesync/dev-7/shadow/update/delta").await;
    wait::until(
        "DesiredAccepted=True and no refusal after a newer generation",
        Duration::from_secs(30),
        || async {
            let d = devices.get("dev-7").await.ok()?;
            accepted(&d).filter(|(status, _, rejection)| status == "True" && rejection.is_none())
        },
    )
    .await;
    let en = cp.kubectl_ok(&[
        "-n",
        &stack.ns.name,
        "get",
        "edgenode",
        "edge-1",
        "--no-headers",
    ]);
    assert!(
        en.split_whitespace().nth(1) == Some("True"),
        "EdgeNode Ready: {en}"
    );
    println!(
        "e2e happy path: {DEVICES} devices x {ROUNDS} updates converged in {reached:?}; desired->delta {delta_latency:?}; writes: {}",
        stack
            .controller
            .metric("edgesync_controller_status_writes_total")
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_to_a_tls_controller_trusting_a_private_ca() {
    reports_over_tls_with_a_private_ca(true).await;
}

/// Minimal edge images often have no CA store at all: `cloud.ca_file` alone must do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_system_ca_certificates_reports_to_a_tls_controller_with_ca_file() {
    reports_over_tls_with_a_private_ca(false).await;
}

async fn reports_over_tls_with_a_private_ca(system_roots: bool) {
    use edgesync_e2e::agent::{AgentConfig, spawn_agent};
    use edgesync_e2e::controller::{Controller, create_node, self_signed_cert};
    use edgesync_e2e::mosquitto::Mosquitto;

    let cp = ControlPlane::shared();
    let ns = cp.namespace("e2e-tls");
    create_node(
        cp,
        &ns.name,
        "edge-1",
        "tls-token",
        "  autoRegisterDevices: true",
    );
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(dir.path());
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let controller = Controller::spawn(cp, &["--tls-cert", &cert_s, "--tls-key", &key_s]);
    let broker = Mosquitto::start();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tls-token").unwrap();
    let mut config = AgentConfig::new(&dir.path().join("agent"), &broker.url());
    config.namespace = ns.name.clone();
    config.cloud = Some((format!("https://{}", controller.addr), token_file));
    config.cloud_ca = Some(cert);
    if !system_roots {
        // rustls-native-certs reads only these when they are set: an empty file and directory
        // stand for a system without CA certificates.
        let empty = dir.path().join("no-ca");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(empty.join("none.pem"), "").unwrap();
        config.env = vec![
            (
                "SSL_CERT_FILE".into(),
                empty.join("none.pem").display().to_string(),
            ),
            ("SSL_CERT_DIR".into(), empty.display().to_string()),
        ];
    }
    let _agent = spawn_agent(&config);
    let mut dev = TestDevice::connect("tls-dev", broker.port(), "edgesync/+/shadow/#").await;
    dev.wait_for_agent("edgesync", "nobody").await;
    dev.publish(
        "factory/secure-press/state",
        json!({"temp": 42}).to_string(),
    )
    .await;
    let devices: kube::Api<edgesync_crds::Device> =
        kube::Api::namespaced(cp.client().await, &ns.name);
    wait::until(
        "the report to arrive over HTTPS",
        Duration::from_secs(60),
        || async {
            let st = devices.get_opt("secure-press").await.ok()??.status?;
            (st.reported?["temp"] == json!(42)).then_some(())
        },
    )
    .await;
}
