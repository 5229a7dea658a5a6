//! The state and the process (issue 24, items 7–12): a state that cannot be written (a
//! full disk, for real, on a tmpfs the test mounts), a full disk at start, a state directory
//! moved or deleted under the daemon, a damaged state and the way back (backup, restore,
//! start again), and the process's own troubles.

mod common;

use std::time::{Duration, Instant};

use common::{
    Env, Tmpfs, crm_stream_config, free_port, get, query_i64, stderr, stdout, wait_until,
};
use usher_sandbox::Sandbox;

async fn sandbox(contacts: u64) -> Sandbox {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(contacts);
    s
}

fn base(s: &Sandbox) -> String {
    format!("http://{}", s.addr)
}

fn with_metrics(port: u16, cfg: &str) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n{cfg}")
}

/// Before: with the state's disk full, every slot logged "cannot record the run's start"
/// and ran anyway, `/healthz` said 200 and `status` showed nothing wrong. Now a run that
/// cannot record its start does not run, the stream tries again after a growing pause,
/// `/healthz` and `status` say the state cannot be written, and all of it clears by itself
/// once there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_the_state_cannot_record_does_not_run_and_health_and_status_say_why() {
    if common::sqlite_only("the state's disk filled under the daemon") {
        return;
    }
    let env = Env::new();
    let Some(disk) = Tmpfs::mount(&env.state_dir(), "8m") else {
        return;
    };
    let s = sandbox(30).await;
    let port = free_port();
    env.write_config(&with_metrics(
        port,
        &crm_stream_config(&base(&s), "1s", 10_000, 50),
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            == 30),
        "{}",
        d.log()
    );
    assert_eq!(get(port, "/healthz").await.0, 200);

    disk.fill();
    let filled = Instant::now();
    let log_before = d.log().matches("cannot record the run's start").count();
    s.crm.add_contacts(20);
    // /healthz says why (within a slot or two).
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let h = get(port, "/healthz").await;
        if h.0 == 503 || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health.0, 503, "{health:?}; log:\n{}", d.log());
    assert!(
        health.1.contains("state cannot be written") && health.1.contains("full"),
        "{}",
        health.1
    );
    let runs = query_i64(&env.db_path(), "SELECT COUNT(*) FROM runs");
    // `status` says it too, from what the daemon noted in its lock file.
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            text = stdout(&env.cli(&["status"]));
            text.contains("the daemon could not write the state database at")
        }),
        "{text}"
    );
    assert!(text.contains("full"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&env.cli(&["status", "--json"]).stdout).unwrap();
    assert!(json["state_error"]["error"].is_string(), "{json}");
    let metrics = get(port, "/metrics").await.1;
    assert!(metrics.contains("usher_state_writable 0"), "{metrics}");

    // Ten seconds of 1 s slots: no run recorded, nothing sent, and a few tries, not ten.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(filled.elapsed())).await;
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM runs"),
        runs,
        "no run started"
    );
    assert_eq!(s.crm.accepted_records().len(), 30, "nothing sent");
    let tries = d.log().matches("cannot record the run's start").count() - log_before;
    assert!(
        (1..=5).contains(&tries),
        "{tries} tries in 10 s of 1 s slots; log:\n{}",
        d.log()
    );

    // Room again: the stream goes on by itself, and health and status clear.
    disk.unfill();
    assert!(
        wait_until(Duration::from_secs(40), || s.crm.accepted_records().len()
            == 50),
        "{}",
        d.log()
    );
    assert!(
        {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if get(port, "/healthz").await.0 == 200 {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
        "healthz clears"
    );
    assert!(wait_until(Duration::from_secs(5), || !stdout(
        &env.cli(&["status"])
    )
    .contains("could not write the state")));
    drop(d);
}

/// Before: a migration on a full disk exited 65, which the unit does not restart, so the
/// service stayed down after the space came back. Now it exits 75 (EX_TEMPFAIL), which the
/// unit restarts, and starts once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_at_start_exits_75_and_the_next_start_works() {
    if common::sqlite_only("the state's disk full at start") {
        return;
    }
    let env = Env::new();
    let Some(disk) = Tmpfs::mount(&env.state_dir(), "2m") else {
        return;
    };
    let s = sandbox(5).await;
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 50));
    // A state from an earlier start (the lock file stays), then a new database to create
    // and migrate on a full disk.
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || s
        .crm
        .accepted_records()
        .len()
        == 5));
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(Some(0)));
    for f in ["usher.db", "usher.db-wal", "usher.db-shm"] {
        let _ = std::fs::remove_file(env.state_dir().join(f));
    }
    disk.fill();
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("full") && stderr(&out).contains("systemd starts usher again"),
        "{}",
        stderr(&out)
    );
    disk.unfill();
    s.crm.add_contacts(3);
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            == 13),
        "{}",
        d.log()
    );
    assert_all_reached(&s, 8);
}

