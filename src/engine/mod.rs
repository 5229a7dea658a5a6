//! What every stream shares: one run of a stream is recorded ([`run_stream`]) around the
//! stream kind's own run (`crate::streams`, handed in as a [`KindRun`]), which pulls a page,
//! maps, matches, pushes, commits (helpers here: [`commit_queued`], [`map_record`], [`owed`],
//! [`in_doubt`], [`refusals`]) and goes on to the next page; the daemon ([`daemon`])
//! schedules runs, never two of one stream at once, and carries out signals and control files.
//! The engine names no stream kind.
//!
//! **A run stops only at a page boundary** (after a commit, or before a page's commit when
//! the page is abandoned): shutdown and operator actions are checked between pages, never
//! in the middle of one. At SIGTERM ([`RunCtx::stop`]) the page in flight finishes with
//! its requests and its commit; only abandoning ([`RunCtx::cancel`]: a second SIGTERM, or
//! `shutdown_timeout`) drops requests in flight. Whatever a page did not commit is pulled
//! again by the next run.

pub mod budget_log;
pub mod control;
pub mod daemon;
pub mod health;
pub mod in_doubt;
pub mod lease;
pub mod lock;
pub mod owed;
pub mod refusals;
pub mod reload;
// seats.io and CDP accounts checked at start and reload.
mod online_check;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Connection, StreamSpec};
use crate::http::{Http, HttpError};
use crate::store::{Counts, Store, StoreError};

// The source side's words (connectors own them: a vendor client does not depend on what
// schedules it).
pub use crate::connectors::{Page, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("target: {0}")]
    Target(HttpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "record {id} cannot be mapped: {reason} (the stream is set to stop on bad records; its cursor stays before this page)"
    )]
    BadRecord { id: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// How a run ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Caught up, or the run's record limit reached.
    Done,
    /// Stopped at a safe point for shutdown or an operator action.
    Stopped,
    /// The target refused a payload; it waits in the outbox for the next execution.
    Refused(String),
}

/// A stream kind's run, as the engine calls it: pages until done, stopped or refused,
/// counting into `counts`. The engine knows no kind: `crate::streams::run` (the room above,
/// one `match` on `StreamKind`) is handed in wherever a [`RunCtx`] is built, so that the
/// engine does not depend on the kinds it runs (no import circle, `tests/rooms.rs`).
pub type KindRun =
    for<'a> fn(&'a RunCtx, &'a str, &'a mut Counts) -> BoxFuture<'a, Result<Flow, RunError>>;

/// What a run needs. Built per run from the configuration current at its start, so a
/// reload never changes a run in flight.
#[derive(Clone)]
pub struct RunCtx {
    pub store: Store,
    pub config: Arc<Config>,
    pub spec: Arc<StreamSpec>,
    pub http: Http,
    /// Abandon the run where it is (a second SIGTERM, or `shutdown_timeout` passed):
    /// requests in flight are dropped, the page is not committed. Handed to `http`.
    pub cancel: CancellationToken,
    /// Shutdown (SIGTERM): stop at the next safe point. The page in flight finishes (its
    /// requests and its commit); waits that hold no request (for a write in doubt to
    /// settle, for a run permit) end at once.
    pub stop: CancellationToken,
    /// An operator action (cursor reset) waits for this stream: stop at the next page boundary.
    pub interrupt: Arc<AtomicBool>,
    /// "now" for this run (the system clock unless a debug build's `USHER_TEST_NOW` set it).
    pub clock: crate::clock::Clock,
    /// `usher backfill STREAM --from DATE`: a one-off run from this date (streams that
    /// support it), with an optional progress bar. `None` for ordinary runs.
    pub backfill: Option<Backfill>,
    /// The run's writes in doubt: every target endpoint of the run tells it about its writes
    /// ([`RunCtx::recorder`]), and a run waits on it before looking up what went unanswered.
    pub doubt: Arc<in_doubt::InDoubt>,
    /// The stream kind's run (`crate::streams::run`).
    pub kind_run: KindRun,
}

/// A one-off backfill asked for on the command line.
#[derive(Clone)]
pub struct Backfill {
    pub from: chrono::NaiveDate,
    /// Shown on a terminal; the stream sets its length and advances it.
    pub progress: Option<indicatif::ProgressBar>,
}

impl RunCtx {
    pub fn should_stop(&self) -> bool {
        self.stop.is_cancelled()
            || self.cancel.is_cancelled()
            || self.interrupt.load(Ordering::SeqCst)
    }

