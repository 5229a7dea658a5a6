//! The SQLite backend's file: created 0600 in the state directory, in WAL mode, checked
//! (`quick_check`) and migrated at open; a consistent backup while a daemon writes it
//! (`usher state backup`); and what SQLite's own errors do not say (which file or directory
//! is at fault). The queries themselves are the store's, over [`super::sql::Sql`].

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, params};

use super::{
    BackupInfo, DB_FILE, Fault, MIGRATIONS, Result, Store, StoreError, io_fault, is_damage,
};

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.display().to_string(),
        hint: open_hint(&source, path),
        source,
    }
}

/// SQLite says "unable to open database file" or "attempt to write a readonly database"
/// without naming the file: the database, or its `-wal` or `-shm`, which it creates in the
/// state directory. Says which one is not writable (tried, not guessed from modes).
fn open_hint(e: &rusqlite::Error, path: &Path) -> String {
    use rusqlite::ErrorCode as C;
    if !matches!(
        e.sqlite_error_code(),
        Some(C::CannotOpen | C::ReadOnly | C::PermissionDenied)
    ) {
        return String::new();
    }
    access_hint(path)
}

/// What is at fault when the database at `path` cannot be opened or written: the directory
/// (SQLite creates `-wal` and `-shm` beside the file) or one of the three files.
pub(super) fn access_hint(path: &Path) -> String {
    let Some(dir) = path.parent() else {
        return String::new();
    };
    let probe = dir.join(format!(".usher-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return format!(
                " (SQLite creates usher.db-wal and usher.db-shm beside it, and cannot create a file in {}: {})",
                dir.display(),
                explain_access(e, &probe, false)
            );
        }
    }
    for f in [
        path.to_path_buf(),
        PathBuf::from(format!("{}-wal", path.display())),
        PathBuf::from(format!("{}-shm", path.display())),
    ] {
        if f.exists()
            && let Err(e) = std::fs::OpenOptions::new().append(true).open(&f)
        {
            return format!(" ({})", explain_access(e, &f, false));
        }
    }
    String::new()
}

/// `PRAGMA quick_check`: every page, b-tree and record of the file is readable and well
/// formed (it does not compare indexes with their tables, which `integrity_check` does, at
/// several times the cost). Measured on a 1M-event SeatGeek → Halo state (see
/// ARCHITECTURE.md, "State faults").
pub fn quick_check(conn: &Connection, path: &Path) -> Result<()> {
    check_with(conn, path, "quick_check")
}

fn check_with(conn: &Connection, path: &Path, pragma: &str) -> Result<()> {
    let damaged = |detail: String| StoreError::Damaged {
        path: path.display().to_string(),
        detail,
    };
    let rows: Vec<String> = (|| {
        let mut st = conn.prepare(&format!("PRAGMA {pragma}(20)"))?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
    })()
    .map_err(|source| {
        if is_damage(&source) {
            damaged(format!("{pragma}: {source}"))
        } else {
            sql_err(path)(source)
        }
    })?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    let mut detail = format!("{pragma}: {}", rows.first().cloned().unwrap_or_default());
    if rows.len() > 1 {
        detail.push_str(&format!(" (and {} more problem(s))", rows.len() - 1));
    }
    Err(damaged(detail))
}

