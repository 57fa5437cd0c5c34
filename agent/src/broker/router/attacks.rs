//! The router's answer to each attack of the second hardening round, one test each, driven
//! through the same calls the connection tasks make.

#![allow(clippy::unwrap_used)]

use super::tests::{AGENT, connect, connect_packet, limited, pubacks, publish, publishes, who};
use super::*;

fn user(name: &str) -> Identity {
    Identity {
        username: Some(Arc::from(name)),
        ..Identity::default()
    }
}

fn link() -> (Link, mpsc::UnboundedReceiver<Packet>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Link::new(tx, Arc::default(), CancellationToken::new(), Arc::default()),
        rx,
    )
}

#[test]
fn a_first_start_holds_device_messages_for_the_agent_before_it_connects() {
    let mut r = limited(BrokerLimits::default());
    r.reserve_agent(&["factory/+/state".to_owned()], 1);
    // A device publishes the moment the port is open, before the agent's client exists.
    let mut device = connect(&mut r, "m1", false);
    publish(&mut r, &device, "factory/m1/state", 4);
    assert!(pubacks(&device.drain()).is_empty(), "acknowledged unstored");
    // The agent connects with its persistent session: the message is there for it.
    let mut agent = connect(&mut r, AGENT, false);
    let got = publishes(&agent.drain());
    assert_eq!(got.len(), 1);
    r.handle(&agent.id, agent.conn, Packet::PubAck(PubAck::new(got[0].1)));
    assert_eq!(pubacks(&device.drain()), [4]);
}

