//! Control files: `<state>/control/<action>.<stream>`, where action is `reset` (the cursor)
//! or `trigger` (run now). The file may hold one line naming who asked. The CLI writes them
//! atomically (temporary name, then rename); the daemon picks them up every
//! `control_poll` or at once on SIGUSR1, acts at the stream's next safe point, writes the
//! audit trail and removes the file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const CONTROL_DIR: &str = "control";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reset,
    Trigger,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reset => "reset",
            Action::Trigger => "trigger",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub path: PathBuf,
    pub action: Result<Action, String>,
    pub stream: String,
    /// Who asked, from the file's first line (else "control file").
    pub actor: String,
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_DIR)
}

/// Creates the control folder, 0700 (not writable by others).
pub fn ensure_dir(state_dir: &Path) -> std::io::Result<PathBuf> {
    let d = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)?;
    Ok(d)
}

/// Parses a control file's name; hidden and temporary files are not requests.
pub fn parse_name(name: &str) -> Option<(Result<Action, String>, String)> {
    if name.starts_with('.') {
        return None;
    }
    let (action, stream) = name.split_once('.')?;
    let action = match action {
        "reset" => Ok(Action::Reset),
        "trigger" => Ok(Action::Trigger),
        other => Err(other.to_string()),
    };
    Some((action, stream.to_string()))
}

/// The requests waiting in the control folder, oldest first.
pub fn pending(state_dir: &Path) -> Vec<Request> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<(std::time::SystemTime, Request)> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some((action, stream)) = parse_name(&name) else {
            continue;
        };
        let path = e.path();
        let actor = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .map(|l| l.trim().chars().take(200).collect::<String>())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "control file".into());
        let mtime = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        out.push((
            mtime,
            Request {
                path,
                action,
                stream,
                actor,
            },
        ));
    }
    out.sort_by_key(|(t, r)| (*t, r.path.clone()));
    out.into_iter().map(|(_, r)| r).collect()
}

/// Writes a request atomically; returns its path.
pub fn write(
    state_dir: &Path,
    action: Action,
    stream: &str,
    actor: &str,
) -> std::io::Result<PathBuf> {
    let d = ensure_dir(state_dir)?;
    let final_path = d.join(format!("{}.{stream}", action.as_str()));
    let tmp = d.join(format!(
        "{TMP_PREFIX}{}-{}.{stream}",
        std::process::id(),
        action.as_str()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{actor}")?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &final_path)
    })();
    if let Err(e) = written {
        // A request that could not be written leaves nothing behind (a full disk, …).
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(final_path)
}

/// Temporary files of [`write`], not requests.
const TMP_PREFIX: &str = ".tmp-";

/// Removes temporary files older than `age` that a CLI killed between writing and renaming
/// left behind. Returns how many.
pub fn sweep(state_dir: &Path, age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d > age))
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// This machine's name (the audit trail and the leases say which host acted).
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Who is running the CLI, and on which host, for the audit trail.
pub fn cli_actor(command: &str) -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid {}", rustix::process::getuid().as_raw()));
    format!("{user}@{} via `usher {command}`", host_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert!(
            matches!(parse_name("reset.crm-out"), Some((Ok(Action::Reset), s)) if s == "crm-out")
        );
        assert!(matches!(parse_name("trigger.x"), Some((Ok(Action::Trigger), s)) if s == "x"));
        assert!(matches!(parse_name("explode.x"), Some((Err(a), _)) if a == "explode"));
        assert!(parse_name(".tmp-1-reset.x").is_none());
        assert!(parse_name("noaction").is_none());
    }

    #[test]
    fn written_requests_are_found_with_their_actor() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Action::Reset, "s1", "alice via cli").unwrap();
        let p = pending(dir.path());
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].stream, "s1");
        assert_eq!(p[0].actor, "alice via cli");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(super::dir(dir.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }
}
