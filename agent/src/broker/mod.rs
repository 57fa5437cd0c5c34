//! The embedded MQTT broker (`[mqtt] embedded = true`): a node with no broker of its own,
//! and the demo, work out of the box.
//!
//! MQTT 3.1.1 over TCP: QoS 0 and 1 (QoS 2 publishes are accepted and delivered at QoS 1),
//! `+`/`#` wildcards, persistent sessions, retained messages, wills, keep-alive,
//! optional username/password. Packets are encoded and decoded with rumqttc's codec.
//!
//! Its durability differs from a standalone broker's in one deliberate way: a device's QoS1
//! message for the agent is acknowledged to the device only after the agent has committed it
//! (see [`router`]). So messages need not be written to disk by the broker: each one is
//! either committed in SQLite or still unacknowledged on the device. What the broker does
//! write, to the agent's database, is its persistent sessions (client id, subscriptions):
//! after an agent restart a device is told its session is present and sends its
//! unacknowledged messages again (a compliant client discards them when told the session is
//! gone). An agent crash loses what lives only in memory: QoS0 messages in flight, retained
//! messages, and QoS1 messages queued *to* devices (replies and deltas; a device gets its
//! desired state again with `shadow/get`).
//!
//! Safe on a plant network as Mosquitto 2.x is: only the agent, proven by a per-process
//! secret ([`access`]), holds the agent's session; devices authenticate with a Mosquitto
//! password file and are confined by an ACL ([`auth`]); every resource a client can make the
//! broker hold is bounded by `[broker]` limits and counted when hit.

pub mod access;
pub mod auth;
mod conn;
mod router;
mod tls;
mod trie;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{BrokerConfig, CertIdentity};
use crate::metrics::{BrokerLimit, Metrics};
use crate::store::Store;
use access::{Access, AgentSecret};
use auth::{Acl, PasswordFile};
use router::Router;

/// How often refusals are summarised in the log and expired sessions removed.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Wait before writing session changes again after the database refused them.
const PERSIST_RETRY: Duration = Duration::from_secs(1);

/// What the embedded broker needs to know.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Username and password shared by all devices (`mqtt.username`/`password`), if any.
    pub credentials: Option<(String, edgesync_protocol::secret::Secret)>,
    /// The agent's client id: its acknowledgements gate the devices'.
    pub agent_client_id: String,
    /// The agent's proof of identity (its client presents it).
    pub agent_secret: AgentSecret,
    /// Access control and limits.
    pub config: BrokerConfig,
    /// Shadow topic prefix and ingest topic templates (for `broker.acl_own_topics`).
    pub topic_prefix: String,
    /// Ingest topic templates with `{device}`.
    pub ingest_topics: Vec<String>,
    /// The Sparkplug B group heard (`+`: all), when a sparkplug-b mapping is configured.
    pub sparkplug_group: Option<String>,
    /// Whether KubeEdge's device twin topics are served.
    pub kubeedge_twin: bool,
    /// Everything the agent's client subscribes to (held for it before devices connect).
    pub agent_filters: Vec<String>,
}

/// State shared by the connection tasks.
struct Shared {
    router: Mutex<Router>,
    access: Access,
    limits: crate::config::BrokerLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    /// Device connections past their CONNECT (`broker.max_connections`).
    open: Arc<AtomicUsize>,
    /// Device connections still without one (`broker.max_pending_connections`).
    pending: PendingSockets,
    /// Password-file checks running at once (`broker.max_password_checks`).
    password_checks: Arc<tokio::sync::Semaphore>,
}

/// How a connection came in, and what it holds until it ends.
pub(crate) enum Entry {
    /// On the agent's own listener: only the agent is admitted; counted apart.
    Agent(ConnectionSlot),
    /// On a device listener: a place among the connections without a CONNECT, traded for
    /// a [`ConnectionSlot`] once the CONNECT has come.
    Device(PendingTicket),
}

/// Connections that have not sent their CONNECT yet, oldest first. They have their own
/// budget, apart from established clients: when it is full, the oldest is closed to make
/// room, so a flood of silent sockets costs its sender turnover instead of locking devices
/// out (a device's CONNECT follows its accept within milliseconds).
struct PendingSockets {
    waiting: Mutex<std::collections::VecDeque<(u64, CancellationToken)>>,
    next: std::sync::atomic::AtomicU64,
    cap: usize,
}

