//! Agent configuration: a TOML file parsed into [`RawConfig`] (unknown keys are errors that
//! name the key), then validated into [`Settings`] with every problem reported at once.
//!
//! Defaults live in the `Default` impls of the raw sections. Units are in key names
//! (`batch_window_ms`, `timeout_secs`); [`Settings`] carries `Duration`s and parsed addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgesync_protocol::Limits;
use edgesync_protocol::limits::validate_device_id;
use edgesync_protocol::secret::Secret;
use serde::Deserialize;

mod broker;
mod ingest;
pub use broker::{
    BrokerConfig, BrokerLimits, CertIdentity, PASSWORD_ITERATIONS_CEILING, RawBroker, TlsListener,
};
pub use ingest::{Format, IngestSettings, RawIngest, SparkplugSettings};

/// `store.min_commit_interval_ms` by default: at 1,000 messages/s it lets about five messages
/// share each fsync, for at most 5 ms more before a device's acknowledgement.
pub const DEFAULT_MIN_COMMIT_INTERVAL_MS: u64 = 5;

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error or unknown/mistyped key (the message names it).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, naming the key and line.
        message: String,
    },
    /// One or more values break a rule.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The config file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// EdgeNode name.
    pub node: String,
    /// Namespace of the EdgeNode and its Devices.
    pub namespace: String,
    /// Directory for the SQLite database.
    pub data_dir: PathBuf,
    /// Broker connection.
    #[serde(default)]
    pub mqtt: RawMqtt,
    /// The embedded broker's access control and limits.
    #[serde(default)]
    pub broker: Option<RawBroker>,
    /// Plain-publisher topic mappings.
    #[serde(default)]
    pub ingest: Vec<RawIngest>,
    /// Controller connection.
    #[serde(default)]
    pub cloud: Option<RawCloud>,
    /// Shadow document limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// Upstream batching and rate limits.
    #[serde(default)]
    pub uplink: RawUplink,
    /// Local database.
    #[serde(default)]
    pub store: RawStore,
    /// Health and metrics endpoint.
    #[serde(default)]
    pub http: RawHttp,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: RawShutdown,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: Option<String>,
    /// Run the built-in broker instead of connecting to one.
    pub embedded: bool,
    /// Listen address of the built-in broker.
    pub listen: Option<String>,
    /// Username for the broker.
    pub username: Option<String>,
    /// Password for the broker (prefer `password_file`).
    pub password: Option<Secret>,
    /// File holding the broker password.
    pub password_file: Option<PathBuf>,
    /// MQTT client id (default `edgesync-agent-<node>`). Must be stable: the broker keeps
    /// the agent's persistent session under it.
    pub client_id: Option<String>,
    /// Shadow topic prefix.
    pub topic_prefix: String,
    /// Keep-alive interval.
    pub keep_alive_secs: u64,
    /// Extra PEM CA file for `mqtts://`.
    pub ca_file: Option<PathBuf>,
}

impl Default for RawMqtt {
    fn default() -> Self {
        Self {
            url: None,
            embedded: false,
            listen: None,
            username: None,
            password: None,
            password_file: None,
            client_id: None,
            topic_prefix: edgesync_protocol::mqtt::DEFAULT_TOPIC_PREFIX.to_owned(),
            keep_alive_secs: 30,
            ca_file: None,
        }
    }
}

