//! The per-connection rate budget: a sliding window of calls, plus a "not before" instant
//! set by `Retry-After`. Shared by every stream that uses the connection (every S-360
//! connection of one institution), kept across reloads, and **kept in the state** when the
//! process has a [`BudgetLog`]: a restart, a `usher trigger` process or another instance
//! starts from the calls already made in the vendor's window and from a running
//! `Retry-After`, not from zero.
//!
//! What is saved, and when. A budget with a limit saves the instants of its calls in the
//! window *before* a call leaves, but not one save per call: a save reserves the next few
//! calls (as many as were made in the last second, at least one, at most a tenth of the
//! limit), stamped one second ahead. A call made within that second under a reservation
//! needs no save; the saved stamp is never earlier than the real call, so a process that
//! restores it counts every real call, and counts it as expiring no earlier than the vendor
//! does. Reservations left unused count as calls (a little too careful, never too
//! trusting). A `Retry-After` is saved when it is set. A budget without a limit saves only
//! its `Retry-After`. At S-360's 180 calls a minute that is at most one small commit per
//! second per institution.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RateLimit;

/// How far ahead a save reserves calls.
const RESERVE_AHEAD: Duration = Duration::from_secs(1);

/// Where budgets are kept between processes (the state).
pub trait BudgetLog: Send + Sync {
    /// Replaces what is saved for `key`: the instants of the calls that count in the window
    /// (some in the future: reservations) and the `Retry-After` deadline.
    fn save<'a>(&'a self, budget: SavedBudget) -> BoxFuture<'a, Result<(), String>>;
}

/// A budget as saved in the state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SavedBudget {
    pub key: String,
    pub calls: Vec<SystemTime>,
    pub not_before: Option<SystemTime>,
}

/// Why a call could not be counted.
#[derive(Debug)]
pub enum Refused {
    Cancelled,
    /// The budget could not be saved; the call is not made.
    NotSaved(String),
}

pub struct Budget {
    key: String,
    limit: Mutex<Option<RateLimit>>,
    state: Mutex<BudgetState>,
    log: Option<Arc<dyn BudgetLog>>,
    /// One save at a time, each of the state as it is when the save starts, so that the
    /// last save written is never older than a reservation already handed out.
    saving: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("key", &self.key).finish()
    }
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Calls in the window, oldest first (restored ones may lie ahead of now).
    calls: VecDeque<Instant>,
    not_before: Option<Instant>,
    /// Calls that may still be made under the last save's reservation, until `reserved_until`.
    reserved: u32,
    reserved_until: Option<Instant>,
}

/// An instant of this process for a wall-clock time (before or after now).
fn instant_of(t: SystemTime, now: Instant, wall: SystemTime) -> Instant {
    match t.duration_since(wall) {
        Ok(ahead) => now + ahead,
        Err(e) => now.checked_sub(e.duration()).unwrap_or(now),
    }
}

/// The wall-clock time of an instant of this process.
fn wall_of(i: Instant, now: Instant, wall: SystemTime) -> SystemTime {
    if i >= now {
        wall + (i - now)
    } else {
        wall - (now - i)
    }
}

/// Adds saved calls and a saved `Retry-After` to a budget's state.
fn merge_saved(st: &mut BudgetState, s: &SavedBudget) {
    let (now, wall) = (Instant::now(), SystemTime::now());
    // A stamp lies at most RESERVE_AHEAD ahead of the wall clock that wrote it; further
    // ahead, the clock was stepped back since: it counts from now (a whole window,
    // careful), not from an hour ahead (a window blocked for the hour).
    let latest = now + RESERVE_AHEAD;
    let mut calls: Vec<Instant> = st.calls.iter().copied().collect();
    calls.extend(
        s.calls
            .iter()
            .map(|t| instant_of(*t, now, wall).min(latest)),
    );
    calls.sort();
    st.calls = calls.into();
    let saved_nb = s
        .not_before
        .map(|t| instant_of(t, now, wall))
        .filter(|t| *t > now);
    st.not_before = st.not_before.max(saved_nb);
}

/// 2% of a rate window, at least 50 ms: slack for network jitter between us and the vendor.
pub(super) fn window_margin(per: Duration) -> Duration {
    (per / 50).max(Duration::from_millis(50))
}

impl Budget {
    pub fn new(limit: Option<RateLimit>) -> Self {
        Self::restored(String::new(), limit, None, None)
    }

    /// A budget that starts from what the state holds for it, and saves to `log`.
    pub fn restored(
        key: String,
        limit: Option<RateLimit>,
        log: Option<Arc<dyn BudgetLog>>,
        saved: Option<&SavedBudget>,
    ) -> Self {
        let mut st = BudgetState::default();
        if let Some(s) = saved {
            merge_saved(&mut st, s);
        }
        Budget {
            key,
            limit: Mutex::new(limit),
            state: Mutex::new(st),
            log,
            saving: tokio::sync::Mutex::new(()),
        }
    }

