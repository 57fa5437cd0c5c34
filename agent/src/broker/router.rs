//! The broker's state and rules: sessions, subscriptions, retained messages, access control,
//! resource limits, and when a publisher is acknowledged. No I/O and no clocks: connection
//! tasks hand packets in (under one lock), pass the time where it matters, and receive
//! packets to write through their [`Link`].
//!
//! The one rule a general broker does not have: a device's QoS1 (or QoS2) message that the
//! agent subscribes to is acknowledged (PUBACK, or PUBREC) to the device only when the agent
//! has acknowledged it, and the agent acknowledges only after its SQLite commit. The broker
//! lives in the agent's process and keeps no messages on disk, so this is what makes a crash
//! of the agent (and with it the broker) lose nothing: every message not yet committed is
//! still unacknowledged on the device, which sends it again when it reconnects. Only the
//! agent's own session (proven by [`Identity::is_agent`]) gates acknowledgements.
//!
//! Memory is bounded in bytes ([`BrokerLimits`]): what is queued for sessions, what waits for
//! the agent's commit (a publisher over its share is paused, not dropped: see
//! [`Router::should_pause`]), retained messages, and subscriptions per client.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rumqttc::mqttbytes::valid_filter;
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish, QoS,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::auth::Acl;
use super::trie::{Trie, filter_matches};
use crate::config::BrokerLimits;
use crate::metrics::{BrokerDenial, BrokerLimit, Metrics};
use crate::store::{SessionDelta, StoredSession};

/// QoS1 messages sent to a session and not yet acknowledged (its in-flight window, the same
/// figure as the recommended Mosquitto `max_inflight_messages`).
pub const MAX_INFLIGHT: usize = 1000;
/// Retained topics kept (their bytes are bounded by `broker.max_retained_bytes`).
pub const MAX_RETAINED: usize = 10_000;
/// Retained topics examined for one SUBSCRIBE packet at most: the work done under the
/// broker's lock for it stays bounded (a few milliseconds) however many filters it holds.
/// Four subscriptions to `#` with the retained store full fit in it.
pub const RETAINED_SCAN_BUDGET: usize = 4 * MAX_RETAINED;
/// What examining one retained topic for a SUBSCRIBE costs the client, in bytes of its read
/// budget (`broker.max_client_bytes_per_sec`): a client that resubscribes nonstop to filters
/// that make the broker examine thousands of topics is read more slowly, in proportion to
/// the work it causes, not only to the bytes it sends.
pub const SCAN_CHARGE_BYTES: usize = 64;
/// Fixed per-message overhead counted against byte limits (the message's bookkeeping).
const MESSAGE_OVERHEAD: usize = 64;

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) { a } else { b }
}

/// What a message costs against byte limits.
fn cost(p: &Publish) -> usize {
    p.payload.len() + p.topic.len() + MESSAGE_OVERHEAD
}

/// What one queued packet holds until it is written, beyond what it points to: its slot in
/// the connection's channel.
const PACKET_SLOT: usize = std::mem::size_of::<Packet>() + 16;

/// What a packet costs in a connection's write backlog (the writer subtracts the same): its
/// real memory, so a client that sends PINGREQs or SUBSCRIBEs and never reads the answers
/// reaches `broker.max_write_backlog_bytes` at the same memory as one that never reads
/// messages.
pub fn wire_cost(packet: &Packet) -> usize {
    PACKET_SLOT
        + match packet {
            Packet::Publish(p) => p.payload.len() + p.topic.len(),
            Packet::SubAck(a) => a.return_codes.len() * std::mem::size_of::<SubscribeReasonCode>(),
            _ => 0,
        }
}

/// Whether `topic` is within the configured length and depth (checked before anything walks
/// it level by level, so no depth can exhaust the stack).
fn within_topic_limits(topic: &str, limits: &BrokerLimits) -> bool {
    topic.len() <= limits.max_topic_bytes
        && topic.bytes().filter(|b| *b == b'/').count() < limits.max_topic_levels
}

/// The owner recorded for the agent's own session: not a username any device can log in
/// with (the broker treats it as an attempt to be the agent), so a session recorded under a
/// former agent client id is recognised, and never handed to a device.
pub const AGENT_OWNER: &str = super::access::AGENT_USERNAME;

/// Who a connection is, as established by authentication (see `access.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The authenticated username (password file, shared credentials or certificate).
    pub username: Option<Arc<str>>,
    /// The agent's own client, proven by its per-process secret: its acknowledgements gate
    /// the devices', and no ACL or client limit applies to it.
    pub is_agent: bool,
    /// Logged in with the shared `mqtt.username`: many devices behind one name, so limits
    /// per user do not apply to it.
    pub is_shared: bool,
}

/// The write side of a connection, as the router sees it.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::UnboundedSender<Packet>,
    /// Bytes queued and not yet written (the writer subtracts [`wire_cost`]).
    backlog: Arc<AtomicUsize>,
    closed: CancellationToken,
    /// Wakes the connection's reader when it was paused for the agent's commits.
    resume: Arc<Notify>,
}

impl Link {
    /// A link whose packets arrive on `tx`'s receiver; `backlog` counts bytes not yet
    /// written; cancelling `closed` ends the connection; `resume` wakes a paused reader.
    pub fn new(
        tx: mpsc::UnboundedSender<Packet>,
        backlog: Arc<AtomicUsize>,
        closed: CancellationToken,
        resume: Arc<Notify>,
    ) -> Self {
        Self {
            tx,
            backlog,
            closed,
            resume,
        }
    }