/// `[cloud]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCloud {
    /// Controller base URL.
    pub url: String,
    /// File holding the node's bearer token.
    pub token_file: PathBuf,
    /// Per-request timeout.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// PEM file of extra CA certificates to trust for an `https://` controller (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_request_timeout_secs() -> u64 {
    30
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// See [`Limits::max_state_bytes`].
    pub max_state_bytes: usize,
    /// See [`Limits::max_depth`].
    pub max_depth: usize,
    /// See [`Limits::max_key_bytes`].
    pub max_key_bytes: usize,
    /// See [`Limits::max_client_token_bytes`].
    pub max_client_token_bytes: usize,
    /// See [`Limits::max_payload_bytes`].
    pub max_payload_bytes: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_state_bytes: l.max_state_bytes,
            max_depth: l.max_depth,
            max_key_bytes: l.max_key_bytes,
            max_client_token_bytes: l.max_client_token_bytes,
            max_payload_bytes: l.max_payload_bytes,
        }
    }
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUplink {
    /// How long changes gather while a batch is in flight before they go out in another one
    /// (an idle link sends after `linger_ms`).
    pub batch_window_ms: u64,
    /// How long an idle link waits for more changes before sending (0: at once). Raising it
    /// trades freshness for fewer, larger requests on a light load.
    pub linger_ms: u64,
    /// Maximum reports per batch.
    pub batch_max_reports: usize,
    /// Maximum uncompressed batch size.
    pub batch_max_bytes: usize,
    /// Sustained reports per second upstream (0 = unlimited).
    pub reports_per_second: u32,
    /// Sustained uncompressed bytes per second upstream (0 = unlimited).
    pub bytes_per_second: u64,
    /// Minimum time between two reports of the same device (0 = none).
    pub device_min_interval_ms: u64,
    /// Batches in flight at once. A device changed while in flight goes out again in the
    /// next batch (the controller answers the older report as superseded), so under load a
    /// change waits for one write of its device; that takes enough batches in flight to
    /// cover a write cycle of the API server at one batch per window.
    pub max_in_flight: usize,
    /// First retry delay.
    pub retry_initial_ms: u64,
    /// Cap on the retry delay.
    pub retry_max_ms: u64,
    /// An empty batch is sent as a heartbeat when nothing else was sent for this long.
    pub heartbeat_secs: u64,
    /// Compress request bodies with gzip (those over 1 KiB).
    pub gzip: bool,
    /// Ask for live answers: a batch is answered once the controller holds its reports in
    /// its live state, not once they are written to Kubernetes, so the uplink is never held
    /// back by the API server's write rate. Each report stays in the outbox until a later
    /// answer says a version covering it is durable.
    pub live_answers: bool,
    /// A report answered live with no durable version after this long goes out again (the
    /// write failed, or the answer telling it was lost).
    pub durable_timeout_secs: u64,
    /// While reports await a durable version, an empty batch asks for them after this long
    /// without other batches.
    pub durable_poll_ms: u64,
    /// Under load (the last batch carried 3 reports or more), a batch starts no sooner than
    /// this after the previous one, so changes share a request (live answers come back in
    /// milliseconds); a light link sends each change at once.
    pub min_batch_interval_ms: u64,
}

