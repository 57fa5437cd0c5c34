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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use edgesync_protocol::Limits;
use edgesync_protocol::identity::Dialect;
use edgesync_protocol::shadow::{
    Applied, EpochSeconds, ShadowDocument, ShadowError, UpdateRequest,
};
use edgesync_protocol::wire::Report;
use rusqlite::{Connection, OptionalExtension};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::StoreSettings;

mod broker_sessions;
mod claims;
mod epoch;
mod health;
mod pending;
mod read_only;
mod schema;
mod witness;
mod writer;
pub use broker_sessions::{SessionDelta, StoredSession};
pub use health::StoreHealth;
pub use read_only::{ReadOnlyStore, open_read_only};
use schema::{effective_pragmas, open_rw};
pub use witness::clear_lost_commits;
use writer::Writer;

/// Commands waiting for the writer thread. Large enough to form big commit groups under
/// load; small enough that a stalled disk pushes back on MQTT intake within milliseconds.
const COMMAND_CHANNEL_CAPACITY: usize = 4096;

const SET_META: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const GET_META: &str = "SELECT value FROM meta WHERE key = ?1";

const META_SEQ: &str = "seq";
/// Batch numbers are reserved durably in blocks (the last one reserved is stored here), so
/// that a batch read commits without an fsync yet `seq` never goes back after a power cut: a
/// restart continues above the reservation.
const META_SEQ_RESERVED: &str = "seq_reserved";
const SEQ_BLOCK: u64 = 1000;
const META_ACKED_SEQ: &str = "acked_seq";
/// Written by [`Store::probe`]: when the database last accepted a write after a failure.
const META_PROBE: &str = "last_write_probe_ms";
/// Transactions committed over the database's life (see `witness`).
const META_COMMITS: &str = "commits";
/// Commits found lost at start, summed over every detection until the alarm is cleared.
const META_LOST_COMMITS: &str = "lost_commits";
/// What the last detection found, for the operator.
const META_LOST_COMMITS_DETAIL: &str = "lost_commits_detail";
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
    /// SQLite found the file malformed, or not a database at all (a flash card that lost
    /// pages, a file overwritten by something else).
    #[error(
        "{path} is damaged ({error}): restore it from a backup, or stop the agent and move it aside with its -wal and -shm files to start with a new, empty database (its shadows and unsent reports are then lost; devices fill the new one as they report, and the controller takes its new epoch)"
    )]
    Damaged {
        /// Database file.
        path: PathBuf,
        /// The SQLite error (said in the message; its code adds nothing for the operator).
        error: rusqlite::Error,
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

/// The newest version of each device that batches in flight carry: a batch read leaves a
/// device out unless its state is newer.
pub type InFlight = HashMap<String, u64>;

/// A batch to send upstream.
#[derive(Debug, Clone)]
pub struct PendingBatch {
    /// Persisted, strictly increasing sequence number.
    pub seq: u64,
    /// Latest state of each selected device.
    pub reports: Vec<Report>,
}

impl PendingBatch {
    /// The `seq` of a heartbeat sent while the store cannot commit (no seq can be allocated
    /// without a write). Allocated seqs start at 1; the controller orders nothing by seq.
    pub const HEALTH_ONLY_SEQ: u64 = 0;

    /// A heartbeat without reports or an allocated seq.
    pub fn health_only() -> Self {
        Self {
            seq: Self::HEALTH_ONLY_SEQ,
            reports: Vec::new(),
        }
    }

    /// The `(device, version)` pairs the batch carries: what an acknowledgement covers.
    pub fn covered(&self) -> Vec<(String, u64)> {
        self.reports
            .iter()
            .map(|r| (r.device.clone(), r.version))
            .collect()
    }
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
        /// Who asks: a device of another dialect is not found.
        dialect: Dialect,
        reply: Reply<Option<ShadowDocument>>,
    },
    NextBatch {
        max_reports: usize,
        max_bytes: usize,
        in_flight: Arc<InFlight>,
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

impl Command {
    /// Whether this is a device's message waiting for its commit, the kind a steady stream
    /// of which the writer paces (`store.min_commit_interval_ms`). Everything else (the
    /// uplink's batch reads and acknowledgements, reads, desired state) commits at once, so
    /// pacing never delays a report on its way out.
    fn is_device_update(&self) -> bool {
        matches!(self, Command::Update { .. })
    }

    /// Whether losing this command's effect in a power loss is harmless: reads, and the
    /// controller's acknowledgements (the reports are sent again and answered at once).
    fn may_be_lost(&self) -> bool {
        matches!(
            self,
            Command::Ack { .. }
                | Command::Stats { .. }
                | Command::Get { .. }
                | Command::GetMeta { .. }
                | Command::LoadBrokerSessions { .. }
        )
    }
}

/// Async handle to the store's writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    health: Arc<StoreHealth>,
    epoch: Arc<str>,
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
        let epoch = epoch::load_or_create(&conn, &settings.path)?;
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
        Ok((
            Store {
                tx,
                health,
                epoch: epoch.into(),
            },
            handle,
        ))
    }

    /// The database's epoch, sent with every report batch (see `epoch`).
    pub fn epoch(&self) -> &str {
        &self.epoch
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
        self.submit_get(device, Dialect::Native)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues a read of the device's document and returns a receiver for it. The answer comes
    /// once the group it was read in has committed, so it never shows an uncommitted update;
    /// queuing separately from awaiting keeps a device looping on `shadow/get` from holding
    /// up other devices' updates behind each read's commit.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer has stopped.
    pub async fn submit_get(
        &self,
        device: String,
        dialect: Dialect,
    ) -> Result<oneshot::Receiver<Result<Option<ShadowDocument>, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Get {
                device,
                dialect,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Allocates the next batch: up to `max_reports` pending devices (oldest first, skipping
    /// those whose version is not newer than the one `in_flight` holds for them) with their
    /// latest state, within `max_bytes` of reported JSON. `None` when nothing else is pending.
    ///
    /// # Errors
    /// [`StoreError`] when the sequence number could not be persisted.
    pub async fn next_batch(
        &self,
        max_reports: usize,
        max_bytes: usize,
        in_flight: Arc<InFlight>,
    ) -> Result<Option<PendingBatch>, StoreError> {
        self.call(|reply| Command::NextBatch {
            max_reports,
            max_bytes,
            in_flight,
            reply,
        })
        .await
    }

    /// Allocates a sequence number for a batch without reports (heartbeat).
    ///
    /// # Errors
    /// [`StoreError`] when it could not be persisted.
    pub async fn heartbeat_seq(&self) -> Result<u64, StoreError> {
        let batch = self.next_batch(0, 0, Arc::default()).await?;
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

    /// Queues an acknowledgement like [`Store::ack`] without waiting for its commit.
    ///
    /// An acknowledgement need not be durable (losing it only means the reports are sent
    /// again and answered at once), and commands apply in the order they are queued, so a
    /// batch read queued after it never sees the rows it removes. Not waiting saves the
    /// uplink a round trip to the writer thread per batch, and lets the acknowledgement and
    /// the next batch read share one wake-up of that thread.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the writer has stopped.
    pub async fn queue_ack(&self, seq: u64, covered: Vec<(String, u64)>) -> Result<(), StoreError> {
        let (reply, _unawaited) = oneshot::channel();
        self.tx
            .send(Command::Ack {
                seq,
                covered,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)
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
    move |source| {
        let path = path.to_owned();
        match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                StoreError::Damaged {
                    path,
                    error: source,
                }
            }
            _ => StoreError::Sqlite { path, source },
        }
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
    let v: Option<String> = conn
        .prepare_cached(GET_META)?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Seconds since `enqueued_ms` (ms since the epoch); 0 for none.
fn age_seconds(enqueued_ms: Option<i64>) -> u64 {
    enqueued_ms.map_or(0, |t| ((now_ms() - t).max(0) / 1000) as u64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use serde_json::json;

    fn settings(dir: &Path) -> StoreSettings {
        StoreSettings {
            path: dir.join("t.db"),
            durability: Durability::PowerLossSafe,
            max_commit_batch: 64,
            min_commit_interval: std::time::Duration::ZERO,
            max_devices: 3,
        }
    }

    /// The next batch of up to 10 reports, with nothing in flight; there must be one.
    async fn read_batch(store: &Store) -> PendingBatch {
        store
            .next_batch(10, 1 << 20, Arc::default())
            .await
            .unwrap()
            .expect("a pending batch")
    }

    fn req(v: Value) -> UpdateRequest {
        UpdateRequest {
            reported: Some(v.as_object().unwrap().clone()),
            client_token: None,
            version: None,
            connected: None,
            dialect: Dialect::Native,
        }
    }

    #[tokio::test]
    async fn outbox_figures_follow_commits_and_a_queued_ack_applies_before_the_next_read() {
        let dir = tempfile::tempdir().unwrap();
        let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        assert_eq!(store.health().outbox(), (0, 0));
        for d in ["a", "b"] {
            store.update(d.into(), req(json!({"n": 1}))).await.unwrap();
        }
        assert_eq!(store.health().outbox().0, 2);
        let batch = read_batch(&store).await;
        let covered = batch.covered();
        // Not awaited; the read queued right behind it must not see the rows it removes.
        store.queue_ack(batch.seq, covered).await.unwrap();
        assert!(
            store
                .next_batch(10, 1 << 20, Arc::default())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(store.health().outbox(), (0, 0));
        drop(store);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_device_in_flight_goes_again_only_when_newer_and_after_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        for d in ["a", "b"] {
            store.update(d.into(), req(json!({"n": 1}))).await.unwrap();
        }
        let first = read_batch(&store).await;
        let in_flight: Arc<InFlight> = Arc::new(first.covered().into_iter().collect());
        assert_eq!(in_flight.len(), 2);
        // Nothing newer than what is in flight: nothing to send.
        assert!(
            store
                .next_batch(10, 1 << 20, in_flight.clone())
                .await
                .unwrap()
                .is_none()
        );
        // "a" (the oldest) changes while in flight, then "c" appears: "c" goes first, and with
        // room for one report only, alone.
        store
            .update("a".into(), req(json!({"n": 2})))
            .await
            .unwrap();
        store
            .update("c".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        let devices =
            |b: PendingBatch| -> Vec<String> { b.reports.into_iter().map(|r| r.device).collect() };
        let one = store
            .next_batch(1, 1 << 20, in_flight.clone())
            .await
            .unwrap();
        assert_eq!(devices(one.unwrap()), ["c"]);
        let both = store.next_batch(10, 1 << 20, in_flight).await.unwrap();
        assert_eq!(devices(both.unwrap()), ["c", "a"]);
        drop(store);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_stream_of_updates_is_paced_but_an_idle_store_and_the_uplink_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let interval = std::time::Duration::from_millis(800);
        let s = StoreSettings {
            min_commit_interval: interval,
            ..settings(dir.path())
        };
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        let start = std::time::Instant::now();
        store
            .update("d".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        let first = start.elapsed();
        // Right behind a commit of an update: the next one waits out the interval.
        store
            .update("d".into(), req(json!({"n": 2})))
            .await
            .unwrap();
        let second = start.elapsed();
        // The uplink's batch read, right behind that: at once.
        let batch = store.next_batch(10, 1 << 20, Arc::default()).await.unwrap();
        let read = start.elapsed() - second;
        assert!(first < interval / 2, "idle: committed after {first:?}");
        assert!(second >= interval, "paced: committed after {second:?}");
        assert!(read < interval / 2, "the batch read waited {read:?}");
        assert!(batch.is_some());
        // Many messages at once (clients waiting on their acknowledgements) make a large
        // group; after one, the next commit is not held back.
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..40 {
            let store = store.clone();
            burst.spawn(async move { store.update("d".into(), req(json!({"n": i}))).await });
        }
        while let Some(r) = burst.join_next().await {
            r.unwrap().unwrap();
        }
        let after_burst = std::time::Instant::now();
        store
            .update("d".into(), req(json!({"n": 3})))
            .await
            .unwrap();
        let waited = after_burst.elapsed();
        assert!(
            waited < interval / 2,
            "after a large group, waited {waited:?}"
        );
        drop(store);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_steady_stream_is_paced_at_four_times_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let interval = std::time::Duration::from_millis(100);
        let s = StoreSettings {
            min_commit_interval: interval,
            ..settings(dir.path())
        };
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        // An idle store commits at once; a trickle right behind it is paced at the interval
        // and, five at once, gathers into one group of a steady stream's size.
        store
            .update("d".into(), req(json!({"n": 0})))
            .await
            .unwrap();
        let mut group = tokio::task::JoinSet::new();
        for i in 0..5 {
            let store = store.clone();
            group.spawn(async move { store.update(format!("s{i}"), req(json!({"n": i}))).await });
        }
        while let Some(r) = group.join_next().await {
            r.unwrap().unwrap();
        }
        // After a group of 5 (at least 4, below 32), the next one waits out four intervals
        // from that commit.
        let start = std::time::Instant::now();
        store
            .update("d".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= interval * 3,
            "a steady stream was paced at {waited:?}, not about {:?}",
            interval * 4
        );
        drop(store);
        h.join().unwrap();
    }

    fn synced_commits(store: &Store) -> u64 {
        let mut text = String::new();
        store.health().render(&mut text);
        text.lines()
            .find_map(|l| l.strip_prefix("edgesync_agent_store_synced_commits_total "))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn batch_reads_cost_no_fsync_and_seq_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        let mut last = 0;
        for n in 0..5 {
            store
                .update("a".into(), req(json!({ "n": n })))
                .await
                .unwrap();
            let synced = synced_commits(&store);
            let batch = read_batch(&store).await;
            assert!(batch.seq > last);
            last = batch.seq;
            let covered = vec![("a".to_owned(), batch.reports[0].version)];
            store.ack(batch.seq, covered).await.unwrap();
            // Only the first read reserves numbers, durably; acknowledgements need no fsync.
            let fsyncs = synced_commits(&store) - synced;
            assert_eq!(fsyncs, u64::from(n == 0), "batch {n}");
        }
        drop(store);
        h.join().unwrap();
        // As if a power cut had lost the last batch reads' seq writes.
        let conn = Connection::open(&s.path).unwrap();
        let stale = conn.execute("UPDATE meta SET value = '1' WHERE key = 'seq'", []);
        assert_eq!(stale.unwrap(), 1);
        drop(conn);
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        let seq = store.heartbeat_seq().await.unwrap();
        assert!(seq > last, "seq went back from {last} to {seq}");
        drop(store);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_database_behind_its_witness_raises_a_lost_commits_alarm_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        for n in 0..3 {
            store
                .update("d".into(), req(json!({ "n": n })))
                .await
                .unwrap();
        }
        assert!(store.health().lost_commits().is_none());
        drop(store);
        h.join().unwrap();
        let witness = witness::path_for(&s.path);
        let recorded: u64 = std::fs::read_to_string(&witness)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(recorded >= 3, "every commit is witnessed: {recorded}");
        // As if the last 40 commits had been in a deleted -wal file.
        std::fs::write(&witness, format!("{}\n", recorded + 40)).unwrap();
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        let (lost, detail) = store.health().lost_commits().unwrap();
        assert_eq!(lost, 40);
        assert!(detail.contains("40 commits behind"), "{detail}");
        drop(store);
        h.join().unwrap();
        // Sticky: a restart does not hide it.
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        assert_eq!(store.health().lost_commits().unwrap().0, 40);
        drop(store);
        h.join().unwrap();
        assert_eq!(clear_lost_commits(&s.path).unwrap(), Some(40));
        let (store, _h) = Store::open(&s, Limits::default()).unwrap();
        assert!(store.health().lost_commits().is_none());
    }

    #[tokio::test]
    async fn a_v4_database_upgrades_to_the_current_schema_keeping_its_pending_reports() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let (store, h) = Store::open(&s, Limits::default()).unwrap();
        store
            .update("press-1".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        drop(store);
        h.join().unwrap();
        // As a v4 agent left it: the outbox's age index, no device claims, user_version 4.
        let side = Connection::open(&s.path).unwrap();
        side.execute_batch(
            "CREATE INDEX outbox_by_age ON outbox (enqueued_at_ms); DROP TABLE device_claims;
             PRAGMA user_version = 4;",
        )
        .unwrap();
        drop(side);

        let (store, _h) = Store::open(&s, Limits::default()).unwrap();
        let side = Connection::open(&s.path).unwrap();
        let (version, indexes): (i64, i64) = side
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version),
                        (SELECT count(*) FROM sqlite_schema WHERE name = 'outbox_by_age')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((version, indexes), (6, 0));
        let batch = read_batch(&store).await;
        assert_eq!(batch.covered(), vec![("press-1".to_owned(), 1)]);
    }

    #[tokio::test]
    async fn a_device_changing_while_its_report_is_in_flight_restarts_its_pending_age() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        store
            .update("busy".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        let batch = read_batch(&store).await;
        // Its first change, long ago (as if the link had been busy with it for an hour).
        // (The table only: the writer's copy in memory keeps the real time.)
        let side = Connection::open(dir.path().join("t.db")).unwrap();
        side.execute(
            "UPDATE outbox SET enqueued_at_ms = enqueued_at_ms - 3600000",
            [],
        )
        .unwrap();
        let table_age_s = || {
            let at: i64 = side
                .query_row("SELECT enqueued_at_ms FROM outbox", [], |r| r.get(0))
                .unwrap();
            (now_ms() - at) / 1000
        };
        assert!(table_age_s() >= 3600);
        // It changes again before the report is acknowledged.
        store
            .update("busy".into(), req(json!({"n": 2})))
            .await
            .unwrap();
        let covered = batch.covered();
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
        assert!(
            table_age_s() < 60,
            "the table's age {} s: it restarts when the batch was read",
            table_age_s()
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

        let batch = read_batch(&store).await;
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
        store.ack(batch.seq, batch.covered()).await.unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.pending_devices, stats.last_acked_seq), (1, 1));
        let next = read_batch(&store).await;
        assert_eq!(next.seq, 2);
        assert_eq!(
            (next.reports[0].device.as_str(), next.reports[0].version),
            ("press-1", 51)
        );
    }

    #[tokio::test]
    async fn batches_take_devices_in_the_tables_order_through_acks_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let names = |b: &PendingBatch| -> Vec<String> {
            b.reports.iter().map(|r| r.device.clone()).collect()
        };
        let table = || {
            let ro = open_read_only(&dir.path().join("t.db")).unwrap();
            let (_, rows) = ro.outbox().unwrap();
            rows.into_iter().map(|(d, _)| d).collect::<Vec<_>>()
        };
        // Enqueue times are in ms: waiting until the clock has passed the current one makes
        // the next enqueue later, so the order is by age and not by name.
        let next_ms = || {
            let now = now_ms();
            while now_ms() <= now {
                std::hint::spin_loop();
            }
        };
        {
            let (store, h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
            for d in ["c", "b", "a"] {
                store.update(d.into(), req(json!({"n": 1}))).await.unwrap();
                next_ms();
            }
            let first = read_batch(&store).await;
            assert_eq!(names(&first), ["c", "b", "a"]);
            assert_eq!(names(&first), table());
            // "b" changes while in flight: acknowledged, it stays pending from the read on.
            store
                .update("b".into(), req(json!({"n": 2})))
                .await
                .unwrap();
            store.ack(first.seq, first.covered()).await.unwrap();
            next_ms();
            store
                .update("a".into(), req(json!({"n": 2})))
                .await
                .unwrap();
            let next = read_batch(&store).await;
            assert_eq!(names(&next), ["b", "a"]);
            assert_eq!(names(&next), table());
            drop(store);
            h.join().unwrap();
        }
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let again = read_batch(&store).await;
        assert_eq!(names(&again), ["b", "a"]);
        assert_eq!(store.health().outbox().0, 2);
    }

    #[tokio::test]
    async fn a_store_that_cannot_read_its_tables_again_applies_nothing_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        store
            .update("a".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        // Another connection takes the outbox away: the next transaction fails, and so does
        // reading the outbox again after it.
        let other = Connection::open(dir.path().join("t.db")).unwrap();
        other
            .busy_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        other
            .execute_batch("ALTER TABLE outbox RENAME TO outbox_away")
            .unwrap();
        for n in 2..4 {
            assert!(
                store
                    .update("a".into(), req(json!({"n": n})))
                    .await
                    .is_err(),
                "an update must fail while the outbox cannot be written or read"
            );
            assert!(store.health().is_failing());
        }
        other
            .execute_batch("ALTER TABLE outbox_away RENAME TO outbox")
            .unwrap();
        // The next group reads the tables again first, then applies.
        store
            .update("b".into(), req(json!({"n": 1})))
            .await
            .unwrap();
        assert!(!store.health().is_failing());
        let batch = read_batch(&store).await;
        let got: Vec<_> = batch
            .reports
            .iter()
            .map(|r| (r.device.as_str(), r.version, r.reported.get("n").cloned()))
            .collect();
        // Nothing of the failed updates was kept, in the database or in memory.
        assert_eq!(got, [("a", 1, Some(json!(1))), ("b", 1, Some(json!(1)))]);
        assert_eq!(store.health().outbox().0, 2);
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
            read_batch(&store).await;
            drop(store);
            h.join().unwrap();
        }
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let doc = store.get("a".into()).await.unwrap().unwrap();
        assert_eq!(
            (doc.version, doc.state.reported.get("x")),
            (1, Some(&json!(1)))
        );
        // The seq is reserved durably, so it keeps increasing across restarts.
        assert!(read_batch(&store).await.seq > 1);
        let ro = open_read_only(&dir.path().join("t.db")).unwrap();
        assert_eq!(ro.list().unwrap(), vec![("a".to_owned(), 1)]);
        assert_eq!(ro.outbox().unwrap().0.pending_devices, 1);
    }

    #[tokio::test]
    async fn a_device_id_belongs_to_the_first_dialect_that_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let sparkplug = |v| UpdateRequest {
            dialect: Dialect::Sparkplug,
            ..req(v)
        };
        {
            let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
            let first = store.update("gw1".into(), sparkplug(json!({"a": 1})));
            assert!(matches!(
                first.await.unwrap(),
                UpdateOutcome::Accepted { .. }
            ));
            let taken = store
                .update("gw1".into(), req(json!({"a": 2})))
                .await
                .unwrap();
            let UpdateOutcome::Rejected(e) = taken else {
                panic!("another dialect wrote gw1: {taken:?}");
            };
            assert_eq!(e.code(), 409);
            assert!(e.to_string().contains("Sparkplug B"), "{e}");
            assert_eq!(store.get("gw1".into()).await.unwrap(), None, "hidden");
            let own = store.submit_get("gw1".into(), Dialect::Sparkplug).await;
            let doc = own.unwrap().await.unwrap().unwrap().unwrap();
            assert_eq!(doc.state.reported["a"], json!(1));
        }
        // The claim outlives a restart, whichever dialect speaks first then.
        let (store, _h) = Store::open(&settings(dir.path()), Limits::default()).unwrap();
        let again = store
            .update("gw1".into(), req(json!({"a": 3})))
            .await
            .unwrap();
        assert!(matches!(
            again,
            UpdateOutcome::Rejected(ShadowError::IdentityTaken { .. })
        ));
        let other = store
            .update("gw2".into(), req(json!({"a": 3})))
            .await
            .unwrap();
        assert!(matches!(other, UpdateOutcome::Accepted { .. }));
        let late = store
            .update("gw2".into(), sparkplug(json!({"a": 4})))
            .await
            .unwrap();
        assert!(matches!(
            late,
            UpdateOutcome::Rejected(ShadowError::IdentityTaken { .. })
        ));
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
        let pending = || store.next_batch(10, 1 << 20, Arc::default());

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
    use crate::config::Durability;
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
            min_commit_interval: std::time::Duration::ZERO,
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
                connected: None,
                dialect: Dialect::Native,
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
