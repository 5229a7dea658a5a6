//! The only code that speaks SQL: the state, in one SQLite file under the state directory
//! (the default; `sqlite.rs`), or in a PostgreSQL database that several instances share
//! (`pg.rs`, issue 20). Every query is written once, over [`sql::Sql`], and runs on tokio's
//! blocking pool ([`Store::read`], [`Store::write`]), never on the async executor's threads.
//!
//! Tables: cursors, links, outbox, ledger, page_digests, owed, runs, dead_letters, audit,
//! schedule, in_doubt, rate_budgets, leases (see `migrations.rs`). **A cursor is only ever
//! written by [`Store::commit_page`] (or a reset), in the same transaction as the links,
//! outbox rows, ledger rows, owed records and dead letters of the records it covers.**
//! Owed records, too, are only written by `commit_page`. On a fenced store (a run under a
//! lease, several instances) every write first checks the lease in its own transaction.

#[macro_use]
pub mod sql;
mod budgets;
mod copy;
mod in_doubt;
pub mod leases;
mod migrations;
pub mod pg;
mod requests;
// S-360
mod s360;
// Integration settings branch: online checks and CDP pauses.
mod settings;
mod sqlite;
pub use settings::{OnlineCheck, StreamPause};
pub use sqlite::{explain_access, quick_check};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

pub use budgets::BudgetRow;
pub use copy::Copied;
pub use in_doubt::{Doubt, DoubtState};
pub use migrations::{MIGRATIONS, MIGRATIONS_PG};
pub use requests::OperatorRequest;
// S-360
pub use s360::{InboxBatch, InboxOutcome, InboxRecord, InboxRow, RecordId};
use sql::{DbError, DbErrorKind, DbResult, Sql};

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
    /// A statement of the store failed (SQLite or PostgreSQL), classified.
    #[error("state database {what}: {error}{hint}")]
    Db {
        /// The file (SQLite) or the server and database (PostgreSQL, no password).
        what: String,
        error: sql::DbError,
        /// What is at fault when SQLite cannot open or write a file: empty otherwise.
        hint: String,
    },
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
            StoreError::Db { error, .. } => match error.kind {
                DbErrorKind::Busy | DbErrorKind::Full | DbErrorKind::Io => Fault::Transient,
                DbErrorKind::LostLease => Fault::Transient,
                DbErrorKind::Permission => Fault::Permission,
                _ => Fault::Unusable,
            },
        }
    }

    /// True when this instance wrote under a lease it no longer holds (several instances).
    pub fn is_lost_lease(&self) -> bool {
        matches!(self, StoreError::Db { error, .. } if error.kind == DbErrorKind::LostLease)
    }

    /// The damage SQLite reported, as [`StoreError::Damaged`]; other errors as they are.
    pub(crate) fn damaged(self) -> StoreError {
        match self {
            StoreError::Sqlite { path, source, .. } if is_damage(&source) => StoreError::Damaged {
                path: path
                    .split(" (migration")
                    .next()
                    .unwrap_or(&path)
                    .to_string(),
                detail: source.to_string(),
            },
            StoreError::Db { what, error, .. } if error.kind == DbErrorKind::Corrupt => {
                StoreError::Damaged {
                    path: what,
                    detail: error.message,
                }
            }
            other => other,
        }
    }
}

pub(crate) fn is_damage(e: &rusqlite::Error) -> bool {
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

/// A handle to the state: one SQLite file, or a PostgreSQL database several instances
/// share. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Backend>,
    /// The lease a run writes under (several instances): every write checks it in its own
    /// transaction (`leases::check_fence`), so an instance that lost it commits nothing.
    /// None: no lease (SQLite, where one daemon holds everything; the daemon's own
    /// bookkeeping).
    fence: Option<Arc<FenceState>>,
}

/// Where the state is.
enum Backend {
    /// One connection, calls serialized on it (SQLite allows one writer anyway).
    Sqlite {
        path: PathBuf,
        conn: Mutex<rusqlite::Connection>,
    },
    /// A pool of connections; bodies run on the blocking pool and block on each round trip
    /// through `rt`.
    Postgres {
        pool: deadpool_postgres::Pool,
        rt: tokio::runtime::Handle,
        /// The runtime `rt` belongs to, which drives the connections (`pg::IoRuntime`).
        _io: pg::IoRuntime,
        /// `postgres://user@host/db`, for messages (never a password).
        label: String,
        /// When the tables looked up by key are analyzed next.
        growth: pg::Growth,
    },
}

