//! The writer thread: owns the read-write connection and the in-memory shadow cache, and
//! applies every queued command of a group in one transaction (group commit).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgesync_protocol::Limits;
use edgesync_protocol::identity::Dialect;
use edgesync_protocol::shadow::{ShadowDocument, ShadowError};
use edgesync_protocol::wire::Report;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::claims;
use super::pending::Pending;
use super::witness::{self, Witness};
use super::{
    Command, DesiredOutcome, GET_META, InFlight, META_ACKED_SEQ, META_COMMITS, META_PROBE,
    META_SEQ, META_SEQ_RESERVED, OutboxStats, PendingBatch, Reply, SEQ_BLOCK, SET_META, StoreError,
    StoreHealth, UpdateOutcome, age_seconds, broker_sessions, get_meta_u64, now_ms, now_secs,
    read_shadows, rfc3339, sqlite_err,
};
use crate::config::StoreSettings;

const UPSERT_SHADOW: &str = "INSERT INTO shadows (device, version, doc) VALUES (?1, ?2, ?3)
     ON CONFLICT (device) DO UPDATE SET version = excluded.version, doc = excluded.doc";
// Keeps the first enqueue time while a device stays pending, so the oldest pending age
// measures how long the uplink has been behind, not how recently the device changed.
const UPSERT_OUTBOX: &str =
    "INSERT INTO outbox (device, version, enqueued_at_ms) VALUES (?1, ?2, ?3)
     ON CONFLICT (device) DO UPDATE SET version = excluded.version";
const SELECT_OUTBOX: &str = "SELECT device, version, enqueued_at_ms FROM outbox";
const DELETE_ACKED: &str = "DELETE FROM outbox WHERE device = ?1 AND version <= ?2";
// A device changed again while its report was in flight: its oldest unacknowledged change
// is newer than the moment the batch was read, so its age restarts there (overstated by at
// most one round trip) instead of at its first change ever.
const RESTART_PENDING_AGE: &str =
    "UPDATE outbox SET enqueued_at_ms = max(enqueued_at_ms, ?3) WHERE device = ?1 AND version > ?2";
/// Groups of device messages smaller than this are a trickle, which commit pacing gathers
/// into fewer fsyncs; larger ones come from clients already waiting on commits.
const PACE_BELOW: usize = 32;
/// A paced group of at least this many device messages means a steady stream (from about 800
/// messages/s at the default interval, and until it falls below about 200/s under the wide
/// one), which is then paced at `PACE_WIDE_FACTOR` times the interval, so each fsync is
/// shared by that many times more messages. An fsync and its WAL frames were a third of the
/// agent's CPU at 1,000 messages/s, and every fsync wears the flash of an edge box. The price
/// is a few more intervals before an acknowledgement, and a client held back by a small
/// in-flight window (4 to 31 messages, such as Mosquitto's default of 20) gets at most its
/// window per wide interval (1,000 messages/s for 20); a larger window is not paced at all
/// (`PACE_BELOW`), and a shorter interval raises the cap. A slower trickle keeps the short
/// interval and its latency.
const PACE_WIDER_FROM: usize = 4;
/// How much wider a steady stream's interval is (20 ms at the default 5 ms).
const PACE_WIDE_FACTOR: u32 = 4;
/// Batches whose read time is remembered for the age restart (older ones fall back to the
/// ack time).
const MAX_BATCHES_TIMED: usize = 256;

