//! One daemon per state directory: an exclusive lock on `<state>/usher.lock`, which also
//! holds the daemon's PID so that the CLI can signal it. The lock is the kernel's (flock),
//! so a daemon killed with SIGKILL leaves no stale lock behind.
//!
//! The file is also where the daemon tells the CLI what the state database cannot hold:
//! that the state cannot be written ([`StateLock::note_state`], shown by `usher status`). It
//! is one block of [`LOCK_SIZE`] bytes, written at start and then only overwritten in place,
//! so a note still fits when the disk is full.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "usher.lock";
/// The lock file's size: its first line is the PID, then notes, padded with spaces.
pub const LOCK_SIZE: usize = 4096;
const STATE_NOTE: &str = "state-error ";

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
    /// What the failure means for the exit code (as the state's own errors).
    pub fn fault(&self) -> Option<crate::store::Fault> {
        match self {
            LockError::Held { .. } => None,
            LockError::Io { source, .. } => Some(crate::store::io_fault(source)),
        }
    }
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
    file: File,
    pub path: PathBuf,
}

fn open(dir: &Path) -> Result<(File, PathBuf), LockError> {
    std::fs::create_dir_all(dir).map_err(|source| LockError::Io {
        dir: dir.display().to_string(),
        source: crate::store::explain_access(source, dir, true),
    })?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| LockError::Io {
            dir: dir.display().to_string(),
            source: crate::store::explain_access(source, &path, false),
        })?;
    Ok((file, path))
}

fn read_text(file: &mut File) -> Option<String> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    Some(s)
}

fn read_pid(file: &mut File) -> Option<u32> {
    read_text(file)?.lines().next()?.trim().parse().ok()
}

/// The lock file's block: the PID, then the state note if any, padded to [`LOCK_SIZE`].
fn block(pid: u32, state: Option<&crate::metrics::StateError>) -> Vec<u8> {
    let mut text = format!("{pid}\n");
    if let Some(e) = state {
        let mut e = e.clone();
        if e.error.len() > LOCK_SIZE / 2 {
            let mut cut = LOCK_SIZE / 2;
            while !e.error.is_char_boundary(cut) {
                cut -= 1;
            }
            e.error.truncate(cut);
        }
        if let Ok(json) = serde_json::to_string(&e) {
            text.push_str(STATE_NOTE);
            text.push_str(&json);
            text.push('\n');
        }
    }
    let mut b = text.into_bytes();
    b.truncate(LOCK_SIZE - 1);
    b.resize(LOCK_SIZE - 1, b' ');
    b.push(b'\n');
    b
}

impl StateLock {
    /// The lock file's device and inode, as this process holds it.
    pub fn identity(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Tells the CLI (through the lock file) that the state cannot be written, or no longer.
    /// Overwrites the block in place: no new space is needed on a full disk.
    pub fn note_state(&self, state: Option<&crate::metrics::StateError>) -> std::io::Result<()> {
        self.file.write_all_at(&block(std::process::id(), state), 0)
    }
}

/// What the daemon holding the state directory noted about the state: since when, and
/// why, it cannot write it. `None` when no daemon holds it or it noted nothing.
pub fn state_note(dir: &Path) -> Option<crate::metrics::StateError> {
    holder(dir)?;
    let mut file = OpenOptions::new()
        .read(true)
        .open(dir.join(LOCK_FILE))
        .ok()?;
    let text = read_text(&mut file)?;
    let line = text.lines().find_map(|l| l.strip_prefix(STATE_NOTE))?;
    serde_json::from_str(line).ok()
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
    // The whole block, written over what was there (never truncated first), and synced, so
    // that its space is allocated for the notes written over it later.
    file.write_all_at(&block(std::process::id(), None), 0)
        .map_err(io)?;
    file.set_len(LOCK_SIZE as u64).map_err(io)?;
    file.sync_data().map_err(io)?;
    Ok(StateLock { file, path })
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

/// What a process of this machine is doing, from /proc: `Some('T')` stopped (SIGSTOP),
/// `Some('t')` traced, `Some('R')`, `Some('S')`, `Some('Z')` dead but not reaped, …; `None`
/// when it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) STATE …": comm may hold spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
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