impl Default for RawUplink {
    fn default() -> Self {
        Self {
            batch_window_ms: 200,
            linger_ms: 0,
            batch_max_reports: 500,
            batch_max_bytes: 1024 * 1024,
            reports_per_second: 2000,
            bytes_per_second: 0,
            device_min_interval_ms: 0,
            max_in_flight: 16,
            retry_initial_ms: 200,
            retry_max_ms: 30_000,
            heartbeat_secs: 10,
            gzip: true,
            live_answers: true,
            durable_timeout_secs: 120,
            durable_poll_ms: 1000,
            min_batch_interval_ms: 20,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `power-loss-safe` (fsync every commit, the default) or `crash-safe` (survives a crash
    /// of the agent but may lose the last commits on power loss).
    pub durability: String,
    /// Most commands applied in one transaction (group commit).
    pub max_commit_batch: usize,
    /// Under load, the least time between two commits, in milliseconds: messages arriving
    /// meanwhile share the next commit (and its fsync). An idle store commits at once.
    pub min_commit_interval_ms: u64,
    /// Most devices the agent keeps shadows for; updates for new devices beyond it are
    /// rejected with 503 so that storage stays bounded.
    pub max_devices: usize,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            durability: "power-loss-safe".to_owned(),
            max_commit_batch: 2048,
            min_commit_interval_ms: DEFAULT_MIN_COMMIT_INTERVAL_MS,
            max_devices: 100_000,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Address for `/healthz` and `/metrics` (empty = disabled).
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// Deadline for a graceful shutdown (final flush and upload attempt).
    pub timeout_secs: u64,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self { timeout_secs: 10 }
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// An external broker.
    External {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
        /// `mqtts://`.
        tls: bool,
    },
    /// The built-in broker, listening here.
    Embedded {
        /// Listen address.
        listen: SocketAddr,
    },
}

/// Validated MQTT settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker location.
    pub broker: Broker,
    /// Credentials.
    pub credentials: Option<(String, Secret)>,
    /// Client id.
    pub client_id: String,
    /// Shadow topic prefix.
    pub topic_prefix: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Extra CA for TLS.
    pub ca_file: Option<PathBuf>,
    /// The embedded broker's access control and limits (used with [`Broker::Embedded`]).
    pub embedded: BrokerConfig,
}

/// Validated cloud settings.
#[derive(Debug, Clone)]
pub struct CloudSettings {
    /// Controller base URL, without trailing slash.
    pub url: String,
    /// Bearer token (never logged).
    pub token: Secret,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Extra trusted CA certificates (PEM), from `cloud.ca_file`.
    pub ca_pem: Option<Vec<u8>>,
}

/// Validated uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// Gathering window while a batch is in flight.
    pub batch_window: Duration,
    /// Wait before sending on an idle link.
    pub linger: Duration,
    /// Reports per batch.
    pub batch_max_reports: usize,
    /// Bytes per batch.
    pub batch_max_bytes: usize,
    /// Reports per second (None = unlimited).
    pub reports_per_second: Option<u32>,
    /// Bytes per second (None = unlimited).
    pub bytes_per_second: Option<u64>,
    /// Per-device minimum interval.
    pub device_min_interval: Duration,
    /// Concurrent batches.
    pub max_in_flight: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Retry delay cap.
    pub retry_max: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// gzip request bodies.
    pub gzip: bool,
    /// Ask for live answers.
    pub live_answers: bool,
    /// A live-answered report with no durable version after this long goes out again.
    pub durable_timeout: Duration,
    /// Interval of empty batches asking for durable versions while reports await them.
    pub durable_poll: Duration,
    /// Shortest time between two batch starts.
    pub min_batch_interval: Duration,
}

/// SQLite durability level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before an MQTT ack.
    PowerLossSafe,
    /// `synchronous=NORMAL` in WAL mode: survives an agent crash, not a power cut.
    CrashSafe,
}

/// Validated store settings.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Database file.
    pub path: PathBuf,
    /// Durability level.
    pub durability: Durability,
    /// Group commit size.
    pub max_commit_batch: usize,
    /// Least time between commits under load.
    pub min_commit_interval: Duration,
    /// Device cap.
    pub max_devices: usize,
}

/// The validated, immutable agent configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// EdgeNode name.
    pub node: String,
    /// Namespace.
    pub namespace: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// MQTT.
    pub mqtt: MqttSettings,
    /// Ingest mappings (JSON topics and Sparkplug B).
    pub ingest: IngestSettings,
    /// Controller (None = local only, nothing is reported).
    pub cloud: Option<CloudSettings>,
    /// Shadow limits.
    pub limits: Limits,
    /// Uplink.
    pub uplink: UplinkSettings,
    /// Store.
    pub store: StoreSettings,
    /// Metrics/health address.
    pub http_listen: Option<SocketAddr>,
    /// Shutdown deadline.
    pub shutdown_timeout: Duration,
}

impl Settings {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key and rule.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::try_from(raw)
    }

    /// Parses and validates config text (what [`Settings::load`] does after reading the file).
    ///
    /// # Errors
    /// [`ConfigError`] naming the key and rule.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        Self::try_from(raw)
    }

    /// Only what read-only commands need (the database path), without reading secrets.
    ///
    /// # Errors
    /// [`ConfigError`] when the file is unreadable or malformed.
    pub fn load_store_only(path: &Path) -> Result<PathBuf, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(raw.data_dir.join(DB_FILE))
    }
}

/// File name of the database inside `data_dir`.
pub const DB_FILE: &str = "edgesync-agent.db";