/// A connection's place among those without a CONNECT; gives it up when dropped. Its token
/// is cancelled when the connection is closed to make room.
pub(crate) struct PendingTicket {
    id: u64,
    evicted: CancellationToken,
    shared: Arc<Shared>,
}

impl Entry {
    /// Cancelled when the connection is closed to make room for newer ones (never for the
    /// agent's own listener).
    pub(crate) fn evicted(&self) -> CancellationToken {
        match self {
            Entry::Device(ticket) => ticket.evicted.clone(),
            Entry::Agent(_) => CancellationToken::new(),
        }
    }
}

impl PendingSockets {
    fn new(cap: usize) -> Self {
        Self {
            waiting: Mutex::default(),
            next: std::sync::atomic::AtomicU64::new(0),
            cap,
        }
    }
}

impl PendingTicket {
    fn take(shared: &Arc<Shared>) -> Self {
        let p = &shared.pending;
        let id = p.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        if let Ok(mut waiting) = p.waiting.lock() {
            while waiting.len() >= p.cap {
                let Some((_, oldest)) = waiting.pop_front() else {
                    break;
                };
                oldest.cancel();
                shared.metrics.broker_limit(BrokerLimit::PendingConnections);
            }
            waiting.push_back((id, evicted.clone()));
        }
        Self {
            id,
            evicted,
            shared: shared.clone(),
        }
    }
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.shared.pending.waiting.lock()
            && let Some(i) = waiting.iter().position(|(id, _)| *id == self.id)
        {
            waiting.remove(i);
        }
    }
}

/// What the TLS listener's connections need.
pub(crate) struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Which certificate name identifies a client, when client certificates are required.
    identity: Option<CertIdentity>,
}

/// Connections the agent's own listener holds before they prove to be the agent: enough for
/// a reconnect overlapping a stale socket, too few to matter if a local process squats them.
const AGENT_LISTENER_CONNECTIONS: usize = 4;

/// A bound, not yet serving, embedded broker.
pub struct EmbeddedBroker {
    listener: TcpListener,
    /// Loopback, ephemeral port, for the agent's own client only: it never competes with
    /// devices for `broker.max_connections`, so a full broker cannot lock the agent out.
    agent_listener: TcpListener,
    tls: Option<(TcpListener, Arc<TlsAcceptor>)>,
    shared: Arc<Shared>,
    store: Store,
    persist_wake: Arc<Notify>,
}

fn read_file(key: &str, path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{key}: cannot read {}", path.display()))
}

/// The ACL from `broker.acl_file` and/or `broker.acl_own_topics`; `None` when neither is set
/// (every authenticated client may use every topic, as in Mosquitto without an ACL).
fn load_acl(settings: &BrokerSettings) -> anyhow::Result<Option<Acl>> {
    let c = &settings.config;
    let from_file = match &c.acl_file {
        Some(path) => Some(
            Acl::parse(&read_file("broker.acl_file", path)?)
                .with_context(|| format!("broker.acl_file {}", path.display()))?,
        ),
        None => None,
    };
    let own = c.acl_own_topics.then(|| {
        let ingest: Vec<&str> = settings.ingest_topics.iter().map(String::as_str).collect();
        let mut own = Acl::own_topics(&settings.topic_prefix, &ingest);
        if settings.kubeedge_twin {
            own = own.merge(Acl::kubeedge_own_topics());
        }
        match &settings.sparkplug_group {
            Some(group) => own.merge(Acl::sparkplug_own_topics(group)),
            None => own,
        }
    });
    Ok(match (from_file, own) {
        (Some(a), Some(b)) => Some(a.merge(b)),
        (a, b) => a.or(b),
    })
}

