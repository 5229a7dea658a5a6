//! The SQL both backends speak. Every query of the store is written once, against [`Sql`],
//! with SQLite's `?N` placeholders, types both know (BIGINT/INTEGER as `i64`, TEXT, BLOB/
//! BYTEA, times as RFC 3339 text), and statements both accept (`INSERT … ON CONFLICT …`,
//! `RETURNING`, no `PRAGMA`, aggregates cast to BIGINT). The SQLite side binds them as they
//! are; the PostgreSQL side turns `?N` into `$N`.
//!
//! Both run on a blocking thread: SQLite because rusqlite is blocking, PostgreSQL because a
//! query body (a closure over `&mut dyn Sql`) is plain sequential code that blocks on each
//! round trip (`Handle::block_on` from the blocking pool, while the connection's own task
//! runs on the runtime's workers). So a transaction is one closure for both backends.

use std::fmt;

/// A bound value.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    I64(i64),
    Text(&'a str),
    Blob(&'a [u8]),
    /// A text array (PostgreSQL only: `= ANY(?2)`, `UNNEST(?2::text[])`).
    Texts(&'a [&'a str]),
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::I64(v)
    }
}

impl From<u32> for Param<'_> {
    fn from(v: u32) -> Self {
        Param::I64(v as i64)
    }
}

impl From<u64> for Param<'_> {
    fn from(v: u64) -> Self {
        Param::I64(v as i64)
    }
}

impl From<bool> for Param<'_> {
    fn from(v: bool) -> Self {
        Param::I64(v as i64)
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(v: &'a [u8]) -> Self {
        Param::Blob(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Param<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Param::Blob(v)
    }
}

impl<'a, T> From<Option<T>> for Param<'a>
where
    T: Into<Param<'a>>,
{
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Param::Null)
    }
}

/// `p![a, b, …]`: the parameters of a statement.
#[macro_export]
macro_rules! p {
    ($($x:expr),* $(,)?) => {
        &[$($crate::store::sql::Param::from($x)),*][..]
    };
}

/// What went wrong, in the words a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbErrorKind {
    /// Locked or busy: try again later.
    Busy,
    /// The disk (or the database's quota) is full.
    Full,
    /// An I/O error, a lost connection to the server, a file that cannot be opened.
    Io,
    /// This process may not open or write the file or its directory.
    Permission,
    /// The file is damaged, or not a database.
    Corrupt,
    /// A row held a value of another type than asked.
    Type,
    /// A constraint (unique, not null…) refused the write.
    Constraint,
    /// This instance no longer holds the lease it wrote under (PostgreSQL, several
    /// instances): nothing of the transaction was kept.
    LostLease,
    Other,
}

#[derive(Debug, Clone)]
pub struct DbError {
    pub kind: DbErrorKind,
    pub message: String,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DbError {}

impl DbError {
    pub fn other(message: impl Into<String>) -> Self {
        DbError {
            kind: DbErrorKind::Other,
            message: message.into(),
        }
    }
}

pub type DbResult<T> = std::result::Result<T, DbError>;

/// Which backend a query runs on (for the few statements that differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One row of an answer.
pub trait Row {
    fn i64(&self, i: usize) -> DbResult<i64>;
    fn opt_i64(&self, i: usize) -> DbResult<Option<i64>>;
    fn text(&self, i: usize) -> DbResult<String>;
    fn opt_text(&self, i: usize) -> DbResult<Option<String>>;
    fn blob(&self, i: usize) -> DbResult<Vec<u8>>;
}

/// A connection or a transaction of either backend.
pub trait Sql {
    fn dialect(&self) -> Dialect;

    /// Runs a statement; the rows it changed.
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<u64>;

