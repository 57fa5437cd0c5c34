//! The writer thread: owns the read-write connection and applies every queued command of a
//! group in one transaction (group commit), paced by [`Pacer`]. It decides only how a group
//! commits: with or without an fsync, counted by the witness or not, rolled back with every
//! part read again when anything in it fails. What each command does is the parts' job:
//! [`Shadows`], [`Outbox`], `meta` and `broker_sessions`.

use std::sync::Arc;
use std::time::Instant;

use edgesync_protocol::Limits;
use rusqlite::Connection;
use tokio::sync::mpsc;

use super::meta::{self, META_COMMITS, META_PROBE};
use super::outbox::Outbox;
use super::pacing::Pacer;
use super::shadows::Shadows;
use super::witness::{self, Witness};
use super::{Command, Reply, StoreError, StoreHealth, broker_sessions, now_ms, sqlite_err};
use crate::config::StoreSettings;

/// The writer thread's state.
pub(super) struct Writer {
    conn: Connection,
    path: std::path::PathBuf,
    max_batch: usize,
    pacer: Pacer,
    shadows: Shadows,
    outbox: Outbox,
    /// The parts may differ from the database: a transaction failed and reading them again
    /// failed too. Nothing is applied until they are read again.
    stale: bool,
    health: Arc<StoreHealth>,
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
        let path = &settings.path;
        let err = sqlite_err(path);
        let shadows = Shadows::load(&conn, path, limits, settings.max_devices)?;
        let outbox = Outbox::load(&conn).map_err(&err)?;
        let commits = meta::get_u64(&conn, META_COMMITS).map_err(&err)?;
        let witness = witness::check_at_start(&conn, path, commits, &health)?;
        let (devices, max_devices) = shadows.count();
        health.set_devices(devices, max_devices);
        let (count, oldest) = outbox.count_oldest();
        health.set_outbox(count, oldest);
        Ok(Self {
            conn,
            path: path.clone(),
            max_batch: settings.max_commit_batch,
            pacer: Pacer::new(settings.min_commit_interval, Instant::now()),
            shadows,
            outbox,
            stale: false,
            power_loss_safe: settings.durability == crate::config::Durability::PowerLossSafe,
            health,
            commits,
            witness,
        })
    }

    pub(super) fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            self.fill(&mut group, &mut rx);
            // Group commit: everything queued joins this transaction. A group holding device
            // messages may first gather more (see `pacing`); everything else commits at once,
            // so pacing never delays a report on its way out.
            if group.iter().any(Command::is_device_update) {
                if let Some(until) = self.pacer.hold_until() {
                    loop {
                        let now = Instant::now();
                        if group.len() >= self.max_batch || now >= until {
                            break;
                        }
                        std::thread::sleep(until - now);
                        self.fill(&mut group, &mut rx);
                    }
                }
                let len = group.len();
                self.apply_group(&mut group);
                self.pacer.committed(len, Instant::now());
            } else {
                self.apply_group(&mut group);
            }
        }
        tracing::debug!("store writer stopped");
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
        let seq_before = self.outbox.mark();
        // A group that only records the controller's acknowledgements, or reads, need not
        // survive a power loss: a lost acknowledgement means the report is sent again and
        // answered at once. Its commit then skips the fsync, which on an idle link (one
        // batch per change) is most of the uplink's cost. A later fsynced commit makes it
        // durable too: the WAL is synced up to its end.
        // Batch reads are among them while their numbers are already reserved.
        let batch_reads = group.iter().filter(|c| c.is_batch_read()).count() as u64;
        let reserved = self.outbox.reserved_for(batch_reads);
        let relaxed = self.power_loss_safe
            && group
                .iter()
                .all(|c| c.may_be_lost() || reserved && c.is_batch_read());
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
            self.shadows
                .flush(&self.conn, &self.path, &mut self.outbox)?;
            // In the same transaction: the lost-commit witness counts what is durable. A
            // group that wrote nothing commits nothing (no fsync), and one that may be lost
            // is not counted, so that losing it is not reported as a loss.
            let changed = self.conn.total_changes() != changes_before;
            // Inside the transaction: a read of its own would take and release the
            // database's read lock again.
            if changed {
                outbox = Some(self.outbox.count_oldest());
            }
            counted = !relaxed && changed;
            if counted {
                meta::set(&self.conn, META_COMMITS, &(self.commits + 1).to_string())
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
                let (devices, max_devices) = self.shadows.count();
                self.health.set_devices(devices, max_devices);
                if let Some((pending, oldest)) = outbox {
                    self.health.set_outbox(pending, oldest);
                }
            }
            Err(e) => self.health.failed(&e.to_string()),
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "store transaction failed; nothing in it was acknowledged");
            let _ = self.conn.execute_batch("ROLLBACK");
            self.outbox.restore(seq_before);
            if let Err(reload) = self.reload() {
                tracing::error!(error = %reload, "cannot read the shadows and the outbox again after a failed transaction; trying again before the next group");
            }
            let (pending, oldest) = self.outbox.count_oldest();
            self.health.set_outbox(pending, oldest);
            // Commands not yet applied get dropped replies, which callers see as Closed.
            group.clear();
        }
        let outcome = result.as_ref().map(|_| ());
        for d in deferred {
            d(outcome);
        }
    }

    /// Reads every part again after a failed transaction; until that succeeds the store is
    /// stale and applies nothing.
    fn reload(&mut self) -> Result<(), StoreError> {
        self.stale = true;
        let err = sqlite_err(&self.path);
        self.shadows.reload(&self.conn, &self.path)?;
        self.outbox.reload(&self.conn).map_err(&err)?;
        self.commits = meta::get_u64(&self.conn, META_COMMITS).map_err(&err)?;
        self.stale = false;
        Ok(())
    }

    /// Applies one command inside the group's transaction; its reply waits for the commit.
    fn apply(&mut self, cmd: Command) -> Result<Deferred, StoreError> {
        if !matches!(
            cmd,
            Command::Update { .. } | Command::Reject { .. } | Command::Get { .. }
        ) {
            // Everything else reads or writes rows: bring them up to date first.
            self.shadows
                .flush(&self.conn, &self.path, &mut self.outbox)?;
        }
        let err = sqlite_err(&self.path);
        let conn = &self.conn;
        Ok(match cmd {
            Command::Update {
                device,
                request,
                full_reply,
                reply,
            } => {
                let outcome = self
                    .shadows
                    .update(conn, device, &request, full_reply)
                    .map_err(&err)?;
                defer(reply, outcome)
            }
            Command::Reject {
                device,
                request,
                reply,
            } => defer(reply, self.shadows.reject(device, &request)),
            Command::SetDesired {
                device,
                desired,
                generation,
                reply,
            } => {
                let outcome = self.shadows.set_desired(
                    conn,
                    &self.path,
                    &mut self.outbox,
                    device,
                    desired,
                    generation,
                )?;
                defer(reply, outcome)
            }
            Command::Get {
                device,
                dialect,
                reply,
            } => defer(reply, self.shadows.get(&device, dialect)),
            Command::NextBatch {
                max_reports,
                max_bytes,
                in_flight,
                reply,
            } => {
                // `max_reports` 0 asks for a number only (a heartbeat).
                let reports = if max_reports > 0 {
                    self.outbox
                        .select(self.shadows.docs(), max_reports, max_bytes, &in_flight)
                } else {
                    Vec::new()
                };
                if max_reports > 0 && reports.is_empty() {
                    defer(reply, None)
                } else {
                    defer(
                        reply,
                        Some(self.outbox.number(conn, reports).map_err(&err)?),
                    )
                }
            }
            Command::Ack {
                seq,
                covered,
                reply,
            } => {
                self.outbox.ack(conn, seq, &covered).map_err(&err)?;
                defer(reply, ())
            }
            Command::Stats { reply } => defer(reply, self.outbox.stats(conn).map_err(&err)?),
            Command::Probe { reply } => {
                meta::set(conn, META_PROBE, &now_ms().to_string()).map_err(&err)?;
                defer(reply, ())
            }
            Command::GetMeta { key, reply } => defer(reply, meta::get(conn, key).map_err(&err)?),
            Command::SetMeta { key, value, reply } => {
                meta::set(conn, key, &value).map_err(&err)?;
                defer(reply, ())
            }
            Command::SaveBrokerSessions { deltas, reply } => {
                broker_sessions::write(conn, &deltas).map_err(&err)?;
                defer(reply, ())
            }
            Command::LoadBrokerSessions { reply } => {
                defer(reply, broker_sessions::load(conn).map_err(&err)?)
            }
        })
    }
}