impl EmbeddedBroker {
    /// Reads the password and ACL files, restores the persistent sessions recorded in
    /// `store` and binds the listen address.
    ///
    /// # Errors
    /// When a file cannot be read or parsed (the message names the key and line), the
    /// sessions cannot be read, or the address cannot be bound.
    pub async fn bind(
        settings: &BrokerSettings,
        store: Store,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let passwords = match &settings.config.password_file {
            Some(path) => Some(
                PasswordFile::parse(
                    &read_file("broker.password_file", path)?,
                    settings.config.limits.max_password_iterations,
                )
                .map(Arc::new)
                .with_context(|| format!("broker.password_file {}", path.display()))?,
            ),
            None => None,
        };
        let acl = load_acl(settings)?.map(Arc::new);
        let limits = settings.config.limits;
        let mut router = Router::new(&settings.agent_client_id, limits, acl, metrics.clone());
        let persist_wake = Arc::new(Notify::new());
        router.persist_to(persist_wake.clone());
        let sessions = store
            .load_broker_sessions()
            .await
            .context("reading the embedded broker's sessions")?;
        let now = conn::unix_now();
        if settings
            .config
            .has_authentication(settings.credentials.is_some())
            || settings.config.requires_client_certs()
        {
            router.require_owners();
        }
        if let Some(file) = &passwords {
            router.reserve_client_ids(file.usernames().map(str::to_owned));
        }
        // Before any listener is bound: from the first byte of a first start, a device's
        // message for the agent waits in the agent's session for its commit.
        router.reserve_agent(&settings.agent_filters, now);
        for stored in &sessions {
            router.restore(stored, now);
        }
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let agent_listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the agent's own loopback listener")?;
        let tls = match &settings.config.tls {
            Some(t) => {
                let acceptor = TlsAcceptor {
                    acceptor: tokio_rustls::TlsAcceptor::from(tls::server_config(t)?),
                    identity: t.client_ca_file.is_some().then_some(t.identity),
                };
                let listener = TcpListener::bind(t.listen)
                    .await
                    .with_context(|| format!("binding broker.tls_listen {}", t.listen))?;
                Some((listener, Arc::new(acceptor)))
            }
            None => None,
        };
        if !sessions.is_empty() {
            info!(
                sessions = sessions.len(),
                "Embedded broker restored persistent sessions"
            );
        }
        let shared = Arc::new(Shared {
            router: Mutex::new(router),
            access: Access {
                agent_client_id: settings.agent_client_id.clone(),
                agent_secret: settings.agent_secret.clone(),
                shared: settings.credentials.clone(),
                passwords,
            },
            limits,
            metrics,
            stop,
            open: Arc::default(),
            pending: PendingSockets::new(limits.max_pending_connections),
            password_checks: Arc::new(tokio::sync::Semaphore::new(limits.max_password_checks)),
        });
        Ok(Self {
            listener,
            agent_listener,
            tls,
            shared,
            store,
            persist_wake,
        })
    }

