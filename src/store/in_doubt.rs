//! Writes in doubt (migration 7): per stream, until when a write that usher sent may still
//! take effect at the target although its answer was not seen. Written before a write
//! leaves (amortized: one row per stream, extended ahead of the writes, see
//! `engine::in_doubt`), so that a process started after a crash, a kill or a failover waits
//! for it instead of looking the records up while the vendor may still be saving them.

use serde::Serialize;

use super::sql::{DbResult, Sql};
use super::{Result, Store, now_text, parse_ts, ts};
use chrono::{DateTime, Utc};

/// What the row says about the stream's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DoubtState {
    /// A run is writing; writes may land until `until`. A process that died leaves this.
    Writing,
    /// A run ended with a write whose answer it did not see; it may land until `until`.
    Unanswered,
    /// A run waits until `until` (plus nothing: the margin is in it) before it looks.
    Settling,
}

impl DoubtState {
    fn as_str(self) -> &'static str {
        match self {
            DoubtState::Writing => "writing",
            DoubtState::Unanswered => "unanswered",
            DoubtState::Settling => "settling",
        }
    }

    fn parse(s: &str) -> DoubtState {
        match s {
            "unanswered" => DoubtState::Unanswered,
            "settling" => DoubtState::Settling,
            _ => DoubtState::Writing,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Doubt {
    pub until: DateTime<Utc>,
    pub state: DoubtState,
    /// The write it is about, e.g. `POST /api/users`.
    pub detail: String,
    /// When the row was last written (wall clock): `until` lay at most this far ahead then.
    pub recorded_at: DateTime<Utc>,
}

impl Store {
    /// Writes of `stream` may land until `until` (sets or moves the row). Under a lease
    /// (several instances) the lease is made to last until `until` plus the settle margin
    /// in the same transaction: no other instance takes the stream over and looks before
    /// these writes can no longer land.
    pub async fn doubt_set(
        &self,
        stream: &str,
        until: DateTime<Utc>,
        state: DoubtState,
        detail: &str,
    ) -> Result<()> {
        let (stream, detail) = (stream.to_string(), detail.to_string());
        let fence = self.fence.clone();
        self.write(move |db| {
            if let Some(f) = fence {
                let now = super::leases::db_now_ms(db)?;
                let need = until.timestamp_millis() + f.margin_ms - now;
                super::leases::check_fence(db, &f.fence, need.max(0))?;
            }
            db.execute(
                "INSERT INTO in_doubt (stream, until, state, detail, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (stream) DO UPDATE SET until = excluded.until,
                   state = excluded.state, detail = excluded.detail,
                   updated_at = excluded.updated_at",
                p![&stream, &ts(until), state.as_str(), &detail, &now_text()],
            )
            .map(|_| ())
        })
        .await
    }

    /// The stream's writes in doubt, if any are recorded.
    pub async fn doubt(&self, stream: &str) -> Result<Option<Doubt>> {
        let stream = stream.to_string();
        self.read(move |db| q_doubt(db, &stream)).await
    }

    pub fn doubt_sync(&self, stream: &str) -> Result<Option<Doubt>> {
        self.read_sync(|db| q_doubt(db, stream))
    }

    /// Nothing of the stream is in doubt any more.
    pub async fn doubt_clear(&self, stream: &str) -> Result<()> {
        let stream = stream.to_string();
        self.write(move |db| {
            db.execute("DELETE FROM in_doubt WHERE stream = ?1", p![&stream])
                .map(|_| ())
        })
        .await
    }
}

fn q_doubt(db: &mut dyn Sql, stream: &str) -> DbResult<Option<Doubt>> {
    let row = db.query_opt(
        "SELECT until, state, detail, updated_at FROM in_doubt WHERE stream = ?1",
        p![stream],
        |r| Ok((r.text(0)?, r.text(1)?, r.opt_text(2)?, r.text(3)?)),
    )?;
    Ok(row.map(|(until, state, detail, recorded)| {
        // An unreadable time is treated as "now": the wait is the margin alone.
        let until = parse_ts(&until).unwrap_or_else(Utc::now);
        Doubt {
            until,
            state: DoubtState::parse(&state),
            detail: detail.unwrap_or_default(),
            // Unreadable: no bound from it (the wait is `until`'s).
            recorded_at: parse_ts(&recorded).unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }))
}
