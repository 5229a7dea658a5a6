//! Metrics and health: process-wide counters that the engine and `http` bump, served with
//! the database's gauges on a loopback port (`[metrics] listen`), plus `/healthz`.
//!
//! The counters are global (like a Prometheus default registry) so that recording a number
//! never needs a handle threaded through every call. The exposition is prometheus-client's
//! (OpenMetrics text): long-lived families for what only grows (runs by outcome, run
//! durations, vendor requests by status class, waits), and a registry built per scrape for
//! what is read at that moment (the database's gauges, /proc).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use chrono::{DateTime, Utc};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;

/// The media type of [`Registry::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value, escaped for the text format (prometheus-client writes values as given,
/// and a stream's name is whatever the configuration's key says).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Label(pub String);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&esc(&self.0))
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label(s.to_string())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    stream: Label,
    outcome: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabel {
    connection: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    connection: Label,
    /// `2xx` … `5xx`, or `error` (no answer: connect, timeout, reset).
    class: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitLabels {
    /// The rate budget's key: the connection's name (S-360: one budget per institution).
    connection: Label,
    reason: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: Label,
}

/// Why a call waited before it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The vendor's `Retry-After` (after a 429/509), in this process or saved by another.
    RetryAfter,
    /// The connection's own rate budget (`rate_limit`) was spent for the window.
    RateBudget,
}

impl Wait {
    fn as_str(self) -> &'static str {
        match self {
            Wait::RetryAfter => "retry_after",
            Wait::RateBudget => "rate_budget",
        }
    }
}

/// Run durations: from a quiet tick (well under a second) to a first import (an hour).
fn run_histogram() -> Histogram {
    Histogram::new([0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0])
}

#[derive(Debug, Default, Clone)]
pub struct StreamMetrics {
    pub pulled: u64,
    pub created: u64,
    pub updated: u64,
    pub skipped: u64,
    pub failed: u64,
    pub runs_ok: u64,
    pub runs_failed: u64,
    pub last_run_seconds: f64,
    pub last_success: Option<i64>,
    /// The newest change time of any record seen (for cursor lag).
    pub newest_record: Option<i64>,
}

pub struct Registry {
    streams: Mutex<BTreeMap<String, StreamMetrics>>,
    retries: Mutex<BTreeMap<String, u64>>,
    /// Runs by stream and outcome (`ok`, `failed`, `refused`, `stopped`, …).
    runs: Family<RunLabels, Counter>,
    run_seconds: Family<StreamLabel, Histogram, fn() -> Histogram>,
    /// Vendor requests by connection and status class.
    requests: Family<RequestLabels, Counter>,
    /// Waits before a call left, and their length, by budget and reason.
    waits: Family<WaitLabels, Counter>,
    wait_seconds: Family<WaitLabels, Counter<f64, AtomicU64>>,
    /// Milliseconds since the process started (monotonic) of the daemon main loop's last
    /// turn (for /healthz; not wall-clock seconds, which a clock step moves).
    pub heartbeat: AtomicU64,
    // S-360: the webhook receiver's connections and refusals.
    pub receiver: ReceiverMetrics,
    /// Whether the state can be written (for /healthz, `usher status` and the scheduler).
    pub state: StateHealth,
    /// Log lines that could not be written (stdout closed or full, the log directory full).
    pub log_write_errors: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            streams: Default::default(),
            retries: Default::default(),
            runs: Default::default(),
            run_seconds: Family::new_with_constructor(run_histogram as fn() -> Histogram),
            requests: Default::default(),
            waits: Default::default(),
            wait_seconds: Default::default(),
            heartbeat: Default::default(),
            receiver: Default::default(),
            state: Default::default(),
            log_write_errors: Default::default(),
        }
    }
}

/// The state's last write failure, until a write goes through again. Set and cleared by
/// `Store::call` from the result of every statement, so it is the truth of the last write.
#[derive(Default)]
pub struct StateHealth {
    error: Mutex<Option<StateError>>,
    /// Failed statements on the state (any kind of storage fault), since the start.
    pub errors_total: AtomicU64,
    /// Bumped at every change of `error`, so that the daemon passes changes on cheaply.
    pub generation: AtomicU64,
}

/// Since when the state cannot be written, and the last error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateError {
    pub since: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub error: String,
}

