//! `run`, `validate`, `reload`, `status`, `cursor`, `trigger`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{EX_CONFIG, EX_DATAERR, EX_FAIL, EX_OK, report_problems};
use crate::config::{self, Config, LogFormat};
use crate::engine::control::{self, Action};
use crate::engine::in_doubt::InDoubt;
use crate::engine::lock::{self, LockError, process_state};
use crate::engine::{RunCtx, daemon, run_stream};
use crate::http::Http;
use crate::store::{Store, StoreError};

pub(super) fn load(source: &config::Source) -> Result<Config, i32> {
    config::load(source).map_err(|p| report_problems(&p))
}

pub(super) fn store_error(e: &StoreError) -> i32 {
    eprintln!("usher: {e}");
    let fault = e.fault();
    if fault == crate::store::Fault::Transient {
        eprintln!(
            "usher: this may pass (exit 75: systemd starts usher again); once the disk has room, the I/O error is gone or the file is free, it goes on by itself"
        );
    }
    super::fault_code(fault)
}

/// A state-directory lock that could not be taken: 1 when another process holds it, else
/// by what is at fault (as the state's own errors).
fn lock_error(e: &LockError) -> i32 {
    eprintln!("usher: {e}");
    e.fault().map_or(EX_FAIL, super::fault_code)
}

pub async fn run(source: config::Source, format: LogFormat) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _guard = crate::logging::init(&config.log, format);
    for w in &config.warnings {
        tracing::warn!(warning = %w, "configuration warning");
    }
    let state_dir = config.daemon.state_dir.clone();
    let lock = match lock::acquire(&state_dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "not starting");
            return lock_error(&e);
        }
    };
    let checked = Instant::now();
    let opened = match &config.daemon.postgres {
        None => open_checked(&state_dir).await,
        Some(pg) => Store::open_postgres(pg).await,
    };
    let store = match opened {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "not starting");
            return store_error(&e);
        }
    };
    tracing::info!(
        seconds = checked.elapsed().as_secs_f64(),
        state = %store.describe(),
        "state database checked and migrated"
    );
    match daemon::run(source, config, store, lock, crate::streams::RUN).await {
        Ok(daemon::Ended::Clean) => EX_OK,
        Ok(daemon::Ended::Abandoned) => EX_FAIL,
        Ok(daemon::Ended::StateGone) => EX_DATAERR,
        Err(e) => {
            tracing::error!(error = %e, "the daemon failed");
            eprintln!("usher: {e:#}");
            match e.downcast_ref::<StoreError>() {
                Some(se) => super::fault_code(se.fault()),
                None => EX_FAIL,
            }
        }
    }
}

/// [`Store::open_checked`] on the blocking pool. `quick_check` reads the whole file (about
/// 3 s a GB from the page cache, 30 s a GB from a slow disk): meanwhile systemd is told to
/// extend its start timeout, every 10 s, so that a large state does not fail the start.
async fn open_checked(state_dir: &std::path::Path) -> Result<Store, StoreError> {
    let dir = state_dir.to_path_buf();
    let mut task = tokio::task::spawn_blocking(move || Store::open_checked(&dir));
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut task => return r.map_err(|e| StoreError::Task(e.to_string()))?,
            _ = tick.tick() => {
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::ExtendTimeoutUsec(30_000_000),
                    sd_notify::NotifyState::Status("checking the state database (quick_check)"),
                ]);
            }
        }
    }
}

