//! `[broker]`: who may use the embedded MQTT broker and how much of the agent any one client
//! can make it hold. Only read with `mqtt.embedded = true`.
//!
//! Every resource a network client can make the broker keep (connections, bytes before and
//! after CONNECT, subscriptions, queued and in-flight bytes, retained bytes, sessions) has a
//! bound here with a safe default; the broker counts each refusal in
//! `edgesync_agent_broker_limit_hits_total{limit=...}`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The most PBKDF2 iterations `broker.max_password_iterations` may allow.
pub const PASSWORD_ITERATIONS_CEILING: u32 = 1_000_000;

/// `[broker]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBroker {
    /// Accept clients without credentials on a listener beyond loopback (as Mosquitto 2.0,
    /// refused by default).
    pub allow_anonymous: bool,
    /// Mosquitto password file (`mosquitto_passwd`): one identity per device.
    pub password_file: Option<PathBuf>,
    /// Mosquitto ACL file (`user`, `topic`, `pattern` lines).
    pub acl_file: Option<PathBuf>,
    /// The one-line default policy: each device (username = device id) writes only its own
    /// shadow and ingest topics and reads only its own replies.
    pub acl_own_topics: bool,
    /// Open client connections (the agent's own not counted).
    pub max_connections: usize,
    /// Time a new connection has to send its CONNECT.
    pub connect_timeout_secs: u64,
    /// Bytes read from a connection before its CONNECT is complete.
    pub max_connect_bytes: usize,
    /// Largest MQTT packet accepted; a larger one closes the connection (0: derived from
    /// `limits.max_payload_bytes`, so an oversized shadow update still gets a 413 reply).
    pub max_packet_bytes: usize,
    /// Longest topic name or filter.
    pub max_topic_bytes: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Subscriptions one client may hold.
    pub max_subscriptions_per_client: usize,
    /// Bytes of one client's QoS1/2 messages waiting for the agent's commit; beyond it the
    /// broker stops reading from that client until the agent catches up.
    pub max_client_inflight_bytes: usize,
    /// Bytes queued and in flight to one client session.
    pub max_session_queue_bytes: usize,
    /// Bytes queued and in flight to all client sessions together, and the bound on all
    /// messages waiting for the agent's commit.
    pub max_queued_bytes: usize,
    /// Bytes waiting to be written to one client that does not read; QoS0 messages to it
    /// are dropped beyond this.
    pub max_write_backlog_bytes: usize,
    /// Bytes of all retained messages together.
    pub max_retained_bytes: usize,
    /// Persistent sessions kept, connected or not (clean sessions are bounded by
    /// `max_connections`).
    pub max_sessions: usize,
    /// A persistent session disconnected for this long is removed (0: never).
    pub session_expiry_secs: u64,
    /// Bytes per second read from one client (averaged over a second); beyond it the broker
    /// reads from that client more slowly, so one flooding client cannot take the CPU from
    /// the others (0: no limit). The agent's own client is exempt.
    pub max_client_bytes_per_sec: u64,
    /// Persistent sessions one authenticated user (password file or certificate) may hold.
    pub max_sessions_per_user: usize,
    /// Connections that have not sent their CONNECT yet; beyond, the oldest is closed.
    pub max_pending_connections: usize,
    /// Highest PBKDF2 iteration count accepted in the password file (every CONNECT pays it).
    pub max_password_iterations: u32,
    /// Password checks running at once (on their own threads); beyond, CONNECTs wait.
    pub max_password_checks: usize,
    /// A second listener speaking MQTT over TLS (e.g. `"0.0.0.0:8883"`); empty: none.
    pub tls_listen: String,
    /// PEM certificate chain the TLS listener presents.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, every TLS client must present a certificate they
    /// signed, and that certificate names the client (see `tls_identity`).
    pub tls_client_ca_file: Option<PathBuf>,
    /// Which name of a client certificate is its username: `"common_name"` (the subject's
    /// CN, as Mosquitto's `use_identity_as_username`) or `"dns_name"` (its first DNS
    /// subject alternative name).
    pub tls_identity: CertIdentity,
}

