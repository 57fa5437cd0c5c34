//! The agent's SQLite store: device shadows, the durable outbox, and node metadata.
//!
//! One dedicated thread owns the read-write connection; async callers send [`Command`]s over a
//! bounded channel and get replies on oneshots. The thread applies every command waiting in
//! the channel in one transaction and replies only after `COMMIT` returns (group commit): with
//! `synchronous=FULL` that is after fsync, so a reply means "durable across power loss", and
//! the fsync cost is shared by all commands of the group. Latency is bounded without timers:
//! a group is whatever queued up while the previous commit was running.
//!
//! The outbox holds at most one row per device (its latest unacknowledged version), so an
//! outage of any length costs storage proportional to the number of devices. A row is deleted
//! only by an acknowledgement covering its version or a newer one.
//!
//! Invariant: the in-memory shadow cache equals the `shadows` table after every commit; a
//! failed commit reloads the cache from disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use edgesync_protocol::Limits;
use edgesync_protocol::shadow::{
    Applied, EpochSeconds, ShadowDocument, ShadowError, UpdateRequest,
};
use edgesync_protocol::wire::Report;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Durability, StoreSettings};

mod broker_sessions;
mod health;
pub use broker_sessions::{SessionDelta, StoredSession};
pub use health::StoreHealth;

/// Commands waiting for the writer thread. Large enough to form big commit groups under
/// load; small enough that a stalled disk pushes back on MQTT intake within milliseconds.
const COMMAND_CHANNEL_CAPACITY: usize = 4096;

const SCHEMA_VERSION: i64 = 4;
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE shadows (
        device TEXT PRIMARY KEY NOT NULL,
        version INTEGER NOT NULL,
        doc TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        device TEXT PRIMARY KEY NOT NULL,
        version INTEGER NOT NULL,
        enqueued_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX outbox_by_age ON outbox (enqueued_at_ms);
    CREATE TABLE meta (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) WITHOUT ROWID;",
    // v2: the embedded broker's persistent sessions (client id and subscriptions), so a
    // device reconnecting after an agent restart is told its session is present and sends
    // its unacknowledged messages again instead of discarding them.
    "CREATE TABLE broker_sessions (
        client_id TEXT PRIMARY KEY NOT NULL,
        filters TEXT NOT NULL
    ) WITHOUT ROWID;",
    // v3: one row per subscription, and when each session was last connected.
    broker_sessions::MIGRATION_V3,
    // v4: the username owning each session.
    broker_sessions::MIGRATION_V4,
];

const UPSERT_SHADOW: &str = "INSERT INTO shadows (device, version, doc) VALUES (?1, ?2, ?3)
     ON CONFLICT (device) DO UPDATE SET version = excluded.version, doc = excluded.doc";
// Keeps the first enqueue time while a device stays pending, so the oldest pending age
// measures how long the uplink has been behind, not how recently the device changed.
const UPSERT_OUTBOX: &str =
    "INSERT INTO outbox (device, version, enqueued_at_ms) VALUES (?1, ?2, ?3)
     ON CONFLICT (device) DO UPDATE SET version = excluded.version";
const DELETE_ACKED: &str = "DELETE FROM outbox WHERE device = ?1 AND version <= ?2";
// A device changed again while its report was in flight: its oldest unacknowledged change
// is newer than the moment the batch was read, so its age restarts there (overstated by at
// most one round trip) instead of at its first change ever.
const RESTART_PENDING_AGE: &str =
    "UPDATE outbox SET enqueued_at_ms = max(enqueued_at_ms, ?3) WHERE device = ?1 AND version > ?2";
/// Batches whose read time is remembered for the age restart (older ones fall back to the
/// ack time).
const MAX_BATCHES_TIMED: usize = 256;
const SELECT_PENDING: &str = "SELECT device, version FROM outbox ORDER BY enqueued_at_ms, device";
const SET_META: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const GET_META: &str = "SELECT value FROM meta WHERE key = ?1";
const OUTBOX_STATS: &str = "SELECT count(*), min(enqueued_at_ms) FROM outbox";

const META_SEQ: &str = "seq";
const META_ACKED_SEQ: &str = "acked_seq";
/// Written by [`Store::probe`]: when the database last accepted a write after a failure.
const META_PROBE: &str = "last_write_probe_ms";
/// Metadata key of the desired-stream resume cursor.
pub const META_DESIRED_CURSOR: &str = "desired_cursor";