/// An access error on `path` with what is at fault: the file itself, or the directory it is
/// in (which must be searchable, and writable to create the file and SQLite's `-wal` and
/// `-shm` beside it), and whom the process runs as.
pub fn explain_access(e: std::io::Error, path: &Path, is_dir: bool) -> std::io::Error {
    use std::os::unix::fs::MetadataExt;
    if io_fault(&e) != Fault::Permission {
        return e;
    }
    let euid = rustix::process::geteuid().as_raw();
    let who = |m: &std::fs::Metadata| {
        format!(
            "owned by uid {} with mode {:04o}; usher runs as uid {euid}",
            m.uid(),
            m.mode() & 0o7777
        )
    };
    let file = (!is_dir).then(|| std::fs::metadata(path).ok()).flatten();
    let start = if is_dir { Some(path) } else { path.parent() };
    // The directory at fault: the nearest one that exists (a missing one cannot be created
    // in its parent).
    let dir = start.and_then(|d| {
        d.ancestors()
            .find_map(|a| std::fs::metadata(a).ok().map(|m| (a.to_path_buf(), m)))
    });
    let detail = match (file, dir) {
        (Some(m), _) => format!("the file {} is {}", path.display(), who(&m)),
        (None, Some((d, m))) => format!("the directory {} is {}", d.display(), who(&m)),
        (None, None) => format!("usher runs as uid {euid}"),
    };
    std::io::Error::new(e.kind(), format!("{e}: {detail}"))
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/usher.db`: mode 0600, WAL, migrations applied.
    pub fn open(state_dir: &Path) -> Result<Store> {
        Self::open_with(state_dir, false)
    }

    /// [`Store::open`] for the daemon: `PRAGMA quick_check` first, so that a damaged file is
    /// refused at start (with the next step) instead of failing every run.
    pub fn open_checked(state_dir: &Path) -> Result<Store> {
        Self::open_with(state_dir, true)
    }

    fn open_with(state_dir: &Path, check: bool) -> Result<Store> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
            path: state_dir.display().to_string(),
            source: explain_access(source, state_dir, true),
        })?;
        let path = state_dir.join(DB_FILE);
        let file_err = |source| StoreError::Io {
            path: path.display().to_string(),
            source: explain_access(source, &path, false),
        };
        // Create the file ourselves so that it is 0600 from its first byte.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(file_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(file_err)?;
        let conn = Connection::open(&path).map_err(sql_err(&path))?;
        Self::prepare(&conn, &path, check).map_err(StoreError::damaged)?;
        Ok(Store::sqlite(path, conn))
    }

    /// A consistent copy of the state database at `dest`, taken while a daemon may be
    /// writing it: `VACUUM INTO` reads the database in one read transaction (a snapshot; in
    /// WAL mode the daemon's commits go on meanwhile) and writes a compact copy, here into a
    /// temporary file beside `dest` created 0600, which is synced, checked with
    /// `quick_check` and renamed to `dest`. Refuses a `dest` that exists.
    pub fn backup(state_dir: &Path, dest: &Path) -> Result<BackupInfo> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no state database here (check --state-dir or daemon.state_dir)",
                ),
            });
        }
        let dest_err = |source| StoreError::Io {
            path: dest.display().to_string(),
            source,
        };
        if dest.exists() {
            return Err(dest_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists already; remove it or name another file",
            )));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "usher-backup".into());
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| StoreError::Io {
                path: tmp.display().to_string(),
                source: explain_access(e, &tmp, false),
            })?;
        let result = (|| {
            let conn = Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sql_err(&path))?;
            conn.busy_timeout(Duration::from_secs(10))
                .map_err(sql_err(&path))?;
            let schema: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sql_err(&path))?;
            conn.execute("VACUUM INTO ?1", params![tmp.display().to_string()])
                .map_err(sql_err(&path))
                .map_err(StoreError::damaged)?;
            drop(conn);
            let copy = Connection::open(&tmp).map_err(sql_err(&tmp))?;
            quick_check(&copy, &tmp)?;
            drop(copy);
            let f = std::fs::File::open(&tmp).map_err(dest_err)?;
            f.sync_all().map_err(dest_err)?;
            let bytes = f.metadata().map_err(dest_err)?.len();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(dest_err)?;
            std::fs::rename(&tmp, dest).map_err(dest_err)?;
            if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty())
                && let Ok(d) = std::fs::File::open(dir)
            {
                let _ = d.sync_all();
            }
            Ok(BackupInfo { bytes, schema })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// `quick_check` (or, `full`, `integrity_check`) of the state database, read while a
    /// daemon may be writing it.
    pub fn check(state_dir: &Path, full: bool) -> Result<()> {
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err(&path))
        .map_err(StoreError::damaged)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql_err(&path))?;
        check_with(
            &conn,
            &path,
            if full {
                "integrity_check"
            } else {
                "quick_check"
            },
        )
    }

    /// Opens an existing database for reading and small CLI changes, without migrating it.
    /// Used by `status` and `cursor show` while a daemon may be running.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Store>> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open(&path).map_err(sql_err(&path))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql_err(&path))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql_err(&path))
            .map_err(StoreError::damaged)?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew {
                path: path.display().to_string(),
                found: version,
                known: MIGRATIONS.len() as i64,
            });
        }
        if version < MIGRATIONS.len() as i64 {
            // Not migrated yet (or empty): treat as "nothing recorded".
            return Ok(None);
        }
        Ok(Some(Store::sqlite(path, conn)))
    }

    fn prepare(conn: &Connection, path: &Path, check: bool) -> Result<()> {
        let e = sql_err(path);
        conn.busy_timeout(Duration::from_secs(10)).map_err(&e)?;
        if check {
            quick_check(conn, path)?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&e)?;
        // FULL: a commit survives power loss; commits are per page, so the fsync is cheap.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&e)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(&e)?;
        // A fixed 1 MiB page cache (SQLite's default is 2 MiB): the OS caches the file
        // anyway, and usher's memory then stays the same however large the state grows
        // (a look-up that misses costs a read from the OS cache, not measurable in the
        // benchmarks).
        conn.pragma_update(None, "cache_size", -1024).map_err(&e)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&e)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.display().to_string(),
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let n = i as i64 + 1;
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {n}; COMMIT;"
            ))
            .map_err(|source| {
                let _ = conn.execute_batch("ROLLBACK");
                StoreError::Sqlite {
                    path: format!("{} (migration {n})", path.display()),
                    hint: open_hint(&source, path),
                    source,
                }
            })?;
        }
        // The -wal and -shm files are created by SQLite with the main file's mode; make sure.
        for suffix in ["-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            if p.exists() {
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
            }
        }
        Ok(())
    }
}
