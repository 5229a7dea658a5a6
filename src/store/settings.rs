//! State of the integration settings: the last `validate --online` result per connection
//! (so that `status`, which reads the database only, can say "valid"), and the streams that
//! a configuration error of their target paused (CDP 400/401/403), until a reload or a
//! trigger lifts the pause.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

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
        self.call(move |c| {
            c.execute(
                "INSERT INTO settings_online_checks (connection, kind, checked_at, valid, message)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (connection) DO UPDATE SET kind = excluded.kind,
                   checked_at = excluded.checked_at, valid = excluded.valid, message = excluded.message",
                params![connection, kind, now_text(), valid, message],
            )
            .map(|_| ())
        })
        .await
    }

    pub fn online_checks_sync(&self) -> Result<Vec<OnlineCheck>> {
        self.call_sync(|c| {
            let mut st = c.prepare(
                "SELECT connection, kind, checked_at, valid, message FROM settings_online_checks ORDER BY connection",
            )?;
            let rows = st.query_map([], |r| {
                Ok(OnlineCheck {
                    connection: r.get(0)?,
                    kind: r.get(1)?,
                    checked_at: r.get(2)?,
                    valid: r.get(3)?,
                    message: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    pub async fn pause_stream(&self, stream: &str, reason: &str) -> Result<()> {
        let (stream, reason) = (stream.to_string(), reason.to_string());
        self.call(move |c| {
            c.execute(
                "INSERT INTO cdp_stream_pauses (stream, paused_at, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT (stream) DO UPDATE SET paused_at = excluded.paused_at, reason = excluded.reason",
                params![stream, now_text(), reason],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn stream_pause(&self, stream: &str) -> Result<Option<StreamPause>> {
        let stream = stream.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT stream, paused_at, reason FROM cdp_stream_pauses WHERE stream = ?1",
                params![stream],
                |r| {
                    Ok(StreamPause {
                        stream: r.get(0)?,
                        paused_at: r.get(1)?,
                        reason: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// Lifts the pause of one stream (`None`: of every stream, as a reload does).
    pub async fn lift_pauses(&self, stream: Option<&str>) -> Result<usize> {
        let stream = stream.map(str::to_string);
        self.call(move |c| match stream {
            Some(s) => c.execute(
                "DELETE FROM cdp_stream_pauses WHERE stream = ?1",
                params![s],
            ),
            None => c.execute("DELETE FROM cdp_stream_pauses", []),
        })
        .await
    }

    pub fn pauses_sync(&self) -> Result<Vec<StreamPause>> {
        self.call_sync(|c| {
            let mut st = c.prepare(
                "SELECT stream, paused_at, reason FROM cdp_stream_pauses ORDER BY stream",
            )?;
            let rows = st.query_map([], |r| {
                Ok(StreamPause {
                    stream: r.get(0)?,
                    paused_at: r.get(1)?,
                    reason: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }
}