pub async fn validate(source: config::Source, online: bool) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in &config.warnings {
        println!("warning: {w}");
    }
    println!(
        "configuration is valid: {} connection(s), {} stream(s), read from {}",
        config.connections.len(),
        config.streams.len(),
        config
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Integration settings: each company's integration blocks.
    for i in &config.settings.integrations {
        println!(
            "integration {} of company {:?}: {}",
            i.integration, i.company, i.why
        );
    }
    if !online {
        return EX_OK;
    }
    let http = Http::new();
    let cancel = CancellationToken::new();
    let mut bad = 0;
    // The result is kept in the state (when it exists) so that `status` can show it.
    let store = match &config.daemon.postgres {
        None => Store::open_existing(&config.daemon.state_dir)
            .ok()
            .flatten(),
        Some(pg) => Store::open_postgres(pg).await.ok(),
    };
    for conn in config.connections.values() {
        let verdict = crate::connectors::check_online_in(&http, conn, &config, &cancel).await;
        if !verdict.is_valid() {
            bad += 1;
        }
        if let Some(store) = &store {
            let message = match &verdict {
                crate::connectors::Verdict::Valid(m) => m.clone(),
                other => other.to_string(),
            };
            if let Err(e) = store
                .record_online_check(&conn.name, conn.kind.as_str(), verdict.is_valid(), &message)
                .await
            {
                eprintln!("usher: cannot record the check of {:?}: {e}", conn.name);
            }
        }
        println!(
            "connection {:?} ({}): {verdict}",
            conn.name,
            conn.kind.as_str()
        );
    }
    // What each stream's options name on its target exists there: Ticket Co x Airship's
    // venues map to Airship units; SeatGeek → Halo's default site and custom fields.
    for spec in config.streams.values() {
        let lines = match &spec.kind {
            crate::streams::options::StreamKind::TicketCoToAirship(o) => {
                crate::streams::ticketco_airship::check_venues(&http, &config, spec, o, &cancel)
                    .await
            }
            crate::streams::options::StreamKind::SeatGeekToHalo(o) => {
                crate::streams::seatgeek_halo::check_options(&http, &config, spec, o, &cancel).await
            }
            _ => Vec::new(),
        };
        {
            for line in lines {
                match line {
                    Ok(l) => println!("{l}"),
                    Err(l) => {
                        bad += 1;
                        println!("problem: {l}");
                    }
                }
            }
        }
    }
    if bad > 0 { EX_CONFIG } else { EX_OK }
}