    /// Resolves when the run should stop waiting: shutdown or abandon.
    pub async fn stopping(&self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.cancel.cancelled() => {}
        }
    }

    /// What the run's target endpoints tell about their writes (see [`in_doubt`]).
    pub fn recorder(&self) -> Arc<dyn crate::http::Recorder> {
        self.doubt.clone()
    }

    pub fn connection(&self, name: &str) -> Result<Arc<Connection>, RunError> {
        self.config
            .connections
            .get(name)
            .cloned()
            .ok_or_else(|| RunError::Setup(format!("connection {name:?} is not configured")))
    }
}

/// The record of one finished run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub stream: String,
    pub outcome: &'static str,
    pub counts: Counts,
    pub error: Option<String>,
    pub seconds: f64,
}

/// The outcome of a run that did not start because the state could not record its start
/// (never stored: the state could not take it).
pub const NOT_RECORDED: &str = "not recorded";
/// The outcome of a run whose instance lost the stream's lease (several instances).
pub const LOST_LEASE: &str = "lost lease";

/// Runs one stream once and records the run (start, end, outcome, counts, error). A run
/// whose start cannot be recorded does not run ([`NOT_RECORDED`]).
pub async fn run_stream(ctx: &RunCtx, trigger: &str) -> RunReport {
    let started = Instant::now();
    let name = ctx.spec.name.clone();
    // Integration settings: a stream whose integration is off does not run, not even on a
    // trigger; nothing is recorded, so its state stays exactly as it was.
    if let Some(why) = ctx.config.settings.paused.get(&name) {
        tracing::warn!(stream = %name, trigger, reason = %why, "not run: paused");
        return RunReport {
            stream: name,
            outcome: "paused",
            counts: Counts::default(),
            error: Some(format!("paused: {why}")),
            seconds: 0.0,
        };
    }
    // A run the state cannot record writes to no target: nothing else is tried (the
    // daemon waits before the stream's next attempt, see `daemon::STATE_BACKOFF_FIRST`).
    let run_id = match ctx.store.run_started(&name, trigger).await {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(stream = %name, trigger, error = %e,
                "cannot record the run's start; the run does not start (a run the state cannot record writes to no target)");
            return RunReport {
                stream: name,
                outcome: NOT_RECORDED,
                counts: Counts::default(),
                error: Some(format!(
                    "not run: the state cannot record the run's start: {e}"
                )),
                seconds: started.elapsed().as_secs_f64(),
            };
        }
    };
    tracing::info!(stream = %name, trigger, "run started");
    let mut counts = Counts::default();
    let result = match in_doubt::settle_previous(ctx).await {
        Ok(true) => (ctx.kind_run)(ctx, trigger, &mut counts).await,
        Ok(false) => Ok(Flow::Stopped),
        Err(e) => Err(e),
    };
    ctx.doubt.close().await;
    let (outcome, error) = match result {
        Ok(Flow::Done) => ("ok", None),
        Ok(Flow::Stopped) => ("stopped", None),
        Ok(Flow::Refused(reason)) => ("refused", Some(reason)),
        Err(RunError::Target(HttpError::Cancelled { .. }))
        | Err(RunError::Source(SourceError::Http(HttpError::Cancelled { .. }))) => {
            ("stopped", None)
        }
        // Several instances: another instance holds the stream's lease now (seen by a write
        // of the state, or by the write to the target that could not be recorded).
        Err(RunError::Store(e)) if e.is_lost_lease() => (LOST_LEASE, Some(e.to_string())),
        Err(e)
            if e.to_string()
                .contains(crate::store::leases::LOST_LEASE_TEXT) =>
        {
            (LOST_LEASE, Some(e.to_string()))
        }
        Err(e) => ("failed", Some(e.to_string())),
    };
    if let Err(e) = ctx
        .store
        .run_finished(run_id, outcome, counts, error.clone())
        .await
    {
        tracing::error!(stream = %name, error = %e, "cannot record the run's end");
    }
    let seconds = started.elapsed().as_secs_f64();
    crate::metrics::METRICS.run_finished(&name, &counts, outcome, seconds);
    match &error {
        None => {
            tracing::info!(stream = %name, outcome, pulled = counts.pulled, created = counts.created,
            updated = counts.updated, skipped = counts.skipped, failed = counts.failed, queued = counts.queued,
            seconds, "run finished")
        }
        Some(e) => {
            tracing::error!(stream = %name, outcome, pulled = counts.pulled, created = counts.created,
            updated = counts.updated, skipped = counts.skipped, failed = counts.failed, queued = counts.queued,
            seconds, error = %e, "run finished with an error")
        }
    }
    RunReport {
        stream: name,
        outcome,
        counts,
        error,
        seconds,
    }
}

