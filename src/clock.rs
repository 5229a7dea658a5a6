//! The clock that runs read for "now" (daily windows, "today" in a stream's timezone).
//!
//! By default it is the system clock. In a debug build (what `cargo test` builds and runs),
//! `USHER_TEST_NOW=RFC3339` in the environment sets the process's clock to start at that
//! instant and advance with real time from there, so a test can say "today is 29 March"
//! without sleeping and without a fake time source inside the engine. A release build (the
//! product) never reads it; replaying a day with one is `faketime`'s job. Any stream may
//! read the clock through `RunCtx::clock`.

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

    /// Sets the process's clock (once, at start).
    pub fn set_process(clock: Clock) {
        let _ = PROCESS.set(clock);
    }

    /// At start: a debug build sets the process's clock from `USHER_TEST_NOW` (RFC 3339)
    /// when the environment has it; a release build does nothing. An unreadable value is
    /// a test's mistake: it stops the process.
    pub fn from_test_env() {
        #[cfg(debug_assertions)]
        if let Some(text) = std::env::var_os("USHER_TEST_NOW") {
            let text = text.to_string_lossy();
            let start = DateTime::parse_from_rfc3339(&text)
                .unwrap_or_else(|e| panic!("USHER_TEST_NOW={text:?} is not RFC 3339: {e}"));
            Clock::set_process(Clock::starting_at(start.to_utc()));
        }
    }

    /// The process's clock: the one `USHER_TEST_NOW` set (debug builds), else the system clock.
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