/// The writer thread's state.
pub(super) struct Writer {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    max_batch: usize,
    /// `store.min_commit_interval`: under load, the least time between commits.
    min_interval: Duration,
    max_devices: usize,
    shadows: HashMap<String, ShadowDocument>,
    /// The dialect each device id belongs to (`claims.rs`).
    claims: HashMap<String, Dialect>,
    /// Devices updated in the current group, written once each before the commit: a device
    /// updated many times in one group costs one serialization and two row writes.
    dirty: HashSet<String>,
    /// The outbox table's rows, kept with it (see `pending`).
    pending: Pending,
    /// The caches above may differ from the database: a transaction failed and reading them
    /// again failed too. Nothing is applied until they are read again.
    stale: bool,
    seq: u64,
    /// The highest `seq` durably reserved (`meta.seq_reserved`).
    seq_reserved: u64,
    health: Arc<StoreHealth>,
    /// When each batch in flight was read from the outbox (ms since the epoch), by seq.
    batch_read_ms: BTreeMap<u64, i64>,
    /// Transactions committed over the database's life (`meta.commits`).
    commits: u64,
    witness: Witness,
    /// Whether every commit is fsynced (`store.durability = "power-loss-safe"`); groups that
    /// only record acknowledgements are then committed without one (see `apply_group`).
    power_loss_safe: bool,
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
    pub(super) fn load(
        conn: Connection,
        settings: &StoreSettings,
        limits: Limits,
        health: Arc<StoreHealth>,
    ) -> Result<Self, StoreError> {
        let path = settings.path.clone();
        let err = sqlite_err(&path);
        let shadows = read_shadows(&conn, &path)?;
        let claims = claims::load(&conn).map_err(&err)?;
        // Above anything handed out before, even if the last `seq` writes were lost.
        let seq_reserved = get_meta_u64(&conn, META_SEQ_RESERVED).map_err(&err)?;
        let seq = get_meta_u64(&conn, META_SEQ)
            .map_err(&err)?
            .max(seq_reserved);
        let commits = get_meta_u64(&conn, META_COMMITS).map_err(&err)?;
        let witness = witness::check_at_start(&conn, &path, commits, &health)?;
        health.set_devices(shadows.len(), settings.max_devices);
        let pending = read_pending(&conn).map_err(&err)?;
        let (count, oldest) = pending.count_oldest();
        health.set_outbox(count, oldest);
        Ok(Self {
            conn,
            path: settings.path.clone(),
            limits,
            max_batch: settings.max_commit_batch,
            min_interval: settings.min_commit_interval,
            max_devices: settings.max_devices,
            shadows,
            claims,
            dirty: HashSet::new(),
            pending,
            stale: false,
            seq,
            seq_reserved,
            power_loss_safe: settings.durability == crate::config::Durability::PowerLossSafe,
            health,
            batch_read_ms: BTreeMap::new(),
            commits,
            witness,
        })
    }

