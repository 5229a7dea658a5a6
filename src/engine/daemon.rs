//! The long-running daemon: schedules, runs, signals, control files, reload, shutdown.
//!
//! One task (the main loop) owns the configuration and the schedule; runs are spawned onto a
//! task tracker. Each stream has a slot whose run lock makes sure two runs of one stream
//! never overlap: a tick that finds the previous run still going is skipped and logged.
//!
//! Schedules go through tokio-cron-scheduler as one-shot jobs armed for the instant (the
//! *slot*) that `schedule.rs` computes, and re-armed after each firing. That keeps daily
//! local-time runs right across DST changes (the crate's own timezone jobs are not) and means
//! a reload only has to re-arm the jobs. The crate keeps whole wall-clock seconds and polls
//! every 500 ms, so a job may fire up to ~1.5 s early: the job waits out the rest on tokio's
//! monotonic clock, and the next slot is armed from the slot that fired
//! ([`crate::schedule::Schedule::next_slot`]), never from a wall clock still before it, so a
//! slot runs once. The wall clock is compared with the monotonic clock every second: a jump
//! (an NTP step, a suspended VM) is logged once and every schedule is armed again from the
//! new time, instead of waiting out the size of the step.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::control::{self, Action};
use super::in_doubt::InDoubt;
use super::lock::StateLock;
use super::{RunCtx, run_stream};
use crate::config::{self, Config};
use crate::http::Http;
use crate::store::Store;

/// Per-stream state that lives across runs and reloads.
#[derive(Default)]
pub struct Slot {
    /// Held for the whole of a run (and of an operator action on the stream).
    pub run_lock: Arc<tokio::sync::Mutex<()>>,
    /// Set while an operator action waits: the run stops at its next page boundary.
    pub interrupt: Arc<AtomicBool>,
    /// A trigger arrived during a run: run again right after it.
    pub trigger_pending: AtomicBool,
}

/// A stream's armed one-shot job.
struct Armed {
    id: Uuid,
    generation: u64,
    /// The instant the job is for: the next slot is computed from it, not from the wall
    /// clock at the firing (which may be before it).
    slot: chrono::DateTime<Utc>,
}

/// Longest wait, on tokio's clock, for a job that fired before its slot: the crate fires at
/// most ~1.5 s early; anything more is a wall-clock jump, which re-arms the schedule anyway.
const MAX_EARLY_WAIT: Duration = Duration::from_secs(5);
/// A difference between wall-clock and monotonic time elapsed beyond this is a clock jump.
const CLOCK_JUMP: chrono::TimeDelta = chrono::TimeDelta::seconds(2);
/// A stream whose run could not be recorded (the state cannot be written) tries again after
/// this, then after twice as long each time, up to [`STATE_BACKOFF_MAX`], or at its next
/// slot when that is later: not at every slot, and not long after the state is back.
pub const STATE_BACKOFF_FIRST: Duration = Duration::from_secs(2);
pub const STATE_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The files the daemon works on, as it opened them. Checked against the configured paths
/// every second: a state directory moved, deleted or replaced under the daemon is noticed,
/// and the daemon stops instead of working on a state nobody sees (`status` reads the
/// configured path) beside a second daemon that started a fresh one there.
struct Identity {
    db: PathBuf,
    db_id: (u64, u64),
    lock: PathBuf,
    lock_id: (u64, u64),
}

/// What became of the state at the configured path.
enum Drift {
    /// The database there is another file, or none: the daemon stops.
    Gone(String),
    /// Only the lock file was removed or replaced: take it again.
    Lock(String),
}

fn file_id(p: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p)?;
    Ok((m.dev(), m.ino()))
}

/// Where a file this process has open is now (its descriptor's link in /proc): the new
/// path of a moved file, or the old one with " (deleted)".
fn open_path_of(id: (u64, u64)) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .flatten()
        .find_map(|e| {
            let m = std::fs::metadata(e.path()).ok()?;
            ((m.dev(), m.ino()) == id)
                .then(|| std::fs::read_link(e.path()).ok())
                .flatten()
                .map(|p| p.display().to_string())
        })
}