/// The unit restarts what may pass (75) and nothing that cannot (65, 77, 78).
#[test]
fn the_unit_restarts_a_temporary_failure_and_not_a_lasting_one() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/usher.service"
    ))
    .unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_string))
            .collect()
    };
    assert_eq!(value("Restart"), ["on-failure"]);
    let prevent = value("RestartPreventExitStatus");
    for code in ["65", "77", "78"] {
        assert!(prevent.iter().any(|c| c == code), "{code} in {prevent:?}");
    }
    assert!(
        !prevent.iter().any(|c| c == "75"),
        "75 must be restarted: {prevent:?}"
    );
    assert!(value("SuccessExitStatus").iter().all(|c| c != "75"));
}

/// Before: a state directory moved away under the daemon went unnoticed: it kept
/// committing into the moved files, `status` said "not running", and a second daemon
/// started on a fresh state beside it. Now the daemon notices within a second, holds the
/// configured path while its runs finish their page, and exits 65; a second daemon started
/// meanwhile is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_directory_moved_under_the_daemon_stops_it_and_no_second_daemon_starts() {
    if common::sqlite_only("the state file moved") {
        return;
    }
    let s = sandbox(2000).await;
    // Slow answers: a run is in the middle of a POST when the directory moves, and finishes
    // it (and its page) before the daemon exits.
    s.crm.faults.push(
        "crm.hook",
        usher_sandbox::Fault::Slow(Duration::from_secs(8)),
        1000,
    );
    let env = Env::new();
    env.write_config(
        &crm_stream_config(&base(&s), "1s", 100_000, 25)
            .replace("timeout = \"3s\"", "timeout = \"30s\""),
    );
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || !s
        .crm
        .faults
        .calls_to("crm.hook")
        .is_empty()));
    let moved = env.dir.path().join("state.moved");
    std::fs::rename(env.state_dir(), &moved).unwrap();
    assert!(
        d.wait_log(
            "is no longer the one this daemon works on",
            Duration::from_secs(5)
        ),
        "{}",
        d.log()
    );
    let log = d.log();
    assert!(
        log.contains(&format!("{}/usher.db is gone", env.state_dir().display()))
            && log.contains(&format!("is now {}/usher.db", moved.display())),
        "names both paths:\n{log}"
    );
    // A second daemon on the configured path, while the first still finishes its page.
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("another usher (pid {})", d.pid())),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)),
        Some(Some(65)),
        "{}",
        d.log()
    );
    // The moved state is whole: its last run stopped at a safe point.
    let outcome: String = common::db(&moved.join("usher.db"))
        .query_row(
            "SELECT outcome FROM runs ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(outcome, "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_directory_deleted_under_the_daemon_stops_it() {
    if common::sqlite_only("the state file deleted") {
        return;
    }
    let s = sandbox(5).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 50));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || s
        .crm
        .accepted_records()
        .len()
        == 5));
    std::fs::remove_dir_all(env.state_dir()).unwrap();
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)),
        Some(Some(65)),
        "{}",
        d.log()
    );
    assert!(d.log().contains("usher.db (deleted)"), "{}", d.log());
}

