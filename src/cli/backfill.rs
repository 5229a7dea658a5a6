//! `usher backfill STREAM --from DATE` (Ticket Co x Airship): one run of a stream from an
//! older attendance date, in this process, with a progress bar when stderr is a terminal.
//! It takes the state directory's lock like `trigger`; while a daemon holds it, the
//! backfill is refused (stop the daemon, backfill, start it again): a backfill can be long,
//! and the daemon's own schedule must not be held up behind it silently.

use std::io::IsTerminal;
use std::sync::Arc;

use chrono::NaiveDate;
use tokio_util::sync::CancellationToken;

use super::ops::{known_stream, load, store_error};
use super::{EX_CONFIG, EX_FAIL, EX_OK};
use crate::config;
use crate::engine::control;
use crate::engine::in_doubt::InDoubt;
use crate::engine::lock::{self, LockError};
use crate::engine::{Backfill, RunCtx, run_stream};
use crate::http::Http;
use crate::streams::options::StreamKind;

pub async fn backfill(source: config::Source, stream: &str, from: NaiveDate) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = known_stream(&config, stream) {
        return code;
    }
    if !matches!(
        config.streams[stream].kind,
        StreamKind::TicketCoToAirship(_)
    ) {
        eprintln!(
            "usher: stream {stream:?} has no backfill (it reads a cursor feed; use `usher cursor reset {stream}`)"
        );
        return EX_CONFIG;
    }
    let state_dir = config.daemon.state_dir.clone();
    let _lock = match lock::acquire(&state_dir) {
        Ok(l) => l,
        Err(LockError::Held { pid, .. }) => {
            eprintln!(
                "usher: a daemon{} holds {}; stop it, run the backfill, then start it again",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                state_dir.display()
            );
            return EX_FAIL;
        }
        Err(e) => {
            eprintln!("usher: {e}");
            return EX_FAIL;
        }
    };
    crate::logging::init_cli();
    let store = match config.daemon.open_store().await {
        Ok(s) => s,
        Err(e) => return store_error(&e),
    };
    let _ = store
        .audit(
            &control::cli_actor("backfill"),
            "backfill",
            Some(stream),
            &format!("backfill from {from}, in the CLI"),
        )
        .await;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let progress = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} events ({eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_message(format!("{stream} from {from}"));
        pb
    });
    let config = Arc::new(config);
    let http = crate::engine::budget_log::http_client(&store)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the saved rate budgets; starting them empty");
            Http::new()
        });
    let ctx = RunCtx {
        kind_run: crate::streams::RUN,
        doubt: InDoubt::new(&store, stream, config.daemon.settle_margin),
        http: crate::engine::lease::http_for(&http, &store, &config),
        store,
        spec: config.streams[stream].clone(),
        config,
        stop: cancel.clone(),
        cancel,
        interrupt: Default::default(),
        clock: crate::clock::Clock::process(),
        backfill: Some(Backfill {
            from,
            progress: progress.clone(),
        }),
    };
    let report = run_stream(&ctx, "backfill").await;
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let c = report.counts;
    println!(
        "{}: backfill from {from}: {} in {:.1}s: pulled {}, created {}, updated {}, skipped {}, failed {}",
        report.stream,
        report.outcome,
        report.seconds,
        c.pulled,
        c.created,
        c.updated,
        c.skipped,
        c.failed
    );
    if let Some(e) = &report.error {
        println!("  error: {e}");
    }
    if report.outcome == "ok" {
        EX_OK
    } else {
        EX_FAIL
    }
}
