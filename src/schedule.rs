//! When a stream runs: a fixed interval or a cron expression in a timezone.
//!
//! Pure: every function takes "now" as an argument, so tests set the clock instead of
//! sleeping. Wall-clock times are computed here (croner over chrono-tz), not by
//! tokio-cron-scheduler, whose timezone jobs keep the UTC offset of the day they were
//! created (CRATES.md): the daemon arms a one-shot job for the instant computed here
//! and re-arms after each firing, so a daily 03:00 run stays at 03:00 across DST changes.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every `period`, shifted by a stable per-stream offset within `jitter` so that many
    /// streams on one period do not all fire at the same second.
    Every {
        period: Duration,
        offset: Duration,
        text: String,
    },
    Cron {
        cron: Box<Cron>,
        tz: Tz,
        text: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid duration {0:?} (examples: \"15m\", \"1h\", \"90s\")")]
    Duration(String),
    #[error("an interval must be at least 1s")]
    TooShort,
    #[error("invalid cron expression {0:?}: {1}")]
    Cron(String, String),
    #[error("unknown timezone {0:?} (use an IANA name such as \"Europe/Oslo\")")]
    Timezone(String),
}

pub fn parse_duration(text: &str) -> Result<Duration, ScheduleError> {
    humantime::parse_duration(text.trim()).map_err(|_| ScheduleError::Duration(text.to_string()))
}

pub fn parse_tz(text: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(text.trim()).map_err(|_| ScheduleError::Timezone(text.to_string()))
}

/// Which field of a cron expression is wrong and what it takes, in words (the parser says
/// only "Component error: Number out of bounds"). None when no field is found at fault.
fn explain_cron(text: &str) -> Option<String> {
    const FIVE: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day-of-month", 1, 31),
        ("month", 1, 12),
        ("day-of-week", 0, 7),
    ];
    let fields: Vec<&str> = text.split_whitespace().collect();
    let spec: Vec<(&str, u32, u32)> = match fields.len() {
        5 => FIVE.to_vec(),
        6 => std::iter::once(("second", 0, 59)).chain(FIVE).collect(),
        n => {
            return Some(format!(
                "it has {n} field{}; a cron schedule has 5 (minute hour day-of-month month \
                 day-of-week, e.g. \"0 3 * * *\") or 6 with seconds first",
                if n == 1 { "" } else { "s" }
            ));
        }
    };
    for (field, (name, lo, hi)) in fields.iter().zip(spec) {
        for part in field.split(',') {
            let (range, step) = part.split_once('/').unwrap_or((part, ""));
            if !step.is_empty() && step.parse::<u32>().map_or(true, |n| n == 0) {
                return Some(format!(
                    "the {name} field {field:?}: the step after `/` must be a whole number above 0"
                ));
            }
            for n in range.split('-') {
                if n == "*" || n == "?" || n.is_empty() {
                    continue;
                }
                match n.parse::<u32>() {
                    Ok(v) if v < lo || v > hi => {
                        return Some(format!(
                            "the {name} field {field:?} is out of range ({lo} to {hi})"
                        ));
                    }
                    Ok(_) => {}
                    // Names (MON, JAN), `L`, `W`, `#`: left to the parser.
                    Err(_)
                        if n.chars()
                            .all(|c| c.is_ascii_alphabetic() || "#LW".contains(c)) => {}
                    Err(_) => {
                        return Some(format!(
                            "the {name} field {field:?} is not a number ({lo} to {hi}), `*`, a range `a-b`, a list `a,b` or a step `*/n`"
                        ));
                    }
                }
            }
        }
    }
    None
}

impl Schedule {
    pub fn every(text: &str, jitter: Duration, stream: &str) -> Result<Self, ScheduleError> {
        let period = parse_duration(text)?;
        if period < Duration::from_secs(1) {
            return Err(ScheduleError::TooShort);
        }
        let jitter = jitter.min(period);
        let offset = if jitter.is_zero() {
            Duration::ZERO
        } else {
            // Stable per stream: the same stream keeps its slot across restarts.
            let h = stream.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            Duration::from_millis(h % jitter.as_millis().max(1) as u64)
        };
        Ok(Schedule::Every {
            period,
            offset,
            text: text.to_string(),
        })
    }

