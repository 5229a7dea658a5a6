//! Logs: `tracing` events to stdout (for journald), human-readable on a terminal, JSON with
//! `--log-format json`; level from `RUST_LOG`, else the config's `log.level`; optional
//! daily-rotated files through tracing-appender, the newest `log.keep_files` kept. Secrets never reach a log line because no
//! code formats one: they live in `Secret`, whose `Debug` is `***`.
//!
//! **No value from outside can forge a text log line**: the text format escapes control
//! characters (newline, ESC, …) in every message and field value ([`EscapeControl`]); the
//! JSON format escapes them by being JSON.
//!
//! **A log line that cannot be written is not silent** ([`Counted`]): stdout closed or
//! full, the log directory full or gone. Each is counted in `usher_log_write_errors_total`
//! and said once on stderr (which journald keeps apart when stdout is the broken one).
//!
//! **Each line reaches the journal at its own priority**: when stdout is the journal's
//! stream (`$JOURNAL_STREAM` names its device and inode, as systemd sets it), every line
//! starts with its syslog priority, `<3>` error, `<4>` warn, `<6>` info, `<7>` debug and
//! trace (sd-daemon(3)), which journald takes off and keeps as the entry's priority, so
//! `journalctl -p err` shows the errors. Elsewhere (a terminal, a file, a pipe) no prefix.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::field::{Field, Visit};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
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
    let appender = settings.directory.as_ref().and_then(|dir| {
        tracing_appender::rolling::RollingFileAppender::builder()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix(&settings.file_prefix)
            .max_log_files(settings.keep_files as usize)
            .build(dir)
            .map_err(|e| {
                let _ = writeln!(
                    std::io::stderr(),
                    "usher: cannot write log files in {}: {e}; logging to stdout only",
                    dir.display()
                );
            })
            .ok()
    });
    let (file_layer, guard) = match appender {
        Some(appender) => {
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .finish(Counted {
                    inner: appender,
                    sink: Sink::File,
                });
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
    let stdout = StdoutLines {
        journal: stdout_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()),
    };
    let result = if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(stdout.with_max_level(tracing::Level::TRACE)),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(EscapeControl(DefaultFields::new()))
                    .with_ansi(tty)
                    .with_target(false)
                    .with_writer(stdout),
            )
            .try_init()
    };
    if let Err(e) = result {
        eprintln!("usher: logging was already set up: {e}");
    }
    LogGuard(guard)
}

/// Where log lines go, for the count and the one warning of each.
#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    File,
}

static WARNED_STDOUT: AtomicBool = AtomicBool::new(false);
static WARNED_FILE: AtomicBool = AtomicBool::new(false);

/// A log writer whose failures are counted and said once on stderr.
pub struct Counted<W> {
    inner: W,
    sink: Sink,
}

/// `$JOURNAL_STREAM` ("DEVICE:INODE", set by systemd when stdout or stderr is connected to
/// the journal) names stdout's own stream: then journald reads priority prefixes from it.
fn stdout_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.trim().split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    stream_id(std::io::stdout()).is_some_and(|id| id == (dev, ino))
}

/// The device and inode of what a descriptor is open on (fstat, through a duplicate).
fn stream_id(fd: impl std::os::fd::AsFd) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::File::from(fd.as_fd().try_clone_to_owned().ok()?)
        .metadata()
        .ok()?;
    Some((m.dev(), m.ino()))
}

/// The syslog priority of a level, as sd-daemon(3) prefixes it: `<3>` … `<7>`.
fn priority(level: &tracing::Level) -> &'static [u8] {
    match *level {
        tracing::Level::ERROR => b"<3>",
        tracing::Level::WARN => b"<4>",
        tracing::Level::INFO => b"<6>",
        _ => b"<7>",
    }
}

