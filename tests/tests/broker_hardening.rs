//! The embedded broker under attack, as a client on the plant network would attack it: the
//! real agent process, raw MQTT clients over TCP, and Mosquitto's own `mosquitto_passwd`.
//!
//! Each test names the attack; each bound is what the configured limits allow plus slack for
//! the allocator, far below what the same attack cost before the limits existed.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use edgesync_e2e::agent::{AgentConfig, spawn_agent};
use edgesync_e2e::mosquitto::mosquitto_passwd;
use edgesync_e2e::process::ManagedProcess;
use edgesync_e2e::raw_mqtt::{
    RawClient, connect_packet, connect_when_up, encode, peak_rss_during, publish, rss_kib,
};
use edgesync_e2e::wait;
use rumqttc::{
    ConnectReturnCode, LastWill, Packet, Publish, QoS, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use serde_json::json;

const AGENT_ID: &str = "edgesync-agent-edge-1";

/// Starts the agent with its embedded broker and `extra` config; returns once a client can
/// connect.
async fn start(dir: &Path, extra: &str, login: Option<(&str, &str)>) -> (ManagedProcess, u16) {
    let port = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(dir, port);
    config.extra = extra.to_owned();
    let agent = spawn_agent(&config);
    let probe = connect_packet("probe", true, login, None);
    drop(connect_when_up(port, probe, Duration::from_secs(30)).await);
    (agent, port)
}

fn db(dir: &Path) -> std::path::PathBuf {
    dir.join(edgesync_agent::config::DB_FILE)
}

fn shadow(dir: &Path, device: &str) -> Option<serde_json::Value> {
    edgesync_agent::cli::shadow_get(&db(dir), device).unwrap()
}

fn subscribe(pkid: u16, filter: &str) -> Packet {
    let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
    s.pkid = pkid;
    Packet::Subscribe(s)
}

async fn suback(c: &mut RawClient) -> Vec<SubscribeReasonCode> {
    loop {
        match c.recv(Duration::from_secs(10)).await {
            Some(Packet::SubAck(a)) => return a.return_codes,
            Some(_) => {}
            None => panic!("no SUBACK"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_can_take_over_the_agents_session_and_every_acknowledged_message_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, port) = start(dir.path(), "", None).await;

    // The agent's predictable client id, with no credentials, a guessed secret, or the
    // agent's username: all refused, and the agent keeps its session.
    for login in [None, Some(("$edgesync-agent", "guess")), Some(("x", "y"))] {
        let (_c, code) =
            RawClient::connect(port, connect_packet(AGENT_ID, false, login, None)).await;
        assert_eq!(code, ConnectReturnCode::NotAuthorized, "{login:?}");
    }

    // A device pipelines QoS1 messages while an attacker keeps trying to take over.
    const MESSAGES: u16 = 600;
    const DEVICES: u16 = 6;
    let attacker = tokio::spawn(async move {
        for _ in 0..50 {
            let (_c, code) =
                RawClient::connect(port, connect_packet(AGENT_ID, false, None, None)).await;
            assert_eq!(code, ConnectReturnCode::NotAuthorized);
        }
    });
    let (mut device, code) = RawClient::connect(port, connect_packet("m", false, None, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    for i in 1..=MESSAGES {
        let topic = format!("factory/d{}/state", i % DEVICES);
        device
            .send(&publish(
                &topic,
                QoS::AtLeastOnce,
                i,
                json!({"n": i}).to_string(),
            ))
            .await;
    }
    let mut acked = 0;
    while acked < MESSAGES {
        match device.recv(Duration::from_secs(30)).await {
            Some(Packet::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("only {acked} of {MESSAGES} acknowledged"),
        }
    }
    attacker.await.unwrap();
    // Every acknowledgement stands for a commit: each device's version counts its messages.
    for d in 0..DEVICES {
        let doc = shadow(dir.path(), &format!("d{d}")).expect("device stored");
        assert_eq!(doc["version"], u64::from(MESSAGES / DEVICES), "d{d}: {doc}");
    }
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_filter_is_refused_and_one_stored_by_an_older_agent_does_not_stop_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, port) = start(dir.path(), "", None).await;
    let deep = format!("{}b", "a/".repeat(9000));
    let (mut c, _) = RawClient::connect(port, connect_packet("deep", false, None, None)).await;
    c.send(&subscribe(1, &deep)).await;
    assert_eq!(suback(&mut c).await, [SubscribeReasonCode::Failure]);
    drop(c);
    // Still serving: a persistent client connects and is told its session exists.
    let (_c, code) = RawClient::connect(port, connect_packet("deep", false, None, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(agent.is_running());

    // A filter an older agent stored is dropped at start (and from disk), not walked.
    agent.stop();
    {
        let conn = rusqlite::Connection::open(db(dir.path())).unwrap();
        conn.execute(
            "INSERT INTO broker_subscriptions (client_id, filter, qos) VALUES ('deep', ?1, 1)",
            [&deep],
        )
        .unwrap();
    }
    agent.restart();
    drop(
        connect_when_up(
            port,
            connect_packet("probe2", true, None, None),
            Duration::from_secs(30),
        )
        .await,
    );
    wait::until(
        "the deep filter removed from disk",
        Duration::from_secs(20),
        || async {
            let conn = rusqlite::Connection::open(db(dir.path())).ok()?;
            let n: i64 = conn
                .query_row(
                    "SELECT count(*) FROM broker_subscriptions WHERE length(filter) > 1000",
                    [],
                    |r| r.get(0),
                )
                .ok()?;
            (n == 0).then_some(())
        },
    )
    .await;
    assert!(agent.is_running());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_flood_is_capped_per_client_and_persisted_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, port) = start(dir.path(), "", None).await;
    let pid = agent.pid().unwrap();
    let before = rss_kib(pid);
    let peak = peak_rss_during(pid, async {
        let (mut c, _) = RawClient::connect(port, connect_packet("subs", false, None, None)).await;
        let mut granted = 0;
        for batch in 0..100u16 {
            for i in 0..100u16 {
                let pkid = batch * 100 + i + 1;
                c.send(&subscribe(pkid, &format!("flood/{pkid}/x"))).await;
            }
            for _ in 0..100 {
                let codes = suback(&mut c).await;
                granted += codes
                    .iter()
                    .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
                    .count();
            }
        }
        assert_eq!(granted, 64, "broker.max_subscriptions_per_client");
    })
    .await;
    let grown_mb = peak.saturating_sub(before) / 1024;
    eprintln!("RSS before {} MB, peak {} MB", before / 1024, peak / 1024);
    assert!(
        grown_mb < 50,
        "RSS grew {grown_mb} MB under 10,000 SUBSCRIBEs"
    );
    wait::until("64 subscription rows", Duration::from_secs(20), || async {
        let conn = rusqlite::Connection::open(db(dir.path())).ok()?;
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM broker_subscriptions WHERE client_id = 'subs'",
                [],
                |r| r.get(0),
            )
            .ok()?;
        (n == 64).then_some(())
    })
    .await;
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_pipelined_floods_stay_within_their_byte_limits() {
    let dir = tempfile::tempdir().unwrap();
    // Unpaced, so the byte limits are what bounds memory.
    let extra = "[broker]\nmax_client_bytes_per_sec = 0\n";
    let (mut agent, port) = start(dir.path(), extra, None).await;
    let pid = agent.pid().unwrap();
    let before = rss_kib(pid);
    let big = vec![b'x'; 500 * 1024];
    let peak = peak_rss_during(pid, async {
        // 300 MB of retained messages against a 16 MiB budget.
        let (mut c, _) = RawClient::connect(port, connect_packet("ret", true, None, None)).await;
        for i in 0..600 {
            let mut p = Publish::new(format!("cfg/{i}"), QoS::AtMostOnce, big.clone());
            p.retain = true;
            c.send(&Packet::Publish(p)).await;
        }
        // Pipelined 100 KB QoS1 messages for the agent, written for at most 10 s: the broker
        // stops reading once 1 MiB of them wait for the agent's commit.
        let (mut p, _) = RawClient::connect(port, connect_packet("pipe", true, None, None)).await;
        let body = json!({"blob": "y".repeat(100 * 1024)}).to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 1..=5000u16 {
            let packet = encode(&publish(
                "factory/p1/state",
                QoS::AtLeastOnce,
                i,
                body.clone(),
            ));
            let wrote = tokio::time::timeout_at(deadline.into(), p.send_raw(&packet)).await;
            if !matches!(wrote, Ok(true)) {
                break;
            }
        }
    })
    .await;
    let grown_mb = peak.saturating_sub(before) / 1024;
    eprintln!("RSS before {} MB, peak {} MB", before / 1024, peak / 1024);
    assert!(
        grown_mb < 150,
        "RSS grew {grown_mb} MB (retained limit 16 MiB, per-client in flight 1 MiB)"
    );
    assert!(agent.is_running());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_and_half_sent_connects_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, port) = start(dir.path(), "", None).await;
    let pid = agent.pid().unwrap();
    let before = rss_kib(pid);
    let peak = peak_rss_during(pid, async {
        // Subscribes to everything, then never reads.
        let (mut slow, _) =
            RawClient::connect(port, connect_packet("slow", false, None, None)).await;
        slow.send(&subscribe(1, "#")).await;
        assert!(matches!(
            suback(&mut slow).await[..],
            [SubscribeReasonCode::Success(_)]
        ));
        let (mut p, _) = RawClient::connect(port, connect_packet("chatty", true, None, None)).await;
        let body = vec![b'z'; 20 * 1024];
        for i in 1..=10_000u16 {
            let qos = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            p.send(&publish(&format!("line/{}", i % 50), qos, i, body.clone()))
                .await;
        }
        // 500 connections each declaring a 900 KB CONNECT and sending 60 KB of it.
        let mut half = Vec::new();
        for _ in 0..500 {
            let mut c = RawClient::open(port).await;
            let mut head = vec![0x10u8];
            let mut len = 900 * 1024usize;
            loop {
                let byte = (len % 128) as u8;
                len /= 128;
                head.push(if len > 0 { byte | 0x80 } else { byte });
                if len == 0 {
                    break;
                }
            }
            head.extend(std::iter::repeat_n(0u8, 60 * 1024));
            let _ = c.send_raw(&head).await;
            half.push(c);
        }
        let mut closed = 0;
        for c in &mut half {
            closed += usize::from(c.closed_within(Duration::from_secs(3)).await);
        }
        assert_eq!(
            closed, 500,
            "CONNECTs beyond broker.max_connect_bytes are closed"
        );
    })
    .await;
    let grown_mb = peak.saturating_sub(before) / 1024;
    eprintln!("RSS before {} MB, peak {} MB", before / 1024, peak / 1024);
    assert!(
        grown_mb < 120,
        "RSS grew {grown_mb} MB (session queue 4 MiB, write backlog 1 MiB, CONNECT 64 KiB)"
    );
    assert!(agent.is_running());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_get_their_own_topics_only_with_a_mosquitto_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    mosquitto_passwd(&passwd, "press-1", "pw-1");
    mosquitto_passwd(&passwd, "press-2", "pw-2");
    let extra = format!(
        "[broker]\npassword_file = \"{}\"\nacl_own_topics = true\n",
        passwd.display()
    );
    let me = Some(("press-1", "pw-1"));
    let (mut agent, port) = start(dir.path(), &extra, me).await;

    for (login, expected) in [
        (None, ConnectReturnCode::BadUserNamePassword),
        (
            Some(("press-1", "pw-2")),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            Some(("nobody", "pw-1")),
            ConnectReturnCode::BadUserNamePassword,
        ),
    ] {
        let (_c, code) = RawClient::connect(port, connect_packet("x", true, login, None)).await;
        assert_eq!(code, expected, "{login:?}");
    }
    // A will on another device's topic is refused at CONNECT.
    let will = LastWill::new("factory/press-2/state", "{}", QoS::AtLeastOnce, false);
    let (_c, code) = RawClient::connect(port, connect_packet("w", true, me, Some(will))).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    let (mut c, code) = RawClient::connect(port, connect_packet("press-1", true, me, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let mut s = Subscribe::new_many([
        SubscribeFilter::new("edgesync/press-1/shadow/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("edgesync/+/shadow/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
    ]);
    s.pkid = 1;
    c.send(&Packet::Subscribe(s)).await;
    assert!(matches!(
        suback(&mut c).await[..],
        [
            SubscribeReasonCode::Success(_),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure
        ]
    ));
    // Own topics are stored; another device's are acknowledged (MQTT 3.1.1 cannot refuse a
    // PUBLISH) and dropped.
    c.send(&publish(
        "factory/press-2/state",
        QoS::AtLeastOnce,
        2,
        r#"{"n":2}"#,
    ))
    .await;
    c.send(&publish(
        "edgesync/press-2/shadow/update",
        QoS::AtLeastOnce,
        3,
        r#"{"state":{"reported":{"n":3}}}"#,
    ))
    .await;
    c.send(&publish(
        "factory/press-1/state",
        QoS::AtLeastOnce,
        4,
        r#"{"n":4}"#,
    ))
    .await;
    c.send(&publish(
        "edgesync/press-1/shadow/update",
        QoS::AtLeastOnce,
        5,
        r#"{"state":{"reported":{"m":5}}}"#,
    ))
    .await;
    let mut acks = Vec::new();
    let mut accepted = false;
    while acks.len() < 4 || !accepted {
        match c.recv(Duration::from_secs(20)).await {
            Some(Packet::PubAck(a)) => acks.push(a.pkid),
            Some(Packet::Publish(p)) => {
                assert!(p.topic.starts_with("edgesync/press-1/"), "{}", p.topic);
                accepted |= p.topic == "edgesync/press-1/shadow/update/accepted";
            }
            Some(_) => {}
            None => panic!("acks {acks:?}, accepted reply {accepted}"),
        }
    }
    acks.sort_unstable();
    assert_eq!(acks, [2, 3, 4, 5]);
    let own = shadow(dir.path(), "press-1").expect("own device stored");
    assert_eq!(own["state"]["reported"], json!({"n": 4, "m": 5}));
    assert!(
        shadow(dir.path(), "press-2").is_none(),
        "another device's topics are refused"
    );
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_packets_beyond_their_limits_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[broker]\nmax_connections = 3\nmax_packet_bytes = 4096\n";
    let (mut agent, port) = start(dir.path(), extra, None).await;
    // Three clients connected: a fourth CONNECT is refused (server unavailable) and closed.
    // Sockets without a CONNECT have a budget of their own (broker.max_pending_connections).
    // Retried until the start-up probe's own connection has been released.
    let held = wait::until(
        "a fourth client refused",
        Duration::from_secs(20),
        || async {
            let mut held = Vec::new();
            for i in 0..3 {
                let hello = connect_packet(&format!("held-{i}"), true, None, None);
                let (c, code) = RawClient::connect(port, hello).await;
                if code != ConnectReturnCode::Success {
                    return None;
                }
                held.push(c);
            }
            let (mut fourth, code) =
                RawClient::connect(port, connect_packet("fourth", true, None, None)).await;
            (code == ConnectReturnCode::ServiceUnavailable
                && fourth.closed_within(Duration::from_secs(1)).await)
                .then_some(held)
        },
    )
    .await;
    drop(held);
    // Room again once they are gone; a packet beyond broker.max_packet_bytes closes its
    // connection.
    let mut c = wait::until(
        "room for a client again",
        Duration::from_secs(20),
        || async {
            let mut c = RawClient::open(port).await;
            c.send(&connect_packet("big", true, None, None)).await;
            matches!(
                c.recv(Duration::from_secs(2)).await,
                Some(Packet::ConnAck(_))
            )
            .then_some(c)
        },
    )
    .await;
    c.send(&publish(
        "line/1",
        QoS::AtMostOnce,
        0,
        vec![b'x'; 10 * 1024],
    ))
    .await;
    assert!(
        c.closed_within(Duration::from_secs(3)).await,
        "a 10 KiB packet beyond a 4 KiB limit closes the connection"
    );
    assert!(agent.is_running());
    agent.stop();
}

/// Device press-1 connects and has a report acknowledged (so stored) by the agent.
async fn device_is_served(port: u16) {
    let (mut dev, code) =
        RawClient::connect(port, connect_packet("press-1", true, None, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    dev.send(&publish(
        "factory/press-1/state",
        QoS::AtLeastOnce,
        1,
        r#"{"n":1}"#,
    ))
    .await;
    assert!(
        matches!(
            dev.recv(Duration::from_secs(10)).await,
            Some(Packet::PubAck(_))
        ),
        "a device must be served"
    );
}

/// Persistent sessions recorded in the agent's database (its own included).
fn stored_sessions(dir: &Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db(dir), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT count(*) FROM broker_sessions", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_flood_is_capped_and_idle_sessions_expire_with_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[broker]\nmax_sessions = 100\nsession_expiry_secs = 2\n";
    let (mut agent, port) = start(dir.path(), extra, None).await;
    // 150 persistent sessions subscribed to everything, each left behind.
    let mut refused = 0;
    for i in 0..150 {
        let id = format!("flood-{i}");
        let (mut c, code) = RawClient::connect(port, connect_packet(&id, false, None, None)).await;
        if code != ConnectReturnCode::Success {
            assert_eq!(code, ConnectReturnCode::ServiceUnavailable);
            refused += 1;
            continue;
        }
        c.send(&subscribe(1, "#")).await;
        suback(&mut c).await;
    }
    // The agent's own session counts: at most 99 of the flood's fit.
    assert!(refused >= 51, "only {refused} of 150 refused");
    assert!(stored_sessions(dir.path()) <= 100);
    // A device still gets through to the agent while they are held.
    device_is_served(port).await;
    // Disconnected sessions expire, rows and all, leaving the agent's own.
    wait::until(
        "idle sessions expired and their rows removed",
        Duration::from_secs(40),
        || async { (stored_sessions(dir.path()) == 1).then_some(()) },
    )
    .await;
    let (_c, code) = RawClient::connect(port, connect_packet("after", false, None, None)).await;
    assert_eq!(code, ConnectReturnCode::Success, "room again after expiry");
    assert!(shadow(dir.path(), "press-1").is_some());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_with_its_owner_across_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    mosquitto_passwd(&passwd, "press-1", "pw-1");
    mosquitto_passwd(&passwd, "press-2", "pw-2");
    let extra = format!("[broker]\npassword_file = \"{}\"\n", passwd.display());
    let owner = Some(("press-1", "pw-1"));
    let (mut agent, port) = start(dir.path(), &extra, owner).await;
    let (c, code) = RawClient::connect(port, connect_packet("line-1", false, owner, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    drop(c);
    agent.restart();
    let other = connect_packet("line-1", false, Some(("press-2", "pw-2")), None);
    let code = wait::until(
        "the restarted broker answering",
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            Some(RawClient::connect(port, other.clone()).await.1)
        },
    )
    .await;
    assert_eq!(
        code,
        ConnectReturnCode::NotAuthorized,
        "another user may not take over press-1's session after a restart"
    );
    let (_c, code) = RawClient::connect(port, connect_packet("line-1", false, owner, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_acknowledgements_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[broker]\nmax_write_backlog_bytes = 4096\nmax_session_queue_bytes = 4096\n";
    let (mut agent, port) = start(dir.path(), extra, None).await;
    let pid = agent.pid().unwrap();
    let before = rss_kib(pid);
    let (mut c, code) = RawClient::connect(port, connect_packet("pinger", true, None, None)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    // PINGREQs, 2 bytes each, each answered by a PINGRESP this client never reads: once the
    // socket buffers are full the answers pile up in the broker, until the limit closes it.
    let chunk = [0xC0u8, 0x00].repeat(32 * 1024);
    let mut sent = 0usize;
    let mut closed = false;
    while sent < 256 * 1024 * 1024 {
        if !c.send_raw(&chunk).await {
            closed = true;
            break;
        }
        sent += chunk.len();
    }
    assert!(
        closed || c.closed_within(Duration::from_secs(10)).await,
        "still connected after {sent} bytes of unread PINGRESPs"
    );
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB");
    assert!(agent.is_running());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_read_at_its_rate_while_a_device_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let http = edgesync_e2e::free_port();
    let port = edgesync_e2e::free_port();
    let mut config = AgentConfig::embedded(dir.path(), port);
    config.http_port = Some(http);
    config.extra = "[broker]\nmax_client_bytes_per_sec = 1048576\n".into();
    let mut agent = spawn_agent(&config);
    let paced = "edgesync_agent_broker_limit_hits_total{limit=\"read_rate\"}";
    let mut flood = connect_when_up(
        port,
        connect_packet("flood", true, None, None),
        Duration::from_secs(30),
    )
    .await;
    // 100 KB QoS0 messages as fast as the socket takes them, in the background.
    let packet = encode(&publish(
        "noise/1",
        QoS::AtMostOnce,
        0,
        vec![b'n'; 100 * 1024],
    ));
    let flooding = tokio::spawn(async move { while flood.send_raw(&packet).await {} });
    wait::until("the flood paced", Duration::from_secs(30), || async {
        let m = edgesync_e2e::agent::metrics(http);
        (edgesync_e2e::controller::metric_value(&m, paced) > 0.0).then_some(())
    })
    .await;
    // A device on its own connection is served meanwhile.
    device_is_served(port).await;
    assert!(shadow(dir.path(), "press-1").is_some());
    flooding.abort();
    agent.stop();
}