    fn send(&self, packet: Packet) {
        let n = wire_cost(&packet);
        self.backlog.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(packet).is_err() {
            self.backlog.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
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
    /// Counted against byte limits (the session's, or the agent's queue for gated ones).
    cost: usize,
}

#[derive(Debug)]
struct Session {
    uid: u64,
    /// Current connection (id, link).
    link: Option<(u64, Link)>,
    persistent: bool,
    identity: Identity,
    filters: HashMap<String, QoS>,
    will: Option<LastWill>,
    next_pkid: u16,
    /// Sent, not yet acknowledged, in send order.
    inflight: VecDeque<Delivery>,
    inflight_ids: HashSet<u16>,
    /// Waiting for room in the window or for the client to come back.
    queue: VecDeque<Delivery>,
    /// Bytes in `inflight` and `queue` (not counted for the agent's session).
    queued_bytes: usize,
    /// This client's QoS1 messages whose acknowledgement waits for the agent's: packet id
    /// to cost.
    awaiting: HashMap<u16, usize>,
    awaiting_bytes: usize,
    /// The reader was told to pause for the agent's commits.
    paused: bool,
    /// Offline and out of queue room: its filters are out of the trie until it reconnects.
    parked: bool,
    /// When it was last connected (Unix seconds; for expiry).
    last_seen_s: u64,
    /// Work done for it beyond the bytes it sent, in bytes of its read budget, not yet
    /// charged ([`Router::take_charge`]).
    charge: usize,
}

impl Session {
    fn new(uid: u64, persistent: bool, identity: Identity) -> Self {
        Self {
            uid,
            link: None,
            persistent,
            identity,
            filters: HashMap::new(),
            will: None,
            next_pkid: 0,
            inflight: VecDeque::new(),
            inflight_ids: HashSet::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            awaiting: HashMap::new(),
            awaiting_bytes: 0,
            paused: false,
            parked: false,
            last_seen_s: 0,
            charge: 0,
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
    /// Close the connection (protocol error, limit or taken over), with the reason for the log.
    Close(&'static str),
}

/// Changes to one persistent session not yet written; merged so memory stays bounded by
/// sessions x subscriptions however fast clients subscribe and unsubscribe.
#[derive(Debug, Default)]
struct PendingSession {
    forget: bool,
    record: bool,
    last_seen_s: Option<u64>,
    owner: Option<Arc<str>>,
    filters: HashMap<String, Option<u8>>,
    written: Vec<oneshot::Sender<bool>>,
}

impl PendingSession {
    fn forget(&mut self) {
        self.forget = true;
        self.record = false;
        self.last_seen_s = None;
        self.owner = None;
        self.filters.clear();
    }

    fn into_delta(self, client: &str) -> (SessionDelta, Vec<oneshot::Sender<bool>>) {
        let delta = SessionDelta {
            client: client.to_owned(),
            forget: self.forget,
            record: self.record,
            last_seen_s: self.last_seen_s,
            owner: self.owner.map(|o| o.to_string()),
            filters: self.filters.into_iter().collect(),
        };
        (delta, self.written)
    }

    /// Puts back a delta that failed to be written, beneath the changes made since.
    fn under(&mut self, older: SessionDelta) {
        if self.forget {
            return; // everything older is superseded
        }
        self.forget = older.forget;
        self.record |= older.record;
        self.last_seen_s = self.last_seen_s.or(older.last_seen_s);
        self.owner = self.owner.take().or(older.owner.map(Arc::from));
        for (f, q) in older.filters {
            self.filters.entry(f).or_insert(q);
        }
    }
}

/// Refusals since they were last logged (logging is rate-limited by the caller's clock).
#[derive(Debug, Default)]
pub struct Denials {
    /// How many.
    pub count: u64,
    /// The latest, described for the log.
    pub last: Option<String>,
}

/// Sessions, subscriptions and retained messages.
#[derive(Debug)]
pub struct Router {
    sessions: HashMap<Arc<str>, Session>,
    trie: Trie,
    /// Sorted, so a filter's retained messages are found in the range of its literal head.
    retained: BTreeMap<String, Publish>,
    retained_bytes: usize,
    /// The agent's client id: its acknowledgements gate the publishers'.
    gate: Arc<str>,
    next_uid: u64,
    metrics: Arc<Metrics>,
    limits: BrokerLimits,
    acl: Option<Arc<Acl>>,
    /// Scratch space for matches, reused across messages.
    matched: Vec<(Arc<str>, QoS)>,
    /// Persistent sessions known to be on disk.
    persisted: HashSet<Arc<str>>,
    /// Session changes waiting to be written, and who to wake to write them.
    pending: HashMap<Arc<str>, PendingSession>,
    persist_wake: Option<Arc<Notify>>,
    /// Bytes queued or in flight for client sessions (the agent's excluded).
    queued_bytes: usize,
    /// Bytes of devices' messages waiting in the agent's session for its commit.
    gate_bytes: usize,
    denials: Denials,
    /// What the agent's session is subscribed to from the start ([`Router::reserve_agent`]).
    agent_filters: Vec<String>,
    /// Restored sessions need an owner ([`Router::require_owners`]).
    owners_required: bool,
    /// Client ids that are the name of a password-file user: only that user may use them
    /// ([`Router::reserve_client_ids`]).
    reserved_ids: HashSet<String>,
}

impl Router {
    /// A router whose acknowledgements to publishers wait for `gate` (the agent's client id).
    pub fn new(
        gate: &str,
        limits: BrokerLimits,
        acl: Option<Arc<Acl>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sessions: HashMap::new(),
            trie: Trie::default(),
            retained: BTreeMap::new(),
            retained_bytes: 0,
            gate: Arc::from(gate),
            next_uid: 0,
            metrics,
            limits,
            acl,
            matched: Vec::new(),
            persisted: HashSet::new(),
            pending: HashMap::new(),
            persist_wake: None,
            queued_bytes: 0,
            gate_bytes: 0,
            denials: Denials::default(),
            agent_filters: Vec::new(),
            owners_required: false,
            reserved_ids: HashSet::new(),
        }
    }

    /// Records changes to persistent sessions for [`Router::take_pending`]; `wake` is
    /// notified when there is something to write.
    pub fn persist_to(&mut self, wake: Arc<Notify>) {
        self.persist_wake = Some(wake);
    }

    fn pending_mut(&mut self, client: &Arc<str>) -> Option<&mut PendingSession> {
        let wake = self.persist_wake.as_ref()?;
        wake.notify_one();
        Some(self.pending.entry(client.clone()).or_default())
    }

    /// The session changes to write, and who to tell once they are written.
    pub fn take_pending(&mut self) -> (Vec<SessionDelta>, Vec<oneshot::Sender<bool>>) {
        let mut deltas = Vec::with_capacity(self.pending.len());
        let mut written = Vec::new();
        for (client, p) in self.pending.drain() {
            let (d, w) = p.into_delta(&client);
            deltas.push(d);
            written.extend(w);
        }
        (deltas, written)
    }

    /// Puts back changes that could not be written, beneath any made since.
    pub fn requeue(&mut self, deltas: Vec<SessionDelta>) {
        for d in deltas {
            let client: Arc<str> = Arc::from(d.client.as_str());
            self.pending.entry(client).or_default().under(d);
        }
    }

    /// Refusals since the last call (for a rate-limited log line).
    pub fn take_denials(&mut self) -> Denials {
        std::mem::take(&mut self.denials)
    }

    /// Counts a refusal and keeps it for the next rate-limited log line.
    pub fn deny(&mut self, action: BrokerDenial, client: &str, what: &str) {
        self.metrics.broker_denied(action);
        self.denials.count += 1;
        self.denials.last = Some(format!("{} by client {client}: {what}", action.label()));
    }

    /// Requires every restored session to have an owner: set when clients must
    /// authenticate, so a session recorded while anonymous clients were allowed cannot be
    /// taken by whichever user asks for its client id first.
    pub fn require_owners(&mut self) {
        self.owners_required = true;
    }

    /// Binds client ids to identities: a client id that is the name of one of `users` (the
    /// password file's) may be used only by that user. A device whose client id is its
    /// username (the usual setup, and the one `broker.acl_own_topics` assumes) cannot have
    /// its id, and with it its persistent session, squatted by another user.
    pub fn reserve_client_ids(&mut self, users: impl IntoIterator<Item = String>) {
        self.reserved_ids = users.into_iter().collect();
    }

    /// Creates the agent's session, offline, holding `filters` (everything the agent's
    /// client subscribes to), before any client can connect. A device's QoS1 message that
    /// arrives before the agent's client has connected and subscribed (every first start,
    /// and every start after the configuration changed) is then queued for the agent and
    /// acknowledged only once the agent has committed it, instead of matching nothing and
    /// being acknowledged at once. Call it before [`Router::restore`].
    pub fn reserve_agent(&mut self, filters: &[String], now_s: u64) {
        let gate = self.gate.clone();
        let uid = self.uid();
        let identity = Identity {
            is_agent: true,
            ..Identity::default()
        };
        let mut session = Session::new(uid, true, identity);
        session.last_seen_s = now_s;
        for f in filters {
            self.trie.insert(f, &gate, QoS::AtLeastOnce);
            session.filters.insert(f.clone(), QoS::AtLeastOnce);
        }
        self.agent_filters = filters.to_vec();
        self.sessions.insert(gate, session);
    }

    /// Recreates a persistent session read from disk, offline, with its subscriptions, under
    /// today's configuration: filters beyond the current limits or refused by the current
    /// ACL are dropped, and sessions no client may hold any more are forgotten (a former
    /// client id of the agent, or a session without an owner where clients must now log
    /// in). Both are removed from disk too.
    pub fn restore(&mut self, stored: &StoredSession, now_s: u64) {
        let client: Arc<str> = Arc::from(stored.client.as_str());
        if client == self.gate {
            return self.restore_agent(stored);
        }
        if let Some(why) = self.unclaimable(stored) {
            warn!(
                client = truncated(&client),
                reason = why,
                "Stored MQTT session removed"
            );
            if let Some(p) = self.pending_mut(&client) {
                p.forget();
            }
            return;
        }
        let uid = self.uid();
        // Any other session stays reserved to the user that owned it.
        let identity = Identity {
            username: stored.owner.as_deref().map(Arc::from),
            ..Identity::default()
        };
        let mut session = Session::new(uid, true, identity);
        session.last_seen_s = stored.last_seen_s.unwrap_or(now_s);
        let mut dropped = Vec::new();
        for (filter, qos) in &stored.filters {
            let allowed = valid_filter(filter)
                && within_topic_limits(filter, &self.limits)
                && self
                    .acl
                    .as_ref()
                    .is_none_or(|acl| acl.can_subscribe(stored.owner.as_deref(), &client, filter));
            if !allowed {
                dropped.push(filter.clone());
                continue;
            }
            let qos = if *qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            self.trie.insert(filter, &client, qos);
            session.filters.insert(filter.clone(), qos);
        }
        if !dropped.is_empty() {
            warn!(
                client = truncated(&client),
                dropped = dropped.len(),
                "Stored subscriptions outside today's ACL or broker.max_topic_bytes / max_topic_levels were removed"
            );
            if let Some(p) = self.pending_mut(&client) {
                for f in dropped {
                    p.filters.insert(f, None);
                }
            }
        }
        self.persisted.insert(client.clone());
        self.sessions.insert(client, session);
    }

    /// Why a stored session may not be restored, if it may not.
    fn unclaimable(&self, stored: &StoredSession) -> Option<&'static str> {
        let former_agent = match stored.owner.as_deref() {
            Some(owner) => owner == AGENT_OWNER,
            // Recorded before sessions named the agent as their owner: the agent's session
            // is the one that holds the agent's own shadow filters.
            None => {
                !self.agent_filters.is_empty()
                    && self
                        .agent_filters
                        .iter()
                        .take(2)
                        .all(|f| stored.filters.iter().any(|(g, _)| g == f))
            }
        };
        if former_agent {
            return Some("the agent's session under a former mqtt.client_id");
        }
        if stored.owner.is_none() && self.owners_required {
            return Some("recorded for an anonymous client, and clients must now log in");
        }
        None
    }

    /// The agent's stored session: today's filters only, as [`Router::reserve_agent`] set
    /// them; filters of an earlier configuration are removed from disk.
    fn restore_agent(&mut self, stored: &StoredSession) {
        let client = self.gate.clone();
        if !self.sessions.contains_key(&client) {
            // Not reserved (tests of restore alone): the filters as stored.
            let filters: Vec<String> = stored.filters.iter().map(|(f, _)| f.clone()).collect();
            self.reserve_agent(&filters, stored.last_seen_s.unwrap_or(0));
        }
        let current: HashSet<&str> = self.agent_filters.iter().map(String::as_str).collect();
        let stale: Vec<String> = stored
            .filters
            .iter()
            .filter(|(f, _)| !current.contains(f.as_str()))
            .map(|(f, _)| f.clone())
            .collect();
        let marked = stored.owner.as_deref() == Some(AGENT_OWNER);
        if let Some(p) = self.pending_mut(&client) {
            for f in stale {
                p.filters.insert(f, None);
            }
            if !marked {
                p.owner = Some(Arc::from(AGENT_OWNER));
            }
        }
        self.persisted.insert(client);
    }

    /// Whether connecting `client_id` with a persistent session must first write it to
    /// disk (it is new): only then may its CONNACK say the session exists after a restart.
    pub fn needs_persisting(&self, client_id: &str, clean_session: bool) -> bool {
        !clean_session && !client_id.is_empty() && !self.persisted.contains(client_id)
    }

    /// Queues the record of a new persistent session, behind any earlier change of the same
    /// client (a "forget" from its previous, clean, session is written first). The receiver
    /// says whether it was written.
    pub fn persist_new(
        &mut self,
        client_id: &str,
        who: &Identity,
    ) -> Option<oneshot::Receiver<bool>> {
        let client: Arc<str> = Arc::from(client_id);
        let owner = if who.is_agent {
            Some(Arc::from(AGENT_OWNER))
        } else {
            who.username.clone()
        };
        let p = self.pending_mut(&client)?;
        let (written, rx) = oneshot::channel();
        p.record = true;
        p.owner = owner;
        p.written.push(written);
        Some(rx)
    }

    fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    /// Checks, before anything is written for it, whether `who` may open a session as
    /// `connect` asks: the client id, its owner, the will's topic, the session limit.
    ///
    /// # Errors
    /// The CONNACK refusal code.
    pub fn admit(&mut self, connect: &Connect, who: &Identity) -> Result<(), ConnectReturnCode> {
        if connect.client_id.is_empty() && !connect.clean_session {
            // MQTT 3.1.1, 3.1.3-8: a persistent session needs a client id.
            return Err(ConnectReturnCode::BadClientId);
        }
        if who.is_agent {
            return Ok(());
        }
        if connect.client_id.starts_with('$') || *connect.client_id == *self.gate {
            // Client ids starting with '$' are ours; the agent's id needs the agent's
            // secret (checked by the caller, which sets `is_agent`).
            self.deny(
                BrokerDenial::Connect,
                &connect.client_id,
                "reserved client id",
            );
            return Err(ConnectReturnCode::NotAuthorized);
        }
        if self.reserved_ids.contains(connect.client_id.as_str())
            && who.username.as_deref() != Some(connect.client_id.as_str())
        {
            let what = "client id is another user's name".to_owned();
            self.deny(BrokerDenial::Connect, &connect.client_id, &what);
            return Err(ConnectReturnCode::NotAuthorized);
        }
        if let Some(existing) = self.sessions.get(connect.client_id.as_str())
            && existing.identity.username.is_some()
            && existing.identity.username != who.username
        {
            // Another identity's session: taking it over would hand over its queue and
            // subscriptions.
            let what = "client id belongs to another user's session".to_owned();
            self.deny(BrokerDenial::Connect, &connect.client_id, &what);
            return Err(ConnectReturnCode::NotAuthorized);
        }
        if let Some(will) = &connect.last_will {
            let allowed = valid_topic(&will.topic)
                && within_topic_limits(&will.topic, &self.limits)
                && self.acl.as_ref().is_none_or(|acl| {
                    acl.can_publish(who.username.as_deref(), &connect.client_id, &will.topic)
                });
            if !allowed {
                let what = format!("will topic {:?}", will.topic);
                self.deny(BrokerDenial::Will, &connect.client_id, &what);
                return Err(ConnectReturnCode::NotAuthorized);
            }
        }
        // Only persistent sessions count: a clean one lives no longer than its connection,
        // which broker.max_connections bounds, so a flood of left-behind sessions cannot
        // lock devices out. A returning session is always admitted (refusing it, or evicting
        // an idle one, would make its device discard what it has not had acknowledged).
        let is_new_persistent =
            !connect.clean_session && !self.sessions.contains_key(connect.client_id.as_str());
        if is_new_persistent
            && !who.is_shared
            && let Some(user) = &who.username
            && self
                .sessions
                .values()
                .filter(|s| s.persistent && s.identity.username.as_ref() == Some(user))
                .count()
                >= self.limits.max_sessions_per_user
        {
            // One identity holding thousands of sessions (each a row on disk and a queue in
            // memory) would crowd out every other device's.
            self.metrics.broker_limit(BrokerLimit::UserSessions);
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        if is_new_persistent
            && self.sessions.len() >= self.limits.max_sessions
            && self.sessions.values().filter(|s| s.persistent).count() >= self.limits.max_sessions
        {
            self.metrics.broker_limit(BrokerLimit::Sessions);
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        Ok(())
    }

    /// Registers a connection that sent `connect` as `who` (protocol version and
    /// credentials already checked) and sends its CONNACK. Returns the client id and the
    /// connection id.
    ///
    /// # Errors
    /// The CONNACK refusal code (the caller sends it).
    pub fn connect(
        &mut self,
        connect: Connect,
        who: Identity,
        link: Link,
    ) -> Result<(Arc<str>, u64), ConnectReturnCode> {
        self.admit(&connect, &who)?;
        let client: Arc<str> = if connect.client_id.is_empty() {
            // Cannot collide with a client-chosen id: those never start with '$'.
            Arc::from(format!("$auto-{}", self.uid()))
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
            self.metrics.broker_clients.dec();
        }
        let resume =
            !connect.clean_session && self.sessions.get(&client).is_some_and(|s| s.persistent);
        if !resume {
            self.discard(&client);
            let uid = self.uid();
            self.sessions.insert(
                client.clone(),
                Session::new(uid, !connect.clean_session, who.clone()),
            );
        }
        let Some(session) = self.sessions.get_mut(&client) else {
            return Err(ConnectReturnCode::ServiceUnavailable);
        };
        // An anonymous session taken by an authenticated user becomes that user's, on disk
        // too (admit refused any other change of owner).
        let new_owner = (session.persistent
            && who.username.is_some()
            && session.identity.username != who.username)
            .then(|| who.username.clone())
            .flatten();
        session.identity = who;
        session.will = connect.last_will;
        let unpark = std::mem::take(&mut session.parked).then(|| {
            session
                .filters
                .iter()
                .map(|(f, q)| (f.clone(), *q))
                .collect::<Vec<_>>()
        });
        session.link = Some((conn, link));
        if session.persistent {
            // The caller wrote it to disk before calling us (see `needs_persisting`).
            self.persisted.insert(client.clone());
        }
        if let Some(owner) = new_owner
            && let Some(p) = self.pending_mut(&client)
        {
            p.owner = Some(owner);
        }
        for (filter, qos) in unpark.into_iter().flatten() {
            self.trie.insert(&filter, &client, qos);
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
        self.metrics.broker_clients.inc();
        Ok((client, conn))
    }

    /// Handles one packet from `client` on connection `conn`.
    pub fn handle(&mut self, client: &Arc<str>, conn: u64, packet: Packet) -> Flow {
        let Some(session) = self.sessions.get(client) else {
            return Flow::Close("taken over by a newer connection");
        };
        let Some((id, link)) = session.link.as_ref() else {
            return Flow::Close("taken over by a newer connection");
        };
        if *id != conn {
            return Flow::Close("taken over by a newer connection");
        }
        // A client that sends without reading our answers: its backlog may hold what its
        // window and QoS0 allowance allow, not more.
        if !session.identity.is_agent
            && link.backlog()
                > self.limits.max_write_backlog_bytes + self.limits.max_session_queue_bytes
        {
            self.metrics.broker_limit(BrokerLimit::WriteBacklog);
            return Flow::Close(
                "not reading its acknowledgements (broker.max_write_backlog_bytes)",
            );
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

    /// The work done for `client` since the last call, in bytes of its read budget (the
    /// connection spends them as if read).
    pub fn take_charge(&mut self, client: &Arc<str>) -> usize {
        self.sessions
            .get_mut(client)
            .map_or(0, |s| std::mem::take(&mut s.charge))
    }

    /// Whether reading from `client` should pause until the agent has committed some of its
    /// messages: it has more than its share waiting, or all publishers together have more
    /// than `broker.max_queued_bytes` waiting. Backpressure through TCP, so nothing is
    /// dropped; the reader is woken through its link's `resume` when an ack comes (a paused
    /// client always has a message waiting, so one will come).
    pub fn should_pause(&mut self, client: &Arc<str>) -> bool {
        let over_all = self.gate_bytes > self.limits.max_queued_bytes;
        let per_client = self.limits.max_client_inflight_bytes;
        let Some(s) = self.sessions.get_mut(client) else {
            return false;
        };
        let pause = s.awaiting_bytes > per_client || (s.awaiting_bytes > 0 && over_all);
        if pause && !s.paused {
            self.metrics.broker_paused.inc();
        }
        s.paused = pause;
        pause
    }

    /// The connection `conn` of `client` ended at `now_s`; `graceful` when the client sent
    /// DISCONNECT (no will message then).
    pub fn disconnected(&mut self, client: &Arc<str>, conn: u64, graceful: bool, now_s: u64) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        if session.link.as_ref().is_none_or(|(id, _)| *id != conn) {
            return; // taken over: the new connection owns the session
        }
        session.link = None;
        session.last_seen_s = now_s;
        self.metrics.broker_clients.dec();
        let will = if graceful { None } else { session.will.take() };
        if session.persistent {
            if let Some(p) = self.pending_mut(client) {
                p.last_seen_s = Some(now_s);
            }
        } else {
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

    /// Removes persistent sessions disconnected for longer than `broker.session_expiry_secs`
    /// (their rows too). Returns how many.
    pub fn expire(&mut self, now_s: u64) -> usize {
        let expiry = self.limits.session_expiry.as_secs();
        if expiry == 0 {
            return 0;
        }
        let expired: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.link.is_none()
                    && !s.identity.is_agent
                    && s.last_seen_s.saturating_add(expiry) <= now_s
            })
            .map(|(c, _)| c.clone())
            .collect();
        // The agent's own session (is_agent, also when restored) never expires: it holds
        // what devices wait on.
        for client in &expired {
            self.metrics.broker_limit(BrokerLimit::SessionExpiry);
            self.discard(client);
        }
        expired.len()
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
            && let Some(p) = self.pending_mut(client)
        {
            p.forget();
        }
        for filter in session.filters.keys() {
            self.trie.remove(filter, client);
        }
        if !session.identity.is_agent {
            self.queued_bytes -= session.queued_bytes;
        }
        for d in session.inflight.iter().chain(&session.queue) {
            if let Some(o) = &d.origin {
                self.gate_bytes -= d.cost;
                self.release(o);
            }
        }
    }

    /// The agent is done with a message from `o`'s publisher: it is no longer waiting.
    /// Returns whether the publisher (same session instance) was still waiting on it.
    fn release(&mut self, o: &Origin) -> bool {
        let per_client = self.limits.max_client_inflight_bytes;
        let Some(publisher) = self.sessions.get_mut(&o.client) else {
            return false;
        };
        if publisher.uid != o.session {
            return false;
        }
        let Some(c) = publisher.awaiting.remove(&o.pkid) else {
            return false;
        };
        publisher.awaiting_bytes -= c;
        if publisher.paused && publisher.awaiting_bytes <= per_client {
            publisher.paused = false;
            if let Some((_, link)) = &publisher.link {
                link.resume.notify_one();
            }
        }
        true
    }

    fn publish(&mut self, client: &Arc<str>, mut publish: Publish) -> Flow {
        if !valid_topic(&publish.topic) {
            return Flow::Close("invalid topic name in PUBLISH (MQTT 3.1.1, 4.7.3)");
        }
        self.metrics.broker_messages_in.inc();
        let Some(session) = self.sessions.get(client) else {
            return Flow::Close("no session");
        };
        let uid = session.uid;
        let is_agent = session.identity.is_agent;
        if !is_agent && !within_topic_limits(&publish.topic, &self.limits) {
            self.metrics.broker_limit(BrokerLimit::Topic);
            return Flow::Close("topic beyond broker.max_topic_bytes / max_topic_levels");
        }
        if publish.qos != QoS::AtMostOnce && session.awaiting.contains_key(&publish.pkid) {
            // A resend (DUP) of a message still on its way to the agent: it is acknowledged
            // when the first copy is; routing it again would acknowledge twice.
            return Flow::Continue;
        }
        if !is_agent
            && let Some(acl) = &self.acl
            && !acl.can_publish(session.identity.username.as_deref(), client, &publish.topic)
        {
            // MQTT 3.1.1 has no way to refuse a PUBLISH: like Mosquitto, the message is
            // acknowledged and dropped. Not acknowledging would make the device resend it
            // for ever and block its in-flight window; the refusal is counted and logged.
            let what = format!("topic {:?}", publish.topic);
            self.deny(BrokerDenial::Publish, client, &what);
            self.acknowledge_now(client, publish.qos, publish.pkid);
            return Flow::Continue;
        }
        if !is_agent
            && publish.qos != QoS::AtMostOnce
            && self.gate_bytes > self.limits.max_queued_bytes.saturating_mul(2)
        {
            // Paused publishers stop well before this; only clients that reconnect to shed
            // their share get here. Unacknowledged, so the message is sent again later.
            self.metrics.broker_limit(BrokerLimit::QueuedBytes);
            return Flow::Close("the agent's queue is full (broker.max_queued_bytes)");
        }
        if publish.retain {
            self.store_retained(&publish);
        }
        let qos = publish.qos;
        let pkid = publish.pkid;
        let gate_cost = cost(&publish);
        publish.retain = false; // MQTT 3.1.1, 3.3.1-9: live deliveries are not retained
        let gated = self.route_from(client, uid, &publish);
        match qos {
            QoS::AtMostOnce => {}
            _ if gated => {
                if let Some(s) = self.sessions.get_mut(client) {
                    s.awaiting.insert(pkid, gate_cost);
                    s.awaiting_bytes += gate_cost;
                }
            }
            _ => self.acknowledge_now(client, qos, pkid),
        }
        Flow::Continue
    }

    fn acknowledge_now(&self, client: &Arc<str>, qos: QoS, pkid: u16) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.reply(client, Packet::PubAck(PubAck::new(pkid))),
            // Delivered at most at QoS1 (we grant no QoS2): the PUBREC is the hand-over.
            QoS::ExactlyOnce => self.reply(client, Packet::PubRec(PubRec::new(pkid))),
        }
    }

    fn store_retained(&mut self, publish: &Publish) {
        let new_cost = publish.topic.len() + publish.payload.len();
        if let Some(old) = self.retained.remove(&publish.topic) {
            self.retained_bytes -= old.topic.len() + old.payload.len();
        }
        if publish.payload.is_empty() {
            return;
        }
        if self.retained.len() >= MAX_RETAINED
            || self.retained_bytes + new_cost > self.limits.max_retained_bytes
        {
            // The old value was removed above: a subscriber gets no message rather than a
            // stale one.
            self.metrics.broker_limit(BrokerLimit::Retained);
            warn!(
                topic = publish.topic,
                "Retained message not kept: broker.max_retained_bytes (or {MAX_RETAINED} topics) reached"
            );
            return;
        }
        let mut kept = publish.clone();
        kept.qos = min_qos(kept.qos, QoS::AtLeastOnce);
        self.retained_bytes += new_cost;
        self.retained.insert(publish.topic.clone(), kept);
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
        self.trie
            .matches(&publish.topic, |s| matched.push((s.client.clone(), s.qos)));
        // A client with overlapping filters gets one copy at the highest QoS granted. Sorted
        // rather than searched: thousands of matching sessions stay O(n log n).
        matched.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        matched.dedup_by(|later, kept| {
            if later.0 == kept.0 {
                kept.1 = max_qos(kept.1, later.1);
                true
            } else {
                false
            }
        });
        let message_cost = cost(publish);
        let mut gated = false;
        let mut parked = Vec::new();
        for (subscriber, granted) in &matched {
            let Some(target) = self.sessions.get_mut(subscriber) else {
                continue;
            };
            let qos = min_qos(min_qos(publish.qos, *granted), QoS::AtLeastOnce);
            let is_agent = target.identity.is_agent;
            if qos == QoS::AtMostOnce {
                match &target.link {
                    Some((_, link))
                        if !is_agent && link.backlog() >= self.limits.max_write_backlog_bytes =>
                    {
                        self.metrics.broker_dropped_qos0.inc();
                        self.metrics.broker_limit(BrokerLimit::WriteBacklog);
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
            // Only the agent's session (proven, or restored under its id) gates.
            let gate =
                publish.qos != QoS::AtMostOnce && is_agent && *client != self.gate && session != 0;
            if !is_agent {
                let limit =
                    if target.queued_bytes + message_cost > self.limits.max_session_queue_bytes {
                        Some(BrokerLimit::SessionQueue)
                    } else if self.queued_bytes + message_cost > self.limits.max_queued_bytes {
                        Some(BrokerLimit::QueuedBytes)
                    } else {
                        None
                    };
                if let Some(limit) = limit {
                    self.metrics.broker_dropped_queue.inc();
                    self.metrics.broker_limit(limit);
                    if target.link.is_none() && !target.parked {
                        target.parked = true;
                        parked.push(subscriber.clone());
                    }
                    continue;
                }
                target.queued_bytes += message_cost;
                self.queued_bytes += message_cost;
            } else if gate {
                self.gate_bytes += message_cost;
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
                cost: message_cost,
            });
            target.pump();
        }
        self.matched = matched;
        // An offline session that is already losing messages for want of room stops being
        // matched until it reconnects: thousands of abandoned sessions subscribed to `#`
        // would otherwise cost every message a walk over all of them.
        for client in parked {
            self.park(&client);
        }
        gated
    }

    fn park(&mut self, client: &Arc<str>) {
        let Some(session) = self.sessions.get(client) else {
            return;
        };
        for filter in session.filters.keys() {
            self.trie.remove(filter, client);
        }
        debug!(
            client = &**client,
            "Offline session out of queue room: no more messages queued until it reconnects"
        );
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
        let is_agent = session.identity.is_agent;
        if !is_agent {
            session.queued_bytes -= done.cost;
        }
        session.pump();
        if !is_agent {
            self.queued_bytes -= done.cost;
        }
        if let Some(o) = done.origin {
            self.gate_bytes -= done.cost;
            if self.release(&o)
                && let Some(publisher) = self.sessions.get(&o.client)
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
    }

    fn subscribe(&mut self, client: &Arc<str>, subscribe: Subscribe) {
        let Some(session) = self.sessions.get(client) else {
            return;
        };
        let identity = session.identity.clone();
        // One decision per distinct filter, whatever the packet repeats: a SUBSCRIBE that
        // names one filter 100,000 times is granted (and sent the retained messages) once.
        // The last occurrence's QoS wins, as if the copies had come one after another.
        let mut wanted: Vec<(&str, QoS)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for f in &subscribe.filters {
            match index.get(f.path.as_str()) {
                Some(&i) => wanted[i].1 = f.qos,
                None => {
                    index.insert(&f.path, wanted.len());
                    wanted.push((&f.path, f.qos));
                }
            }
        }
        let mut count = session.filters.len();
        let mut decided: Vec<SubscribeReasonCode> = Vec::with_capacity(wanted.len());
        let mut granted = Vec::new();
        for &(path, requested) in &wanted {
            let code = self.grant(client, &identity, path, requested, &mut count);
            if let SubscribeReasonCode::Success(qos) = code {
                granted.push((path.to_owned(), qos));
            }
            decided.push(code);
        }
        let codes = subscribe
            .filters
            .iter()
            .map(|f| decided[index[f.path.as_str()]])
            .collect();
        drop(index);
        drop(wanted);
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        session.send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
        self.send_retained(client, &granted);
    }

    /// Decides one distinct filter of a SUBSCRIBE and, when granted, records it.
    fn grant(
        &mut self,
        client: &Arc<str>,
        identity: &Identity,
        path: &str,
        requested: QoS,
        count: &mut usize,
    ) -> SubscribeReasonCode {
        if !valid_filter(path) || path.contains('\0') {
            return SubscribeReasonCode::Failure;
        }
        if !identity.is_agent {
            if !within_topic_limits(path, &self.limits) {
                self.metrics.broker_limit(BrokerLimit::Topic);
                return SubscribeReasonCode::Failure;
            }
            let is_new = self
                .sessions
                .get(client)
                .is_some_and(|s| !s.filters.contains_key(path));
            if is_new && *count >= self.limits.max_subscriptions {
                self.metrics.broker_limit(BrokerLimit::Subscriptions);
                return SubscribeReasonCode::Failure;
            }
            if let Some(acl) = &self.acl
                && !acl.can_subscribe(identity.username.as_deref(), client, path)
            {
                let what = format!("filter {:?}", truncated(path));
                self.deny(BrokerDenial::Subscribe, client, &what);
                return SubscribeReasonCode::Failure;
            }
            *count += usize::from(is_new);
        }
        let qos = min_qos(requested, QoS::AtLeastOnce);
        self.trie.insert(path, client, qos);
        let persistent = match self.sessions.get_mut(client) {
            Some(s) => {
                s.filters.insert(path.to_owned(), qos);
                s.persistent
            }
            None => false,
        };
        if persistent && let Some(p) = self.pending_mut(client) {
            p.filters.insert(path.to_owned(), Some(qos as u8));
        }
        SubscribeReasonCode::Success(qos)
    }

    /// MQTT 3.1.1, 3.3.1-6: retained messages go to every new subscription. The work is
    /// bounded per SUBSCRIBE ([`RETAINED_SCAN_BUDGET`] topics examined; a filter without
    /// wildcards is one lookup, one with a literal head examines only the topics under it),
    /// and so is what it queues: QoS0 copies stop at the client's write backlog, QoS1 copies
    /// at its session queue, each counted as the live messages are.
    fn send_retained(&mut self, client: &Arc<str>, granted: &[(String, QoS)]) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let mut budget = RETAINED_SCAN_BUDGET;
        let mut cut_short = false;
        for (filter, qos) in granted {
            let head = literal_head(filter);
            let candidates: Box<dyn Iterator<Item = (&String, &Publish)>> =
                if head.len() == filter.len() {
                    Box::new(self.retained.get_key_value(filter.as_str()).into_iter())
                } else {
                    Box::new(
                        self.retained
                            .range::<str, _>((
                                std::ops::Bound::Included(head),
                                std::ops::Bound::Unbounded,
                            ))
                            .take_while(move |(t, _)| t.starts_with(head)),
                    )
                };
            for (topic, kept) in candidates {
                if budget == 0 {
                    cut_short = true;
                    break;
                }
                budget -= 1;
                if !filter_matches(filter, topic) {
                    continue;
                }
                let mut p = kept.clone();
                p.qos = min_qos(p.qos, *qos);
                p.retain = true;
                if p.qos == QoS::AtMostOnce {
                    match &session.link {
                        Some((_, link))
                            if !session.identity.is_agent
                                && link.backlog() >= self.limits.max_write_backlog_bytes =>
                        {
                            self.metrics.broker_dropped_qos0.inc();
                            self.metrics.broker_limit(BrokerLimit::WriteBacklog);
                        }
                        Some((_, link)) => link.send(Packet::Publish(p)),
                        None => {}
                    }
                    continue;
                }
                let c = cost(&p);
                if !session.identity.is_agent {
                    if session.queued_bytes + c > self.limits.max_session_queue_bytes
                        || self.queued_bytes + c > self.limits.max_queued_bytes
                    {
                        self.metrics.broker_limit(BrokerLimit::SessionQueue);
                        continue;
                    }
                    session.queued_bytes += c;
                    self.queued_bytes += c;
                }
                session.queue.push_back(Delivery {
                    publish: p,
                    origin: None,
                    cost: c,
                });
            }
            if cut_short {
                break;
            }
        }
        session.charge += (RETAINED_SCAN_BUDGET - budget) * SCAN_CHARGE_BYTES;
        if cut_short {
            self.metrics.broker_limit(BrokerLimit::RetainedScan);
            debug!(
                client = &**client,
                "Retained messages for a SUBSCRIBE cut short at the per-packet scan budget"
            );
        }
        session.pump();
    }

    fn unsubscribe(&mut self, client: &Arc<str>, unsubscribe: Unsubscribe) {
        for filter in &unsubscribe.topics {
            self.trie.remove(filter, client);
            let removed = self
                .sessions
                .get_mut(client)
                .is_some_and(|s| s.filters.remove(filter).is_some() && s.persistent);
            if removed && let Some(p) = self.pending_mut(client) {
                p.filters.insert(filter.clone(), None);
            }
        }
        self.reply(client, Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
    }
}

/// The part of a filter before its first wildcard: every topic it matches starts with it.
fn literal_head(filter: &str) -> &str {
    filter.find(['+', '#']).map_or(filter, |i| &filter[..i])
}

/// At most the first 128 bytes of client-chosen text, for logs and replies.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(128);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A topic name a client may publish to (MQTT 3.1.1, 4.7.3: not empty, no wildcards).
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod attacks;
#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rumqttc::{Login, Protocol};
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;

    pub(super) const AGENT: &str = "agent";

    pub(super) struct Client {
        pub(super) id: Arc<str>,
        pub(super) conn: u64,
        pub(super) rx: UnboundedReceiver<Packet>,
        pub(super) closed: CancellationToken,
        /// Sent right after the CONNACK.
        early: Vec<Packet>,
    }

    impl Client {
        pub(super) fn drain(&mut self) -> Vec<Packet> {
            let mut out = std::mem::take(&mut self.early);
            while let Ok(p) = self.rx.try_recv() {
                out.push(p);
            }
            out
        }
    }

    pub(super) fn connect_packet(id: &str, clean: bool) -> Connect {
        Connect {
            protocol: Protocol::V4,
            keep_alive: 30,
            client_id: id.to_owned(),
            clean_session: clean,
            last_will: None,
            login: None::<Login>,
        }
    }

    pub(super) fn connect(router: &mut Router, id: &str, clean: bool) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        let link = Link::new(tx, Arc::default(), closed.clone(), Arc::default());
        let (id, conn) = router
            .connect(connect_packet(id, clean), who(id), link)
            .unwrap();
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

    pub(super) fn subscribe(router: &mut Router, c: &mut Client, filter: &str) {
        let s = Subscribe::new(filter, QoS::AtLeastOnce);
        assert_eq!(
            router.handle(&c.id, c.conn, Packet::Subscribe(s)),
            Flow::Continue
        );
        c.drain();
    }

    pub(super) fn publish(router: &mut Router, c: &Client, topic: &str, pkid: u16) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, "{}");
        p.pkid = pkid;
        assert_eq!(
            router.handle(&c.id, c.conn, Packet::Publish(p)),
            Flow::Continue
        );
    }

    pub(super) fn publishes(packets: &[Packet]) -> Vec<(String, u16, bool)> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.topic.clone(), p.pkid, p.dup)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn pubacks(packets: &[Packet]) -> Vec<u16> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some(a.pkid),
                _ => None,
            })
            .collect()
    }

    pub(super) fn who(id: &str) -> Identity {
        Identity {
            is_agent: id == AGENT,
            ..Identity::default()
        }
    }

    pub(super) fn router() -> Router {
        Router::new(AGENT, BrokerLimits::default(), None, Arc::default())
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
        r.disconnected(&device.id, device.conn, false, 0);
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
        r.disconnected(&agent.id, agent.conn, false, 0);
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
    fn a_restored_session_stays_reserved_to_its_owner() {
        let mut r = router();
        r.persist_to(Arc::default());
        r.restore(
            &StoredSession {
                client: "press-1".into(),
                last_seen_s: Some(5),
                owner: Some("press-1".into()),
                filters: Vec::new(),
            },
            10,
        );
        let user = |name: &str| Identity {
            username: Some(Arc::from(name)),
            ..Identity::default()
        };
        let c = &connect_packet("press-1", false);
        assert_eq!(
            r.admit(c, &user("press-2")),
            Err(ConnectReturnCode::NotAuthorized)
        );
        assert_eq!(
            r.admit(c, &who("press-1")),
            Err(ConnectReturnCode::NotAuthorized)
        );
        assert_eq!(r.admit(c, &user("press-1")), Ok(()));

        // An anonymous session claimed by a user is recorded as that user's.
        let mut anon = connect(&mut r, "m9", false);
        r.disconnected(&anon.id, anon.conn, true, 11);
        let _ = r.take_pending();
        let (tx, _rx) = mpsc::unbounded_channel();
        let link = Link::new(tx, Arc::default(), CancellationToken::new(), Arc::default());
        r.connect(connect_packet("m9", false), user("op"), link)
            .unwrap();
        let (deltas, _) = r.take_pending();
        assert_eq!(deltas[0].owner.as_deref(), Some("op"));
        anon.drain();
    }

    #[test]
    fn a_restored_session_is_present_keeps_its_subscriptions_and_changes_are_persisted() {
        let mut r = router();
        r.persist_to(Arc::default());
        r.restore(
            &StoredSession {
                client: AGENT.into(),
                last_seen_s: Some(5),
                owner: None,
                filters: vec![("factory/+/state".into(), 1)],
            },
            10,
        );
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
                who(AGENT),
                Link::new(tx, Arc::default(), CancellationToken::new(), Arc::default()),
            )
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(Packet::ConnAck(a)) if a.session_present));
        let Ok(Packet::Publish(p)) = rx.try_recv() else {
            panic!("queued message delivered on connect");
        };
        r.handle(&id, conn, Packet::PubAck(PubAck::new(p.pkid)));
        assert_eq!(pubacks(&device.drain()), [5]);
        // Subscribing records one row change; a clean reconnect forgets the session.
        let _ = r.take_pending();
        r.persisted.insert(Arc::from("m1"));
        subscribe(&mut r, &mut device, "cmd/m1");
        let (deltas, _) = r.take_pending();
        assert_eq!(
            deltas,
            [SessionDelta {
                client: "m1".into(),
                filters: vec![("cmd/m1".into(), Some(1))],
                ..SessionDelta::default()
            }]
        );
        connect_clean_again(&mut r, "m1");
        let (deltas, _) = r.take_pending();
        assert_eq!(
            deltas,
            [SessionDelta {
                client: "m1".into(),
                forget: true,
                ..SessionDelta::default()
            }]
        );
        // A forget that failed to be written goes back beneath a newer record.
        let _written = r.persist_new("m1", &who("m1")).unwrap();
        r.requeue(deltas);
        let (deltas, written) = r.take_pending();
        assert_eq!(written.len(), 1);
        assert!(deltas[0].forget && deltas[0].record);
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
        assert_eq!(r.metrics.broker_clients.get(), 1);
        assert_eq!(
            r.handle(&old.id, old.conn, Packet::PingReq),
            Flow::Close("taken over by a newer connection")
        );
        assert_eq!(r.handle(&new.id, new.conn, Packet::PingReq), Flow::Continue);
        // The old connection ending does not end the new one's session.
        r.disconnected(&old.id, old.conn, false, 0);
        assert_eq!(r.handle(&new.id, new.conn, Packet::PingReq), Flow::Continue);
        assert_eq!(r.metrics.broker_clients.get(), 1);
        r.disconnected(&new.id, new.conn, true, 0);
        assert_eq!(r.metrics.broker_clients.get(), 0);
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
            let link = Link::new(tx, Arc::default(), CancellationToken::new(), Arc::default());
            let connect = Connect {
                last_will: Some(LastWill::new("status/dev", "gone", QoS::AtMostOnce, false)),
                ..connect_packet("dev", true)
            };
            let (id, conn) = r.connect(connect, who("dev"), link).unwrap();
            r.disconnected(&id, conn, graceful, 0);
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

