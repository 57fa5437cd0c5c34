//! One agent per data_dir: an exclusive lock on `{data_dir}/edgesync-agent.lock`, held for
//! the life of the process (the OS releases it when the process dies, even on kill -9).
//!
//! Two agents on one database would each serve from their own in-memory copy and overwrite
//! the other's acknowledged updates. The read-only CLI commands do not take the lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

use anyhow::{Context as _, bail};

/// The lock file's name inside the data_dir.
pub const LOCK_FILE: &str = "edgesync-agent.lock";

/// Holds the data_dir lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes the data_dir's lock and writes this process's id into it.
///
/// # Errors
/// When another process holds it (the message names its pid), or the file cannot be opened.
pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let path = data_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_owned()
            } else {
                format!("another edgesync-agent (pid {holder})")
            };
            bail!(
                "data_dir {} is in use by {who}: two agents on one database would overwrite each other's acknowledged updates. Stop the other agent, or give this one its own data_dir",
                data_dir.display()
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let err = acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        acquire(dir.path()).unwrap();
    }
}
