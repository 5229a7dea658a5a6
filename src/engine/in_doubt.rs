//! Writes in doubt: a write whose answer usher did not see (a crash, a timeout, a broken
//! connection, a gateway's 502/504) may still take effect at the target until its
//! **deadline** (when it left plus the connection's `timeout`, which bounds a request end to
//! end) plus the **settle margin** (`daemon.settle_margin`, for what the vendor does with a
//! request it already holds). Until then nothing looks its records up at the target nor
//! sends them again, whether the next look comes from the same run, from a process started
//! after a crash or a kill, or from another instance.
//!
//! - Before a write leaves, [`InDoubt`] (the endpoint's [`Recorder`]) makes sure the state
//!   says "writes of this stream may land until U" with U at or after the write's deadline.
//!   U is moved ahead by [`AHEAD`] at a time, so a stream that writes all the time costs one
//!   small commit per second, not one per request or batch, and a crash costs the next
//!   process at most that second more of waiting than the last write needed.
//! - A write that goes unanswered is remembered; a run that wants to look its records up
//!   (or resend them) calls [`InDoubt::settle`] first, which waits out deadline + margin.
//! - At the run's end, [`InDoubt::close`] clears the row, or leaves in it the deadline of a
//!   write that went unanswered and was not waited out.
//! - At a run's start, [`settle_previous`] waits for what the row says: a process that died
//!   while writing (state `writing`), a run that ended with an unanswered write.
//!
//! Writes that repeat harmlessly (updates, upserts by key) are still repeated within one run
//! without waiting: the repeat carries the same content, so it has the same effect.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;

use super::{RunCtx, RunError};
use crate::http::Recorder;
use crate::store::{DoubtState, Store};

/// How far past a write's deadline the recorded "may land until" is put, so that the writes
/// that follow within this time need no commit of their own.
pub const AHEAD: TimeDelta = TimeDelta::seconds(1);

