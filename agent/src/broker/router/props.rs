//! Property tests: arbitrary packet sequences from the agent and several devices (some that
//! never read), with the invariants the broker promises checked after every step:
//! - the bytes accounted bound what is held (sessions, the agent's queue, each connection's
//!   write backlog), and match what the queues really hold;
//! - no device is acknowledged for a message the agent takes before the agent has
//!   acknowledged it (the agent's session is reserved before anyone connects, as at start);
//! - no client receives a message its current ACL does not let it read.
//!
//! `PROPTEST_CASES` sets how many sequences run (`make fuzz` runs many more).

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::tests::{AGENT, connect_packet};
use super::*;

const AGENT_FILTERS: [&str; 3] = [
    "factory/+/state",
    "edgesync/+/shadow/update",
    "edgesync/+/shadow/get",
];
const TOPICS: [&str; 8] = [
    "factory/d0/state",
    "factory/d1/state",
    "edgesync/d0/shadow/update",
    "edgesync/d1/shadow/update",
    "edgesync/d0/shadow/update/accepted",
    "edgesync/d1/shadow/update/accepted",
    "cfg/line",
    "other/x/y",
];
const FILTERS: [&str; 8] = [
    "factory/+/state",
    "#",
    "edgesync/d0/shadow/#",
    "edgesync/d1/shadow/#",
    "edgesync/+/shadow/update/accepted",
    "cfg/+",
    "+/+/+",
    "other/#",
];
/// Devices: client id and username (`None`: anonymous).
const DEVICES: [(&str, Option<&str>); 4] = [
    ("d0", Some("d0")),
    ("d1", Some("d1")),
    ("d2", Some("d2")),
    ("anon", None),
];

#[derive(Debug, Clone)]
enum Op {
    Connect { c: usize, clean: bool },
    Disconnect { c: usize, graceful: bool },
    Subscribe { c: usize, filters: Vec<usize> },
    Unsubscribe { c: usize, filter: usize },
    Publish(PublishOp),
    Ping { c: usize },
    Read { c: usize },
    AgentConnect,
    AgentDisconnect,
    AgentAck { nth: usize },
}

#[derive(Debug, Clone)]
struct PublishOp {
    c: usize,
    topic: usize,
    qos: u8,
    retain: bool,
    size: usize,
    pkid: u16,
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..DEVICES.len();
    prop_oneof![
        1 => (c.clone(), any::<bool>()).prop_map(|(c, clean)| Op::Connect { c, clean }),
        1 => (c.clone(), any::<bool>()).prop_map(|(c, graceful)| Op::Disconnect { c, graceful }),
        1 => (c.clone(), prop::collection::vec(0..FILTERS.len(), 1..6))
            .prop_map(|(c, filters)| Op::Subscribe { c, filters }),
        1 => (c.clone(), 0..FILTERS.len()).prop_map(|(c, filter)| Op::Unsubscribe { c, filter }),
        4 => (c.clone(), 0..TOPICS.len(), 0..3u8, any::<bool>(), 0..3_000usize, 1..6u16)
            .prop_map(|(c, topic, qos, retain, size, pkid)| Op::Publish(PublishOp {
                c, topic, qos, retain, size, pkid
            })),
        1 => (c.clone()).prop_map(|c| Op::Ping { c }),
        2 => (c).prop_map(|c| Op::Read { c }),
        1 => Just(Op::AgentConnect),
        1 => Just(Op::AgentDisconnect),
        3 => (0..4usize).prop_map(|nth| Op::AgentAck { nth }),
    ]
}

/// One connection as the test holds it.
struct Conn {
    id: Arc<str>,
    conn: u64,
    rx: mpsc::UnboundedReceiver<Packet>,
    backlog: Arc<AtomicUsize>,
    closed: CancellationToken,
}

impl Conn {
    /// What the connection's writer would take off the queue.
    fn read(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Ok(p) = self.rx.try_recv() {
            self.backlog.fetch_sub(wire_cost(&p), Ordering::Relaxed);
            out.push(p);
        }
        out
    }
}

struct World {
    r: Router,
    acl: Arc<Acl>,
    limits: BrokerLimits,
    devices: Vec<Option<Conn>>,
    agent: Option<Conn>,
    /// The agent's received, unacknowledged messages: its packet id and the payload.
    agent_inbox: Vec<(u16, String)>,
    /// Per device and QoS1/2 packet id, the acknowledgements it is owed, in order: the
    /// payload of a message the agent takes (owed only after the agent's acknowledgement),
    /// or `None` for one acknowledged at once.
    owed: Vec<HashMap<u16, VecDeque<Option<String>>>>,
    /// Payloads the agent has acknowledged.
    agent_acked: std::collections::HashSet<String>,
    serial: u64,
}

