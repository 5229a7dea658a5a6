//! One daemon per state directory: an exclusive lock on `<state>/usher.lock`, which also
//! holds the daemon's PID so that the CLI can signal it. The lock is the kernel's (flock),
//! so a daemon killed with SIGKILL leaves no stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "usher.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another usher{pid_text} holds the state directory {dir} (lock {lock}); \
         only one daemon may use a state directory at a time"
    )]
    Held {
        dir: String,
        lock: String,
        pid: Option<u32>,
        pid_text: String,
    },
    #[error("cannot lock the state directory {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

impl LockError {
    fn held(dir: &Path, lock: &Path, pid: Option<u32>) -> Self {
        LockError::Held {
            dir: dir.display().to_string(),
            lock: lock.display().to_string(),
            pid,
            pid_text: pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        }
    }
}

/// Held for as long as the process works on the state directory.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

fn open(dir: &Path) -> Result<(File, PathBuf), LockError> {
    let io = |source| LockError::Io {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    Ok((file, path))
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Takes the lock and writes our PID into it, or says who holds it.
pub fn acquire(dir: &Path) -> Result<StateLock, LockError> {
    let (mut file, path) = open(dir)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let pid = read_pid(&mut file);
            return Err(LockError::held(dir, &path, pid));
        }
        Err(TryLockError::Error(source)) => {
            return Err(LockError::Io {
                dir: dir.display().to_string(),
                source,
            });
        }
    }
    let io = |source| LockError::Io {
        dir: dir.display().to_string(),
        source,
    };
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(StateLock { _file: file, path })
}

/// The PID of the daemon holding the state directory, if one does.
pub fn holder(dir: &Path) -> Option<u32> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new().read(true).open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(TryLockError::WouldBlock) => read_pid(&mut file),
        Err(TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let err = acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert_eq!(holder(dir.path()), Some(std::process::id()));
        drop(first);
        assert_eq!(holder(dir.path()), None);
        acquire(dir.path()).unwrap();
    }
}
