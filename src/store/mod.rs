//! The only code that speaks SQL: one SQLite file under the state directory.
//!
//! Tables: cursors, links, outbox, ledger, page_digests, owed, runs, dead_letters, audit,
//! schedule (see `migrations.rs`). The file is created 0600, in WAL mode, migrated at open.
//! **A cursor is only ever written by [`Store::commit_page`] (or a reset), in the same
//! transaction as the links, outbox rows, ledger rows, owed records and dead letters of the
//! records it covers.** Owed records, too, are only written by `commit_page`. rusqlite is blocking: every call runs on tokio's blocking pool through
//! [`Store::call`], never on the async executor's threads.

mod budgets;
mod in_doubt;
mod migrations;
// S-360
mod s360;
// Integration settings branch: online checks and CDP pauses.
mod settings;
pub use settings::{OnlineCheck, StreamPause};

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

pub use budgets::BudgetRow;
pub use in_doubt::{Doubt, DoubtState};
pub use migrations::MIGRATIONS;
// S-360
pub use s360::{InboxBatch, InboxOutcome, InboxRecord, InboxRow, RecordId};

pub const DB_FILE: &str = "usher.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}{hint}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
        /// What is at fault when SQLite cannot open or write a file (its message does not
        /// say which): empty otherwise.
        hint: String,
    },
    #[error("state directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state database {path} was written by a newer usher (schema {found}, this usher knows up to {known}); \
         run the newer usher or restore a backup"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("state database task failed: {0}")]
    Task(String),
    /// `PRAGMA quick_check` found damage, or SQLite said so (`SQLITE_CORRUPT`, `SQLITE_NOTADB`).
    #[error(
        "state database {path} is damaged ({detail}); usher cannot use it as it is: stop usher, \
         move usher.db, usher.db-wal and usher.db-shm aside and start again (each stream reads its \
         source again from the start and finds what its target already holds: README, \"State\"), \
         or restore a backup taken with `usher state backup`"
    )]
    Damaged { path: String, detail: String },
}

/// What a failure of the state means for whoever hit it, and so the exit code of a command
/// that cannot start without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It may pass by itself: the disk full, an I/O error, the file busy, out of
    /// descriptors. Try again later (exit 75, which systemd restarts).
    Transient,
    /// This process may not open or write the file or its directory (exit 77).
    Permission,
    /// The state itself cannot be used: damaged, written by a newer usher, not usher's
    /// (exit 65, not restarted: trying again would not help).
    Unusable,
}

impl StoreError {
    pub fn fault(&self) -> Fault {
        match self {
            StoreError::Sqlite { source, .. } => sqlite_fault(source).unwrap_or(Fault::Unusable),
            StoreError::Io { source, .. } => io_fault(source),
            StoreError::TooNew { .. } | StoreError::Damaged { .. } => Fault::Unusable,
            StoreError::Task(_) => Fault::Transient,
        }
    }

    /// The damage SQLite reported, as [`StoreError::Damaged`]; other errors as they are.
    fn damaged(self) -> StoreError {
        match self {
            StoreError::Sqlite { path, source, .. } if is_damage(&source) => StoreError::Damaged {
                path: path
                    .split(" (migration")
                    .next()
                    .unwrap_or(&path)
                    .to_string(),
                detail: source.to_string(),
            },
            other => other,
        }
    }
}

fn is_damage(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    matches!(e.sqlite_error_code(), Some(DatabaseCorrupt | NotADatabase))
}

/// The fault behind an SQLite error, when it is one of the state's (not a bug of a query).
fn sqlite_fault(e: &rusqlite::Error) -> Option<Fault> {
    use rusqlite::ErrorCode as C;
    Some(match e.sqlite_error_code()? {
        C::DiskFull
        | C::SystemIoFailure
        | C::DatabaseBusy
        | C::DatabaseLocked
        | C::OutOfMemory
        | C::FileLockingProtocolFailed
        | C::CannotOpen => Fault::Transient,
        C::PermissionDenied | C::ReadOnly | C::AuthorizationForStatementDenied => Fault::Permission,
        C::DatabaseCorrupt | C::NotADatabase => Fault::Unusable,
        _ => return None,
    })
}

/// The fault behind an error of the file system.
pub fn io_fault(e: &std::io::Error) -> Fault {
    use rustix::io::Errno;
    // An error explained by `explain_access` keeps its kind, not its number.
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return Fault::Permission;
    }
    match e.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::ACCESS | Errno::PERM) => Fault::Permission,
        Some(
            Errno::NOSPC
            | Errno::DQUOT
            | Errno::IO
            | Errno::BUSY
            | Errno::AGAIN
            | Errno::MFILE
            | Errno::NFILE
            | Errno::NOMEM
            | Errno::ROFS
            | Errno::TXTBSY
            | Errno::INTR,
        ) => Fault::Transient,
        _ => Fault::Unusable,
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A handle to the state database. Cheap to clone; calls are serialized on one connection.
#[derive(Clone)]
pub struct Store {
    path: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
}

pub fn now_text() -> String {
    ts(Utc::now())
}

pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Counts of one run. `queued` counts records put into the outbox for delivery;
/// `created` and `updated` count records the target accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pulled: u64,
    pub created: u64,
    pub updated: u64,
    pub skipped: u64,
    pub failed: u64,
    pub queued: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.pulled += o.pulled;
        self.created += o.created;
        self.updated += o.updated;
        self.skipped += o.skipped;
        self.failed += o.failed;
        self.queued += o.queued;
    }
}

/// Everything one page leaves behind, written in one transaction with the new cursor.
#[derive(Debug, Default)]
pub struct PageCommit {
    pub stream: String,
    /// `Some(c)`: the cursor becomes `c`. `None`: the cursor is not touched.
    pub cursor: Option<Option<String>>,
    pub links: Vec<(String, String)>,
    pub outbox: Vec<(Vec<u8>, u64)>,
    pub ledger: Vec<LedgerRow>,
    pub dead_letters: Vec<DeadLetter>,
    /// Dead letters (by id) that were tried again and went through: removed.
    pub resolved_dead_letters: Vec<i64>,
    /// Dead letters (by id) that were tried again and failed again: the new reason.
    pub failed_again: Vec<(i64, String)>,
    /// Page digests to remember (see [`Store::page_digests`]).
    pub digests: Vec<PageDigest>,
    /// Records the stream still owes its target (refused, or not read): added, or, when
    /// already owed, their reason and record replaced and their attempts counted (`since`
    /// kept). Applied after `settled`.
    pub owed: Vec<Owed>,
    /// Keys of owed records now settled (the target accepted them, or they were set aside
    /// in dead letters with their reason, or the source no longer has them): removed.
    pub settled: Vec<String>,
}

/// Keys looked up by one statement (`… IN (?, ?, …)`): one bind and one step per row
/// found, far cheaper than a statement per key when a page looks up hundreds.
const KEYS_PER_LOOKUP: usize = 500;

/// `{select} IN (?2, …)` with [`KEYS_PER_LOOKUP`] places, always that many (the last key
/// repeated, see [`in_list_params`]), so that one prepared statement serves every lookup.
fn in_list_sql(select: &str) -> String {
    let mut sql = format!("{select} IN (");
    for i in 0..KEYS_PER_LOOKUP {
        if i > 0 {
            sql.push(',');
        }
        sql.push('?');
    }
    sql.push(')');
    sql
}

/// The stream, then `keys` (at most [`KEYS_PER_LOOKUP`]) padded with the last one.
fn in_list_params<'a>(
    stream: &'a String,
    keys: &'a [String],
) -> rusqlite::ParamsFromIter<impl Iterator<Item = &'a String>> {
    let pad = keys
        .last()
        .into_iter()
        .cycle()
        .take(KEYS_PER_LOOKUP - keys.len());
    rusqlite::params_from_iter(std::iter::once(stream).chain(keys).chain(pad))
}