fn identity(c: usize) -> Identity {
    Identity {
        username: DEVICES[c].1.map(Arc::from),
        ..Identity::default()
    }
}

impl World {
    fn new() -> Self {
        let limits = BrokerLimits {
            max_session_queue_bytes: 12 * 1024,
            max_queued_bytes: 32 * 1024,
            max_write_backlog_bytes: 8 * 1024,
            max_client_inflight_bytes: 8 * 1024,
            max_retained_bytes: 16 * 1024,
            max_subscriptions: 4,
            ..BrokerLimits::default()
        };
        let acl = Acl::own_topics("edgesync", &["factory/{device}/state"])
            .merge(Acl::parse("topic readwrite cfg/#\ntopic readwrite other/#\n").unwrap());
        let acl = Arc::new(acl);
        let mut r = Router::new(AGENT, limits, Some(acl.clone()), Arc::default());
        let filters: Vec<String> = AGENT_FILTERS.iter().map(|f| (*f).to_owned()).collect();
        r.reserve_agent(&filters, 0);
        Self {
            r,
            acl,
            limits,
            devices: (0..DEVICES.len()).map(|_| None).collect(),
            agent: None,
            agent_inbox: Vec::new(),
            owed: vec![HashMap::new(); DEVICES.len()],
            agent_acked: Default::default(),
            serial: 0,
        }
    }

    fn open(&mut self, id: &str, who: Identity, clean: bool) -> Option<Conn> {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let closed = CancellationToken::new();
        let link = Link::new(tx, backlog.clone(), closed.clone(), Arc::default());
        let (id, conn) = self.r.connect(connect_packet(id, clean), who, link).ok()?;
        Some(Conn {
            id,
            conn,
            rx,
            backlog,
            closed,
        })
    }

    fn close(&mut self, c: usize, graceful: bool) {
        if let Some(conn) = self.devices[c].take() {
            self.r.disconnected(&conn.id, conn.conn, graceful, 1);
        }
    }

    fn handle(&mut self, c: usize, packet: Packet) {
        let Some(conn) = &self.devices[c] else {
            return;
        };
        let (id, n) = (conn.id.clone(), conn.conn);
        if self.r.handle(&id, n, packet) != Flow::Continue {
            self.close(c, false);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Connect { c, clean } => {
                self.close(c, false);
                self.devices[c] = self.open(DEVICES[c].0, identity(c), clean);
                // Answers queued on the old connection are gone; what a resumed session
                // still waits on is answered on the new one.
                let awaiting: Vec<u16> = self
                    .r
                    .sessions
                    .get(DEVICES[c].0)
                    .map(|s| s.awaiting.keys().copied().collect())
                    .unwrap_or_default();
                self.owed[c].retain(|pkid, q| {
                    q.retain(Option::is_some);
                    awaiting.contains(pkid) && !q.is_empty()
                });
            }
            Op::Disconnect { c, graceful } => self.close(c, graceful),
            Op::Subscribe { c, filters } => {
                let filters = filters
                    .into_iter()
                    .map(|f| rumqttc::SubscribeFilter::new(FILTERS[f].into(), QoS::AtLeastOnce));
                self.handle(c, Packet::Subscribe(Subscribe::new_many(filters)));
            }
            Op::Unsubscribe { c, filter } => {
                let u = Unsubscribe::new(FILTERS[filter]);
                self.handle(c, Packet::Unsubscribe(u));
            }
            Op::Publish(p) => self.publish(p),
            Op::Ping { c } => self.handle(c, Packet::PingReq),
            Op::Read { c } => self.read(c),
            Op::AgentConnect => {
                if self.agent.is_none() {
                    let who = Identity {
                        is_agent: true,
                        ..Identity::default()
                    };
                    self.agent = self.open(AGENT, who, false);
                    self.agent_inbox.clear();
                    self.drain_agent();
                }
            }
            Op::AgentDisconnect => {
                if let Some(a) = self.agent.take() {
                    self.r.disconnected(&a.id, a.conn, false, 1);
                    self.agent_inbox.clear();
                }
            }
            Op::AgentAck { nth } => {
                self.drain_agent();
                if self.agent_inbox.is_empty() {
                    return;
                }
                let (pkid, payload) = self.agent_inbox.remove(nth % self.agent_inbox.len());
                let a = self.agent.as_ref().unwrap();
                let (id, n) = (a.id.clone(), a.conn);
                self.r.handle(&id, n, Packet::PubAck(PubAck::new(pkid)));
                self.agent_acked.insert(payload);
            }
        }
    }