/// A run's lease, and how far ahead a write of its must keep it.
#[derive(Debug)]
pub struct FenceState {
    pub fence: leases::Fence,
    /// Added to what a write records as "may land until" (the settle margin): the lease
    /// must last that long too, so that no other instance looks before it may.
    pub margin_ms: i64,
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

// A run's counts live below the state (metrics and progress count them too).
pub use crate::progress::Counts;

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
fn in_list_params<'a>(stream: &'a str, keys: &'a [String]) -> Vec<sql::Param<'a>> {
    let pad = keys
        .last()
        .into_iter()
        .cycle()
        .take(KEYS_PER_LOOKUP - keys.len());
    std::iter::once(stream)
        .chain(keys.iter().map(String::as_str))
        .chain(pad.map(String::as_str))
        .map(sql::Param::Text)
        .collect()
}

/// The rows of `{select} IN (…)` for all of `keys`, [`KEYS_PER_LOOKUP`] per statement, in
/// the caller's one read transaction. `select` binds the stream as `?1`.
fn rows_by_keys<T>(
    db: &mut dyn Sql,
    select: &str,
    stream: &str,
    keys: &[String],
    mut row: impl FnMut(&dyn sql::Row) -> DbResult<T>,
) -> DbResult<Vec<T>> {
    let mut out = Vec::new();
    if db.dialect() == sql::Dialect::Postgres {
        // One array parameter: one statement (and one plan) for any number of keys.
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        db.query_each(
            &format!("{select} = ANY(?2::text[])"),
            p![stream, sql::Param::Texts(&keys)],
            &mut |r| {
                out.push(row(r)?);
                Ok(())
            },
        )?;
        return Ok(out);
    }
    let sql = in_list_sql(select);
    for chunk in keys.chunks(KEYS_PER_LOOKUP) {
        db.query_each(&sql, &in_list_params(stream, chunk), &mut |r| {
            out.push(row(r)?);
            Ok(())
        })?;
    }
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

impl Store {
    pub(crate) fn sqlite(path: PathBuf, conn: rusqlite::Connection) -> Store {
        Store {
            db: Arc::new(Backend::Sqlite {
                path,
                conn: Mutex::new(conn),
            }),
            fence: None,
        }
    }

    /// Opens the state on PostgreSQL (several instances): a pool, the migrations run under
    /// an advisory lock (so instances starting together migrate once), a newer schema
    /// refused. Its connections are driven by a runtime of their own (`pg::IoRuntime`).
    pub async fn open_postgres(settings: &pg::PgSettings) -> Result<Store> {
        let label = pg::redact_url(&settings.url);
        let pool = pg::pool(settings).map_err(|message| StoreError::Db {
            what: label.clone(),
            error: DbError {
                kind: DbErrorKind::Other,
                message,
            },
            hint: String::new(),
        })?;
        let io = pg::IoRuntime::start().map_err(|e| StoreError::Db {
            what: label.clone(),
            error: DbError {
                kind: DbErrorKind::Other,
                message: format!("cannot start the database I/O thread: {e}"),
            },
            hint: String::new(),
        })?;
        let store = Store {
            db: Arc::new(Backend::Postgres {
                pool,
                rt: io.handle(),
                _io: io,
                label: label.clone(),
                growth: pg::Growth::default(),
            }),
            fence: None,
        };
        let known = migrations::MIGRATIONS_PG.len() as i64;
        let found = store
            .write(move |db| {
                db.execute("SELECT pg_advisory_xact_lock(7270031)", p![])?;
                db.execute(
                    "CREATE TABLE IF NOT EXISTS usher_schema (version BIGINT NOT NULL)",
                    p![],
                )?;
                let version = db
                    .query_opt("SELECT version FROM usher_schema", p![], |r| r.i64(0))?
                    .unwrap_or(0);
                if version > known {
                    return Ok(version);
                }
                if version == 0 {
                    db.execute("INSERT INTO usher_schema (version) VALUES (0)", p![])?;
                }
                for (i, m) in migrations::MIGRATIONS_PG
                    .iter()
                    .enumerate()
                    .skip(version as usize)
                {
                    for stmt in m.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                        db.execute(stmt, p![])?;
                    }
                    db.execute("UPDATE usher_schema SET version = ?1", p![i as i64 + 1])?;
                }
                Ok(version)
            })
            .await?;
        if found > known {
            return Err(StoreError::TooNew {
                path: label,
                found,
                known,
            });
        }
        Ok(store)
    }

    /// The same store, its writes checked against `fence` (a run under a lease).
    pub fn fenced(&self, fence: leases::Fence, margin: Duration) -> Store {
        Store {
            db: self.db.clone(),
            fence: Some(Arc::new(FenceState {
                fence,
                margin_ms: margin.as_millis() as i64,
            })),
        }
    }

    /// Several instances: makes this store's lease last at least `min_left` from now (or
    /// fails: lost) and says how long it lasts, on the database's clock. None when the
    /// store is not fenced.
    pub async fn hold_lease(&self, min_left: Duration) -> Result<Option<Duration>> {
        let Some(fs) = self.fence.clone() else {
            return Ok(None);
        };
        let min_left_ms = min_left.as_millis() as i64;
        let left = self
            .write(move |db| leases::hold(db, &fs.fence, min_left_ms))
            .await?;
        Ok(Some(Duration::from_millis(left.max(0) as u64)))
    }

    /// The lease this store's writes are checked against, if any.
    pub fn fence(&self) -> Option<&leases::Fence> {
        self.fence.as_deref().map(|f| &f.fence)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(*self.db, Backend::Postgres { .. })
    }

    /// The SQLite file (None on PostgreSQL).
    pub fn file(&self) -> Option<&Path> {
        match &*self.db {
            Backend::Sqlite { path, .. } => Some(path),
            Backend::Postgres { .. } => None,
        }
    }

    /// Where the state is, for messages: the file, or the server and database.
    pub fn describe(&self) -> String {
        match &*self.db {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres { label, .. } => label.clone(),
        }
    }

    /// Reads, in one read transaction, on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Sql) -> DbResult<T> + Send + 'static,
    {
        self.run(false, f).await
    }

    /// Writes, in one transaction (SQLite: `BEGIN IMMEDIATE`), on the blocking pool; on a
    /// fenced store the lease is checked inside it first.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Sql) -> DbResult<T> + Send + 'static,
    {
        self.run(true, f).await
    }

    async fn run<T, F>(&self, write: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Sql) -> DbResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        let fence = self.fence.clone();
        tokio::task::spawn_blocking(move || db.exec(write, fence.as_deref(), f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// [`Store::read`] for code that is not async and not on the runtime (the CLI).
    pub fn read_sync<T>(&self, f: impl FnOnce(&mut dyn Sql) -> DbResult<T>) -> Result<T> {
        self.db.exec(false, self.fence.as_deref(), f)
    }

    /// [`Store::write`] for code that is not async and not on the runtime (the CLI).
    pub fn write_sync<T>(&self, f: impl FnOnce(&mut dyn Sql) -> DbResult<T>) -> Result<T> {
        self.db.exec(true, self.fence.as_deref(), f)
    }
}

impl Backend {
    /// Runs `f` in one transaction; records what it showed of the state's health (a storage
    /// fault marks the state unwritable; a write that went through clears it).
    fn exec<T>(
        &self,
        write: bool,
        fence: Option<&FenceState>,
        f: impl FnOnce(&mut dyn Sql) -> DbResult<T>,
    ) -> Result<T> {
        let result = match self {
            Backend::Sqlite { conn, .. } => {
                let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                (|| {
                    let tx = c
                        .transaction_with_behavior(if write {
                            rusqlite::TransactionBehavior::Immediate
                        } else {
                            rusqlite::TransactionBehavior::Deferred
                        })
                        .map_err(sql::from_rusqlite)?;
                    let v = f(&mut sql::Lite(&tx))?;
                    tx.commit().map_err(sql::from_rusqlite)?;
                    Ok(v)
                })()
            }
            Backend::Postgres { pool, rt, .. } => pg::transaction(pool, rt, |db| {
                if write && let Some(fs) = fence {
                    leases::check_fence(db, &fs.fence, 0)?;
                }
                f(db)
            }),
        };
        let state = &crate::metrics::METRICS.state;
        match result {
            Ok(v) => {
                if write {
                    state.written();
                }
                Ok(v)
            }
            Err(error) => {
                let e = self.error(error);
                if matches!(e.fault(), Fault::Transient | Fault::Permission) && !e.is_lost_lease()
                    || matches!(e, StoreError::Damaged { .. })
                {
                    state.failed(e.to_string());
                }
                Err(e)
            }
        }
    }

    fn error(&self, error: DbError) -> StoreError {
        let (what, hint) = match self {
            Backend::Sqlite { path, .. } => (
                path.display().to_string(),
                if matches!(error.kind, DbErrorKind::Io | DbErrorKind::Permission) {
                    sqlite::access_hint(path)
                } else {
                    String::new()
                },
            ),
            Backend::Postgres { label, .. } => (label.clone(), String::new()),
        };
        StoreError::Db { what, error, hint }.damaged()
    }
}

impl Store {
    // ---- cursors ----

    pub async fn cursor(&self, stream: &str) -> Result<Option<String>> {
        let stream = stream.to_string();
        self.read(move |db| q::cursor(db, &stream)).await
    }

    /// Commits one page: new cursor, links, outbox rows, ledger rows and dead letters, atomically.
    pub async fn commit_page(&self, page: PageCommit) -> Result<()> {
        let grew = [("links", page.links.len()), ("ledger", page.ledger.len())];
        self.write(move |db| q::commit_page(db, &page)).await?;
        if let Backend::Postgres {
            pool, rt, growth, ..
        } = &*self.db
        {
            for (table, rows) in grew {
                if growth.wrote(table, rows) {
                    pg::analyze(pool, rt, table);
                }
            }
        }
        Ok(())
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
        self.write(move |db| q::reset_cursor(db, &stream, &actor, &detail))
            .await
    }

    pub fn reset_cursor_sync(
        &self,
        stream: &str,
        actor: &str,
        detail: &str,
    ) -> Result<Option<String>> {
        self.write_sync(|db| q::reset_cursor(db, stream, actor, detail))
    }

    pub fn cursor_sync(&self, stream: &str) -> Result<Option<String>> {
        self.read_sync(|db| q::cursor(db, stream))
    }

    // ---- links ----

    pub async fn links(
        &self,
        stream: &str,
        source_ids: Vec<String>,
    ) -> Result<Vec<(String, String)>> {
        let stream = stream.to_string();
        self.read(move |db| {
            rows_by_keys(
                db,
                "SELECT source_id, target_id FROM links WHERE stream = ?1 AND source_id",
                &stream,
                &source_ids,
                |r| Ok((r.text(0)?, r.text(1)?)),
            )
        })
        .await
    }

    // ---- ledger (Ticket Co x Airship) ----

    /// The ledger rows of `keys` (those that exist), for a daily run to tell new from known.
    pub async fn ledger_get(&self, stream: &str, keys: Vec<String>) -> Result<Vec<LedgerRow>> {
        let stream = stream.to_string();
        self.read(move |db| {
            rows_by_keys(
                db,
                "SELECT key, content_hash, target_ids, status FROM ledger WHERE stream = ?1 AND key",
                &stream,
                &keys,
                |r| {
                    Ok(LedgerRow {
                        key: r.text(0)?,
                        content_hash: r.text(1)?,
                        target_ids: r.opt_text(2)?,
                        status: r.opt_text(3)?,
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
            .read(move |db| {
                rows_by_keys(
                    db,
                    "SELECT scope, digest, records FROM page_digests WHERE stream = ?1 AND scope",
                    &stream,
                    &scopes,
                    |r| {
                        Ok(PageDigest {
                            scope: r.text(0)?,
                            digest: r.text(1)?,
                            records: r.i64(2)? as u64,
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
        self.read(move |db| q::owed(db, &stream)).await
    }

    pub fn owed_sync(&self, stream: &str) -> Result<Vec<OwedRow>> {
        self.read_sync(|db| q::owed(db, stream))
    }

    /// How many records the stream owes.
    pub async fn owed_count(&self, stream: &str) -> Result<u64> {
        let stream = stream.to_string();
        self.read(move |db| db.count("SELECT COUNT(*) FROM owed WHERE stream = ?1", p![&stream]))
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
        self.read(move |db| {
            let rows = db.query(
                "SELECT id, body, records, attempts, nonce FROM outbox WHERE stream = ?1 ORDER BY id LIMIT 1000",
                p![&stream],
                |r| {
                    let id = r.i64(0)?;
                    Ok(OutboxRow {
                        id,
                        body: r.blob(1)?,
                        records: r.i64(2)? as u64,
                        attempts: r.i64(3)? as u64,
                        key: outbox_key(&stream, id, r.opt_text(4)?.as_deref()),
                    })
                },
            )?;
            let mut out = Vec::new();
            let mut total = 0;
            for row in rows {
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
        self.write(move |db| {
            db.execute("DELETE FROM outbox WHERE id = ?1", p![id])
                .map(|_| ())
        })
        .await
    }

    pub async fn outbox_refused(&self, id: i64, status: Option<u16>, error: String) -> Result<()> {
        self.write(move |db| {
            let now = now_text();
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ?2, last_status = ?3,
                        last_error = ?4, first_refused_at = COALESCE(first_refused_at, ?2)
                 WHERE id = ?1",
                p![id, &now, status.map(i64::from), &error],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn outbox_summary(&self, stream: &str) -> Result<OutboxSummary> {
        let stream = stream.to_string();
        self.read(move |db| q::outbox_summary(db, &stream)).await
    }

    // ---- runs ----

    pub async fn run_started(&self, stream: &str, trigger: &str) -> Result<i64> {
        let (stream, trigger) = (stream.to_string(), trigger.to_string());
        let holder = self.fence().map(|f| f.holder.clone());
        self.write(move |db| {
            db.query_one(
                "INSERT INTO runs (stream, trigger, started_at, holder) VALUES (?1, ?2, ?3, ?4)
                 RETURNING id",
                p![&stream, &trigger, &now_text(), holder.as_deref()],
                |r| r.i64(0),
            )
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
        self.write(move |db| {
            db.execute(
                "UPDATE runs SET ended_at = ?2, outcome = ?3, pulled = ?4, created = ?5, updated = ?6,
                        skipped = ?7, failed = ?8, queued = ?9, error = ?10 WHERE id = ?1",
                p![
                    id,
                    &now_text(),
                    &outcome,
                    counts.pulled,
                    counts.created,
                    counts.updated,
                    counts.skipped,
                    counts.failed,
                    counts.queued,
                    error.as_deref()
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// Runs left `running` by a daemon that died are closed as `interrupted` at start (on
    /// SQLite: all of them, one daemon holds the state; on PostgreSQL see
    /// [`Store::close_runs_of`]).
    pub async fn close_interrupted_runs(&self) -> Result<usize> {
        if self.is_postgres() {
            return Ok(0);
        }
        self.write(|db| {
            db.execute(
                "UPDATE runs SET outcome = 'interrupted', ended_at = ?1,
                        error = 'the daemon stopped before this run finished; nothing after its last commit was kept'
                 WHERE outcome = 'running'",
                p![&now_text()],
            )
            .map(|n| n as usize)
        })
        .await
    }

    /// Several instances: the runs of `streams` left `running` by another instance (one
    /// that died, or lost the lease) are closed when their lease is taken over.
    pub async fn close_runs_of(
        &self,
        streams: Vec<String>,
        not_holder: &str,
        outcome: &'static str,
        why: String,
    ) -> Result<usize> {
        let not_holder = not_holder.to_string();
        self.write(move |db| {
            let mut n = 0;
            for s in &streams {
                n += db.execute(
                    "UPDATE runs SET outcome = ?1, ended_at = ?2, error = ?3
                     WHERE outcome = 'running' AND stream = ?4
                       AND (holder IS NULL OR holder != ?5)",
                    p![outcome, &now_text(), &why, s, &not_holder],
                )? as usize;
            }
            Ok(n)
        })
        .await
    }

    /// For every stream at once (start-up with thousands of streams): the start of its last
    /// scheduled run, and whether its last run of any kind was cut short.
    pub async fn schedule_inputs(
        &self,
    ) -> Result<std::collections::HashMap<String, (Option<DateTime<Utc>>, bool)>> {
        self.read(|db| {
            let mut out: std::collections::HashMap<String, (Option<DateTime<Utc>>, bool)> =
                Default::default();
            db.query_each(
                "SELECT stream, MAX(started_at) FROM runs WHERE trigger = 'schedule' GROUP BY stream",
                p![],
                &mut |r| {
                    let stream = r.text(0)?;
                    let started = r.opt_text(1)?;
                    out.entry(stream).or_default().0 = started.as_deref().and_then(parse_ts);
                    Ok(())
                },
            )?;
            db.query_each(
                "SELECT stream, outcome FROM runs WHERE id IN (SELECT MAX(id) FROM runs GROUP BY stream)",
                p![],
                &mut |r| {
                    let stream = r.text(0)?;
                    let outcome = r.text(1)?;
                    out.entry(stream).or_default().1 = outcome == "stopped"
                        || outcome == "interrupted"
                        || outcome == "lost lease";
                    Ok(())
                },
            )?;
            Ok(out)
        })
        .await
    }

    /// Records many next-run times in one transaction.
    pub async fn set_next_runs(&self, rows: Vec<(String, Option<DateTime<Utc>>)>) -> Result<()> {
        self.write(move |db| {
            for (stream, at) in &rows {
                db.execute(
                    "INSERT INTO schedule (stream, next_run_at) VALUES (?1, ?2)
                     ON CONFLICT (stream) DO UPDATE SET next_run_at = excluded.next_run_at",
                    p![stream, at.map(ts).as_deref()],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Per stream: payloads in the outbox, records in dead letters and owed records (for
    /// /metrics).
    pub async fn gauges(&self) -> Result<std::collections::BTreeMap<String, (u64, u64, u64)>> {
        self.read(|db| {
            let mut out: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
            for (i, table) in ["outbox", "dead_letters", "owed"].into_iter().enumerate() {
                db.query_each(
                    &format!("SELECT stream, COUNT(*) FROM {table} GROUP BY stream"),
                    p![],
                    &mut |r| {
                        let e = out.entry(r.text(0)?).or_default();
                        let n = r.i64(1)? as u64;
                        match i {
                            0 => e.0 = n,
                            1 => e.1 = n,
                            _ => e.2 = n,
                        }
                        Ok(())
                    },
                )?;
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
        self.read(move |db| {
            let mut out: std::collections::HashMap<String, Vec<(String, Option<String>)>> =
                Default::default();
            db.query_each(
                "SELECT stream, outcome, error FROM (
                     SELECT stream, outcome, error, ROW_NUMBER() OVER (PARTITION BY stream ORDER BY id DESC) AS rn
                     FROM runs WHERE outcome IN ('ok', 'failed', 'refused')) AS recent
                 WHERE rn <= ?1 ORDER BY stream, rn",
                p![n],
                &mut |r| {
                    out.entry(r.text(0)?)
                        .or_default()
                        .push((r.text(1)?, r.opt_text(2)?));
                    Ok(())
                },
            )?;
            Ok(out)
        })
        .await
    }

    pub fn last_run_sync(&self, stream: &str) -> Result<Option<RunRow>> {
        self.read_sync(|db| q::last_run(db, stream))
    }

    pub fn runs_sync(&self, stream: &str, limit: u32) -> Result<Vec<RunRow>> {
        self.read_sync(|db| q::runs(db, stream, limit))
    }

    // ---- schedule ----

    pub async fn set_next_run(&self, stream: &str, at: Option<DateTime<Utc>>) -> Result<()> {
        let stream = stream.to_string();
        self.write(move |db| {
            db.execute(
                "INSERT INTO schedule (stream, next_run_at) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET next_run_at = excluded.next_run_at",
                p![&stream, at.map(ts).as_deref()],
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
        self.write(move |db| q::audit(db, &actor, &action, stream.as_deref(), &detail))
            .await
    }

    pub fn audit_sync(
        &self,
        actor: &str,
        action: &str,
        stream: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.write_sync(|db| q::audit(db, actor, action, stream, detail))
    }

    pub fn audit_rows_sync(&self, limit: u32) -> Result<Vec<AuditRow>> {
        self.read_sync(|db| {
            db.query(
                "SELECT id, at, actor, action, stream, detail FROM audit ORDER BY id DESC LIMIT ?1",
                p![limit],
                |r| {
                    Ok(AuditRow {
                        id: r.i64(0)?,
                        at: r.text(1)?,
                        actor: r.text(2)?,
                        action: r.text(3)?,
                        stream: r.opt_text(4)?,
                        detail: r.opt_text(5)?,
                    })
                },
            )
        })
    }

    /// Everything `status` shows for one stream, in one read.
    pub fn stream_status_sync(&self, stream: &str) -> Result<StreamState> {
        self.read_sync(|db| q::stream_state(db, stream))
    }

    /// [`Store::stream_status_sync`] from async code.
    pub async fn stream_status(&self, stream: &str) -> Result<StreamState> {
        let stream = stream.to_string();
        self.read(move |db| q::stream_state(db, &stream)).await
    }

    /// Dead letters an operator asked to try again: (id, record JSON).
    pub async fn dead_letters_to_retry(&self, stream: &str) -> Result<Vec<(i64, String)>> {
        let stream = stream.to_string();
        self.read(move |db| {
            db.query(
                "SELECT id, record FROM dead_letters WHERE stream = ?1 AND retry_requested = 1 ORDER BY id LIMIT 1000",
                p![&stream],
                |r| Ok((r.i64(0)?, r.text(1)?)),
            )
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
        self.write_sync(|db| {
            let n = db.execute(
                "UPDATE dead_letters SET retry_requested = 1 WHERE stream = ?1 AND (CAST(?2 AS BIGINT) IS NULL OR id = ?2)",
                p![stream, id],
            )? as usize;
            let detail = match id {
                Some(i) => format!("dead letter {i} marked for retry"),
                None => format!("{n} dead letters marked for retry"),
            };
            q::audit(db, actor, "dead-letters-retry", Some(stream), &detail)?;
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
        self.write_sync(|db| {
            let n = db.execute(
                "DELETE FROM dead_letters WHERE stream = ?1 AND (CAST(?2 AS BIGINT) IS NULL OR id = ?2)",
                p![stream, id],
            )? as usize;
            let detail = match id {
                Some(i) => format!("dead letter {i} dropped"),
                None => format!("{n} dead letters dropped"),
            };
            q::audit(db, actor, "dead-letters-drop", Some(stream), &detail)?;
            Ok(n)
        })
    }

    pub fn dead_letters_sync(
        &self,
        stream: &str,
        limit: u32,
    ) -> Result<Vec<(i64, DeadLetter, String)>> {
        self.read_sync(|db| {
            db.query(
                "SELECT id, source_id, record, reason, created_at FROM dead_letters WHERE stream = ?1
                 ORDER BY id LIMIT ?2",
                p![stream, limit],
                |r| {
                    Ok((
                        r.i64(0)?,
                        DeadLetter {
                            source_id: r.opt_text(1)?,
                            record: r.text(2)?,
                            reason: r.text(3)?,
                        },
                        r.text(4)?,
                    ))
                },
            )
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

/// The SQL itself, as plain functions over a transaction of either backend.
mod q {
    use super::*;

    pub fn cursor(db: &mut dyn Sql, stream: &str) -> DbResult<Option<String>> {
        Ok(db
            .query_opt(
                "SELECT cursor FROM cursors WHERE stream = ?1",
                p![stream],
                |r| r.opt_text(0),
            )?
            .flatten())
    }

    pub fn set_cursor(db: &mut dyn Sql, stream: &str, cursor: Option<&str>) -> DbResult<()> {
        db.execute(
            "INSERT INTO cursors (stream, cursor, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (stream) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
            p![stream, cursor, &now_text()],
        )
        .map(|_| ())
    }

    pub fn commit_page(db: &mut dyn Sql, p: &PageCommit) -> DbResult<()> {
        let now = now_text();
        let stream = p.stream.as_str();
        // Each kind of row as one statement over all its rows (one round trip on
        // PostgreSQL), in the order they always had.
        set_links(db, stream, &p.links, &now)?;
        let nonces: Vec<String> = p
            .outbox
            .iter()
            .map(|_| format!("{:016x}", rand::random::<u64>()))
            .collect();
        db.execute_each(
            "INSERT INTO outbox (stream, body, records, created_at, nonce) VALUES (?1, ?2, ?3, ?4, ?5)",
            &p.outbox
                .iter()
                .zip(&nonces)
                .map(|((body, records), nonce)| p![stream, body, *records, &now, nonce].to_vec())
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "INSERT INTO ledger (stream, key, content_hash, target_ids, status, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (stream, key) DO UPDATE SET content_hash = excluded.content_hash,
                 target_ids = COALESCE(excluded.target_ids, ledger.target_ids),
                 status = excluded.status, updated_at = excluded.updated_at",
            &p.ledger
                .iter()
                .map(|l| {
                    p![
                        stream,
                        &l.key,
                        &l.content_hash,
                        l.target_ids.as_deref(),
                        l.status.as_deref(),
                        &now
                    ]
                    .to_vec()
                })
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "INSERT INTO dead_letters (stream, source_id, record, reason, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            &p.dead_letters
                .iter()
                .map(|d| p![stream, d.source_id.as_deref(), &d.record, &d.reason, &now].to_vec())
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "DELETE FROM dead_letters WHERE id = ?1 AND stream = ?2",
            &p.resolved_dead_letters
                .iter()
                .map(|id| p![*id, stream].to_vec())
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "UPDATE dead_letters SET reason = ?3, retry_requested = 0 WHERE id = ?1 AND stream = ?2",
            &p.failed_again
                .iter()
                .map(|(id, reason)| p![*id, stream, reason].to_vec())
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "DELETE FROM owed WHERE stream = ?1 AND key = ?2",
            &p.settled
                .iter()
                .map(|k| p![stream, k].to_vec())
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "INSERT INTO owed (stream, key, scope, record, reason, since, attempts, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?6)
             ON CONFLICT (stream, key) DO UPDATE SET scope = excluded.scope,
                 record = excluded.record, reason = excluded.reason,
                 attempts = owed.attempts + 1, updated_at = excluded.updated_at",
            &p.owed
                .iter()
                .map(|o| {
                    p![
                        stream,
                        &o.key,
                        o.scope.as_deref(),
                        &o.record,
                        &o.reason,
                        &now
                    ]
                    .to_vec()
                })
                .collect::<Vec<_>>(),
        )?;
        db.execute_each(
            "INSERT INTO page_digests (stream, scope, digest, records, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (stream, scope) DO UPDATE SET digest = excluded.digest,
                 records = excluded.records, updated_at = excluded.updated_at",
            &p.digests
                .iter()
                .map(|d| p![stream, &d.scope, &d.digest, d.records, &now].to_vec())
                .collect::<Vec<_>>(),
        )?;
        if let Some(cur) = &p.cursor {
            set_cursor(db, stream, cur.as_deref())?;
        }
        Ok(())
    }

    /// Links of a page: on PostgreSQL a few statements over arrays (a page's rows in
    /// one), on SQLite one cached statement per row (no round trips there).
    fn set_links(
        db: &mut dyn Sql,
        stream: &str,
        links: &[(String, String)],
        now: &str,
    ) -> DbResult<()> {
        if db.dialect() == sql::Dialect::Postgres {
            // One statement may not update a row twice: the last link of a source wins,
            // as it did row by row.
            let mut last: std::collections::HashMap<&str, &str> =
                std::collections::HashMap::with_capacity(links.len());
            for (s, t) in links {
                last.insert(s, t);
            }
            let (sources, targets): (Vec<&str>, Vec<&str>) = last.into_iter().unzip();
            for (s, t) in sources.chunks(5_000).zip(targets.chunks(5_000)) {
                db.execute(
                    "INSERT INTO links (stream, source_id, target_id, updated_at)
                     SELECT ?1, s, t, ?4 FROM UNNEST(?2::text[], ?3::text[]) AS u (s, t)
                     ON CONFLICT (stream, source_id) DO UPDATE SET target_id = excluded.target_id,
                         updated_at = excluded.updated_at",
                    p![stream, sql::Param::Texts(s), sql::Param::Texts(t), now],
                )?;
            }
            return Ok(());
        }
        db.execute_each(
            "INSERT INTO links (stream, source_id, target_id, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (stream, source_id) DO UPDATE SET target_id = excluded.target_id,
                 updated_at = excluded.updated_at",
            &links
                .iter()
                .map(|(s, t)| p![stream, s, t, now].to_vec())
                .collect::<Vec<_>>(),
        )
        .map(|_| ())
    }

    pub fn reset_cursor(
        db: &mut dyn Sql,
        stream: &str,
        actor: &str,
        detail: &str,
    ) -> DbResult<Option<String>> {
        let old = cursor(db, stream)?;
        db.execute("DELETE FROM cursors WHERE stream = ?1", p![stream])?;
        // A reset run looks at every record again (the ledger still spares duplicates).
        db.execute("DELETE FROM page_digests WHERE stream = ?1", p![stream])?;
        let detail = format!(
            "{detail}; cursor was {}",
            old.as_deref()
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| "at the start".into())
        );
        audit(db, actor, "cursor-reset", Some(stream), &detail)?;
        Ok(old)
    }

    pub fn audit(
        db: &mut dyn Sql,
        actor: &str,
        action: &str,
        stream: Option<&str>,
        detail: &str,
    ) -> DbResult<()> {
        db.execute(
            "INSERT INTO audit (at, actor, action, stream, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            p![&now_text(), actor, action, stream, detail],
        )
        .map(|_| ())
    }

    fn run_row(r: &dyn sql::Row) -> DbResult<RunRow> {
        Ok(RunRow {
            id: r.i64(0)?,
            stream: r.text(1)?,
            trigger: r.text(2)?,
            started_at: r.text(3)?,
            ended_at: r.opt_text(4)?,
            outcome: r.text(5)?,
            counts: Counts {
                pulled: r.i64(6)? as u64,
                created: r.i64(7)? as u64,
                updated: r.i64(8)? as u64,
                skipped: r.i64(9)? as u64,
                failed: r.i64(10)? as u64,
                queued: r.i64(11)? as u64,
            },
            error: r.opt_text(12)?,
        })
    }

    const RUN_COLS: &str = "id, stream, trigger, started_at, ended_at, outcome, pulled, created, updated, skipped, failed, queued, error";

    pub fn last_run(db: &mut dyn Sql, stream: &str) -> DbResult<Option<RunRow>> {
        db.query_opt(
            &format!("SELECT {RUN_COLS} FROM runs WHERE stream = ?1 ORDER BY id DESC LIMIT 1"),
            p![stream],
            run_row,
        )
    }

    pub fn runs(db: &mut dyn Sql, stream: &str, limit: u32) -> DbResult<Vec<RunRow>> {
        db.query(
            &format!("SELECT {RUN_COLS} FROM runs WHERE stream = ?1 ORDER BY id DESC LIMIT ?2"),
            p![stream, limit],
            run_row,
        )
    }

    pub fn owed(db: &mut dyn Sql, stream: &str) -> DbResult<Vec<OwedRow>> {
        db.query(
            "SELECT key, scope, record, reason, since, attempts, updated_at FROM owed
             WHERE stream = ?1 ORDER BY since, key",
            p![stream],
            |r| {
                Ok(OwedRow {
                    key: r.text(0)?,
                    scope: r.opt_text(1)?,
                    record: r.text(2)?,
                    reason: r.text(3)?,
                    since: r.text(4)?,
                    attempts: r.i64(5)? as u64,
                    updated_at: r.text(6)?,
                })
            },
        )
    }

    pub fn owed_summary(db: &mut dyn Sql, stream: &str) -> DbResult<OwedSummary> {
        let (records, since, attempts) = db.query_one(
            "SELECT COUNT(*), MIN(since), MAX(attempts) FROM owed WHERE stream = ?1",
            p![stream],
            |r| Ok((r.i64(0)?, r.opt_text(1)?, r.opt_i64(2)?)),
        )?;
        let last_reason = db.query_opt(
            "SELECT reason FROM owed WHERE stream = ?1 ORDER BY updated_at DESC, key LIMIT 1",
            p![stream],
            |r| r.text(0),
        )?;
        Ok(OwedSummary {
            records: records as u64,
            since,
            attempts: attempts.unwrap_or(0) as u64,
            last_reason,
        })
    }

    pub fn outbox_summary(db: &mut dyn Sql, stream: &str) -> DbResult<OutboxSummary> {
        let (payloads, records) = db.query_one(
            "SELECT COUNT(*), CAST(COALESCE(SUM(records), 0) AS BIGINT) FROM outbox WHERE stream = ?1",
            p![stream],
            |r| Ok((r.i64(0)?, r.i64(1)?)),
        )?;
        let head = db.query_opt(
            "SELECT first_refused_at, attempts, last_status, last_error FROM outbox WHERE stream = ?1
             ORDER BY id LIMIT 1",
            p![stream],
            |r| {
                Ok((
                    r.opt_text(0)?,
                    r.i64(1)?,
                    r.opt_i64(2)?,
                    r.opt_text(3)?,
                ))
            },
        )?;
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

    pub fn stream_state(db: &mut dyn Sql, stream: &str) -> DbResult<StreamState> {
        // The last finished run's outcome and error: no error when it ended well, never
        // an older run's (a run in flight has none yet, so the one before it counts).
        let finished = db.query_opt(
            "SELECT outcome, error FROM runs WHERE stream = ?1 AND outcome != 'running'
             ORDER BY id DESC LIMIT 1",
            p![stream],
            |r| Ok((r.text(0)?, r.opt_text(1)?)),
        )?;
        Ok(StreamState {
            cursor: cursor(db, stream)?,
            last_run: last_run(db, stream)?,
            last_outcome: finished.as_ref().map(|f| f.0.clone()),
            last_error: finished.and_then(|f| f.1),
            owed: owed_summary(db, stream)?,
            next_run_at: db
                .query_opt(
                    "SELECT next_run_at FROM schedule WHERE stream = ?1",
                    p![stream],
                    |r| r.opt_text(0),
                )?
                .flatten(),
            outbox: outbox_summary(db, stream)?,
            dead_letters: db.count(
                "SELECT COUNT(*) FROM dead_letters WHERE stream = ?1",
                p![stream],
            )?,
            links: db.count("SELECT COUNT(*) FROM links WHERE stream = ?1", p![stream])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn cursor_moves_only_with_its_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.file().unwrap())
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
        let c = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("newer usher"), "{err}");
    }
}
