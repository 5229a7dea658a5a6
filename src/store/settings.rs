//! State of the integration settings: the last `validate --online` result per connection
//! (so that `status`, which reads the database only, can say "valid"), and the streams that
//! a configuration error of their target paused (CDP 400/401/403), until a reload or a
//! trigger lifts the pause.

use serde::Serialize;

use super::sql::{DbResult, Row};
use super::{Result, Store, now_text};

#[derive(Debug, Clone, Serialize)]
pub struct OnlineCheck {
    pub connection: String,
    pub kind: String,
    pub checked_at: String,
    pub valid: bool,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamPause {
    pub stream: String,
    pub paused_at: String,
    pub reason: String,
}

impl Store {
    pub async fn record_online_check(
        &self,
        connection: &str,
        kind: &str,
        valid: bool,
        message: &str,
    ) -> Result<()> {
        let (connection, kind, message) = (
            connection.to_string(),
            kind.to_string(),
            message.to_string(),
        );
        self.write(move |db| {
            db.execute(
                "INSERT INTO settings_online_checks (connection, kind, checked_at, valid, message)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (connection) DO UPDATE SET kind = excluded.kind,
                   checked_at = excluded.checked_at, valid = excluded.valid, message = excluded.message",
                p![&connection, &kind, &now_text(), valid, &message],
            )
            .map(|_| ())
        })
        .await
    }

    pub fn online_checks_sync(&self) -> Result<Vec<OnlineCheck>> {
        self.read_sync(|db| {
            db.query(
                "SELECT connection, kind, checked_at, valid, message FROM settings_online_checks ORDER BY connection",
                p![],
                |r| {
                    Ok(OnlineCheck {
                        connection: r.text(0)?,
                        kind: r.text(1)?,
                        checked_at: r.text(2)?,
                        valid: r.i64(3)? != 0,
                        message: r.text(4)?,
                    })
                },
            )
        })
    }

    pub async fn pause_stream(&self, stream: &str, reason: &str) -> Result<()> {
        let (stream, reason) = (stream.to_string(), reason.to_string());
        self.write(move |db| {
            db.execute(
                "INSERT INTO cdp_stream_pauses (stream, paused_at, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT (stream) DO UPDATE SET paused_at = excluded.paused_at, reason = excluded.reason",
                p![&stream, &now_text(), &reason],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn stream_pause(&self, stream: &str) -> Result<Option<StreamPause>> {
        let stream = stream.to_string();
        self.read(move |db| {
            db.query_opt(
                "SELECT stream, paused_at, reason FROM cdp_stream_pauses WHERE stream = ?1",
                p![&stream],
                pause_row,
            )
        })
        .await
    }

    /// Lifts the pause of one stream (`None`: of every stream, as a reload does).
    pub async fn lift_pauses(&self, stream: Option<&str>) -> Result<usize> {
        let stream = stream.map(str::to_string);
        self.write(move |db| {
            match stream {
                Some(s) => db.execute("DELETE FROM cdp_stream_pauses WHERE stream = ?1", p![&s]),
                None => db.execute("DELETE FROM cdp_stream_pauses", p![]),
            }
            .map(|n| n as usize)
        })
        .await
    }

    pub fn pauses_sync(&self) -> Result<Vec<StreamPause>> {
        self.read_sync(|db| {
            db.query(
                "SELECT stream, paused_at, reason FROM cdp_stream_pauses ORDER BY stream",
                p![],
                pause_row,
            )
        })
    }
}

fn pause_row(r: &dyn Row) -> DbResult<StreamPause> {
    Ok(StreamPause {
        stream: r.text(0)?,
        paused_at: r.text(1)?,
        reason: r.text(2)?,
    })
}
