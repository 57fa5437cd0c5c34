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
//!
//! Parts: `writer` (the thread: grouping, `pacing`, commit or rollback), `shadows` (documents
//! and which dialect owns each id, with `claims`), `outbox` (pending reports, batch numbers,
//! acknowledgements, with `pending`), `meta` (node metadata keys), `broker_sessions` (the
//! embedded broker's persistent sessions), `witness` (lost-commit detection), `schema`,
//! `epoch`, `health`, `read_only` (the CLI's reads while the agent runs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use edgesync_protocol::Limits;
use edgesync_protocol::identity::Dialect;
use edgesync_protocol::rejection::RejectRequest;
use edgesync_protocol::shadow::{
    Applied, EpochSeconds, ShadowDocument, ShadowError, UpdateRequest,
};
use edgesync_protocol::wire::Report;
use rusqlite::Connection;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::StoreSettings;

mod broker_sessions;
mod claims;
mod epoch;
mod health;
mod meta;
mod outbox;
mod pacing;
mod pending;
mod read_only;
mod schema;
mod shadows;
mod witness;
mod writer;
pub use broker_sessions::{SessionDelta, StoredSession};
pub use health::StoreHealth;
pub use meta::META_DESIRED_CURSOR;
use meta::{
    GET_META, META_ACKED_SEQ, META_LOST_COMMITS, META_LOST_COMMITS_DETAIL, META_SEQ, SET_META,
    get_u64 as get_meta_u64,
};
pub use read_only::{ReadOnlyStore, open_read_only};
use schema::{effective_pragmas, open_rw};
pub use witness::clear_lost_commits;
use writer::Writer;

/// Commands waiting for the writer thread. Large enough to form big commit groups under
/// load; small enough that a stalled disk pushes back on MQTT intake within milliseconds.
const COMMAND_CHANNEL_CAPACITY: usize = 4096;

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
    /// When each report's device became pending (ms since the epoch), in the order of
    /// `reports`: how long the uplink kept it waiting.
    pub pending_since_ms: Vec<i64>,
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
            pending_since_ms: Vec::new(),
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
    /// A device refuses its desired generation (`shadow/desired/reject`).
    Reject {
        device: String,
        request: RejectRequest,
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
        matches!(self, Command::Update { .. } | Command::Reject { .. })
    }

    /// Whether this reads the uplink's next batch (and so may take a batch number).
    fn is_batch_read(&self) -> bool {
        matches!(self, Command::NextBatch { .. })
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

    /// Queues a command and returns the receiver of its reply without waiting for it. On
    /// failure the command, and with it its reply sender, is dropped: the receiver then ends.
    async fn queue<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> oneshot::Receiver<Result<T, StoreError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(make(reply)).await;
        rx
    }

    /// Queues a device's reported-state update and returns a receiver for its durable outcome.
    /// Queuing separately from awaiting lets the MQTT path pipeline many updates into one
    /// commit while replying to devices in order.
    ///
    /// A writer that has stopped drops the request with its reply sender, so the receiver
    /// ends without an answer, exactly as when a transaction fails before applying it: every
    /// caller then handles one "not committed" case, and leaves the message unacknowledged.
    pub async fn submit_update(
        &self,
        device: String,
        request: UpdateRequest,
        full_reply: bool,
    ) -> oneshot::Receiver<Result<UpdateOutcome, StoreError>> {
        self.queue(|reply| Command::Update {
            device,
            request,
            full_reply,
            reply,
        })
        .await
    }

    /// Queues a device's refusal of its desired generation and returns a receiver for its
    /// durable outcome ([`UpdateOutcome::Accepted`] with the document after it, or
    /// [`UpdateOutcome::Rejected`] for a generation the shadow does not hold); dropped with
    /// its transaction as [`Store::submit_update`].
    pub async fn submit_reject(
        &self,
        device: String,
        request: RejectRequest,
    ) -> oneshot::Receiver<Result<UpdateOutcome, StoreError>> {
        self.queue(|reply| Command::Reject {
            device,
            request,
            reply,
        })
        .await
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
            .await
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

/// The wall clock in ms since the epoch, as the store's times are kept.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn now_secs() -> EpochSeconds {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
mod tests;
