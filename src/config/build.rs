//! The validation pass: raw structs → [`Config`], collecting every problem on the way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use figment::Figment;

use super::load::{Layers, Problem, layers};
use super::raw::*;
use super::values::{build_auth, duration, secret, url};
use super::*;
use crate::mapping::Mapping;
use crate::schedule::{Schedule, parse_duration, parse_tz};
use crate::streams::options::{self, RawStream, StreamKind};

const TOP_LEVEL: &[&str] = &[
    "daemon",
    "log",
    "metrics",
    "connections",
    "streams",
    // S-360
    "receiver",
    // Integration settings (settings.rs).
    "resellers",
    "companies",
];

pub(super) fn build(source: &Source, extra: Option<Figment>) -> Result<Config, Vec<Problem>> {
    let (config, problems) = build_partial(source, extra);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// The valid part of the configuration (the streams and connections without problems) and
/// every problem found.
pub(super) fn build_partial(source: &Source, extra: Option<Figment>) -> (Config, Vec<Problem>) {
    let mut l = layers(&source.main_file, source.env_overrides);
    l.read_secrets = source.read_secrets;
    if let Some(extra) = extra {
        l.figment = l.figment.merge(extra);
    }
    // Integration settings: shared reseller credentials and vendor default URLs (settings.rs).
    super::settings::prepare(&mut l);
    let config_dir = l
        .main_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut warnings = Vec::new();

    let top: Vec<String> = l.root().keys().cloned().collect();
    for key in &top {
        if !TOP_LEVEL.contains(&key.as_str()) {
            l.problem(
                "config",
                key,
                format!(
                    "unknown section `{key}`{} (known: {})",
                    crate::suggest::did_you_mean(key, TOP_LEVEL),
                    TOP_LEVEL.join(", ")
                ),
            );
        }
    }

    let daemon = build_daemon(&mut l, source, &config_dir, &mut warnings);
    let log = build_log(&mut l);
    let metrics_listen = build_metrics(&mut l);
    // S-360
    let receiver = super::s360::build_receiver(&mut l);

    let mut connections = BTreeMap::new();
    for name in names(&mut l, "connections") {
        if let Some(c) = build_connection(&mut l, &name, &config_dir, &mut warnings) {
            connections.insert(name, Arc::new(c));
        }
    }
    let mut streams = BTreeMap::new();
    let mut all_stream_names = Vec::new();
    for name in names(&mut l, "streams") {
        all_stream_names.push(name.clone());
        if let Some(s) = build_stream(&mut l, &name, &connections, &config_dir, &mut warnings) {
            streams.insert(name, Arc::new(s));
        }
    }
    // S-360
    super::s360::check_receiver(&mut l, receiver.as_ref(), &connections, &streams);
    // Integration settings: resellers, companies, flags, conflicts, toggles (settings.rs).
    let settings = super::settings::apply(
        &mut l,
        &mut connections,
        &mut streams,
        &config_dir,
        &mut warnings,
    );

    let config = Config {
        daemon,
        metrics_listen,
        log,
        connections,
        streams,
        receiver,
        files: l.files,
        warnings,
        settings,
    };
    (config, l.problems)
}

/// The names of the entries of a `[section.NAME]` table, checked for a usable spelling.
fn names(l: &mut Layers, section: &str) -> Vec<String> {
    let Some(value) = l.value(section) else {
        return Vec::new();
    };
    let Some(dict) = value.as_dict() else {
        l.problem(
            "config",
            section,
            format!("`{section}` must be a table of named entries"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in dict.keys() {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            out.push(name.clone());
        } else {
            l.problem(
                &format!("{} \"{name}\"", singular(section)),
                &format!("{section}.{name}"),
                "a name may hold only letters, digits, `-` and `_` (at most 64)",
            );
        }
    }
    out
}

fn singular(section: &str) -> &str {
    section.strip_suffix('s').unwrap_or(section)
}

/// How long past its own timeout a write that went unanswered is still treated as in
/// doubt. usher's timeout bounds its side of a request; a vendor may still apply a request
/// it already holds a moment later (its own queue, its database commit, a proxy in front).
/// 5 s covers that for the vendors here at the cost of at most 5 s more of waiting, and only
/// after a write went unanswered.
pub const DEFAULT_SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// A lease lasts this long without renewal; the holder renews at a third of it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

fn build_daemon(
    l: &mut Layers,
    source: &Source,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> DaemonSettings {
    let raw: RawDaemon = l.table("daemon", "daemon").unwrap_or_default();
    let state_dir = source
        .state_dir_override
        .clone()
        .or_else(|| raw.state_dir.as_ref().map(PathBuf::from))
        .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/usher"));
    let control_poll = duration(
        l,
        "daemon",
        "daemon.control_poll",
        raw.control_poll.as_ref(),
        Duration::from_secs(2),
    );
    let shutdown_timeout = duration(
        l,
        "daemon",
        "daemon.shutdown_timeout",
        raw.shutdown_timeout.as_ref(),
        Duration::from_secs(60),
    );
    let max_concurrent_runs = match raw.max_concurrent_runs {
        None => 16,
        Some(n) if (1..=1024).contains(&n) => n,
        Some(n) => {
            l.problem(
                "daemon",
                "daemon.max_concurrent_runs",
                format!("{n} is out of range (1 to 1024)"),
            );
            16
        }
    };
    let health_failures = match raw.health_failures {
        None => 3,
        Some(0) => {
            l.problem("daemon", "daemon.health_failures", "must be at least 1");
            3
        }
        Some(n) => n,
    };
    let settle_margin = duration(
        l,
        "daemon",
        "daemon.settle_margin",
        raw.settle_margin.as_ref(),
        DEFAULT_SETTLE_MARGIN,
    );
    let postgres = match raw.state.as_deref().map(str::trim) {
        None | Some("") | Some("sqlite") => {
            for (k, set) in [
                ("state_password", raw.state_password.is_some()),
                ("state_password_file", raw.state_password_file.is_some()),
                ("state_password_env", raw.state_password_env.is_some()),
            ] {
                if set {
                    l.problem(
                        "daemon",
                        &format!("daemon.{k}"),
                        "only for a PostgreSQL state (`daemon.state = \"postgres://…\"`)",
                    );
                }
            }
            None
        }
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let parsed = url::Url::parse(url);
            match &parsed {
                Err(e) => {
                    l.problem(
                        "daemon",
                        "daemon.state",
                        format!(
                            "{} is not a URL: {e} (example: \"postgres://usher@db.example/usher\")",
                            crate::store::pg::redact_url(url)
                        ),
                    );
                    None
                }
                Ok(u) if u.password().is_some() => {
                    l.problem(
                        "daemon",
                        "daemon.state",
                        "the URL holds a password: move it to `state_password_file` (a file, e.g. from systemd's LoadCredential) or `state_password_env`",
                    );
                    None
                }
                Ok(_) => {
                    // The state's password is read even for the commands that read no other
                    // secret (`status`, `cursor`): without it there is no state to show.
                    let read = l.read_secrets;
                    l.read_secrets = true;
                    let any = raw.state_password.is_some()
                        || raw.state_password_file.is_some()
                        || raw.state_password_env.is_some();
                    let password = if any {
                        secret(
                            l,
                            "daemon",
                            "daemon",
                            "state_password",
                            raw.state_password.as_ref(),
                            raw.state_password_file.as_ref(),
                            raw.state_password_env.as_ref(),
                            config_dir,
                            warnings,
                        )
                    } else {
                        None // trust or peer authentication, or ~/.pgpass is not read
                    };
                    l.read_secrets = read;
                    Some(crate::store::pg::PgSettings {
                        url: url.to_string(),
                        password,
                    })
                }
            }
        }
        Some(other) => {
            l.problem(
                "daemon",
                "daemon.state",
                format!(
                    "{:?} is neither \"sqlite\" nor a postgres:// URL",
                    crate::store::pg::redact_url(other)
                ),
            );
            None
        }
    };
    let lease = duration(
        l,
        "daemon",
        "daemon.lease",
        raw.lease.as_ref(),
        DEFAULT_LEASE,
    );
    if lease < Duration::from_secs(3) {
        l.problem("daemon", "daemon.lease", "must be at least 3s");
    }
    DaemonSettings {
        state_dir,
        control_poll,
        shutdown_timeout,
        max_concurrent_runs,
        health_failures,
        settle_margin,
        postgres,
        lease,
    }
}

fn build_metrics(l: &mut Layers) -> Option<std::net::SocketAddr> {
    let raw: RawMetrics = l.table("metrics", "metrics").unwrap_or_default();
    let text = raw.listen?;
    match text.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_loopback() => Some(a),
        Ok(_) => {
            l.problem(
                "metrics",
                "metrics.listen",
                format!("{text:?} is not a loopback address (metrics are served on 127.0.0.1 or [::1] only)"),
            );
            None
        }
        Err(_) => {
            l.problem(
                "metrics",
                "metrics.listen",
                format!("{text:?} is not an address such as \"127.0.0.1:9187\""),
            );
            None
        }
    }
}

fn build_log(l: &mut Layers) -> LogSettings {
    let raw: RawLog = l.table("log", "log").unwrap_or_default();
    let format = match raw.format.as_deref() {
        None | Some("auto") => LogFormat::Auto,
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            l.problem(
                "log",
                "log.format",
                format!("unknown format {other:?} (auto, text or json)"),
            );
            LogFormat::Auto
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".into());
    let is_level = |t: &str| {
        ["off", "error", "warn", "info", "debug", "trace"]
            .contains(&t.trim().to_ascii_lowercase().as_str())
    };
    let directives_ok = level.split(',').all(|d| match d.split_once('=') {
        Some((target, lvl)) => !target.trim().is_empty() && is_level(lvl),
        None => is_level(d),
    });
    if !directives_ok || tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        l.problem(
            "log",
            "log.level",
            format!("invalid level {level:?} (error, warn, info, debug, trace, or a filter like \"usher=debug\")"),
        );
    }
    LogSettings {
        level,
        format,
        directory: raw.directory.map(PathBuf::from),
        file_prefix: raw.file_prefix.unwrap_or_else(|| "usher.log".into()),
        keep_files: match raw.keep_files {
            None => 14,
            Some(0) => {
                l.problem(
                    "log",
                    "log.keep_files",
                    "must be at least 1 (the number of daily log files kept)",
                );
                14
            }
            Some(n) => n,
        },
    }
}

fn build_connection(
    l: &mut Layers,
    name: &str,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<Connection> {
    let scope = format!("connection \"{name}\"");
    let prefix = format!("connections.{name}");
    let before = l.problems.len();
    let raw: RawConnection = l.table(&scope, &prefix)?;
    let kind = match raw.kind.as_deref() {
        None => {
            l.problem(
                &scope,
                &format!("{prefix}.kind"),
                format!(
                    "missing key `kind` (one of: {})",
                    ConnectionKind::NAMES.join(", ")
                ),
            );
            None
        }
        Some(k) => match ConnectionKind::parse(k) {
            Some(k) => Some(k),
            None => {
                l.problem(
                    &scope,
                    &format!("{prefix}.kind"),
                    format!(
                        "unknown kind {k:?}{} (one of: {})",
                        crate::suggest::did_you_mean(k, ConnectionKind::NAMES),
                        ConnectionKind::NAMES.join(", ")
                    ),
                );
                None
            }
        },
    };
    let base_url = match &raw.base_url {
        // S-360: the instance's documented host (checked with the account below).
        None if kind == Some(ConnectionKind::S360) => raw
            .institution
            .as_deref()
            .and_then(super::s360::default_base_url),
        None => {
            l.problem(
                &scope,
                &format!("{prefix}.base_url"),
                "missing key `base_url`",
            );
            None
        }
        Some(u) => url(l, &scope, &format!("{prefix}.base_url"), u),
    };
    let timeout = duration(
        l,
        &scope,
        &format!("{prefix}.timeout"),
        raw.timeout.as_ref(),
        Duration::from_secs(30),
    );
    let connect_timeout = duration(
        l,
        &scope,
        &format!("{prefix}.connect_timeout"),
        raw.connect_timeout.as_ref(),
        Duration::from_secs(10),
    );
    let default_rate_limit = match kind {
        // S-360
        Some(ConnectionKind::S360) => Some(super::S360_RATE_LIMIT),
        _ => None,
    };
    let rate_limit = raw.rate_limit.as_ref().map_or(default_rate_limit, |r| {
        let calls = match r.calls {
            Some(0) | None => {
                l.problem(
                    &scope,
                    &format!("{prefix}.rate_limit.calls"),
                    "`calls` must be a whole number above 0",
                );
                return None;
            }
            Some(c) => c,
        };
        let per = duration(
            l,
            &scope,
            &format!("{prefix}.rate_limit.per"),
            r.per.as_ref(),
            Duration::from_secs(60),
        );
        Some(RateLimit { calls, per })
    });
    // Keys that belong to vendor kinds not in use here.
    if kind == Some(ConnectionKind::Crm) {
        for (key, set) in [
            ("tenant", raw.tenant.is_some()),
            ("client_id", raw.client_id.is_some()),
            ("client_secret", raw.client_secret.is_some()),
            ("client_secret_file", raw.client_secret_file.is_some()),
            ("client_secret_env", raw.client_secret_env.is_some()),
        ] {
            if set {
                l.problem(
                    &scope,
                    &format!("{prefix}.{key}"),
                    format!("`{key}` does not apply to a connection of kind crm (put credentials under `auth`)"),
                );
            }
        }
    }
    // Ticket Co x Airship
    let (api_token, account_id, ta_auth) = super::ticketco_airship::connection_fields(
        l, &scope, &prefix, kind, &raw, config_dir, warnings,
    );
    // SeatGeek / Halo: OAuth2 client credentials from `client_id` + `client_secret`.
    let halo_auth = match kind {
        Some(k @ (ConnectionKind::SeatGeek | ConnectionKind::Halo)) => super::halo::vendor_auth(
            l,
            &scope,
            &prefix,
            k,
            &raw,
            base_url.as_ref(),
            config_dir,
            warnings,
        ),
        _ => None,
    };
    // end SeatGeek / Halo
    let vendor_auth = ta_auth.or(halo_auth);
    let auth = match &raw.auth {
        None if vendor_auth.is_some() => vendor_auth.unwrap_or(Auth::None),
        None => Auth::None,
        Some(a) => build_auth(
            l,
            &scope,
            &format!("{prefix}.auth"),
            a,
            config_dir,
            warnings,
        )
        .unwrap_or(Auth::None),
    };
    // S-360
    let s360 = super::s360::connection_fields(l, &scope, &prefix, kind, &raw, config_dir, warnings);
    if l.problems.len() != before {
        return None;
    }
    Some(Connection {
        name: name.to_string(),
        kind: kind?,
        base_url: base_url?,
        timeout,
        connect_timeout,
        max_retries: raw.max_retries.unwrap_or(5),
        rate_limit,
        auth,
        s360,
        // Ticket Co x Airship
        api_token,
        account_id,
        // SeatGeek / Halo
        tenant: raw
            .tenant
            .clone()
            .filter(|_| kind == Some(ConnectionKind::Halo)),
    })
}

fn parse_oldest(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn build_stream(
    l: &mut Layers,
    name: &str,
    connections: &BTreeMap<String, Arc<Connection>>,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<StreamSpec> {
    let scope = format!("stream \"{name}\"");
    let prefix = format!("streams.{name}");
    let before = l.problems.len();
    let raw: RawStream = l.table(&scope, &prefix)?;
    let key = |k: &str| format!("{prefix}.{k}");

    // A connection that exists but failed validation has its problems reported already;
    // the stream's checks that depend on its kind are then skipped (`broken`), so that one
    // bad secret file is one problem, not that plus what the stream would need without it.
    let mut broken = false;
    let mut connection =
        |l: &mut Layers, which: &str, v: &Option<String>| -> Option<Arc<Connection>> {
            match v {
                None => {
                    l.problem(
                        &scope,
                        &key(which),
                        format!("missing key `{which}` (a connection name)"),
                    );
                    None
                }
                Some(c) => match connections.get(c) {
                    Some(conn) => Some(conn.clone()),
                    None => {
                        if l.figment.find_value(&format!("connections.{c}")).is_err() {
                            let known: Vec<String> = l
                                .figment
                                .find_value("connections")
                                .ok()
                                .and_then(|v| v.into_dict())
                                .map(|d| d.keys().cloned().collect())
                                .unwrap_or_default();
                            let near = crate::suggest::did_you_mean(c, &known);
                            let known = if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            };
                            l.problem(
                                &scope,
                                &key(which),
                                format!("unknown connection {c:?}{near} (defined: {known})"),
                            );
                        } else {
                            broken = true;
                        }
                        None
                    }
                },
            }
        };
    let source = connection(l, "source", &raw.source);
    let target = connection(l, "target", &raw.target);
    // The kind of each end, also when its connection is broken (as written).
    let kind_of = |l: &Layers, built: &Option<Arc<Connection>>, name: &Option<String>| {
        built.as_ref().map(|c| c.kind).or_else(|| {
            let name = name.as_ref()?;
            l.figment
                .find_value(&format!("connections.{name}.kind"))
                .ok()
                .and_then(|v| v.into_string())
                .and_then(|k| ConnectionKind::parse(&k))
        })
    };
    let source_kind = kind_of(l, &source, &raw.source);
    let target_kind = kind_of(l, &target, &raw.target);

    // What the kind fills in for the keys every stream has: a zone of its own, a default
    // schedule and entity (Ticket Co → Airship: the venues' zone, required).
    let defaults = options::KindDefaults::of(
        l,
        &scope,
        &prefix,
        source_kind,
        target_kind,
        raw.timezone.as_deref(),
    );

    // Schedule.
    let jitter = raw.jitter.as_ref().map(|j| match parse_duration(j) {
        Ok(d) => d,
        Err(e) => {
            l.problem(&scope, &key("jitter"), e.to_string());
            Duration::ZERO
        }
    });
    let schedule = match (&raw.every, &raw.cron) {
        (Some(_), Some(_)) => {
            l.problem(
                &scope,
                &key("cron"),
                "set either `every` or `cron`, not both",
            );
            None
        }
        // The kind's own schedule (Ticket Co → Airship: daily at 03:00 in the venues' zone).
        (None, None) if defaults.cron.is_some() => defaults
            .zone
            .flatten()
            .zip(defaults.cron)
            .and_then(|(tz, cron)| Schedule::cron(cron, tz).ok()),
        (None, None) => {
            l.problem(
                &scope,
                &key("every"),
                "missing schedule: set `every = \"15m\"` or `cron = \"0 3 * * *\"`",
            );
            None
        }
        (Some(every), None) => {
            // (The `timezone` of a kind with a zone of its own is that zone, whatever its
            // schedule: Ticket Co → Airship's venues'.)
            if raw.timezone.is_some() && defaults.zone.is_none() {
                l.problem(
                    &scope,
                    &key("timezone"),
                    "`timezone` applies to `cron` schedules only",
                );
            }
            let default_jitter = parse_duration(every)
                .map(|p| (p / 10).min(Duration::from_secs(300)))
                .unwrap_or_default();
            match Schedule::every(every, jitter.unwrap_or(default_jitter), name) {
                Ok(s) => Some(s),
                Err(e) => {
                    l.problem(&scope, &key("every"), e.to_string());
                    None
                }
            }
        }
        (None, Some(cron)) => {
            let tz = match (defaults.zone, raw.timezone.as_deref()) {
                // Required and checked above.
                (Some(zone), _) => zone,
                (None, None) => Some(chrono_tz::Tz::UTC),
                (None, Some(t)) => match parse_tz(t) {
                    Ok(tz) => Some(tz),
                    Err(e) => {
                        l.problem(&scope, &key("timezone"), e.to_string());
                        None
                    }
                },
            };
            match tz.map(|tz| Schedule::cron(cron, tz)) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    l.problem(&scope, &key("cron"), e.to_string());
                    None
                }
                None => None,
            }
        }
    };

    let oldest = raw.oldest.as_ref().and_then(|o| {
        let t = parse_oldest(o);
        if t.is_none() {
            l.problem(
                &scope,
                &key("oldest"),
                format!("{o:?} is not a date (YYYY-MM-DD) or an RFC 3339 date-time"),
            );
        }
        t
    });
    let on_bad_record = match raw.on_bad_record.as_deref() {
        None | Some("dead_letter") => BadRecordPolicy::DeadLetter,
        Some("stop") => BadRecordPolicy::Stop,
        Some(other) => {
            l.problem(
                &scope,
                &key("on_bad_record"),
                format!(
                    "{other:?} is neither \"dead_letter\" nor \"stop\"{}",
                    crate::suggest::did_you_mean(other, &["dead_letter", "stop"])
                ),
            );
            BadRecordPolicy::DeadLetter
        }
    };
    let limit = |l: &mut Layers, k: &str, v: Option<u32>, default: u32, max: u32| -> u32 {
        match v {
            None => default,
            Some(n) if n >= 1 && n <= max => n,
            Some(n) => {
                l.problem(&scope, &key(k), format!("{n} is out of range (1 to {max})"));
                default
            }
        }
    };
    let page_size = limit(l, "page_size", raw.page_size, 100, 1000);
    let max_per_run = limit(l, "max_per_run", raw.max_per_run, 500, 1_000_000);
    // Unwritten, a payload is at most a run.
    let max_per_payload = limit(
        l,
        "max_per_payload",
        raw.max_per_payload,
        50.min(max_per_run),
        10_000,
    );

    let mut mapping = Mapping::default();
    for (target_field, expr) in raw.mapping.iter().flatten() {
        match Mapping::parse_field(target_field, expr) {
            Ok(f) => mapping.fields.push(f),
            Err(e) => l.problem(&scope, &key(&format!("mapping.{target_field}")), e),
        }
    }
    for (target_field, v) in raw.statics.iter().flatten() {
        match serde_json::to_value(v) {
            Ok(v) => mapping.statics.push((target_field.clone(), v)),
            Err(e) => l.problem(
                &scope,
                &key(&format!("static.{target_field}")),
                e.to_string(),
            ),
        }
    }

    // S-360: a stream from S-360 takes its institution from the connection by default.
    let institution = raw.institution.clone().or_else(|| {
        source
            .as_ref()
            .and_then(|s| s.s360.as_ref())
            .map(|a| a.institution.clone())
    });
    // The kind: what its source reads and its target writes, each checked on its own (also
    // with a connection broken), then, with both ends sound, the kind they make and its
    // options (streams/options.rs, which holds each kind's table as written and its variant).
    let stream = options::Stream {
        name,
        scope: &scope,
        prefix: &prefix,
        raw: &raw,
        source: source.as_deref(),
        target: target.as_deref(),
        source_kind,
        target_kind,
        institution: institution.as_deref(),
        max_per_payload,
        zone: defaults.zone.flatten(),
    };
    let ends = options::Ends::build(l, &stream);
    if raw.max_per_payload.is_some() && max_per_payload > max_per_run {
        l.problem(
            &scope,
            &key("max_per_payload"),
            format!(
                "max_per_payload ({max_per_payload}) is larger than max_per_run ({max_per_run})"
            ),
        );
    }
    // The rest depends on what the connections are: not checked with one of them broken.
    if broken {
        if raw.entity.is_none() && defaults.entity.is_none() {
            l.problem(
                &scope,
                &key("entity"),
                "missing key `entity` (what the source reads, e.g. \"contact\")",
            );
        }
        options::check_own_secrets(l, &stream, config_dir, warnings);
        return None;
    }
    let kind = options::build(l, &stream, ends, &mut mapping, config_dir, warnings);
    let mut raw = raw;
    if let Some(entity) = defaults.entity {
        raw.entity.get_or_insert_with(|| entity.into());
    }
    if let Some(k) = &kind {
        unused_keys(l, &scope, &prefix, &raw, k);
    }
    if raw.entity.is_none() {
        l.problem(
            &scope,
            &key("entity"),
            "missing key `entity` (what the source reads, e.g. \"contact\")",
        );
    }
    if l.problems.len() != before {
        return None;
    }
    Some(StreamSpec {
        name: name.to_string(),
        enabled: raw.enabled.unwrap_or(true),
        schedule: schedule?,
        source: raw.source?,
        entity: raw.entity?,
        target: raw.target?,
        oldest,
        on_bad_record,
        page_size,
        max_per_run,
        max_per_payload,
        institution,
        mapping,
        matching: raw.matching.unwrap_or_default(),
        kind: kind?,
    })
}

fn unused_keys(l: &mut Layers, scope: &str, prefix: &str, raw: &RawStream, kind: &StreamKind) {
    let written = [
        ("page_size", raw.page_size.is_some()),
        ("max_per_run", raw.max_per_run.is_some()),
        ("max_per_payload", raw.max_per_payload.is_some()),
        ("oldest", raw.oldest.is_some()),
        ("on_bad_record", raw.on_bad_record.is_some()),
        ("matching", raw.matching.is_some()),
        ("mapping", raw.mapping.is_some()),
        ("static", raw.statics.is_some()),
        ("institution", raw.institution.is_some()),
    ];
    let (name, unused) = kind.unused_keys();
    for (k, set) in written {
        if set && unused.contains(&k) {
            l.problem(
                scope,
                &format!("{prefix}.{k}"),
                format!("`{k}` does not apply to a {name} stream (its runs do not read it)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::value::{Dict, Tag, Value};
    use serde::de::DeserializeOwned;
    use std::collections::BTreeSet;

    /// The keys `T` knows at `path` (a table inside it), as its unknown-key error lists them;
    /// None when `path` is not a table of named keys (a value, or a map of any keys).
    fn keys_at<T: DeserializeOwned>(path: &[String]) -> Option<Vec<String>> {
        let mut v = Dict::new();
        v.insert("zz_probe".into(), Value::from(1));
        let mut v = Value::Dict(Tag::Default, v);
        for p in path.iter().rev() {
            let mut d = Dict::new();
            d.insert(p.clone(), v);
            v = Value::Dict(Tag::Default, d);
        }
        let err = v.deserialize::<T>().err()?;
        err.into_iter().find_map(|e| match e.kind {
            figment::error::Kind::UnknownField(_, known) => {
                Some(known.iter().map(|k| k.to_string()).collect())
            }
            _ => None,
        })
    }

    /// Every dotted key below `prefix` that `T` knows.
    fn every_key<T: DeserializeOwned>(prefix: &str, path: Vec<String>, out: &mut BTreeSet<String>) {
        for k in keys_at::<T>(&path).unwrap_or_default() {
            out.insert(format!("{prefix}.{k}"));
            let mut deeper = path.clone();
            deeper.push(k.clone());
            every_key::<T>(&format!("{prefix}.{k}"), deeper, out);
        }
    }

    /// Every key the loader knows, from the raw types (the same lists that make an unknown
    /// key an error), with `NAME` for the names a sysadmin chooses.
    fn known_keys() -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        every_key::<RawDaemon>("daemon", vec![], &mut out);
        every_key::<RawLog>("log", vec![], &mut out);
        every_key::<RawMetrics>("metrics", vec![], &mut out);
        every_key::<super::super::s360::RawReceiver>("receiver", vec![], &mut out);
        every_key::<RawConnection>("connections.NAME", vec![], &mut out);
        every_key::<RawStream>("streams.NAME", vec![], &mut out);
        every_key::<super::super::settings::RawReseller>("resellers.NAME", vec![], &mut out);
        every_key::<super::super::settings::RawCompany>("companies.NAME", vec![], &mut out);
        for top in TOP_LEVEL {
            assert!(
                out.iter().any(|k| k.starts_with(&format!("{top}."))),
                "{top}"
            );
        }
        out
    }

    #[test]
    fn the_example_config_shows_every_key_the_loader_knows() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/usher.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let keys = known_keys();
        assert!(keys.contains("streams.NAME.halo.batch_size"), "{keys:?}");
        assert!(keys.contains("connections.NAME.auth.type"), "{keys:?}");
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| {
                let last = k.rsplit('.').next().unwrap_or(k);
                // Written as a key (`last =`), or as a table (`[….last]`).
                !(text.contains(&format!("{last} ="))
                    || text.contains(&format!(".{last}]"))
                    || text.contains(&format!(".{last}."))
                    || text.contains(&format!("[{last}]")))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "config/usher.toml shows no example of: {missing:?}"
        );
    }
}