/// The rows of `{select} IN (…)` for all of `keys`, [`KEYS_PER_LOOKUP`] per statement, in
/// one read transaction (one lock and one WAL check). `select` binds the stream as `?1`.
fn rows_by_keys<T>(
    c: &mut Connection,
    select: &str,
    stream: &String,
    keys: &[String],
    mut row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let tx = c.transaction()?;
    let mut out = Vec::new();
    {
        let mut st = tx.prepare_cached(&in_list_sql(select))?;
        for chunk in keys.chunks(KEYS_PER_LOOKUP) {
            for r in st.query_map(in_list_params(stream, chunk), &mut row)? {
                out.push(r?);
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

/// What a group of source pages looked like when every record in it was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDigest {
    pub scope: String,
    pub digest: String,
    /// The records in those pages.
    pub records: u64,
}

/// A record a stream owes its target (see migration 9): tried again at every run until
/// the target accepts it or it is set aside in dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    /// The record's key in the stream, e.g. `booking:TC-88123` or `event:904783`.
    pub key: String,
    /// What the record belongs to at the source (e.g. its Ticket Co event), if anything.
    pub scope: Option<String>,
    /// Enough of the record (JSON) for a later run to fetch it again.
    pub record: String,
    /// Why it is owed (the target's refusal, the source's error).
    pub reason: String,
}

/// An owed record as stored.
#[derive(Debug, Clone, Serialize)]
pub struct OwedRow {
    pub key: String,
    pub scope: Option<String>,
    pub record: String,
    pub reason: String,
    /// When it first became owed.
    pub since: String,
    /// Runs that tried it and could not settle it.
    pub attempts: u64,
    pub updated_at: String,
}

/// What `status` shows of a stream's owed records.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OwedSummary {
    pub records: u64,
    /// The oldest `since`.
    pub since: Option<String>,
    /// The most attempts of any of them.
    pub attempts: u64,
    /// The reason of the one updated last.
    pub last_reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LedgerRow {
    pub key: String,
    pub content_hash: String,
    pub target_ids: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub source_id: Option<String>,
    pub record: String,
    pub reason: String,
}

/// What `usher state backup` wrote.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    pub bytes: u64,
    /// The copy's schema (`PRAGMA user_version`).
    pub schema: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub body: Vec<u8>,
    pub records: u64,
    pub attempts: u64,
    /// The payload's `Idempotency-Key`, the same at every resend and in every copy of the
    /// state, never the same for two payloads (see migration 10).
    pub key: String,
}

/// `usher-<stream>-<outbox id>-<nonce>`; rows queued before migration 10 keep
/// `usher-<stream>-<outbox id>`.
fn outbox_key(stream: &str, id: i64, nonce: Option<&str>) -> String {
    match nonce {
        Some(n) => format!("usher-{stream}-{id}-{n}"),
        None => format!("usher-{stream}-{id}"),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub stream: String,
    pub trigger: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub outcome: String,
    pub counts: Counts,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub stream: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct OutboxSummary {
    pub payloads: u64,
    pub records: u64,
    pub oldest_refused_at: Option<String>,
    pub attempts: u64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

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

/// Runs `f` and tells [`crate::metrics::StateHealth`] what it showed of the state: a
/// storage fault (the disk full, an I/O error, permissions, damage) marks the state
/// unwritable; a statement that changed rows clears that, since it was written.
fn observed<T>(
    c: &mut Connection,
    path: &Path,
    f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
) -> Result<T> {
    let before = c.total_changes();
    let result = f(c).map_err(sql_err(path)).map_err(StoreError::damaged);
    let state = &crate::metrics::METRICS.state;
    match &result {
        Err(e @ StoreError::Sqlite { source, .. }) if sqlite_fault(source).is_some() => {
            state.failed(e.to_string())
        }
        Err(e @ StoreError::Damaged { .. }) => state.failed(e.to_string()),
        Ok(_) if c.total_changes() != before => state.written(),
        _ => {}
    }
    result
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
        Ok(Store {
            path: Arc::new(path),
            conn: Arc::new(Mutex::new(conn)),
        })
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
        Ok(Some(Store {
            path: Arc::new(path),
            conn: Arc::new(Mutex::new(conn)),
        }))
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the blocking pool with the connection.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            observed(&mut c, &path, f)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// The same as [`Store::call`], for code that is not async (the CLI).
    pub fn call_sync<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T>,
    {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        observed(&mut c, &self.path, f)
    }

    // ---- cursors ----

    pub async fn cursor(&self, stream: &str) -> Result<Option<String>> {
        let stream = stream.to_string();
        self.call(move |c| q::cursor(c, &stream)).await
    }

    /// Commits one page: new cursor, links, outbox rows, ledger rows and dead letters, atomically.
    pub async fn commit_page(&self, page: PageCommit) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            q::commit_page(&tx, &page)?;
            tx.commit()
        })
        .await
    }

    /// Resets a stream's cursor to the start (links, ledger and outbox are kept, so the
    /// re-import that follows matches what it already wrote) and audits it, in one transaction.
    pub async fn reset_cursor(
        &self,
        stream: &str,
        actor: &str,
        detail: &str,
    ) -> Result<Option<String>> {
        let (stream, actor, detail) = (stream.to_string(), actor.to_string(), detail.to_string());
        self.call(move |c| q::reset_cursor(c, &stream, &actor, &detail))
            .await
    }

    pub fn reset_cursor_sync(
        &self,
        stream: &str,
        actor: &str,
        detail: &str,
    ) -> Result<Option<String>> {
        self.call_sync(|c| q::reset_cursor(c, stream, actor, detail))
    }

    pub fn cursor_sync(&self, stream: &str) -> Result<Option<String>> {
        self.call_sync(|c| q::cursor(c, stream))
    }

    // ---- links ----

    pub async fn links(
        &self,
        stream: &str,
        source_ids: Vec<String>,
    ) -> Result<Vec<(String, String)>> {
        let stream = stream.to_string();
        self.call(move |c| {
            rows_by_keys(
                c,
                "SELECT source_id, target_id FROM links WHERE stream = ?1 AND source_id",
                &stream,
                &source_ids,
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }

    // ---- ledger (Ticket Co x Airship) ----

    /// The ledger rows of `keys` (those that exist), for a daily run to tell new from known.
    pub async fn ledger_get(&self, stream: &str, keys: Vec<String>) -> Result<Vec<LedgerRow>> {
        let stream = stream.to_string();
        self.call(move |c| {
            rows_by_keys(
                c,
                "SELECT key, content_hash, target_ids, status FROM ledger WHERE stream = ?1 AND key",
                &stream,
                &keys,
                |r| {
                    Ok(LedgerRow {
                        key: r.get(0)?,
                        content_hash: r.get(1)?,
                        target_ids: r.get(2)?,
                        status: r.get(3)?,
                    })
                },
            )
        })
        .await
    }

    /// The stored digests of these scopes (those that have one). A cursor reset forgets
    /// the stream's digests.
    pub async fn page_digests(
        &self,
        stream: &str,
        scopes: Vec<String>,
    ) -> Result<std::collections::HashMap<String, PageDigest>> {
        let stream = stream.to_string();
        let rows = self
            .call(move |c| {
                rows_by_keys(
                    c,
                    "SELECT scope, digest, records FROM page_digests WHERE stream = ?1 AND scope",
                    &stream,
                    &scopes,
                    |r| {
                        Ok(PageDigest {
                            scope: r.get(0)?,
                            digest: r.get(1)?,
                            records: r.get::<_, i64>(2)? as u64,
                        })
                    },
                )
            })
            .await?;
        Ok(rows.into_iter().map(|d| (d.scope.clone(), d)).collect())
    }

    // ---- owed records ----

    /// Every record the stream owes, oldest first.
    pub async fn owed(&self, stream: &str) -> Result<Vec<OwedRow>> {
        let stream = stream.to_string();
        self.call(move |c| q::owed(c, &stream)).await
    }

    pub fn owed_sync(&self, stream: &str) -> Result<Vec<OwedRow>> {
        self.call_sync(|c| q::owed(c, stream))
    }

    /// How many records the stream owes.
    pub async fn owed_count(&self, stream: &str) -> Result<u64> {
        let stream = stream.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM owed WHERE stream = ?1",
                params![stream],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
        .await
    }

    // ---- outbox ----

    /// Pending payloads of a stream, oldest first, up to `max_records` records in all.
    /// With `at_least_one`, the first payload comes even when it is larger (a reload that
    /// lowered the limit must not block a stored payload forever).
    pub async fn outbox_pending(
        &self,
        stream: &str,
        max_records: u64,
        at_least_one: bool,
    ) -> Result<Vec<OutboxRow>> {
        let stream = stream.to_string();
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, body, records, attempts, nonce FROM outbox WHERE stream = ?1 ORDER BY id LIMIT 1000",
            )?;
            let rows = st.query_map(params![stream], |r| {
                let id = r.get(0)?;
                Ok(OutboxRow {
                    id,
                    body: r.get(1)?,
                    records: r.get::<_, i64>(2)? as u64,
                    attempts: r.get::<_, i64>(3)? as u64,
                    key: outbox_key(&stream, id, r.get::<_, Option<String>>(4)?.as_deref()),
                })
            })?;
            let mut out = Vec::new();
            let mut total = 0;
            for row in rows {
                let row = row?;
                if total + row.records > max_records && !(out.is_empty() && at_least_one) {
                    break;
                }
                total += row.records;
                out.push(row);
            }
            Ok(out)
        })
        .await
    }

    pub async fn outbox_delivered(&self, id: i64) -> Result<()> {
        self.call(move |c| {
            c.execute("DELETE FROM outbox WHERE id = ?1", params![id])
                .map(|_| ())
        })
        .await
    }

    pub async fn outbox_refused(&self, id: i64, status: Option<u16>, error: String) -> Result<()> {
        self.call(move |c| {
            let now = now_text();
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ?2, last_status = ?3,
                        last_error = ?4, first_refused_at = COALESCE(first_refused_at, ?2)
                 WHERE id = ?1",
                params![id, now, status.map(i64::from), error],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn outbox_summary(&self, stream: &str) -> Result<OutboxSummary> {
        let stream = stream.to_string();
        self.call(move |c| q::outbox_summary(c, &stream)).await
    }

    // ---- runs ----

    pub async fn run_started(&self, stream: &str, trigger: &str) -> Result<i64> {
        let (stream, trigger) = (stream.to_string(), trigger.to_string());
        self.call(move |c| {
            c.execute(
                "INSERT INTO runs (stream, trigger, started_at) VALUES (?1, ?2, ?3)",
                params![stream, trigger, now_text()],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    pub async fn run_finished(
        &self,
        id: i64,
        outcome: &str,
        counts: Counts,
        error: Option<String>,
    ) -> Result<()> {
        let outcome = outcome.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE runs SET ended_at = ?2, outcome = ?3, pulled = ?4, created = ?5, updated = ?6,
                        skipped = ?7, failed = ?8, queued = ?9, error = ?10 WHERE id = ?1",
                params![
                    id,
                    now_text(),
                    outcome,
                    counts.pulled as i64,
                    counts.created as i64,
                    counts.updated as i64,
                    counts.skipped as i64,
                    counts.failed as i64,
                    counts.queued as i64,
                    error
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// Runs left `running` by a daemon that died are closed as `interrupted` at start.
    pub async fn close_interrupted_runs(&self) -> Result<usize> {
        self.call(|c| {
            c.execute(
                "UPDATE runs SET outcome = 'interrupted', ended_at = ?1,
                        error = 'the daemon stopped before this run finished; nothing after its last commit was kept'
                 WHERE outcome = 'running'",
                params![now_text()],
            )
        })
        .await
    }

    /// For every stream at once (start-up with thousands of streams): the start of its last
    /// scheduled run, and whether its last run of any kind was cut short.
    pub async fn schedule_inputs(
        &self,
    ) -> Result<std::collections::HashMap<String, (Option<DateTime<Utc>>, bool)>> {
        self.call(|c| {
            let mut out: std::collections::HashMap<String, (Option<DateTime<Utc>>, bool)> = Default::default();
            let mut st = c.prepare(
                "SELECT stream, MAX(started_at) FROM runs WHERE trigger = 'schedule' GROUP BY stream",
            )?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))? {
                let (stream, started) = row?;
                out.entry(stream).or_default().0 = started.as_deref().and_then(parse_ts);
            }
            let mut st = c.prepare(
                "SELECT stream, outcome FROM runs WHERE id IN (SELECT MAX(id) FROM runs GROUP BY stream)",
            )?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                let (stream, outcome) = row?;
                out.entry(stream).or_default().1 = outcome == "stopped" || outcome == "interrupted";
            }
            Ok(out)
        })
        .await
    }

    /// Records many next-run times in one transaction.
    pub async fn set_next_runs(&self, rows: Vec<(String, Option<DateTime<Utc>>)>) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO schedule (stream, next_run_at) VALUES (?1, ?2)
                     ON CONFLICT (stream) DO UPDATE SET next_run_at = excluded.next_run_at",
                )?;
                for (stream, at) in rows {
                    st.execute(params![stream, at.map(ts)])?;
                }
            }
            tx.commit()
        })
        .await
    }

    /// Per stream: payloads in the outbox, records in dead letters and owed records (for
    /// /metrics).
    pub async fn gauges(&self) -> Result<std::collections::BTreeMap<String, (u64, u64, u64)>> {
        self.call(|c| {
            let mut out: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
            let mut st = c.prepare_cached("SELECT stream, COUNT(*) FROM outbox GROUP BY stream")?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (s, n) = row?;
                out.entry(s).or_default().0 = n as u64;
            }
            let mut st =
                c.prepare_cached("SELECT stream, COUNT(*) FROM dead_letters GROUP BY stream")?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (s, n) = row?;
                out.entry(s).or_default().1 = n as u64;
            }
            let mut st = c.prepare_cached("SELECT stream, COUNT(*) FROM owed GROUP BY stream")?;
            for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (s, n) = row?;
                out.entry(s).or_default().2 = n as u64;
            }
            Ok(out)
        })
        .await
    }

    /// Per stream, the outcomes and errors of its last `n` runs that ended by themselves
    /// (`ok`, `failed`, `refused`), newest first (for /healthz): a run stopped at a safe
    /// point or interrupted by the daemon's death says nothing of the stream's health, and
    /// must not break a streak of failures.
    pub async fn recent_outcomes(
        &self,
        n: u32,
    ) -> Result<std::collections::HashMap<String, Vec<(String, Option<String>)>>> {
        self.call(move |c| {
            let mut out: std::collections::HashMap<String, Vec<(String, Option<String>)>> = Default::default();
            let mut st = c.prepare_cached(
                "SELECT stream, outcome, error FROM (
                     SELECT stream, outcome, error, ROW_NUMBER() OVER (PARTITION BY stream ORDER BY id DESC) AS rn
                     FROM runs WHERE outcome IN ('ok', 'failed', 'refused'))
                 WHERE rn <= ?1 ORDER BY stream, rn",
            )?;
            for row in st.query_map(params![n], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
            })? {
                let (s, o, e) = row?;
                out.entry(s).or_default().push((o, e));
            }
            Ok(out)
        })
        .await
    }

    pub fn last_run_sync(&self, stream: &str) -> Result<Option<RunRow>> {
        self.call_sync(|c| q::last_run(c, stream))
    }

    pub fn runs_sync(&self, stream: &str, limit: u32) -> Result<Vec<RunRow>> {
        self.call_sync(|c| q::runs(c, stream, limit))
    }

    // ---- schedule ----

    pub async fn set_next_run(&self, stream: &str, at: Option<DateTime<Utc>>) -> Result<()> {
        let stream = stream.to_string();
        self.call(move |c| {
            c.execute(
                "INSERT INTO schedule (stream, next_run_at) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET next_run_at = excluded.next_run_at",
                params![stream, at.map(ts)],
            )
            .map(|_| ())
        })
        .await
    }

    // ---- audit ----

    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        stream: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        let (actor, action, stream, detail) = (
            actor.to_string(),
            action.to_string(),
            stream.map(str::to_string),
            detail.to_string(),
        );
        self.call(move |c| q::audit(c, &actor, &action, stream.as_deref(), &detail))
            .await
    }

    pub fn audit_sync(
        &self,
        actor: &str,
        action: &str,
        stream: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.call_sync(|c| q::audit(c, actor, action, stream, detail))
    }

    pub fn audit_rows_sync(&self, limit: u32) -> Result<Vec<AuditRow>> {
        self.call_sync(|c| {
            let mut st = c.prepare(
                "SELECT id, at, actor, action, stream, detail FROM audit ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st.query_map(params![limit], |r| {
                Ok(AuditRow {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    stream: r.get(4)?,
                    detail: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Everything `status` shows for one stream, in one read.
    pub fn stream_status_sync(&self, stream: &str) -> Result<StreamState> {
        self.call_sync(|c| {
            // The last finished run's outcome and error: no error when it ended well, never
            // an older run's (a run in flight has none yet, so the one before it counts).
            let finished: Option<(String, Option<String>)> = c
                .query_row(
                    "SELECT outcome, error FROM runs WHERE stream = ?1 AND outcome != 'running'
                     ORDER BY id DESC LIMIT 1",
                    params![stream],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(StreamState {
                cursor: q::cursor(c, stream)?,
                last_run: q::last_run(c, stream)?,
                last_outcome: finished.as_ref().map(|f| f.0.clone()),
                last_error: finished.and_then(|f| f.1),
                owed: q::owed_summary(c, stream)?,
                next_run_at: c
                    .query_row(
                        "SELECT next_run_at FROM schedule WHERE stream = ?1",
                        params![stream],
                        |r| r.get(0),
                    )
                    .optional()?
                    .flatten(),
                outbox: q::outbox_summary(c, stream)?,
                dead_letters: c.query_row(
                    "SELECT COUNT(*) FROM dead_letters WHERE stream = ?1",
                    params![stream],
                    |r| r.get::<_, i64>(0),
                )? as u64,
                links: c.query_row(
                    "SELECT COUNT(*) FROM links WHERE stream = ?1",
                    params![stream],
                    |r| r.get::<_, i64>(0),
                )? as u64,
            })
        })
    }

    /// Dead letters an operator asked to try again: (id, record JSON).
    pub async fn dead_letters_to_retry(&self, stream: &str) -> Result<Vec<(i64, String)>> {
        let stream = stream.to_string();
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, record FROM dead_letters WHERE stream = ?1 AND retry_requested = 1 ORDER BY id LIMIT 1000",
            )?;
            let rows = st.query_map(params![stream], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Marks dead letters for another try (all of the stream's, or one) and audits it.
    pub fn dead_letters_retry_sync(
        &self,
        stream: &str,
        id: Option<i64>,
        actor: &str,
    ) -> Result<usize> {
        self.call_sync(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE dead_letters SET retry_requested = 1 WHERE stream = ?1 AND (?2 IS NULL OR id = ?2)",
                params![stream, id],
            )?;
            let detail = match id {
                Some(i) => format!("dead letter {i} marked for retry"),
                None => format!("{n} dead letters marked for retry"),
            };
            q::audit(&tx, actor, "dead-letters-retry", Some(stream), &detail)?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// Drops dead letters (all of the stream's, or one) and audits it.
    pub fn dead_letters_drop_sync(
        &self,
        stream: &str,
        id: Option<i64>,
        actor: &str,
    ) -> Result<usize> {
        self.call_sync(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "DELETE FROM dead_letters WHERE stream = ?1 AND (?2 IS NULL OR id = ?2)",
                params![stream, id],
            )?;
            let detail = match id {
                Some(i) => format!("dead letter {i} dropped"),
                None => format!("{n} dead letters dropped"),
            };
            q::audit(&tx, actor, "dead-letters-drop", Some(stream), &detail)?;
            tx.commit()?;
            Ok(n)
        })
    }

    pub fn dead_letters_sync(
        &self,
        stream: &str,
        limit: u32,
    ) -> Result<Vec<(i64, DeadLetter, String)>> {
        self.call_sync(|c| {
            let mut st = c.prepare(
                "SELECT id, source_id, record, reason, created_at FROM dead_letters WHERE stream = ?1
                 ORDER BY id LIMIT ?2",
            )?;
            let rows = st.query_map(params![stream, limit], |r| {
                Ok((
                    r.get(0)?,
                    DeadLetter {
                        source_id: r.get(1)?,
                        record: r.get(2)?,
                        reason: r.get(3)?,
                    },
                    r.get(4)?,
                ))
            })?;
            rows.collect()
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamState {
    pub cursor: Option<String>,
    pub last_run: Option<RunRow>,
    /// The outcome of the last finished run (`last_run` may be one still running).
    pub last_outcome: Option<String>,
    /// The error of the last finished run (`None` when it ended well).
    pub last_error: Option<String>,
    /// Records the stream owes its target (refused or not read), tried again every run.
    pub owed: OwedSummary,
    pub next_run_at: Option<String>,
    pub outbox: OutboxSummary,
    pub dead_letters: u64,
    pub links: u64,
}

/// The SQL itself, as plain functions over a connection or transaction.
mod q {
    use super::*;

    pub fn cursor(c: &Connection, stream: &str) -> rusqlite::Result<Option<String>> {
        Ok(c.query_row(
            "SELECT cursor FROM cursors WHERE stream = ?1",
            params![stream],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()?
        .flatten())
    }

    pub fn set_cursor(c: &Connection, stream: &str, cursor: Option<&str>) -> rusqlite::Result<()> {
        c.execute(
            "INSERT INTO cursors (stream, cursor, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (stream) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
            params![stream, cursor, now_text()],
        )
        .map(|_| ())
    }

    pub fn commit_page(tx: &Connection, p: &PageCommit) -> rusqlite::Result<()> {
        let now = now_text();
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO links (stream, source_id, target_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (stream, source_id) DO UPDATE SET target_id = excluded.target_id,
                     updated_at = excluded.updated_at",
            )?;
            for (s, t) in &p.links {
                st.execute(params![p.stream, s, t, now])?;
            }
        }
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO outbox (stream, body, records, created_at, nonce) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (body, records) in &p.outbox {
                let nonce = format!("{:016x}", rand::random::<u64>());
                st.execute(params![p.stream, body, *records as i64, now, nonce])?;
            }
        }
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO ledger (stream, key, content_hash, target_ids, status, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (stream, key) DO UPDATE SET content_hash = excluded.content_hash,
                     target_ids = COALESCE(excluded.target_ids, ledger.target_ids),
                     status = excluded.status, updated_at = excluded.updated_at",
            )?;
            for l in &p.ledger {
                st.execute(params![
                    p.stream,
                    l.key,
                    l.content_hash,
                    l.target_ids,
                    l.status,
                    now
                ])?;
            }
        }
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO dead_letters (stream, source_id, record, reason, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for d in &p.dead_letters {
                st.execute(params![p.stream, d.source_id, d.record, d.reason, now])?;
            }
        }
        for id in &p.resolved_dead_letters {
            tx.execute(
                "DELETE FROM dead_letters WHERE id = ?1 AND stream = ?2",
                params![id, p.stream],
            )?;
        }
        for (id, reason) in &p.failed_again {
            tx.execute(
                "UPDATE dead_letters SET reason = ?3, retry_requested = 0 WHERE id = ?1 AND stream = ?2",
                params![id, p.stream, reason],
            )?;
        }
        if !p.settled.is_empty() {
            let mut st = tx.prepare_cached("DELETE FROM owed WHERE stream = ?1 AND key = ?2")?;
            for k in &p.settled {
                st.execute(params![p.stream, k])?;
            }
        }
        if !p.owed.is_empty() {
            let mut st = tx.prepare_cached(
                "INSERT INTO owed (stream, key, scope, record, reason, since, attempts, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?6)
                 ON CONFLICT (stream, key) DO UPDATE SET scope = excluded.scope,
                     record = excluded.record, reason = excluded.reason,
                     attempts = owed.attempts + 1, updated_at = excluded.updated_at",
            )?;
            for o in &p.owed {
                st.execute(params![p.stream, o.key, o.scope, o.record, o.reason, now])?;
            }
        }
        if !p.digests.is_empty() {
            let mut st = tx.prepare_cached(
                "INSERT INTO page_digests (stream, scope, digest, records, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (stream, scope) DO UPDATE SET digest = excluded.digest,
                     records = excluded.records, updated_at = excluded.updated_at",
            )?;
            for d in &p.digests {
                st.execute(params![p.stream, d.scope, d.digest, d.records as i64, now])?;
            }
        }
        if let Some(cur) = &p.cursor {
            set_cursor(tx, &p.stream, cur.as_deref())?;
        }
        Ok(())
    }

    pub fn reset_cursor(
        c: &mut Connection,
        stream: &str,
        actor: &str,
        detail: &str,
    ) -> rusqlite::Result<Option<String>> {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old = cursor(&tx, stream)?;
        tx.execute("DELETE FROM cursors WHERE stream = ?1", params![stream])?;
        // A reset run looks at every record again (the ledger still spares duplicates).
        tx.execute(
            "DELETE FROM page_digests WHERE stream = ?1",
            params![stream],
        )?;
        let detail = format!(
            "{detail}; cursor was {}",
            old.as_deref()
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| "at the start".into())
        );
        audit(&tx, actor, "cursor-reset", Some(stream), &detail)?;
        tx.commit()?;
        Ok(old)
    }

    pub fn audit(
        c: &Connection,
        actor: &str,
        action: &str,
        stream: Option<&str>,
        detail: &str,
    ) -> rusqlite::Result<()> {
        c.execute(
            "INSERT INTO audit (at, actor, action, stream, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now_text(), actor, action, stream, detail],
        )
        .map(|_| ())
    }

    fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
        Ok(RunRow {
            id: r.get(0)?,
            stream: r.get(1)?,
            trigger: r.get(2)?,
            started_at: r.get(3)?,
            ended_at: r.get(4)?,
            outcome: r.get(5)?,
            counts: Counts {
                pulled: r.get::<_, i64>(6)? as u64,
                created: r.get::<_, i64>(7)? as u64,
                updated: r.get::<_, i64>(8)? as u64,
                skipped: r.get::<_, i64>(9)? as u64,
                failed: r.get::<_, i64>(10)? as u64,
                queued: r.get::<_, i64>(11)? as u64,
            },
            error: r.get(12)?,
        })
    }

    const RUN_COLS: &str = "id, stream, trigger, started_at, ended_at, outcome, pulled, created, updated, skipped, failed, queued, error";

    pub fn last_run(c: &Connection, stream: &str) -> rusqlite::Result<Option<RunRow>> {
        c.query_row(
            &format!("SELECT {RUN_COLS} FROM runs WHERE stream = ?1 ORDER BY id DESC LIMIT 1"),
            params![stream],
            run_row,
        )
        .optional()
    }

    pub fn runs(c: &Connection, stream: &str, limit: u32) -> rusqlite::Result<Vec<RunRow>> {
        let mut st = c.prepare(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE stream = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![stream, limit], run_row)?;
        rows.collect()
    }

    pub fn owed(c: &Connection, stream: &str) -> rusqlite::Result<Vec<OwedRow>> {
        let mut st = c.prepare_cached(
            "SELECT key, scope, record, reason, since, attempts, updated_at FROM owed
             WHERE stream = ?1 ORDER BY since, key",
        )?;
        let rows = st.query_map(params![stream], |r| {
            Ok(OwedRow {
                key: r.get(0)?,
                scope: r.get(1)?,
                record: r.get(2)?,
                reason: r.get(3)?,
                since: r.get(4)?,
                attempts: r.get::<_, i64>(5)? as u64,
                updated_at: r.get(6)?,
            })
        })?;
        rows.collect()
    }

    pub fn owed_summary(c: &Connection, stream: &str) -> rusqlite::Result<OwedSummary> {
        let (records, since, attempts): (i64, Option<String>, Option<i64>) = c.query_row(
            "SELECT COUNT(*), MIN(since), MAX(attempts) FROM owed WHERE stream = ?1",
            params![stream],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let last_reason = c
            .query_row(
                "SELECT reason FROM owed WHERE stream = ?1 ORDER BY updated_at DESC, key LIMIT 1",
                params![stream],
                |r| r.get(0),
            )
            .optional()?;
        Ok(OwedSummary {
            records: records as u64,
            since,
            attempts: attempts.unwrap_or(0) as u64,
            last_reason,
        })
    }

    pub fn outbox_summary(c: &Connection, stream: &str) -> rusqlite::Result<OutboxSummary> {
        let (payloads, records): (i64, i64) = c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(records), 0) FROM outbox WHERE stream = ?1",
            params![stream],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let head = c
            .query_row(
                "SELECT first_refused_at, attempts, last_status, last_error FROM outbox WHERE stream = ?1
                 ORDER BY id LIMIT 1",
                params![stream],
                |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()?;
        let mut s = OutboxSummary {
            payloads: payloads as u64,
            records: records as u64,
            ..Default::default()
        };
        if let Some((refused, attempts, status, error)) = head {
            s.oldest_refused_at = refused;
            s.attempts = attempts as u64;
            s.last_status = status;
            s.last_error = error;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cursor_moves_only_with_its_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(store.cursor("s").await.unwrap(), None);
        store
            .commit_page(PageCommit {
                stream: "s".into(),
                cursor: Some(Some("c1".into())),
                links: vec![("a".into(), "1".into())],
                outbox: vec![(b"[1]".to_vec(), 1)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(store.cursor("s").await.unwrap().as_deref(), Some("c1"));
        assert_eq!(
            store
                .links("s", vec!["a".into(), "b".into()])
                .await
                .unwrap(),
            vec![("a".into(), "1".into())]
        );
        let old = store.reset_cursor("s", "test", "because").await.unwrap();
        assert_eq!(old.as_deref(), Some("c1"));
        assert_eq!(store.cursor("s").await.unwrap(), None);
        // The reset keeps links and outbox.
        assert_eq!(store.links("s", vec!["a".into()]).await.unwrap().len(), 1);
        assert_eq!(store.outbox_pending("s", 10, false).await.unwrap().len(), 1);
        let audit = store.audit_rows_sync(10).unwrap();
        assert_eq!(audit[0].action, "cursor-reset");
    }

    #[tokio::test]
    async fn owed_records_keep_their_since_and_count_attempts_until_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let owe = |reason: &str| PageCommit {
            stream: "s".into(),
            owed: vec![Owed {
                key: "booking:A".into(),
                scope: Some("1".into()),
                record: "{}".into(),
                reason: reason.into(),
            }],
            ..Default::default()
        };
        store.commit_page(owe("refused once")).await.unwrap();
        let first = store.owed("s").await.unwrap();
        store.commit_page(owe("refused again")).await.unwrap();
        let rows = store.owed("s").await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].since, first[0].since, "since is kept");
        assert_eq!(rows[0].attempts, 2);
        assert_eq!(rows[0].reason, "refused again");
        let st = store.stream_status_sync("s").unwrap();
        assert_eq!(st.owed.records, 1);
        assert_eq!(st.owed.last_reason.as_deref(), Some("refused again"));
        assert_eq!(store.owed_count("other").await.unwrap(), 0);
        store
            .commit_page(PageCommit {
                stream: "s".into(),
                settled: vec!["booking:A".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(store.owed_count("s").await.unwrap(), 0);
        // A reset keeps what is owed: it is still owed to the target.
        store.commit_page(owe("x")).await.unwrap();
        store.reset_cursor("s", "test", "t").await.unwrap();
        assert_eq!(store.owed_count("s").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn health_passes_over_stopped_runs_in_a_streak_of_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for outcome in [
            "ok",
            "refused",
            "refused",
            "stopped",
            "interrupted",
            "refused",
        ] {
            let id = store.run_started("s", "schedule").await.unwrap();
            let error = (outcome != "ok" && outcome != "stopped").then(|| outcome.to_string());
            store
                .run_finished(id, outcome, Counts::default(), error)
                .await
                .unwrap();
        }
        store.run_started("s", "schedule").await.unwrap(); // in flight
        let recent = store.recent_outcomes(3).await.unwrap();
        let outcomes: Vec<&str> = recent["s"].iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(outcomes, ["refused", "refused", "refused"]);
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("newer usher"), "{err}");
    }
}