/// `usher reload` (the unit's `ExecReload`): the configuration is loaded here exactly as the
/// daemon will load it (same files, environment and credentials: systemd runs ExecReload
/// in the service's own context), so a broken one is refused before the daemon is
/// bothered; then SIGHUP, and the daemon's own verdict (`engine::reload`), which is what
/// counts. Exit 0 taken, 78 refused (the daemon keeps running the old configuration), 1
/// no daemon to reload or no verdict in time.
pub fn reload(source: config::Source, timeout: Duration) -> i32 {
    use crate::engine::reload;
    let refused = |code| {
        eprintln!(
            "usher: reload refused: the running daemon keeps its configuration; fix the problems above and reload again"
        );
        code
    };
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return refused(code),
    };
    let state_dir = config.daemon.state_dir.clone();
    let Some(pid) = lock::holder(&state_dir) else {
        eprintln!(
            "usher: no usher daemon runs on the state directory {}; nothing to reload (the configuration is valid)",
            state_dir.display()
        );
        return EX_FAIL;
    };
    // Only a daemon that said it is ready handles SIGHUP; before that the signal would end
    // it (it is still opening the state, or it is an older usher that writes no verdict).
    let before = match reload::read(&state_dir) {
        Some(v) if v.pid == pid => v.generation,
        _ => {
            eprintln!(
                "usher: the daemon (pid {pid}) has not said it is ready (no {} of its own): it is still starting, or was started by an older usher; not signalled. Try again once it runs, or restart it (systemctl restart usher)",
                reload::path(&state_dir).display()
            );
            return EX_FAIL;
        }
    };
    let Some(target) = rustix::process::Pid::from_raw(pid as i32) else {
        return EX_FAIL;
    };
    if let Err(e) = rustix::process::kill_process(target, rustix::process::Signal::HUP) {
        eprintln!("usher: cannot signal the daemon (pid {pid}): {e}");
        return EX_FAIL;
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = reload::read(&state_dir)
            && v.pid == pid
            && v.generation > before
        {
            if v.accepted {
                println!(
                    "configuration reloaded by the daemon (pid {pid}): {} stream(s)",
                    v.streams
                );
                for w in &config.warnings {
                    println!("warning: {w}");
                }
                return EX_OK;
            }
            for p in &v.problems {
                eprintln!("{p}");
            }
            eprintln!(
                "usher: the daemon (pid {pid}) found {} problem(s) in the new configuration",
                v.problems.len()
            );
            return refused(EX_CONFIG);
        }
        if matches!(process_state(pid), None | Some('Z') | Some('X')) {
            eprintln!("usher: the daemon (pid {pid}) ended before it answered the reload");
            return EX_FAIL;
        }
        if Instant::now() > deadline {
            eprintln!(
                "usher: the daemon (pid {pid}) has not answered the reload within {}; see its log (journalctl -u usher)",
                humantime::format_duration(timeout)
            );
            return EX_FAIL;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn status(source: config::Source, json: bool) -> i32 {
    // An invalid configuration does not hide the state: the streams and connections that
    // are valid are shown, and the problems beside them (exit 78 still says it is invalid).
    let (config, problems) = config::load_partial(&source);
    let shown = status_of(&config, &problems, json);
    if !problems.is_empty() {
        if !json {
            println!();
        }
        eprintln!(
            "usher: the configuration is invalid; the state above shows only the streams and connections that are valid"
        );
        return report_problems(&problems);
    }
    shown
}

fn status_of(config: &Config, problems: &[config::Problem], json: bool) -> i32 {
    let state_dir = &config.daemon.state_dir;
    let store = match super::open_existing_state(&config.daemon) {
        Ok(s) => s,
        Err(e) => return store_error(&e),
    };
    let pid = lock::holder(state_dir);
    let state_error = lock::state_note(state_dir);
    let mut status = match crate::status::collect(config, store.as_ref(), pid, state_error) {
        Ok(s) => s,
        Err(e) => return store_error(&e),
    };
    status.config_problems = problems.iter().map(ToString::to_string).collect();
    let mut out = std::io::stdout().lock();
    let r = if json {
        serde_json::to_writer_pretty(&mut out, &status)
            .map_err(std::io::Error::other)
            .and_then(|_| std::io::Write::write_all(&mut out, b"\n"))
    } else {
        crate::status::print_text(
            &status,
            &mut out,
            std::io::IsTerminal::is_terminal(&std::io::stdout()),
        )
    };
    if r.is_err() { EX_FAIL } else { EX_OK }
}

pub(super) fn known_stream(config: &Config, stream: &str) -> Result<(), i32> {
    if config.streams.contains_key(stream) {
        Ok(())
    } else {
        eprintln!("{}", no_stream(config, stream));
        Err(EX_FAIL)
    }
}

/// "no stream X", with the nearest name when one is near and the names there are.
pub(super) fn no_stream(config: &Config, stream: &str) -> String {
    let names: Vec<&str> = config.streams.keys().map(String::as_str).collect();
    format!(
        "usher: no stream {stream:?} in the configuration{} (streams: {})",
        crate::suggest::did_you_mean(stream, &names),
        names.join(", ")
    )
}

pub fn cursor_show(source: config::Source, stream: &str) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = known_stream(&config, stream) {
        return code;
    }
    match super::open_existing_state(&config.daemon) {
        Ok(None) => println!("{stream}: at the start (nothing recorded yet)"),
        Ok(Some(s)) => match s.cursor_sync(stream) {
            Ok(Some(c)) => println!("{stream}: {c}"),
            Ok(None) => println!("{stream}: at the start"),
            Err(e) => return store_error(&e),
        },
        Err(e) => return store_error(&e),
    }
    EX_OK
}

/// Why the CLI is still waiting for the daemon, in words (after a second or two of it).
fn waiting_for(pid: u32, poll: Duration) -> (String, bool) {
    match process_state(pid) {
        Some('T') | Some('t') => (
            format!(
                "it is stopped (SIGSTOP or a debugger) and takes the request once it is continued (kill -CONT {pid})"
            ),
            false,
        ),
        None | Some('Z') | Some('X') => (
            "it is no longer running; the next daemon started on this state takes the request"
                .to_string(),
            true,
        ),
        Some(_) => (
            format!(
                "it looks for requests every {} (daemon.control_poll) and acts at the stream's next page boundary, after a run in flight's page or an operator action on the stream",
                humantime::format_duration(poll)
            ),
            false,
        ),
    }
}

/// Hands a request to the running daemon: control file, SIGUSR1, wait for it to be done.
fn via_daemon(
    state_dir: &std::path::Path,
    poll: Duration,
    pid: u32,
    action: Action,
    stream: &str,
    command: &str,
) -> i32 {
    let path = match control::write(state_dir, action, stream, &control::cli_actor(command)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "usher: cannot write the control file in {}: {e}",
                control::dir(state_dir).display()
            );
            return EX_FAIL;
        }
    };
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::USR1);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut said = false;
    while path.exists() {
        if !said && started.elapsed() >= Duration::from_secs(2) {
            said = true;
            let (why, gone) = waiting_for(pid, poll);
            if gone {
                eprintln!(
                    "usher: the daemon (pid {pid}) has not taken {}: {why}",
                    path.display()
                );
                return EX_FAIL;
            }
            eprintln!(
                "usher: waiting for the daemon (pid {pid}) to take {}: {why}. Ctrl-C stops waiting; the request stays",
                path.display()
            );
        }
        if Instant::now() > deadline {
            eprintln!(
                "usher: the daemon (pid {pid}) has not picked up {} yet; it will at the stream's next safe point",
                path.display()
            );
            return EX_OK;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "{stream}: {} done by the daemon (pid {pid})",
        action.as_str()
    );
    EX_OK
}

