//! What `usher status` shows, read from the configuration and the database (never from the
//! daemon, so it works whether or not one is running).

use std::io::Write;

use serde::Serialize;

use crate::config::Config;
use crate::store::{Store, StreamState};

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub enabled: bool,
    pub schedule: String,
    pub source: String,
    pub target: String,
    #[serde(flatten)]
    pub state: Option<StreamState>,
    /// Integration settings: why the stream does not run (its integration is off, or the
    /// CDP refused its configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// Writes of the stream that may still land at the target (see `engine::in_doubt`):
    /// a run waits for them before it looks their records up.
    pub in_doubt: Option<InDoubtStatus>,
    /// Several instances (PostgreSQL): which instance holds the stream's lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseStatus>,
}

/// A stream's lease, as the state holds it (several instances).
#[derive(Debug, Serialize)]
pub struct LeaseStatus {
    /// The stream's group (the streams that share a rate budget are leased together).
    pub group: String,
    /// `host:pid:random` of the holding instance; None: nobody holds it (it is taken at an
    /// instance's next turn).
    pub holder: Option<String>,
    /// Seconds until the lease runs out without renewal (negative: it ran out).
    pub expires_in_secs: i64,
    pub epoch: i64,
}

#[derive(Debug, Serialize)]
pub struct InDoubtStatus {
    /// `writing` (a run is writing, or a process died while writing), `unanswered` (a run
    /// ended with a write whose answer it did not see), `settling` (a run waits for them).
    pub state: crate::store::DoubtState,
    /// The write it is about, e.g. `POST /api/users`.
    pub call: String,
    /// Until when (settle margin included) nothing looks their records up.
    pub until: String,
    pub wait_secs: u64,
}

