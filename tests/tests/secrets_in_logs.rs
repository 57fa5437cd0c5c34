//! No secret reaches a log, even with every crate of both binaries logging at debug level:
//! the node token (sent with every batch, and checked against its Secret by the controller),
//! a wrong token presented to the controller, the devices' MQTT password on the embedded
//! broker, and a wrong password presented to it. The whole path runs, so each secret is used.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgesync_crds::Device;
use edgesync_e2e::agent::{AgentConfig, spawn_agent};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, batch, create_node, post_batch};
use edgesync_e2e::wait;
use kube::Api;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_logged_at_debug_level() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("secrets");
    // Distinct, greppable values that appear nowhere else.
    let token = format!("node-token-{:016x}", fastrand::u64(..));
    let wrong_token = format!("wrong-token-{:016x}", fastrand::u64(..));
    let password = format!("mqtt-pass-{:016x}", fastrand::u64(..));
    let wrong_password = format!("wrong-pass-{:016x}", fastrand::u64(..));
    create_node(
        cp,
        &ns.name,
        "edge-1",
        &token,
        "  autoRegisterDevices: true",
    );
    let controller = Controller::start_with_log(cp, &[], "debug");

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let port = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(&dir.path().join("agent"), port);
    config.namespace = ns.name.clone();
    config.cloud = Some((controller.url(), token_file));
    config.mqtt_extra = format!("username = \"plant\"\npassword = \"{password}\"\n");
    config.log_filter = "debug".into();
    let mut agent = spawn_agent(&config);
    wait::port_open("the embedded broker", port, DEADLINE).await;

    // A wrong password, then the right one publishing a state that must reach Kubernetes.
    let connect = |pass: &str| {
        let mut o = MqttOptions::new(format!("press-{}", fastrand::u32(..)), "127.0.0.1", port);
        o.set_credentials("plant", pass);
        AsyncClient::new(o, 10)
    };
    let (_c, mut el) = connect(&wrong_password);
    let refused = tokio::time::timeout(DEADLINE, el.poll()).await.unwrap();
    assert!(
        refused.is_err(),
        "a wrong password was accepted: {refused:?}"
    );
    let (client, mut el) = connect(&password);
    client
        .publish(
            "factory/press/state",
            QoS::AtLeastOnce,
            false,
            r#"{"rpm": 1200}"#,
        )
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        while !matches!(el.poll().await.unwrap(), Event::Incoming(Packet::PubAck(_))) {}
    })
    .await
    .unwrap();
    let devices: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    wait::until("the press's state in Kubernetes", DEADLINE, || async {
        let rpm = devices.get_opt("press").await.ok()??.status?.reported?["rpm"].clone();
        (rpm == 1200).then_some(())
    })
    .await;

    // A wrong token: refused, and not echoed anywhere.
    let a = post_batch(
        &controller.url(),
        &ns.name,
        "edge-1",
        &wrong_token,
        &batch(1, vec![]),
    )
    .await;
    assert_eq!(a.status, 401, "{a:?}");

    // Stopped cleanly, so both logs are complete.
    agent.stop();
    let mut controller = controller;
    controller.process.stop();
    for (what, log) in [
        ("agent", std::fs::read_to_string(agent.log_path()).unwrap()),
        (
            "controller",
            std::fs::read_to_string(controller.process.log_path()).unwrap(),
        ),
    ] {
        // The logs did run at debug level: otherwise this test proves nothing.
        assert!(
            log.contains("DEBUG"),
            "the {what} did not log at debug level"
        );
        for (name, secret) in [
            ("node token", &token),
            ("wrong token", &wrong_token),
            ("MQTT password", &password),
            ("wrong MQTT password", &wrong_password),
        ] {
            assert!(
                !log.contains(secret.as_str()),
                "the {what}'s log contains the {name}: {}",
                log.lines()
                    .filter(|l| l.contains(secret.as_str()))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}