/// Several instances (PostgreSQL): the request is written to the state, and the instance
/// that holds the stream's lease carries it out at the stream's next safe point (the same
/// point as for a control file), closes it with its name and the outcome, and audits it
/// with the host that asked. Works from any host with the configuration; no daemon needs
/// to run here.
async fn via_state(
    config: &Config,
    store: &Store,
    action: Action,
    stream: &str,
    command: &str,
) -> i32 {
    let host = control::host_name();
    let actor = control::cli_actor(command);
    let id = match store.request(stream, action.as_str(), &actor, &host).await {
        Ok(id) => id,
        Err(e) => return store_error(&e),
    };
    let started = Instant::now();
    let mut said = false;
    loop {
        match store.request_get(id).await {
            Ok(Some(r)) if r.done_at.is_some() => {
                let by = r.done_by.unwrap_or_default();
                let result = r.result.unwrap_or_default();
                println!(
                    "{stream}: {} done by instance {by}: {result}",
                    action.as_str()
                );
                return if result.starts_with("refused") {
                    EX_FAIL
                } else {
                    EX_OK
                };
            }
            Ok(_) => {}
            Err(e) => return store_error(&e),
        }
        if !said && started.elapsed() >= Duration::from_secs(2) {
            said = true;
            eprintln!(
                "usher: waiting for the instance that holds {stream}'s lease to take request {id}: instances look for requests every {} (daemon.control_poll) and act at the stream's next page boundary. Ctrl-C stops waiting; the request stays",
                humantime::format_duration(config.daemon.control_poll)
            );
        }
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "usher: request {id} has not been taken yet; the stream's holder carries it out at its next safe point"
            );
            return EX_OK;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CLI acting on one stream itself, with no daemon alive on a PostgreSQL state: the
/// stream's group is leased to this process (taken, renewed every third of its length,
/// given back by [`CliLease::release`]), and its writes go through a store fenced by it.
struct CliLease {
    keeper: Arc<tokio::sync::Mutex<crate::engine::lease::Keeper>>,
    renew: tokio::task::JoinHandle<()>,
}

impl CliLease {
    async fn release(self) {
        self.renew.abort();
        self.keeper.lock().await.release_all().await;
    }
}

async fn cli_lease(store: &Store, config: &Config, stream: &str) -> Result<(Store, CliLease), i32> {
    let mut k = crate::engine::lease::Keeper::new(store.clone(), config).for_cli();
    let lease = match k.take_group_of(stream).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            eprintln!(
                "usher: another process holds the lease of {stream}'s group (an instance that stopped renewing it, or another `usher trigger`); try again once it expires (daemon.lease, {})",
                humantime::format_duration(config.daemon.lease)
            );
            return Err(EX_FAIL);
        }
        Err(e) => return Err(store_error(&e)),
    };
    let streams = k.streams_of(&lease.key);
    if let Err(e) = crate::engine::lease::inherit(store, config, &k.me, &lease, &streams).await {
        return Err(store_error(&e));
    }
    let Some(fence) = k.fence(stream) else {
        return Err(EX_FAIL);
    };
    let fenced = store.fenced(fence, config.daemon.settle_margin);
    let keeper = Arc::new(tokio::sync::Mutex::new(k));
    let (period, renewer) = (config.daemon.lease / 3, keeper.clone());
    let renew = tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            match renewer.lock().await.renew_held().await {
                Ok(true) => {}
                Ok(false) => tracing::error!("lost the stream's lease: nothing more is committed"),
                Err(e) => tracing::warn!(error = %e, "cannot renew the stream's lease"),
            }
        }
    });
    Ok((fenced, CliLease { keeper, renew }))
}