impl TryFrom<RawConfig> for Settings {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let mut errs = Vec::new();
        if let Err(e) = validate_device_id(&raw.node) {
            errs.push(format!("node: {e} (must be the EdgeNode's object name)"));
        }
        if let Err(e) = validate_device_id(&raw.namespace) {
            errs.push(format!("namespace: {e}"));
        }
        if raw.data_dir.as_os_str().is_empty() {
            errs.push("data_dir must not be empty".to_owned());
        }

        let mqtt = mqtt_settings(&raw, &mut errs);
        let ingest = ingest::ingest_settings(&raw.ingest, &mut errs);
        let cloud = raw
            .cloud
            .as_ref()
            .and_then(|c| cloud_settings(c, &mut errs));

        let l = &raw.limits;
        for (key, v) in [
            ("limits.max_state_bytes", l.max_state_bytes),
            ("limits.max_depth", l.max_depth),
            ("limits.max_key_bytes", l.max_key_bytes),
            ("limits.max_client_token_bytes", l.max_client_token_bytes),
            ("limits.max_payload_bytes", l.max_payload_bytes),
        ] {
            if v == 0 {
                errs.push(format!("{key} must be > 0 (got 0)"));
            }
        }
        let limits = Limits {
            max_state_bytes: l.max_state_bytes,
            max_depth: l.max_depth,
            max_key_bytes: l.max_key_bytes,
            max_client_token_bytes: l.max_client_token_bytes,
            max_payload_bytes: l.max_payload_bytes,
        };

        let u = &raw.uplink;
        for (key, v) in [
            ("uplink.batch_max_reports", u.batch_max_reports as u64),
            ("uplink.batch_max_bytes", u.batch_max_bytes as u64),
            ("uplink.max_in_flight", u.max_in_flight as u64),
            ("uplink.retry_initial_ms", u.retry_initial_ms),
            ("uplink.heartbeat_secs", u.heartbeat_secs),
            ("uplink.durable_timeout_secs", u.durable_timeout_secs),
            ("uplink.durable_poll_ms", u.durable_poll_ms),
        ] {
            if v == 0 {
                errs.push(format!("{key} must be > 0 (got 0)"));
            }
        }
        if u.retry_max_ms < u.retry_initial_ms {
            errs.push(format!(
                "uplink.retry_max_ms must be >= uplink.retry_initial_ms (got {} < {})",
                u.retry_max_ms, u.retry_initial_ms
            ));
        }
        if u.batch_max_bytes < limits.max_state_bytes * 2 {
            errs.push(format!(
                "uplink.batch_max_bytes must hold at least one full report, >= 2 * limits.max_state_bytes (got {} < {})",
                u.batch_max_bytes,
                limits.max_state_bytes * 2
            ));
        }
        let uplink = UplinkSettings {
            batch_window: Duration::from_millis(u.batch_window_ms),
            linger: Duration::from_millis(u.linger_ms),
            batch_max_reports: u.batch_max_reports,
            batch_max_bytes: u.batch_max_bytes,
            reports_per_second: (u.reports_per_second > 0).then_some(u.reports_per_second),
            bytes_per_second: (u.bytes_per_second > 0).then_some(u.bytes_per_second),
            device_min_interval: Duration::from_millis(u.device_min_interval_ms),
            max_in_flight: u.max_in_flight,
            retry_initial: Duration::from_millis(u.retry_initial_ms),
            retry_max: Duration::from_millis(u.retry_max_ms),
            heartbeat: Duration::from_secs(u.heartbeat_secs),
            gzip: u.gzip,
            live_answers: u.live_answers,
            durable_timeout: Duration::from_secs(u.durable_timeout_secs),
            durable_poll: Duration::from_millis(u.durable_poll_ms),
            min_batch_interval: Duration::from_millis(u.min_batch_interval_ms),
        };