    pub(super) fn limited(limits: BrokerLimits) -> Router {
        Router::new(AGENT, limits, None, Arc::default())
    }

    #[test]
    fn the_agents_client_id_needs_the_agents_identity() {
        let mut r = router();
        let (tx, _rx) = mpsc::unbounded_channel();
        let link = Link::new(tx, Arc::default(), CancellationToken::new(), Arc::default());
        assert_eq!(
            r.connect(connect_packet(AGENT, false), who("intruder"), link)
                .err(),
            Some(ConnectReturnCode::NotAuthorized)
        );
        assert_eq!(r.metrics.broker_clients.get(), 0);
    }

    #[test]
    fn a_publisher_over_its_share_pauses_until_the_agent_commits() {
        let mut r = limited(BrokerLimits {
            max_client_inflight_bytes: 1000,
            ..BrokerLimits::default()
        });
        let mut agent = connect(&mut r, AGENT, false);
        subscribe(&mut r, &mut agent, "factory/+/state");
        let device = connect(&mut r, "m1", false);
        let big = "x".repeat(600);
        for pkid in 1..=2 {
            let mut p = Publish::new("factory/m1/state", QoS::AtLeastOnce, big.clone());
            p.pkid = pkid;
            r.handle(&device.id, device.conn, Packet::Publish(p));
        }
        assert!(r.should_pause(&device.id), "1,200 bytes await the agent");
        let got = publishes(&agent.drain());
        r.handle(&agent.id, agent.conn, Packet::PubAck(PubAck::new(got[0].1)));
        assert!(!r.should_pause(&device.id));
        assert_eq!(r.metrics.broker_paused.get(), 1);
    }

