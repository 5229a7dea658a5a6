//! The clock that runs read for "now" (daily windows, "today" in a stream's timezone).
//!
//! By default it is the system clock. `usher --now RFC3339 …` (a hidden global flag, for
//! tests and for replaying a day by hand) sets the process's clock to start at that instant
//! and advance with real time from there, so a test can say "today is 29 March" without
//! sleeping and without a fake time source inside the engine. Any stream may read it through
//! `RunCtx::clock`.

use std::sync::OnceLock;
use std::time::Instant;

use chrono::{DateTime, Utc};

/// "now", as a run sees it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// `Some((start, at))`: the clock read `start` at the instant `at`.
    fixed: Option<(DateTime<Utc>, Instant)>,
}

static PROCESS: OnceLock<Clock> = OnceLock::new();

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    pub fn system() -> Self {
        Clock { fixed: None }
    }

    /// A clock that reads `start` now and advances with real time.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        Clock {
            fixed: Some((start, Instant::now())),
        }
    }

    /// Sets the process's clock (once, at start, from `--now`).
    pub fn set_process(clock: Clock) {
        let _ = PROCESS.set(clock);
    }

    /// The process's clock: the one `--now` set, else the system clock.
    pub fn process() -> Self {
        PROCESS.get().copied().unwrap_or_default()
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self.fixed {
            None => Utc::now(),
            Some((start, at)) => {
                start + chrono::Duration::from_std(at.elapsed()).unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_clock_starts_where_told_and_moves_on() {
        let t = DateTime::parse_from_rfc3339("2026-03-29T01:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = Clock::starting_at(t);
        let n = c.now();
        assert!(n >= t && n - t < chrono::Duration::seconds(5));
        assert!((Clock::system().now() - Utc::now()).num_seconds().abs() < 5);
    }
}