    /// The bound address (the port, when `listen` asked for port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the agent's own client connects to (loopback, devices' limits do not
    /// apply; only the agent's secret is accepted there).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn agent_addr(&self) -> std::io::Result<SocketAddr> {
        self.agent_listener.local_addr()
    }

    /// The TLS listener's bound address, if there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Accepts connections until the stop token is cancelled; then closes every connection,
    /// writes the last session changes and returns once every task it started has ended.
    pub async fn run(self) {
        let addr = self.listener.local_addr().ok();
        info!(listen = ?addr, tls_listen = ?self.tls_local_addr(), max_connections = self.shared.limits.max_connections, "Embedded MQTT broker listening");
        let stop = self.shared.stop.clone();
        let tasks = TaskTracker::new();
        let writer = tokio::spawn(persist_sessions(
            self.shared.clone(),
            self.store.clone(),
            self.persist_wake.clone(),
        ));
        let housekeeping = tokio::spawn(housekeeping(self.shared.clone()));
        let agent_open = Arc::new(AtomicUsize::new(0));
        let mut accept_errors = RateLimitedWarning::default();
        loop {
            let tls_accept = async {
                match &self.tls {
                    Some((listener, acceptor)) => (listener.accept().await, Some(acceptor)),
                    None => std::future::pending().await,
                }
            };
            let (accepted, via) = tokio::select! {
                _ = stop.cancelled() => break,
                a = self.listener.accept() => (a, Via::Devices),
                a = self.agent_listener.accept() => (a, Via::Agent),
                (a, t) = tls_accept => (a, t.map_or(Via::Devices, |t| Via::Tls(t.clone()))),
            };
            match accepted {
                Ok((stream, peer)) => {
                    let entry = match via {
                        Via::Agent => {
                            if agent_open.load(Ordering::Relaxed) >= AGENT_LISTENER_CONNECTIONS {
                                self.shared.metrics.broker_limit(BrokerLimit::Connections);
                                drop(stream);
                                continue;
                            }
                            Entry::Agent(ConnectionSlot::take(agent_open.clone()))
                        }
                        // Counted among the connections without a CONNECT until it comes:
                        // a half-open socket costs a place there, not a client's.
                        _ => Entry::Device(PendingTicket::take(&self.shared)),
                    };
                    let shared = self.shared.clone();
                    match via {
                        Via::Tls(t) => tasks.spawn(conn::serve_tls(stream, peer, shared, entry, t)),
                        _ => tasks.spawn(conn::serve_tcp(stream, peer, shared, entry)),
                    };
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving existing clients,
                    // and say so once per interval rather than at every retry.
                    self.shared.metrics.broker_limit(BrokerLimit::Accept);
                    accept_errors.warn(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tasks.close();
        tasks.wait().await;
        let _ = housekeeping.await;
        let _ = writer.await;
        // Connections closed after the writer's last pass: their changes (when each session
        // was last seen) are written once more before the store closes.
        let last = self
            .shared
            .router
            .lock()
            .map(|mut r| r.take_pending().0)
            .ok();
        if let Some(deltas) = last
            && !deltas.is_empty()
            && let Err(e) = self.store.save_broker_sessions(deltas).await
        {
            warn!(error = %e, "Could not record the MQTT sessions' last changes at shutdown");
        }
        info!("Embedded MQTT broker stopped");
    }
}

/// Which listener a connection came in on.
enum Via {
    Devices,
    Tls(Arc<TlsAcceptor>),
    Agent,
}

/// Counts an open connection until dropped.
pub(crate) struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }

    /// A slot if fewer than `cap` are taken.
    fn try_take(open: &Arc<AtomicUsize>, cap: usize) -> Option<Self> {
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(open.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A warning logged at most once per [`HOUSEKEEPING_INTERVAL`], with how many were held back.
struct RateLimitedWarning(edgesync_protocol::rate::LogThrottle);

impl Default for RateLimitedWarning {
    fn default() -> Self {
        Self(edgesync_protocol::rate::LogThrottle::new(
            HOUSEKEEPING_INTERVAL,
        ))
    }
}

impl RateLimitedWarning {
    fn warn(&mut self, error: &std::io::Error) {
        if let Some(repeated) = self.0.allow(Instant::now()) {
            warn!(
                error = %error,
                repeated,
                "Embedded broker could not accept connections (out of file descriptors? raise LimitNOFILE, or lower broker.max_connections)"
            );
        }
    }
}

/// Writes persistent-session changes as they come, merged while a write is running (so a
/// flood of SUBSCRIBEs costs memory per session and filter, not per packet). A write the
/// database refuses is put back and tried again.
async fn persist_sessions(shared: Arc<Shared>, store: Store, wake: Arc<Notify>) {
    loop {
        let stopping = tokio::select! {
            _ = shared.stop.cancelled() => true,
            _ = wake.notified() => false,
        };
        let Ok((deltas, written)) = shared.router.lock().map(|mut r| r.take_pending()) else {
            return;
        };
        if !deltas.is_empty() {
            let result = store.save_broker_sessions(deltas.clone()).await;
            let ok = result.is_ok();
            for w in written {
                let _ = w.send(ok);
            }
            if let Err(e) = result {
                warn!(error = %e, sessions = deltas.len(), "Could not record MQTT session changes; retrying");
                if let Ok(mut r) = shared.router.lock() {
                    r.requeue(deltas);
                }
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = shared.stop.cancelled() => {}
                    _ = tokio::time::sleep(PERSIST_RETRY) => {}
                }
                wake.notify_one();
            }
        }
        if stopping {
            return;
        }
    }
}

/// Expires idle persistent sessions and logs refusals, once per interval.
async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok((expired, denials)) = shared
            .router
            .lock()
            .map(|mut r| (r.expire(conn::unix_now()), r.take_denials()))
        else {
            return;
        };
        if expired > 0 {
            info!(
                sessions = expired,
                "Expired persistent MQTT sessions idle beyond broker.session_expiry_secs"
            );
        }
        if denials.count > 0 {
            warn!(
                refused = denials.count,
                last = denials.last.as_deref().unwrap_or(""),
                "Embedded broker refused client actions (ACL or authentication); see edgesync_agent_broker_denied_total"
            );
        }
    }
}
