//! The database file: schema migrations and the connection settings durability rests on.

use std::path::Path;

use rusqlite::Connection;

use super::{StoreError, broker_sessions, sqlite_err};
use crate::config::Durability;

const SCHEMA_VERSION: i64 = 6;
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
    // v5: the outbox's order by age is kept in memory by the writer (`pending.rs`); the
    // index only cost WAL frames on every enqueue and acknowledgement. The read-only CLI
    // sorts the table itself, as it does rarely and the table holds one row per device.
    "DROP INDEX outbox_by_age",
    // v6: the dialect each device id belongs to (one identity namespace for all dialects).
    super::claims::MIGRATION_V6,
];

pub(super) fn open_rw(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let err = sqlite_err(path);
    let conn = Connection::open(path).map_err(&err)?;
    // Every statement the writer runs stays prepared (about 30, rusqlite keeps 16 by default):
    // evicting one means parsing it again on a hot path.
    conn.set_prepared_statement_cache_capacity(64);
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
pub(super) fn effective_pragmas(conn: &Connection) -> rusqlite::Result<(String, i64)> {
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
