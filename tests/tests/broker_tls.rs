//! The embedded broker's TLS listener with Mosquitto's own clients: server-authenticated TLS
//! with a password file, and mutual TLS where the client certificate names the device. Also
//! the refusal to open an unauthenticated listener to the network, and a TLS subscriber that
//! stops reading, which must not hold the agent's shutdown.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use edgesync_e2e::agent::{AgentConfig, agent_binary, spawn_agent};
use edgesync_e2e::pki::{Issued, TestCa};
use edgesync_e2e::process::{ManagedProcess, ProcessSpec};
use edgesync_e2e::wait;
use serde_json::json;

/// Starts the agent with its plain listener on loopback and a TLS listener configured by
/// `broker` (appended to `[broker]`); returns once the TLS port accepts connections.
async fn start(dir: &Path, broker: &str) -> (ManagedProcess, u16) {
    let tls_port = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(dir, edgesync_e2e::free_port());
    config.extra = format!("[broker]\ntls_listen = \"127.0.0.1:{tls_port}\"\n{broker}");
    let agent = spawn_agent(&config);
    wait::port_open(
        "the embedded broker's TLS listener",
        tls_port,
        Duration::from_secs(30),
    )
    .await;
    (agent, tls_port)
}

/// Runs a Mosquitto client (`mosquitto_pub`, `mosquitto_sub`) against the TLS port with a
/// 20 s limit.
fn mosquitto(tool: &str, port: u16, ca: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("20")
        .arg(tool)
        .args(["-h", "localhost", "-p", &port.to_string(), "--cafile"])
        .arg(ca)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.code() != Some(127))
        .unwrap_or_else(|| {
            panic!("cannot run {tool}: install Debian's mosquitto-clients (make deps)")
        })
}

fn with_cert<'a>(client: &'a Issued, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "--cert",
        client.cert.to_str().unwrap(),
        "--key",
        client.key.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    all
}

fn shadow(dir: &Path, device: &str) -> Option<serde_json::Value> {
    let db = dir.join(edgesync_agent::config::DB_FILE);
    edgesync_agent::cli::shadow_get(&db, device).unwrap()
}

async fn reported(dir: &Path, device: &str) -> serde_json::Value {
    wait::until(
        &format!("{device}'s report stored"),
        Duration::from_secs(20),
        || async { shadow(dir, device).map(|s| s["state"]["reported"].clone()) },
    )
    .await
}

fn ok(out: &Output) -> bool {
    out.status.success()
}

fn describe(out: &Output) -> String {
    format!(
        "{:?}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_names_each_device_by_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let plant = TestCa::new(pki.path(), "plant");
    let rogue = TestCa::new(pki.path(), "rogue");
    let server = plant.server("broker");
    let press1 = plant.client("press-1", None);
    let forged = rogue.client("press-2", None);
    let broker = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\nacl_own_topics = true\n",
        server.cert.display(),
        server.key.display(),
        plant.cert().display()
    );
    let (mut agent, port) = start(dir.path(), &broker).await;
    let ca = plant.cert();

    // Another device's topic, with a valid certificate: acknowledged (MQTT 3.1.1 cannot
    // refuse a PUBLISH) and dropped by the ACL.
    let out = mosquitto(
        "mosquitto_pub",
        port,
        &ca,
        &with_cert(
            &press1,
            &[
                "-i",
                "p1",
                "-q",
                "1",
                "-t",
                "edgesync/press-2/shadow/update",
                "-m",
            ],
        )
        .into_iter()
        .chain([r#"{"state":{"reported":{"by":"press-1"}}}"#])
        .collect::<Vec<_>>(),
    );
    assert!(ok(&out), "{}", describe(&out));
    // Its own topic, with a username and password that name nobody: the certificate is the
    // identity, so the report is stored.
    let mut own = with_cert(
        &press1,
        &["-i", "p1", "-q", "1", "-u", "someone", "-P", "wrong"],
    );
    own.extend([
        "-t",
        "edgesync/press-1/shadow/update",
        "-m",
        r#"{"state":{"reported":{"via":"mtls"}}}"#,
    ]);
    let out = mosquitto("mosquitto_pub", port, &ca, &own);
    assert!(ok(&out), "{}", describe(&out));
    assert_eq!(
        reported(dir.path(), "press-1").await,
        json!({"via": "mtls"})
    );
    assert!(
        shadow(dir.path(), "press-2").is_none(),
        "press-1's certificate must not write press-2's shadow"
    );

    // Subscribing beyond its own replies is denied; its own replies are not.
    let out = mosquitto(
        "mosquitto_sub",
        port,
        &ca,
        &with_cert(&press1, &["-i", "s1", "-E", "-t", "edgesync/+/shadow/#"]),
    );
    // mosquitto_sub exits 0 either way; it says so when the SUBACK refuses every filter.
    let denied = |out: &Output| describe(out).contains("subscription requests were denied");
    assert!(
        denied(&out),
        "a wildcard over every device: {}",
        describe(&out)
    );
    let out = mosquitto(
        "mosquitto_sub",
        port,
        &ca,
        &with_cert(
            &press1,
            &["-i", "s1", "-E", "-t", "edgesync/press-1/shadow/#"],
        ),
    );
    assert!(ok(&out) && !denied(&out), "own replies: {}", describe(&out));

    // No certificate, or one from another CA: the handshake fails.
    let out = mosquitto(
        "mosquitto_pub",
        port,
        &ca,
        &[
            "-i",
            "anon",
            "-t",
            "edgesync/press-1/shadow/update",
            "-m",
            "{}",
        ],
    );
    assert!(!ok(&out), "no client certificate: {}", describe(&out));
    let out = mosquitto(
        "mosquitto_pub",
        port,
        &ca,
        &with_cert(
            &forged,
            &[
                "-i",
                "p2",
                "-t",
                "edgesync/press-2/shadow/update",
                "-m",
                "{}",
            ],
        ),
    );
    assert!(
        !ok(&out),
        "a certificate from another CA: {}",
        describe(&out)
    );
    assert!(shadow(dir.path(), "press-2").is_none());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_password_file_authenticates_by_password() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let plant = TestCa::new(pki.path(), "plant");
    let server = plant.server("broker");
    let passwd = pki.path().join("passwd");
    edgesync_e2e::mosquitto::mosquitto_passwd(&passwd, "lathe-1", "s3cret");
    let broker = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\npassword_file = \"{}\"\nacl_own_topics = true\n",
        server.cert.display(),
        server.key.display(),
        passwd.display()
    );
    let (mut agent, port) = start(dir.path(), &broker).await;
    let ca = plant.cert();
    let publish = |password: &str| {
        mosquitto(
            "mosquitto_pub",
            port,
            &ca,
            &[
                "-i",
                "l1",
                "-q",
                "1",
                "-u",
                "lathe-1",
                "-P",
                password,
                "-t",
                "edgesync/lathe-1/shadow/update",
                "-m",
                r#"{"state":{"reported":{"via":"tls"}}}"#,
            ],
        )
    };
    let out = publish("guess");
    assert!(!ok(&out), "a wrong password: {}", describe(&out));
    let out = publish("s3cret");
    assert!(ok(&out), "{}", describe(&out));
    assert_eq!(reported(dir.path(), "lathe-1").await, json!({"via": "tls"}));
    agent.stop();
}

#[test]
fn an_unauthenticated_listener_beyond_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::embedded(dir.path(), edgesync_e2e::free_port());
    let port = config.embedded_port.take().unwrap();
    config.extra = String::new();
    let path = config.write();
    // Rewrite the listener to every interface.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "[mqtt]\n",
            &format!("[mqtt]\nembedded = true\nlisten = \"0.0.0.0:{port}\"\n"),
        )
        .replace("url = \"\"\n", "");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("timeout")
        .arg("20")
        .arg(agent_binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must refuse to start");
    assert!(
        stderr.contains("beyond loopback") && stderr.contains("allow_anonymous"),
        "the error must say why and what to set: {stderr}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing may listen"
    );
}

