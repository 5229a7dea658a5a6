//! Configuration: figment layers → raw serde structs (`raw`) → validated [`Config`] (`build`).
//!
//! `usher run`, `usher validate` and every other command load through [`load`], so what
//! `validate` accepts is exactly what `run` runs. Loading never stops at the first problem:
//! it returns all of them, each naming the file, the stream or connection, and the key.
//!
//! A stream's kind and its options, raw and validated, are not here: `build.rs` reads the
//! keys every stream has and hands the rest to `streams::options`, which builds the kind
//! (`StreamKind`, one variant per kind, each kind's options in `streams/<kind>/options.rs`)
//! that [`StreamSpec`] carries. Those files stand on floors below this module and above
//! its lower files (`load`, `raw`, `values`, `connection`), so nothing goes round in a circle.

mod build;
// A connection as validated (below the stream kinds' options, which check a stream's ends).
pub(crate) mod connection;
// SeatGeek / Halo: the connections' checks.
mod halo;
// Reading a table with every problem (`Layers`), and each problem (`Problem`).
pub(crate) mod load;
// The tables as written, but a stream's (`streams::options::RawStream`).
pub(crate) mod raw;
// S-360
mod s360;
// Ticket Co x Airship
mod ticketco_airship;
// Integration settings, CM.com CDP and seats.io.
mod settings;
// Secrets, URLs, auth blocks, durations and GUIDs: below every table's code that reads them.
pub(crate) mod values;
pub use connection::{
    Connection, ConnectionKind, RateLimit, S360_RATE_LIMIT, S360_RATE_WINDOW, S360Account,
};
pub use settings::{
    CONFLICTS, CdpAccount, INTEGRATIONS, IntegrationState, SeatsioAccount, Settings,
    basic_user_only,
};
pub use values::{Auth, is_guid};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use load::Problem;
// S-360
pub use s360::{IpNet, ReceiverSettings, default_base_url, parse_size};

use crate::mapping::Mapping;
use crate::schedule::Schedule;
use crate::streams::options::StreamKind;

/// Where to look when no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/usher/usher.toml";

#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: DaemonSettings,
    /// Where /metrics and /healthz listen (loopback only); None = off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub log: LogSettings,
    pub connections: BTreeMap<String, Arc<Connection>>,
    pub streams: BTreeMap<String, Arc<StreamSpec>>,
    // S-360: where S-360's webhooks are received (absent: no receiver).
    pub receiver: Option<ReceiverSettings>,
    /// The files that were read, in merge order (for `validate` and the reload log line).
    pub files: Vec<PathBuf>,
    /// Things that are allowed but worth a look (e.g. a secret written inline).
    pub warnings: Vec<Problem>,
    /// Resellers, companies, integration states, and the CDP and seats.io accounts.
    pub settings: Settings,
}

#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub state_dir: PathBuf,
    pub control_poll: Duration,
    pub shutdown_timeout: Duration,
    pub max_concurrent_runs: u32,
    pub health_failures: u32,
    /// A write whose answer was not seen is in doubt until its deadline plus this margin:
    /// nothing looks its records up or sends them again before (see `engine::in_doubt`).
    pub settle_margin: Duration,
    /// The state on PostgreSQL (several instances), or None: SQLite in `state_dir`.
    pub postgres: Option<crate::store::pg::PgSettings>,
    /// How long a lease lasts without renewal (renewed at a third of it). PostgreSQL only.
    pub lease: Duration,
}

impl DaemonSettings {
    /// The state as the configuration says: PostgreSQL, or the SQLite file in `state_dir`.
    pub async fn open_store(&self) -> crate::store::Result<crate::store::Store> {
        match &self.postgres {
            Some(pg) => crate::store::Store::open_postgres(pg).await,
            None => crate::store::Store::open(&self.state_dir),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
    pub directory: Option<PathBuf>,
    pub file_prefix: String,
    /// Daily log files kept in `directory` (older ones are deleted at each rotation).
    pub keep_files: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecordPolicy {
    /// Set the record aside in `dead_letters` with its reason and go on.
    DeadLetter,
    /// Stop the stream before the record's page; the cursor stays where it was.
    Stop,
}

#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub name: String,
    pub enabled: bool,
    pub schedule: Schedule,
    pub source: String,
    pub entity: String,
    pub target: String,
    pub oldest: Option<DateTime<Utc>>,
    pub on_bad_record: BadRecordPolicy,
    pub page_size: u32,
    pub max_per_run: u32,
    pub max_per_payload: u32,
    pub institution: Option<String>,
    pub mapping: Mapping,
    pub matching: Vec<String>,
    pub kind: StreamKind,
}

/// How a load was asked for: the main file and whether `USHER_` variables apply.
#[derive(Debug, Clone)]
pub struct Source {
    pub main_file: PathBuf,
    pub env_overrides: bool,
    /// `--state-dir` on the command line wins over the file.
    pub state_dir_override: Option<PathBuf>,
    /// False for commands that only read the state (status, cursor, dead-letters): secrets
    /// are then neither read nor checked, so that a sysadmin's shell, which does not have the
    /// service's credentials, can still run them. `run`, `validate` and in-process runs read them.
    pub read_secrets: bool,
}

impl Source {
    pub fn new(main_file: impl AsRef<Path>) -> Self {
        Source {
            main_file: main_file.as_ref().to_path_buf(),
            env_overrides: true,
            state_dir_override: None,
            read_secrets: true,
        }
    }
}

/// Loads and validates. `Err` holds every problem found, in file order.
pub fn load(source: &Source) -> Result<Config, Vec<Problem>> {
    build::build(source, None)
}

/// The valid part of the configuration and every problem (none: as [`load`]). For `status`,
/// which shows the state also when the configuration has problems: they are what a sysadmin
/// is looking into when the state is wanted most.
pub fn load_partial(source: &Source) -> (Config, Vec<Problem>) {
    build::build_partial(source, None)
}

/// Like [`load`], with extra layers merged last (used by `usher-sandbox demo` to point the demo
/// config's connections at the sandbox's ports).
pub fn load_with(source: &Source, extra: figment::Figment) -> Result<Config, Vec<Problem>> {
    build::build(source, Some(extra))
}

impl Config {
    pub fn stream(&self, name: &str) -> Option<&Arc<StreamSpec>> {
        self.streams.get(name)
    }
}