/// Store failures. All of them mean "not committed": callers must not ack or drop anything.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// WAL or the configured `synchronous` level could not be set.
    #[error(
        "{path}: SQLite runs with journal_mode={journal} and synchronous={synchronous}, not WAL with the level store.durability asks for; put data_dir on a local filesystem that supports WAL"
    )]
    Pragmas {
        /// Database file.
        path: PathBuf,
        /// The journal mode in effect.
        journal: String,
        /// The synchronous level in effect.
        synchronous: i64,
    },
    /// SQLite failed.
    #[error("database error on {path}: {source}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored document could not be decoded.
    #[error("corrupt shadow document for device {device}: {source}")]
    Corrupt {
        /// Device id.
        device: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The database was created by a newer agent.
    #[error(
        "database {path} has schema version {found}, newer than this agent's {supported}; upgrade the agent"
    )]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version found.
        found: i64,
        /// Version supported.
        supported: i64,
    },
    /// The transaction holding this command failed and was rolled back.
    #[error("not committed: {0}")]
    NotCommitted(String),
    /// The writer thread could not be started.
    #[error("cannot start the store thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The writer thread has stopped.
    #[error("the store is closed")]
    Closed,
}

/// Result of a device's shadow update.
// Moved exactly once, through a oneshot; boxing would add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum UpdateOutcome {
    /// Accepted and durable.
    Accepted {
        /// What changed (`previous` only when a full reply was asked for).
        applied: Applied,
        /// The document after the update: when a full reply was asked for, or when the
        /// device has desired state (a delta may be due). Copying every document for every
        /// plain state message was the largest cost on the ingest path.
        current: Option<ShadowDocument>,
    },
    /// Refused; nothing was stored.
    Rejected(ShadowError),
    /// Refused because the device cap is reached; nothing was stored.
    DeviceLimit,
}

/// Result of setting a device's desired state from the cloud.
#[derive(Debug, Clone)]
pub struct DesiredOutcome {
    /// Whether the desired document changed.
    pub changed: bool,
    /// The document after the change.
    pub current: ShadowDocument,
}

/// A batch to send upstream.
#[derive(Debug, Clone)]
pub struct PendingBatch {
    /// Persisted, strictly increasing sequence number.
    pub seq: u64,
    /// Latest state of each selected device.
    pub reports: Vec<Report>,
}

/// Outbox statistics for metrics, heartbeats and `edgesync-agent outbox`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStats {
    /// Devices with a pending report.
    pub pending_devices: u64,
    /// Age of the oldest pending report, in seconds.
    pub oldest_pending_age_seconds: u64,
    /// Last `seq` the controller acknowledged.
    pub last_acked_seq: u64,
    /// Last `seq` allocated.
    pub last_seq: u64,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A request to the writer thread.
#[derive(Debug)]
enum Command {
    Update {
        device: String,
        request: UpdateRequest,
        /// The previous and current documents are wanted (shadow topic replies).
        full_reply: bool,
        reply: Reply<UpdateOutcome>,
    },
    SetDesired {
        device: String,
        desired: Map<String, Value>,
        generation: i64,
        reply: Reply<Result<DesiredOutcome, ShadowError>>,
    },
    Get {
        device: String,
        reply: Reply<Option<ShadowDocument>>,
    },
    NextBatch {
        max_reports: usize,
        max_bytes: usize,
        skip: HashSet<String>,
        reply: Reply<Option<PendingBatch>>,
    },
    Ack {
        seq: u64,
        covered: Vec<(String, u64)>,
        reply: Reply<()>,
    },
    Stats {
        reply: Reply<OutboxStats>,
    },
    Probe {
        reply: Reply<()>,
    },
    GetMeta {
        key: &'static str,
        reply: Reply<Option<String>>,
    },
    SetMeta {
        key: &'static str,
        value: String,
        reply: Reply<()>,
    },
    SaveBrokerSessions {
        deltas: Vec<SessionDelta>,
        reply: Reply<()>,
    },
    LoadBrokerSessions {
        reply: Reply<Vec<StoredSession>>,
    },
}

/// Async handle to the store's writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    health: Arc<StoreHealth>,
}