    /// A cron expression of five fields (minute first) or six (seconds first), in `tz`.
    pub fn cron(text: &str, tz: Tz) -> Result<Self, ScheduleError> {
        let cron = Cron::from_str(text).map_err(|e| {
            ScheduleError::Cron(
                text.to_string(),
                explain_cron(text).unwrap_or_else(|| e.to_string()),
            )
        })?;
        // Make sure it ever fires (e.g. "0 0 31 2 *" never does).
        cron.find_next_occurrence(&Utc::now().with_timezone(&tz), false)
            .map_err(|e| ScheduleError::Cron(text.to_string(), e.to_string()))?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            tz,
            text: text.to_string(),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Schedule::Every { text, .. } => format!("every {text}"),
            Schedule::Cron { text, tz, .. } => format!("cron \"{text}\" {tz}"),
        }
    }

    /// The first firing strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::Every { period, offset, .. } => {
                // Slots are aligned to the epoch plus the stream's offset, so restarts keep the
                // rhythm and streams with different offsets stay spread out.
                let p = period.as_millis() as i64;
                let o = offset.as_millis() as i64;
                let t = after.timestamp_millis();
                let k = (t - o).div_euclid(p) + 1;
                Utc.timestamp_millis_opt(k * p + o)
                    .single()
                    .unwrap_or(after)
            }
            Schedule::Cron { cron, tz, .. } => cron
                .find_next_occurrence(&after.with_timezone(tz), false)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(after + chrono::Duration::days(3650)),
        }
    }

    /// The slot to arm after the timer armed for `fired` went off at `now`. A timer may fire
    /// early (tokio-cron-scheduler keeps whole wall-clock seconds and polls every 500 ms) or
    /// late; arming from the wall clock when it is still before the slot that fired would arm
    /// that same slot again and run it twice. So the next slot comes after the later of the
    /// two: never the slot that fired, and after a late firing (a suspended host, a busy
    /// runtime) the slots it overslept collapse into the one run that just started.
    pub fn next_slot(&self, fired: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        self.next_after(fired.max(now))
    }

    /// What to do at start: the next firing, or now when a firing was missed since the last
    /// run (one catch-up run however many were missed). A stream that never ran on an
    /// interval runs at start; a cron stream that never ran waits for its time.
    pub fn first_after_start(
        &self,
        now: DateTime<Utc>,
        last_run: Option<DateTime<Utc>>,
    ) -> DateTime<Utc> {
        match (self, last_run) {
            (Schedule::Every { .. }, None) => now,
            (_, Some(last)) if self.next_after(last) <= now => now,
            _ => self.next_after(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_cron_names_its_field_and_range() {
        let e = Schedule::cron("0 25 * * *", Tz::UTC)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the hour field \"25\" is out of range (0 to 23)"),
            "{e}"
        );
        assert!(!e.contains("Component error"), "{e}");
        let e = Schedule::cron("61 * * * *", Tz::UTC)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("minute field \"61\" is out of range (0 to 59)"),
            "{e}"
        );
        let e = Schedule::cron("a b c d e f g h", Tz::UTC)
            .unwrap_err()
            .to_string();
        assert!(e.contains("it has 8 fields"), "{e}");
        let e = Schedule::cron("0 0 32 * *", Tz::UTC)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("day-of-month field \"32\" is out of range (1 to 31)"),
            "{e}"
        );
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn daily_local_time_holds_across_spring_forward() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let s = Schedule::cron("0 3 * * *", tz).unwrap();
        // Winter: 03:00 CET = 02:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-03-27T12:00:00Z")),
            utc("2026-03-28T02:00:00Z")
        );
        // Night of 29 March 2026 the clocks go 02:00 -> 03:00; 03:00 CEST = 01:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-03-28T12:00:00Z")),
            utc("2026-03-29T01:00:00Z")
        );
        assert_eq!(
            s.next_after(utc("2026-03-29T12:00:00Z")),
            utc("2026-03-30T01:00:00Z")
        );
    }

    #[test]
    fn daily_local_time_holds_across_fall_back() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let s = Schedule::cron("0 3 * * *", tz).unwrap();
        // 25 October 2026: 03:00 CEST -> 02:00 CET. 03:00 CET = 02:00 UTC, fires once.
        assert_eq!(
            s.next_after(utc("2026-10-24T12:00:00Z")),
            utc("2026-10-25T02:00:00Z")
        );
        assert_eq!(
            s.next_after(utc("2026-10-25T02:00:00Z")),
            utc("2026-10-26T02:00:00Z")
        );
    }

    #[test]
    fn interval_slots_are_stable_and_spread() {
        let a = Schedule::every("15m", Duration::from_secs(300), "a").unwrap();
        let now = utc("2026-01-01T00:00:01Z");
        let n1 = a.next_after(now);
        let n2 = a.next_after(n1);
        assert_eq!(n2 - n1, chrono::Duration::minutes(15));
        assert!(n1 > now && n1 - now <= chrono::Duration::minutes(15));
        let offsets: std::collections::HashSet<_> = (0..50)
            .map(|i| {
                Schedule::every("15m", Duration::from_secs(300), &format!("s{i}"))
                    .unwrap()
                    .next_after(now)
            })
            .collect();
        assert!(
            offsets.len() > 40,
            "jitter spreads streams: {}",
            offsets.len()
        );
    }

    #[test]
    fn a_missed_run_runs_once_at_start() {
        let s = Schedule::every("15m", Duration::ZERO, "x").unwrap();
        let now = utc("2026-01-01T12:00:00Z");
        assert_eq!(
            s.first_after_start(now, Some(utc("2026-01-01T08:00:00Z"))),
            now
        );
        // Slots are at :00, :15, :30, :45; a run at 12:01 means the 12:00 slot was taken.
        let later = utc("2026-01-01T12:05:00Z");
        let recent = s.first_after_start(later, Some(utc("2026-01-01T12:01:00Z")));
        assert_eq!(recent, utc("2026-01-01T12:15:00Z"));
        assert_eq!(s.first_after_start(now, None), now);
        let c = Schedule::cron("0 3 * * *", Tz::UTC).unwrap();
        assert_eq!(c.first_after_start(now, None), utc("2026-01-02T03:00:00Z"));
        assert_eq!(
            c.first_after_start(now, Some(utc("2025-12-30T03:00:00Z"))),
            now
        );
    }

    /// What the daemon does with a timer that fires off its mark: the run belongs to the
    /// slot that fired, and the next slot is armed with [`Schedule::next_slot`].
    fn simulate_day(s: &Schedule, start: DateTime<Utc>, offsets_ms: &[i64]) -> Vec<DateTime<Utc>> {
        let end = start + chrono::Duration::days(1);
        let mut runs = Vec::new();
        let mut armed = s.next_after(start);
        let mut i = 0;
        while armed < end {
            // The timer goes off up to 1.5 s early or up to 3 s late.
            let fired_at = armed + chrono::Duration::milliseconds(offsets_ms[i % offsets_ms.len()]);
            i += 1;
            runs.push(armed);
            armed = s.next_slot(armed, fired_at);
        }
        runs
    }

    #[test]
    fn a_timer_that_fires_early_or_late_gives_one_run_per_slot_over_a_day() {
        let s = Schedule::every("15m", Duration::from_secs(300), "contacts-to-crm").unwrap();
        let start = utc("2026-03-01T00:00:00Z");
        // Early and late firings, as tokio-cron-scheduler gives them (seconds truncated,
        // 500 ms polling) plus a busy runtime.
        let offsets = [
            -1500, -999, -500, -1, 0, 1, 480, 999, 1500, 3000, -1200, 2500,
        ];
        let runs = simulate_day(&s, start, &offsets);
        assert_eq!(runs.len(), 96, "one run per 15-minute slot");
        let distinct: std::collections::HashSet<_> = runs.iter().collect();
        assert_eq!(distinct.len(), 96, "no slot runs twice");
        for w in runs.windows(2) {
            assert_eq!(w[1] - w[0], chrono::Duration::minutes(15));
        }
        // The old arming, from the wall clock at the firing, runs an early slot again.
        let early = s.next_after(start);
        let fired_at = early - chrono::Duration::milliseconds(1200);
        assert_eq!(
            s.next_after(fired_at),
            early,
            "the bug: the same slot armed again"
        );
        assert!(s.next_slot(early, fired_at) > early);
    }

    #[test]
    fn a_late_firing_skips_the_slots_it_overslept_once() {
        let s = Schedule::every("10s", Duration::ZERO, "x").unwrap();
        let slot = utc("2026-01-01T00:00:10Z");
        // Fired 35 s late: the slots at :20, :30 and :40 are behind; the next one is :50.
        let now = slot + chrono::Duration::seconds(35);
        assert_eq!(s.next_slot(slot, now), utc("2026-01-01T00:00:50Z"));
        // A cron slot that fired early arms the next day's.
        let c = Schedule::cron("0 3 * * *", Tz::UTC).unwrap();
        let at = utc("2026-01-02T03:00:00Z");
        assert_eq!(
            c.next_slot(at, at - chrono::Duration::milliseconds(900)),
            utc("2026-01-03T03:00:00Z")
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(Schedule::every("fast", Duration::ZERO, "x").is_err());
        assert!(Schedule::cron("61 * * * *", Tz::UTC).is_err());
        assert!(parse_tz("Mars/Olympus").is_err());
    }
}