/// Which name of a client certificate identifies the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentity {
    /// The subject's common name (CN).
    #[default]
    CommonName,
    /// The first DNS name in the subject alternative names.
    DnsName,
}

/// The TLS listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Listen address.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Server private key (PEM).
    pub key_file: PathBuf,
    /// CA for client certificates; `None`: clients need none (they authenticate as on the
    /// plain listener).
    pub client_ca_file: Option<PathBuf>,
    /// Which certificate name is the username.
    pub identity: CertIdentity,
}

impl Default for RawBroker {
    fn default() -> Self {
        let l = BrokerLimits::default();
        Self {
            allow_anonymous: false,
            password_file: None,
            acl_file: None,
            acl_own_topics: false,
            max_connections: l.max_connections,
            connect_timeout_secs: l.connect_timeout.as_secs(),
            max_connect_bytes: l.max_connect_bytes,
            max_packet_bytes: 0,
            max_topic_bytes: l.max_topic_bytes,
            max_topic_levels: l.max_topic_levels,
            max_subscriptions_per_client: l.max_subscriptions,
            max_client_inflight_bytes: l.max_client_inflight_bytes,
            max_session_queue_bytes: l.max_session_queue_bytes,
            max_queued_bytes: l.max_queued_bytes,
            max_write_backlog_bytes: l.max_write_backlog_bytes,
            max_retained_bytes: l.max_retained_bytes,
            max_sessions: l.max_sessions,
            session_expiry_secs: l.session_expiry.as_secs(),
            max_client_bytes_per_sec: l.max_client_bytes_per_sec,
            max_sessions_per_user: l.max_sessions_per_user,
            max_pending_connections: l.max_pending_connections,
            max_password_iterations: l.max_password_iterations,
            max_password_checks: l.max_password_checks,
            tls_listen: String::new(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_identity: CertIdentity::default(),
        }
    }
}

/// The embedded broker's resource limits, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Open client connections.
    pub max_connections: usize,
    /// Deadline for CONNECT.
    pub connect_timeout: Duration,
    /// Bytes buffered before CONNECT.
    pub max_connect_bytes: usize,
    /// Largest packet.
    pub max_packet_bytes: usize,
    /// Longest topic or filter.
    pub max_topic_bytes: usize,
    /// Deepest topic or filter.
    pub max_topic_levels: usize,
    /// Subscriptions per client.
    pub max_subscriptions: usize,
    /// A client's bytes waiting for the agent's commit before reading from it pauses.
    pub max_client_inflight_bytes: usize,
    /// Bytes queued and in flight per session.
    pub max_session_queue_bytes: usize,
    /// Bytes queued and in flight for all sessions; also for all messages awaiting the agent.
    pub max_queued_bytes: usize,
    /// Unwritten bytes per connection before QoS0 messages to it are dropped.
    pub max_write_backlog_bytes: usize,
    /// Bytes of retained messages.
    pub max_retained_bytes: usize,
    /// Sessions kept.
    pub max_sessions: usize,
    /// Expiry of disconnected persistent sessions (zero: never).
    pub session_expiry: Duration,
    /// Read rate per client, bytes per second (zero: unlimited).
    pub max_client_bytes_per_sec: u64,
    /// Persistent sessions per authenticated user (not the shared login).
    pub max_sessions_per_user: usize,
    /// Connections without a CONNECT yet.
    pub max_pending_connections: usize,
    /// Highest PBKDF2 iteration count in the password file.
    pub max_password_iterations: u32,
    /// Concurrent password checks.
    pub max_password_checks: usize,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        Self {
            // Well under the 1,024 open files of a default systemd service, which the agent
            // raises at start; a plant with more device connections per node raises this.
            max_connections: 1000,
            connect_timeout: Duration::from_secs(10),
            // A CONNECT holds a client id, credentials and a will: 64 KiB is generous, and
            // 1,000 half-sent ones cost at most 64 MiB.
            max_connect_bytes: 64 * 1024,
            max_packet_bytes: 1024 * 1024,
            max_topic_bytes: 1024,
            // Mosquitto's own cap is 200; shop-floor topics rarely pass 10.
            max_topic_levels: 32,
            max_subscriptions: 64,
            max_client_inflight_bytes: 1024 * 1024,
            max_session_queue_bytes: 4 * 1024 * 1024,
            max_queued_bytes: 64 * 1024 * 1024,
            max_write_backlog_bytes: 1024 * 1024,
            max_retained_bytes: 16 * 1024 * 1024,
            max_sessions: 10_000,
            // AWS IoT's longest persistent-session expiry.
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            // Four times what one device reporting flat out through the embedded broker
            // sends (about 2 MB/s of QoS1 shadow updates in `make bench`); a line of
            // plain publishers behind one gateway connection may need more.
            max_client_bytes_per_sec: 8 * 1024 * 1024,
            // A gateway may run a few clients under one identity; a device needs one.
            max_sessions_per_user: 16,
            // Enough for a whole line reconnecting at once after a switch reboot; the
            // oldest silent socket makes room, so idle sockets cannot lock devices out.
            max_pending_connections: 256,
            // Mosquitto 2.0's mosquitto_passwd writes 101; ten times that keeps a CONNECT
            // under a millisecond of CPU on a small ARM box. Raise it for files made with
            // more.
            max_password_iterations: 1_000,
            // One: on a two-core box a flood of guesses then takes at most one core, and
            // queues behind it instead of holding the runtime's workers.
            max_password_checks: 1,
        }
    }
}