/// Whether a daemon is alive on the (PostgreSQL) state: one is, and a request goes to the
/// stream's holder ([`via_state`]); none is, and the CLI acts itself under the lease.
async fn daemons_alive(store: &Store, config: &Config) -> Result<bool, i32> {
    crate::engine::lease::Keeper::new(store.clone(), config)
        .for_cli()
        .live_daemons()
        .await
        .map(|live| !live.is_empty())
        .map_err(|e| store_error(&e))
}

/// `cursor reset` on PostgreSQL: through the holder when a daemon is alive, else here
/// under the stream's lease.
async fn reset_on_postgres(config: &Config, stream: &str) -> i32 {
    let store = match config.daemon.open_store().await {
        Ok(s) => s,
        Err(e) => return store_error(&e),
    };
    match daemons_alive(&store, config).await {
        Ok(true) => return via_state(config, &store, Action::Reset, stream, "cursor reset").await,
        Ok(false) => {}
        Err(code) => return code,
    }
    let (fenced, lease) = match cli_lease(&store, config, stream).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let done = fenced
        .reset_cursor(
            stream,
            &control::cli_actor("cursor reset"),
            "cursor reset by the CLI",
        )
        .await;
    lease.release().await;
    match done {
        Ok(old) => {
            println!(
                "{stream}: cursor reset (was {}); the next run re-imports from the start",
                old.map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| "at the start".into())
            );
            EX_OK
        }
        Err(e) => store_error(&e),
    }
}

pub fn cursor_reset(source: config::Source, stream: &str) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = known_stream(&config, stream) {
        return code;
    }
    if config.daemon.postgres.is_some() {
        return super::block_on(reset_on_postgres(&config, stream));
    }
    let state_dir = config.daemon.state_dir.clone();
    match lock::acquire(&state_dir) {
        Ok(_lock) => {
            let store = match super::open_state_blocking(&config.daemon) {
                Ok(s) => s,
                Err(e) => return store_error(&e),
            };
            match store.reset_cursor_sync(
                stream,
                &control::cli_actor("cursor reset"),
                "cursor reset by the CLI",
            ) {
                Ok(old) => {
                    println!(
                        "{stream}: cursor reset (was {}); the next run re-imports from the start",
                        old.map(|c| format!("{c:?}"))
                            .unwrap_or_else(|| "at the start".into())
                    );
                    EX_OK
                }
                Err(e) => store_error(&e),
            }
        }
        Err(LockError::Held { pid: Some(pid), .. }) => via_daemon(
            &state_dir,
            config.daemon.control_poll,
            pid,
            Action::Reset,
            stream,
            "cursor reset",
        ),
        Err(e) => lock_error(&e),
    }
}

