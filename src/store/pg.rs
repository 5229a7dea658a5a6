//! The PostgreSQL backend (issue 20): a pool of tokio-postgres connections (deadpool), the
//! [`Sql`] of a transaction on one of them, and the connection settings.
//!
//! A store body runs on tokio's blocking pool, like SQLite's; here it blocks on each round
//! trip with `Handle::block_on` while the connection's task runs on the runtime's workers.
//! Statements are prepared once per connection (deadpool's statement cache), with SQLite's
//! `?N` placeholders turned into `$N`.
//!
//! TLS: `sslmode=disable` (the default here, for a server on the same host or network) or
//! `require`/`verify-full` through rustls with the platform's roots. The password never
//! sits in the URL: it comes from `[daemon] state_password_file` (or `_env`), like every
//! other secret, and no message shows it.

use std::str::FromStr;

use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::runtime::Handle;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::sql::{DbError, DbErrorKind, DbResult, Dialect, Param, Row, Sql, to_postgres};
use crate::secret::Secret;

/// Connections in the pool: a daemon's runs, its receiver's writer and its lease keeper.
const POOL_SIZE: usize = 8;

/// Where the state lives on PostgreSQL, as configured.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/db?sslmode=…`, without a password.
    pub url: String,
    pub password: Option<Secret>,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The URL as a message may show it: no password, whatever was written.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(an unreadable postgres:// URL)".to_string(),
    }
}

fn pg_err(e: tokio_postgres::Error) -> DbError {
    use tokio_postgres::error::SqlState as S;
    let kind = match e.code() {
        Some(c) if *c == S::DISK_FULL || *c == S::OUT_OF_MEMORY => DbErrorKind::Full,
        Some(c)
            if *c == S::T_R_SERIALIZATION_FAILURE
                || *c == S::T_R_DEADLOCK_DETECTED
                || *c == S::LOCK_NOT_AVAILABLE
                || *c == S::TOO_MANY_CONNECTIONS =>
        {
            DbErrorKind::Busy
        }
        Some(c) if c.code().starts_with("23") => DbErrorKind::Constraint,
        Some(c) if *c == S::DATA_CORRUPTED || *c == S::INDEX_CORRUPTED => DbErrorKind::Corrupt,
        Some(_) => DbErrorKind::Other,
        // No SQLSTATE: the connection, not the statement.
        None if e.is_closed() => DbErrorKind::Io,
        None => DbErrorKind::Io,
    };
    // The server's message (never the connection string).
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    DbError { kind, message }
}

/// A statement the server would not prepare is usher's own mistake: the message names it
/// (statements hold no values; those are parameters).
fn unprepared(e: tokio_postgres::Error, sql: &str) -> DbError {
    let mut err = pg_err(e);
    let statement: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    let statement: String = statement.chars().take(300).collect();
    err.message = format!("{} (in `{statement}`)", err.message);
    err
}

fn pool_err(e: deadpool_postgres::PoolError) -> DbError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => DbError {
            kind: DbErrorKind::Io,
            message: format!("cannot get a connection to PostgreSQL: {other}"),
        },
    }
}

/// Builds the pool (connections are opened when first needed).
pub fn pool(settings: &PgSettings) -> Result<Pool, String> {
    let mut cfg = tokio_postgres::Config::from_str(&settings.url)
        .map_err(|e| format!("state URL {}: {e}", redact_url(&settings.url)))?;
    if let Some(p) = &settings.password {
        cfg.password(p.expose());
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("usher");
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(std::time::Duration::from_secs(10));
    }
    // Statements are prepared once per connection and run for days while their tables grow
    // from empty: a generic plan chosen on an empty `links` (a sequential scan) would stay
    // (measured: a page's link lookup 90 ms at 20k links instead of < 1 ms). Each run is
    // planned for its parameters instead; usher's statements are small to plan.
    // And usher's working set is in memory, where an index probe costs about what a page
    // read in order does: at the default `random_page_cost` of 4 (a spinning disk) a page's
    // 500-key link lookup scanned all of `links` from 40k rows (measured: 7.8 ms against
    // 2.2 ms by the index). 1.1 is the usual value for SSDs. Either one set in the URL's
    // `options` is kept.
    let mut options = cfg.get_options().unwrap_or_default().to_string();
    for (name, value) in [
        ("plan_cache_mode", "force_custom_plan"),
        ("random_page_cost", "1.1"),
    ] {
        if !options.contains(name) {
            options = format!("{options} -c {name}={value}").trim().to_string();
        }
    }
    cfg.options(&options);
    let mgr_cfg = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = match cfg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => {
            Manager::from_config(cfg, tokio_postgres::NoTls, mgr_cfg)
        }
        _ => {
            use rustls_platform_verifier::ConfigVerifierExt;
            let tls = rustls::ClientConfig::with_platform_verifier()
                .map_err(|e| format!("TLS for PostgreSQL: {e}"))?;
            Manager::from_config(
                cfg,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                mgr_cfg,
            )
        }
    };
    Pool::builder(mgr)
        .max_size(POOL_SIZE)
        .build()
        .map_err(|e| format!("PostgreSQL pool: {e}"))
}