impl Store {
    /// Opens (creating and migrating) the database and starts the writer thread. The thread
    /// stops when every handle is dropped.
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be opened, migrated or loaded.
    pub fn open(
        settings: &StoreSettings,
        limits: Limits,
    ) -> Result<(Store, std::thread::JoinHandle<()>), StoreError> {
        if let Some(dir) = settings.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = open_rw(&settings.path, settings.durability)?;
        let health = Arc::new(StoreHealth::default());
        if let Ok((journal, synchronous)) = effective_pragmas(&conn) {
            health.set_pragmas(journal, synchronous);
        }
        let mut writer = Writer::load(conn, settings, limits, health.clone())?;
        let (tx, rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let handle = std::thread::Builder::new()
            .name("edgesync-store".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::Thread)?;
        Ok((Store { tx, health }, handle))
    }

    /// Whether the store can commit (shared with the writer thread).
    pub fn health(&self) -> Arc<StoreHealth> {
        self.health.clone()
    }

    /// Commits a one-row write, to learn whether the database accepts writes again after
    /// a failure.
    ///
    /// # Errors
    /// [`StoreError`] while it does not.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Probe { reply }).await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a device's reported-state update and returns a receiver for its durable outcome.
    /// Queuing separately from awaiting lets the MQTT path pipeline many updates into one
    /// commit while replying to devices in order.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer has stopped.
    pub async fn submit_update(
        &self,
        device: String,
        request: UpdateRequest,
        full_reply: bool,
    ) -> Result<oneshot::Receiver<Result<UpdateOutcome, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Update {
                device,
                request,
                full_reply,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Applies an update and waits until it is durable.
    ///
    /// # Errors
    /// [`StoreError`] when it could not be committed.
    pub async fn update(
        &self,
        device: String,
        request: UpdateRequest,
    ) -> Result<UpdateOutcome, StoreError> {
        self.submit_update(device, request, true)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Stores the cloud's desired state for a device.
    ///
    /// # Errors
    /// [`StoreError`] when it could not be committed.
    pub async fn set_desired(
        &self,
        device: String,
        desired: Map<String, Value>,
        generation: i64,
    ) -> Result<Result<DesiredOutcome, ShadowError>, StoreError> {
        self.call(|reply| Command::SetDesired {
            device,
            desired,
            generation,
            reply,
        })
        .await
    }

    /// The device's shadow document, if it has one.
    ///
    /// # Errors
    /// [`StoreError::Closed`].
    pub async fn get(&self, device: String) -> Result<Option<ShadowDocument>, StoreError> {
        self.call(|reply| Command::Get { device, reply }).await
    }

    /// Allocates the next batch: up to `max_reports` pending devices (oldest first, skipping
    /// `skip`) with their latest state, within `max_bytes` of reported JSON. `None` when
    /// nothing is pending outside `skip`.
    ///
    /// # Errors
    /// [`StoreError`] when the sequence number could not be persisted.
    pub async fn next_batch(
        &self,
        max_reports: usize,
        max_bytes: usize,
        skip: HashSet<String>,
    ) -> Result<Option<PendingBatch>, StoreError> {
        self.call(|reply| Command::NextBatch {
            max_reports,
            max_bytes,
            skip,
            reply,
        })
        .await
    }

    /// Allocates a sequence number for a batch without reports (heartbeat).
    ///
    /// # Errors
    /// [`StoreError`] when it could not be persisted.
    pub async fn heartbeat_seq(&self) -> Result<u64, StoreError> {
        let batch = self.next_batch(0, 0, HashSet::new()).await?;
        Ok(batch.map_or(0, |b| b.seq))
    }

    /// Records an acknowledgement: each `(device, version)` removes that device's pending row
    /// if its version is not newer.
    ///
    /// # Errors
    /// [`StoreError`] when it could not be committed.
    pub async fn ack(&self, seq: u64, covered: Vec<(String, u64)>) -> Result<(), StoreError> {
        self.call(|reply| Command::Ack {
            seq,
            covered,
            reply,
        })
        .await
    }

    /// Outbox statistics.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn stats(&self) -> Result<OutboxStats, StoreError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Reads a metadata value.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn get_meta(&self, key: &'static str) -> Result<Option<String>, StoreError> {
        self.call(|reply| Command::GetMeta { key, reply }).await
    }

    /// Writes a metadata value durably.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn set_meta(&self, key: &'static str, value: String) -> Result<(), StoreError> {
        self.call(|reply| Command::SetMeta { key, value, reply })
            .await
    }

    /// Applies changes to the embedded broker's persistent sessions, durably, in order.
    ///
    /// # Errors
    /// [`StoreError`]: nothing of `deltas` was written.
    pub async fn save_broker_sessions(&self, deltas: Vec<SessionDelta>) -> Result<(), StoreError> {
        self.call(|reply| Command::SaveBrokerSessions { deltas, reply })
            .await
    }

    /// The embedded broker's persistent sessions with their subscriptions.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn load_broker_sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        self.call(|reply| Command::LoadBrokerSessions { reply })
            .await
    }
}

fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

