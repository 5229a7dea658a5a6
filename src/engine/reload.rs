//! The daemon's verdict on its configuration, for `usher reload` (the unit's `ExecReload`):
//! `<state>/reload.json` says which daemon (PID) wrote it, how many reloads it has judged
//! (the generation: 0 once it is ready, then one more per SIGHUP), whether the last one was
//! taken, and the problems that made it refuse one. `usher reload` reads the generation,
//! sends SIGHUP and waits for a higher one, so that `systemctl reload usher` fails when the
//! daemon refused the new configuration (the old one keeps running) instead of reporting
//! the signal as a success.
//!
//! The file is written whole under a temporary name and renamed (mode 0600): a reader sees
//! the old verdict or the new one, never half of one. It holds problem texts only, which
//! name files and keys, never a secret (`config::Problem` never formats one).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const FILE: &str = "reload.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The daemon that judged: a verdict of an earlier daemon on this state says nothing
    /// about the one running now.
    pub pid: u32,
    /// 0 when the daemon became ready; one more for each reload it judged.
    pub generation: u64,
    /// Whether the configuration of this generation was taken (always at 0).
    pub accepted: bool,
    /// Why it was refused, one problem a line (empty when taken).
    pub problems: Vec<String>,
    /// Streams in the configuration now running.
    pub streams: usize,
    pub at: DateTime<Utc>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Writes the verdict atomically (temporary file, then rename).
pub fn write(state_dir: &Path, v: &Verdict) -> std::io::Result<()> {
    let tmp = state_dir.join(format!(".{FILE}.tmp-{}", std::process::id()));
    let json = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_data()?;
        std::fs::rename(&tmp, path(state_dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The last verdict written on this state, if any can be read.
pub fn read(state_dir: &Path) -> Option<Verdict> {
    let text = std::fs::read(path(state_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let v = Verdict {
            pid: 42,
            generation: 3,
            accepted: false,
            problems: vec!["usher.toml: stream \"a\": key `every`: bad".into()],
            streams: 2,
            at: Utc::now(),
        };
        write(dir.path(), &v).unwrap();
        assert_eq!(read(dir.path()), Some(v));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, [FILE], "no temporary file is left");
    }
}