/// A TLS subscriber that stops reading (a hung device) cannot hold the agent at shutdown:
/// closing its connection waits a bounded time to flush the TLS records left for it, where it
/// used to wait as long as TCP kept the connection open (the agent stopped only when killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_subscriber_that_stops_reading_does_not_hold_the_shutdown() {
    use edgesync_e2e::raw_mqtt::{connect_packet, connect_when_up};
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let plant = TestCa::new(pki.path(), "plant");
    let server = plant.server("broker");
    let (port, tls_port, http) = (
        edgesync_e2e::free_port(),
        edgesync_e2e::free_port(),
        edgesync_e2e::free_port(),
    );
    let mut config = AgentConfig::embedded(dir.path(), port);
    config.http_port = Some(http);
    config.extra = format!(
        "[broker]\ntls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nmax_client_bytes_per_sec = 0\n",
        server.cert.display(),
        server.key.display(),
    );
    let mut agent = spawn_agent(&config);
    wait::port_open("the TLS listener", tls_port, Duration::from_secs(30)).await;

    // Subscribed over TLS; what it prints goes to its log.
    let sub = ManagedProcess::spawn(
        ProcessSpec::new("mosquitto_sub", "mosquitto_sub")
            .arg("-h")
            .arg("localhost")
            .arg("-p")
            .arg(tls_port.to_string())
            .arg("--cafile")
            .arg(plant.cert())
            .arg("-i")
            .arg("stalled")
            .arg("-q")
            .arg("0")
            .arg("-t")
            .arg("line/#"),
        dir.path(),
    );
    let mut flood = connect_when_up(
        port,
        connect_packet("flood", true, None, None),
        Duration::from_secs(30),
    )
    .await;
    // Published until the subscriber prints one: it is subscribed and receiving.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sub.log_tail(5).lines().any(|l| l.trim() == "hi") {
        assert!(
            std::time::Instant::now() < deadline,
            "the TLS subscriber received nothing within 30 s (is mosquitto-clients installed? make deps):\n{}",
            sub.log_tail(20)
        );
        let p = rumqttc::Publish::new("line/0/hello", rumqttc::QoS::AtMostOnce, "hi");
        flood.send(&rumqttc::Packet::Publish(p)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stopped: it reads nothing from now on, as a hung device would.
    let stopped = Command::new("kill")
        .args(["-STOP", &sub.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    // 30 MB for it: far more than its socket, the kernel and the broker buffer.
    let payload = vec![b'x'; 60 * 1024];
    for _ in 0..500 {
        let p = rumqttc::Publish::new(
            "line/1/telemetry",
            rumqttc::QoS::AtMostOnce,
            payload.clone(),
        );
        flood.send(&rumqttc::Packet::Publish(p)).await;
    }
    let dropped = "edgesync_agent_broker_limit_hits_total{limit=\"write_backlog_bytes\"}";
    wait::until(
        "messages to the stalled subscriber are dropped",
        Duration::from_secs(60),
        || async { edgesync_e2e::agent::metric(http, dropped).filter(|n| *n > 0.0) },
    )
    .await;

    let stopping = std::time::Instant::now();
    let status = tokio::task::block_in_place(|| agent.stop());
    let took = stopping.elapsed();
    drop(sub);
    let log = agent.log_tail(30);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "stopping took {took:?}:\n{log}"
    );
}