impl InDoubtStatus {
    fn new(d: crate::store::Doubt, margin: std::time::Duration) -> Option<InDoubtStatus> {
        let until = d.until + chrono::TimeDelta::from_std(margin).ok()?;
        let left = (until - chrono::Utc::now()).to_std().ok()?;
        Some(InDoubtStatus {
            state: d.state,
            call: d.detail,
            until: crate::store::ts(until),
            wait_secs: left.as_secs_f64().ceil() as u64,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon_pid: Option<u32>,
    pub state_dir: String,
    /// The running daemon cannot write the state database: since when, and why (from the
    /// lock file: the database cannot hold it). Runs do not start meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_error: Option<crate::metrics::StateError>,
    pub streams: Vec<StreamStatus>,
    /// Integration settings: each company's integration blocks, and each connection's last
    /// online check.
    pub integrations: Vec<crate::config::IntegrationState>,
    pub connections: Vec<ConnectionStatus>,
    /// The configuration's problems, when it has any (`streams` then holds the valid ones).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub config_problems: Vec<String>,
}

/// A connection with its integration's state and its last online check (from the state).
#[derive(Debug, Serialize)]
pub struct ConnectionStatus {
    pub connection: String,
    pub kind: String,
    pub company: Option<String>,
    /// "enabled" or "off" (its company's integration block), "enabled" when it has none.
    pub state: &'static str,
    pub last_check: Option<crate::store::OnlineCheck>,
}

pub fn collect(
    config: &Config,
    store: Option<&Store>,
    daemon_pid: Option<u32>,
    state_error: Option<crate::metrics::StateError>,
) -> crate::store::Result<Status> {
    let mut streams = Vec::new();
    let pauses = match store {
        Some(s) => s.pauses_sync()?,
        None => Vec::new(),
    };
    let checks = match store {
        Some(s) => s.online_checks_sync()?,
        None => Vec::new(),
    };
    // Several instances: the leases, by group.
    let leases = match store {
        Some(s) if s.is_postgres() => Some(s.read_sync(crate::store::leases::all)?),
        _ => None,
    };
    let groups = crate::engine::lease::groups(config);
    let group_of: std::collections::HashMap<&str, &str> = groups
        .iter()
        .flat_map(|(k, ss)| ss.iter().map(move |s| (s.as_str(), k.as_str())))
        .collect();
    for spec in config.streams.values() {
        let state = match store {
            Some(s) => Some(s.stream_status_sync(&spec.name)?),
            None => None,
        };
        let in_doubt = match store {
            Some(s) => s
                .doubt_sync(&spec.name)?
                .and_then(|d| InDoubtStatus::new(d, config.daemon.settle_margin)),
            None => None,
        };
        streams.push(StreamStatus {
            stream: spec.name.clone(),
            enabled: spec.enabled,
            schedule: spec.schedule.describe(),
            source: format!("{} ({})", spec.source, spec.entity),
            target: spec.target.clone(),
            state,
            paused: config.settings.paused.get(&spec.name).cloned().or_else(|| {
                pauses
                    .iter()
                    .find(|p| p.stream == spec.name)
                    .map(|p| format!("since {}: {}", short_time(&p.paused_at), p.reason))
            }),
            in_doubt,
            lease: leases.as_ref().and_then(|(now, rows)| {
                let group = group_of.get(spec.name.as_str())?;
                let row = rows.iter().find(|r| r.key == *group);
                Some(LeaseStatus {
                    group: group.to_string(),
                    holder: row.and_then(|r| r.holder.clone()),
                    expires_in_secs: row.map_or(0, |r| (r.expires_ms - now) / 1000),
                    epoch: row.map_or(0, |r| r.epoch),
                })
            }),
        });
    }
    Ok(Status {
        daemon_pid,
        state_dir: config.daemon.state_dir.display().to_string(),
        state_error,
        streams,
        integrations: config.settings.integrations.clone(),
        connections: connection_statuses(config, checks),
        config_problems: Vec::new(),
    })
}

fn connection_statuses(
    config: &Config,
    checks: Vec<crate::store::OnlineCheck>,
) -> Vec<ConnectionStatus> {
    config
        .connections
        .values()
        .map(|c| {
            let block = config
                .settings
                .integrations
                .iter()
                .find(|i| i.connections.contains(&c.name));
            ConnectionStatus {
                connection: c.name.clone(),
                kind: c.kind.as_str().to_string(),
                company: block.map(|b| b.company.clone()),
                state: block.map(|b| b.state).unwrap_or("enabled"),
                last_check: checks.iter().find(|k| k.connection == c.name).cloned(),
            }
        })
        .collect()
}

/// The integration settings part of the text status.
fn print_settings(s: &Status, out: &mut impl Write) -> std::io::Result<()> {
    if !s.integrations.is_empty() {
        writeln!(out)?;
        writeln!(out, "integrations:")?;
        for i in &s.integrations {
            let streams = if i.streams.is_empty() {
                String::new()
            } else {
                format!(" [streams: {}]", i.streams.join(", "))
            };
            writeln!(
                out,
                "  {}/{} (reseller {}): {}{streams}",
                i.company, i.integration, i.reseller, i.why
            )?;
        }
    }
    let checked: Vec<&ConnectionStatus> = s
        .connections
        .iter()
        .filter(|c| c.last_check.is_some() || c.company.is_some())
        .collect();
    if !checked.is_empty() {
        writeln!(out)?;
        writeln!(out, "connections:")?;
        for c in checked {
            let check = match &c.last_check {
                None => "not checked online (run `usher validate --online`)".to_string(),
                Some(k) => format!(
                    "{} ({}, checked {})",
                    if k.valid { "valid" } else { "invalid" },
                    k.message,
                    short_time(&k.checked_at)
                ),
            };
            writeln!(out, "  {} ({}): {}, {check}", c.connection, c.kind, c.state)?;
        }
    }
    Ok(())
}

/// The OUTCOME cell: the last run's outcome; for a run in flight, with how the run
/// before it ended, so that a refused or failed run never hides behind a newer one.
fn outcome_cell(last: Option<&crate::store::RunRow>, last_finished: Option<&str>) -> String {
    match (last, last_finished) {
        (None, _) => "-".into(),
        (Some(r), Some(before)) if r.outcome == "running" => format!("running (last {before})"),
        (Some(r), _) => r.outcome.clone(),
    }
}

/// A compact time for the table: "2026-12-01 17:05:03" (UTC).
fn short_time(ts: &str) -> String {
    crate::store::parse_ts(ts)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| ts.to_string())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The table a person reads at a glance; colour only when `colour` (a terminal).
pub fn print_text(s: &Status, out: &mut impl Write, colour: bool) -> std::io::Result<()> {
    let paint = |text: String, code: &str| -> String {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    match s.daemon_pid {
        Some(pid) => writeln!(
            out,
            "daemon: {} (pid {pid}), state in {}",
            paint("running".into(), "32"),
            s.state_dir
        )?,
        None => writeln!(
            out,
            "daemon: {}, state in {}",
            paint("not running".into(), "33"),
            s.state_dir
        )?,
    }
    if let Some(e) = &s.state_error {
        writeln!(
            out,
            "{} the daemon could not write the state database at {} (failing since {}): {}; runs do not start until it can (each stream tries again after a pause that doubles up to 5 min)",
            paint("!".into(), "31"),
            e.last.format("%Y-%m-%d %H:%M:%S"),
            e.since.format("%Y-%m-%d %H:%M:%S"),
            e.error
        )?;
    }
    // Several instances: who holds each stream's lease, and for how long yet.
    let leased = s.streams.iter().any(|st| st.lease.is_some());
    let mut header = vec![
        "STREAM",
        "STATE",
        "SCHEDULE",
        "LAST RUN (UTC)",
        "OUTCOME",
        "PULLED",
        "WRITTEN",
        "SKIPPED",
        "DEAD",
        "OUTBOX",
        "NEXT RUN (UTC)",
        "CURSOR",
    ];
    if leased {
        header.push("HOLDER (LEASE LEFT)");
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for st in &s.streams {
        let state = st.state.as_ref();
        let last = state.and_then(|x| x.last_run.as_ref());
        let outbox = state.map(|x| &x.outbox);
        let mut row = vec![
            st.stream.clone(),
            if st.paused.is_some() {
                "paused".into()
            } else if st
                .in_doubt
                .as_ref()
                .is_some_and(|d| d.state == crate::store::DoubtState::Settling)
            {
                "waiting".into()
            } else if st.enabled {
                "enabled".into()
            } else {
                "disabled".into()
            },
            clip(&st.schedule, 28),
            last.map(|r| short_time(&r.started_at))
                .unwrap_or_else(|| "never".into()),
            outcome_cell(last, state.and_then(|x| x.last_outcome.as_deref())),
            last.map(|r| r.counts.pulled.to_string())
                .unwrap_or_else(|| "-".into()),
            last.map(|r| (r.counts.created + r.counts.updated).to_string())
                .unwrap_or_else(|| "-".into()),
            last.map(|r| r.counts.skipped.to_string())
                .unwrap_or_else(|| "-".into()),
            state
                .map(|x| x.dead_letters.to_string())
                .unwrap_or_else(|| "0".into()),
            outbox
                .map(|o| {
                    if o.payloads == 0 {
                        "0".to_string()
                    } else {
                        format!("{} ({} rec)", o.payloads, o.records)
                    }
                })
                .unwrap_or_else(|| "0".into()),
            state
                .and_then(|x| x.next_run_at.as_deref())
                .map(short_time)
                .unwrap_or_else(|| "-".into()),
            state
                .and_then(|x| x.cursor.as_deref())
                .map(|c| clip(c, 24))
                .unwrap_or_else(|| "(start)".into()),
        ];
        if leased {
            row.push(match &st.lease {
                Some(LeaseStatus {
                    holder: Some(h),
                    expires_in_secs,
                    ..
                }) if *expires_in_secs > 0 => format!("{h} ({expires_in_secs} s)"),
                Some(LeaseStatus {
                    holder: Some(h), ..
                }) => format!("{h} (ran out)"),
                _ => "nobody".into(),
            });
        }
        rows.push(row);
        if let Some(p) = &st.paused {
            notes.push(format!("{}: paused: {p}", st.stream));
        }
        if let Some(d) = &st.in_doubt {
            notes.push(match d.state {
                crate::store::DoubtState::Settling => format!(
                    "{}: waiting {} s for an unanswered write to settle ({}), before its records are looked up or sent again",
                    st.stream, d.wait_secs, d.call
                ),
                _ => format!(
                    "{}: a write ({}) may still land until {}; the next run waits for it ({} s) before it looks its records up",
                    st.stream,
                    d.call,
                    short_time(&d.until),
                    d.wait_secs
                ),
            });
        }
        if let Some(o) = outbox
            && let Some(since) = &o.oldest_refused_at
        {
            notes.push(format!(
                "{}: the first outbox payload was refused {} times since {} (last: {}); it is sent again first at each execution",
                st.stream,
                o.attempts,
                short_time(since),
                o.last_error.as_deref().unwrap_or("-")
            ));
        }
        if let Some(o) = state.map(|x| &x.owed)
            && o.records > 0
        {
            notes.push(format!(
                "{}: {} record(s) owed since {} (tried {} time(s); last: {}); tried again at every run until the target accepts them or they are set aside in dead letters",
                st.stream,
                o.records,
                o.since.as_deref().map(short_time).unwrap_or_else(|| "-".into()),
                o.attempts,
                o.last_reason.as_deref().unwrap_or("-")
            ));
        }
        // The last finished run's error (also while a newer run is in flight).
        if let Some(x) = state
            && let Some(e) = &x.last_error
        {
            let running = last.is_some_and(|r| r.outcome == "running");
            notes.push(if running {
                format!(
                    "{}: the run before the one in flight ended {}: {e}",
                    st.stream,
                    x.last_outcome.as_deref().unwrap_or("?")
                )
            } else {
                format!("{}: {e}", st.stream)
            });
        }
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}{}", " ".repeat(widths[i] - c.chars().count())))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out)?;
    writeln!(
        out,
        "{}",
        paint(line(header.iter().map(|h| h.to_string()).collect()), "1")
    )?;
    for r in rows {
        let outcome = r[4].clone();
        let mut text = line(r);
        if colour {
            let code = match outcome.as_str() {
                "ok" => "32",
                o if o.contains("failed") || o.contains("interrupted") => "31",
                o if o.contains("refused") || o.contains("stopped") => "33",
                _ => "0",
            };
            text = text.replacen(
                &format!(" {outcome} "),
                &format!(" \x1b[{code}m{outcome}\x1b[0m "),
                1,
            );
        }
        writeln!(out, "{text}")?;
    }
    if !notes.is_empty() {
        writeln!(out)?;
        for n in notes {
            writeln!(out, "{} {n}", paint("!".into(), "31"))?;
        }
    }
    print_settings(s, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Counts, OutboxSummary, OwedSummary, RunRow, StreamState};

    fn run(id: i64, outcome: &str, error: Option<&str>) -> RunRow {
        RunRow {
            id,
            stream: "s".into(),
            trigger: "schedule".into(),
            started_at: "2026-06-10T01:00:00.000Z".into(),
            ended_at: None,
            outcome: outcome.into(),
            counts: Counts {
                pulled: 3,
                created: 3,
                ..Default::default()
            },
            error: error.map(str::to_string),
        }
    }

    fn status(last: RunRow, finished: Option<(&str, Option<&str>)>, owed: u64) -> Status {
        Status {
            daemon_pid: None,
            state_dir: "/var/lib/usher".into(),
            state_error: None,
            streams: vec![StreamStatus {
                stream: "s".into(),
                enabled: true,
                schedule: "every 15m".into(),
                source: "a (x)".into(),
                target: "b".into(),
                state: Some(StreamState {
                    cursor: None,
                    last_run: Some(last),
                    last_outcome: finished.map(|f| f.0.to_string()),
                    last_error: finished.and_then(|f| f.1.map(str::to_string)),
                    owed: OwedSummary {
                        records: owed,
                        since: Some("2026-06-09T01:00:00.000Z".into()),
                        attempts: 2,
                        last_reason: Some("booking TC-1: HTTP 422".into()),
                    },
                    next_run_at: None,
                    outbox: OutboxSummary::default(),
                    dead_letters: 0,
                    links: 0,
                }),
                paused: None,
                in_doubt: None,
                lease: None,
            }],
            integrations: Vec::new(),
            connections: Vec::new(),
            config_problems: Vec::new(),
        }
    }

    fn text(s: &Status) -> String {
        let mut out = Vec::new();
        print_text(s, &mut out, false).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_refused_run_does_not_hide_behind_the_run_in_flight() {
        let s = status(
            run(2, "running", None),
            Some(("refused", Some("booking TC-1: HTTP 422"))),
            1,
        );
        let t = text(&s);
        assert!(t.contains("running (last refused)"), "{t}");
        assert!(
            t.contains("s: the run before the one in flight ended refused: booking TC-1"),
            "{t}"
        );
        assert!(
            t.contains("s: 1 record(s) owed since 2026-06-09 01:00:00 (tried 2 time(s)"),
            "{t}"
        );
        assert!(!t.contains(" ok "), "{t}");
    }

    #[test]
    fn an_old_error_is_not_shown_after_a_run_that_ended_well() {
        let t = text(&status(run(3, "ok", None), Some(("ok", None)), 0));
        assert!(t.contains(" ok "), "{t}");
        assert!(!t.contains('!'), "no notes: {t}");
    }
}
