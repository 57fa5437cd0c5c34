//! The database's epoch: a random id chosen when the database is created (or first opened by
//! an agent that knows epochs), sent with every report batch.
//!
//! Versions count per database, so a reinstalled agent, or one whose database was deleted,
//! starts its versions again at 1. The controller orders a device's reports by
//! `(epoch, version)` and lets the node's new epoch supersede the old one; without it, those
//! reports would be `stale` until their versions passed the old ones. The epoch lives in the
//! database itself, not beside it: it names exactly one sequence of versions.

use std::path::Path;

use edgesync_protocol::wire::{check_epoch, epoch_from_random};
use rusqlite::{Connection, OptionalExtension};

use super::{GET_META, SET_META, StoreError, sqlite_err};

/// Metadata key of the epoch.
pub(super) const META_EPOCH: &str = "epoch";

/// The database's epoch, created and committed on first use.
pub(super) fn load_or_create(conn: &Connection, path: &Path) -> Result<String, StoreError> {
    let err = sqlite_err(path);
    if let Some(epoch) = read(conn).map_err(&err)? {
        // Only this agent writes it; a value it cannot send means the file was edited.
        if check_epoch(&epoch).is_ok() && !epoch.is_empty() {
            return Ok(epoch);
        }
    }
    // Not secret, only unique: fastrand is seeded from the OS's randomness per process.
    let epoch = epoch_from_random(fastrand::u128(..));
    conn.execute(SET_META, [META_EPOCH, epoch.as_str()])
        .map_err(&err)?;
    Ok(epoch)
}

/// The stored epoch, if any (for read-only views).
pub(super) fn read(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(GET_META, [META_EPOCH], |r| r.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
        )
        .unwrap();
        conn
    }

    #[test]
    fn an_epoch_is_created_once_and_kept() {
        let conn = db();
        let path = Path::new("test.db");
        let first = load_or_create(&conn, path).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create(&conn, path).unwrap(), first);
        assert_eq!(read(&conn).unwrap(), Some(first.clone()));
        // Another database gets another epoch.
        assert_ne!(load_or_create(&db(), path).unwrap(), first);
    }

    #[test]
    fn an_unsendable_epoch_is_replaced() {
        let conn = db();
        conn.execute(SET_META, [META_EPOCH, "not an epoch"])
            .unwrap();
        let e = load_or_create(&conn, Path::new("test.db")).unwrap();
        assert_eq!(check_epoch(&e), Ok(()));
        assert_ne!(e, "not an epoch");
    }
}