    /// Runs one statement once per parameter set, in order; the rows they changed. On
    /// PostgreSQL they are sent together (pipelined): one round trip, not one each.
    fn execute_each(&mut self, sql: &str, rows: &[Vec<Param<'_>>]) -> DbResult<u64> {
        let mut n = 0;
        for params in rows {
            n += self.execute(sql, params)?;
        }
        Ok(n)
    }

    /// Runs a query, calling `each` for every row.
    fn query_each(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Row) -> DbResult<()>,
    ) -> DbResult<()>;
}

impl dyn Sql + '_ {
    /// Every row, mapped.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        mut map: impl FnMut(&dyn Row) -> DbResult<T>,
    ) -> DbResult<Vec<T>> {
        let mut out = Vec::new();
        self.query_each(sql, params, &mut |r| {
            out.push(map(r)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The first row, if any.
    pub fn query_opt<T>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        map: impl FnOnce(&dyn Row) -> DbResult<T>,
    ) -> DbResult<Option<T>> {
        let mut map = Some(map);
        let mut out = None;
        self.query_each(sql, params, &mut |r| {
            if let Some(m) = map.take() {
                out = Some(m(r)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The first row; an error when there is none.
    pub fn query_one<T>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        map: impl FnOnce(&dyn Row) -> DbResult<T>,
    ) -> DbResult<T> {
        self.query_opt(sql, params, map)?
            .ok_or_else(|| DbError::other(format!("no row for: {}", first_line(sql))))
    }

    /// A single number (`SELECT COUNT(*) …`).
    pub fn count(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<u64> {
        self.query_one(sql, params, |r| r.i64(0)).map(|n| n as u64)
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or("")
}

/// `?N` → `$N` (PostgreSQL's placeholders), outside quoted strings.
pub fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut quoted = false;
    // SQLite's rule for a bare `?`: one more than the largest number given so far.
    let mut largest = 0u32;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => largest + 1,
                };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------- SQLite

/// rusqlite's connections and transactions (a `Transaction` derefs to a `Connection`).
pub struct Lite<'c>(pub &'c rusqlite::Connection);

fn lite_err(e: rusqlite::Error) -> DbError {
    use rusqlite::ErrorCode as C;
    let kind = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => DbErrorKind::Busy,
            C::DiskFull => DbErrorKind::Full,
            C::SystemIoFailure | C::CannotOpen | C::OutOfMemory | C::FileLockingProtocolFailed => {
                DbErrorKind::Io
            }
            C::ReadOnly | C::PermissionDenied | C::AuthorizationForStatementDenied => {
                DbErrorKind::Permission
            }
            C::DatabaseCorrupt | C::NotADatabase => DbErrorKind::Corrupt,
            C::ConstraintViolation => DbErrorKind::Constraint,
            _ => DbErrorKind::Other,
        },
        rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::IntegralValueOutOfRange(..) => {
            DbErrorKind::Type
        }
        _ => DbErrorKind::Other,
    };
    DbError {
        kind,
        message: e.to_string(),
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match *self {
            Param::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Param::I64(v) => ToSqlOutput::Borrowed(ValueRef::Integer(v)),
            Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Param::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Param::Texts(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "arrays are bound on PostgreSQL only".into(),
                ));
            }
        })
    }
}

struct LiteRow<'r, 's>(&'r rusqlite::Row<'s>);

impl Row for LiteRow<'_, '_> {
    fn i64(&self, i: usize) -> DbResult<i64> {
        self.0.get(i).map_err(lite_err)
    }
    fn opt_i64(&self, i: usize) -> DbResult<Option<i64>> {
        self.0.get(i).map_err(lite_err)
    }
    fn text(&self, i: usize) -> DbResult<String> {
        self.0.get(i).map_err(lite_err)
    }
    fn opt_text(&self, i: usize) -> DbResult<Option<String>> {
        self.0.get(i).map_err(lite_err)
    }
    fn blob(&self, i: usize) -> DbResult<Vec<u8>> {
        // A body written as text by an earlier version reads as its bytes.
        match self.0.get_ref(i).map_err(lite_err)? {
            rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                Ok(t.to_vec())
            }
            rusqlite::types::ValueRef::Null => Ok(Vec::new()),
            other => Err(DbError {
                kind: DbErrorKind::Type,
                message: format!("column {i}: expected bytes, found {:?}", other.data_type()),
            }),
        }
    }
}

impl Sql for Lite<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<u64> {
        let mut st = self.0.prepare_cached(sql).map_err(lite_err)?;
        st.execute(rusqlite::params_from_iter(params.iter()))
            .map(|n| n as u64)
            .map_err(lite_err)
    }

    fn query_each(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Row) -> DbResult<()>,
    ) -> DbResult<()> {
        let mut st = self.0.prepare_cached(sql).map_err(lite_err)?;
        let mut rows = st
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(lite_err)?;
        while let Some(r) = rows.next().map_err(lite_err)? {
            each(&LiteRow(r))?;
        }
        Ok(())
    }
}

/// A rusqlite error as the store's.
pub fn from_rusqlite(e: rusqlite::Error) -> DbError {
    lite_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_strings() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d IN (?2,?10)"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d IN ($2,$10)"
        );
        // A bare `?` is one more than the largest number so far, as in SQLite.
        assert_eq!(
            to_postgres("WHERE s = ?1 AND id IN (?,?,?) AND x = ?7 AND y = ?"),
            "WHERE s = $1 AND id IN ($2,$3,$4) AND x = $7 AND y = $8"
        );
    }

    #[test]
    fn the_same_statements_run_on_sqlite() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let mut db = Lite(&c);
        let db: &mut dyn Sql = &mut db;
        db.execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, body BLOB, n INTEGER)",
            p![],
        )
        .unwrap();
        let none: Option<&str> = None;
        let id = db
            .query_one(
                "INSERT INTO t (name, body, n) VALUES (?1, ?2, ?3) RETURNING id",
                p!["a", &b"xy"[..], 7i64],
                |r| r.i64(0),
            )
            .unwrap();
        db.execute(
            "INSERT INTO t (name, body, n) VALUES (?1, ?2, ?3)",
            p![none, &b""[..], Some(8i64)],
        )
        .unwrap();
        assert_eq!(id, 1);
        let rows = db
            .query("SELECT name, body, n FROM t ORDER BY id", p![], |r| {
                Ok((r.opt_text(0)?, r.blob(1)?, r.i64(2)?))
            })
            .unwrap();
        assert_eq!(rows[0], (Some("a".into()), b"xy".to_vec(), 7));
        assert_eq!(rows[1].0, None);
        assert_eq!(
            db.count("SELECT COUNT(*) FROM t WHERE n > ?1", p![6i64])
                .unwrap(),
            2
        );
    }
}
