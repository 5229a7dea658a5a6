//! The subcommands. Each returns an exit code: 0 fine, 1 failed, 65 (EX_DATAERR) the state
//! database cannot be used (damaged, written by a newer usher, not usher's, moved away from
//! under the daemon), 75 (EX_TEMPFAIL) the state cannot be used for now (the disk full, an
//! I/O error, the file busy: systemd starts usher again), 77 (EX_NOPERM) usher may not open
//! or write the state, 78 (EX_CONFIG) the configuration is invalid.

mod man;
mod ops;
mod state;
// Ticket Co x Airship
mod backfill;
// SeatGeek / Halo
mod import;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, LogFormat, Problem};

pub const EX_OK: i32 = 0;
pub const EX_FAIL: i32 = 1;
pub const EX_DATAERR: i32 = 65;
pub const EX_TEMPFAIL: i32 = 75;
pub const EX_NOPERM: i32 = 77;
pub const EX_CONFIG: i32 = 78;

/// The exit code for a state that cannot be used, by what is at fault.
pub fn fault_code(f: crate::store::Fault) -> i32 {
    match f {
        crate::store::Fault::Transient => EX_TEMPFAIL,
        crate::store::Fault::Permission => EX_NOPERM,
        crate::store::Fault::Unusable => EX_DATAERR,
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "usher",
    version,
    about = "Moves people and bookings between ticketing systems and the systems around them, on a schedule, without losing or duplicating a record.",
    after_help = "Exit codes: 0 done; 1 failed; 65 the state database cannot be used (damaged, from a newer usher, moved away under the daemon); 75 the state cannot be used for now (disk full, I/O error, busy: systemd restarts usher); 77 no permission on the state; 78 the configuration is invalid."
)]
pub struct Cli {
    /// The main configuration file; drop-ins are read from `usher.d/` beside it.
    #[arg(long, short = 'c', global = true, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The state directory (overrides `daemon.state_dir`).
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Log format on stdout.
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Auto)]
    pub log_format: LogFormatArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Auto,
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Auto => LogFormat::Auto,
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon (as systemd does): schedules, signals, control files.
    Run,
    /// Check the configuration as `run` would load it; print every problem.
    Validate {
        /// Also check each connection against its vendor.
        #[arg(long)]
        online: bool,
    },
    /// Reload the running daemon (the unit's ExecReload): check the configuration as the
    /// daemon will load it, send it SIGHUP and wait for its verdict. Exits 78 with the
    /// problems when the configuration is refused (the daemon keeps the old one).
    Reload {
        /// How long to wait for the daemon's verdict.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show each stream: schedule, last and next run, cursor, outbox, dead letters, owed records.
    Status {
        /// Print JSON (every stream's state, for scripts and monitoring) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show or reset a stream's cursor.
    Cursor {
        #[command(subcommand)]
        action: CursorAction,
    },
    /// Run a stream now (through the daemon when one runs, else in this process).
    Trigger {
        /// The stream to run (a name under `[streams]`).
        stream: String,
    },
    /// Back up or check the state database (while the daemon runs, too).
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// List, retry or drop the records a stream set aside.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    // Ticket Co x Airship
    /// Run a stream once from an older date (attendance date), e.g. a historic import.
    Backfill {
        /// The Ticket Co → Airship stream to backfill.
        stream: String,
        /// The first date to import (YYYY-MM-DD).
        #[arg(long)]
        from: chrono::NaiveDate,
    },
    // SeatGeek / Halo
    /// Test import of a SeatGeek → Halo stream: the first N change events after its cursor.
    Import {
        /// The SeatGeek → Halo stream to import into.
        stream: String,
        /// How many change events to take.
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Write nothing to Halo or to the state; print what each event would do.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the man pages and shell completions into DIR (used by packaging).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum DeadLetterAction {
    /// Show the stream's dead letters with their reasons.
    List {
        /// The stream whose dead letters to show.
        stream: String,
        /// Show at most this many, oldest first.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print JSON, with each record as it was set aside.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters through the stream again at its next run (all, or one by --id).
    Retry {
        /// The stream whose dead letters to put through again.
        stream: String,
        /// Only this dead letter (its ID, as `list` shows it); default: all of the stream's.
        #[arg(long)]
        id: Option<i64>,
    },
    /// Delete dead letters for good (all, with --all, or one by --id).
    Drop {
        /// The stream whose dead letters to delete.
        stream: String,
        /// Only this dead letter (its ID, as `list` shows it).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<i64>,
        /// Every dead letter of the stream.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum StateAction {
    /// Write a consistent copy of the state database to FILE (mode 0600), while the daemon
    /// runs: a snapshot at one instant, compacted, checked with `quick_check`. FILE must not
    /// exist. To restore it: stop usher, replace usher.db with it, delete usher.db-wal and
    /// usher.db-shm, start usher (README, "Backup and restore").
    Backup {
        /// Where to write the copy (must not exist).
        file: PathBuf,
    },
    /// Check the state database for damage (`quick_check`; `--full`: `integrity_check`,
    /// which also compares every index with its table and takes longer). Exit 65 if damaged.
    Check {
        /// `integrity_check` instead of `quick_check`: also every index against its table.
        #[arg(long)]
        full: bool,
    },
    /// Copy this host's SQLite state (cursors, links, outbox, ledger, dead letters, runs,
    /// audit…) into an empty PostgreSQL database, to move to several instances without
    /// re-importing or re-sending anything. Stop usher first. Refuses a database that holds
    /// state already. Then set `[daemon] state` to the URL and start the instances.
    Migrate {
        /// The PostgreSQL database, `postgres://user@host:port/db` (no password in it).
        #[arg(long, value_name = "URL")]
        to: String,
        /// A file holding the database user's password (else none, or PGPASSWORD's).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CursorAction {
    /// Print where the stream is in its source.
    Show {
        /// The stream whose cursor to show.
        stream: String,
    },
    /// Back to the start: the next run re-imports all history (links are kept: no duplicates).
    Reset {
        /// The stream whose cursor to reset.
        stream: String,
    },
}

/// Async worker threads: `default` unless `TOKIO_WORKER_THREADS` says otherwise. usher's
/// async work is waiting on vendors; SQLite runs on the blocking pool beside it. One worker
/// spends less CPU and memory than two on the same run (ARCHITECTURE, "Performance"): with
/// two, every HTTP answer is read on one thread and parsed and freed on the other.
fn worker_threads(env: Option<&str>, default: usize) -> Result<usize, String> {
    match env.map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(n),
            _ => Err(format!(
                "TOKIO_WORKER_THREADS is {v:?}; give a number of threads from 1 to 256, or unset it"
            )),
        },
    }
}

/// The runtime of this process, for the commands that run outside it (`status`, `cursor`,
/// `dead-letters`) and still reach a PostgreSQL state through it.
static RUNTIME: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// The state the configuration names, for a command that only reads or marks it: None when
/// nothing was recorded yet (SQLite: no file). Not async: on PostgreSQL it blocks on this
/// process's runtime (called from outside it).
pub(crate) fn open_existing_state(
    d: &crate::config::DaemonSettings,
) -> Result<Option<crate::store::Store>, crate::store::StoreError> {
    match &d.postgres {
        None => crate::store::Store::open_existing(&d.state_dir),
        Some(pg) => RUNTIME
            .get()
            .expect("the runtime is built before any command runs")
            .block_on(crate::store::Store::open_postgres(pg))
            .map(Some),
    }
}

/// The state the configuration names, created and migrated if needed, from outside the
/// runtime (see [`open_existing_state`]).
/// Runs a future to its end from code outside the runtime (the synchronous commands).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME
        .get()
        .expect("the runtime is built before any command runs")
        .block_on(f)
}

pub(crate) fn open_state_blocking(
    d: &crate::config::DaemonSettings,
) -> Result<crate::store::Store, crate::store::StoreError> {
    match &d.postgres {
        None => crate::store::Store::open(&d.state_dir),
        Some(pg) => RUNTIME
            .get()
            .expect("the runtime is built before any command runs")
            .block_on(crate::store::Store::open_postgres(pg)),
    }
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    // A debug build (what the tests run) may start its clock elsewhere: `USHER_TEST_NOW`.
    crate::clock::Clock::from_test_env();
    let default_workers = 1;
    let env_workers = std::env::var("TOKIO_WORKER_THREADS").ok();
    let workers = match worker_threads(env_workers.as_deref(), default_workers) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("usher: {e}");
            return EX_CONFIG;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usher: cannot start the async runtime: {e}");
            return EX_FAIL;
        }
    };
    let _ = RUNTIME.set(runtime.handle().clone());
    let source = config::Source {
        main_file: cli.config.clone(),
        env_overrides: true,
        state_dir_override: cli.state_dir.clone(),
        read_secrets: true,
    };
    // Commands that only read or mark the state work without the service's secrets.
    let state_only = config::Source {
        read_secrets: false,
        ..source.clone()
    };
    match cli.command {
        Command::Run => runtime.block_on(ops::run(source, cli.log_format.into())),
        Command::Validate { online } => runtime.block_on(ops::validate(source, online)),
        Command::Reload { timeout } => ops::reload(source, timeout),
        Command::Status { json } => ops::status(state_only, json),
        Command::Cursor { action } => match action {
            CursorAction::Show { stream } => ops::cursor_show(state_only, &stream),
            CursorAction::Reset { stream } => ops::cursor_reset(state_only, &stream),
        },
        Command::DeadLetters { action } => ops::dead_letters(state_only, action),
        Command::State { action } => match action {
            StateAction::Backup { file } => state::backup(state_only, &file),
            StateAction::Check { full } => state::check(state_only, full),
            StateAction::Migrate { to, password_file } => {
                state::migrate(state_only, &to, password_file.as_deref())
            }
        },
        Command::Trigger { stream } => runtime.block_on(ops::trigger(source, &stream)),
        // SeatGeek / Halo
        Command::Import {
            stream,
            limit,
            dry_run,
        } => runtime.block_on(import::import(source, &stream, limit, dry_run)),
        Command::GenerateAssets { dir } => generate_assets(&dir),
        // Ticket Co x Airship
        Command::Backfill { stream, from } => {
            runtime.block_on(backfill::backfill(source, &stream, from))
        }
    }
}

/// Prints every problem, one a line, and a count; returns EX_CONFIG.
pub fn report_problems(problems: &[Problem]) -> i32 {
    for p in problems {
        eprintln!("{p}");
    }
    eprintln!(
        "usher: the configuration has {} problem{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    EX_CONFIG
}

/// Man pages (one per subcommand, usher(1) with FILES, SIGNALS and EXIT STATUS, and
/// usher.toml(5)) and bash/zsh/fish completions, from the CLI definition and the
/// configuration reference.
fn generate_assets(dir: &std::path::Path) -> i32 {
    use clap::CommandFactory;
    let result = (|| -> std::io::Result<()> {
        let man = dir.join("man");
        let comp = dir.join("completions");
        std::fs::create_dir_all(&man)?;
        std::fs::create_dir_all(&comp)?;
        let cmd = Cli::command();
        clap_mangen::generate_to(cmd.clone(), &man)?;
        // usher(1) with FILES, SIGNALS and EXIT STATUS; usher.toml(5) from the reference.
        std::fs::write(man.join("usher.1"), man::usher_1(cmd.clone())?)?;
        let man5 = dir.join("man5");
        std::fs::create_dir_all(&man5)?;
        std::fs::write(
            man5.join("usher.toml.5"),
            man::usher_toml_5(man::CONFIG_REFERENCE, env!("CARGO_PKG_VERSION")),
        )?;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            clap_complete::generate_to(shell, &mut cmd.clone(), "usher", &comp)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            println!("man pages and completions written to {}", dir.display());
            EX_OK
        }
        Err(e) => {
            eprintln!("usher: cannot write assets to {}: {e}", dir.display());
            EX_FAIL
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn one_worker_unless_the_environment_says_otherwise() {
        assert_eq!(worker_threads(None, 1), Ok(1));
        assert_eq!(worker_threads(Some(" "), 1), Ok(1));
        assert_eq!(worker_threads(None, 2), Ok(2));
        assert_eq!(worker_threads(Some("4"), 1), Ok(4));
        for bad in ["0", "two", "-1", "1000"] {
            let e = worker_threads(Some(bad), 1).unwrap_err();
            assert!(e.contains("TOKIO_WORKER_THREADS") && e.contains(bad), "{e}");
        }
    }
}