impl Identity {
    fn new(store: &Store, lock: &StateLock) -> std::io::Result<Identity> {
        // On PostgreSQL there is no file to follow: the lock file alone.
        let db = store
            .file()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| lock.path.clone());
        Ok(Identity {
            db_id: file_id(&db)?,
            db,
            lock: lock.path.clone(),
            lock_id: lock.identity()?,
        })
    }

    fn check(&self) -> Option<Drift> {
        let now = || {
            open_path_of(self.db_id)
                .map(|p| format!("the file this daemon has open is now {p}"))
                .unwrap_or_else(|| "where the file this daemon has open is now is unknown".into())
        };
        match file_id(&self.db) {
            Ok(id) if id == self.db_id => {}
            Ok(_) => {
                return Some(Drift::Gone(format!(
                    "{} is another file than the one this daemon opened ({})",
                    self.db.display(),
                    now()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(Drift::Gone(format!(
                    "{} is gone: the state directory was moved or deleted ({})",
                    self.db.display(),
                    now()
                )));
            }
            // Another error (an I/O error, permissions): not proof of a move.
            Err(_) => return None,
        }
        match file_id(&self.lock) {
            Ok(id) if id == self.lock_id => None,
            Ok(_) => Some(Drift::Lock(format!("{} was replaced", self.lock.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(Drift::Lock(format!("{} was removed", self.lock.display())))
            }
            Err(_) => None,
        }
    }
}

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every run reached a safe point (committed, or stopped between pages).
    Clean,
    /// Runs were abandoned where they were (a second SIGTERM, or `shutdown_timeout`): what
    /// they had not committed is pulled again at the next start.
    Abandoned,
    /// The state database at the configured path is no longer the one the daemon opened
    /// (moved or deleted under it).
    StateGone,
}

enum Event {
    /// A schedule fired. The generation tells stale jobs (from before a reload) apart.
    Tick(String, u64),
    /// The stream's run lock was released (a run ended, or an operator action on it did):
    /// a trigger that found it held runs now.
    Free(String),
    /// A run ended; `recorded` is false when the state could not record its start (so it
    /// did not run, and the stream backs off).
    RunEnded {
        stream: String,
        recorded: bool,
    },
    ControlDone(Origin),
}

/// Where an operator request came from: a control file in this host's state folder, or a
/// request row in the state (several instances).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    File(PathBuf),
    State(i64),
}

/// An operator request about to be carried out.
struct Pending {
    origin: Origin,
    action: Action,
    stream: String,
    actor: String,
}

/// Closes a request once it is carried out: the control file is removed, the request row
/// gets who did it and the outcome.
async fn close(store: &Store, origin: &Origin, me: &str, result: &str) {
    match origin {
        Origin::File(path) => {
            let _ = std::fs::remove_file(path);
        }
        Origin::State(id) => {
            if let Err(e) = store.request_done(*id, me, result).await {
                tracing::error!(request = id, error = %e, "cannot close the operator request in the state");
            }
        }
    }
}

pub struct Daemon {
    source: config::Source,
    config: Arc<Config>,
    store: Store,
    http: Http,
    /// The stream kinds' runs (`crate::streams::run`), handed in by the CLI.
    kind_run: super::KindRun,
    slots: HashMap<String, Arc<Slot>>,
    sched: JobScheduler,
    /// Each stream's armed one-shot job, its generation (a fired job whose generation is no
    /// longer the stream's is stale: it was replaced by a reload) and the slot it is for.
    jobs: HashMap<String, Armed>,
    generation: u64,
    events: mpsc::UnboundedSender<Event>,
    /// SIGTERM: stop scheduling; runs stop at their next safe point (the page in flight
    /// finishes). Also stops the receiver and the health server.
    shutdown: CancellationToken,
    /// A second SIGTERM or `shutdown_timeout`: runs drop their requests in flight now.
    abandon: CancellationToken,
    tracker: TaskTracker,
    /// Operator requests being acted on (so that a poll does not pick them up twice).
    in_progress: HashSet<Origin>,
    /// Caps how many runs go at once; the others wait for a permit.
    permits: Arc<tokio::sync::Semaphore>,
    /// The configuration as /metrics and /healthz see it (updated on reload).
    shared: Arc<std::sync::RwLock<Arc<Config>>>,
    // S-360: the webhook receiver (when `[receiver]` is configured).
    receiver: Option<crate::receiver::Receiver>,
    /// Streams whose last run could not be recorded: how long they wait before the next try.
    backoff: HashMap<String, Duration>,
    /// Also where `usher status` learns that the state cannot be written.
    lock: StateLock,
    /// Several instances on PostgreSQL: the leases of this instance's stream groups. None
    /// on SQLite (one daemon holds every stream).
    leases: Option<super::lease::Keeper>,
    /// Reloads judged so far: `usher reload` waits for the verdict of the one it asked for
    /// (`engine::reload`).
    reloads: u64,
}

/// Starts the daemon and runs it until SIGTERM/SIGINT (or until its state directory is
/// moved away). Returns once every run has reached a safe point ([`Ended::Clean`]), or,
/// after a second SIGTERM/SIGINT or `shutdown_timeout`, once the runs were abandoned
/// ([`Ended::Abandoned`]).
pub async fn run(
    source: config::Source,
    config: Config,
    store: Store,
    lock: StateLock,
    kind_run: super::KindRun,
) -> anyhow::Result<Ended> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sched = JobScheduler::new().await?;
    sched.start().await?;
    let mut signals = signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1])?;
    let state_dir = config.daemon.state_dir.clone();
    control::ensure_dir(&state_dir)?;
    let swept = control::sweep(&state_dir, Duration::from_secs(600));
    if swept > 0 {
        tracing::info!(
            files = swept,
            "removed temporary control files left by interrupted CLI commands"
        );
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(
        config.daemon.max_concurrent_runs as usize,
    ));
    let config = Arc::new(config);
    let http = super::budget_log::http_client(&store).await?;
    let mut d = Daemon {
        source,
        permits,
        shared: Arc::new(std::sync::RwLock::new(config.clone())),
        config,
        store,
        http,
        kind_run,
        slots: HashMap::new(),
        sched,
        jobs: HashMap::new(),
        generation: 0,
        events: tx,
        shutdown: CancellationToken::new(),
        abandon: CancellationToken::new(),
        tracker: TaskTracker::new(),
        in_progress: HashSet::new(),
        receiver: None,
        backoff: HashMap::new(),
        lock,
        leases: None,
        reloads: 0,
    };
    // S-360: start receiving before READY=1; a bind failure is a start-up error.
    d.receiver =
        crate::receiver::start(&d.config, d.store.clone(), d.shutdown.clone(), &d.tracker).await?;
    let closed = d.store.close_interrupted_runs().await?;
    if closed > 0 {
        tracing::warn!(
            runs = closed,
            "closed runs left unfinished by a previous daemon"
        );
    }
    // Several instances: take this instance's share of the stream groups before arming.
    if d.store.is_postgres() {
        let keeper = super::lease::Keeper::new(d.store.clone(), &d.config);
        tracing::info!(instance = %keeper.me, lease_secs = d.config.daemon.lease.as_secs(), "several instances: streams are leased through the state");
        d.leases = Some(keeper);
        d.lease_turn().await;
    }
    crate::metrics::METRICS.beat();
    if let Some(addr) = d.config.metrics_listen {
        let state = super::health::HealthState {
            store: d.store.clone(),
            http: d.http.clone(),
            config: d.shared.clone(),
        };
        match super::health::serve(addr, state, d.shutdown.clone()).await {
            Ok(bound) => {
                tracing::info!(address = %bound, "metrics and health on /metrics and /healthz")
            }
            Err(e) => anyhow::bail!("cannot listen for metrics on {addr}: {e}"),
        }
    }
    d.arm_all(true, None).await;
    d.process_control();
    // Integration settings: seats.io and CDP connections checked online, result in the state.
    d.check_online(None);

    // From here SIGHUP is handled: `usher reload` signals only a daemon that wrote this.
    d.verdict(true, Vec::new());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        streams = d.config.streams.len(),
        connections = d.config.connections.len(),
        state = %state_dir.display(),
        pid = std::process::id(),
        "usher is ready"
    );

    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut control_tick = tokio::time::interval(d.config.daemon.control_poll);
    control_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut lease_tick = tokio::time::interval(
        d.leases
            .as_ref()
            .map(|k| k.period())
            .unwrap_or(Duration::from_secs(3600)),
    );
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    lease_tick.tick().await;
    let mut clocks = (Utc::now(), std::time::Instant::now());
    let mut state_generation = 0;
    let mut identity = Identity::new(&d.store, &d.lock)?;
    let mut ended = Ended::Clean;
    // Held while stopping when the state directory was moved away, so that a second daemon
    // started on the configured path meanwhile refuses instead of running beside this one.
    let mut guard = None;

    loop {
        tokio::select! {
            Some(sig) = signals.next() => match sig {
                SIGHUP => d.reload().await,
                SIGUSR1 => d.process_control(),
                SIGTERM | SIGINT => break,
                _ => {}
            },
            Some(ev) = rx.recv() => match ev {
                Event::Tick(stream, generation) => {
                    if let Some(armed) = d.jobs.get(&stream)
                        && armed.generation == generation
                    {
                        let slot = armed.slot;
                        d.on_tick(&stream, slot).await;
                    }
                }
                Event::Free(stream) => {
                    if let Some(slot) = d.slots.get(&stream)
                        && slot.trigger_pending.swap(false, Ordering::SeqCst) {
                            d.start_run(&stream, "trigger");
                        }
                }
                Event::ControlDone(origin) => {
                    d.in_progress.remove(&origin);
                }
                Event::RunEnded { stream, recorded } => d.on_run_ended(&stream, recorded).await,
            },
            _ = control_tick.tick() => {
                d.process_control();
                d.process_requests().await;
            }
            _ = lease_tick.tick() => {
                if d.leases.is_some() {
                    d.lease_turn().await;
                }
            }
            _ = heartbeat.tick() => {
                crate::metrics::METRICS.beat();
                d.note_state(&mut state_generation);
                match identity.check() {
                    None => {}
                    Some(Drift::Lock(what)) => match super::lock::acquire(&state_dir) {
                        Ok(l) => {
                            tracing::warn!(problem = %what, lock = %l.path.display(), "the lock file was taken again");
                            if let Ok(id) = l.identity() {
                                identity.lock_id = id;
                            }
                            d.lock = l;
                        }
                        Err(e) => {
                            tracing::error!(problem = %what, error = %e,
                                "the state directory's lock is no longer this daemon's; stopping so that two daemons never work on one state");
                            ended = Ended::StateGone;
                            break;
                        }
                    },
                    Some(Drift::Gone(what)) => {
                        guard = super::lock::acquire(&state_dir).ok();
                        tracing::error!(
                            problem = %what,
                            state = %state_dir.display(),
                            "the state database at the configured path is no longer the one this daemon works on; \
                             stopping (runs finish their page in the file they have open; exit 65). Put the state \
                             directory back and start usher again, or start it to begin a new state there (README, State)"
                        );
                        ended = Ended::StateGone;
                        break;
                    }
                }
                if let Some(jump) = clock_jump(&mut clocks) {
                    tracing::warn!(
                        jump_secs = jump.num_milliseconds() as f64 / 1000.0,
                        "the wall clock jumped; every schedule is armed again from the new time"
                    );
                    d.arm_all(false, None).await;
                }
            }
            _ = watchdog_tick.tick() => {
                if watchdog.is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
    }

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let timeout = d.config.daemon.shutdown_timeout;
    tracing::info!(
        timeout_secs = timeout.as_secs(),
        "stopping: each run finishes the page it is on and commits (a second SIGTERM abandons them now)"
    );
    d.shutdown.cancel();
    let _ = d.sched.shutdown().await;
    d.tracker.close();
    let abandon = tokio::select! {
        _ = d.tracker.wait() => None,
        _ = tokio::time::sleep(timeout) => Some(format!(
            "runs did not reach a safe point within shutdown_timeout ({}s)",
            timeout.as_secs()
        )),
        Some(sig) = next_stop(&mut signals) => Some(format!("a second {} arrived", signal_name(sig))),
    };
    if let Some(why) = abandon {
        tracing::error!(
            reason = %why,
            "abandoning the runs in flight: their uncommitted pages are pulled again at the next start, and a write whose answer was lost stays in doubt until it can no longer land; exit 1"
        );
        d.abandon.cancel();
        if tokio::time::timeout(ABANDON_GRACE, d.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                "runs did not stop within {}s of being abandoned; exiting",
                ABANDON_GRACE.as_secs()
            );
        }
        if ended == Ended::Clean {
            ended = Ended::Abandoned;
        }
    }
    // Several instances: give the leases back, so that others take the streams at once.
    if let Some(mut keeper) = d.leases.take() {
        keeper.release_all().await;
    }
    tracing::info!("stopped");
    drop(guard);
    Ok(ended)
}