    pub(super) fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(self.max_batch);
        // Long enough ago that the first update commits at once.
        let mut last_paced = Instant::now()
            .checked_sub(self.min_interval)
            .unwrap_or_else(Instant::now);
        let mut last_group = 0;
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            self.fill(&mut group, &mut rx);
            // Group commit: everything queued joins this transaction. Under a stream of
            // device messages (the previous commit of one was less than min_interval ago)
            // the commit also waits out the rest of the interval, so that a steady trickle
            // of messages shares one fsync instead of paying one each; an idle store commits
            // at once.
            if group.iter().any(Command::is_device_update) {
                // Only a trickle is paced: when the last such group was large, messages
                // already queue up while a commit runs (clients with many messages in flight
                // wait on our acknowledgements), and waiting would only cap their rate at
                // their in-flight window per interval.
                if last_group < PACE_BELOW {
                    let interval = if last_group >= PACE_WIDER_FROM {
                        self.min_interval * PACE_WIDE_FACTOR
                    } else {
                        self.min_interval
                    };
                    let pace_until = last_paced + interval;
                    loop {
                        let now = Instant::now();
                        if group.len() >= self.max_batch || now >= pace_until {
                            break;
                        }
                        std::thread::sleep(pace_until - now);
                        self.fill(&mut group, &mut rx);
                    }
                }
                last_group = group.len();
                self.apply_group(&mut group);
                last_paced = Instant::now();
            } else {
                self.apply_group(&mut group);
            }
        }
        tracing::debug!("store writer stopped");
    }

    /// The reports of the next batch: pending devices oldest first, within `max_reports` and
    /// about `max_bytes` of JSON. A device a batch in flight carries comes only if its state
    /// is newer, and after every device no batch carries: otherwise the oldest devices, which
    /// change again while in flight, would fill every batch and starve the rest.
    fn select_reports(
        &self,
        max_reports: usize,
        max_bytes: usize,
        in_flight: &InFlight,
    ) -> Vec<Report> {
        let mut fresh = Vec::new();
        let mut again = Vec::new();
        // Every pending device is looked at on each read: borrowed, not copied, until chosen.
        for name in self.pending.oldest_first() {
            let Some((device, doc)) = self.shadows.get_key_value(name) else {
                continue;
            };
            match in_flight.get(name) {
                None => fresh.push((device, doc)),
                Some(&sent) if sent < doc.version => again.push((device, doc)),
                Some(_) => {}
            }
            if fresh.len() >= max_reports {
                break;
            }
        }
        let mut reports = Vec::new();
        let mut bytes = 0usize;
        for (device, doc) in fresh.into_iter().chain(again) {
            let size = edgesync_protocol::shadow::encoded_object_len(&doc.state.reported)
                + device.len()
                + 128;
            if !reports.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            reports.push(Report {
                device: device.clone(),
                version: doc.version,
                reported: doc.state.reported.clone(),
                reported_at: rfc3339(doc.timestamp),
                observed_desired_version: doc.desired_generation,
                connected: doc.connected,
            });
            if reports.len() >= max_reports {
                break;
            }
        }
        reports
    }

    /// Runs one statement from the connection's statement cache: every group begins and commits
    /// a transaction, and parsing those statements again each time was a tenth of the agent's
    /// CPU at 100 messages/s.
    fn run_cached(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Adds whatever is queued to `group`, up to max_batch.
    fn fill(&self, group: &mut Vec<Command>, rx: &mut mpsc::Receiver<Command>) {
        while group.len() < self.max_batch {
            match rx.try_recv() {
                Ok(cmd) => group.push(cmd),
                Err(_) => break,
            }
        }
    }

    fn apply_group(&mut self, group: &mut Vec<Command>) {
        if self.stale
            && let Err(e) = self.reload()
        {
            tracing::error!(error = %e, "cannot read the shadows and the outbox again after a failed transaction; nothing is applied until they can be");
            self.health.failed(&e.to_string());
            // Dropped replies, which callers see as Closed: nothing is acknowledged.
            group.clear();
            return;
        }
        let mut deferred: Vec<Deferred> = Vec::with_capacity(group.len());
        let (seq_before, reserved_before) = (self.seq, self.seq_reserved);
        // A group that only records the controller's acknowledgements, or reads, need not
        // survive a power loss: a lost acknowledgement means the report is sent again and
        // answered at once. Its commit then skips the fsync, which on an idle link (one
        // batch per change) is most of the uplink's cost. A later fsynced commit makes it
        // durable too: the WAL is synced up to its end.
        // Batch reads are among them while their numbers are already reserved.
        let batch_reads = group
            .iter()
            .filter(|c| matches!(c, Command::NextBatch { .. }))
            .count() as u64;
        let reserved = self.seq + batch_reads <= self.seq_reserved;
        let relaxed = self.power_loss_safe
            && group
                .iter()
                .all(|c| c.may_be_lost() || reserved && matches!(c, Command::NextBatch { .. }));
        if relaxed {
            let _ = self.run_cached("PRAGMA synchronous = NORMAL");
        }
        let changes_before = self.conn.total_changes();
        let mut counted = false;
        let mut outbox = None;
        let result = (|| -> Result<(), StoreError> {
            self.run_cached("BEGIN IMMEDIATE")
                .map_err(sqlite_err(&self.path))?;
            for cmd in group.drain(..) {
                deferred.push(self.apply(cmd)?);
            }
            self.flush_dirty()?;
            // In the same transaction: the lost-commit witness counts what is durable. A
            // group that wrote nothing commits nothing (no fsync), and one that may be lost
            // is not counted, so that losing it is not reported as a loss.
            let changed = self.conn.total_changes() != changes_before;
            // Inside the transaction: a read of its own would take and release the
            // database's read lock again.
            if changed {
                outbox = Some(self.pending.count_oldest());
            }
            counted = !relaxed && changed;
            if counted {
                self.conn
                    .prepare_cached(SET_META)
                    .and_then(|mut s| {
                        s.execute(params![META_COMMITS, (self.commits + 1).to_string()])
                    })
                    .map_err(sqlite_err(&self.path))?;
            }
            self.run_cached("COMMIT").map_err(sqlite_err(&self.path))
        })();
        if relaxed {
            let _ = self.run_cached("PRAGMA synchronous = FULL");
        }
        match &result {
            Ok(()) => {
                if counted {
                    self.commits += 1;
                    self.witness.record(self.commits);
                }
                // Empty groups and acknowledgement-only groups commit without an fsync.
                self.health.committed(counted);
                self.health
                    .set_devices(self.shadows.len(), self.max_devices);
                if let Some((pending, oldest)) = outbox {
                    self.health.set_outbox(pending, oldest);
                }
            }
            Err(e) => self.health.failed(&e.to_string()),
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "store transaction failed; nothing in it was acknowledged");
            let _ = self.conn.execute_batch("ROLLBACK");
            (self.seq, self.seq_reserved) = (seq_before, reserved_before);
            self.dirty.clear();
            if let Err(reload) = self.reload() {
                tracing::error!(error = %reload, "cannot read the shadows and the outbox again after a failed transaction; trying again before the next group");
            }
            let (pending, oldest) = self.pending.count_oldest();
            self.health.set_outbox(pending, oldest);
            // Commands not yet applied get dropped replies, which callers see as Closed.
            group.clear();
        }
        let outcome = result.as_ref().map(|_| ());
        for d in deferred {
            d(outcome);
        }
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        self.stale = true;
        self.shadows = read_shadows(&self.conn, &self.path)?;
        self.claims = claims::load(&self.conn).map_err(sqlite_err(&self.path))?;
        self.pending = read_pending(&self.conn).map_err(sqlite_err(&self.path))?;
        self.seq_reserved =
            get_meta_u64(&self.conn, META_SEQ_RESERVED).map_err(sqlite_err(&self.path))?;
        self.seq = get_meta_u64(&self.conn, META_SEQ)
            .map_err(sqlite_err(&self.path))?
            .max(self.seq_reserved);
        self.commits = get_meta_u64(&self.conn, META_COMMITS).map_err(sqlite_err(&self.path))?;
        self.stale = false;
        Ok(())
    }

    /// Writes a device's shadow and its pending report.
    fn write_shadow(
        conn: &Connection,
        pending: &mut Pending,
        path: &std::path::Path,
        device: &str,
        doc: &ShadowDocument,
    ) -> Result<(), StoreError> {
        let err = sqlite_err(path);
        let text = serde_json::to_string(doc).map_err(|source| StoreError::Corrupt {
            device: device.to_owned(),
            source,
        })?;
        conn.prepare_cached(UPSERT_SHADOW)
            .and_then(|mut s| s.execute(params![device, doc.version as i64, text]))
            .map_err(&err)?;
        let now = now_ms();
        conn.prepare_cached(UPSERT_OUTBOX)
            .and_then(|mut s| s.execute(params![device, doc.version as i64, now]))
            .map_err(&err)?;
        pending.upsert(device, doc.version, now);
        Ok(())
    }

    /// Writes the devices updated since the last flush.
    fn flush_dirty(&mut self) -> Result<(), StoreError> {
        // Taken and put back so the set keeps its capacity from group to group.
        let mut dirty = std::mem::take(&mut self.dirty);
        let Self {
            conn,
            pending,
            path,
            shadows,
            ..
        } = self;
        let result = dirty
            .drain()
            .try_for_each(|device| match shadows.get(&device) {
                Some(doc) => Self::write_shadow(conn, pending, path, &device, doc),
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
                let claimed = self.claims.get(&device).copied();
                if let Some(owner) = claimed
                    && owner != request.dialect
                {
                    let taken = ShadowError::IdentityTaken {
                        device,
                        owner,
                        by: request.dialect,
                    };
                    return Ok(defer(reply, UpdateOutcome::Rejected(taken)));
                }
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
                            if claimed.is_none() {
                                // Written now, inside this group's transaction: a failed
                                // commit reloads the claims with the shadows.
                                claims::record(&self.conn, &device, request.dialect)
                                    .map_err(&err)?;
                                self.claims.insert(device.clone(), request.dialect);
                            }
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
                            Self::write_shadow(
                                &self.conn,
                                &mut self.pending,
                                &self.path,
                                &device,
                                &doc,
                            )?;
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
            Command::Get {
                device,
                dialect,
                reply,
            } => {
                // Another dialect's device is not found: its grants do not reach it.
                let visible = self
                    .claims
                    .get(&device)
                    .is_none_or(|owner| *owner == dialect);
                defer(
                    reply,
                    visible
                        .then(|| self.shadows.get(&device).cloned())
                        .flatten(),
                )
            }
            Command::NextBatch {
                max_reports,
                max_bytes,
                in_flight,
                reply,
            } => {
                let reports = if max_reports > 0 {
                    self.select_reports(max_reports, max_bytes, &in_flight)
                } else {
                    Vec::new()
                };
                if max_reports > 0 && reports.is_empty() {
                    defer(reply, None)
                } else {
                    self.seq += 1;
                    if self.seq > self.seq_reserved {
                        self.seq_reserved = self.seq + SEQ_BLOCK - 1;
                        self.conn
                            .prepare_cached(SET_META)
                            .and_then(|mut s| {
                                s.execute(params![META_SEQ_RESERVED, self.seq_reserved.to_string()])
                            })
                            .map_err(&err)?;
                    }
                    // meta.seq itself is written with the acknowledgement: within the
                    // reservation, a batch read writes nothing and so commits nothing.
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
                        self.pending.ack(device, *version, read_ms);
                    }
                }
                let acked = get_meta_u64(&self.conn, META_ACKED_SEQ).map_err(&err)?;
                if seq > acked {
                    self.conn
                        .prepare_cached(SET_META)
                        .and_then(|mut s| s.execute(params![META_ACKED_SEQ, seq.to_string()]))
                        .map_err(&err)?;
                }
                self.conn
                    .prepare_cached(SET_META)
                    .and_then(|mut s| s.execute(params![META_SEQ, self.seq.to_string()]))
                    .map_err(&err)?;
                defer(reply, ())
            }
            Command::Stats { reply } => {
                // From the writer's copy of the outbox, which the table has no index to
                // answer from (schema v5).
                let (pending_devices, oldest) = self.pending.count_oldest();
                let stats = OutboxStats {
                    pending_devices,
                    oldest_pending_age_seconds: age_seconds(oldest),
                    last_acked_seq: get_meta_u64(&self.conn, META_ACKED_SEQ).map_err(&err)?,
                    // meta.seq lags until the next acknowledgement; the writer knows the last.
                    last_seq: self.seq,
                };
                defer(reply, stats)
            }
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
                    .prepare_cached(GET_META)
                    .and_then(|mut st| st.query_row([key], |r| r.get(0)))
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

/// The outbox table, read into memory.
fn read_pending(conn: &Connection) -> rusqlite::Result<Pending> {
    let mut stmt = conn.prepare(SELECT_OUTBOX)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Pending::from_rows(rows))
}