/// Validated `[broker]`.
#[derive(Debug, Clone, Default)]
pub struct BrokerConfig {
    /// See [`RawBroker::allow_anonymous`].
    pub allow_anonymous: bool,
    /// See [`RawBroker::password_file`].
    pub password_file: Option<PathBuf>,
    /// See [`RawBroker::acl_file`].
    pub acl_file: Option<PathBuf>,
    /// See [`RawBroker::acl_own_topics`].
    pub acl_own_topics: bool,
    /// The TLS listener, if any.
    pub tls: Option<TlsListener>,
    /// Resource limits.
    pub limits: BrokerLimits,
}

impl BrokerConfig {
    /// Validates `raw`; `default_packet` is the packet limit derived from the shadow limits.
    /// Problems are appended to `errs`, each naming its key.
    pub fn validate(raw: &RawBroker, default_packet: usize, errs: &mut Vec<String>) -> Self {
        for (key, v) in [
            ("broker.max_connections", raw.max_connections),
            (
                "broker.connect_timeout_secs",
                raw.connect_timeout_secs as usize,
            ),
            ("broker.max_connect_bytes", raw.max_connect_bytes),
            ("broker.max_topic_bytes", raw.max_topic_bytes),
            ("broker.max_topic_levels", raw.max_topic_levels),
            (
                "broker.max_subscriptions_per_client",
                raw.max_subscriptions_per_client,
            ),
            (
                "broker.max_client_inflight_bytes",
                raw.max_client_inflight_bytes,
            ),
            (
                "broker.max_session_queue_bytes",
                raw.max_session_queue_bytes,
            ),
            ("broker.max_queued_bytes", raw.max_queued_bytes),
            (
                "broker.max_write_backlog_bytes",
                raw.max_write_backlog_bytes,
            ),
            ("broker.max_sessions", raw.max_sessions),
            ("broker.max_sessions_per_user", raw.max_sessions_per_user),
            (
                "broker.max_pending_connections",
                raw.max_pending_connections,
            ),
            ("broker.max_password_checks", raw.max_password_checks),
        ] {
            if v == 0 {
                errs.push(format!("{key} must be > 0 (got 0)"));
            }
        }
        if !(1..=PASSWORD_ITERATIONS_CEILING).contains(&raw.max_password_iterations) {
            errs.push(format!(
                "broker.max_password_iterations must be 1 to {} (got {})",
                PASSWORD_ITERATIONS_CEILING, raw.max_password_iterations
            ));
        }
        // Deep filters are walked recursively; this bound is what keeps the stack safe.
        if raw.max_topic_levels > 256 {
            errs.push(format!(
                "broker.max_topic_levels must be <= 256 (got {})",
                raw.max_topic_levels
            ));
        }
        if raw.max_connect_bytes < 1024 {
            errs.push(format!(
                "broker.max_connect_bytes must be >= 1024 (got {})",
                raw.max_connect_bytes
            ));
        }
        let max_packet_bytes = if raw.max_packet_bytes == 0 {
            default_packet
        } else {
            raw.max_packet_bytes
        };
        if max_packet_bytes < 1024 {
            errs.push(format!(
                "broker.max_packet_bytes must be >= 1024 (got {max_packet_bytes})"
            ));
        }
        if raw.max_session_queue_bytes > raw.max_queued_bytes {
            errs.push(format!(
                "broker.max_session_queue_bytes must be <= broker.max_queued_bytes (got {} > {})",
                raw.max_session_queue_bytes, raw.max_queued_bytes
            ));
        }
        let tls = validate_tls(raw, errs);
        Self {
            tls,
            allow_anonymous: raw.allow_anonymous,
            password_file: raw.password_file.clone(),
            acl_file: raw.acl_file.clone(),
            acl_own_topics: raw.acl_own_topics,
            limits: BrokerLimits {
                max_connections: raw.max_connections,
                connect_timeout: Duration::from_secs(raw.connect_timeout_secs),
                max_connect_bytes: raw.max_connect_bytes,
                max_packet_bytes,
                max_topic_bytes: raw.max_topic_bytes,
                max_topic_levels: raw.max_topic_levels,
                max_subscriptions: raw.max_subscriptions_per_client,
                max_client_inflight_bytes: raw.max_client_inflight_bytes,
                max_session_queue_bytes: raw.max_session_queue_bytes,
                max_queued_bytes: raw.max_queued_bytes,
                max_write_backlog_bytes: raw.max_write_backlog_bytes,
                max_retained_bytes: raw.max_retained_bytes,
                max_sessions: raw.max_sessions,
                session_expiry: Duration::from_secs(raw.session_expiry_secs),
                max_client_bytes_per_sec: raw.max_client_bytes_per_sec,
                max_sessions_per_user: raw.max_sessions_per_user,
                max_pending_connections: raw.max_pending_connections,
                max_password_iterations: raw.max_password_iterations,
                max_password_checks: raw.max_password_checks,
            },
        }
    }

