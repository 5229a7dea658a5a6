//! The commands of `usher-sandbox`. Exit codes as usher's (`usher::cli::EX_*`).

mod bench;
mod bench_s360;
mod demo;
mod demo_s360;
mod seatgeek_halo_demo;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use usher::cli::{EX_DATAERR, EX_FAIL, EX_OK, report_problems};

#[derive(Parser, Debug)]
#[command(
    name = "usher-sandbox",
    version,
    about = "usher's fake vendors on loopback, the one-command demo and the benchmarks (not part of the product)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every stream of the demo configuration once against the bundled fakes.
    Demo {
        /// The demo configuration [default: config/demo.toml in this folder, else the
        /// built-in copy, written with its secrets to a new folder under $TMPDIR]
        #[arg(long)]
        demo_config: Option<PathBuf>,
        /// How many contacts the fake CRM starts with.
        #[arg(long, default_value_t = 240)]
        contacts: u64,
        /// The state directory [default: state/demo in a checkout, else beside the
        /// built-in configuration].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Serve the fake vendors on loopback until interrupted (for trying usher by hand).
    Serve {
        /// Where the fakes listen (port 0: a free port, printed at start).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Contacts the fake CRM starts with.
        #[arg(long, default_value_t = 1000)]
        contacts: u64,
        #[command(flatten)]
        ticketco: demo::TicketCoSeed,
        /// Change events the fake SeatGeek (`/seatgeek`) starts with.
        #[arg(long, default_value_t = 0)]
        seatgeek_events: u64,
        /// Users those events are spread over.
        #[arg(long, default_value_t = 1000)]
        seatgeek_users: u32,
    },
    /// Measure start, reload, memory and CPU of `usher run` with many streams (prints
    /// figures; the `usher` binary beside this one).
    BenchScale {
        /// Streams in the generated configuration.
        #[arg(long, default_value_t = 1000)]
        streams: u32,
        /// Connections they are spread over.
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// Seconds of idle measured.
        #[arg(long, default_value_t = 20)]
        idle_secs: u64,
    },
    /// Measure the S-360 receiver (records/s accepted durably, latency) and relay.
    BenchS360 {
        /// Concurrent senders.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// How long they send.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Records relayed afterwards.
        #[arg(long, default_value_t = 100_000)]
        relay: u64,
        /// The state on this PostgreSQL database (an empty schema) instead of SQLite.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
    },
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    // The fakes serve many connections: every core. The demo and the benches run usher's
    // streams in this process: one worker, as `usher run` has.
    let default_workers = match cli.command {
        Command::Serve { .. } => std::thread::available_parallelism().map_or(2, |n| n.get()),
        _ => 1,
    };
    let workers = match std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        None | Some("") => default_workers,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("usher-sandbox: TOKIO_WORKER_THREADS={v:?} is not a positive number");
                return usher::cli::EX_CONFIG;
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usher-sandbox: cannot start the async runtime: {e}");
            return EX_FAIL;
        }
    };
    match cli.command {
        Command::Demo {
            demo_config,
            contacts,
            state_dir,
        } => runtime.block_on(demo::demo(demo_config, contacts, state_dir)),
        Command::Serve {
            listen,
            contacts,
            ticketco,
            seatgeek_events,
            seatgeek_users,
        } => runtime.block_on(demo::sandbox(
            listen,
            contacts,
            ticketco,
            seatgeek_events,
            seatgeek_users,
        )),
        Command::BenchScale {
            streams,
            connections,
            idle_secs,
        } => runtime.block_on(bench::scale(streams, connections, idle_secs)),
        Command::BenchS360 {
            clients,
            seconds,
            relay,
            postgres,
        } => runtime.block_on(bench_s360::bench(clients, seconds, relay, postgres)),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_argument_and_command_has_help() {
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            if sub.get_about().is_none() {
                missing.push(sub.get_name().to_string());
            }
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} {id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
