//! The read-only view used by the CLI (`shadow get`, `shadow list`, `outbox`): its own
//! connection, safe while the agent runs (WAL).

use std::path::{Path, PathBuf};

use edgesync_protocol::shadow::ShadowDocument;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{
    META_ACKED_SEQ, META_SEQ, OutboxStats, StoreError, age_seconds, decode, get_meta_u64,
    sqlite_err,
};

// The writer answers these from its copy of the outbox in memory; the table has no index on
// age (schema v5), so these scan it, which a CLI command run by hand can afford.
const SELECT_PENDING: &str = "SELECT device, version FROM outbox ORDER BY enqueued_at_ms, device";
const OUTBOX_STATS: &str = "SELECT count(*), min(enqueued_at_ms) FROM outbox";

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

    /// The database's epoch (none before the agent first opened it).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn epoch(&self) -> Result<Option<String>, StoreError> {
        super::epoch::read(&self.conn).map_err(sqlite_err(&self.path))
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

fn outbox_stats(conn: &Connection, path: &Path) -> Result<OutboxStats, StoreError> {
    let err = sqlite_err(path);
    let (count, oldest): (i64, Option<i64>) = conn
        .query_row(OUTBOX_STATS, [], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(&err)?;
    Ok(OutboxStats {
        pending_devices: count as u64,
        oldest_pending_age_seconds: age_seconds(oldest),
        last_acked_seq: get_meta_u64(conn, META_ACKED_SEQ).map_err(&err)?,
        last_seq: get_meta_u64(conn, META_SEQ).map_err(&err)?,
    })
}