#[test]
fn repeated_filters_in_one_subscribe_are_granted_once() {
    let mut r = limited(BrokerLimits::default());
    let publisher = connect(&mut r, "p", true);
    for i in 0..5 {
        let mut p = Publish::new(format!("cfg/{i}"), QoS::AtLeastOnce, "on");
        p.retain = true;
        p.pkid = i + 1;
        r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
    }
    let mut greedy = connect(&mut r, "g", true);
    let filters = (0..10_000).map(|i| {
        let qos = if i == 9_999 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        rumqttc::SubscribeFilter::new("cfg/#".into(), qos)
    });
    r.handle(
        &greedy.id,
        greedy.conn,
        Packet::Subscribe(Subscribe::new_many(filters)),
    );
    let got = greedy.drain();
    let suback = got
        .iter()
        .find_map(|p| match p {
            Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .unwrap();
    // One code per filter as MQTT requires, all the last occurrence's grant.
    assert_eq!(suback.len(), 10_000);
    assert!(
        suback
            .iter()
            .all(|c| *c == SubscribeReasonCode::Success(QoS::AtMostOnce))
    );
    assert_eq!(publishes(&got).len(), 5, "the retained messages once");
}

#[test]
fn retained_delivery_is_bounded_per_subscribe() {
    let mut r = limited(BrokerLimits {
        max_subscriptions: 65,
        ..BrokerLimits::default()
    });
    let publisher = connect(&mut r, "p", true);
    for i in 0..5_000u32 {
        let mut p = Publish::new(format!("line/{i}/cfg"), QoS::AtMostOnce, "x");
        p.retain = true;
        r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
    }
    let mut c = connect(&mut r, "c", true);
    // 64 filters that match nothing but whose wildcard heads make every topic a candidate.
    let filters =
        (0..64).map(|i| rumqttc::SubscribeFilter::new(format!("+/{i}/nothing"), QoS::AtMostOnce));
    r.handle(
        &c.id,
        c.conn,
        Packet::Subscribe(Subscribe::new_many(filters)),
    );
    assert_eq!(r.metrics.broker_limit_count(BrokerLimit::RetainedScan), 1);
    assert!(publishes(&c.drain()).is_empty());
    // The work is charged to the client's read budget, as if it had sent that much.
    let charged = r.take_charge(&c.id);
    assert_eq!(charged, RETAINED_SCAN_BUDGET * SCAN_CHARGE_BYTES);
    assert_eq!(r.take_charge(&c.id), 0);
    // A filter with a literal head examines only its range: found at once, within budget.
    let s = Subscribe::new("line/42/+", QoS::AtMostOnce);
    r.handle(&c.id, c.conn, Packet::Subscribe(s));
    assert_eq!(publishes(&c.drain()).len(), 1);
    assert_eq!(r.metrics.broker_limit_count(BrokerLimit::RetainedScan), 1);
}

#[test]
fn retained_qos0_copies_stop_at_the_write_backlog() {
    let mut r = limited(BrokerLimits {
        max_write_backlog_bytes: 8 * 1024,
        ..BrokerLimits::default()
    });
    let publisher = connect(&mut r, "p", true);
    for i in 0..100u32 {
        let mut p = Publish::new(format!("cfg/{i}"), QoS::AtMostOnce, "y".repeat(1000));
        p.retain = true;
        r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
    }
    let mut reader = connect(&mut r, "never-reads", true);
    r.handle(
        &reader.id,
        reader.conn,
        Packet::Subscribe(Subscribe::new("cfg/#", QoS::AtMostOnce)),
    );
    let sent = publishes(&reader.drain()).len();
    assert!(sent < 12, "{sent} retained copies past an 8 KiB backlog");
    assert!(r.metrics.broker_limit_count(BrokerLimit::WriteBacklog) > 0);
}

#[test]
fn pings_never_read_close_the_client_at_the_backlog_bound() {
    let limits = BrokerLimits {
        max_write_backlog_bytes: 16 * 1024,
        max_session_queue_bytes: 16 * 1024,
        ..BrokerLimits::default()
    };
    let mut r = limited(limits);
    let c = connect(&mut r, "pinger", true);
    let mut pings = 0;
    while r.handle(&c.id, c.conn, Packet::PingReq) == Flow::Continue {
        pings += 1;
        assert!(pings < 100_000, "never closed");
    }
    // Each answer held counts at least its real memory (the packet in the channel), so the
    // bound is reached in bytes of memory, not in a count of 16-byte tokens.
    let real = pings * std::mem::size_of::<Packet>();
    assert!(real <= 32 * 1024, "{pings} PINGRESPs held: {real} bytes");
}

#[test]
fn a_session_of_a_former_agent_client_id_is_forgotten() {
    let mut r = limited(BrokerLimits::default());
    r.persist_to(Arc::default());
    let filters = [
        "edgesync/+/shadow/update".to_owned(),
        "edgesync/+/shadow/get".to_owned(),
    ];
    r.reserve_agent(&filters, 1);
    let stored = |client: &str, owner: Option<&str>| StoredSession {
        client: client.into(),
        last_seen_s: Some(1),
        owner: owner.map(str::to_owned),
        filters: filters.iter().map(|f| (f.clone(), 1)).collect(),
    };
    // Recorded with the agent's mark, and recorded by an older version without one.
    r.restore(&stored("edgesync-agent-old", Some(AGENT_OWNER)), 2);
    r.restore(&stored("edgesync-agent-older", None), 2);
    let (deltas, _) = r.take_pending();
    assert_eq!(deltas.len(), 2);
    assert!(deltas.iter().all(|d| d.forget));
    let (l, _rx) = link();
    r.connect(connect_packet("edgesync-agent-old", false), who("x"), l)
        .unwrap();
    let mut matched = Vec::new();
    r.trie.matches("edgesync/m1/shadow/update", |s| {
        matched.push(s.client.clone())
    });
    assert_eq!(matched, [Arc::from(AGENT)], "only the agent reads updates");
}

#[test]
fn restored_sessions_obey_todays_acl_and_owners() {
    let acl = Acl::own_topics("edgesync", &[]);
    let mut r = Router::new(
        AGENT,
        BrokerLimits::default(),
        Some(Arc::new(acl)),
        Arc::default(),
    );
    r.persist_to(Arc::default());
    r.require_owners();
    r.restore(
        &StoredSession {
            client: "press-1".into(),
            last_seen_s: Some(1),
            owner: Some("press-1".into()),
            filters: vec![
                ("edgesync/press-1/shadow/#".into(), 1),
                ("edgesync/+/shadow/update/accepted".into(), 1),
            ],
        },
        2,
    );
    r.restore(
        &StoredSession {
            client: "anon".into(),
            last_seen_s: Some(1),
            owner: None,
            filters: vec![("edgesync/press-2/shadow/#".into(), 1)],
        },
        2,
    );
    let (deltas, _) = r.take_pending();
    let press = deltas.iter().find(|d| d.client == "press-1").unwrap();
    assert_eq!(
        press.filters,
        [("edgesync/+/shadow/update/accepted".to_owned(), None)]
    );
    assert!(deltas.iter().any(|d| d.client == "anon" && d.forget));
    let mut matched = 0;
    r.trie
        .matches("edgesync/press-2/shadow/update/accepted", |_| matched += 1);
    assert_eq!(matched, 0, "no restored filter reaches another device");
    let mut own = 0;
    r.trie
        .matches("edgesync/press-1/shadow/update/accepted", |_| own += 1);
    assert_eq!(own, 1);
}

#[test]
fn one_user_holds_a_bounded_number_of_persistent_sessions() {
    let mut r = limited(BrokerLimits {
        max_sessions_per_user: 3,
        ..BrokerLimits::default()
    });
    for i in 0..3 {
        let (l, _rx) = link();
        r.connect(connect_packet(&format!("s{i}"), false), user("op"), l)
            .unwrap();
    }
    let (l, _rx) = link();
    assert_eq!(
        r.connect(connect_packet("s3", false), user("op"), l).err(),
        Some(ConnectReturnCode::ServiceUnavailable)
    );
    assert_eq!(r.metrics.broker_limit_count(BrokerLimit::UserSessions), 1);
    // Clean sessions, other users and the shared login are not counted against it.
    let (l, _rx) = link();
    assert!(r.connect(connect_packet("s4", true), user("op"), l).is_ok());
    let (l, _rx) = link();
    assert!(
        r.connect(connect_packet("s5", false), user("other"), l)
            .is_ok()
    );
    let shared = Identity {
        is_shared: true,
        ..user("op")
    };
    let (l, _rx) = link();
    assert!(r.connect(connect_packet("s6", false), shared, l).is_ok());
}

#[test]
fn a_users_name_is_its_client_id_alone() {
    let mut r = limited(BrokerLimits::default());
    r.reserve_client_ids(["press-1".to_owned()]);
    let (l, _rx) = link();
    assert_eq!(
        r.connect(connect_packet("press-1", false), user("press-2"), l)
            .err(),
        Some(ConnectReturnCode::NotAuthorized),
        "another user squatting press-1's id"
    );
    let (l, _rx) = link();
    assert!(
        r.connect(connect_packet("press-1", false), user("press-1"), l)
            .is_ok()
    );
    // Ids that name no user stay free for anyone.
    let (l, _rx) = link();
    assert!(
        r.connect(connect_packet("line-7", false), user("press-2"), l)
            .is_ok()
    );
}