impl StateHealth {
    /// A statement failed on a storage fault (disk full, I/O error, damage, permissions).
    pub fn failed(&self, error: String) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        let now = Utc::now();
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        let since = e.as_ref().map_or(now, |e| e.since);
        *e = Some(StateError {
            since,
            last: now,
            error,
        });
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// A write went through: the state can be written again.
    pub fn written(&self) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.take().is_some() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn error(&self) -> Option<StateError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The S-360 receiver under load: what it accepted, closed and refused. Counters only grow;
/// `open` and `cap` are gauges; the two timestamps say whether it is under pressure now.
#[derive(Default)]
pub struct ReceiverMetrics {
    /// Connections open now.
    pub open: AtomicU64,
    /// The connection cap in force (0: no receiver).
    pub cap: AtomicU64,
    pub accepted: AtomicU64,
    /// Idle connections closed to make room at the cap.
    pub evicted: AtomicU64,
    /// Connections closed at once: at the cap, every one handling a request.
    pub refused: AtomicU64,
    pub accept_errors: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub body_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// POSTs whose credentials were wrong (401).
    pub auth_failures: AtomicU64,
    /// POSTs refused with 429 without a look at their credentials (too many failures).
    pub auth_throttled: AtomicU64,
    /// POSTs that found no room for their body (`body_memory`) and got 503.
    pub no_room: AtomicU64,
    /// Unix seconds when the cap was last reached, and of the last accept error.
    last_cap_hit: AtomicU64,
    last_accept_error: AtomicU64,
}

/// How long the receiver counts as under pressure after reaching its cap or failing to
/// accept (for /healthz).
pub const PRESSURE_WINDOW_SECS: u64 = 10;

impl ReceiverMetrics {
    pub fn cap_hit(&self) {
        self.last_cap_hit
            .store(Utc::now().timestamp() as u64, Ordering::Relaxed);
    }

    pub fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
        self.last_accept_error
            .store(Utc::now().timestamp() as u64, Ordering::Relaxed);
    }

    pub fn timed_out(&self, kind: Timeout) {
        let c = match kind {
            Timeout::Header => &self.header_timeouts,
            Timeout::Body => &self.body_timeouts,
            Timeout::Idle => &self.idle_timeouts,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Why the receiver is degraded now, if it is: at its cap, or out of descriptors,
    /// within the last [`PRESSURE_WINDOW_SECS`].
    pub fn pressure(&self) -> Vec<String> {
        let now = Utc::now().timestamp() as u64;
        let recent = |t: &AtomicU64| {
            let t = t.load(Ordering::Relaxed);
            t > 0 && now.saturating_sub(t) < PRESSURE_WINDOW_SECS
        };
        let mut out = Vec::new();
        if recent(&self.last_cap_hit) {
            out.push(format!(
                "receiver: at its cap of {} connections (max_connections) within the last {PRESSURE_WINDOW_SECS}s; {} open",
                self.cap.load(Ordering::Relaxed),
                self.open.load(Ordering::Relaxed)
            ));
        }
        if recent(&self.last_accept_error) {
            out.push(format!(
                "receiver: could not accept connections (too many open files?) within the last {PRESSURE_WINDOW_SECS}s"
            ));
        }
        out
    }

    fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        if self.cap.load(Ordering::Relaxed) == 0 {
            return;
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        reg.register(
            "usher_receiver_connections",
            "Connections open to the S-360 receiver",
            ConstGauge::new(get(&self.open) as i64),
        );
        reg.register(
            "usher_receiver_connections_max",
            "The receiver's connection cap in force",
            ConstGauge::new(get(&self.cap) as i64),
        );
        let counters: [(&str, &str, u64); 7] = [
            (
                "usher_receiver_connections_accepted",
                "Connections accepted by the receiver",
                get(&self.accepted),
            ),
            (
                "usher_receiver_connections_evicted",
                "Idle connections closed to make room at the cap",
                get(&self.evicted),
            ),
            (
                "usher_receiver_connections_refused",
                "Connections closed at once: at the cap, every one handling a request",
                get(&self.refused),
            ),
            (
                "usher_receiver_accept_errors",
                "Failed accepts (e.g. too many open files)",
                get(&self.accept_errors),
            ),
            (
                "usher_receiver_auth_failures",
                "POSTs refused for wrong credentials (401)",
                get(&self.auth_failures),
            ),
            (
                "usher_receiver_auth_throttled",
                "POSTs refused with 429 after too many failed authentications from their peer",
                get(&self.auth_throttled),
            ),
            (
                "usher_receiver_no_room",
                "POSTs answered 503: no room for their body (body_memory)",
                get(&self.no_room),
            ),
        ];
        for (name, help, v) in counters {
            reg.register(name, help, ConstCounter::new(v));
        }
        let timeouts = Family::<PhaseLabel, Counter>::default();
        for (phase, c) in [
            ("header", &self.header_timeouts),
            ("body", &self.body_timeouts),
            ("idle", &self.idle_timeouts),
        ] {
            timeouts
                .get_or_create(&PhaseLabel {
                    phase: phase.into(),
                })
                .inc_by(get(c));
        }
        reg.register(
            "usher_receiver_timeouts",
            "Receiver connections closed at a deadline (header, body, idle)",
            timeouts,
        );
    }
}

/// Which deadline closed a connection (the S-360 receiver's; a label of
/// `usher_receiver_timeouts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    Header,
    Body,
    Idle,
}

impl Timeout {
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Header => "header",
            Timeout::Body => "body",
            Timeout::Idle => "idle",
        }
    }
}

