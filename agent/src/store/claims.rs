//! Which dialect each device id belongs to (see `edgesync_protocol::identity`): one row per
//! device, written in the same transaction as the device's first accepted update, so the
//! first dialect to write an id keeps it across restarts and no other dialect can read or
//! write that device's shadow.
//!
//! Only the store's writer thread calls these.

use std::collections::HashMap;

use edgesync_protocol::identity::Dialect;
use rusqlite::{Connection, params};

/// v6 schema change: the dialect that owns each device id. Devices stored before have no
/// row and belong to the next dialect that writes them.
pub(super) const MIGRATION_V6: &str = "CREATE TABLE device_claims (
        device TEXT PRIMARY KEY NOT NULL,
        dialect TEXT NOT NULL
    ) WITHOUT ROWID";

const INSERT_CLAIM: &str =
    "INSERT INTO device_claims (device, dialect) VALUES (?1, ?2) ON CONFLICT (device) DO NOTHING";
const SELECT_CLAIMS: &str = "SELECT device, dialect FROM device_claims";

/// Every claim on disk. A label this version does not know is left out (its device then
/// belongs to the next dialect that writes it).
pub(super) fn load(conn: &Connection) -> rusqlite::Result<HashMap<String, Dialect>> {
    let mut stmt = conn.prepare(SELECT_CLAIMS)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut claims = HashMap::new();
    for row in rows {
        let (device, label) = row?;
        if let Some(d) = Dialect::from_label(&label) {
            claims.insert(device, d);
        }
    }
    Ok(claims)
}

/// Records that `device` belongs to `dialect` (inside the caller's transaction).
pub(super) fn record(conn: &Connection, device: &str, dialect: Dialect) -> rusqlite::Result<()> {
    conn.prepare_cached(INSERT_CLAIM)?
        .execute(params![device, dialect.label()])
        .map(|_| ())
}
