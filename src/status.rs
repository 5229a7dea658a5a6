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
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon_pid: Option<u32>,
    pub state_dir: String,
    pub streams: Vec<StreamStatus>,
}

pub fn collect(
    config: &Config,
    store: Option<&Store>,
    daemon_pid: Option<u32>,
) -> crate::store::Result<Status> {
    let mut streams = Vec::new();
    for spec in config.streams.values() {
        let state = match store {
            Some(s) => Some(s.stream_status_sync(&spec.name)?),
            None => None,
        };
        streams.push(StreamStatus {
            stream: spec.name.clone(),
            enabled: spec.enabled,
            schedule: spec.schedule.describe(),
            source: format!("{} ({})", spec.source, spec.entity),
            target: spec.target.clone(),
            state,
        });
    }
    Ok(Status {
        daemon_pid,
        state_dir: config.daemon.state_dir.display().to_string(),
        streams,
    })
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
    let header = [
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
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for st in &s.streams {
        let state = st.state.as_ref();
        let last = state.and_then(|x| x.last_run.as_ref());
        let outbox = state.map(|x| &x.outbox);
        rows.push(vec![
            st.stream.clone(),
            if st.enabled {
                "enabled".into()
            } else {
                "disabled".into()
            },
            clip(&st.schedule, 28),
            last.map(|r| short_time(&r.started_at))
                .unwrap_or_else(|| "never".into()),
            last.map(|r| r.outcome.clone())
                .unwrap_or_else(|| "-".into()),
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
        ]);
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
        if let Some(r) = last
            && r.outcome != "ok"
            && let Some(e) = &r.error
        {
            notes.push(format!("{}: {}", st.stream, e));
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
                "failed" | "interrupted" => "31",
                "refused" | "stopped" => "33",
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
    Ok(())
}
