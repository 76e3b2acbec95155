//! One node per data dir: an exclusive advisory lock on `DATA/node.lock`, held for the
//! node's lifetime. A second node on the same data dir gets a clear error, not corruption.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another node holds the lock.
    #[error(
        "another iom node (pid {pid}) is already running on data dir {dir}; stop it first, or \
         pass a different --data-dir"
    )]
    Held {
        /// The data dir.
        dir: PathBuf,
        /// The pid written by the holder (or `unknown`).
        pid: String,
    },
    /// The lock file could not be opened.
    #[error("cannot open lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock on `dir` or reports who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let path = dir.join("node.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(_) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("already running"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn the_lock_is_released_on_drop_and_records_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::fs::read_to_string(dir.path().join("node.lock")).unwrap();
        assert_eq!(pid, std::process::id().to_string());
        drop(held);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_stale_pid_from_a_crashed_node_is_replaced_not_appended() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.lock"), "99999999999").unwrap();
        let _held = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::fs::read_to_string(dir.path().join("node.lock")).unwrap();
        assert_eq!(pid, std::process::id().to_string());
    }

    #[test]
    fn a_holder_that_wrote_no_pid_is_reported_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("node.lock")).unwrap();
        file.try_lock().unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(&err, LockError::Held { pid, .. } if pid == "unknown"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_data_dir_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = DataDirLock::acquire(&missing).unwrap_err();
        assert!(
            matches!(&err, LockError::Io { path, .. } if path == &missing.join("node.lock")),
            "{err}"
        );
    }
}