    /// Whether clients must prove who they are with a password (a password file, or the
    /// shared `mqtt.username`/`password`).
    pub fn has_authentication(&self, shared_credentials: bool) -> bool {
        shared_credentials || self.password_file.is_some()
    }

    /// Whether TLS clients must present a certificate signed by `broker.tls_client_ca_file`.
    pub fn requires_client_certs(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some())
    }
}

fn validate_tls(raw: &RawBroker, errs: &mut Vec<String>) -> Option<TlsListener> {
    if raw.tls_listen.is_empty() {
        for (key, set) in [
            ("broker.tls_cert_file", raw.tls_cert_file.is_some()),
            ("broker.tls_key_file", raw.tls_key_file.is_some()),
            (
                "broker.tls_client_ca_file",
                raw.tls_client_ca_file.is_some(),
            ),
        ] {
            if set {
                errs.push(format!(
                    "{key} only applies with broker.tls_listen (e.g. \"0.0.0.0:8883\")"
                ));
            }
        }
        return None;
    }
    let listen = match raw.tls_listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(format!(
                "broker.tls_listen must be an address like 0.0.0.0:8883 (got \"{}\")",
                raw.tls_listen
            ));
            None
        }
    };
    let (Some(cert_file), Some(key_file)) = (&raw.tls_cert_file, &raw.tls_key_file) else {
        errs.push(
            "broker.tls_listen needs broker.tls_cert_file and broker.tls_key_file (PEM)".to_owned(),
        );
        return None;
    };
    Some(TlsListener {
        listen: listen?,
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        client_ca_file: raw.tls_client_ca_file.clone(),
        identity: raw.tls_identity,
    })
}
