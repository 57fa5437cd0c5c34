//! Lost-commit detection: a database that is behind what it had already committed.
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

/// The witness file for the database at `db`.
pub fn path_for(db: &Path) -> PathBuf {
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
