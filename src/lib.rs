//! usher: an integration daemon for ticketing venues and the agencies that run them.
//!
//! - [`config`]: figment layers → raw structs → validated configuration, every problem at once.
//! - [`schedule`]: intervals and timezone-aware cron, computed from a given "now".
//! - [`mapping`]: field, static and transform mappings; pure.
//! - [`store`]: the SQLite state (cursors, links, outbox, ledger, runs, dead letters, audit);
//!   the only code that speaks SQL.
//! - [`http`]: the shared HTTP client and its policy (retries, Retry-After, budgets, auth).
//! - [`connectors`]: one module per vendor: URLs and JSON.
//! - [`engine`]: what every stream shares: run records, commits, the daemon (schedules,
//!   signals, control files).
//! - [`streams`]: one room per stream kind: its run, its decisions, its online checks.
//! - [`clock`]: the "now" runs read (a debug build's tests may set it: `USHER_TEST_NOW`).
//! - [`cli`]: the subcommands.
#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod connectors;
pub mod engine;
pub mod http;
// S-360
pub mod jwt;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod progress;
// S-360
pub mod receiver;
pub mod schedule;
pub mod secret;
pub mod status;
pub mod store;
pub mod streams;
pub mod suggest;