/// One run's bookkeeping of its writes (shared by the run's target endpoints).
pub struct InDoubt {
    store: Store,
    stream: String,
    margin: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What the state says this run's writes may land until (None: nothing recorded yet).
    recorded: Option<DateTime<Utc>>,
    /// The latest deadline of a write of this run that went unanswered and was not waited
    /// out, and the same instant on the monotonic clock (taken when the write was told
    /// unanswered), which the run's own wait uses: a wall clock stepped back meanwhile
    /// would make it wait the size of the step.
    unanswered: Option<(DateTime<Utc>, std::time::Instant)>,
    /// The last write, for messages ("POST /api/users").
    detail: String,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn margin(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

impl InDoubt {
    pub fn new(store: &Store, stream: &str, margin: Duration) -> Arc<InDoubt> {
        Arc::new(InDoubt {
            store: store.clone(),
            stream: stream.to_string(),
            margin,
            state: Mutex::new(State::default()),
        })
    }

    /// True when a write of this run went unanswered and has not been waited out.
    pub fn has_unanswered(&self) -> bool {
        lock(&self.state).unanswered.is_some()
    }

    /// Waits until every write of this run that went unanswered can no longer land. Returns
    /// false when shutdown came first (the run stops; nothing was looked at).
    pub async fn settle(&self, ctx: &RunCtx) -> Result<bool, RunError> {
        let (deadline, detail) = {
            let st = lock(&self.state);
            let Some(d) = st.unanswered else {
                return Ok(true);
            };
            (d, st.detail.clone())
        };
        if !self.wait(ctx, deadline, &detail).await? {
            return Ok(false);
        }
        let mut st = lock(&self.state);
        if st.unanswered.map(|u| u.0) == Some(deadline.0) {
            st.unanswered = None;
        }
        Ok(true)
    }

    /// Waits until `deadline` + margin, telling the state (and so `usher status`).
    async fn wait(
        &self,
        ctx: &RunCtx,
        (deadline, at): (DateTime<Utc>, std::time::Instant),
        detail: &str,
    ) -> Result<bool, RunError> {
        let left = (at + self.margin).saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(true);
        }
        // Recorded so that `status` says why the stream waits, and so that a crash during
        // the wait leaves the same deadline for the next process.
        let recorded = lock(&self.state)
            .recorded
            .map_or(deadline, |r| r.max(deadline));
        ctx.store
            .doubt_set(&self.stream, recorded, DoubtState::Settling, detail)
            .await?;
        lock(&self.state).recorded = Some(recorded);
        tracing::warn!(stream = %self.stream, call = %detail, wait_secs = left.as_secs_f64().ceil() as u64,
            "waiting for an unanswered write to settle before looking its records up");
        crate::progress::waiting(left, || format!("an unanswered write ({detail}) to settle"));
        tokio::select! {
            _ = tokio::time::sleep(left) => Ok(true),
            _ = ctx.stopping() => Ok(false),
        }
    }

    /// The run's end: nothing in doubt clears the row; a write still unanswered leaves its
    /// deadline for the next run (or process) to wait for.
    pub async fn close(&self) {
        let (recorded, unanswered, detail) = {
            let st = lock(&self.state);
            (st.recorded, st.unanswered, st.detail.clone())
        };
        if recorded.is_none() {
            return; // nothing written by this run
        }
        let result = match unanswered.map(|u| u.0) {
            Some(d) => {
                self.store
                    .doubt_set(&self.stream, d, DoubtState::Unanswered, &detail)
                    .await
            }
            None => self.store.doubt_clear(&self.stream).await,
        };
        if let Err(e) = result {
            tracing::error!(stream = %self.stream, error = %e, "cannot record the run's writes in doubt");
        }
    }
}

impl Recorder for InDoubt {
    fn sending<'a>(
        &'a self,
        what: &'a str,
        deadline: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            {
                let mut st = lock(&self.state);
                st.detail = what.to_string();
                if st.recorded.is_some_and(|r| r >= deadline) {
                    return Ok(());
                }
            }
            let until = deadline + AHEAD;
            self.store
                .doubt_set(&self.stream, until, DoubtState::Writing, what)
                .await
                .map_err(|e| e.to_string())?;
            let mut st = lock(&self.state);
            st.recorded = Some(st.recorded.map_or(until, |r| r.max(until)));
            Ok(())
        })
    }

    fn unanswered(&self, deadline: DateTime<Utc>) {
        let at = std::time::Instant::now() + (deadline - Utc::now()).to_std().unwrap_or_default();
        let mut st = lock(&self.state);
        st.unanswered = Some(match st.unanswered {
            Some(u) if u.0 >= deadline => u,
            _ => (deadline, at),
        });
    }
}

/// At a run's start: waits until the writes an earlier run or process left in doubt can no
/// longer land, then forgets them. Returns false when shutdown came first.
pub async fn settle_previous(ctx: &RunCtx) -> Result<bool, RunError> {
    let stream = &ctx.spec.name;
    let Some(row) = ctx.store.doubt(stream).await? else {
        return Ok(true);
    };
    let until = row.until + margin(ctx.config.daemon.settle_margin);
    if let Ok(mut left) = (until - Utc::now()).to_std() {
        // Never longer than the row allowed when it was written: a wall clock stepped back
        // since then would otherwise add the size of the step to the wait.
        let span = (until - row.recorded_at).to_std().unwrap_or_default();
        if left > span {
            tracing::warn!(stream = %stream, wait_secs = span.as_secs(), recorded_at = %row.recorded_at,
                "the wall clock is behind the time the writes in doubt were recorded at (stepped back?); waiting as long as they allowed then");
            left = span;
        }
        ctx.store
            .doubt_set(stream, row.until, DoubtState::Settling, &row.detail)
            .await?;
        tracing::warn!(stream = %stream, call = %row.detail, wait_secs = left.as_secs_f64().ceil() as u64,
            "writes of an earlier run may still land; waiting for them to settle before this run looks at the target");
        crate::progress::waiting(left, || {
            format!("writes of an earlier run ({}) to settle", row.detail)
        });
        tokio::select! {
            _ = tokio::time::sleep(left) => {}
            _ = ctx.stopping() => return Ok(false),
        }
    }
    ctx.store.doubt_clear(stream).await?;
    Ok(true)
}