pub async fn trigger(source: config::Source, stream: &str) -> i32 {
    // Through a running daemon no secret is needed here; in this process they are.
    let config = match load(&config::Source {
        read_secrets: false,
        ..source.clone()
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = known_stream(&config, stream) {
        return code;
    }
    // Several instances: a running instance carries the trigger out; with none running,
    // this process runs the stream under its group's lease.
    let mut _lock = None;
    if config.daemon.postgres.is_some() {
        let store = match config.daemon.open_store().await {
            Ok(s) => s,
            Err(e) => return store_error(&e),
        };
        match daemons_alive(&store, &config).await {
            Ok(true) => {
                return via_state(&config, &store, Action::Trigger, stream, "trigger").await;
            }
            Ok(false) => {}
            Err(code) => return code,
        }
    } else {
        let state_dir = config.daemon.state_dir.clone();
        _lock = match lock::acquire(&state_dir) {
            Ok(l) => Some(l),
            Err(LockError::Held { pid: Some(pid), .. }) => {
                // On a terminal, the run the daemon starts is followed until it ends.
                let follow = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let before = if follow {
                    tokio::task::block_in_place(|| last_run_id(&config, stream))
                } else {
                    None
                };
                let code = tokio::task::block_in_place(|| {
                    via_daemon(
                        &state_dir,
                        config.daemon.control_poll,
                        pid,
                        Action::Trigger,
                        stream,
                        "trigger",
                    )
                });
                return match before {
                    Some(before) if code == EX_OK => {
                        follow_in_daemon(&config, stream, pid, before).await
                    }
                    _ => code,
                };
            }
            Err(e) => return lock_error(&e),
        };
    }
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init_cli();
    let mut store = match config.daemon.open_store().await {
        Ok(s) => s,
        Err(e) => return store_error(&e),
    };
    let mut lease = None;
    if store.is_postgres() {
        match cli_lease(&store, &config, stream).await {
            Ok((fenced, l)) => {
                store = fenced;
                lease = Some(l);
            }
            Err(code) => return code,
        }
    }
    let _ = store
        .audit(
            &control::cli_actor("trigger"),
            "trigger",
            Some(stream),
            "run now, in the CLI (no daemon running)",
        )
        .await;
    // Ctrl-C: as SIGTERM to the daemon, the page in flight finishes; a second one abandons it.
    let (stop, cancel) = (CancellationToken::new(), CancellationToken::new());
    let (s, c) = (stop.clone(), cancel.clone());
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
        eprintln!("usher: stopping after the page in flight (Ctrl-C again to abandon it)");
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let config = Arc::new(config);
    let http = crate::engine::budget_log::http_client(&store)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the saved rate budgets; starting them empty");
            Http::new()
        });
    let ctx = RunCtx {
        kind_run: crate::streams::RUN,
        doubt: InDoubt::new(&store, stream, config.daemon.settle_margin),
        http: crate::engine::lease::http_for(&http, &store, &config),
        store,
        spec: config.streams[stream].clone(),
        config,
        cancel,
        stop,
        interrupt: Default::default(),
        clock: crate::clock::Clock::process(),
        backfill: None,
    };
    // Pages and waits as they happen, so that a long Retry-After reads as a wait.
    let done = CancellationToken::new();
    let shown = crate::progress::subscribe().map(|rx| {
        tokio::spawn(show_progress(
            rx,
            stream.to_string(),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            done.clone(),
        ))
    });
    // On a worker of the runtime, as the daemon runs it (the HTTP connections' tasks then
    // share its thread instead of waking the main one for every answer).
    let report = tokio::spawn(async move { run_stream(&ctx, "trigger").await }).await;
    done.cancel();
    if let Some(shown) = shown {
        let _ = shown.await;
    }
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usher: the run of {stream} ended abnormally: {e}");
            return EX_FAIL;
        }
    };
    if let Some(l) = lease {
        l.release().await;
    }
    let c = report.counts;
    println!(
        "{}: {} in {:.1}s: pulled {}, created {}, updated {}, skipped {}, failed {}, queued {}",
        report.stream,
        report.outcome,
        report.seconds,
        c.pulled,
        c.created,
        c.updated,
        c.skipped,
        c.failed,
        c.queued
    );
    if let Some(e) = &report.error {
        println!("  error: {e}");
    }
    if report.outcome == "ok" {
        EX_OK
    } else {
        EX_FAIL
    }
}

