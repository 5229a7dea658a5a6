//! Configuration: figment layers → raw serde structs (`raw`) → validated [`Config`] (`build`).
//!
//! `usher run`, `usher validate` and every other command load through [`load`], so what
//! `validate` accepts is exactly what `run` runs. Loading never stops at the first problem:
//! it returns all of them, each naming the file, the stream or connection, and the key.

mod build;
// SeatGeek / Halo
pub mod halo;
mod load;
mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use url::Url;

pub use build::expand;
pub use load::Problem;

use crate::mapping::Mapping;
use crate::schedule::Schedule;
use crate::secret::Secret;

/// Where to look when no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/usher/usher.toml";

#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: DaemonSettings,
    pub log: LogSettings,
    pub connections: BTreeMap<String, Arc<Connection>>,
    pub streams: BTreeMap<String, Arc<StreamSpec>>,
    /// The files that were read, in merge order (for `validate` and the reload log line).
    pub files: Vec<PathBuf>,
    /// Things that are allowed but worth a look (e.g. a secret written inline).
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub state_dir: PathBuf,
    pub control_poll: Duration,
    pub shutdown_timeout: Duration,
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
}

#[derive(Debug, Clone)]
pub struct Connection {
    pub name: String,
    pub kind: ConnectionKind,
    pub base_url: Url,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts after the first for retryable failures (5xx, resets, timeouts).
    pub max_retries: u32,
    pub rate_limit: Option<RateLimit>,
    pub auth: Auth,
    // SeatGeek / Halo: the Halo tenant (the token call's `tenant`); None for other kinds.
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A generic HTTP CRM: cursor feed source and webhook target (vendor-apis "ExtCRM").
    Crm,
    // SeatGeek / Halo
    /// SeatGeek's partner feed of user change events (source).
    SeatGeek,
    /// Halo PSA/ITSM users (target).
    Halo,
    // end SeatGeek / Halo
}

impl ConnectionKind {
    pub const NAMES: &'static [&'static str] = &["crm", "seatgeek", "halo"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crm" => Some(ConnectionKind::Crm),
            // SeatGeek / Halo
            "seatgeek" => Some(ConnectionKind::SeatGeek),
            "halo" => Some(ConnectionKind::Halo),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Crm => "crm",
            // SeatGeek / Halo
            ConnectionKind::SeatGeek => "seatgeek",
            ConnectionKind::Halo => "halo",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u32,
    pub per: Duration,
}

#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
    ApiKey {
        header: String,
        key: Secret,
    },
    OAuth2 {
        token_url: Url,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
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

#[derive(Debug, Clone)]
pub enum StreamKind {
    FeedToWebhook {
        feed: FeedOptions,
        webhook: WebhookOptions,
    },
    // SeatGeek / Halo
    /// SeatGeek user change events → Halo users (`engine::seatgeek_halo`).
    SeatGeekToHalo(crate::config::halo::HaloOptions),
}

#[derive(Debug, Clone)]
pub struct FeedOptions {
    pub path: String,
    pub cursor_param: String,
    pub limit_param: Option<String>,
    pub items: String,
    pub next_cursor: String,
    pub has_more: String,
    pub id: String,
    pub changed_at: String,
}

#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub url: String,
    pub accepted_statuses: Vec<u16>,
}

/// How a load was asked for: the main file and whether `USHER_` variables apply.
#[derive(Debug, Clone)]
pub struct Source {
    pub main_file: PathBuf,
    pub env_overrides: bool,
    /// `--state-dir` on the command line wins over the file.
    pub state_dir_override: Option<PathBuf>,
}

impl Source {
    pub fn new(main_file: impl AsRef<Path>) -> Self {
        Source {
            main_file: main_file.as_ref().to_path_buf(),
            env_overrides: true,
            state_dir_override: None,
        }
    }
}

/// Loads and validates. `Err` holds every problem found, in file order.
pub fn load(source: &Source) -> Result<Config, Vec<Problem>> {
    build::build(source, None)
}

/// Like [`load`], with extra layers merged last (used by `usher demo` to point the demo
/// config's connections at the sandbox's ports).
pub fn load_with(source: &Source, extra: figment::Figment) -> Result<Config, Vec<Problem>> {
    build::build(source, Some(extra))
}

impl Config {
    pub fn stream(&self, name: &str) -> Option<&Arc<StreamSpec>> {
        self.streams.get(name)
    }
}