/// A page that answers the cursor it was asked with by the same cursor and more records would
/// make the run loop forever: that is an error, before anything of it is committed.
pub fn check_not_stuck(
    conn: &str,
    cursor: &Option<String>,
    page: &Page,
) -> Result<(), SourceError> {
    if page.has_more && !page.records.is_empty() && cursor.is_some() && page.next_cursor == *cursor
    {
        return Err(SourceError::Stuck {
            conn: conn.to_string(),
            cursor: cursor.clone(),
        });
    }
    Ok(())
}

/// One source record through the stream's oldest date and mapping: `Some(mapped)` to send,
/// `None` when skipped (older than `oldest`) or set aside in `dead` (as the stream's
/// `on_bad_record` says); `Err` when the stream stops on bad records. Counts as it goes.
pub fn map_record(
    spec: &StreamSpec,
    rec: &Value,
    id: Option<String>,
    changed: Option<chrono::DateTime<chrono::Utc>>,
    counts: &mut Counts,
    dead: &mut Vec<crate::store::DeadLetter>,
) -> Result<Option<Value>, RunError> {
    if let Some(changed) = changed {
        crate::metrics::METRICS.saw_record(&spec.name, changed);
    }
    if let (Some(oldest), Some(changed)) = (spec.oldest, changed)
        && changed < oldest
    {
        counts.skipped += 1;
        return Ok(None);
    }
    match spec.mapping.apply(rec) {
        Ok(v) => Ok(Some(v)),
        Err(e) => match spec.on_bad_record {
            crate::config::BadRecordPolicy::DeadLetter => {
                tracing::warn!(stream = %spec.name, record = id.as_deref().unwrap_or("?"), reason = %e, "record set aside in dead letters");
                counts.failed += 1;
                dead.push(crate::store::DeadLetter {
                    source_id: id,
                    record: rec.to_string(),
                    reason: e.to_string(),
                });
                Ok(None)
            }
            crate::config::BadRecordPolicy::Stop => Err(RunError::BadRecord {
                id: id.unwrap_or_else(|| "without an id".into()),
                reason: e.to_string(),
            }),
        },
    }
}

/// Ends a run on a source that keeps saying "has more" on empty pages (a feed bug) instead
/// of asking it forever: after [`EmptyPages::LIMIT`] empty pages in a row.
#[derive(Debug, Default)]
pub struct EmptyPages(u32);

impl EmptyPages {
    pub const LIMIT: u32 = 3;

    /// Called after each page; true when the run should end here.
    pub fn end_run(&mut self, stream: &str, page_was_empty: bool) -> bool {
        if !page_was_empty {
            self.0 = 0;
            return false;
        }
        self.0 += 1;
        if self.0 >= Self::LIMIT {
            tracing::warn!(
                stream,
                "the feed keeps saying `has_more` on empty pages; ending this run"
            );
            return true;
        }
        false
    }
}

/// Commits a page queued for an outbox target: the new cursor (`next`, or the old one when
/// the source gave none) with the page's outbox rows and dead letters, in one transaction.
/// A quiet tick — caught up, nothing new — writes nothing at all. Moves `cursor` on.
pub async fn commit_queued(
    ctx: &RunCtx,
    cursor: &mut Option<String>,
    next: Option<String>,
    outbox: Vec<(Vec<u8>, u64)>,
    dead_letters: Vec<crate::store::DeadLetter>,
) -> Result<(), RunError> {
    let next = next.or_else(|| cursor.clone());
    if next != *cursor || !outbox.is_empty() || !dead_letters.is_empty() {
        ctx.store
            .commit_page(crate::store::PageCommit {
                stream: ctx.spec.name.clone(),
                cursor: Some(next.clone()),
                outbox,
                dead_letters,
                ..Default::default()
            })
            .await?;
    }
    *cursor = next;
    Ok(())
}

/// A record's ID at `path`, as text (IDs are opaque: numbers and strings both work).
pub fn record_id(record: &Value, path: &str) -> Option<String> {
    match crate::mapping::lookup(record, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::EmptyPages;

    #[test]
    fn a_run_ends_after_three_empty_pages_in_a_row_only() {
        let mut g = EmptyPages::default();
        assert!(!g.end_run("s", true));
        assert!(!g.end_run("s", true));
        assert!(
            !g.end_run("s", false),
            "a page with records starts the count again"
        );
        assert!(!g.end_run("s", true));
        assert!(!g.end_run("s", true));
        assert!(g.end_run("s", true));
    }
}