    fn publish(&mut self, op: PublishOp) {
        let Some(conn) = &self.devices[op.c] else {
            return;
        };
        self.serial += 1;
        let payload = format!("{}:{}|{}", op.c, self.serial, "x".repeat(op.size));
        let topic = TOPICS[op.topic];
        let qos = match op.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let who = identity(op.c);
        let takes = AGENT_FILTERS.iter().any(|f| filter_matches(f, topic))
            && self
                .acl
                .can_publish(who.username.as_deref(), &conn.id, topic);
        // The router ignores a resend of a packet id still waiting for the agent.
        let waiting = self
            .r
            .sessions
            .get(&conn.id)
            .is_some_and(|s| s.awaiting.contains_key(&op.pkid));
        let owes = qos != QoS::AtMostOnce && !waiting;
        if owes {
            let owed = takes.then(|| payload.clone());
            self.owed[op.c].entry(op.pkid).or_default().push_back(owed);
        }
        let mut p = Publish::new(topic, qos, payload);
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { op.pkid };
        p.retain = op.retain;
        self.handle(op.c, Packet::Publish(p));
        if owes && self.devices[op.c].is_none() {
            // Closed instead (a limit): never acknowledged.
            if let Some(q) = self.owed[op.c].get_mut(&op.pkid) {
                q.pop_back();
            }
        }
    }

    fn read(&mut self, c: usize) {
        let Some(conn) = self.devices[c].as_mut() else {
            return;
        };
        let got = conn.read();
        let id = conn.id.clone();
        let username = DEVICES[c].1;
        for packet in got {
            match packet {
                Packet::Publish(p) => {
                    assert!(
                        self.acl.can_subscribe(username, &id, &p.topic),
                        "{id} received {} outside its ACL",
                        p.topic
                    );
                    if p.qos != QoS::AtMostOnce {
                        self.handle(c, Packet::PubAck(PubAck::new(p.pkid)));
                    }
                }
                Packet::PubAck(PubAck { pkid, .. }) | Packet::PubRec(PubRec { pkid, .. }) => {
                    let owed = self.owed[c].get_mut(&pkid).and_then(VecDeque::pop_front);
                    let Some(owed) = owed else {
                        panic!("{id} acknowledged for packet id {pkid} it was not owed");
                    };
                    if let Some(payload) = owed {
                        assert!(
                            self.agent_acked.contains(&payload),
                            "{id} acknowledged for {payload:.12} before the agent"
                        );
                    }
                }
                _ => {}
            }
        }
    }

    fn drain_agent(&mut self) {
        let Some(a) = self.agent.as_mut() else {
            return;
        };
        for p in a.read() {
            if let Packet::Publish(p) = p {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                self.agent_inbox.retain(|(id, _)| *id != p.pkid);
                self.agent_inbox.push((p.pkid, payload));
            }
        }
    }

    /// The accounting invariants.
    fn check(&self) {
        let r = &self.r;
        let mut queued = 0;
        let mut gate = 0;
        for (client, s) in &r.sessions {
            let held: usize = s.inflight.iter().chain(&s.queue).map(|d| d.cost).sum();
            let awaited: usize = s.awaiting.values().sum();
            assert_eq!(s.awaiting_bytes, awaited, "{client}: awaiting bytes");
            if s.identity.is_agent {
                gate += s
                    .inflight
                    .iter()
                    .chain(&s.queue)
                    .filter(|d| d.origin.is_some())
                    .map(|d| d.cost)
                    .sum::<usize>();
                continue;
            }
            assert_eq!(s.queued_bytes, held, "{client}: queued bytes");
            assert!(s.queued_bytes <= self.limits.max_session_queue_bytes);
            queued += held;
        }
        assert_eq!(r.queued_bytes, queued, "all sessions' queued bytes");
        assert!(r.queued_bytes <= self.limits.max_queued_bytes);
        assert_eq!(r.gate_bytes, gate, "bytes waiting for the agent");
        assert!(r.retained_bytes <= self.limits.max_retained_bytes);
        // A client that never reads holds at most its backlog bound, its queue and one
        // packet (the one that took it over the bound closes it).
        let bound = self.limits.max_write_backlog_bytes + self.limits.max_session_queue_bytes;
        for conn in self.devices.iter().flatten() {
            if !conn.closed.is_cancelled() {
                let held = conn.backlog.load(Ordering::Relaxed);
                assert!(held <= bound + 8 * 1024, "{}: {held} bytes queued", conn.id);
            }
        }
    }
}

proptest! {
    #[test]
    fn the_router_keeps_its_promises_under_any_packet_sequence(
        ops in prop::collection::vec(op(), 1..120)
    ) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
            w.check();
        }
        // Everything still waiting reaches the agent and is acknowledged in the end.
        w.apply(Op::AgentConnect);
        for _ in 0..10_000 {
            w.drain_agent();
            if w.agent_inbox.is_empty() {
                break;
            }
            w.apply(Op::AgentAck { nth: 0 });
        }
        for c in 0..DEVICES.len() {
            w.read(c);
        }
        w.check();
    }
}