/// Log lines to stdout, counted ([`Counted`]); prefixed with their priority when stdout is
/// the journal.
#[derive(Clone, Copy)]
struct StdoutLines {
    journal: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StdoutLines {
    type Writer = Prefixed<Counted<std::io::Stdout>>;

    fn make_writer(&'a self) -> Self::Writer {
        Prefixed {
            prefix: None,
            inner: Counted {
                inner: std::io::stdout(),
                sink: Sink::Stdout,
            },
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let mut w = self.make_writer();
        if self.journal {
            w.prefix = Some(priority(meta.level()));
        }
        w
    }
}

/// One event's writer: the prefix goes before its first bytes, once. The fmt layer writes
/// an event as one buffer, so prefix and line leave in one write.
pub struct Prefixed<W> {
    prefix: Option<&'static [u8]>,
    inner: W,
}

impl<W: Write> Write for Prefixed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.prefix.take() {
            None => self.inner.write(buf),
            Some(p) => {
                let mut line = Vec::with_capacity(p.len() + buf.len());
                line.extend_from_slice(p);
                line.extend_from_slice(buf);
                self.inner.write_all(&line)?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Counted<W> {
    fn failed(&self, e: &std::io::Error) {
        crate::metrics::METRICS
            .log_write_errors
            .fetch_add(1, Ordering::Relaxed);
        let (warned, what) = match self.sink {
            Sink::Stdout => (&WARNED_STDOUT, "stdout"),
            Sink::File => (&WARNED_FILE, "the log file"),
        };
        if !warned.swap(true, Ordering::Relaxed) {
            // Not eprintln!: a broken stderr must not panic the daemon.
            let _ = writeln!(
                std::io::stderr(),
                "usher: cannot write the log to {what}: {e}; usher goes on, and counts the lines it could not write in usher_log_write_errors_total (/metrics); this is said once"
            );
        }
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.failed(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().inspect_err(|e| self.failed(e))
    }
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
                .fmt_fields(EscapeControl(DefaultFields::new()))
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_writer(std::io::stderr),
        )
        .try_init();
}

/// Field formatting for the text format that shows control characters escaped (`\n`,
/// `\u{1b}`) in every message and value, so that text from outside (a JSON key, a header,
/// a vendor's error) can neither start a new line nor drive the terminal. Wraps the
/// default formatting, which writes `Display` values (`%value`) and messages as they are.
pub struct EscapeControl<M>(pub M);

impl<'a, M> MakeVisitor<Writer<'a>> for EscapeControl<M>
where
    M: MakeVisitor<Writer<'a>>,
{
    type Visitor = EscapeVisitor<M::Visitor>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapeVisitor(self.0.make_visitor(target))
    }
}

/// The visitor of [`EscapeControl`]: hands every value on wrapped in [`Escaped`].
pub struct EscapeVisitor<V>(V);

impl<V: Visit> Visit for EscapeVisitor<V> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, &Escaped(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        // The default shows a message's text as it is and other strings quoted (`Debug`).
        if field.name() == "message" {
            self.0
                .record_debug(field, &Escaped(&format_args!("{value}")));
        } else {
            self.0.record_debug(field, &Escaped(&value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .record_debug(field, &Escaped(&format_args!("{}", ErrorChain(value))));
    }
}

impl<V: VisitOutput<fmt::Result>> VisitOutput<fmt::Result> for EscapeVisitor<V> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl<V: VisitFmt> VisitFmt for EscapeVisitor<V> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// An error and its sources, `: `-separated.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// A value whose `Debug` text has its control characters escaped.
struct Escaped<'a>(&'a dyn fmt::Debug);

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        write!(EscapingWriter(f), "{:?}", self.0)
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().expect("found a char");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// C0 and C1 control characters and DEL, and the Unicode line and paragraph separators
/// (which some log viewers break lines on).
fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(v: &dyn fmt::Debug) -> String {
        format!("{:?}", Escaped(v))
    }

    #[test]
    fn priorities_only_when_stdout_is_the_journal() {
        assert_eq!(priority(&tracing::Level::ERROR), b"<3>");
        assert_eq!(priority(&tracing::Level::WARN), b"<4>");
        assert_eq!(priority(&tracing::Level::INFO), b"<6>");
        assert_eq!(priority(&tracing::Level::DEBUG), b"<7>");
        assert_eq!(priority(&tracing::Level::TRACE), b"<7>");
        assert!(!stdout_is_journal(None));
        assert!(!stdout_is_journal(Some("garbage")));
        assert!(!stdout_is_journal(Some("0:0")));
        let (dev, ino) = stream_id(std::io::stdout()).unwrap();
        assert!(stdout_is_journal(Some(&format!("{dev}:{ino}"))));
        let mut out = Vec::new();
        let mut w = Prefixed {
            prefix: Some(b"<3>"),
            inner: &mut out,
        };
        w.write_all(b"one line\n").unwrap();
        w.write_all(b"more of it\n").unwrap();
        assert_eq!(out, b"<3>one line\nmore of it\n");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        let forged = "key\u{1b}[2K\r\n2026-01-01T00:00:00Z INFO usher is ready FORGED-LINE";
        let shown = escaped(&format_args!("{forged}"));
        assert!(!shown.chars().any(needs_escape), "{shown}");
        assert!(shown.contains("key\\u{1b}[2K\\r\\n2026"), "{shown}");
        assert_eq!(
            escaped(&format_args!("tab\there\u{85}")),
            "tab\\there\\u{85}"
        );
        // Quoted strings (`Debug`) were already escaped by Rust and stay as they are.
        assert_eq!(escaped(&"a\nb"), "\"a\\nb\"");
        assert_eq!(escaped(&format_args!("plain ünïcode")), "plain ünïcode");
    }
}