/// Every contact 1..=n reached the CRM at least once (a state started afresh sends again).
fn assert_all_reached(s: &Sandbox, n: u64) {
    let got: std::collections::HashSet<String> = s
        .crm
        .accepted_records()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    for i in 1..=n {
        assert!(
            got.contains(&format!("CRM-{i}")),
            "CRM-{i} never reached the CRM"
        );
    }
}

/// Before: an Idempotency-Key was `usher-<stream>-<outbox id>`, and outbox ids start again
/// at 1 in a state started afresh: the CRM, which drops a key it already accepted, dropped
/// the new state's payloads, new records with them. Now each payload's key has its own
/// random part.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_started_afresh_sends_what_the_target_would_have_dropped_as_resends() {
    if common::sqlite_only("the state file started afresh") {
        return;
    }
    let s = sandbox(10).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 10));
    let trigger = |env: &Env| {
        let out = env.cli(&["trigger", "contacts"]);
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    };
    trigger(&env);
    // Small payloads as records trickle in: outbox ids 2..=6.
    for _ in 0..5 {
        s.crm.add_contacts(2);
        trigger(&env);
    }
    assert_all_reached(&s, 20);
    for f in ["usher.db", "usher.db-wal", "usher.db-shm"] {
        let _ = std::fs::remove_file(env.state_dir().join(f));
    }
    s.crm.add_contacts(10);
    // The fresh state reads all 30 again, in payloads of 10 with ids 1..=3.
    trigger(&env);
    assert_all_reached(&s, 30);
}

/// Overwrites the root page of `table` with garbage (the file closed, its WAL folded in).
fn damage(db: &std::path::Path, table: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.pragma_update(None, "journal_mode", "DELETE").unwrap();
    let (root, size): (i64, i64) = (
        c.query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = ?1",
            [table],
            |r| r.get(0),
        )
        .unwrap(),
        c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap(),
    );
    drop(c);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    f.write_all_at(&vec![0xA5u8; size as usize], ((root - 1) * size) as u64)
        .unwrap();
    f.sync_all().unwrap();
}

/// Before: a file damaged inside started, and every run failed while `status` refused it.
/// Now `quick_check` at start refuses it (65) with the next step, `state check` says so,
/// and the way back README gives (move it aside, start again) delivers everything, new
/// records included, with no second order or user (see the S-360 and Halo tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_state_is_refused_at_start_with_the_next_step_and_starting_again_works() {
    if common::sqlite_only("a damaged state file") {
        return;
    }
    let s = sandbox(40).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 10));
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    damage(&env.db_path(), "runs");

    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("is damaged (quick_check")
            && err.contains("move usher.db, usher.db-wal and usher.db-shm aside and start again"),
        "{err}"
    );
    let out = env.cli(&["state", "check"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("is damaged"), "{}", stderr(&out));
    let out = env.cli(&["status"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("start again"), "{}", stderr(&out));

    // The way back: move it aside (with -wal and -shm), start again.
    for f in ["usher.db", "usher.db-wal", "usher.db-shm"] {
        let p = env.state_dir().join(f);
        if p.exists() {
            std::fs::rename(&p, env.state_dir().join(format!("{f}.damaged"))).unwrap();
        }
    }
    s.crm.add_contacts(10);
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            >= 90),
        "{}",
        d.log()
    );
    assert_all_reached(&s, 50);
    let check = stdout(&env.cli(&["state", "check"]));
    assert!(check.contains(": ok (quick_check"), "{check}");
}

