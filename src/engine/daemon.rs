//! The long-running daemon: schedules, runs, signals, control files, reload, shutdown.
//!
//! One task (the main loop) owns the configuration and the schedule; runs are spawned onto a
//! task tracker. Each stream has a slot whose run lock makes sure two runs of one stream
//! never overlap: a tick that finds the previous run still going is skipped and logged.
//!
//! Schedules go through tokio-cron-scheduler as one-shot jobs armed for the instant that
//! `schedule.rs` computes, and re-armed after each firing. That keeps daily local-time runs
//! right across DST changes (the crate's own timezone jobs are not) and means a reload only
//! has to re-arm the jobs.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
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

enum Event {
    /// A schedule fired. The generation tells stale jobs (from before a reload) apart.
    Tick(String, u64),
    RunDone(String),
    ControlDone(PathBuf),
}

pub struct Daemon {
    source: config::Source,
    config: Arc<Config>,
    store: Store,
    http: Http,
    slots: HashMap<String, Arc<Slot>>,
    sched: JobScheduler,
    jobs: HashMap<String, Uuid>,
    generation: u64,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Control files being acted on (so that a poll does not pick them up twice).
    in_progress: HashSet<PathBuf>,
    _lock: StateLock,
}

/// Starts the daemon and runs it until SIGTERM/SIGINT. Returns once every run has reached
/// a committed point or the shutdown timeout has passed.
pub async fn run(
    source: config::Source,
    config: Config,
    store: Store,
    lock: StateLock,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sched = JobScheduler::new().await?;
    sched.start().await?;
    let mut signals = signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1])?;
    let state_dir = config.daemon.state_dir.clone();
    control::ensure_dir(&state_dir)?;
    let mut d = Daemon {
        source,
        config: Arc::new(config),
        store,
        http: Http::new(),
        slots: HashMap::new(),
        sched,
        jobs: HashMap::new(),
        generation: 0,
        events: tx,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        in_progress: HashSet::new(),
        _lock: lock,
    };
    let closed = d.store.close_interrupted_runs().await?;
    if closed > 0 {
        tracing::warn!(
            runs = closed,
            "closed runs left unfinished by a previous daemon"
        );
    }
    d.arm_all(true).await;
    d.process_control();

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
                    if generation == d.generation {
                        d.on_tick(&stream).await;
                    }
                }
                Event::RunDone(stream) => {
                    if let Some(slot) = d.slots.get(&stream)
                        && slot.trigger_pending.swap(false, Ordering::SeqCst) {
                            d.start_run(&stream, "trigger");
                        }
                }
                Event::ControlDone(path) => {
                    d.in_progress.remove(&path);
                }
            },
            _ = control_tick.tick() => d.process_control(),
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
        "stopping: runs finish their page and commit"
    );
    d.shutdown.cancel();
    let _ = d.sched.shutdown().await;
    d.tracker.close();
    if tokio::time::timeout(timeout, d.tracker.wait())
        .await
        .is_err()
    {
        tracing::error!(
            "runs did not stop within {}s; exiting anyway (uncommitted pages are pulled again at the next start)",
            timeout.as_secs()
        );
    }
    tracing::info!("stopped");
    Ok(())
}

impl Daemon {
    fn slot(&mut self, stream: &str) -> Arc<Slot> {
        self.slots.entry(stream.to_string()).or_default().clone()
    }

    /// (Re-)arms every enabled stream's next firing. At start, a firing missed while the
    /// daemon was down runs now, once.
    async fn arm_all(&mut self, at_start: bool) {
        self.generation += 1;
        for (_, id) in self.jobs.drain() {
            let _ = self.sched.remove(&id).await;
        }
        let now = Utc::now();
        let streams: Vec<_> = self.config.streams.values().cloned().collect();
        for spec in streams {
            self.slot(&spec.name);
            if !spec.enabled {
                let _ = self.store.set_next_run(&spec.name, None).await;
                continue;
            }
            let next = if at_start {
                let (last, cut_short) = self.store.last_run_start(&spec.name).await.unwrap_or((None, false));
                if cut_short {
                    // The last run was stopped or killed before it finished: finish the job now.
                    now
                } else {
                    spec.schedule.first_after_start(now, last)
                }
            } else {
                spec.schedule.next_after(now)
            };
            if next <= now {
                self.start_run(&spec.name, "schedule");
                let after = spec.schedule.next_after(now);
                self.arm(&spec.name, after).await;
            } else {
                self.arm(&spec.name, next).await;
            }
        }
    }

