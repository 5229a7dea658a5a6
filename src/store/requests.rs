//! Operator requests in the state (migration 11): with several instances on one PostgreSQL,
//! `usher cursor reset` and `usher trigger` run on any host with the configuration; they
//! write a row here, and the instance that holds the stream's lease carries it out at the
//! stream's next safe point, writes who did it and the outcome, and the CLI that waits
//! prints that. The audit trail names the host that asked.

use serde::Serialize;

use super::sql::{DbResult, Sql};
use super::{Result, Store, now_text};

/// One request, as the CLI wrote it and (once done) as the holder closed it.
#[derive(Debug, Clone, Serialize)]
pub struct OperatorRequest {
    pub id: i64,
    pub stream: String,
    /// `reset` or `trigger`.
    pub action: String,
    pub actor: String,
    pub host: String,
    pub requested_at: String,
    pub done_at: Option<String>,
    /// The instance that carried it out.
    pub done_by: Option<String>,
    pub result: Option<String>,
}

const COLUMNS: &str = "id, stream, action, actor, host, requested_at, done_at, done_by, result";

fn row(r: &dyn super::sql::Row) -> DbResult<OperatorRequest> {
    Ok(OperatorRequest {
        id: r.i64(0)?,
        stream: r.text(1)?,
        action: r.text(2)?,
        actor: r.text(3)?,
        host: r.text(4)?,
        requested_at: r.text(5)?,
        done_at: r.opt_text(6)?,
        done_by: r.opt_text(7)?,
        result: r.opt_text(8)?,
    })
}

fn insert(db: &mut dyn Sql, stream: &str, action: &str, actor: &str, host: &str) -> DbResult<i64> {
    db.query_opt(
        "INSERT INTO requests (stream, action, actor, host, requested_at)
         VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        p![stream, action, actor, host, &now_text()],
        |r| r.i64(0),
    )?
    .ok_or_else(|| super::sql::DbError::other("the request was not stored"))
}

fn get(db: &mut dyn Sql, id: i64) -> DbResult<Option<OperatorRequest>> {
    db.query_opt(
        &format!("SELECT {COLUMNS} FROM requests WHERE id = ?1"),
        p![id],
        row,
    )
}

impl Store {
    /// Stores a request for the holder of `stream`'s lease; its id.
    pub async fn request(
        &self,
        stream: &str,
        action: &str,
        actor: &str,
        host: &str,
    ) -> Result<i64> {
        let (stream, action, actor, host) = (
            stream.to_string(),
            action.to_string(),
            actor.to_string(),
            host.to_string(),
        );
        self.write(move |db| insert(db, &stream, &action, &actor, &host))
            .await
    }

    /// One request, as it stands.
    pub async fn request_get(&self, id: i64) -> Result<Option<OperatorRequest>> {
        self.read(move |db| get(db, id)).await
    }

    /// Every request not done yet, oldest first.
    pub async fn requests_open(&self) -> Result<Vec<OperatorRequest>> {
        self.read(|db| {
            db.query(
                &format!(
                    "SELECT {COLUMNS} FROM requests WHERE done_at IS NULL ORDER BY id LIMIT 1000"
                ),
                p![],
                row,
            )
        })
        .await
    }

    /// Closes a request: who carried it out and how it went. Written once (a request
    /// already closed stays as it was); true when this call closed it.
    pub async fn request_done(&self, id: i64, done_by: &str, result: &str) -> Result<bool> {
        let (done_by, result) = (done_by.to_string(), result.to_string());
        self.write(move |db| {
            Ok(db.execute(
                "UPDATE requests SET done_at = ?2, done_by = ?3, result = ?4
                 WHERE id = ?1 AND done_at IS NULL",
                p![id, &now_text(), &done_by, &result],
            )? == 1)
        })
        .await
    }
}
