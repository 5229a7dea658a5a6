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

pub fn print_text(s: &Status, out: &mut impl Write) -> std::io::Result<()> {
    match s.daemon_pid {
        Some(pid) => writeln!(
            out,
            "daemon      running (pid {pid}), state in {}",
            s.state_dir
        )?,
        None => writeln!(out, "daemon      not running, state in {}", s.state_dir)?,
    }
    for st in &s.streams {
        writeln!(out)?;
        writeln!(
            out,
            "{}  {}  {}  {} -> {}",
            st.stream,
            if st.enabled { "enabled" } else { "disabled" },
            st.schedule,
            st.source,
            st.target
        )?;
        let Some(state) = &st.state else {
            writeln!(out, "  no state yet")?;
            continue;
        };
        match &state.last_run {
            Some(r) => {
                let c = r.counts;
                writeln!(
                    out,
                    "  last run    {} {} ({}): pulled {}, created {}, updated {}, skipped {}, failed {}, queued {}",
                    r.started_at,
                    r.outcome,
                    r.trigger,
                    c.pulled,
                    c.created,
                    c.updated,
                    c.skipped,
                    c.failed,
                    c.queued
                )?;
            }
            None => writeln!(out, "  last run    never")?,
        }
        writeln!(
            out,
            "  next run    {}",
            state.next_run_at.as_deref().unwrap_or(if st.enabled {
                "when the daemon runs"
            } else {
                "-"
            })
        )?;
        writeln!(
            out,
            "  cursor      {}",
            state
                .cursor
                .as_deref()
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| "at the start".into())
        )?;
        let o = &state.outbox;
        if o.payloads == 0 {
            writeln!(out, "  outbox      empty")?;
        } else {
            write!(
                out,
                "  outbox      {} payloads, {} records",
                o.payloads, o.records
            )?;
            if let Some(since) = &o.oldest_refused_at {
                write!(
                    out,
                    "; the first refused {} times since {since} (last: {})",
                    o.attempts,
                    o.last_error.as_deref().unwrap_or("-")
                )?;
            }
            writeln!(out)?;
        }
        writeln!(out, "  links       {}", state.links)?;
        writeln!(out, "  dead        {}", state.dead_letters)?;
        if let Some(e) = &state.last_error {
            writeln!(out, "  last error  {e}")?;
        }
    }
    Ok(())
}