/// `usher state backup FILE` while the daemon commits: a consistent copy (0600, checked)
/// that a daemon then starts on and goes on from, delivering what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_while_the_daemon_commits_is_a_state_a_daemon_starts_on() {
    if common::sqlite_only("backing up the state file") {
        return;
    }
    let s = sandbox(3000).await;
    s.crm.faults.push(
        "crm.hook",
        usher_sandbox::Fault::Slow(Duration::from_millis(100)),
        10_000,
    );
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1s", 100_000, 25));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(30), || s
        .crm
        .accepted_records()
        .len()
        >= 300));
    let copy = env.dir.path().join("backup.db");
    let before = s.crm.accepted_records().len();
    assert!(before < 3000, "the daemon is still committing ({before})");
    let out = env.cli(&["state", "backup", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("written to"), "{}", stdout(&out));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Refuses to overwrite.
    let out = env.cli(&["state", "backup", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(Some(0)));

    // Restore into another state directory, as README says: the file, no -wal or -shm.
    let env2 = Env::new();
    std::fs::copy(&copy, env2.db_path()).unwrap();
    env2.write_config(&crm_stream_config(&base(&s), "1s", 100_000, 25));
    s.crm.faults.clear();
    s.crm.add_contacts(20);
    let d2 = env2.spawn_daemon();
    d2.wait_ready();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let ids: std::collections::HashSet<String> = s
                .crm
                .accepted_records()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect();
            ids.len() == 3020
        }),
        "{}",
        d2.log()
    );
    assert_all_reached(&s, 3020);
    // It went on from the copy's cursor, not from the start.
    let resent = s.crm.accepted_records().len() - 3020;
    assert!(resent < 3000, "resent {resent}: went on from the copy");
}

/// Before: a connection that could not be made because the process had no descriptor left
/// was reported as "could not connect", which sends a sysadmin to the network. Now it says
/// "too many open files". `usher trigger` under a descriptor limit just large enough to
/// start and read the feed, so that the POST to another host finds none left (the limit
/// that does it depends on the machine: a range is tried).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_without_a_descriptor_says_too_many_open_files() {
    if common::sqlite_only("descriptors counted for a state without a server connection") {
        return;
    }
    let source = sandbox(5).await;
    let target = sandbox(0).await;
    let env = Env::new();
    env.write_config(
        &crm_stream_config(&base(&source), "1h", 10_000, 50).replace(
            &format!(
                "[connections.hub]\nkind = \"crm\"\nbase_url = \"{}/crm\"",
                base(&source)
            ),
            &format!(
                "[connections.hub]\nkind = \"crm\"\nbase_url = \"{}/crm\"\nmax_retries = 0",
                base(&target)
            ),
        ),
    );
    let mut said = Vec::new();
    for n in 10..=40 {
        let _ = std::fs::remove_dir_all(env.state_dir());
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
            .arg(common::bin())
            .arg("--config")
            .arg(env.config_path())
            .args(["trigger", "contacts"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !text.contains("could not connect"),
            "ulimit -n {n}: the sandbox listens, so only a lack of descriptors stops a connection:\n{text}"
        );
        if text.contains("too many open files: no descriptor left for a connection") {
            said.push(n);
        }
        if out.status.code() == Some(0) {
            break;
        }
    }
    assert!(
        !said.is_empty(),
        "no limit ran out of descriptors at a connection"
    );
}

/// `usher run` as a user who does not own the state: as root, through `setpriv` as
/// nobody; as anyone else, as that user (the test then takes the rights away with chmod).
fn run_as_stranger(env: &Env) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    for p in [env.dir.path().to_path_buf(), env.dir.path().join("etc")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(env.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = if rustix::process::geteuid().is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(common::bin());
        c
    } else {
        std::process::Command::new(common::bin())
    };
    cmd.arg("--config")
        .arg(env.config_path())
        .arg("run")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap()
}

