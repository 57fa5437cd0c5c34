//! Lost-commit detection: a database that is behind what it had already committed, and the
//! sticky alarm it raises.
//!
//! Every transaction increments a counter in `meta`, in the same transaction. After each
//! commit the writer records the counter in a small file next to the database
//! (`edgesync-agent.commits`, beside `edgesync-agent.db`). At start, a database whose counter
//! is below the file's has lost at least that many commits: its `-wal` file was deleted after
//! a crash, an older copy was restored, or the file was replaced. What is lost is exactly what
//! was acknowledged to devices and sent upstream since, because every acknowledgement and
//! every batch `seq` waits for a commit.
//!
//! Why a local counter and not the controller's view of the node's `seq`: `seq` advances only
//! when batches are sent, so it misses lost device updates while the uplink is down or not
//! configured, and in-flight batches arrive out of order, so a comparison upstream needs a
//! tolerance that hides small losses. The counter sees every commit, costs one row write per
//! group commit and one unsynced 21-byte write after it, and works with no uplink.
//!
//! The file is written after the commit and not fsynced, so it can only lag the database
//! (a crash between the two, or a power loss): a lagging witness misses a loss, it never
//! reports one that did not happen. An unreadable witness is ignored with a warning.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::schema::open_rw;
use super::{
    GET_META, META_LOST_COMMITS, META_LOST_COMMITS_DETAIL, SET_META, StoreError, StoreHealth,
    get_meta_u64, sqlite_err,
};

/// The witness file for the database at `db`.
pub(super) fn path_for(db: &Path) -> PathBuf {
    db.with_extension("commits")
}

/// The open witness file.
#[derive(Debug)]
pub struct Witness {
    file: Option<File>,
    path: PathBuf,
}

impl Witness {
    /// Opens (creating) the witness of `db`; returns it with the count it holds, if any.
    pub fn open(db: &Path) -> (Self, Option<u64>) {
        let path = path_for(db);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot open the commit witness; lost commits will not be detected");
                return (Self { file: None, path }, None);
            }
        };
        let mut text = String::new();
        let recorded = match file.read_to_string(&mut text) {
            Ok(_) if text.trim().is_empty() => None,
            Ok(_) => match text.trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::warn!(path = %path.display(), "The commit witness is not a number; ignoring it");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot read the commit witness; ignoring it");
                None
            }
        };
        (
            Self {
                file: Some(file),
                path,
            },
            recorded,
        )
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `commits`: a fixed-width overwrite in place, so it needs no new disk space
    /// and a full disk cannot make it fail.
    pub fn record(&self, commits: u64) {
        if let Some(f) = &self.file
            && let Err(e) = f.write_all_at(format!("{commits:020}\n").as_bytes(), 0)
        {
            tracing::debug!(path = %self.path.display(), error = %e, "Cannot update the commit witness");
        }
    }
}

/// At start: compares the database's commit count with the witness, raises the sticky alarm
/// (in `meta`, so a restart does not hide it) when commits were lost, loads the alarm into
/// `health`, and brings the witness up to date. Returns the open witness for the writer.
///
/// # Errors
/// [`StoreError`] when the alarm cannot be read or written.
pub(super) fn check_at_start(
    conn: &Connection,
    path: &Path,
    commits: u64,
    health: &StoreHealth,
) -> Result<Witness, StoreError> {
    let err = sqlite_err(path);
    let (witness, recorded) = Witness::open(path);
    if let Some(lost) = lost_commits(recorded, commits) {
        let detail = format!(
            "{} is {lost} commits behind {} (at commit {commits} of {}): device updates acknowledged and reports sent since then are gone. Was the -wal file deleted after a crash, or an older copy restored? Check the devices and the Device objects, then clear this alarm with `edgesync-agent store clear-lost-commits`",
            path.display(),
            witness.path().display(),
            commits + lost,
        );
        tracing::error!("The database has lost commits: {detail}");
        conn.execute_batch("BEGIN IMMEDIATE").map_err(&err)?;
        let total = get_meta_u64(conn, META_LOST_COMMITS).map_err(&err)? + lost;
        for (key, value) in [
            (META_LOST_COMMITS, total.to_string()),
            (META_LOST_COMMITS_DETAIL, detail),
        ] {
            conn.execute(SET_META, params![key, value]).map_err(&err)?;
        }
        conn.execute_batch("COMMIT").map_err(&err)?;
    }
    witness.record(commits);
    let lost = get_meta_u64(conn, META_LOST_COMMITS).map_err(&err)?;
    if lost > 0 {
        let detail: Option<String> = conn
            .query_row(GET_META, [META_LOST_COMMITS_DETAIL], |r| r.get(0))
            .optional()
            .map_err(&err)?;
        health.set_lost_commits(lost, detail.unwrap_or_default());
    }
    Ok(witness)
}

/// Clears the lost-commits alarm (`edgesync-agent store clear-lost-commits`), once the
/// operator has checked what was lost. The caller holds the data_dir lock: the agent is not
/// running. Returns the count the alarm held, or `None` when there was none.
///
/// # Errors
/// [`StoreError`] when the database cannot be opened or written.
pub fn clear_lost_commits(db: &Path) -> Result<Option<u64>, StoreError> {
    let conn = open_rw(db, crate::config::Durability::PowerLossSafe)?;
    let err = sqlite_err(db);
    let lost = get_meta_u64(&conn, META_LOST_COMMITS).map_err(&err)?;
    conn.execute(
        "DELETE FROM meta WHERE key IN (?1, ?2)",
        [META_LOST_COMMITS, META_LOST_COMMITS_DETAIL],
    )
    .map_err(&err)?;
    Ok((lost > 0).then_some(lost))
}

/// What the start-up comparison found.
pub fn lost_commits(recorded: Option<u64>, in_database: u64) -> Option<u64> {
    recorded
        .filter(|&r| r > in_database)
        .map(|r| r - in_database)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_behind_its_witness_has_lost_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("edgesync-agent.db");
        let (w, recorded) = Witness::open(&db);
        assert_eq!(recorded, None, "a new witness holds nothing");
        w.record(120);
        w.record(7); // fixed width: a smaller number overwrites a larger one entirely
        drop(w);
        let (_, recorded) = Witness::open(&db);
        assert_eq!(recorded, Some(7));
        assert_eq!(lost_commits(Some(7), 7), None);
        assert_eq!(
            lost_commits(Some(7), 9),
            None,
            "a lagging witness is not a loss"
        );
        assert_eq!(lost_commits(Some(7), 2), Some(5));
        assert_eq!(lost_commits(None, 0), None);
        std::fs::write(path_for(&db), "garbage").unwrap();
        assert_eq!(Witness::open(&db).1, None);
    }
}
