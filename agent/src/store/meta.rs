//! Node metadata: the `meta` table's keys (batch numbers, acknowledgements, the commit
//! witness, the desired-stream cursor) and how they are read and written.

use rusqlite::{Connection, OptionalExtension, params};

pub(super) const SET_META: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
pub(super) const GET_META: &str = "SELECT value FROM meta WHERE key = ?1";

/// The last batch number handed out (written with each acknowledgement).
pub(super) const META_SEQ: &str = "seq";
/// Batch numbers are reserved durably in blocks (the last one reserved is stored here), so
/// that a batch read commits without an fsync yet `seq` never goes back after a power cut: a
/// restart continues above the reservation.
pub(super) const META_SEQ_RESERVED: &str = "seq_reserved";
pub(super) const SEQ_BLOCK: u64 = 1000;
/// The highest batch number the controller acknowledged.
pub(super) const META_ACKED_SEQ: &str = "acked_seq";
/// Written by `Store::probe`: when the database last accepted a write after a failure.
pub(super) const META_PROBE: &str = "last_write_probe_ms";
/// Transactions committed over the database's life (see `witness`).
pub(super) const META_COMMITS: &str = "commits";
/// Commits found lost at start, summed over every detection until the alarm is cleared.
pub(super) const META_LOST_COMMITS: &str = "lost_commits";
/// What the last detection found, for the operator.
pub(super) const META_LOST_COMMITS_DETAIL: &str = "lost_commits_detail";
/// Metadata key of the desired-stream resume cursor.
pub const META_DESIRED_CURSOR: &str = "desired_cursor";

/// The value of `key`, if set.
pub(super) fn get(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(GET_META)?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// Sets `key` to `value`.
pub(super) fn set(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(SET_META)?
        .execute(params![key, value])
        .map(|_| ())
}

/// The number stored under `key`; 0 when unset or unreadable.
pub(super) fn get_u64(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    Ok(get(conn, key)?.and_then(|v| v.parse().ok()).unwrap_or(0))
}