fn open_rw(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let err = sqlite_err(path);
    let conn = Connection::open(path).map_err(&err)?;
    // WAL lets read-only CLI commands run while the agent writes. FULL syncs the WAL on every
    // commit (durable across power loss); NORMAL syncs only at checkpoints (durable across an
    // agent crash, may lose the last commits on power loss). See docs/design/agent.md.
    let sync = match durability {
        Durability::PowerLossSafe => "FULL",
        Durability::CrashSafe => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;"
    ))
    .map_err(&err)?;
    // Read back: SQLite keeps the old journal mode without an error where WAL is impossible
    // (some network and FUSE filesystems), and the durability promise rests on both.
    let (journal, synchronous) = effective_pragmas(&conn).map_err(&err)?;
    let wanted_sync = match durability {
        Durability::PowerLossSafe => 2,
        Durability::CrashSafe => 1,
    };
    if journal != "wal" || synchronous != wanted_sync {
        return Err(StoreError::Pragmas {
            path: path.to_owned(),
            journal,
            synchronous,
        });
    }
    migrate(&conn, path)?;
    Ok(conn)
}

/// The connection's `journal_mode` and `synchronous` (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA).
fn effective_pragmas(conn: &Connection) -> rusqlite::Result<(String, i64)> {
    let journal: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    Ok((journal.to_ascii_lowercase(), synchronous))
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = sqlite_err(path);
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&err)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {version}; COMMIT;"
        ))
        .map_err(&err)?;
    }
    Ok(())
}

/// Opens the database read-only for CLI commands, safe while the agent runs.
///
/// # Errors
/// [`StoreError`] when the file does not exist or cannot be read.
pub fn open_read_only(path: &Path) -> Result<ReadOnlyStore, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_err(path))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sqlite_err(path))?;
    Ok(ReadOnlyStore {
        conn,
        path: path.to_owned(),
    })
}

/// A read-only view of the database for `shadow get`, `shadow list` and `outbox`.
#[derive(Debug)]
pub struct ReadOnlyStore {
    conn: Connection,
    path: PathBuf,
}