        let durability = match raw.store.durability.as_str() {
            "power-loss-safe" => Durability::PowerLossSafe,
            "crash-safe" => Durability::CrashSafe,
            other => {
                errs.push(format!(
                    "store.durability must be \"power-loss-safe\" or \"crash-safe\" (got \"{other}\")"
                ));
                Durability::PowerLossSafe
            }
        };
        if raw.store.min_commit_interval_ms > 1000 {
            errs.push(format!(
                "store.min_commit_interval_ms must be at most 1000 (got {}): devices wait that long for their acknowledgements",
                raw.store.min_commit_interval_ms
            ));
        }
        if raw.store.max_commit_batch == 0 {
            errs.push("store.max_commit_batch must be > 0 (got 0)".to_owned());
        }
        if raw.store.max_devices == 0 {
            errs.push("store.max_devices must be > 0 (got 0)".to_owned());
        }
        let store = StoreSettings {
            path: raw.data_dir.join(DB_FILE),
            durability,
            max_commit_batch: raw.store.max_commit_batch,
            min_commit_interval: Duration::from_millis(raw.store.min_commit_interval_ms),
            max_devices: raw.store.max_devices,
        };

        let http_listen = if raw.http.listen.is_empty() {
            None
        } else {
            match raw.http.listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errs.push(format!(
                        "http.listen must be an address like 127.0.0.1:9464, or empty to disable (got \"{}\")",
                        raw.http.listen
                    ));
                    None
                }
            }
        };

        match (errs.is_empty(), mqtt) {
            (true, Some(mqtt)) => Ok(Settings {
                node: raw.node,
                namespace: raw.namespace,
                data_dir: raw.data_dir,
                mqtt,
                ingest,
                cloud,
                limits,
                uplink,
                store,
                http_listen,
                shutdown_timeout: Duration::from_secs(raw.shutdown.timeout_secs),
            }),
            _ => Err(ConfigError::Invalid(errs)),
        }
    }
}

fn mqtt_settings(raw: &RawConfig, errs: &mut Vec<String>) -> Option<MqttSettings> {
    let m = &raw.mqtt;
    let broker = match (&m.url, m.embedded) {
        (Some(_), true) => {
            errs.push("mqtt.url and mqtt.embedded = true are mutually exclusive".to_owned());
            None
        }
        (None, false) => {
            errs.push(
                "mqtt.url is required (e.g. \"mqtt://127.0.0.1:1883\"), or set mqtt.embedded = true"
                    .to_owned(),
            );
            None
        }
        (Some(url), false) => match parse_mqtt_url(url) {
            Ok((host, port, tls)) => Some(Broker::External { host, port, tls }),
            Err(e) => {
                errs.push(format!("mqtt.url: {e} (got \"{url}\")"));
                None
            }
        },
        (None, true) => {
            let listen = m.listen.as_deref().unwrap_or("127.0.0.1:1883");
            match listen.parse::<SocketAddr>() {
                Ok(listen) => Some(Broker::Embedded { listen }),
                Err(_) => {
                    errs.push(format!(
                        "mqtt.listen must be an address like 127.0.0.1:1883 (got \"{listen}\")"
                    ));
                    None
                }
            }
        }
    };
    if m.listen.is_some() && !m.embedded {
        errs.push("mqtt.listen only applies with mqtt.embedded = true".to_owned());
    }
    let password = match (&m.password, &m.password_file) {
        (Some(_), Some(_)) => {
            errs.push("set mqtt.password or mqtt.password_file, not both".to_owned());
            None
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(p) => Some(Secret::new(p.trim_end())),
            Err(e) => {
                errs.push(format!(
                    "mqtt.password_file: cannot read {}: {e}",
                    f.display()
                ));
                None
            }
        },
        (None, None) => None,
    };
    let credentials = match (&m.username, password) {
        (Some(u), p) => Some((u.clone(), p.unwrap_or_default())),
        (None, Some(_)) => {
            errs.push("mqtt.password needs mqtt.username".to_owned());
            None
        }
        (None, None) => None,
    };
    if m.topic_prefix.is_empty()
        || m.topic_prefix.contains(['+', '#'])
        || m.topic_prefix.ends_with('/')
    {
        errs.push(format!(
            "mqtt.topic_prefix must be non-empty, without '+', '#' or a trailing '/' (got \"{}\")",
            m.topic_prefix
        ));
    }
    if m.keep_alive_secs < 5 {
        errs.push(format!(
            "mqtt.keep_alive_secs must be >= 5 (got {})",
            m.keep_alive_secs
        ));
    }
    if raw.broker.is_some() && !m.embedded {
        errs.push("[broker] only applies with mqtt.embedded = true".to_owned());
    }
    // Oversized payloads get a `rejected` reply from the agent, which needs them to reach
    // it; beyond this, the connection is closed.
    let default_packet = (raw.limits.max_payload_bytes * 4 + 64 * 1024).max(1 << 20);
    let embedded = BrokerConfig::validate(
        &raw.broker.clone().unwrap_or_default(),
        default_packet,
        errs,
    );
    if let Some(Broker::Embedded { listen }) = &broker
        && !listen.ip().is_loopback()
        && !embedded.allow_anonymous
        && !embedded.has_authentication(credentials.is_some())
    {
        // As Mosquitto 2.0: a network listener without authentication is an open door.
        errs.push(format!(
            "mqtt.listen {listen} is beyond loopback and no authentication is set: set broker.password_file (or mqtt.username/password), or broker.allow_anonymous = true to accept anyone on the network"
        ));
    }
    if let Some(tls) = &embedded.tls
        && !tls.listen.ip().is_loopback()
        && !embedded.allow_anonymous
        && !embedded.requires_client_certs()
        && !embedded.has_authentication(credentials.is_some())
    {
        errs.push(format!(
            "broker.tls_listen {} is beyond loopback and no authentication is set: set broker.tls_client_ca_file or broker.password_file (or mqtt.username/password), or broker.allow_anonymous = true to accept anyone on the network",
            tls.listen
        ));
    }
    if embedded.acl_own_topics
        && embedded.password_file.is_none()
        && !embedded.requires_client_certs()
    {
        errs.push(
            "broker.acl_own_topics needs device identities: set broker.password_file or broker.tls_client_ca_file".to_owned(),
        );
    }
    Some(MqttSettings {
        embedded,
        broker: broker?,
        credentials,
        client_id: m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgesync-agent-{}", raw.node)),
        topic_prefix: m.topic_prefix.clone(),
        keep_alive: Duration::from_secs(m.keep_alive_secs),
        ca_file: m.ca_file.clone(),
    })
}

