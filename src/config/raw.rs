//! The configuration exactly as written: every field optional, unknown keys refused.
//!
//! Nothing here is checked beyond its TOML type. Required keys, cross references,
//! secrets and value formats are checked by `build.rs`, which collects every problem.
//! Because every field is optional, a table can be deserialized one key at a time,
//! which is how `load.rs` reports every bad key of a table rather than the first.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Where the SQLite file, the lock and the control folder live.
    pub state_dir: Option<String>,
    /// How often the control folder is looked at (SIGUSR1 looks at once).
    pub control_poll: Option<String>,
    /// How long SIGTERM waits for runs to reach a committed point.
    pub shutdown_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    pub directory: Option<String>,
    pub file_prefix: Option<String>,
}

/// One connection, whatever its kind; `build.rs` refuses keys that the kind does not use.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnection {
    pub kind: Option<String>,
    pub base_url: Option<String>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_retries: Option<u32>,
    pub rate_limit: Option<RawRateLimit>,
    pub auth: Option<RawAuth>,
    // Vendor account fields (used by the vendor kinds).
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_secret_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub calls: Option<u32>,
    pub per: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<String>,
    pub token_env: Option<String>,
    pub header: Option<String>,
    pub key: Option<String>,
    pub key_file: Option<String>,
    pub key_env: Option<String>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_secret_env: Option<String>,
    pub scope: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub source: Option<String>,
    pub entity: Option<String>,
    pub target: Option<String>,
    pub enabled: Option<bool>,
    pub every: Option<String>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub jitter: Option<String>,
    pub oldest: Option<String>,
    pub on_bad_record: Option<String>,
    pub page_size: Option<u32>,
    pub max_per_run: Option<u32>,
    pub max_per_payload: Option<u32>,
    pub institution: Option<String>,
    pub mapping: Option<BTreeMap<String, String>>,
    #[serde(rename = "static")]
    pub statics: Option<BTreeMap<String, toml::Value>>,
    pub matching: Option<Vec<String>>,
    pub feed: Option<RawFeed>,
    pub webhook: Option<RawWebhook>,
    // SeatGeek / Halo: `[streams.X.halo]`, see config/halo.rs.
    pub halo: Option<super::halo::RawHalo>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeed {
    pub path: Option<String>,
    pub cursor_param: Option<String>,
    pub limit_param: Option<String>,
    pub items: Option<String>,
    pub next_cursor: Option<String>,
    pub has_more: Option<String>,
    pub id: Option<String>,
    pub changed_at: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: Option<String>,
    pub accepted_statuses: Option<Vec<u16>>,
}