pub static METRICS: LazyLock<Registry> = LazyLock::new(Registry::default);

impl Registry {
    /// A run ended with `outcome` (`engine::run_stream`'s): `ok` counts as ended well;
    /// `failed` and `refused` (something is waiting in the outbox or owed) as failed; a
    /// run `stopped` at a safe point (shutdown, an operator action) as neither.
    pub fn run_finished(
        &self,
        stream: &str,
        c: &crate::progress::Counts,
        outcome: &str,
        seconds: f64,
    ) {
        self.runs
            .get_or_create(&RunLabels {
                stream: stream.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.run_seconds
            .get_or_create(&StreamLabel {
                stream: stream.into(),
            })
            .observe(seconds);
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(stream.to_string()).or_default();
        s.pulled += c.pulled;
        s.created += c.created;
        s.updated += c.updated;
        s.skipped += c.skipped;
        s.failed += c.failed;
        s.last_run_seconds = seconds;
        match outcome {
            "ok" => {
                s.runs_ok += 1;
                s.last_success = Some(Utc::now().timestamp());
            }
            "stopped" => {}
            _ => s.runs_failed += 1,
        }
    }

    pub fn saw_record(&self, stream: &str, changed: DateTime<Utc>) {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(stream.to_string()).or_default();
        let t = changed.timestamp();
        if s.newest_record.is_none_or(|n| n < t) {
            s.newest_record = Some(t);
        }
    }

    pub fn retried(&self, connection: &str) {
        *self
            .retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(connection.to_string())
            .or_default() += 1;
    }

    /// A vendor answered `status` (None: no answer: connect error, timeout, reset).
    pub fn request(&self, connection: &str, status: Option<u16>) {
        let class = match status {
            Some(s @ 100..=599) => format!("{}xx", s / 100),
            Some(_) => "other".to_string(),
            None => "error".to_string(),
        };
        self.requests
            .get_or_create(&RequestLabels {
                connection: connection.into(),
                class: Label(class),
            })
            .inc();
    }

    /// A call waited `wait` before it left (counted when the wait starts).
    pub fn waited(&self, budget: &str, why: Wait, wait: std::time::Duration) {
        let labels = WaitLabels {
            connection: budget.into(),
            reason: why.as_str().into(),
        };
        self.waits.get_or_create(&labels).inc();
        self.wait_seconds
            .get_or_create(&labels)
            .inc_by(wait.as_secs_f64());
    }

    pub fn beat(&self) {
        self.heartbeat.store(
            MONOTONIC_START.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// How long ago the daemon main loop last turned.
    pub fn since_beat(&self) -> std::time::Duration {
        let beat = std::time::Duration::from_millis(self.heartbeat.load(Ordering::Relaxed));
        MONOTONIC_START.elapsed().saturating_sub(beat)
    }

    pub fn stream(&self, stream: &str) -> StreamMetrics {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }

    /// The exposition (OpenMetrics text, [`CONTENT_TYPE`]). `outbox` and `budgets` are read
    /// from the database and the budgets by the caller: per stream (outbox payloads, dead
    /// letters, owed records), per connection (budget left).
    pub fn render(
        &self,
        streams: &[String],
        outbox: &BTreeMap<String, (u64, u64, u64)>,
        budgets: &BTreeMap<String, Option<u32>>,
    ) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        let m = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = Utc::now().timestamp();
        let label = |stream: &str| StreamLabel {
            stream: stream.into(),
        };
        let counters: [StreamCounter; 6] = [
            (
                "usher_records_pulled",
                "Records pulled from the source",
                |s| s.pulled,
            ),
            (
                "usher_records_written",
                "Records created or updated in the target",
                |s| s.created + s.updated,
            ),
            (
                "usher_records_skipped",
                "Records skipped (older than the oldest date, unchanged, not final)",
                |s| s.skipped,
            ),
            (
                "usher_records_dead_lettered",
                "Records set aside in dead letters",
                |s| s.failed,
            ),
            ("usher_runs_ok", "Runs that ended well", |s| s.runs_ok),
            (
                "usher_runs_failed",
                "Runs that ended with an error or a refusal",
                |s| s.runs_failed,
            ),
        ];
        for (name, help, f) in counters {
            let family = Family::<StreamLabel, Counter>::default();
            for stream in streams {
                let v = m.get(stream).map(f).unwrap_or(0);
                family.get_or_create(&label(stream)).inc_by(v);
            }
            reg.register(name, help, family);
        }
        reg.register(
            "usher_runs",
            "Runs by stream and outcome (ok, failed, refused, stopped, paused, …)",
            self.runs.clone(),
        );
        reg.register(
            "usher_run_duration_seconds",
            "How long runs took",
            self.run_seconds.clone(),
        );
        let last_run = Family::<StreamLabel, Gauge<f64, AtomicU64>>::default();
        let last_success = Family::<StreamLabel, Gauge>::default();
        let lag = Family::<StreamLabel, Gauge>::default();
        let (payloads, dead, owed) = (
            Family::<StreamLabel, Gauge>::default(),
            Family::<StreamLabel, Gauge>::default(),
            Family::<StreamLabel, Gauge>::default(),
        );
        for stream in streams {
            let s = m.get(stream).cloned().unwrap_or_default();
            last_run
                .get_or_create(&label(stream))
                .set(s.last_run_seconds);
            if let Some(t) = s.last_success {
                last_success.get_or_create(&label(stream)).set(t);
            }
            if let Some(t) = s.newest_record {
                lag.get_or_create(&label(stream)).set((now - t).max(0));
            }
            let (p, d, o) = outbox.get(stream).copied().unwrap_or_default();
            payloads.get_or_create(&label(stream)).set(p as i64);
            dead.get_or_create(&label(stream)).set(d as i64);
            owed.get_or_create(&label(stream)).set(o as i64);
        }
        reg.register(
            "usher_last_run_duration_seconds",
            "Duration of the stream's last run",
            last_run,
        );
        reg.register(
            "usher_last_success_timestamp_seconds",
            "When the last run that ended well ended",
            last_success,
        );
        reg.register(
            "usher_cursor_lag_seconds",
            "Age of the newest record seen",
            lag,
        );
        reg.register(
            "usher_outbox_payloads",
            "Payloads waiting in the outbox",
            payloads,
        );
        reg.register(
            "usher_dead_letters",
            "Records waiting in dead letters",
            dead,
        );
        reg.register(
            "usher_owed_records",
            "Records the stream owes its target (refused or not read), tried again every run",
            owed,
        );
        let retries = self
            .retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let retried = Family::<ConnectionLabel, Counter>::default();
        let remaining = Family::<ConnectionLabel, Gauge>::default();
        for (conn, left) in budgets {
            let l = ConnectionLabel {
                connection: conn.as_str().into(),
            };
            retried
                .get_or_create(&l)
                .inc_by(retries.get(conn).copied().unwrap_or(0));
            if let Some(left) = left {
                remaining.get_or_create(&l).set(i64::from(*left));
            }
        }
        reg.register(
            "usher_http_retries",
            "Requests repeated after a 5xx, reset, timeout or rate limit",
            retried,
        );
        reg.register(
            "usher_rate_budget_remaining",
            "Calls left in the connection's rate window",
            remaining,
        );
        reg.register(
            "usher_http_requests",
            "Requests to vendors by connection and status class (2xx … 5xx; error: no answer)",
            self.requests.clone(),
        );
        reg.register(
            "usher_waits",
            "Calls that waited before leaving, by rate budget (the connection; S-360: its institution) and reason (retry_after: the vendor's Retry-After; rate_budget: the connection's rate_limit)",
            self.waits.clone(),
        );
        reg.register(
            "usher_wait_seconds",
            "Seconds calls waited before leaving, by rate budget and reason",
            self.wait_seconds.clone(),
        );
        reg.register(
            "usher_state_writable",
            "1 while the state database can be written, 0 since a write failed and until one goes through",
            ConstGauge::new(i64::from(self.state.error().is_none())),
        );
        reg.register(
            "usher_state_errors",
            "Statements on the state database that failed on a storage fault (disk full, I/O, permissions, damage)",
            ConstCounter::new(self.state.errors_total.load(Ordering::Relaxed)),
        );
        reg.register(
            "usher_log_write_errors",
            "Log lines that could not be written",
            ConstCounter::new(self.log_write_errors.load(Ordering::Relaxed)),
        );
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        reg.register("usher_build_info", "usher's version (always 1)", build);
        self.receiver.register(&mut reg);
        process_metrics(&mut reg);
        let mut out = String::with_capacity(4096 + streams.len() * 1500);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            let _ = writeln!(out, "# cannot encode the metrics: {e}");
        }
        out
    }
}

/// One per-stream counter: name, help, and how to read it.
type StreamCounter = (&'static str, &'static str, fn(&StreamMetrics) -> u64);

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// CPU, memory, open files and start time of this process, from /proc.
fn process_metrics(reg: &mut prometheus_client::registry::Registry) {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    if let Some(p) = ProcStat::read_self() {
        reg.register(
            "process_cpu_seconds",
            "User and system CPU time",
            ConstCounter::new((p.utime + p.stime) as f64 / ticks),
        );
        reg.register(
            "process_resident_memory_bytes",
            "Resident memory",
            ConstGauge::new(p.rss_bytes as i64),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        reg.register(
            "process_open_fds",
            "Open file descriptors",
            ConstGauge::new(fds.count() as i64),
        );
    }
    reg.register(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch",
        ConstGauge::new(*START),
    );
}

/// When this process started (seconds since the epoch): the kernel's start time of the
/// process (`/proc/self/stat`, in clock ticks after boot) plus the boot time (`/proc/stat`).
/// Not when this value was first read: a lazily taken "now" said the first scrape.
pub static START: LazyLock<f64> = LazyLock::new(|| {
    process_start(
        &std::fs::read_to_string("/proc/self/stat").unwrap_or_default(),
        &std::fs::read_to_string("/proc/stat").unwrap_or_default(),
        rustix::param::clock_ticks_per_second() as f64,
    )
    .unwrap_or_else(|| Utc::now().timestamp() as f64)
});

/// The start time from the texts of `/proc/self/stat` and `/proc/stat`.
fn process_start(stat: &str, proc_stat: &str, ticks: f64) -> Option<f64> {
    // Field 22 (starttime); fields after the command name are counted from 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let btime: f64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + start_ticks / ticks)
}

static MONOTONIC_START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

/// The few fields of /proc/PID/stat and status that matter here.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    pub utime: u64,
    pub stime: u64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl ProcStat {
    pub fn read_self() -> Option<Self> {
        Self::read("self")
    }

    pub fn read_pid(pid: u32) -> Option<Self> {
        Self::read(&pid.to_string())
    }

    fn read(pid: &str) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime = f.get(11)?.parse().ok()?;
        let stime = f.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        Some(ProcStat {
            utime,
            stime,
            rss_bytes: kb("VmRSS:"),
            peak_rss_bytes: kb("VmHWM:"),
        })
    }

    pub fn cpu_seconds(&self) -> f64 {
        (self.utime + self.stime) as f64 / rustix::param::clock_ticks_per_second() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        let c = crate::progress::Counts {
            pulled: 5,
            created: 3,
            updated: 1,
            skipped: 1,
            ..Default::default()
        };
        r.run_finished("a", &c, "ok", 1.5);
        r.run_finished("a", &c, "refused", 1.0);
        r.run_finished("a", &c, "stopped", 1.0);
        r.retried("crm");
        let mut outbox = BTreeMap::new();
        outbox.insert("a".to_string(), (2, 7, 1));
        let mut budgets = BTreeMap::new();
        budgets.insert("crm".to_string(), Some(17));
        let text = r.render(&["a".into()], &outbox, &budgets);
        assert!(
            text.contains("usher_records_pulled_total{stream=\"a\"} 15"),
            "{text}"
        );
        assert!(text.contains("usher_records_written_total{stream=\"a\"} 12"));
        assert!(text.contains("usher_outbox_payloads{stream=\"a\"} 2"));
        assert!(text.contains("usher_dead_letters{stream=\"a\"} 7"));
        assert!(text.contains("usher_owed_records{stream=\"a\"} 1"));
        assert!(text.contains("usher_http_retries_total{connection=\"crm\"} 1"));
        assert!(text.contains("usher_rate_budget_remaining{connection=\"crm\"} 17"));
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(text.contains("usher_last_success_timestamp_seconds{stream=\"a\"}"));
        assert!(
            text.contains("usher_runs_ok_total{stream=\"a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("usher_runs_failed_total{stream=\"a\"} 1"),
            "a refused run is not an ok one: {text}"
        );
        assert!(
            !text.contains("usher_receiver_"),
            "no receiver, no receiver series"
        );
        r.receiver.cap.store(512, Ordering::Relaxed);
        r.receiver.timed_out(Timeout::Idle);
        let text = r.render(&["a".into()], &outbox, &budgets);
        assert!(
            text.contains("usher_receiver_connections_max 512"),
            "{text}"
        );
        assert!(text.contains("usher_receiver_timeouts_total{phase=\"idle\"} 1"));
        r.request("crm", Some(200));
        r.request("crm", Some(429));
        r.request("crm", None);
        r.waited("crm", Wait::RetryAfter, std::time::Duration::from_secs(90));
        let text = r.render(&["a".into()], &outbox, &budgets);
        for needle in [
            "usher_runs_total{stream=\"a\",outcome=\"refused\"} 1",
            "usher_runs_total{stream=\"a\",outcome=\"ok\"} 1",
            "usher_run_duration_seconds_count{stream=\"a\"} 3",
            "usher_run_duration_seconds_bucket{le=\"1.0\",stream=\"a\"} 2",
            "usher_http_requests_total{connection=\"crm\",class=\"4xx\"} 1",
            "usher_http_requests_total{connection=\"crm\",class=\"error\"} 1",
            "usher_waits_total{connection=\"crm\",reason=\"retry_after\"} 1",
            "usher_wait_seconds_total{connection=\"crm\",reason=\"retry_after\"} 90.0",
            "usher_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} in:\n{text}");
        }
        // A name with a quote stays one label value.
        r.run_finished("q\"x", &c, "ok", 1.0);
        let text = r.render(&["q\"x".into()], &outbox, &budgets);
        assert!(
            text.contains("usher_runs_total{stream=\"q\\\"x\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(r.receiver.pressure().is_empty());
        r.receiver.cap_hit();
        assert!(r.receiver.pressure()[0].contains("cap of 512"));
    }

    #[test]
    fn the_start_time_is_the_process_start_not_the_first_read() {
        let stat = "4242 (usher run) S 1 4242 4242 0 -1 4194560 1 0 0 0 5 6 0 0 20 0 2 0 123456 1000 10 0 0";
        let proc_stat = "cpu  1 2 3\nbtime 1765000000\nprocesses 9\n";
        let t = process_start(stat, proc_stat, 100.0).unwrap();
        assert!((t - 1765001234.56).abs() < 1e-3, "{t}");
        assert_eq!(process_start("garbage", proc_stat, 100.0), None);
        let start = *START;
        let now = Utc::now().timestamp() as f64;
        // This test process started before this line, and not long before. `btime` is in
        // whole seconds and follows the wall clock's adjustments: a second or two of slack
        // (seen failing once by a fraction, beside a busy build).
        assert!(
            start <= now + 2.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }

    #[test]
    fn reads_proc_stat() {
        let p = ProcStat::read_self().unwrap();
        assert!(p.rss_bytes > 0);
    }
}
