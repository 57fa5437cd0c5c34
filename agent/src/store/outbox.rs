//! The outbox: at most one pending report per device (its latest unacknowledged version),
//! batch numbers (reserved durably in blocks) and the controller's acknowledgements.
//!
//! Every method runs inside the writer's current transaction; the in-memory copy of the
//! table ([`Pending`]) changes with it and is read again when a transaction fails.

use std::collections::{BTreeMap, HashMap};

use edgesync_protocol::shadow::ShadowDocument;
use edgesync_protocol::wire::Report;
use rusqlite::{Connection, params};

use super::meta::{self, META_ACKED_SEQ, META_SEQ, META_SEQ_RESERVED, SEQ_BLOCK};
use super::pending::Pending;
use super::{InFlight, OutboxStats, PendingBatch, age_seconds, now_ms, rfc3339};

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
/// Batches whose read time is remembered for the age restart (older ones fall back to the
/// ack time).
const MAX_BATCHES_TIMED: usize = 256;

/// The outbox and its batch numbers.
pub(super) struct Outbox {
    /// The outbox table's rows, kept with it.
    pending: Pending,
    /// The last batch number handed out.
    seq: u64,
    /// The highest `seq` durably reserved (`meta.seq_reserved`).
    seq_reserved: u64,
    /// When each batch in flight was read from the outbox (ms since the epoch), by seq.
    batch_read_ms: BTreeMap<u64, i64>,
}

/// Where the batch numbers stood, to go back to when a transaction fails.
pub(super) struct SeqMark(u64, u64);