    /// Takes in what the state holds for this budget (another instance spent it until it
    /// lost the lease): its calls count too, and its `Retry-After` holds.
    pub fn restore(&self, saved: &SavedBudget) {
        merge_saved(&mut self.lock(), saved);
    }

    pub(super) fn set_limit(&self, limit: Option<RateLimit>) {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner()) = limit;
    }

    fn limit(&self) -> Option<RateLimit> {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a call is allowed, then counts it (saved first, when the budget is kept
    /// in the state and the call is not covered by a reservation).
    pub async fn acquire(&self, cancel: &CancellationToken) -> Result<(), Refused> {
        loop {
            let limit = self.limit();
            let (wait, save) = {
                let mut st = self.lock();
                let now = Instant::now();
                match st.not_before {
                    Some(nb) if nb > now => {
                        let w = nb - now;
                        crate::progress::waiting(w, || {
                            format!(
                                "the Retry-After of {} (the vendor asked for a pause)",
                                self.key
                            )
                        });
                        crate::metrics::METRICS.waited(
                            &self.key,
                            crate::metrics::Wait::RetryAfter,
                            w,
                        );
                        (Some(w), false)
                    }
                    _ => match limit {
                        None => {
                            st.calls.push_back(now);
                            if st.calls.len() > 10_000 {
                                st.calls.pop_front();
                            }
                            (None, false)
                        }
                        Some(l) => {
                            // A margin on the window: the vendor counts arrivals, and two
                            // requests do not take exactly the same time to get there.
                            let per = l.per + window_margin(l.per);
                            while st
                                .calls
                                .front()
                                .is_some_and(|t| now.saturating_duration_since(*t) >= per)
                            {
                                st.calls.pop_front();
                            }
                            if (st.calls.len() as u32) < l.calls {
                                let covered =
                                    st.reserved > 0 && st.reserved_until.is_some_and(|u| now <= u);
                                if self.log.is_some() && !covered {
                                    // Saved first, then counted when it really leaves: a
                                    // save that takes a while must not make the call
                                    // arrive later than the window thinks.
                                    (None, true)
                                } else {
                                    if covered {
                                        st.reserved -= 1;
                                    }
                                    st.calls.push_back(now);
                                    (None, false)
                                }
                            } else {
                                let oldest = *st.calls.front().expect("non-empty at the limit");
                                let age = now.saturating_duration_since(oldest);
                                // A restored call may lie ahead of now: it counts until a
                                // whole window after it.
                                let ahead = oldest.saturating_duration_since(now);
                                let w = per - age + ahead + Duration::from_millis(1);
                                crate::progress::waiting(w, || {
                                    format!(
                                        "the rate budget of {} ({} calls per {})",
                                        self.key,
                                        l.calls,
                                        humantime::format_duration(l.per)
                                    )
                                });
                                crate::metrics::METRICS.waited(
                                    &self.key,
                                    crate::metrics::Wait::RateBudget,
                                    w,
                                );
                                (Some(w), false)
                            }
                        }
                    },
                }
            };
            match wait {
                None if save => {
                    if let Some(l) = limit {
                        self.reserve_and_save(l).await.map_err(Refused::NotSaved)?;
                    }
                    // Counted on the next turn, under the reservation just saved.
                }
                None => return Ok(()),
                Some(w) => {
                    tokio::select! {
                        _ = tokio::time::sleep(w) => {}
                        _ = cancel.cancelled() => return Err(Refused::Cancelled),
                    }
                }
            }
        }
    }

    /// Reserves the next few calls and saves the window with them.
    async fn reserve_and_save(&self, l: RateLimit) -> Result<(), String> {
        let _one = self.saving.lock().await;
        let snapshot = {
            let mut st = self.lock();
            let now = Instant::now();
            let last_second = st
                .calls
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < RESERVE_AHEAD)
                .count() as u32;
            let k = (last_second + 1).min((l.calls / 10).max(1));
            let until = now + RESERVE_AHEAD;
            // The call waiting for this save is one of the k; the others may follow without.
            st.reserved = k;
            st.reserved_until = Some(until);
            let mut saved = self.snapshot(&st, now);
            let stamp = wall_of(until, now, SystemTime::now());
            saved.calls.extend(std::iter::repeat_n(stamp, k as usize));
            saved
        };
        match &self.log {
            Some(log) => log.save(snapshot).await,
            None => Ok(()),
        }
    }

    fn snapshot(&self, st: &BudgetState, now: Instant) -> SavedBudget {
        let wall = SystemTime::now();
        let per = self
            .limit()
            .map(|l| l.per + window_margin(l.per))
            .unwrap_or(Duration::ZERO);
        SavedBudget {
            key: self.key.clone(),
            calls: if per.is_zero() {
                Vec::new()
            } else {
                st.calls
                    .iter()
                    .filter(|t| now.saturating_duration_since(**t) < per)
                    .map(|t| wall_of(*t, now, wall))
                    .collect()
            },
            not_before: st
                .not_before
                .filter(|t| *t > now)
                .map(|t| wall_of(t, now, wall)),
        }
    }

    /// No call on this connection before `d` from now (a 429/509's `Retry-After`); saved
    /// at once when the budget is kept in the state.
    pub async fn block_for(&self, d: Duration) -> Result<(), String> {
        let snapshot = {
            let mut st = self.lock();
            let now = Instant::now();
            let until = now + d;
            if st.not_before.is_none_or(|nb| nb < until) {
                st.not_before = Some(until);
            }
            self.snapshot(&st, now)
        };
        match &self.log {
            Some(log) => {
                let _one = self.saving.lock().await;
                // Reservations handed out stay counted: save them with the deadline.
                let snapshot = {
                    let st = self.lock();
                    let mut s = self.snapshot(&st, Instant::now());
                    if let Some(until) = st.reserved_until.filter(|_| st.reserved > 0) {
                        let stamp = wall_of(until, Instant::now(), SystemTime::now());
                        s.calls
                            .extend(std::iter::repeat_n(stamp, st.reserved as usize));
                    }
                    s.not_before = s.not_before.or(snapshot.not_before);
                    s
                };
                log.save(snapshot).await
            }
            None => Ok(()),
        }
    }

    /// Calls left in the current window (None when unlimited).
    pub fn remaining(&self) -> Option<u32> {
        let limit = self.limit()?;
        let st = self.lock();
        let now = Instant::now();
        let used = st
            .calls
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < limit.per)
            .count() as u32;
        Some(limit.calls.saturating_sub(used))
    }

    /// When the running `Retry-After` ends, if one runs.
    pub fn blocked_for(&self) -> Option<Duration> {
        let st = self.lock();
        let now = Instant::now();
        st.not_before.filter(|t| *t > now).map(|t| t - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_never_exceeds_its_window() {
        let b = Budget::new(Some(RateLimit {
            calls: 3,
            per: Duration::from_secs(60),
        }));
        let cancel = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..3 {
            b.acquire(&cancel).await.unwrap();
        }
        assert_eq!(Instant::now(), start);
        b.acquire(&cancel).await.unwrap();
        assert!(Instant::now() - start >= Duration::from_secs(60));
    }

    /// Saves into memory, counting them.
    #[derive(Default)]
    struct Memory(Mutex<Vec<SavedBudget>>);

    impl BudgetLog for Memory {
        fn save<'a>(&'a self, budget: SavedBudget) -> BoxFuture<'a, Result<(), String>> {
            self.0.lock().unwrap().push(budget);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_budget_counts_every_call_the_dead_process_made() {
        let limit = Some(RateLimit {
            calls: 20,
            per: Duration::from_secs(10),
        });
        let log = Arc::new(Memory::default());
        let b = Budget::restored("s360:x".into(), limit, Some(log.clone()), None);
        let cancel = CancellationToken::new();
        // 12 calls in quick succession: saved ahead, far fewer saves than calls.
        for _ in 0..12 {
            b.acquire(&cancel).await.unwrap();
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        let saves = log.0.lock().unwrap().len();
        assert!((1..12).contains(&saves), "{saves} saves for 12 calls");
        // Every call made is covered by a saved stamp no earlier than the call.
        let last = log.0.lock().unwrap().last().cloned().unwrap();
        assert!(last.calls.len() >= 12, "{} stamps", last.calls.len());
        // A new process restores it: only 20 - 12 (or fewer) calls until the window ends.
        let b2 = Budget::restored("s360:x".into(), limit, None, Some(&last));
        let start = Instant::now();
        for _ in 0..8 {
            b2.acquire(&cancel).await.unwrap();
        }
        b2.acquire(&cancel).await.unwrap();
        assert!(
            Instant::now() - start >= Duration::from_secs(8),
            "the 21st call of the window waited for it to move on"
        );
    }

    /// Stamps an hour ahead (saved before the wall clock was stepped back an hour) count
    /// from now, for one window: not for the hour.
    #[tokio::test(start_paused = true)]
    async fn stamps_from_before_a_clock_step_back_block_one_window_not_the_step() {
        let limit = Some(RateLimit {
            calls: 2,
            per: Duration::from_secs(10),
        });
        let ahead = SystemTime::now() + Duration::from_secs(3600);
        let saved = SavedBudget {
            key: "s360:x".into(),
            calls: vec![ahead, ahead],
            not_before: None,
        };
        let b = Budget::restored("s360:x".into(), limit, None, Some(&saved));
        let cancel = CancellationToken::new();
        let start = Instant::now();
        b.acquire(&cancel).await.unwrap();
        let waited = Instant::now() - start;
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(13),
            "waited {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_is_saved_and_restored() {
        let log = Arc::new(Memory::default());
        let b = Budget::restored("crm".into(), None, Some(log.clone()), None);
        b.block_for(Duration::from_secs(30)).await.unwrap();
        let saved = log.0.lock().unwrap().last().cloned().unwrap();
        assert!(saved.not_before.is_some());
        let b2 = Budget::restored("crm".into(), None, None, Some(&saved));
        let cancel = CancellationToken::new();
        let start = Instant::now();
        b2.acquire(&cancel).await.unwrap();
        assert!(Instant::now() - start >= Duration::from_secs(29));
    }
}