/// How long abandoned runs get to drop their requests and record that they stopped.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// The next SIGTERM or SIGINT (others are ignored while stopping).
async fn next_stop(signals: &mut signal_hook_tokio::Signals) -> Option<i32> {
    while let Some(sig) = signals.next().await {
        if sig == SIGTERM || sig == SIGINT {
            return Some(sig);
        }
    }
    None
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// The wall clock's jump since the last check, when it is larger than [`CLOCK_JUMP`]: the
/// difference between wall-clock and monotonic time elapsed. Updates `last` either way.
fn clock_jump(last: &mut (chrono::DateTime<Utc>, std::time::Instant)) -> Option<chrono::TimeDelta> {
    let now = (Utc::now(), std::time::Instant::now());
    let wall = now.0 - last.0;
    let mono = chrono::TimeDelta::from_std(now.1 - last.1).unwrap_or(chrono::TimeDelta::MAX);
    *last = now;
    let jump = wall - mono;
    (jump.abs() > CLOCK_JUMP).then_some(jump)
}

impl Daemon {
    fn slot(&mut self, stream: &str) -> Arc<Slot> {
        self.slots.entry(stream.to_string()).or_default().clone()
    }

    /// (Re-)arms every enabled stream's next firing. At start, a firing missed while the
    /// daemon was down runs now, once. One read and one write of the database for all
    /// streams, so that start and reload stay fast with thousands of streams.
    /// On reload (`previous` set), a stream whose schedule did not change keeps its armed job.
    async fn arm_all(&mut self, at_start: bool, previous: Option<&Config>) {
        let keep = |spec: &crate::config::StreamSpec| -> bool {
            previous
                .and_then(|p| p.streams.get(&spec.name))
                .is_some_and(|old| {
                    old.enabled == spec.enabled
                        && format!("{:?}", old.schedule) == format!("{:?}", spec.schedule)
                })
        };
        let stale: Vec<String> = self
            .jobs
            .keys()
            .filter(|name| match self.config.streams.get(*name) {
                None => true,
                Some(spec) => !keep(spec),
            })
            .cloned()
            .collect();
        for name in stale {
            if let Some(armed) = self.jobs.remove(&name) {
                let _ = self.sched.remove(&armed.id).await;
            }
        }
        let now = Utc::now();
        let inputs = if at_start {
            match self.store.schedule_inputs().await {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the last runs; scheduling from now");
                    Default::default()
                }
            }
        } else {
            Default::default()
        };
        let streams: Vec<_> = self.config.streams.values().cloned().collect();
        let mut next_runs = Vec::with_capacity(streams.len());
        for spec in streams {
            self.slot(&spec.name);
            if self.jobs.contains_key(&spec.name) {
                continue;
            }
            if !spec.enabled {
                next_runs.push((spec.name.clone(), None));
                continue;
            }
            let mut next = if at_start {
                match inputs.get(&spec.name) {
                    // The last run was stopped or killed before it finished: finish the job now.
                    Some((_, true)) => now,
                    Some((last, false)) => spec.schedule.first_after_start(now, *last),
                    None => spec.schedule.first_after_start(now, None),
                }
            } else {
                spec.schedule.next_after(now)
            };
            if next <= now {
                self.start_run(&spec.name, "schedule");
                next = spec.schedule.next_after(now);
            }
            self.arm_job(&spec.name, next).await;
            next_runs.push((spec.name.clone(), Some(next)));
        }
        if let Err(e) = self.store.set_next_runs(next_runs).await {
            tracing::warn!(error = %e, "cannot record the next run times");
        }
    }

    async fn arm(&mut self, stream: &str, at: chrono::DateTime<Utc>) {
        self.arm_job(stream, at).await;
        if let Err(e) = self.store.set_next_run(stream, Some(at)).await {
            tracing::warn!(stream, error = %e, "cannot record the next run time");
        }
    }

    async fn arm_job(&mut self, stream: &str, at: chrono::DateTime<Utc>) {
        let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let tx = self.events.clone();
        let name = stream.to_string();
        self.generation += 1;
        let generation = self.generation;
        let job = Job::new_one_shot_async(delay, move |_, _| {
            let tx = tx.clone();
            let name = name.clone();
            Box::pin(async move {
                // Fired before the slot (whole seconds, 500 ms polling): wait out the rest on
                // tokio's monotonic clock, so that the run starts at its slot.
                if let Ok(early) = (at - Utc::now()).to_std() {
                    tokio::time::sleep(early.min(MAX_EARLY_WAIT)).await;
                }
                let _ = tx.send(Event::Tick(name, generation));
            })
        });
        match job {
            Ok(job) => match self.sched.add(job).await {
                Ok(id) => {
                    self.jobs.insert(
                        stream.to_string(),
                        Armed {
                            id,
                            generation,
                            slot: at,
                        },
                    );
                }
                Err(e) => tracing::error!(stream, error = %e, "cannot arm the schedule"),
            },
            Err(e) => tracing::error!(stream, error = %e, "cannot arm the schedule"),
        }
    }

    /// The job armed for `slot` fired: run the stream, and arm the slot after it (never
    /// `slot` again, however early the job fired).
    async fn on_tick(&mut self, stream: &str, slot: chrono::DateTime<Utc>) {
        let Some(spec) = self.config.streams.get(stream).cloned() else {
            return;
        };
        if !spec.enabled {
            return;
        }
        self.start_run(stream, "schedule");
        let next = spec.schedule.next_slot(slot, Utc::now());
        self.arm(stream, next).await;
    }

    /// A run ended. One whose start the state could not record did not run: the stream
    /// waits before it tries again (doubling, see [`STATE_BACKOFF_FIRST`]) instead of trying
    /// at every slot; one that was recorded ends the wait.
    async fn on_run_ended(&mut self, stream: &str, recorded: bool) {
        if recorded {
            if self.backoff.remove(stream).is_some() {
                tracing::info!(
                    stream,
                    "the state can be written again; the stream is back on its schedule"
                );
            }
            return;
        }
        let wait = match self.backoff.get(stream) {
            Some(w) => (*w * 2).min(STATE_BACKOFF_MAX),
            None => STATE_BACKOFF_FIRST,
        };
        self.backoff.insert(stream.to_string(), wait);
        let Some(armed) = self.jobs.get(stream) else {
            return;
        };
        let retry = Utc::now() + chrono::TimeDelta::from_std(wait).unwrap_or_default();
        let at = if armed.slot < retry {
            if let Some(armed) = self.jobs.remove(stream) {
                let _ = self.sched.remove(&armed.id).await;
            }
            self.arm(stream, retry).await;
            retry
        } else {
            armed.slot
        };
        tracing::warn!(
            stream,
            next_try = %at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            wait_secs = wait.as_secs(),
            "the state cannot be written: the stream does not run until it can, and tries again then"
        );
    }

    /// Passes a change of the state's writability on to the lock file, where `usher status`
    /// reads it (the database cannot hold it: it is what cannot be written).
    fn note_state(&self, seen: &mut u64) {
        let state = &crate::metrics::METRICS.state;
        let generation = state.generation.load(Ordering::Relaxed);
        if generation == *seen {
            return;
        }
        *seen = generation;
        if let Err(e) = self.lock.note_state(state.error().as_ref()) {
            tracing::warn!(lock = %self.lock.path.display(), error = %e, "cannot note the state's trouble in the lock file for `usher status`");
        }
    }

    /// Several instances: one turn of the lease keeper, and what its changes mean here.
    async fn lease_turn(&mut self) {
        let Some(mut keeper) = self.leases.take() else {
            return;
        };
        // Groups with a run going (never given back mid-run).
        let running: HashSet<String> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.run_lock.try_lock().is_err())
            .filter_map(|(s, _)| keeper.group_of(s).map(str::to_string))
            .collect();
        let busy = |key: &str| running.contains(key);
        let changes = match keeper.turn(&busy).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot renew or take leases; this instance's runs stop at their next write if its leases run out");
                Vec::new()
            }
        };
        let me = keeper.me.clone();
        self.leases = Some(keeper);
        for change in changes {
            match change {
                super::lease::Change::Acquired { lease, streams } => {
                    self.took_over(&me, lease, streams).await
                }
                super::lease::Change::Lost { key, streams } => {
                    tracing::warn!(group = %key, streams = ?streams,
                        "lost the lease of a stream group (this instance could not renew it in time): another instance runs these streams now; a run of ours commits nothing more");
                }
                super::lease::Change::Released { key } => {
                    tracing::info!(group = %key, "gave a stream group back (more than this instance's share): another instance takes it");
                }
            }
        }
    }

    /// A lease just taken. When its holder let it expire (it died, or was paused or cut
    /// off) while writing to a stream (its `in_doubt` row is there), that holder's writes
    /// may still land until its lease's expiry plus the longest timeout of the stream's
    /// connections: the row is moved to then (a run waits for it, plus the settle margin).
    /// A stream it was not writing to has nothing in doubt and runs at once. Its runs left
    /// open are closed as `lost lease`, and a stream whose run was cut short runs now. The group's rate budgets are taken in as
    /// the state holds them (the calls the old holder made still count).
    async fn took_over(
        &mut self,
        me: &str,
        lease: crate::store::leases::Acquired,
        streams: Vec<String>,
    ) {
        tracing::info!(group = %lease.key, epoch = lease.epoch, streams = ?streams,
            previous = lease.previous_holder.as_deref().unwrap_or("none"), "took the lease of a stream group");
        if let Ok(saved) = super::budget_log::saved_budgets(&self.store).await {
            self.http.restore_budgets(saved);
        }
        self.check_online(Some(&streams));
        match super::lease::inherit(&self.store, &self.config, me, &lease, &streams).await {
            Ok(n) if n > 0 => {
                tracing::warn!(group = %lease.key, runs = n, previous = lease.previous_holder.as_deref().unwrap_or("none"), "closed runs the previous holder left open; running their streams now");
                for s in &streams {
                    if self.config.streams.get(s).is_some_and(|spec| spec.enabled) {
                        self.start_run(s, "schedule");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot close the previous holder's runs"),
        }
    }

    /// Checks seats.io and CDP connections online (integration settings): every one, or
    /// with several instances those of `streams` (default: the streams this instance
    /// holds, and connections no stream uses), so that no instance calls a vendor for a
    /// stream another one holds.
    fn check_online(&self, streams: Option<&[String]>) {
        let only = self.leases.as_ref().map(|k| {
            let conns = |names: &mut dyn Iterator<Item = &String>| -> HashSet<String> {
                names
                    .filter_map(|s| self.config.streams.get(s))
                    .flat_map(|spec| [spec.source.clone(), spec.target.clone()])
                    .collect()
            };
            match streams {
                Some(s) => conns(&mut s.iter()),
                None => {
                    let held: Vec<String> =
                        k.held_keys().iter().flat_map(|g| k.streams_of(g)).collect();
                    // A connection no stream uses is no stream's business: every
                    // instance checks it.
                    let used = conns(&mut self.config.streams.keys());
                    let unused = self
                        .config
                        .connections
                        .keys()
                        .filter(|c| !used.contains(*c))
                        .cloned();
                    conns(&mut held.iter()).into_iter().chain(unused).collect()
                }
            }
        });
        if only
            .as_ref()
            .is_some_and(std::collections::HashSet::is_empty)
        {
            return;
        }
        super::online_check::spawn(
            &self.tracker,
            self.store.clone(),
            self.http.clone(),
            self.config.clone(),
            self.shutdown.clone(),
            only,
        );
    }

    /// Starts a run unless one of the same stream is going.
    fn start_run(&mut self, stream: &str, trigger: &'static str) {
        let Some(spec) = self.config.streams.get(stream).cloned() else {
            tracing::warn!(stream, "no such stream in the configuration");
            return;
        };
        if self.shutdown.is_cancelled() {
            return;
        }
        // Several instances: only the holder of the stream's group runs it, on a store
        // whose every write checks that lease.
        let store = match &self.leases {
            None => self.store.clone(),
            Some(k) => match k.fence(stream) {
                Some(f) => self.store.fenced(f, self.config.daemon.settle_margin),
                None => {
                    tracing::debug!(stream, "not run here: another instance holds its lease");
                    if trigger != "schedule" {
                        tracing::info!(
                            stream,
                            "triggered, but another instance holds the stream's lease: it runs there"
                        );
                    }
                    return;
                }
            },
        };
        let slot = self.slot(stream);
        // An operator action waiting for the stream (a reset) counts as holding it: a run
        // started now would stop at its first page boundary.
        let busy = slot.interrupt.load(Ordering::SeqCst);
        let guard = if busy {
            None
        } else {
            slot.run_lock.clone().try_lock_owned().ok()
        };
        let Some(guard) = guard else {
            if trigger == "schedule" {
                tracing::warn!(stream, "tick skipped: the previous run is still going");
            } else {
                tracing::info!(
                    stream,
                    "the stream is busy (a run or an operator action); the trigger runs it as soon as it is free"
                );
                slot.trigger_pending.store(true, Ordering::SeqCst);
            }
            return;
        };
        let ctx = RunCtx {
            doubt: InDoubt::new(&store, &spec.name, self.config.daemon.settle_margin),
            http: super::lease::http_for(&self.http, &store, &self.config),
            store,
            config: self.config.clone(),
            spec,
            cancel: self.abandon.clone(),
            stop: self.shutdown.clone(),
            interrupt: slot.interrupt.clone(),
            clock: crate::clock::Clock::process(),
            backfill: None,
            kind_run: self.kind_run,
        };
        let tx = self.events.clone();
        let name = stream.to_string();
        let permits = self.permits.clone();
        self.tracker.spawn(async move {
            let permit = tokio::select! {
                p = permits.acquire_owned() => p.ok(),
                _ = ctx.stopping() => None,
            };
            if permit.is_some() {
                let report = run_stream(&ctx, trigger).await;
                let _ = tx.send(Event::RunEnded {
                    stream: name.clone(),
                    recorded: report.outcome != super::NOT_RECORDED,
                });
            }
            drop(permit);
            drop(guard);
            let _ = tx.send(Event::Free(name));
        });
    }

    /// SIGHUP: load the files again; on any problem keep the running configuration.
    async fn reload(&mut self) {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now()
                .unwrap_or(sd_notify::NotifyState::Status("reloading")),
        ]);
        match config::load(&self.source) {
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "configuration problem");
                }
                tracing::error!(
                    problems = problems.len(),
                    "reload refused: the new configuration is invalid; the running configuration stays"
                );
                self.reloads += 1;
                self.verdict(false, problems.iter().map(|p| p.to_string()).collect());
            }
            Ok(mut new) => {
                if new.daemon.state_dir != self.config.daemon.state_dir {
                    tracing::warn!(
                        "daemon.state_dir changed; that takes a restart. Keeping {}",
                        self.config.daemon.state_dir.display()
                    );
                    new.daemon.state_dir = self.config.daemon.state_dir.clone();
                }
                for w in &new.warnings {
                    tracing::warn!(warning = %w, "configuration warning");
                }
                if new.metrics_listen != self.config.metrics_listen {
                    tracing::warn!("metrics.listen changed; that takes a restart");
                }
                // Integration settings: a reload lifts the pauses of CDP configuration errors.
                match self.store.lift_pauses(None).await {
                    Ok(n) if n > 0 => tracing::info!(streams = n, "reload lifted paused streams"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot lift paused streams"),
                }
                let previous = std::mem::replace(&mut self.config, Arc::new(new));
                if let Some(k) = self.leases.as_mut() {
                    k.regroup(&self.config);
                }
                *self.shared.write().unwrap_or_else(|p| p.into_inner()) = self.config.clone();
                // S-360
                if let Some(r) = &self.receiver {
                    r.update(&self.config);
                }
                self.arm_all(false, Some(&previous)).await;
                self.check_online(None);
                tracing::info!(
                    streams = self.config.streams.len(),
                    "configuration reloaded"
                );
                self.reloads += 1;
                self.verdict(true, Vec::new());
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    /// Writes the verdict of the current reload generation for `usher reload`.
    fn verdict(&self, accepted: bool, problems: Vec<String>) {
        let v = super::reload::Verdict {
            pid: std::process::id(),
            generation: self.reloads,
            accepted,
            problems,
            streams: self.config.streams.len(),
            at: Utc::now(),
        };
        if let Err(e) = super::reload::write(&self.config.daemon.state_dir, &v) {
            tracing::warn!(error = %e, file = %super::reload::path(&self.config.daemon.state_dir).display(),
                "cannot write the reload verdict; `usher reload` will not see this daemon's answer");
        }
    }

    /// Acts on waiting control files. Several instances: a file for a stream another
    /// instance holds is forwarded to it through the state (a request row).
    fn process_control(&mut self) {
        let state_dir = self.config.daemon.state_dir.clone();
        // Resets before triggers: "reset, then run now" given together runs once, from the
        // start, as soon as the reset is done (the trigger waits for the stream to be free).
        let mut requests = control::pending(&state_dir);
        requests.sort_by_key(|r| r.action != Ok(Action::Reset));
        for req in requests {
            let origin = Origin::File(req.path.clone());
            if self.in_progress.contains(&origin) {
                continue;
            }
            let action = match req.action {
                Ok(a) => a,
                Err(ref bad) => {
                    tracing::error!(file = %req.path.display(), action = %bad, "unknown control action (reset or trigger); file removed");
                    self.refuse(
                        origin,
                        req.actor,
                        req.stream,
                        format!("unknown action {bad:?}"),
                    );
                    continue;
                }
            };
            if !self.config.streams.contains_key(&req.stream) {
                tracing::error!(file = %req.path.display(), stream = %req.stream, "control file names an unknown stream; file removed");
                let why = format!("unknown stream {:?}", req.stream);
                self.refuse(origin, req.actor, req.stream, why);
                continue;
            }
            let elsewhere = self
                .leases
                .as_ref()
                .is_some_and(|k| k.fence(&req.stream).is_none());
            if elsewhere {
                self.forward(req, action);
                continue;
            }
            self.carry_out(Pending {
                origin,
                action,
                stream: req.stream,
                actor: req.actor,
            });
        }
    }

    /// Several instances: the requests in the state for streams this instance holds
    /// (written by `usher cursor reset` or `trigger` on any host, or forwarded from another
    /// instance's control file).
    async fn process_requests(&mut self) {
        let Some(keeper) = &self.leases else {
            return;
        };
        let held: Vec<(i64, String, Result<Action, String>, String)> =
            match self.store.requests_open().await {
                Ok(rows) => rows
                    .into_iter()
                    .filter(|r| {
                        !self.config.streams.contains_key(&r.stream)
                            || keeper.fence(&r.stream).is_some()
                    })
                    .map(|r| {
                        let action = match r.action.as_str() {
                            "reset" => Ok(Action::Reset),
                            "trigger" => Ok(Action::Trigger),
                            other => Err(other.to_string()),
                        };
                        (r.id, r.stream, action, r.actor)
                    })
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the operator requests in the state");
                    return;
                }
            };
        let mut held = held;
        held.sort_by_key(|(id, _, action, _)| (*action != Ok(Action::Reset), *id));
        for (id, stream, action, actor) in held {
            let origin = Origin::State(id);
            if self.in_progress.contains(&origin) {
                continue;
            }
            match action {
                Err(bad) => self.refuse(origin, actor, stream, format!("unknown action {bad:?}")),
                Ok(_) if !self.config.streams.contains_key(&stream) => {
                    let why =
                        format!("unknown stream {stream:?} (not in this instance's configuration)");
                    self.refuse(origin, actor, stream, why)
                }
                Ok(action) => {
                    tracing::info!(request = id, stream = %stream, by = %actor, action = action.as_str(), "operator request from the state");
                    self.carry_out(Pending {
                        origin,
                        action,
                        stream,
                        actor,
                    })
                }
            }
        }
    }

    /// This instance's name in `done_by` and the logs.
    fn me(&self) -> String {
        match &self.leases {
            Some(k) => k.me.clone(),
            None => format!("pid {}", std::process::id()),
        }
    }

    /// A control file for a stream another instance holds: stored as a request for it.
    fn forward(&mut self, req: control::Request, action: Action) {
        let origin = Origin::File(req.path.clone());
        self.in_progress.insert(origin.clone());
        let store = self.store.clone();
        let tx = self.events.clone();
        let actor = format!("{} (control file on {})", req.actor, control::host_name());
        self.tracker.spawn(async move {
            match store
                .request(&req.stream, action.as_str(), &actor, &control::host_name())
                .await
            {
                Ok(id) => {
                    tracing::info!(stream = %req.stream, request = id, action = action.as_str(), "another instance holds the stream's lease: the control file is passed on to it through the state");
                    let _ = std::fs::remove_file(&req.path);
                }
                Err(e) => tracing::error!(stream = %req.stream, error = %e, "cannot pass the control file on to the stream's holder; it stays"),
            }
            let _ = tx.send(Event::ControlDone(origin));
        });
    }

    /// Carries out a reset or a trigger at the stream's next safe point, then closes the
    /// request (removes the file, or writes the outcome into the state's request row).
    fn carry_out(&mut self, p: Pending) {
        self.in_progress.insert(p.origin.clone());
        let (store, tx, me) = (self.store.clone(), self.events.clone(), self.me());
        match p.action {
            Action::Trigger => {
                tracing::info!(stream = %p.stream, by = %p.actor, "trigger requested");
                self.start_run(&p.stream, "trigger");
                self.tracker.spawn(async move {
                    if let Err(e) = store
                        .audit(&p.actor, "trigger", Some(&p.stream), "run now")
                        .await
                    {
                        tracing::error!(error = %e, "cannot write the audit trail");
                    }
                    close(
                        &store,
                        &p.origin,
                        &me,
                        "run started (or runs as soon as the stream is free)",
                    )
                    .await;
                    let _ = tx.send(Event::ControlDone(p.origin));
                });
            }
            Action::Reset => {
                let slot = self.slot(&p.stream);
                // Under a lease the reset is written through the stream's fence: an
                // instance that lost the lease meanwhile writes nothing.
                let store_w = match self.leases.as_ref().and_then(|k| k.fence(&p.stream)) {
                    Some(f) => self.store.fenced(f, self.config.daemon.settle_margin),
                    None => self.store.clone(),
                };
                slot.interrupt.store(true, Ordering::SeqCst);
                self.tracker.spawn(async move {
                    // Waits for a run in flight to reach its page boundary.
                    let guard = slot.run_lock.clone().lock_owned().await;
                    let result = match store_w.reset_cursor(&p.stream, &p.actor, "cursor reset by an operator request").await {
                        Ok(old) => {
                            tracing::info!(stream = %p.stream, by = %p.actor, old_cursor = ?old, "cursor reset; the next run starts from the beginning");
                            format!("cursor reset (was {})", old.map(|c| format!("{c:?}")).unwrap_or_else(|| "at the start".into()))
                        }
                        Err(e) => {
                            tracing::error!(stream = %p.stream, error = %e, "cursor reset failed");
                            format!("failed: {e}")
                        }
                    };
                    slot.interrupt.store(false, Ordering::SeqCst);
                    drop(guard);
                    close(&store, &p.origin, &me, &result).await;
                    let _ = tx.send(Event::Free(p.stream.clone()));
                    let _ = tx.send(Event::ControlDone(p.origin));
                });
            }
        }
    }

    /// A request that names an unknown action or stream: audited, closed as refused.
    fn refuse(&mut self, origin: Origin, actor: String, stream: String, why: String) {
        self.in_progress.insert(origin.clone());
        let (store, tx, me) = (self.store.clone(), self.events.clone(), self.me());
        self.tracker.spawn(async move {
            let _ = store
                .audit(&actor, "control-rejected", Some(&stream), &why)
                .await;
            close(&store, &origin, &me, &format!("refused: {why}")).await;
            let _ = tx.send(Event::ControlDone(origin));
        });
    }
}