    async fn arm(&mut self, stream: &str, at: chrono::DateTime<Utc>) {
        let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let tx = self.events.clone();
        let name = stream.to_string();
        let generation = self.generation;
        let job = Job::new_one_shot_async(delay, move |_, _| {
            let tx = tx.clone();
            let name = name.clone();
            Box::pin(async move {
                let _ = tx.send(Event::Tick(name, generation));
            })
        });
        match job {
            Ok(job) => match self.sched.add(job).await {
                Ok(id) => {
                    self.jobs.insert(stream.to_string(), id);
                }
                Err(e) => tracing::error!(stream, error = %e, "cannot arm the schedule"),
            },
            Err(e) => tracing::error!(stream, error = %e, "cannot arm the schedule"),
        }
        if let Err(e) = self.store.set_next_run(stream, Some(at)).await {
            tracing::warn!(stream, error = %e, "cannot record the next run time");
        }
    }

    async fn on_tick(&mut self, stream: &str) {
        let Some(spec) = self.config.streams.get(stream).cloned() else {
            return;
        };
        if !spec.enabled {
            return;
        }
        self.start_run(stream, "schedule");
        let next = spec.schedule.next_after(Utc::now());
        self.arm(stream, next).await;
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
        let slot = self.slot(stream);
        let Ok(guard) = slot.run_lock.clone().try_lock_owned() else {
            if trigger == "schedule" {
                tracing::warn!(stream, "tick skipped: the previous run is still going");
            } else {
                tracing::info!(
                    stream,
                    "a run is going; the trigger runs the stream again after it"
                );
                slot.trigger_pending.store(true, Ordering::SeqCst);
            }
            return;
        };
        let ctx = RunCtx {
            store: self.store.clone(),
            config: self.config.clone(),
            spec,
            http: self.http.clone(),
            cancel: self.shutdown.clone(),
            interrupt: slot.interrupt.clone(),
        };
        let tx = self.events.clone();
        let name = stream.to_string();
        self.tracker.spawn(async move {
            run_stream(&ctx, trigger).await;
            drop(guard);
            let _ = tx.send(Event::RunDone(name));
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
                self.config = Arc::new(new);
                self.arm_all(false).await;
                tracing::info!(
                    streams = self.config.streams.len(),
                    "configuration reloaded"
                );
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    /// Acts on waiting control files.
    fn process_control(&mut self) {
        let state_dir = self.config.daemon.state_dir.clone();
        for req in control::pending(&state_dir) {
            if self.in_progress.contains(&req.path) {
                continue;
            }
            let action = match req.action {
                Ok(a) => a,
                Err(ref bad) => {
                    tracing::error!(file = %req.path.display(), action = %bad, "unknown control action (reset or trigger); file removed");
                    self.audit_and_remove(
                        req.clone(),
                        "control-rejected",
                        format!("unknown action {bad:?}"),
                    );
                    continue;
                }
            };
            if !self.config.streams.contains_key(&req.stream) {
                tracing::error!(file = %req.path.display(), stream = %req.stream, "control file names an unknown stream; file removed");
                self.audit_and_remove(
                    req.clone(),
                    "control-rejected",
                    format!("unknown stream {:?}", req.stream),
                );
                continue;
            }
            self.in_progress.insert(req.path.clone());
            match action {
                Action::Trigger => {
                    tracing::info!(stream = %req.stream, by = %req.actor, "trigger requested");
                    self.start_run(&req.stream, "trigger");
                    let store = self.store.clone();
                    let tx = self.events.clone();
                    self.tracker.spawn(async move {
                        if let Err(e) = store
                            .audit(&req.actor, "trigger", Some(&req.stream), "run now")
                            .await
                        {
                            tracing::error!(error = %e, "cannot write the audit trail");
                        }
                        let _ = std::fs::remove_file(&req.path);
                        let _ = tx.send(Event::ControlDone(req.path));
                    });
                }
                Action::Reset => {
                    let slot = self.slot(&req.stream);
                    let store = self.store.clone();
                    let tx = self.events.clone();
                    slot.interrupt.store(true, Ordering::SeqCst);
                    self.tracker.spawn(async move {
                        // Waits for a run in flight to reach its page boundary.
                        let guard = slot.run_lock.clone().lock_owned().await;
                        match store.reset_cursor(&req.stream, &req.actor, "cursor reset by control file").await {
                            Ok(old) => tracing::info!(stream = %req.stream, by = %req.actor, old_cursor = ?old, "cursor reset; the next run starts from the beginning"),
                            Err(e) => tracing::error!(stream = %req.stream, error = %e, "cursor reset failed"),
                        }
                        slot.interrupt.store(false, Ordering::SeqCst);
                        drop(guard);
                        let _ = std::fs::remove_file(&req.path);
                        let _ = tx.send(Event::ControlDone(req.path));
                    });
                }
            }
        }
    }

    fn audit_and_remove(&mut self, req: control::Request, action: &'static str, detail: String) {
        let store = self.store.clone();
        self.in_progress.insert(req.path.clone());
        let tx = self.events.clone();
        self.tracker.spawn(async move {
            let _ = store
                .audit(&req.actor, action, Some(&req.stream), &detail)
                .await;
            let _ = std::fs::remove_file(&req.path);
            let _ = tx.send(Event::ControlDone(req.path));
        });
    }
}