fn parse_mqtt_url(url: &str) -> Result<(String, u16, bool), &'static str> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err("must start with mqtt:// or mqtts://");
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| "port must be a number 1-65535")?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err("must be mqtt://host:port");
    }
    Ok((host.trim_matches(['[', ']']).to_owned(), port, tls))
}

fn cloud_settings(c: &RawCloud, errs: &mut Vec<String>) -> Option<CloudSettings> {
    if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
        errs.push(format!(
            "cloud.url must start with http:// or https:// (got \"{}\")",
            c.url
        ));
    }
    if c.request_timeout_secs == 0 {
        errs.push("cloud.request_timeout_secs must be > 0 (got 0)".to_owned());
    }
    let token = match std::fs::read_to_string(&c.token_file) {
        Ok(t) if !t.trim().is_empty() => Secret::new(t.trim()),
        Ok(_) => {
            errs.push(format!(
                "cloud.token_file {} is empty",
                c.token_file.display()
            ));
            return None;
        }
        Err(e) => {
            errs.push(format!(
                "cloud.token_file: cannot read {}: {e}",
                c.token_file.display()
            ));
            return None;
        }
    };
    let ca_pem = match &c.ca_file {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => Some(pem),
                _ => {
                    errs.push(format!(
                        "cloud.ca_file {} holds no PEM certificate",
                        path.display()
                    ));
                    return None;
                }
            },
            Err(e) => {
                errs.push(format!(
                    "cloud.ca_file: cannot read {}: {e}",
                    path.display()
                ));
                return None;
            }
        },
    };
    Some(CloudSettings {
        ca_pem,
        url: c.url.trim_end_matches('/').to_owned(),
        token,
        request_timeout: Duration::from_secs(c.request_timeout_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test.toml".into(),
            message: e.to_string(),
        })?;
        Settings::try_from(raw)
    }

    const MINIMAL: &str = "node = \"edge-1\"\nnamespace = \"plant-a\"\ndata_dir = \"/tmp/x\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(
            s.mqtt.broker,
            Broker::External {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(s.mqtt.client_id, "edgesync-agent-edge-1");
        assert_eq!(s.store.durability, Durability::PowerLossSafe);
        assert_eq!(s.limits, Limits::default());
        assert_eq!(s.uplink.batch_window, Duration::from_millis(200));
        assert!(s.cloud.is_none());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "cloud-t0ken\n").unwrap();
        let text = format!(
            "node = \"edge-1\"\nnamespace = \"plant-a\"\ndata_dir = \"/tmp/x\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nusername = \"agent\"\npassword = \"hunter2\"\n[cloud]\nurl = \"http://c:8080\"\ntoken_file = \"{}\"\n",
            token.display()
        );
        let raw: RawConfig = toml::from_str(&text).unwrap();
        assert!(!format!("{raw:?}").contains("hunter2"));
        let s = Settings::try_from(raw).unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("cloud-t0ken"),
            "{shown}"
        );
        assert_eq!(s.cloud.unwrap().token.expose(), "cloud-t0ken");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(&format!("{MINIMAL}[uplink]\nbatch_windw_ms = 5\n")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("batch_windw_ms"), "{msg}");
    }

    #[test]
    fn all_invalid_values_are_reported_at_once() {
        let text = "node = \"Edge_1\"\nnamespace = \"plant-a\"\ndata_dir = \"/tmp/x\"\n\
                    [mqtt]\nurl = \"tcp://x\"\n[uplink]\nbatch_max_reports = 0\n\
                    [store]\ndurability = \"yolo\"\n[[ingest]]\ntopic = \"factory/state\"\n";
        let msg = parse(text).unwrap_err().to_string();
        for want in [
            "node: invalid device id 'Edge_1'",
            "mqtt.url: must start with mqtt:// or mqtts:// (got \"tcp://x\")",
            "uplink.batch_max_reports must be > 0 (got 0)",
            "store.durability must be \"power-loss-safe\" or \"crash-safe\" (got \"yolo\")",
            "ingest[0].topic",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }
    }

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            parse_mqtt_url("mqtts://broker.local"),
            Ok(("broker.local".into(), 8883, true))
        );
        assert_eq!(
            parse_mqtt_url("mqtt://[::1]:1884"),
            Ok(("::1".into(), 1884, false))
        );
        assert!(parse_mqtt_url("mqtt://host:99999").is_err());
        assert!(parse_mqtt_url("http://host").is_err());
    }

    #[test]
    fn embedded_broker_defaults_to_loopback() {
        let text = "node = \"edge-1\"\nnamespace = \"a\"\ndata_dir = \"/tmp/x\"\n[mqtt]\nembedded = true\n";
        let s = parse(text).unwrap();
        assert_eq!(
            s.mqtt.broker,
            Broker::Embedded {
                listen: "127.0.0.1:1883".parse().unwrap()
            }
        );
    }

    #[test]
    fn an_anonymous_listener_beyond_loopback_is_refused_unless_asked_for() {
        let base = "node = \"edge-1\"\nnamespace = \"a\"\ndata_dir = \"/tmp/x\"\n[mqtt]\nembedded = true\nlisten = \"0.0.0.0:1883\"\n";
        let err = parse(base).unwrap_err().to_string();
        assert!(err.contains("beyond loopback"), "{err}");
        assert!(parse(&format!("{base}[broker]\nallow_anonymous = true\n")).is_ok());
        assert!(parse(&format!("{base}username = \"u\"\npassword = \"p\"\n")).is_ok());
        let err = parse(&format!(
            "{base}[broker]\nmax_connections = 0\nmax_topic_levels = 999\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("broker.max_connections must be > 0"), "{err}");
        assert!(
            err.contains("broker.max_topic_levels must be <= 256"),
            "{err}"
        );
    }
}
