//! The configuration exactly as written: every field optional, unknown keys refused. A
//! stream's table, `[streams.X]`, is `streams::options::RawStream` (each kind's part of it
//! is in that kind's folder); the rest is here.
//!
//! Nothing here is checked beyond its TOML type. Required keys, cross references,
//! secrets and value formats are checked by `build.rs`, which collects every problem.
//! Because every field is optional, a table can be deserialized one key at a time,
//! which is how `load.rs` reports every bad key of a table rather than the first.

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
    /// How many runs may go at once (the rest wait their turn).
    pub max_concurrent_runs: Option<u32>,
    /// Consecutive failed runs of a stream before /healthz says unhealthy.
    pub health_failures: Option<u32>,
    /// How long past a write's own timeout it is still treated as in doubt.
    pub settle_margin: Option<String>,
    /// Where the state lives: absent = SQLite in `state_dir`; `postgres://user@host/db`
    /// for several instances on one PostgreSQL.
    pub state: Option<String>,
    pub state_password: Option<String>,
    pub state_password_file: Option<String>,
    pub state_password_env: Option<String>,
    /// How long a stream's lease lasts without renewal (PostgreSQL only).
    pub lease: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Loopback address for /metrics and /healthz; absent = off.
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    pub directory: Option<String>,
    pub file_prefix: Option<String>,
    pub keep_files: Option<u32>,
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
    // S-360: the instance and the JWT's claims and key (see config/s360.rs).
    pub institution: Option<String>,
    pub virtual_operator: Option<String>,
    pub partner_name: Option<String>,
    pub partner_secret: Option<String>,
    pub partner_secret_file: Option<String>,
    pub partner_secret_env: Option<String>,
    // Ticket Co x Airship
    pub api_token: Option<String>,
    pub api_token_file: Option<String>,
    pub api_token_env: Option<String>,
    pub access_token: Option<String>,
    pub access_token_file: Option<String>,
    pub access_token_env: Option<String>,
    pub account_id: Option<i64>,
    // Integration settings, CM.com CDP and seats.io (config/settings.rs).
    /// The company this connection belongs to (`[companies.NAME]`).
    pub company: Option<String>,
    /// "reseller": keys not written here come from `[resellers.R.credentials.<kind>]`.
    pub credentials_from: Option<String>,
    pub product_token: Option<String>,
    pub product_token_file: Option<String>,
    pub product_token_env: Option<String>,
    pub tenant_guid: Option<String>,
    pub region: Option<String>,
    pub secret_key: Option<String>,
    pub secret_key_file: Option<String>,
    pub secret_key_env: Option<String>,
    pub admin_key: Option<String>,
    pub admin_key_file: Option<String>,
    pub admin_key_env: Option<String>,
    pub workspace_key: Option<String>,
    // End of integration settings, CDP and seats.io.
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
