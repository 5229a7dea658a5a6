//! Metrics and health: process-wide counters that the engine and `http` bump, served with
//! the database's gauges in the Prometheus text format on a loopback port
//! (`[metrics] listen`), plus `/healthz`.
//!
//! The counters are global (like a Prometheus default registry) so that recording a number
//! never needs a handle threaded through every call.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use chrono::{DateTime, Utc};

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

#[derive(Default)]
pub struct Registry {
    streams: Mutex<BTreeMap<String, StreamMetrics>>,
    retries: Mutex<BTreeMap<String, u64>>,
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

    pub fn timed_out(&self, kind: crate::receiver::Timeout) {
        use crate::receiver::Timeout;
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

    fn render(&self, out: &mut String) {
        if self.cap.load(Ordering::Relaxed) == 0 {
            return;
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let series: [(&str, &str, &str, u64); 9] = [
            (
                "usher_receiver_connections",
                "gauge",
                "Connections open to the S-360 receiver.",
                get(&self.open),
            ),
            (
                "usher_receiver_connections_max",
                "gauge",
                "The receiver's connection cap in force.",
                get(&self.cap),
            ),
            (
                "usher_receiver_connections_accepted_total",
                "counter",
                "Connections accepted by the receiver.",
                get(&self.accepted),
            ),
            (
                "usher_receiver_connections_evicted_total",
                "counter",
                "Idle connections closed to make room at the cap.",
                get(&self.evicted),
            ),
            (
                "usher_receiver_connections_refused_total",
                "counter",
                "Connections closed at once: at the cap, every one handling a request.",
                get(&self.refused),
            ),
            (
                "usher_receiver_accept_errors_total",
                "counter",
                "Failed accepts (e.g. too many open files).",
                get(&self.accept_errors),
            ),
            (
                "usher_receiver_auth_failures_total",
                "counter",
                "POSTs refused for wrong credentials (401).",
                get(&self.auth_failures),
            ),
            (
                "usher_receiver_auth_throttled_total",
                "counter",
                "POSTs refused with 429 after too many failed authentications from their peer.",
                get(&self.auth_throttled),
            ),
            (
                "usher_receiver_no_room_total",
                "counter",
                "POSTs answered 503: no room for their body (body_memory).",
                get(&self.no_room),
            ),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP usher_receiver_timeouts_total Receiver connections closed at a deadline (header, body, idle).\n# TYPE usher_receiver_timeouts_total counter"
        );
        for (phase, c) in [
            ("header", &self.header_timeouts),
            ("body", &self.body_timeouts),
            ("idle", &self.idle_timeouts),
        ] {
            let _ = writeln!(
                out,
                "usher_receiver_timeouts_total{{phase=\"{phase}\"}} {}",
                get(c)
            );
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
        c: &crate::store::Counts,
        outcome: &str,
        seconds: f64,
    ) {
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

    /// The Prometheus text exposition. `gauges` are read from the database and the budgets
    /// by the caller: per stream (outbox payloads, dead letters, owed records), per
    /// connection (budget left).
    pub fn render(
        &self,
        streams: &[String],
        outbox: &BTreeMap<String, (u64, u64, u64)>,
        budgets: &BTreeMap<String, Option<u32>>,
    ) -> String {
        let mut out = String::with_capacity(4096 + streams.len() * 1200);
        let m = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = Utc::now().timestamp();
        let series: &[Series] = &[
            (
                "usher_records_pulled_total",
                "counter",
                "Records pulled from the source.",
                |s| s.pulled as f64,
            ),
            (
                "usher_records_written_total",
                "counter",
                "Records created or updated in the target.",
                |s| (s.created + s.updated) as f64,
            ),
            (
                "usher_records_skipped_total",
                "counter",
                "Records skipped (older than the oldest date, unchanged, not final).",
                |s| s.skipped as f64,
            ),
            (
                "usher_records_dead_lettered_total",
                "counter",
                "Records set aside in dead letters.",
                |s| s.failed as f64,
            ),
            (
                "usher_runs_ok_total",
                "counter",
                "Runs that ended well.",
                |s| s.runs_ok as f64,
            ),
            (
                "usher_runs_failed_total",
                "counter",
                "Runs that ended with an error or a refusal.",
                |s| s.runs_failed as f64,
            ),
            (
                "usher_run_duration_seconds",
                "gauge",
                "Duration of the last run.",
                |s| s.last_run_seconds,
            ),
        ];
        for (name, kind, help, f) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for stream in streams {
                let s = m.get(stream).cloned().unwrap_or_default();
                let _ = writeln!(out, "{name}{{stream=\"{}\"}} {}", esc(stream), f(&s));
            }
        }
        let _ = writeln!(
            out,
            "# HELP usher_last_success_timestamp_seconds When the last run that ended well ended.\n# TYPE usher_last_success_timestamp_seconds gauge"
        );
        for stream in streams {
            if let Some(t) = m.get(stream).and_then(|s| s.last_success) {
                let _ = writeln!(
                    out,
                    "usher_last_success_timestamp_seconds{{stream=\"{}\"}} {t}",
                    esc(stream)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP usher_cursor_lag_seconds Age of the newest record seen.\n# TYPE usher_cursor_lag_seconds gauge"
        );
        for stream in streams {
            if let Some(t) = m.get(stream).and_then(|s| s.newest_record) {
                let _ = writeln!(
                    out,
                    "usher_cursor_lag_seconds{{stream=\"{}\"}} {}",
                    esc(stream),
                    (now - t).max(0)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP usher_outbox_payloads Payloads waiting in the outbox.\n# TYPE usher_outbox_payloads gauge"
        );
        for stream in streams {
            let (p, _, _) = outbox.get(stream).copied().unwrap_or_default();
            let _ = writeln!(
                out,
                "usher_outbox_payloads{{stream=\"{}\"}} {p}",
                esc(stream)
            );
        }
        let _ = writeln!(
            out,
            "# HELP usher_dead_letters Records waiting in dead letters.\n# TYPE usher_dead_letters gauge"
        );
        for stream in streams {
            let (_, d, _) = outbox.get(stream).copied().unwrap_or_default();
            let _ = writeln!(out, "usher_dead_letters{{stream=\"{}\"}} {d}", esc(stream));
        }
        let _ = writeln!(
            out,
            "# HELP usher_owed_records Records the stream owes its target (refused or not read), tried again every run.\n# TYPE usher_owed_records gauge"
        );
        for stream in streams {
            let (_, _, o) = outbox.get(stream).copied().unwrap_or_default();
            let _ = writeln!(out, "usher_owed_records{{stream=\"{}\"}} {o}", esc(stream));
        }
        let retries = self
            .retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let _ = writeln!(
            out,
            "# HELP usher_http_retries_total Requests repeated after a 5xx, reset, timeout or rate limit.\n# TYPE usher_http_retries_total counter"
        );
        for conn in budgets.keys() {
            let _ = writeln!(
                out,
                "usher_http_retries_total{{connection=\"{}\"}} {}",
                esc(conn),
                retries.get(conn).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP usher_rate_budget_remaining Calls left in the connection's rate window.\n# TYPE usher_rate_budget_remaining gauge"
        );
        for (conn, left) in budgets {
            if let Some(left) = left {
                let _ = writeln!(
                    out,
                    "usher_rate_budget_remaining{{connection=\"{}\"}} {left}",
                    esc(conn)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP usher_state_writable 1 while the state database can be written, 0 since a write failed and until one goes through.\n# TYPE usher_state_writable gauge\nusher_state_writable {}",
            u8::from(self.state.error().is_none())
        );
        let _ = writeln!(
            out,
            "# HELP usher_state_errors_total Statements on the state database that failed on a storage fault (disk full, I/O, permissions, damage).\n# TYPE usher_state_errors_total counter\nusher_state_errors_total {}",
            self.state.errors_total.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP usher_log_write_errors_total Log lines that could not be written.\n# TYPE usher_log_write_errors_total counter\nusher_log_write_errors_total {}",
            self.log_write_errors.load(Ordering::Relaxed)
        );
        self.receiver.render(&mut out);
        process_metrics(&mut out);
        out
    }
}

/// One per-stream series: name, type, help, and how to read it.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&StreamMetrics) -> f64,
);

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// CPU, memory, open files and start time of this process, from /proc.
fn process_metrics(out: &mut String) {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    if let Some(p) = ProcStat::read_self() {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
            (p.utime + p.stime) as f64 / ticks
        );
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            p.rss_bytes
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}",
            fds.count()
        );
    }
    let _ = writeln!(
        out,
        "# HELP process_start_time_seconds Start time of the process.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}",
        START.timestamp()
    );
}

pub static START: LazyLock<DateTime<Utc>> = LazyLock::new(Utc::now);
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
        let c = crate::store::Counts {
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
        r.receiver.timed_out(crate::receiver::Timeout::Idle);
        let text = r.render(&["a".into()], &outbox, &budgets);
        assert!(
            text.contains("usher_receiver_connections_max 512"),
            "{text}"
        );
        assert!(text.contains("usher_receiver_timeouts_total{phase=\"idle\"} 1"));
        assert!(r.receiver.pressure().is_empty());
        r.receiver.cap_hit();
        assert!(r.receiver.pressure()[0].contains("cap of 512"));
    }

    #[test]
    fn reads_proc_stat() {
        let p = ProcStat::read_self().unwrap();
        assert!(p.rss_bytes > 0);
    }
}