/// The ID of the stream's latest run (0: none yet), or None when the state cannot be read.
fn last_run_id(config: &Config, stream: &str) -> Option<i64> {
    match super::open_existing_state(&config.daemon) {
        Ok(Some(store)) => store
            .runs_sync(stream, 1)
            .ok()
            .map(|r| r.first().map_or(0, |r| r.id)),
        Ok(None) => Some(0),
        Err(_) => None,
    }
}

/// On a terminal, after the daemon took a trigger: follows the run it starts, from what the
/// daemon records (the run's row, the stream's cursor, a `Retry-After` saved for one of the
/// stream's connections), on a progress line until the run ends (Ctrl-C stops following;
/// the run goes on), then prints its result as a run in this process would. The exit code
/// stays 0, as without a terminal: the daemon took the request.
async fn follow_in_daemon(config: &Config, stream: &str, pid: u32, before: i64) -> i32 {
    use tokio::task::block_in_place;
    let store = match block_in_place(|| super::open_existing_state(&config.daemon)) {
        Ok(Some(s)) => s,
        _ => return EX_OK,
    };
    let spec = &config.streams[stream];
    let budgets: Vec<String> = [&spec.source, &spec.target]
        .into_iter()
        .filter_map(|c| config.connections.get(c.as_str()))
        .map(|c| c.budget_key())
        .collect();
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    pb.set_message(format!(
        "{stream}: waiting for the daemon (pid {pid}) to start the run"
    ));
    let mut cursor = block_in_place(|| store.cursor_sync(stream)).ok().flatten();
    let mut pages = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                pb.finish_and_clear();
                eprintln!("usher: stopped following; the run goes on in the daemon (usher status shows it)");
                return EX_OK;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let run = block_in_place(|| store.runs_sync(stream, 1))
            .ok()
            .and_then(|r| r.into_iter().next())
            .filter(|r| r.id > before);
        let Some(run) = run else {
            continue;
        };
        if run.ended_at.is_some() {
            pb.finish_and_clear();
            let c = run.counts;
            println!(
                "{stream}: {} in the daemon (pid {pid}): pulled {}, created {}, updated {}, skipped {}, failed {}, queued {}",
                run.outcome, c.pulled, c.created, c.updated, c.skipped, c.failed, c.queued
            );
            if let Some(e) = &run.error {
                println!("  error: {e}");
            }
            return EX_OK;
        }
        let now = block_in_place(|| store.cursor_sync(stream)).ok().flatten();
        if now != cursor {
            pages += 1;
            cursor = now;
        }
        let at = chrono::Utc::now();
        let wait = store
            .rate_budgets()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|b| budgets.contains(&b.key))
            .filter_map(|b| Some((b.not_before.filter(|t| *t > at)? - at, b.key)))
            .max();
        pb.set_message(match wait {
            Some((left, key)) => format!(
                "{stream}: waiting {} s for the Retry-After of {key}",
                (left.num_milliseconds() as f64 / 1000.0).ceil() as u64
            ),
            None if pages > 0 => format!(
                "{stream}: running in the daemon (pid {pid}); {pages} page(s) committed so far"
            ),
            None => format!("{stream}: running in the daemon (pid {pid})"),
        });
    }
}

