//! The broker's state and rules: sessions, subscriptions, retained messages, and when a
//! publisher is acknowledged. No I/O: connection tasks hand packets in (under one lock) and
//! receive packets to write through their [`Link`].
//!
//! The one rule a general broker does not have: a device's QoS1 (or QoS2) message that the
//! agent subscribes to is acknowledged (PUBACK, or PUBREC) to the device only when the agent
//! has acknowledged it, and
//! the agent acknowledges only after its SQLite commit. The broker lives in the agent's
//! process and keeps nothing on disk, so this is what makes a crash of the agent (and with it
//! the broker) lose nothing: every message not yet committed is still unacknowledged on the
//! device, which sends it again when it reconnects.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rumqttc::mqttbytes::valid_filter;
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish, QoS,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::trie::{Trie, filter_matches};
use crate::metrics::Metrics;

/// QoS1 messages sent to a session and not yet acknowledged (its in-flight window, the same
/// figure as the recommended Mosquitto `max_inflight_messages`).
pub const MAX_INFLIGHT: usize = 1000;
/// QoS1 messages kept for a session beyond its window (also while it is offline). Messages
/// for the agent itself are never dropped: they are bounded by the devices' own in-flight
/// windows, since a device gets no acknowledgement before the agent's.
pub const MAX_QUEUED: usize = 10_000;
/// Packets waiting to be written to one connection beyond which QoS0 messages to it are
/// dropped (a subscriber that does not read must not grow the agent's memory).
pub const MAX_WRITE_BACKLOG: usize = 10_000;
/// Retained topics kept.
pub const MAX_RETAINED: usize = 10_000;

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) { a } else { b }
}

/// The write side of a connection, as the router sees it.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::UnboundedSender<Packet>,
    backlog: Arc<AtomicUsize>,
    closed: CancellationToken,
}

impl Link {
    /// A link whose packets arrive on `tx`'s receiver; `backlog` counts packets not yet
    /// written (the writer decrements it); cancelling `closed` ends the connection.
    pub fn new(
        tx: mpsc::UnboundedSender<Packet>,
        backlog: Arc<AtomicUsize>,
        closed: CancellationToken,
    ) -> Self {
        Self {
            tx,
            backlog,
            closed,
        }
    }

    fn send(&self, packet: Packet) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(packet).is_err() {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn congested(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) >= MAX_WRITE_BACKLOG
    }
}

/// A QoS1 message the publisher is waiting on (its acknowledgement waits for the agent's).
#[derive(Debug, Clone)]
struct Origin {
    client: Arc<str>,
    /// The publisher's session instance: a new clean session reuses packet ids.
    session: u64,
    pkid: u16,
    /// A QoS2 publish: answered with PUBREC instead of PUBACK.
    exactly_once: bool,
}

#[derive(Debug)]
struct Delivery {
    publish: Publish,
    origin: Option<Origin>,
}

#[derive(Debug)]
struct Session {
    uid: u64,
    /// Current connection (id, link).
    link: Option<(u64, Link)>,
    persistent: bool,
    filters: HashMap<String, QoS>,
    will: Option<LastWill>,
    next_pkid: u16,
    /// Sent, not yet acknowledged, in send order.
    inflight: VecDeque<Delivery>,
    inflight_ids: HashSet<u16>,
    /// Waiting for room in the window or for the client to come back.
    queue: VecDeque<Delivery>,
    /// This client's QoS1 messages whose acknowledgement waits for the agent's.
    awaiting: HashSet<u16>,
}

impl Session {
    fn new(uid: u64, persistent: bool) -> Self {
        Self {
            uid,
            link: None,
            persistent,
            filters: HashMap::new(),
            will: None,
            next_pkid: 0,
            inflight: VecDeque::new(),
            inflight_ids: HashSet::new(),
            queue: VecDeque::new(),
            awaiting: HashSet::new(),
        }
    }

    fn send(&self, packet: Packet) {
        if let Some((_, link)) = &self.link {
            link.send(packet);
        }
    }