/// Before: a state file usher may not open was reported as "state directory …: Permission
/// denied" (the wrong object) with exit 65. Now the message names the file or the
/// directory at fault, its owner and mode, and whom usher runs as, and exits 77.
#[test]
fn permission_errors_name_the_file_or_the_directory_at_fault() {
    if common::sqlite_only("the state file's permissions") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let root = rustix::process::geteuid().is_root();
    let env = Env::new();
    env.write_config("");
    let state = env.state_dir();

    // The directory: not searchable by usher's user.
    std::fs::set_permissions(
        &state,
        std::fs::Permissions::from_mode(if root { 0o700 } else { 0o500 }),
    )
    .unwrap();
    let out = run_as_stranger(&env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(
        err.contains(&format!(
            "the directory {} is owned by uid",
            state.display()
        )) && err.contains("usher runs as uid"),
        "{err}"
    );

    // The file: the directory is open to all, the database is not usher's.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let db = env.db_path();
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(
        &db,
        std::fs::Permissions::from_mode(if root { 0o600 } else { 0o400 }),
    )
    .unwrap();
    let _ = std::fs::remove_file(state.join("usher.lock"));
    let out = run_as_stranger(&env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(
        err.contains(&format!("the file {} is owned by uid", db.display()))
            && err.contains("with mode 0"),
        "{err}"
    );
}

/// Before: a log line that could not be written (stdout full or closed) was dropped
/// silently. Now the daemon says so once on stderr and counts them in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_that_cannot_be_written_is_said_once_on_stderr_and_counted() {
    let s = sandbox(5).await;
    let env = Env::new();
    let port = free_port();
    env.write_config(&with_metrics(
        port,
        &crm_stream_config(&base(&s), "1s", 10_000, 50),
    ));
    let err_path = env.dir.path().join("stderr");
    let mut child = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(["--log-format", "json", "run"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        {
            metrics = r.text().await.unwrap();
            if s.crm.accepted_records().len() == 5
                && !metrics.contains("usher_log_write_errors_total 0")
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(s.crm.accepted_records().len(), 5, "the daemon works on");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("usher_log_write_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no usher_log_write_errors_total in:\n{metrics}"));
    assert!(count >= 2, "{count} lines counted");
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(
        err.matches("cannot write the log to stdout").count(),
        1,
        "said once:\n{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
}

/// Before: a `log.directory` usher could not create files in panicked at start. Now it is
/// said on stderr and the daemon logs to stdout only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_directory_that_cannot_be_used_does_not_stop_the_daemon() {
    let s = sandbox(1).await;
    let env = Env::new();
    let not_a_dir = env.dir.path().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    env.write_config(&format!(
        "[log]\ndirectory = {:?}\n{}",
        not_a_dir.join("logs").display().to_string(),
        crm_stream_config(&base(&s), "1h", 10_000, 50)
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(d.log().contains("cannot write log files in"), "{}", d.log());
}

fn temporary_control_files(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.state_dir().join("control"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Before: a trigger whose control file could not be written (the disk full) left its
/// `.tmp-…` file behind. Now nothing is left, and the daemon removes old ones a killed CLI
/// left at its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_trigger_leaves_no_temporary_control_file() {
    if common::sqlite_only(
        "a local daemon's control files (on PostgreSQL a trigger is a request row)",
    ) {
        return;
    }
    let env = Env::new();
    let Some(disk) = Tmpfs::mount(&env.state_dir(), "4m") else {
        return;
    };
    let s = sandbox(5).await;
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 50));
    // One left by a CLI killed long ago.
    std::fs::create_dir_all(env.state_dir().join("control")).unwrap();
    let stale = env.state_dir().join("control/.tmp-1-trigger.contacts");
    std::fs::write(&stale, "someone\n").unwrap();
    assert!(
        std::process::Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(&stale)
            .status()
            .unwrap()
            .success()
    );
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(temporary_control_files(&env).is_empty(), "swept at start");
    disk.fill();
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot write the control file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(temporary_control_files(&env), Vec::<String>::new());
    disk.unfill();
    drop(d);
}

/// Before: `usher trigger` waited silently (up to two minutes) on a daemon that was
/// stopped. Now it says after two seconds what it waits for, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_says_what_it_waits_for_when_the_daemon_is_stopped() {
    if common::sqlite_only(
        "a local daemon's control files (on PostgreSQL a trigger is a request row)",
    ) {
        return;
    }
    let s = sandbox(5).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 50));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || s
        .crm
        .accepted_records()
        .len()
        == 5));
    d.signal(rustix::process::Signal::STOP);
    let err_path = env.dir.path().join("cli-stderr");
    let mut cli = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(["trigger", "contacts"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let said = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&err_path)
            .unwrap_or_default()
            .contains(&format!("waiting for the daemon (pid {})", d.pid()))
    });
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    d.signal(rustix::process::Signal::CONT);
    assert!(said, "{err}");
    assert!(
        err.contains("it is stopped") && err.contains(&format!("kill -CONT {}", d.pid())),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = cli.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the CLI finished after SIGCONT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