impl ReadOnlyStore {
    /// One device's document.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn get(&self, device: &str) -> Result<Option<ShadowDocument>, StoreError> {
        let doc: Option<String> = self
            .conn
            .query_row("SELECT doc FROM shadows WHERE device = ?1", [device], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sqlite_err(&self.path))?;
        doc.map(|d| decode(device, &d)).transpose()
    }

    /// Every device with its version, sorted by id.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn list(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, version FROM shadows ORDER BY device")
            .map_err(sqlite_err(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(sqlite_err(&self.path))?;
        rows.collect::<Result<_, _>>()
            .map_err(sqlite_err(&self.path))
    }

    /// Outbox statistics and the pending devices (oldest first).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn outbox(&self) -> Result<(OutboxStats, Vec<(String, u64)>), StoreError> {
        let stats = outbox_stats(&self.conn, &self.path)?;
        let mut stmt = self
            .conn
            .prepare(SELECT_PENDING)
            .map_err(sqlite_err(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(sqlite_err(&self.path))?;
        let pending = rows
            .collect::<Result<_, _>>()
            .map_err(sqlite_err(&self.path))?;
        Ok((stats, pending))
    }
}

fn decode(device: &str, doc: &str) -> Result<ShadowDocument, StoreError> {
    serde_json::from_str(doc).map_err(|source| StoreError::Corrupt {
        device: device.to_owned(),
        source,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn now_secs() -> EpochSeconds {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn get_meta_u64(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    let v: Option<String> = conn.query_row(GET_META, [key], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn outbox_stats(conn: &Connection, path: &Path) -> Result<OutboxStats, StoreError> {
    let err = sqlite_err(path);
    let (count, oldest): (i64, Option<i64>) = conn
        .query_row(OUTBOX_STATS, [], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(&err)?;
    let age = oldest.map_or(0, |t| ((now_ms() - t).max(0) / 1000) as u64);
    Ok(OutboxStats {
        pending_devices: count as u64,
        oldest_pending_age_seconds: age,
        last_acked_seq: get_meta_u64(conn, META_ACKED_SEQ).map_err(&err)?,
        last_seq: get_meta_u64(conn, META_SEQ).map_err(&err)?,
    })
}

/// Every stored shadow, decoded.
fn read_shadows(
    conn: &Connection,
    path: &Path,
) -> Result<HashMap<String, ShadowDocument>, StoreError> {
    let err = sqlite_err(path);
    let mut shadows = HashMap::new();
    let mut stmt = conn
        .prepare("SELECT device, doc FROM shadows")
        .map_err(&err)?;
    let mut rows = stmt.query([]).map_err(&err)?;
    while let Some(row) = rows.next().map_err(&err)? {
        let device: String = row.get(0).map_err(&err)?;
        let doc: String = row.get(1).map_err(&err)?;
        let doc = decode(&device, &doc)?;
        shadows.insert(device, doc);
    }
    Ok(shadows)
}

/// Formats epoch seconds as RFC 3339 UTC (`2026-11-28T06:00:00Z`).
pub fn rfc3339(secs: EpochSeconds) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for all dates after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    max_batch: usize,
    max_devices: usize,
    shadows: HashMap<String, ShadowDocument>,
    /// Devices updated in the current group, written once each before the commit: a device
    /// updated many times in one group costs one serialization and two row writes.
    dirty: HashSet<String>,
    seq: u64,
    health: Arc<StoreHealth>,
    /// When each batch in flight was read from the outbox (ms since the epoch), by seq.
    batch_read_ms: std::collections::BTreeMap<u64, i64>,
}

/// A reply to send once the group's transaction has committed.
type Deferred = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, value: T) -> Deferred {
    Box::new(move |commit| {
        let _ = reply.send(match commit {
            Ok(()) => Ok(value),
            Err(e) => Err(StoreError::NotCommitted(e.to_string())),
        });
    })
}

impl Writer {
    fn load(
        conn: Connection,
        settings: &StoreSettings,
        limits: Limits,
        health: Arc<StoreHealth>,
    ) -> Result<Self, StoreError> {
        let path = settings.path.clone();
        let err = sqlite_err(&path);
        let shadows = read_shadows(&conn, &path)?;
        let seq = get_meta_u64(&conn, META_SEQ).map_err(&err)?;
        Ok(Self {
            conn,
            path: settings.path.clone(),
            limits,
            max_batch: settings.max_commit_batch,
            max_devices: settings.max_devices,
            shadows,
            dirty: HashSet::new(),
            seq,
            health,
            batch_read_ms: std::collections::BTreeMap::new(),
        })
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            self.apply_group(&mut group);
        }
        tracing::debug!("store writer stopped");
    }

    fn apply_group(&mut self, group: &mut Vec<Command>) {
        let mut deferred: Vec<Deferred> = Vec::with_capacity(group.len());
        let seq_before = self.seq;
        let result = (|| -> Result<(), StoreError> {
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(sqlite_err(&self.path))?;
            for cmd in group.drain(..) {
                deferred.push(self.apply(cmd)?);
            }
            self.flush_dirty()?;
            self.conn
                .execute_batch("COMMIT")
                .map_err(sqlite_err(&self.path))
        })();
        match &result {
            Ok(()) => self.health.committed(),
            Err(e) => self.health.failed(&e.to_string()),
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "store transaction failed; nothing in it was acknowledged");
            let _ = self.conn.execute_batch("ROLLBACK");
            self.seq = seq_before;
            self.dirty.clear();
            if let Err(reload) = self.reload() {
                tracing::error!(error = %reload, "cannot reload shadows after a failed transaction");
            }
            // Commands not yet applied get dropped replies, which callers see as Closed.
            group.clear();
        }
        let outcome = result.as_ref().map(|_| ());
        for d in deferred {
            d(outcome);
        }
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        self.shadows = read_shadows(&self.conn, &self.path)?;
        self.seq = get_meta_u64(&self.conn, META_SEQ).map_err(sqlite_err(&self.path))?;
        Ok(())
    }

    fn write_shadow(
        &self,
        device: &str,
        doc: &ShadowDocument,
        enqueue: bool,
    ) -> Result<(), StoreError> {
        let err = sqlite_err(&self.path);
        let text = serde_json::to_string(doc).map_err(|source| StoreError::Corrupt {
            device: device.to_owned(),
            source,
        })?;
        self.conn
            .prepare_cached(UPSERT_SHADOW)
            .and_then(|mut s| s.execute(params![device, doc.version as i64, text]))
            .map_err(&err)?;
        if enqueue {
            self.conn
                .prepare_cached(UPSERT_OUTBOX)
                .and_then(|mut s| s.execute(params![device, doc.version as i64, now_ms()]))
                .map_err(&err)?;
        }
        Ok(())
    }

    /// Writes the devices updated since the last flush.
    fn flush_dirty(&mut self) -> Result<(), StoreError> {
        // Taken and put back so the set keeps its capacity from group to group.
        let mut dirty = std::mem::take(&mut self.dirty);
        let result = dirty
            .drain()
            .try_for_each(|device| match self.shadows.get(&device) {
                Some(doc) => self.write_shadow(&device, doc, true),
                None => Ok(()),
            });
        self.dirty = dirty;
        result
    }

    fn apply(&mut self, cmd: Command) -> Result<Deferred, StoreError> {
        if !matches!(cmd, Command::Update { .. } | Command::Get { .. }) {
            // Everything else reads or writes rows: bring them up to date first.
            self.flush_dirty()?;
        }
        let err = sqlite_err(&self.path);
        Ok(match cmd {
            Command::Update {
                device,
                request,
                full_reply,
                reply,
            } => {
                let is_new = !self.shadows.contains_key(&device);
                if is_new && self.shadows.len() >= self.max_devices {
                    return Ok(defer(reply, UpdateOutcome::DeviceLimit));
                }
                // Applied to the cached document in place: apply_reported leaves it untouched
                // on error, and a failed commit reloads the cache from disk, so the cache never
                // holds anything uncommitted. Documents are the hot allocation on this path:
                // they are copied only when a reply needs them.
                if is_new {
                    self.shadows
                        .insert(device.clone(), ShadowDocument::default());
                }
                let Some(doc) = self.shadows.get_mut(&device) else {
                    return Ok(defer(reply, UpdateOutcome::DeviceLimit));
                };
                let result =
                    doc.apply_reported_with(&request, &self.limits, now_secs(), full_reply);
                let outcome = match result {
                    Ok(applied) => {
                        let current =
                            (full_reply || !doc.state.desired.is_empty()).then(|| doc.clone());
                        if applied.changed {
                            self.dirty.insert(device);
                        } else if is_new {
                            self.shadows.remove(&device);
                        }
                        UpdateOutcome::Accepted { applied, current }
                    }
                    Err(e) => {
                        if is_new {
                            self.shadows.remove(&device);
                        }
                        UpdateOutcome::Rejected(e)
                    }
                };
                defer(reply, outcome)
            }
            Command::SetDesired {
                device,
                desired,
                generation,
                reply,
            } => {
                let mut doc = self.shadows.get(&device).cloned().unwrap_or_default();
                let before_version = doc.version;
                let outcome = match doc.set_desired(desired, generation, &self.limits, now_secs()) {
                    Ok(changed) => {
                        // A new generation bumps the version even when the document is
                        // unchanged, so it is reported and the controller learns it was observed.
                        if doc.version != before_version {
                            self.write_shadow(&device, &doc, true)?;
                            self.shadows.insert(device, doc.clone());
                        }
                        Ok(DesiredOutcome {
                            changed,
                            current: doc,
                        })
                    }
                    Err(e) => Err(e),
                };
                defer(reply, outcome)
            }
            Command::Get { device, reply } => defer(reply, self.shadows.get(&device).cloned()),
            Command::NextBatch {
                max_reports,
                max_bytes,
                skip,
                reply,
            } => {
                let mut reports = Vec::new();
                let mut bytes = 0usize;
                if max_reports > 0 {
                    let mut stmt = self.conn.prepare_cached(SELECT_PENDING).map_err(&err)?;
                    let mut rows = stmt.query([]).map_err(&err)?;
                    while let Some(row) = rows.next().map_err(&err)? {
                        let device: String = row.get(0).map_err(&err)?;
                        if skip.contains(&device) {
                            continue;
                        }
                        let Some(doc) = self.shadows.get(&device) else {
                            continue;
                        };
                        let size =
                            edgesync_protocol::shadow::encoded_object_len(&doc.state.reported)
                                + device.len()
                                + 128;
                        if !reports.is_empty() && bytes + size > max_bytes {
                            break;
                        }
                        bytes += size;
                        reports.push(Report {
                            device,
                            version: doc.version,
                            reported: doc.state.reported.clone(),
                            reported_at: rfc3339(doc.timestamp),
                            observed_desired_version: doc.desired_generation,
                        });
                        if reports.len() >= max_reports {
                            break;
                        }
                    }
                }
                if max_reports > 0 && reports.is_empty() {
                    defer(reply, None)
                } else {
                    self.seq += 1;
                    self.conn
                        .prepare_cached(SET_META)
                        .and_then(|mut s| s.execute(params![META_SEQ, self.seq.to_string()]))
                        .map_err(&err)?;
                    self.batch_read_ms.insert(self.seq, now_ms());
                    if self.batch_read_ms.len() > MAX_BATCHES_TIMED {
                        self.batch_read_ms.pop_first();
                    }
                    defer(
                        reply,
                        Some(PendingBatch {
                            seq: self.seq,
                            reports,
                        }),
                    )
                }
            }
            Command::Ack {
                seq,
                covered,
                reply,
            } => {
                let read_ms = self.batch_read_ms.remove(&seq).unwrap_or_else(now_ms);
                {
                    let mut delete = self.conn.prepare_cached(DELETE_ACKED).map_err(&err)?;
                    let mut restart = self
                        .conn
                        .prepare_cached(RESTART_PENDING_AGE)
                        .map_err(&err)?;
                    for (device, version) in &covered {
                        delete
                            .execute(params![device, *version as i64])
                            .map_err(&err)?;
                        restart
                            .execute(params![device, *version as i64, read_ms])
                            .map_err(&err)?;
                    }
                }
                let acked = get_meta_u64(&self.conn, META_ACKED_SEQ).map_err(&err)?;
                if seq > acked {
                    self.conn
                        .prepare_cached(SET_META)
                        .and_then(|mut s| s.execute(params![META_ACKED_SEQ, seq.to_string()]))
                        .map_err(&err)?;
                }
                defer(reply, ())
            }
            Command::Stats { reply } => defer(reply, outbox_stats(&self.conn, &self.path)?),
            Command::Probe { reply } => {
                self.conn
                    .prepare_cached(SET_META)
                    .and_then(|mut s| s.execute(params![META_PROBE, now_ms().to_string()]))
                    .map_err(&err)?;
                defer(reply, ())
            }
            Command::GetMeta { key, reply } => {
                let v: Option<String> = self
                    .conn
                    .query_row(GET_META, [key], |r| r.get(0))
                    .optional()
                    .map_err(&err)?;
                defer(reply, v)
            }
            Command::SetMeta { key, value, reply } => {
                self.conn
                    .prepare_cached(SET_META)
                    .and_then(|mut s| s.execute(params![key, value]))
                    .map_err(&err)?;
                defer(reply, ())
            }
            Command::SaveBrokerSessions { deltas, reply } => {
                broker_sessions::write(&self.conn, &deltas).map_err(&err)?;
                defer(reply, ())
            }
            Command::LoadBrokerSessions { reply } => {
                defer(reply, broker_sessions::load(&self.conn).map_err(&err)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(dir: &Path) -> StoreSettings {
        StoreSettings {
            path: dir.join("t.db"),
            durability: Durability::PowerLossSafe,
            max_commit_batch: 64,
            max_devices: 3,
        }
    }

    fn req(v: Value) -> UpdateRequest {
        UpdateRequest {
            reported: Some(v.as_object().unwrap().clone()),
            client_token: None,
            version: None,
        }
    }

    #[tokio::test]
    async fn a_device_changing_while_its_report_is_in_flight_restarts_its_pending_age() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        store
            .update("busy".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        let batch = store
            .next_batch(10, 1 << 20, HashSet::new())
            .await
            .unwrap()
            .unwrap();
        // Its first change, long ago (as if the link had been busy with it for an hour).
        let side = Connection::open(dir.path().join("t.db")).unwrap();
        side.execute(
            "UPDATE outbox SET enqueued_at_ms = enqueued_at_ms - 3600000",
            [],
        )
        .unwrap();
        drop(side);
        assert!(store.stats().await.unwrap().oldest_pending_age_seconds >= 3600);
        // It changes again before the report is acknowledged.
        store
            .update("busy".into(), req(json!({"n": 2})))
            .await
            .unwrap();
        let covered = batch
            .reports
            .iter()
            .map(|r| (r.device.clone(), r.version))
            .collect();
        store.ack(batch.seq, covered).await.unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!(
            stats.pending_devices, 1,
            "the newer change is still pending"
        );
        assert!(
            stats.oldest_pending_age_seconds < 60,
            "age {} s: it restarts when the batch was read",
            stats.oldest_pending_age_seconds
        );
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_848_182), "2026-11-28T06:43:02Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[tokio::test]
    async fn outbox_coalesces_to_one_row_per_device_and_acks_only_covered_versions() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        for i in 0..50 {
            store
                .update("press-1".into(), req(json!({"n": i})))
                .await
                .unwrap();
        }
        store
            .update("press-2".into(), req(json!({"n": 0})))
            .await
            .unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.pending_devices, 2);

        let batch = store
            .next_batch(10, 1 << 20, HashSet::new())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.seq, 1);
        assert_eq!(batch.reports.len(), 2);
        let p1 = batch
            .reports
            .iter()
            .find(|r| r.device == "press-1")
            .unwrap();
        assert_eq!((p1.version, p1.reported.get("n")), (50, Some(&json!(49))));

        // press-1 changes while the batch is in flight: its ack must not drop the new version.
        store
            .update("press-1".into(), req(json!({"n": 50})))
            .await
            .unwrap();
        store
            .ack(
                batch.seq,
                batch
                    .reports
                    .iter()
                    .map(|r| (r.device.clone(), r.version))
                    .collect(),
            )
            .await
            .unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.pending_devices, stats.last_acked_seq), (1, 1));
        let next = store
            .next_batch(10, 1 << 20, HashSet::new())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.seq, 2);
        assert_eq!(
            (next.reports[0].device.as_str(), next.reports[0].version),
            ("press-1", 51)
        );
    }

    #[tokio::test]
    async fn state_and_seq_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
            store
                .update("a".into(), req(json!({"x": 1})))
                .await
                .unwrap();
            store
                .next_batch(10, 1 << 20, HashSet::new())
                .await
                .unwrap()
                .unwrap();
            drop(store);
            h.join().unwrap();
        }
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let doc = store.get("a".into()).await.unwrap().unwrap();
        assert_eq!(
            (doc.version, doc.state.reported.get("x")),
            (1, Some(&json!(1)))
        );
        // The seq is persisted, so it keeps increasing across restarts.
        assert_eq!(
            store
                .next_batch(10, 1 << 20, HashSet::new())
                .await
                .unwrap()
                .unwrap()
                .seq,
            2
        );
        let ro = open_read_only(&dir.path().join("t.db")).unwrap();
        assert_eq!(ro.list().unwrap(), vec![("a".to_owned(), 1)]);
        assert_eq!(ro.outbox().unwrap().0.pending_devices, 1);
    }

    #[tokio::test]
    async fn rejected_updates_and_device_cap_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let bad = UpdateRequest {
            version: Some(9),
            ..req(json!({"a": 1}))
        };
        assert!(matches!(
            store.update("a".into(), bad).await.unwrap(),
            UpdateOutcome::Rejected(_)
        ));
        assert!(store.get("a".into()).await.unwrap().is_none());
        for d in ["a", "b", "c"] {
            store.update(d.into(), req(json!({"v": 1}))).await.unwrap();
        }
        assert!(matches!(
            store
                .update("d".into(), req(json!({"v": 1})))
                .await
                .unwrap(),
            UpdateOutcome::DeviceLimit
        ));
        assert_eq!(store.stats().await.unwrap().pending_devices, 3);
    }

    #[tokio::test]
    async fn desired_generation_is_reported_even_without_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let set = |generation| {
            let store = store.clone();
            async move {
                let desired = json!({"speed": 5}).as_object().unwrap().clone();
                store
                    .set_desired("a".into(), desired, generation)
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        let pending = || store.next_batch(10, 1 << 20, HashSet::new());

        assert!(set(2).await.changed);
        let b = pending().await.unwrap().unwrap();
        store
            .ack(b.seq, vec![("a".into(), b.reports[0].version)])
            .await
            .unwrap();
        assert!(!set(3).await.changed);
        let b = pending().await.unwrap().unwrap();
        assert_eq!(b.reports[0].observed_desired_version, 3);
    }
}

#[cfg(test)]
mod throughput {
    use super::*;
    use serde_json::json;

    /// Not a benchmark (no assertion on speed); prints the store's pipelined rate so a
    /// regression is visible in test output with `--nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_updates_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings {
            path: dir.path().join("t.db"),
            durability: Durability::PowerLossSafe,
            max_commit_batch: 2048,
            max_devices: 10_000,
        };
        let (store, _h) = Store::open(&settings, Limits::default()).unwrap();
        let n = 5_000;
        let start = std::time::Instant::now();
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let req = UpdateRequest {
                reported: Some(
                    json!({"seq": i, "t": 20.5, "state": "running"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
                client_token: None,
                version: None,
            };
            pending.push_back(
                store
                    .submit_update(format!("dev-{}", i % 1000), req, false)
                    .await
                    .unwrap(),
            );
            if pending.len() > 4096 {
                pending.pop_front().unwrap().await.unwrap().unwrap();
            }
        }
        while let Some(p) = pending.pop_front() {
            p.await.unwrap().unwrap();
        }
        eprintln!(
            "store: {:.0} updates/s",
            f64::from(n) / start.elapsed().as_secs_f64()
        );
        assert_eq!(store.stats().await.unwrap().pending_devices, 1000);
    }
}
