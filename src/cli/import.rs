//! `usher import STREAM --limit N [--dry-run]`: Halo's "Import Users" test for a SeatGeek →
//! Halo stream. Takes the first N change events after the stream's cursor. Without
//! `--dry-run` it imports them as a run would (and commits, so the cursor moves); with it,
//! it writes nothing to Halo or to the state and prints, per event, what would happen and
//! the mapped fields. A progress bar goes to stderr when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{EX_DATAERR, EX_FAIL, EX_OK, report_problems};
use crate::config;
use crate::engine::in_doubt::InDoubt;
use crate::engine::{RunCtx, control, lock};
use crate::http::Http;
use crate::store::{Counts, Store};
use crate::streams::options::StreamKind;
use crate::streams::seatgeek_halo::{self, EventLine, RunMode};

pub async fn import(source: config::Source, stream: &str, limit: u64, dry_run: bool) -> i32 {
    let config = match config::load(&source) {
        Ok(c) => c,
        Err(p) => return report_problems(&p),
    };
    let Some(spec) = config.streams.get(stream).cloned() else {
        eprintln!("{}", super::ops::no_stream(&config, stream));
        return EX_FAIL;
    };
    let StreamKind::SeatGeekToHalo(opts) = &spec.kind else {
        eprintln!("usher: `import` tests SeatGeek → Halo streams; {stream:?} is another kind");
        return EX_FAIL;
    };
    if limit == 0 {
        eprintln!("usher: --limit must be at least 1");
        return EX_FAIL;
    }
    crate::logging::init_cli();
    let state_dir = config.daemon.state_dir.clone();
    // A dry run reads the state (links, cursor) and writes nothing, so it needs no lock.
    let mut scratch = None;
    let mut _lock = None;
    let store = if dry_run && config.daemon.postgres.is_some() {
        // A dry run on PostgreSQL reads the shared state and writes nothing to it.
        match config.daemon.open_store().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("usher: {e}");
                return EX_DATAERR;
            }
        }
    } else if dry_run {
        match Store::open_existing(&state_dir) {
            Ok(Some(s)) => s,
            Ok(None) => {
                let dir =
                    std::env::temp_dir().join(format!("usher-dry-run-{}", std::process::id()));
                let s = match Store::open(&dir) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("usher: {e}");
                        return EX_DATAERR;
                    }
                };
                scratch = Some(dir);
                s
            }
            Err(e) => {
                eprintln!("usher: {e}");
                return EX_DATAERR;
            }
        }
    } else {
        match lock::acquire(&state_dir) {
            Ok(l) => _lock = Some(l),
            Err(e) => {
                eprintln!("usher: {e}; stop the daemon for an import, or use --dry-run");
                return EX_FAIL;
            }
        }
        match config.daemon.open_store().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("usher: {e}");
                return EX_DATAERR;
            }
        }
    };
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let config = Arc::new(config);
    let ctx = RunCtx {
        kind_run: crate::streams::RUN,
        doubt: InDoubt::new(&store, &spec.name, config.daemon.settle_margin),
        store: store.clone(),
        spec: spec.clone(),
        config: config.clone(),
        http: crate::engine::budget_log::http_client(&store).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the saved rate budgets; starting them empty");
            Http::new()
        }),
        stop: cancel.clone(),
        cancel,
        interrupt: Default::default(),
        clock: crate::clock::Clock::process(),
        backfill: None,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(limit);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut print = |l: EventLine| {
        let line = format!(
            "{}  {}  {}{}{}",
            l.event_id.as_deref().unwrap_or("-"),
            l.user_id.as_deref().unwrap_or("-"),
            l.outcome,
            l.halo_id
                .map(|h| format!("  halo user {h}"))
                .unwrap_or_default(),
            l.fields.map(|f| format!("  {f}")).unwrap_or_default(),
        );
        match &bar {
            Some(b) => {
                b.inc(1);
                b.println(line);
            }
            None => println!("{line}"),
        }
    };
    let run_id = if dry_run {
        None
    } else {
        let _ = store
            .audit(
                &control::cli_actor("import"),
                "import",
                Some(stream),
                &format!("test import of {limit} events"),
            )
            .await;
        store.run_started(stream, "import").await.ok()
    };
    let started = std::time::Instant::now();
    let mut counts = Counts::default();
    // Writes an earlier run left in doubt settle first, as in a daemon's run.
    let settled = if dry_run {
        Ok(true)
    } else {
        crate::engine::in_doubt::settle_previous(&ctx).await
    };
    let result = match settled {
        Ok(true) => {
            seatgeek_halo::run(
                &ctx,
                opts,
                &mut counts,
                RunMode {
                    limit: Some(limit),
                    dry_run,
                    report: Some(&mut print),
                },
            )
            .await
        }
        Ok(false) => Ok(crate::engine::Flow::Stopped),
        Err(e) => Err(e),
    };
    ctx.doubt.close().await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let (outcome, error) = match &result {
        Ok(crate::engine::Flow::Stopped) => ("stopped", None),
        Ok(_) => ("ok", None),
        Err(e) => ("failed", Some(e.to_string())),
    };
    if let Some(id) = run_id {
        let _ = store.run_finished(id, outcome, counts, error.clone()).await;
    }
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!(
        "{stream}: {}{outcome} in {:.1}s: pulled {}, {} {}, {} {}, skipped {}, dead-lettered {}",
        if dry_run { "dry run " } else { "" },
        started.elapsed().as_secs_f64(),
        counts.pulled,
        if dry_run { "would create" } else { "created" },
        counts.created,
        if dry_run { "would update" } else { "updated" },
        counts.updated,
        counts.skipped,
        counts.failed
    );
    if dry_run {
        println!("  nothing was written to Halo or to the state");
    }
    match error {
        Some(e) => {
            println!("  error: {e}");
            EX_FAIL
        }
        None => EX_OK,
    }
}
