//! Logs: `tracing` events to stdout (for journald), human-readable on a terminal, JSON with
//! `--log-format json`; level from `RUST_LOG`, else the config's `log.level`; optional
//! daily-rotated files through tracing-appender. Secrets never reach a log line because no
//! code formats one: they live in `Secret`, whose `Debug` is `***`.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::prelude::*;

use crate::config::{LogFormat, LogSettings};

/// Keeps the file writer's buffer flushing until exit.
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

pub fn init(settings: &LogSettings, format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(quiet_dependencies(&settings.level)))
        .unwrap_or_else(|_| EnvFilter::new(quiet_dependencies("info")));
    let format = match format {
        LogFormat::Auto => settings.format,
        other => other,
    };
    let tty = std::io::stdout().is_terminal();
    let (file_layer, guard) = match &settings.directory {
        Some(dir) => {
            let appender = tracing_appender::rolling::daily(dir, &settings.file_prefix);
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .finish(appender);
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                .json()
                .flatten_event(true);
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(file_layer);
    let result = if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stdout.with_max_level(tracing::Level::TRACE)),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(tty)
                    .with_target(false),
            )
            .try_init()
    };
    if let Err(e) = result {
        eprintln!("usher: logging was already set up: {e}");
    }
    LogGuard(guard)
}

/// The configured level, with tokio-cron-scheduler held to warnings: it logs "Job creator
/// created" at INFO for every job armed, i.e. at every firing of every stream. `RUST_LOG`
/// (taken as it is) can still ask for it.
fn quiet_dependencies(level: &str) -> String {
    format!("{level},tokio_cron_scheduler=warn")
}

/// For one-shot CLI commands: warnings and errors on stderr, `RUST_LOG` to see more.
pub fn init_cli() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_writer(std::io::stderr),
        )
        .try_init();
}