/// The runtime that drives the pool's connections: one thread of its own. On the daemon's
/// runtime a round trip's reply waited behind whatever else that runtime had queued: under
/// a flood of 2,300 connections at the S-360 receiver, a legitimate POST's commit (4 round
/// trips) took over 2 s and 1 in 3 timed out, where SQLite (no I/O on the runtime) answered
/// every one. Bodies still run on the blocking pool and block on each round trip.
pub struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    pub fn start() -> std::io::Result<IoRuntime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("usher-pg-io")
            .enable_all()
            .build()
            .map(|rt| IoRuntime(Some(rt)))
    }

    pub fn handle(&self) -> Handle {
        self.0
            .as_ref()
            .expect("running until dropped")
            .handle()
            .clone()
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        // The last store may be dropped on an async thread, where waiting is not allowed.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Rows this process wrote into the tables a run looks up by key (`links`, `ledger`), and
/// when to refresh the planner's statistics of them next.
///
/// A first import fills `links` from empty within one run, long before autovacuum's
/// analyze catches up: planned with the statistics of an empty table, a page's 500-key
/// lookup read every link of the stream (a bitmap scan on `stream`, the keys as a filter),
/// 5 ms at 10k links and growing with the table, where the key index takes about 2 ms at
/// any size. So every time this process's writes into one of them double (from
/// [`FIRST_ANALYZE`] rows on), the table is analyzed, beside the run: 8 times for a
/// first import of 200k users, never again once the table is large.
#[derive(Default)]
pub struct Growth {
    tables: std::sync::Mutex<std::collections::HashMap<&'static str, (u64, u64)>>,
}

/// Rows written into a table before its first analyze by this process.
pub const FIRST_ANALYZE: u64 = 2_000;

impl Growth {
    /// Counts `n` rows written into `table`; true when its statistics are due.
    pub fn wrote(&self, table: &'static str, n: usize) -> bool {
        if n == 0 {
            return false;
        }
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let (written, next) = tables.entry(table).or_insert((0, FIRST_ANALYZE));
        *written += n as u64;
        if *written < *next {
            return false;
        }
        *next = *written * 2;
        true
    }
}

/// `ANALYZE table` on a pooled connection of its own (see [`Growth`]). Best effort: the
/// statistics only steer plans, and autovacuum refreshes them anyway.
pub fn analyze(pool: &Pool, rt: &Handle, table: &'static str) {
    let (pool, rt2) = (pool.clone(), rt.clone());
    rt.spawn_blocking(move || {
        let t = std::time::Instant::now();
        match transaction(&pool, &rt2, |db| {
            db.execute(&format!("ANALYZE {table}"), &[])
        }) {
            Ok(_) => tracing::debug!(
                table,
                ms = t.elapsed().as_millis() as u64,
                "statistics refreshed"
            ),
            Err(e) => tracing::debug!(table, error = %e, "statistics not refreshed"),
        }
    });
}

/// Runs `f` in one transaction on a pooled connection, from a blocking thread.
pub fn transaction<T>(
    pool: &Pool,
    rt: &Handle,
    f: impl FnOnce(&mut dyn Sql) -> DbResult<T>,
) -> DbResult<T> {
    let mut client = rt.block_on(pool.get()).map_err(pool_err)?;
    let tx = rt
        .block_on(client.build_transaction().start())
        .map_err(pg_err)?;
    let out = {
        let mut sql = PgSql { tx: &tx, rt };
        f(&mut sql)
    };
    match out {
        Ok(v) => {
            rt.block_on(tx.commit()).map_err(pg_err)?;
            Ok(v)
        }
        Err(e) => {
            let _ = rt.block_on(tx.rollback());
            Err(e)
        }
    }
}

struct PgSql<'t> {
    tx: &'t deadpool_postgres::Transaction<'t>,
    rt: &'t Handle,
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::I64(v) => match *ty {
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::BOOL => (v != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Param::Text(s) => match *ty {
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => s.to_sql(ty, out),
            },
            Param::Blob(b) => match *ty {
                Type::TEXT | Type::VARCHAR => std::str::from_utf8(b)?.to_sql(ty, out),
                _ => b.to_sql(ty, out),
            },
            Param::Texts(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl Sql for PgSql<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<u64> {
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        self.rt.block_on(async {
            let st = self
                .tx
                .prepare_cached(&to_postgres(sql))
                .await
                .map_err(|e| unprepared(e, sql))?;
            self.tx.execute(&st, &args).await.map_err(pg_err)
        })
    }

    fn execute_each(&mut self, sql: &str, rows: &[Vec<Param<'_>>]) -> DbResult<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let args: Vec<Vec<&(dyn ToSql + Sync)>> = rows
            .iter()
            .map(|params| params.iter().map(|p| p as _).collect())
            .collect();
        self.rt.block_on(async {
            let st = self
                .tx
                .prepare_cached(&to_postgres(sql))
                .await
                .map_err(|e| unprepared(e, sql))?;
            // Polled together, tokio-postgres pipelines them on the connection.
            let done = futures::future::try_join_all(
                args.iter().map(|a| self.tx.execute(&st, a.as_slice())),
            )
            .await
            .map_err(pg_err)?;
            Ok(done.iter().sum())
        })
    }

    fn query_each(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Row) -> DbResult<()>,
    ) -> DbResult<()> {
        let args: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = self.rt.block_on(async {
            let st = self
                .tx
                .prepare_cached(&to_postgres(sql))
                .await
                .map_err(|e| unprepared(e, sql))?;
            self.tx.query(&st, &args).await.map_err(pg_err)
        })?;
        for r in &rows {
            each(&PgRow(r))?;
        }
        Ok(())
    }
}

struct PgRow<'r>(&'r tokio_postgres::Row);

fn type_err(i: usize, want: &str, e: impl std::fmt::Display) -> DbError {
    DbError {
        kind: DbErrorKind::Type,
        message: format!("column {i}: expected {want}: {e}"),
    }
}

impl Row for PgRow<'_> {
    fn i64(&self, i: usize) -> DbResult<i64> {
        self.opt_i64(i)?
            .ok_or_else(|| type_err(i, "a number", "NULL"))
    }

    fn opt_i64(&self, i: usize) -> DbResult<Option<i64>> {
        let ty = self.0.columns().get(i).map(|c| c.type_().clone());
        match ty {
            Some(Type::INT4) => self
                .0
                .try_get::<_, Option<i32>>(i)
                .map(|v| v.map(i64::from))
                .map_err(|e| type_err(i, "a number", e)),
            Some(Type::INT2) => self
                .0
                .try_get::<_, Option<i16>>(i)
                .map(|v| v.map(i64::from))
                .map_err(|e| type_err(i, "a number", e)),
            Some(Type::BOOL) => self
                .0
                .try_get::<_, Option<bool>>(i)
                .map(|v| v.map(i64::from))
                .map_err(|e| type_err(i, "a number", e)),
            _ => self
                .0
                .try_get::<_, Option<i64>>(i)
                .map_err(|e| type_err(i, "a number", e)),
        }
    }

    fn text(&self, i: usize) -> DbResult<String> {
        self.opt_text(i)?.ok_or_else(|| type_err(i, "text", "NULL"))
    }

    fn opt_text(&self, i: usize) -> DbResult<Option<String>> {
        self.0
            .try_get::<_, Option<String>>(i)
            .map_err(|e| type_err(i, "text", e))
    }

    fn blob(&self, i: usize) -> DbResult<Vec<u8>> {
        let ty = self.0.columns().get(i).map(|c| c.type_().clone());
        match ty {
            Some(Type::TEXT) | Some(Type::VARCHAR) => self
                .0
                .try_get::<_, Option<String>>(i)
                .map(|v| v.unwrap_or_default().into_bytes())
                .map_err(|e| type_err(i, "bytes", e)),
            _ => self
                .0
                .try_get::<_, Option<Vec<u8>>>(i)
                .map(Option::unwrap_or_default)
                .map_err(|e| type_err(i, "bytes", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_never_shows_its_password() {
        let r = redact_url("postgres://usher:s3cret@db.example:5432/usher");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("usher@") || r.contains("usher:***@"), "{r}");
        let s = PgSettings {
            url: "postgres://u:pw@h/db".into(),
            password: Some(Secret::new("other")),
        };
        let d = format!("{s:?}");
        assert!(!d.contains("pw@") && !d.contains("other"), "{d}");
    }
}