    fn next_free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight_ids.contains(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Moves queued messages into the window while the client is connected.
    fn pump(&mut self) {
        while self.link.is_some() && self.inflight.len() < MAX_INFLIGHT {
            let Some(mut d) = self.queue.pop_front() else {
                return;
            };
            let pkid = self.next_free_pkid();
            d.publish.pkid = pkid;
            self.inflight_ids.insert(pkid);
            self.send(Packet::Publish(d.publish.clone()));
            self.inflight.push_back(d);
        }
    }
}

/// What the connection should do after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The client sent DISCONNECT.
    Disconnect,
    /// Close the connection (protocol error or taken over), with the reason for the log.
    Close(&'static str),
}

/// A persistent session to record (`filters`: JSON) or forget (`None`), in order.
#[derive(Debug)]
pub struct SessionChange {
    pub client: String,
    pub filters: Option<String>,
    /// Told whether the change was written (for a new session, before its CONNACK).
    pub written: Option<oneshot::Sender<bool>>,
}

/// Sessions, subscriptions and retained messages.
#[derive(Debug)]
pub struct Router {
    sessions: HashMap<Arc<str>, Session>,
    trie: Trie,
    retained: HashMap<String, Publish>,
    /// The agent's client id: its acknowledgements gate the publishers'.
    gate: Arc<str>,
    next_uid: u64,
    metrics: Arc<Metrics>,
    /// Scratch space for matches, reused across messages.
    matched: Vec<(Arc<str>, QoS)>,
    /// Persistent sessions known to be on disk.
    persisted: HashSet<Arc<str>>,
    /// Where changes to persistent sessions go to be written.
    persist: Option<mpsc::UnboundedSender<SessionChange>>,
}

impl Router {
    /// A router whose acknowledgements to publishers wait for `gate` (the agent's client id).
    pub fn new(gate: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            sessions: HashMap::new(),
            trie: Trie::default(),
            retained: HashMap::new(),
            gate: Arc::from(gate),
            next_uid: 0,
            metrics,
            matched: Vec::new(),
            persisted: HashSet::new(),
            persist: None,
        }
    }

    /// Sends changes to persistent sessions (subscriptions, removal) to `tx`.
    pub fn persist_to(&mut self, tx: mpsc::UnboundedSender<SessionChange>) {
        self.persist = Some(tx);
    }

    /// Recreates a persistent session read from disk, offline, with its subscriptions.
    pub fn restore(&mut self, client: &str, filters_json: &str) {
        let client: Arc<str> = Arc::from(client);
        let filters: HashMap<String, u8> = serde_json::from_str(filters_json).unwrap_or_default();
        let uid = self.uid();
        let mut session = Session::new(uid, true);
        for (filter, qos) in filters {
            let qos = if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            self.trie.insert(&filter, &client, qos);
            session.filters.insert(filter, qos);
        }
        self.persisted.insert(client.clone());
        self.sessions.insert(client, session);
    }

    /// Whether connecting `client_id` with a persistent session must first write it to
    /// disk (it is new): only then may its CONNACK say the session exists after a restart.
    pub fn needs_persisting(&self, client_id: &str, clean_session: bool) -> bool {
        !clean_session && !client_id.is_empty() && !self.persisted.contains(client_id)
    }

    /// Queues the record of a new persistent session, behind any earlier change of the same
    /// client (a "forget" from its previous, clean, session must not land after it). The
    /// receiver says whether it was written.
    pub fn persist_new(&self, client_id: &str) -> Option<oneshot::Receiver<bool>> {
        let tx = self.persist.as_ref()?;
        let (written, rx) = oneshot::channel();
        tx.send(SessionChange {
            client: client_id.to_owned(),
            filters: Some("{}".to_owned()),
            written: Some(written),
        })
        .ok()?;
        Some(rx)
    }

    fn save_filters(&self, client: &Arc<str>) {
        let (Some(tx), Some(s)) = (&self.persist, self.sessions.get(client)) else {
            return;
        };
        if !s.persistent {
            return;
        }
        let filters: HashMap<&str, u8> = s
            .filters
            .iter()
            .map(|(f, q)| (f.as_str(), *q as u8))
            .collect();
        let json = serde_json::to_string(&filters).unwrap_or_else(|_| "{}".into());
        let _ = tx.send(SessionChange {
            client: client.to_string(),
            filters: Some(json),
            written: None,
        });
    }

    fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    /// Registers a connection that sent `connect` (protocol version and credentials already
    /// checked) and sends its CONNACK. Returns the client id and the connection id.
    ///
    /// # Errors
    /// The CONNACK refusal code (the caller sends it).
    pub fn connect(
        &mut self,
        connect: Connect,
        link: Link,
    ) -> Result<(Arc<str>, u64), ConnectReturnCode> {
        let client: Arc<str> = if connect.client_id.is_empty() {
            if !connect.clean_session {
                // MQTT 3.1.1, 3.1.3-8: a persistent session needs a client id.
                return Err(ConnectReturnCode::BadClientId);
            }
            Arc::from(format!("auto-{}", self.uid()))
        } else {
            Arc::from(connect.client_id.as_str())
        };
        let conn = self.uid();
        if let Some(old) = self.sessions.get_mut(&client)
            && let Some((_, old_link)) = old.link.take()
        {
            // MQTT 3.1.1, 3.1.4-2: a second connection with the same id takes over.
            debug!(
                client = &*client,
                "Client id taken over by a new connection"
            );
            old_link.closed.cancel();
            // Its connection task finds the session taken and leaves the count alone.
            self.metrics.broker_clients.fetch_sub(1, Ordering::Relaxed);
        }
        let resume =
            !connect.clean_session && self.sessions.get(&client).is_some_and(|s| s.persistent);
        if !resume {
            self.discard(&client);
            let uid = self.uid();
            self.sessions
                .insert(client.clone(), Session::new(uid, !connect.clean_session));
        }
        let Some(session) = self.sessions.get_mut(&client) else {
            return Err(ConnectReturnCode::ServiceUnavailable);
        };
        session.will = connect.last_will;
        session.link = Some((conn, link));
        if session.persistent {
            // The caller wrote it to disk before calling us (see `needs_persisting`).
            self.persisted.insert(client.clone());
        }
        let Some(session) = self.sessions.get_mut(&client) else {
            return Err(ConnectReturnCode::ServiceUnavailable);
        };
        session.send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            resume,
        )));
        // MQTT 3.1.1, 4.4: unacknowledged messages are sent again, in order, marked DUP.
        for d in &session.inflight {
            let mut p = d.publish.clone();
            p.dup = true;
            session.send(Packet::Publish(p));
        }
        session.pump();
        self.metrics.broker_clients.fetch_add(1, Ordering::Relaxed);
        Ok((client, conn))
    }

    /// Handles one packet from `client` on connection `conn`.
    pub fn handle(&mut self, client: &Arc<str>, conn: u64, packet: Packet) -> Flow {
        let current = self
            .sessions
            .get(client)
            .and_then(|s| s.link.as_ref())
            .is_some_and(|(id, _)| *id == conn);
        if !current {
            return Flow::Close("taken over by a newer connection");
        }
        match packet {
            Packet::Publish(p) => return self.publish(client, p),
            Packet::PubAck(ack) => self.acknowledged(client, ack.pkid),
            // We never send QoS2, so PUBREC/PUBCOMP have nothing to complete.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::PubRel(rel) => self.reply(client, Packet::PubComp(PubComp::new(rel.pkid))),
            Packet::Subscribe(s) => self.subscribe(client, s),
            Packet::Unsubscribe(u) => self.unsubscribe(client, u),
            Packet::PingReq => self.reply(client, Packet::PingResp),
            Packet::Disconnect => return Flow::Disconnect,
            Packet::Connect(_) => return Flow::Close("second CONNECT (MQTT 3.1.1, 3.1.0-2)"),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Flow::Close("server-only packet sent by a client");
            }
        }
        Flow::Continue
    }

    /// The connection `conn` of `client` ended; `graceful` when the client sent DISCONNECT
    /// (no will message then).
    pub fn disconnected(&mut self, client: &Arc<str>, conn: u64, graceful: bool) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        if session.link.as_ref().is_none_or(|(id, _)| *id != conn) {
            return; // taken over: the new connection owns the session
        }
        session.link = None;
        self.metrics.broker_clients.fetch_sub(1, Ordering::Relaxed);
        let will = if graceful { None } else { session.will.take() };
        if !session.persistent {
            self.discard(client);
        }
        if let Some(will) = will {
            let publish = Publish {
                dup: false,
                qos: will.qos,
                retain: will.retain,
                topic: will.topic,
                pkid: 0,
                payload: will.message,
            };
            if publish.retain {
                self.store_retained(&publish);
            }
            self.route(client, &publish);
        }
    }

    fn reply(&self, client: &Arc<str>, packet: Packet) {
        if let Some(s) = self.sessions.get(client) {
            s.send(packet);
        }
    }

    /// Removes a session; messages the agent had not acknowledged yet are released on their
    /// publishers (not acknowledged: a resend is routed again).
    fn discard(&mut self, client: &Arc<str>) {
        let Some(session) = self.sessions.remove(client) else {
            return;
        };
        if self.persisted.remove(client)
            && let Some(tx) = &self.persist
        {
            let _ = tx.send(SessionChange {
                client: client.to_string(),
                filters: None,
                written: None,
            });
        }
        for filter in session.filters.keys() {
            self.trie.remove(filter, client);
        }
        for d in session.inflight.iter().chain(&session.queue) {
            if let Some(o) = &d.origin
                && let Some(publisher) = self.sessions.get_mut(&o.client)
                && publisher.uid == o.session
            {
                publisher.awaiting.remove(&o.pkid);
            }
        }
    }

    fn publish(&mut self, client: &Arc<str>, mut publish: Publish) -> Flow {
        if publish.topic.is_empty() || publish.topic.contains(['+', '#', '\0']) {
            return Flow::Close("invalid topic name in PUBLISH (MQTT 3.1.1, 4.7.3)");
        }
        self.metrics
            .broker_messages_in
            .fetch_add(1, Ordering::Relaxed);
        let Some(session) = self.sessions.get(client) else {
            return Flow::Close("no session");
        };
        let uid = session.uid;
        if publish.qos != QoS::AtMostOnce && session.awaiting.contains(&publish.pkid) {
            // A resend (DUP) of a message still on its way to the agent: it is acknowledged
            // when the first copy is; routing it again would acknowledge twice.
            return Flow::Continue;
        }
        if publish.retain {
            self.store_retained(&publish);
        }
        let qos = publish.qos;
        let pkid = publish.pkid;
        publish.retain = false; // MQTT 3.1.1, 3.3.1-9: live deliveries are not retained
        let gated = self.route_from(client, uid, &publish);
        match qos {
            QoS::AtMostOnce => {}
            _ if gated => {
                if let Some(s) = self.sessions.get_mut(client) {
                    s.awaiting.insert(pkid);
                }
            }
            QoS::AtLeastOnce => self.reply(client, Packet::PubAck(PubAck::new(pkid))),
            // Delivered at most at QoS1 (we grant no QoS2): the PUBREC is the hand-over.
            QoS::ExactlyOnce => self.reply(client, Packet::PubRec(PubRec::new(pkid))),
        }
        Flow::Continue
    }

    fn store_retained(&mut self, publish: &Publish) {
        if publish.payload.is_empty() {
            self.retained.remove(&publish.topic);
        } else if self.retained.len() < MAX_RETAINED || self.retained.contains_key(&publish.topic) {
            let mut kept = publish.clone();
            kept.qos = min_qos(kept.qos, QoS::AtLeastOnce);
            self.retained.insert(publish.topic.clone(), kept);
        } else {
            warn!(
                topic = publish.topic,
                "Retained message not kept: {MAX_RETAINED} retained topics already"
            );
        }
    }

    /// Routes a message with no publisher waiting on it (will messages).
    fn route(&mut self, client: &Arc<str>, publish: &Publish) {
        let mut p = publish.clone();
        p.retain = false;
        if p.qos == QoS::ExactlyOnce {
            p.qos = QoS::AtLeastOnce;
        }
        // Session 0 never exists, so nothing is gated.
        let _ = self.route_from(client, 0, &p);
    }

    /// Delivers `publish` to every matching session. Returns whether the agent got it at
    /// QoS1 on behalf of a QoS1 publisher (whose acknowledgement then waits).
    fn route_from(&mut self, client: &Arc<str>, session: u64, publish: &Publish) -> bool {
        let mut matched = std::mem::take(&mut self.matched);
        matched.clear();
        self.trie.matches(&publish.topic, |s| {
            // A client with overlapping filters gets one copy at the highest QoS granted.
            match matched.iter_mut().find(|(c, _)| *c == s.client) {
                Some((_, q)) => *q = max_qos(*q, s.qos),
                None => matched.push((s.client.clone(), s.qos)),
            }
        });
        let mut gated = false;
        for (subscriber, granted) in &matched {
            let Some(target) = self.sessions.get_mut(subscriber) else {
                continue;
            };
            let qos = min_qos(min_qos(publish.qos, *granted), QoS::AtLeastOnce);
            if qos == QoS::AtMostOnce {
                match &target.link {
                    Some((_, link)) if link.congested() => {
                        self.metrics
                            .broker_dropped_qos0
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some((_, link)) => link.send(Packet::Publish(Publish {
                        qos,
                        pkid: 0,
                        dup: false,
                        ..publish.clone()
                    })),
                    None => {}
                }
                continue;
            }
            let gate = publish.qos != QoS::AtMostOnce
                && *subscriber == self.gate
                && *client != self.gate
                && session != 0;
            if !gate && target.queue.len() >= MAX_QUEUED {
                self.metrics
                    .broker_dropped_queue
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            gated |= gate;
            target.queue.push_back(Delivery {
                publish: Publish {
                    qos,
                    dup: false,
                    ..publish.clone()
                },
                origin: gate.then(|| Origin {
                    client: client.clone(),
                    session,
                    pkid: publish.pkid,
                    exactly_once: publish.qos == QoS::ExactlyOnce,
                }),
            });
            target.pump();
        }
        self.matched = matched;
        gated
    }

    fn acknowledged(&mut self, client: &Arc<str>, pkid: u16) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        // Acknowledgements normally come in order: the search ends at the front.
        let Some(i) = session.inflight.iter().position(|d| d.publish.pkid == pkid) else {
            return;
        };
        let Some(done) = session.inflight.remove(i) else {
            return;
        };
        session.inflight_ids.remove(&pkid);
        session.pump();
        if let Some(o) = done.origin
            && let Some(publisher) = self.sessions.get_mut(&o.client)
            && publisher.uid == o.session
            && publisher.awaiting.remove(&o.pkid)
        {
            // If the publisher is offline, it sends the message again on reconnect; that
            // copy is routed and acknowledged like a new one.
            publisher.send(if o.exactly_once {
                Packet::PubRec(PubRec::new(o.pkid))
            } else {
                Packet::PubAck(PubAck::new(o.pkid))
            });
        }
    }

    fn subscribe(&mut self, client: &Arc<str>, subscribe: Subscribe) {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::new();
        for f in subscribe.filters {
            if !valid_filter(&f.path) || f.path.contains('\0') {
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            let qos = min_qos(f.qos, QoS::AtLeastOnce);
            self.trie.insert(&f.path, client, qos);
            if let Some(s) = self.sessions.get_mut(client) {
                s.filters.insert(f.path.clone(), qos);
            }
            codes.push(SubscribeReasonCode::Success(qos));
            granted.push((f.path, qos));
        }
        self.save_filters(client);
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        session.send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
        // MQTT 3.1.1, 3.3.1-6: retained messages go to every new subscription.
        for (filter, qos) in granted {
            for (topic, kept) in &self.retained {
                if !filter_matches(&filter, topic) {
                    continue;
                }
                let mut p = kept.clone();
                p.qos = min_qos(p.qos, qos);
                p.retain = true;
                if p.qos == QoS::AtMostOnce {
                    session.send(Packet::Publish(p));
                } else {
                    session.queue.push_back(Delivery {
                        publish: p,
                        origin: None,
                    });
                }
            }
        }
        session.pump();
    }

    fn unsubscribe(&mut self, client: &Arc<str>, unsubscribe: Unsubscribe) {
        for filter in &unsubscribe.topics {
            self.trie.remove(filter, client);
            if let Some(s) = self.sessions.get_mut(client) {
                s.filters.remove(filter);
            }
        }
        self.save_filters(client);
        self.reply(client, Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rumqttc::{Login, Protocol};
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;

    const AGENT: &str = "agent";

    struct Client {
        id: Arc<str>,
        conn: u64,
        rx: UnboundedReceiver<Packet>,
        closed: CancellationToken,
        /// Sent right after the CONNACK.
        early: Vec<Packet>,
    }

    impl Client {
        fn drain(&mut self) -> Vec<Packet> {
            let mut out = std::mem::take(&mut self.early);
            while let Ok(p) = self.rx.try_recv() {
                out.push(p);
            }
            out
        }
    }

    fn connect_packet(id: &str, clean: bool) -> Connect {
        Connect {
            protocol: Protocol::V4,
            keep_alive: 30,
            client_id: id.to_owned(),
            clean_session: clean,
            last_will: None,
            login: None::<Login>,
        }
    }

    fn connect(router: &mut Router, id: &str, clean: bool) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        let link = Link::new(tx, Arc::default(), closed.clone());
        let (id, conn) = router.connect(connect_packet(id, clean), link).unwrap();
        let mut c = Client {
            id,
            conn,
            rx,
            closed,
            early: Vec::new(),
        };
        let mut got = c.drain();
        assert!(matches!(got[0], Packet::ConnAck(_)));
        c.early = got.split_off(1);
        c
    }

    fn subscribe(router: &mut Router, c: &mut Client, filter: &str) {
        let s = Subscribe::new(filter, QoS::AtLeastOnce);
        assert_eq!(
            router.handle(&c.id, c.conn, Packet::Subscribe(s)),
            Flow::Continue
        );
        c.drain();
    }

    fn publish(router: &mut Router, c: &Client, topic: &str, pkid: u16) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, "{}");
        p.pkid = pkid;
        assert_eq!(
            router.handle(&c.id, c.conn, Packet::Publish(p)),
            Flow::Continue
        );
    }

    fn publishes(packets: &[Packet]) -> Vec<(String, u16, bool)> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.topic.clone(), p.pkid, p.dup)),
                _ => None,
            })
            .collect()
    }

    fn pubacks(packets: &[Packet]) -> Vec<u16> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some(a.pkid),
                _ => None,
            })
            .collect()
    }

    fn router() -> Router {
        Router::new(AGENT, Arc::default())
    }

    #[test]
    fn a_device_is_acknowledged_only_after_the_agent() {
        let mut r = router();
        let mut agent = connect(&mut r, AGENT, false);
        subscribe(&mut r, &mut agent, "factory/+/state");
        let mut device = connect(&mut r, "m1", false);
        publish(&mut r, &device, "factory/m1/state", 7);
        assert!(
            pubacks(&device.drain()).is_empty(),
            "no ack before the agent's"
        );
        let got = publishes(&agent.drain());
        assert_eq!(got.len(), 1);
        let agent_pkid = got[0].1;
        r.handle(
            &agent.id,
            agent.conn,
            Packet::PubAck(PubAck::new(agent_pkid)),
        );
        assert_eq!(pubacks(&device.drain()), [7]);
    }

    #[test]
    fn a_qos2_publish_is_received_only_after_the_agent() {
        let mut r = router();
        let mut agent = connect(&mut r, AGENT, false);
        subscribe(&mut r, &mut agent, "factory/+/state");
        let mut device = connect(&mut r, "m1", false);
        let mut p = Publish::new("factory/m1/state", QoS::ExactlyOnce, "{}");
        p.pkid = 3;
        r.handle(&device.id, device.conn, Packet::Publish(p));
        assert!(
            device.drain().is_empty(),
            "no PUBREC before the agent's ack"
        );
        let got = publishes(&agent.drain());
        r.handle(&agent.id, agent.conn, Packet::PubAck(PubAck::new(got[0].1)));
        assert!(matches!(&device.drain()[..], [Packet::PubRec(rec)] if rec.pkid == 3));
        r.handle(
            &device.id,
            device.conn,
            Packet::PubRel(rumqttc::PubRel::new(3)),
        );
        assert!(matches!(&device.drain()[..], [Packet::PubComp(c)] if c.pkid == 3));
    }

    #[test]
    fn topics_the_agent_does_not_take_are_acknowledged_at_once() {
        let mut r = router();
        let mut agent = connect(&mut r, AGENT, false);
        subscribe(&mut r, &mut agent, "factory/+/state");
        let mut other = connect(&mut r, "panel", true);
        subscribe(&mut r, &mut other, "line/#");
        let mut device = connect(&mut r, "m1", false);
        publish(&mut r, &device, "line/1/alarm", 3);
        assert_eq!(pubacks(&device.drain()), [3]);
        assert_eq!(publishes(&other.drain()).len(), 1);
        assert!(agent.drain().is_empty());
    }

    #[test]
    fn a_resend_while_the_first_copy_is_pending_is_not_routed_twice() {
        let mut r = router();
        let mut agent = connect(&mut r, AGENT, false);
        subscribe(&mut r, &mut agent, "factory/+/state");
        let device = connect(&mut r, "m1", false);
        publish(&mut r, &device, "factory/m1/state", 9);
        // The device reconnects (persistent session) and sends the message again.
        r.disconnected(&device.id, device.conn, false);
        let mut device = connect(&mut r, "m1", false);
        publish(&mut r, &device, "factory/m1/state", 9);
        let got = publishes(&agent.drain());
        assert_eq!(got.len(), 1, "one copy to the agent: {got:?}");
        r.handle(&agent.id, agent.conn, Packet::PubAck(PubAck::new(got[0].1)));
        assert_eq!(pubacks(&device.drain()), [9]);
    }

    #[test]
    fn the_agent_reconnecting_gets_unacknowledged_messages_again_marked_dup() {
        let mut r = router();
        let mut agent = connect(&mut r, AGENT, false);
        subscribe(&mut r, &mut agent, "factory/+/state");
        let mut device = connect(&mut r, "m1", false);
        publish(&mut r, &device, "factory/m1/state", 1);
        publish(&mut r, &device, "factory/m1/state", 2);
        assert_eq!(publishes(&agent.drain()).len(), 2);
        r.disconnected(&agent.id, agent.conn, false);
        // Published while the agent is away: queued for it.
        publish(&mut r, &device, "factory/m1/state", 3);
        let mut agent = connect(&mut r, AGENT, false);
        let got = publishes(&agent.drain());
        assert_eq!(
            got.iter().map(|(_, _, dup)| *dup).collect::<Vec<_>>(),
            [true, true, false]
        );
        for (_, pkid, _) in got {
            r.handle(&agent.id, agent.conn, Packet::PubAck(PubAck::new(pkid)));
        }
        assert_eq!(pubacks(&device.drain()), [1, 2, 3]);
    }

    #[test]
    fn a_restored_session_is_present_keeps_its_subscriptions_and_changes_are_persisted() {
        let mut r = router();
        let (tx, mut changes) = mpsc::unbounded_channel();
        r.persist_to(tx);
        r.restore(AGENT, r#"{"factory/+/state":1}"#);
        assert!(!r.needs_persisting(AGENT, false));
        assert!(r.needs_persisting("new-device", false));
        assert!(!r.needs_persisting("new-device", true));
        // A device publishes before the agent is back: queued for the agent, not acked.
        let mut device = connect(&mut r, "m1", false);
        publish(&mut r, &device, "factory/m1/state", 5);
        assert!(pubacks(&device.drain()).is_empty());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (id, conn) = r
            .connect(
                connect_packet(AGENT, false),
                Link::new(tx, Arc::default(), CancellationToken::new()),
            )
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(Packet::ConnAck(a)) if a.session_present));
        let Ok(Packet::Publish(p)) = rx.try_recv() else {
            panic!("queued message delivered on connect");
        };
        r.handle(&id, conn, Packet::PubAck(PubAck::new(p.pkid)));
        assert_eq!(pubacks(&device.drain()), [5]);
        // Subscribing records the filters; a clean reconnect forgets the session.
        subscribe(&mut r, &mut device, "cmd/m1");
        let change = changes.try_recv().unwrap();
        assert_eq!(
            (change.client.as_str(), change.filters.as_deref()),
            ("m1", Some(r#"{"cmd/m1":1}"#))
        );
        connect_clean_again(&mut r, "m1");
        let change = changes.try_recv().unwrap();
        assert_eq!((change.client.as_str(), change.filters), ("m1", None));
        // A new persistent session is queued behind that, and its writer is told.
        let _written = r.persist_new("m1").unwrap();
        assert_eq!(changes.try_recv().unwrap().filters.as_deref(), Some("{}"));
    }

    fn connect_clean_again(r: &mut Router, id: &str) {
        let _ = connect(r, id, true);
    }

    #[test]
    fn a_takeover_closes_the_old_connection() {
        let mut r = router();
        let old = connect(&mut r, "m1", true);
        let new = connect(&mut r, "m1", true);
        assert!(old.closed.is_cancelled());
        assert_eq!(r.metrics.broker_clients.load(Ordering::Relaxed), 1);
        assert_eq!(
            r.handle(&old.id, old.conn, Packet::PingReq),
            Flow::Close("taken over by a newer connection")
        );
        assert_eq!(r.handle(&new.id, new.conn, Packet::PingReq), Flow::Continue);
        // The old connection ending does not end the new one's session.
        r.disconnected(&old.id, old.conn, false);
        assert_eq!(r.handle(&new.id, new.conn, Packet::PingReq), Flow::Continue);
        assert_eq!(r.metrics.broker_clients.load(Ordering::Relaxed), 1);
        r.disconnected(&new.id, new.conn, true);
        assert_eq!(r.metrics.broker_clients.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn retained_messages_reach_new_subscribers_and_an_empty_payload_clears_them() {
        let mut r = router();
        let publisher = connect(&mut r, "p", true);
        let mut p = Publish::new("cfg/line1", QoS::AtMostOnce, "on");
        p.retain = true;
        r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
        let mut sub = connect(&mut r, "s", true);
        r.handle(
            &sub.id,
            sub.conn,
            Packet::Subscribe(Subscribe::new("cfg/+", QoS::AtMostOnce)),
        );
        let got = sub.drain();
        assert!(
            got.iter()
                .any(|p| matches!(p, Packet::Publish(p) if p.retain && p.topic == "cfg/line1"))
        );
        let mut clear = Publish::new("cfg/line1", QoS::AtMostOnce, "");
        clear.retain = true;
        r.handle(&publisher.id, publisher.conn, Packet::Publish(clear));
        let mut late = connect(&mut r, "late", true);
        r.handle(
            &late.id,
            late.conn,
            Packet::Subscribe(Subscribe::new("cfg/+", QoS::AtMostOnce)),
        );
        assert!(publishes(&late.drain()).is_empty());
    }

    #[test]
    fn a_will_is_sent_on_abnormal_disconnect_only() {
        let mut r = router();
        let mut watcher = connect(&mut r, "w", true);
        subscribe(&mut r, &mut watcher, "status/#");
        for (graceful, expected) in [(true, 0), (false, 1)] {
            let (tx, _rx) = mpsc::unbounded_channel();
            let link = Link::new(tx, Arc::default(), CancellationToken::new());
            let connect = Connect {
                last_will: Some(LastWill::new("status/dev", "gone", QoS::AtMostOnce, false)),
                ..connect_packet("dev", true)
            };
            let (id, conn) = r.connect(connect, link).unwrap();
            r.disconnected(&id, conn, graceful);
            assert_eq!(publishes(&watcher.drain()).len(), expected);
        }
        // It was not published as retained, so a later subscriber does not get it.
        let mut late = connect(&mut r, "late", true);
        let s = Subscribe::new("status/#", QoS::AtLeastOnce);
        r.handle(&late.id, late.conn, Packet::Subscribe(s));
        assert!(publishes(&late.drain()).is_empty());
    }

    #[test]
    fn bad_topics_and_filters_are_refused() {
        let mut r = router();
        let mut c = connect(&mut r, "c", true);
        let mut s = Subscribe::new("a/#/b", QoS::AtLeastOnce);
        s.pkid = 4;
        r.handle(&c.id, c.conn, Packet::Subscribe(s));
        assert!(matches!(
            &c.drain()[..],
            [Packet::SubAck(a)] if a.return_codes == [SubscribeReasonCode::Failure]
        ));
        let p = Publish::new("a/+", QoS::AtMostOnce, "x");
        assert!(matches!(
            r.handle(&c.id, c.conn, Packet::Publish(p)),
            Flow::Close(_)
        ));
    }

    #[test]
    fn the_window_holds_back_messages_until_acknowledged() {
        let mut r = router();
        let mut sub = connect(&mut r, "s", false);
        subscribe(&mut r, &mut sub, "t");
        let publisher = connect(&mut r, "p", true);
        for i in 0..(MAX_INFLIGHT + 5) {
            publish(&mut r, &publisher, "t", (i + 1) as u16);
        }
        let first = publishes(&sub.drain());
        assert_eq!(first.len(), MAX_INFLIGHT);
        r.handle(&sub.id, sub.conn, Packet::PubAck(PubAck::new(first[0].1)));
        assert_eq!(publishes(&sub.drain()).len(), 1);
    }
}
