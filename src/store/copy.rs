//! `usher state migrate --to postgres://…`: a SQLite state copied into an empty PostgreSQL
//! database, table by table, in one PostgreSQL transaction (all of it or nothing). Both
//! sides are at the same schema version (each is migrated when opened, number for number),
//! so the tables and columns match; each value is read with the type its PostgreSQL column
//! has. Rows stream through in batches: a large state is not held in memory. Instances and
//! leases are not copied (they belong to running instances); identity sequences are set
//! past the copied ids, so new rows get new ids.

use super::sql::{DbError, DbErrorKind, DbResult, Param, Sql};
use super::{Result, Store};

/// Tables that describe running instances, not the state: never copied.
const NOT_COPIED: &[&str] = &["instances", "leases", "usher_schema"];

/// Rows per INSERT.
const BATCH: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int,
    Text,
    Bytes,
}

enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Value {
    fn param(&self) -> Param<'_> {
        match self {
            Value::Null => Param::Null,
            Value::Int(v) => Param::I64(*v),
            Value::Text(v) => Param::Text(v),
            Value::Bytes(v) => Param::Blob(v),
        }
    }
}

/// What was copied: each table and its rows, in copy order.
pub type Copied = Vec<(String, u64)>;

impl Store {
    /// Copies this (SQLite) state into `target` (PostgreSQL), which must hold no state.
    pub async fn copy_into(&self, target: &Store) -> Result<Copied> {
        let source = self.clone();
        target.write(move |pg| copy(&source, pg)).await
    }
}

fn refuse(message: String) -> DbError {
    DbError {
        kind: DbErrorKind::Constraint,
        message,
    }
}

fn copy(source: &Store, pg: &mut dyn Sql) -> DbResult<Copied> {
    // The target's tables and their columns' types, in the order PostgreSQL lists them.
    let columns: Vec<(String, String, String)> = pg.query(
        "SELECT table_name::text, column_name::text, data_type::text
           FROM information_schema.columns
          WHERE table_schema = current_schema()
          ORDER BY table_name, ordinal_position",
        p![],
        |r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)),
    )?;
    let mut tables: Vec<(String, Vec<(String, Ty)>)> = Vec::new();
    for (table, column, ty) in columns {
        if NOT_COPIED.contains(&table.as_str()) {
            continue;
        }
        let ty = match ty.as_str() {
            "bigint" | "integer" | "smallint" => Ty::Int,
            "bytea" => Ty::Bytes,
            _ => Ty::Text,
        };
        match tables.last_mut() {
            Some((t, cols)) if *t == table => cols.push((column, ty)),
            _ => tables.push((table, vec![(column, ty)])),
        }
    }
    // Refuse a target that holds state already (a second migrate, or the wrong database).
    let mut held = Vec::new();
    for (table, _) in &tables {
        let n = pg
            .query_opt(
                &format!("SELECT CAST(count(*) AS BIGINT) FROM {table}"),
                p![],
                |r| r.i64(0),
            )?
            .unwrap_or(0);
        if n > 0 {
            held.push(format!("{table} ({n} rows)"));
        }
    }
    if !held.is_empty() {
        return Err(refuse(format!(
            "the target database already holds state: {}; migrate only into an empty database (a new one, or drop its tables first)",
            held.join(", ")
        )));
    }
    let mut copied = Vec::new();
    for (table, cols) in &tables {
        let names: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
        // Each column as (IS NULL, value): NULL stays NULL whatever the type.
        let select = format!(
            "SELECT {} FROM {table}",
            names
                .iter()
                .map(|c| format!("\"{c}\" IS NULL, \"{c}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut batch: Vec<Vec<Value>> = Vec::with_capacity(BATCH);
        let mut rows = 0u64;
        let mut flush = |batch: &mut Vec<Vec<Value>>| -> DbResult<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let width = names.len();
            let placeholders = (0..batch.len())
                .map(|r| {
                    let cells = (0..width)
                        .map(|c| format!("?{}", r * width + c + 1))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("({cells})")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let params: Vec<Param<'_>> = batch.iter().flatten().map(Value::param).collect();
            pg.execute(
                &format!(
                    "INSERT INTO {table} ({}) VALUES {placeholders}",
                    names
                        .iter()
                        .map(|c| format!("\"{c}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &params,
            )?;
            batch.clear();
            Ok(())
        };
        let read = source.read_sync(|lite| {
            lite.query_each(&select, p![], &mut |r| {
                let mut row = Vec::with_capacity(cols.len());
                for (i, (_, ty)) in cols.iter().enumerate() {
                    let v = if r.i64(2 * i)? != 0 {
                        Value::Null
                    } else {
                        match ty {
                            Ty::Int => Value::Int(r.i64(2 * i + 1)?),
                            Ty::Text => Value::Text(r.text(2 * i + 1)?),
                            Ty::Bytes => Value::Bytes(r.blob(2 * i + 1)?),
                        }
                    };
                    row.push(v);
                }
                batch.push(row);
                rows += 1;
                if batch.len() >= BATCH {
                    flush(&mut batch)?;
                }
                Ok(())
            })
        });
        if let Err(e) = read {
            return Err(DbError {
                kind: DbErrorKind::Io,
                message: format!("reading {table} from the SQLite state: {e}"),
            });
        }
        flush(&mut batch)?;
        copied.push((table.clone(), rows));
    }
    // New rows get ids after the copied ones.
    let identities: Vec<(String, String)> = pg.query(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
          WHERE table_schema = current_schema() AND is_identity = 'YES'",
        p![],
        |r| Ok((r.text(0)?, r.text(1)?)),
    )?;
    for (table, column) in identities {
        pg.query_opt(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'),
                        COALESCE((SELECT max({column}) FROM {table}), 0) + 1, false)"
            ),
            p![],
            |r| r.i64(0),
        )?;
    }
    Ok(copied)
}