impl Outbox {
    /// Reads the outbox table and the batch numbers.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        // Above anything handed out before, even if the last `seq` writes were lost.
        let seq_reserved = meta::get_u64(conn, META_SEQ_RESERVED)?;
        let seq = meta::get_u64(conn, META_SEQ)?.max(seq_reserved);
        let rows = conn
            .prepare(SELECT_OUTBOX)?
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Self {
            pending: Pending::from_rows(rows),
            seq,
            seq_reserved,
            batch_read_ms: BTreeMap::new(),
        })
    }

    /// Reads the table and the batch numbers again (a transaction failed), keeping when the
    /// batches in flight were read.
    pub(super) fn reload(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let fresh = Self::load(conn)?;
        (self.pending, self.seq, self.seq_reserved) =
            (fresh.pending, fresh.seq, fresh.seq_reserved);
        Ok(())
    }

    /// Pending devices and the oldest enqueue time (ms since the epoch).
    pub(super) fn count_oldest(&self) -> (u64, Option<i64>) {
        self.pending.count_oldest()
    }

    /// Marks `version` of `device` pending.
    pub(super) fn enqueue(
        &mut self,
        conn: &Connection,
        device: &str,
        version: u64,
    ) -> rusqlite::Result<()> {
        let now = now_ms();
        conn.prepare_cached(UPSERT_OUTBOX)?
            .execute(params![device, version as i64, now])?;
        self.pending.upsert(device, version, now);
        Ok(())
    }

    /// The batch numbers now.
    pub(super) fn mark(&self) -> SeqMark {
        SeqMark(self.seq, self.seq_reserved)
    }

    /// Goes back to `mark` (its transaction failed).
    pub(super) fn restore(&mut self, mark: SeqMark) {
        (self.seq, self.seq_reserved) = (mark.0, mark.1);
    }

    /// Whether `reads` more batch reads stay within the durable reservation (and so write
    /// nothing that must survive a power loss).
    pub(super) fn reserved_for(&self, reads: u64) -> bool {
        self.seq + reads <= self.seq_reserved
    }

    /// The reports of the next batch, each with the time its device became pending (ms since
    /// the epoch): pending devices oldest first, within `max_reports` and
    /// about `max_bytes` of JSON. A device a batch in flight carries comes only if its state
    /// is newer, and after every device no batch carries: otherwise the oldest devices, which
    /// change again while in flight, would fill every batch and starve the rest.
    pub(super) fn select(
        &self,
        shadows: &HashMap<String, ShadowDocument>,
        max_reports: usize,
        max_bytes: usize,
        in_flight: &InFlight,
    ) -> Vec<(Report, i64)> {
        let mut fresh = Vec::new();
        let mut again = Vec::new();
        // Every pending device is looked at on each read: borrowed, not copied, until chosen.
        for (name, since) in self.pending.oldest_first() {
            let Some((device, doc)) = shadows.get_key_value(name) else {
                continue;
            };
            match in_flight.get(name) {
                None => fresh.push((device, doc, since)),
                Some(&sent) if sent < doc.version => again.push((device, doc, since)),
                Some(_) => {}
            }
            if fresh.len() >= max_reports {
                break;
            }
        }
        let mut reports = Vec::new();
        let mut bytes = 0usize;
        for (device, doc, since) in fresh.into_iter().chain(again) {
            // 128 for the envelope; a refusal adds at most its two capped strings and numbers.
            let refusal = doc
                .rejection
                .as_ref()
                .map_or(0, |r| r.code.len() + r.message.len() * 6 + 96);
            let size = edgesync_protocol::shadow::encoded_object_len(&doc.state.reported)
                + device.len()
                + 128
                + refusal;
            if !reports.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            let report = Report {
                device: device.clone(),
                version: doc.version,
                reported: doc.state.reported.clone(),
                reported_at: rfc3339(doc.timestamp),
                observed_desired_version: doc.desired_generation,
                connected: doc.connected,
                rejection: doc.rejection.clone(),
            };
            reports.push((report, since));
            if reports.len() >= max_reports {
                break;
            }
        }
        reports
    }

    /// Numbers a batch of `reports` (a heartbeat when empty).
    pub(super) fn number(
        &mut self,
        conn: &Connection,
        reports: Vec<(Report, i64)>,
    ) -> rusqlite::Result<PendingBatch> {
        self.seq += 1;
        if self.seq > self.seq_reserved {
            self.seq_reserved = self.seq + SEQ_BLOCK - 1;
            meta::set(conn, META_SEQ_RESERVED, &self.seq_reserved.to_string())?;
        }
        // meta.seq itself is written with the acknowledgement: within the reservation, a
        // batch read writes nothing and so commits nothing.
        self.batch_read_ms.insert(self.seq, now_ms());
        if self.batch_read_ms.len() > MAX_BATCHES_TIMED {
            self.batch_read_ms.pop_first();
        }
        let (reports, pending_since_ms) = reports.into_iter().unzip();
        Ok(PendingBatch {
            seq: self.seq,
            reports,
            pending_since_ms,
        })
    }

    /// Records the controller's acknowledgement of batch `seq`: the rows of `covered` up to
    /// their acknowledged version leave the outbox.
    pub(super) fn ack(
        &mut self,
        conn: &Connection,
        seq: u64,
        covered: &[(String, u64)],
    ) -> rusqlite::Result<()> {
        let read_ms = self.batch_read_ms.remove(&seq).unwrap_or_else(now_ms);
        {
            let mut delete = conn.prepare_cached(DELETE_ACKED)?;
            let mut restart = conn.prepare_cached(RESTART_PENDING_AGE)?;
            for (device, version) in covered {
                delete.execute(params![device, *version as i64])?;
                restart.execute(params![device, *version as i64, read_ms])?;
                self.pending.ack(device, *version, read_ms);
            }
        }
        if seq > meta::get_u64(conn, META_ACKED_SEQ)? {
            meta::set(conn, META_ACKED_SEQ, &seq.to_string())?;
        }
        meta::set(conn, META_SEQ, &self.seq.to_string())
    }

    /// The outbox's figures, from the in-memory copy (the table has no index to answer from).
    pub(super) fn stats(&self, conn: &Connection) -> rusqlite::Result<OutboxStats> {
        let (pending_devices, oldest) = self.pending.count_oldest();
        Ok(OutboxStats {
            pending_devices,
            oldest_pending_age_seconds: age_seconds(oldest),
            last_acked_seq: meta::get_u64(conn, META_ACKED_SEQ)?,
            // meta.seq lags until the next acknowledgement; the writer knows the last.
            last_seq: self.seq,
        })
    }
}
