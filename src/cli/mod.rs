//! The subcommands. Each returns an exit code: 0 fine, 1 failed, 65 the state database is
//! unusable, 78 (EX_CONFIG) the configuration is invalid.

mod demo;
mod ops;
// SeatGeek / Halo
mod import;
mod seatgeek_halo_demo;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, LogFormat, Problem};

pub const EX_OK: i32 = 0;
pub const EX_FAIL: i32 = 1;
pub const EX_DATAERR: i32 = 65;
pub const EX_CONFIG: i32 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "usher",
    version,
    about = "Moves people and bookings between ticketing systems and the systems around them, on a schedule, without losing or duplicating a record."
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
    /// Show each stream: schedule, last and next run, cursor, outbox, dead letters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show or reset a stream's cursor.
    Cursor {
        #[command(subcommand)]
        action: CursorAction,
    },
    /// Run a stream now (through the daemon when one runs, else in this process).
    Trigger { stream: String },
    // SeatGeek / Halo
    /// Test import of a SeatGeek → Halo stream: the first N change events after its cursor.
    Import {
        stream: String,
        /// How many change events to take.
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Write nothing to Halo or to the state; print what each event would do.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run every stream of config/demo.toml once against the bundled fakes.
    Demo {
        /// The demo configuration.
        #[arg(long, default_value = "config/demo.toml")]
        demo_config: PathBuf,
        /// How many contacts the fake CRM starts with.
        #[arg(long, default_value_t = 240)]
        contacts: u64,
    },
    /// Serve the fake vendors on loopback until interrupted (for trying usher by hand).
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        contacts: u64,
        // SeatGeek / Halo
        /// Change events the fake SeatGeek (`/seatgeek`) starts with.
        #[arg(long, default_value_t = 0)]
        seatgeek_events: u64,
        /// Users those events are spread over.
        #[arg(long, default_value_t = 1000)]
        seatgeek_users: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum CursorAction {
    Show {
        stream: String,
    },
    /// Back to the start: the next run re-imports all history (links are kept: no duplicates).
    Reset {
        stream: String,
    },
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usher: cannot start the async runtime: {e}");
            return EX_FAIL;
        }
    };
    let source = config::Source {
        main_file: cli.config.clone(),
        env_overrides: true,
        state_dir_override: cli.state_dir.clone(),
    };
    match cli.command {
        Command::Run => runtime.block_on(ops::run(source, cli.log_format.into())),
        Command::Validate { online } => runtime.block_on(ops::validate(source, online)),
        Command::Status { json } => ops::status(source, json),
        Command::Cursor { action } => match action {
            CursorAction::Show { stream } => ops::cursor_show(source, &stream),
            CursorAction::Reset { stream } => ops::cursor_reset(source, &stream),
        },
        Command::Trigger { stream } => runtime.block_on(ops::trigger(source, &stream)),
        // SeatGeek / Halo
        Command::Import {
            stream,
            limit,
            dry_run,
        } => runtime.block_on(import::import(source, &stream, limit, dry_run)),
        Command::Demo {
            demo_config,
            contacts,
        } => runtime.block_on(demo::demo(demo_config, contacts, cli.state_dir.clone())),
        Command::Sandbox {
            listen,
            contacts,
            seatgeek_events,
            seatgeek_users,
        } => runtime.block_on(demo::sandbox(
            listen,
            contacts,
            seatgeek_events,
            seatgeek_users,
        )),
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