    #[test]
    fn queues_and_retained_messages_are_bounded_in_bytes() {
        let mut r = limited(BrokerLimits {
            max_session_queue_bytes: 2000,
            max_retained_bytes: 1500,
            max_subscriptions: 2,
            ..BrokerLimits::default()
        });
        let mut slow = connect(&mut r, "slow", false);
        subscribe(&mut r, &mut slow, "t/#");
        let publisher = connect(&mut r, "p", true);
        let body = "y".repeat(900);
        for pkid in 1..=5 {
            let mut p = Publish::new("t/1", QoS::AtLeastOnce, body.clone());
            p.pkid = pkid;
            p.retain = true;
            r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
        }
        assert_eq!(publishes(&slow.drain()).len(), 2, "two fit in 2,000 bytes");
        assert_eq!(r.metrics.broker_limit_count(BrokerLimit::SessionQueue), 3);
        // One 900-byte retained message fits, a second topic does not.
        let mut p = Publish::new("t/2", QoS::AtMostOnce, body.clone());
        p.retain = true;
        r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
        assert_eq!(r.retained.len(), 1);
        assert_eq!(r.metrics.broker_limit_count(BrokerLimit::Retained), 1);
        // Subscriptions per client, and depth.
        let s = Subscribe::new_many([
            rumqttc::SubscribeFilter::new("a".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("b".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("a/".repeat(40) + "b", QoS::AtMostOnce),
        ]);
        r.handle(&slow.id, slow.conn, Packet::Subscribe(s));
        let codes = slow
            .drain()
            .into_iter()
            .find_map(|p| match p {
                Packet::SubAck(a) => Some(a.return_codes),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            codes,
            [
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure
            ]
        );
    }

    #[test]
    fn an_offline_session_out_of_room_is_parked_until_it_reconnects() {
        let mut r = limited(BrokerLimits {
            max_session_queue_bytes: 2000,
            ..BrokerLimits::default()
        });
        let mut ghost = connect(&mut r, "ghost", false);
        subscribe(&mut r, &mut ghost, "t/#");
        r.disconnected(&ghost.id, ghost.conn, true, 1);
        let publisher = connect(&mut r, "p", true);
        let body = "y".repeat(900);
        let send = |r: &mut Router, pkid| {
            let mut p = Publish::new("t/1", QoS::AtLeastOnce, body.clone());
            p.pkid = pkid;
            r.handle(&publisher.id, publisher.conn, Packet::Publish(p));
        };
        for pkid in 1..=5 {
            send(&mut r, pkid);
        }
        // The third overflowed and parked it: the rest were not even matched.
        assert_eq!(r.metrics.broker_limit_count(BrokerLimit::SessionQueue), 1);
        let mut matched = 0;
        r.trie.matches("t/1", |_| matched += 1);
        assert_eq!(matched, 0);
        // Back online: its two queued messages, and new ones again.
        let mut back = connect(&mut r, "ghost", false);
        let first = publishes(&back.drain());
        assert_eq!(first.len(), 2);
        for (_, pkid, _) in &first {
            r.handle(&back.id, back.conn, Packet::PubAck(PubAck::new(*pkid)));
        }
        send(&mut r, 6);
        assert_eq!(publishes(&back.drain()).len(), 1);
    }

    #[test]
    fn idle_persistent_sessions_expire_and_are_forgotten_on_disk() {
        let mut r = limited(BrokerLimits {
            session_expiry: std::time::Duration::from_secs(100),
            ..BrokerLimits::default()
        });
        r.persist_to(Arc::default());
        let old = connect(&mut r, "old", false);
        r.disconnected(&old.id, old.conn, true, 1_000);
        let _live = connect(&mut r, "live", false);
        let _ = r.take_pending();
        assert_eq!(r.expire(1_099), 0);
        assert_eq!(r.expire(1_100), 1);
        let (deltas, _) = r.take_pending();
        assert!(deltas.iter().any(|d| d.client == "old" && d.forget));
        assert!(r.needs_persisting("old", false));
        assert!(!r.needs_persisting("live", false));
    }
}