/// Shows a run's progress on stderr until `done`: on a terminal a spinner whose line says
/// the pages committed and the counts so far, or what the run waits for and how long;
/// elsewhere plain lines (every wait, and the counts at most every 2 s).
async fn show_progress(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::progress::Event>,
    stream: String,
    tty: bool,
    done: CancellationToken,
) {
    use crate::progress::Event;
    let bar = tty.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb.set_message(format!("{stream}: running"));
        pb
    });
    let mut pages = 0u64;
    let mut said: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => e,
                None => break,
            },
            _ = done.cancelled() => break,
        };
        let (text, always) = match event {
            Event::Page {
                stream: s,
                counts: c,
            } => {
                pages += 1;
                (
                    format!(
                        "{s}: {pages} page(s) committed: pulled {}, created {}, updated {}, skipped {}, failed {}, queued {}",
                        c.pulled, c.created, c.updated, c.skipped, c.failed, c.queued
                    ),
                    false,
                )
            }
            Event::Waiting { what, wait } => (
                format!(
                    "{stream}: waiting {} s for {what}",
                    wait.as_secs_f64().ceil() as u64
                ),
                true,
            ),
        };
        match &bar {
            Some(pb) => pb.set_message(text),
            None => {
                if always {
                    eprintln!("usher: {text}");
                } else if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                    eprintln!("usher: {text}");
                    said = Some(Instant::now());
                }
            }
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
}

pub fn dead_letters(source: config::Source, action: super::DeadLetterAction) -> i32 {
    use super::DeadLetterAction as A;
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stream = match &action {
        A::List { stream, .. } | A::Retry { stream, .. } | A::Drop { stream, .. } => stream.clone(),
    };
    if let Err(code) = known_stream(&config, &stream) {
        return code;
    }
    let store = match super::open_existing_state(&config.daemon) {
        Ok(Some(s)) => s,
        Ok(None) => {
            println!("{stream}: no dead letters (nothing recorded yet)");
            return EX_OK;
        }
        Err(e) => return store_error(&e),
    };
    match action {
        A::List { limit, json, .. } => {
            let rows = match store.dead_letters_sync(&stream, limit) {
                Ok(r) => r,
                Err(e) => return store_error(&e),
            };
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(id, d, at)| {
                        serde_json::json!({"id": id, "source_id": d.source_id, "reason": d.reason, "created_at": at,
                            "record": serde_json::from_str::<serde_json::Value>(&d.record).unwrap_or_default()})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if rows.is_empty() {
                println!("{stream}: no dead letters");
            } else {
                for (id, d, at) in rows {
                    println!(
                        "{id}\t{at}\t{}\t{}",
                        d.source_id.as_deref().unwrap_or("-"),
                        d.reason
                    );
                }
            }
            EX_OK
        }
        A::Retry { id, .. } => {
            if !config.streams[&stream].kind.retries_dead_letters() {
                eprintln!(
                    "usher: stream {stream:?} cannot put dead letters through again; fix the cause and reset its cursor to re-import (no duplicates)"
                );
                return EX_FAIL;
            }
            match store.dead_letters_retry_sync(
                &stream,
                id,
                &control::cli_actor("dead-letters retry"),
            ) {
                Ok(n) => {
                    println!(
                        "{stream}: {n} dead letter(s) go through again at the next run (`usher trigger {stream}` to run now)"
                    );
                    EX_OK
                }
                Err(e) => store_error(&e),
            }
        }
        A::Drop { id, .. } => match store.dead_letters_drop_sync(
            &stream,
            id,
            &control::cli_actor("dead-letters drop"),
        ) {
            Ok(n) => {
                println!("{stream}: {n} dead letter(s) dropped");
                EX_OK
            }
            Err(e) => store_error(&e),
        },
    }
}
