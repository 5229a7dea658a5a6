//! The real binary as a daemon against the fakes: READY, status while running, a second
//! instance refused, SIGTERM and SIGKILL mid-run then restart (nothing lost, nothing twice),
//! SIGHUP with good and bad configs, overlapping ticks skipped.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Env, crm_stream_config, query_i64, stderr, stdout, wait_until};
use rustix::process::Signal;
use usher_sandbox::{Fault, Sandbox};

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

/// Every contact 1..=n arrived, none twice (a redelivery after a crash carries the same
/// Idempotency-Key and the fake drops it; any resent POST must be byte-identical).
fn assert_all_once(s: &Sandbox, n: u64) {
    let records = s.crm.accepted_records();
    let ids: Vec<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<_> = ids.iter().cloned().collect();
    assert_eq!(unique.len() as u64, n, "every record present");
    assert_eq!(ids.len() as u64, n, "no record twice");
    for i in 1..=n {
        assert!(unique.contains(&format!("CRM-{i}")), "CRM-{i} missing");
    }
    // Order of records is kept.
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "records arrive in feed order"
    );
    // A payload sent twice (same key) is the same bytes.
    let received = s.crm.received();
    for r in &received {
        if let Some(k) = &r.idempotency_key {
            for o in received
                .iter()
                .filter(|o| o.idempotency_key.as_ref() == Some(k))
            {
                assert_eq!(o.body, r.body, "a resent payload is byte for byte the same");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_at_start_reports_status_and_refuses_a_second_instance() {
    let s = sandbox(230).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 50));
    let d = env.spawn_daemon();
    let ready = d.wait_ready();
    eprintln!("start to READY: {ready:?}");
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            == 230),
        "{}",
        d.log()
    );
    assert_all_once(&s, 230);
    assert!(s.crm.received().iter().all(|r| {
        serde_json::from_slice::<Vec<serde_json::Value>>(&r.body)
            .unwrap()
            .len()
            <= 50
    }));

    // status while the daemon runs, from the database.
    assert!(wait_until(Duration::from_secs(10), || {
        let out = env.cli(&["status", "--json"]);
        stdout(&out).contains("\"outcome\": \"ok\"")
    }));
    let out = env.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon_pid"].as_u64(), Some(d.pid() as u64));
    let st = &v["streams"][0];
    assert_eq!(st["stream"], "contacts");
    assert_eq!(st["last_run"]["counts"]["pulled"], 230);
    assert_eq!(st["last_run"]["counts"]["created"], 230);
    assert_eq!(st["cursor"], "c230");
    assert_eq!(st["outbox"]["payloads"], 0);
    assert!(st["next_run_at"].is_string());
    let text = stdout(&env.cli(&["status"]));
    assert!(text.contains("running (pid"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("contacts "))
        .expect("a row for the stream");
    for cell in ["enabled", "every 1h", " ok ", "230", "c230"] {
        assert!(row.contains(cell), "{cell:?} in {row:?}");
    }
    assert_eq!(
        stdout(&env.cli(&["cursor", "show", "contacts"])).trim(),
        "contacts: c230"
    );

    // A second daemon on the same state directory refuses, saying why.
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "another usher (pid {}) holds the state directory",
            d.pid()
        )),
        "{}",
        stderr(&out)
    );

    // The state file is private (SQLite: on PostgreSQL there is no file).
    if common::postgres().is_some() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.db_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mode = std::fs::metadata(env.state_dir().join("control"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_run_then_restart_loses_nothing_and_doubles_nothing() {
    let s = sandbox(1500).await;
    // Slow webhook answers make the run long enough to stop in the middle.
    s.crm
        .faults
        .push("crm.hook", Fault::Slow(Duration::from_millis(150)), 20);
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 100_000, 25));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || s
        .crm
        .accepted_records()
        .len()
        >= 100));
    d.signal(Signal::TERM);
    let code = d
        .wait_exit(Duration::from_secs(20))
        .expect("exits within 20s after SIGTERM");
    assert_eq!(code, Some(0), "{}", d.log());
    let got = s.crm.accepted_records().len();
    assert!(got < 1500, "stopped in the middle ({got})");
    let outcome: String = common::query_text(
        &env.db_path(),
        "SELECT outcome FROM runs ORDER BY id DESC LIMIT 1",
    )
    .unwrap();
    assert_eq!(outcome, "stopped");

    let d2 = env.spawn_daemon();
    d2.wait_ready();
    assert!(
        wait_until(Duration::from_secs(30), || s.crm.accepted_records().len()
            >= 1500),
        "{}",
        d2.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_all_once(&s, 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_run_then_restart_loses_nothing_and_doubles_nothing() {
    let s = sandbox(2000).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 100_000, 20));
    // A few hard kills at different points of the import, then a run to the end. CI runs
    // four rounds with a fixed seed; SOAK_ROUNDS=N runs N rounds with a random seed
    // (or SOAK_SEED), printed so that a failure can be replayed.
    let rounds: u32 = std::env::var("SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if rounds > 4 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        } else {
            0x5eed
        });
    eprintln!("kill -9: {rounds} rounds, seed {seed}");
    let mut rng = seed;
    for round in 0..rounds {
        s.crm
            .faults
            .push("crm.hook", Fault::Slow(Duration::from_millis(40)), 1000);
        let mut d = env.spawn_daemon();
        d.wait_ready();
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait_ms = (rng >> 33) % 500;
        std::thread::sleep(Duration::from_millis(wait_ms));
        d.kill9();
        eprintln!(
            "round {round}: killed after {wait_ms} ms with {} records in",
            s.crm.accepted_records().len()
        );
        s.crm.faults.clear();
    }
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(60), || s.crm.accepted_records().len()
            >= 2000),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_all_once(&s, 2000);
    // Runs killed mid-way were closed as interrupted at the next start.
    let interrupted = query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM runs WHERE outcome = 'interrupted'",
    );
    assert!(interrupted >= 1, "interrupted runs recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let s = sandbox(10).await;
    let env = Env::new();
    let good = crm_stream_config(&base(&s), "1h", 1000, 50);
    env.write_config(&good);
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s
        .crm
        .accepted_records()
        .len()
        == 10));

    // A bad config: refused, logged, the daemon keeps running the old one.
    env.write_config(
        &format!("{good}\n[streams.contacts.bogus]\nx = 1\n")
            .replace("every = \"1h\"", "every = \"1h\"\ncolour = 2"),
    );
    d.signal(Signal::HUP);
    assert!(
        d.wait_log("reload refused", Duration::from_secs(10)),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("streams.contacts.colour"),
        "the refusal names the key"
    );
    assert!(d.child.id() > 0);
    assert!(
        d.wait_notify("READY=1", Duration::from_secs(5)),
        "READY again after a refused reload"
    );

    // A good config with a faster schedule: the new schedule takes effect.
    let runs_before = query_i64(&env.db_path(), "SELECT COUNT(*) FROM runs");
    env.write_config(&crm_stream_config(&base(&s), "1s", 1000, 50));
    d.signal(Signal::HUP);
    assert!(
        d.wait_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        d.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM runs"
        ) >= runs_before + 2),
        "runs on the new 1s schedule: {}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_during_a_run_is_skipped_not_overlapped() {
    let s = sandbox(400).await;
    s.crm
        .faults
        .push("crm.hook", Fault::Slow(Duration::from_millis(600)), 8);
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1s", 100_000, 50));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        d.wait_log(
            "tick skipped: the previous run is still going",
            Duration::from_secs(20)
        ),
        "{}",
        d.log()
    );
    assert!(wait_until(Duration::from_secs(20), || s
        .crm
        .accepted_records()
        .len()
        >= 400));
    // Never two runs at once: each run started after the previous one ended.
    let rows: Vec<(String, String)> = common::rows(
        &env.db_path(),
        "SELECT started_at, ended_at FROM runs WHERE ended_at IS NOT NULL ORDER BY id",
    )
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
    .collect();
    for w in rows.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "run started {} before the previous ended {}",
            w[1].0,
            w[0].1
        );
    }
    assert_all_once(&s, 400);
}

/// tokio-cron-scheduler fires a one-shot job up to ~1.5 s before its slot; arming the next
/// slot from the wall clock at that moment armed the same slot again (2–3 runs per slot).
/// Over ~14 s of a 2 s stream: one scheduled run per slot, each at or after its slot, and
/// the crate's "Job creator created" line is not in the log at the default level.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_every_stream_runs_once_per_slot() {
    let s = sandbox(5).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "2s", 500, 50));
    let d = env.spawn_daemon_with(&[], &[("RUST_LOG", "")]);
    d.wait_ready();
    std::thread::sleep(Duration::from_secs(14));
    let starts: Vec<chrono::DateTime<chrono::Utc>> = common::column(
        &env.db_path(),
        "SELECT started_at FROM runs WHERE stream = 'contacts' ORDER BY id",
    )
    .into_iter()
    .map(|t| t.unwrap().parse().unwrap())
    .collect();
    // The first run is the start-up run; then one per 2 s slot.
    assert!(
        (6..=9).contains(&starts.len()),
        "{} runs in ~14 s of a 2 s schedule: {starts:?}",
        starts.len()
    );
    for w in starts[1..].windows(2) {
        let gap = (w[1] - w[0]).num_milliseconds();
        assert!(
            gap >= 1500,
            "two runs {gap} ms apart: one slot ran twice ({starts:?})"
        );
    }
    for t in &starts[1..] {
        // Slots are every even second (epoch-aligned, jitter 0): a run starts just after one.
        assert!(
            t.timestamp() % 2 == 0 && t.timestamp_subsec_millis() < 900,
            "a scheduled run starts at its slot, not before: {t} ({starts:?})"
        );
    }
    assert!(
        !d.log().contains("Job creator created"),
        "tokio-cron-scheduler's per-job INFO line floods the journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_with_retry_after_is_waited_for() {
    let s = sandbox(30).await;
    s.crm.faults.push(
        "crm.feed",
        Fault::RateLimited {
            status: 429,
            retry_after_secs: 2,
        },
        1,
    );
    s.crm.faults.push(
        "crm.hook",
        Fault::RateLimitedUntil {
            status: 509,
            secs_ahead: 2,
        },
        1,
    );
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 1000, 50));
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let feed = s.crm.faults.calls_to("crm.feed");
    assert_eq!(feed[0].status, 429);
    let waited = feed[1].at.duration_since(feed[0].at).unwrap();
    assert!(
        waited >= Duration::from_secs(2),
        "waited {waited:?} after Retry-After: 2"
    );
    let hook = s.crm.faults.calls_to("crm.hook");
    assert_eq!(hook[0].status, 509);
    // An HTTP date has one-second resolution: at least one second.
    let waited = hook[1].at.duration_since(hook[0].at).unwrap();
    assert!(
        waited >= Duration::from_secs(1),
        "waited {waited:?} after a Retry-After date"
    );
    assert_all_once(&s, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_payload_is_resent_identical_and_first() {
    let s = sandbox(120).await;
    s.crm.refuse_next(1, 500);
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 1000, 50));
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused payload fails the execution"
    );
    assert!(stdout(&out).contains("refused"), "{}", stdout(&out));
    assert_eq!(
        s.crm.received().len(),
        1,
        "nothing after a refused payload goes out in that execution"
    );
    let st = stdout(&env.cli(&["status"]));
    assert!(st.contains("refused 1 times since"), "{st}");
    assert!(st.contains("1 (50 rec)"), "outbox depth shown: {st}");
    s.crm.add_contacts(10);
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let rec = s.crm.received();
    assert_eq!(
        rec[0].body, rec[1].body,
        "the same payload, byte for byte, first"
    );
    assert_eq!(rec[1].status, 200);
    assert_all_once(&s, 130);
}

/// The CRM stream with one webhook POST taking `slow` (the hub's timeout raised above it),
/// a daemon started on it, and the moment the first POST arrived.
async fn slow_hook_daemon(
    slow: Duration,
    shutdown_timeout: &str,
) -> (Sandbox, Env, common::Daemon) {
    let s = sandbox(100).await;
    s.crm.faults.push("crm.hook", Fault::Slow(slow), 1000);
    let env = Env::new();
    env.write_config(
        &crm_stream_config(&base(&s), "1h", 100_000, 25)
            .replace("timeout = \"3s\"", "timeout = \"60s\""),
    );
    let text = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        text.replace(
            "shutdown_timeout = \"20s\"",
            &format!("shutdown_timeout = \"{shutdown_timeout}\""),
        ),
    )
    .unwrap();
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || !s
            .crm
            .faults
            .calls_to("crm.hook")
            .is_empty()),
        "{}",
        d.log()
    );
    (s, env, d)
}

fn outbox_payloads(env: &Env) -> i64 {
    query_i64(&env.db_path(), "SELECT COUNT(*) FROM outbox")
}

/// SIGTERM while a POST is in flight: it is answered and recorded, then the run stops
/// between payloads (each one is a safe point), and the daemon exits 0. (A page whose
/// writes are not committed one by one finishes whole: `seatgeek_halo.rs`,
/// `sigterm_mid_page_finishes_the_page_and_commits_it`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_page_in_flight_finish_and_exits_0() {
    let (s, env, mut d) = slow_hook_daemon(Duration::from_secs(3), "20s").await;
    d.signal(Signal::TERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(15)),
        Some(Some(0)),
        "{}",
        d.log()
    );
    assert_eq!(
        s.crm.accepted_records().len(),
        25,
        "the POST in flight was answered"
    );
    // Of the page's two payloads, the one delivered is recorded; the other waits.
    assert_eq!(outbox_payloads(&env), 1);
    let outcome: String = common::query_text(
        &env.db_path(),
        "SELECT outcome FROM runs ORDER BY id DESC LIMIT 1",
    )
    .unwrap();
    assert_eq!(outcome, "stopped");
}

/// Before: a second SIGTERM did not hurry a stuck shutdown, and the forced exit after
/// `shutdown_timeout` returned 0. Now a second SIGTERM abandons the runs at once and the
/// daemon exits 1; nothing is lost (the payload stays in the outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sigterm_abandons_the_runs_and_exits_1() {
    let (s, env, mut d) = slow_hook_daemon(Duration::from_secs(30), "50s").await;
    d.signal(Signal::TERM);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.child.try_wait().unwrap(),
        None,
        "still finishing its page"
    );
    let second = std::time::Instant::now();
    d.signal(Signal::TERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)),
        Some(Some(1)),
        "{}",
        d.log()
    );
    assert!(second.elapsed() < Duration::from_secs(8));
    assert!(d.log().contains("a second SIGTERM arrived"), "{}", d.log());
    assert!(s.crm.accepted_records().is_empty());
    assert_eq!(outbox_payloads(&env), 2, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_past_its_timeout_abandons_the_runs_and_exits_1() {
    let (_s, env, mut d) = slow_hook_daemon(Duration::from_secs(30), "2s").await;
    let term = std::time::Instant::now();
    d.signal(Signal::TERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(12)),
        Some(Some(1)),
        "{}",
        d.log()
    );
    assert!(term.elapsed() >= Duration::from_secs(2));
    assert!(d.log().contains("shutdown_timeout (2s)"), "{}", d.log());
    assert_eq!(outbox_payloads(&env), 2, "nothing lost");
}

/// libfaketime, to step the daemon's wall clock while it runs (Debian: `faketime`).
/// `None` (the test is skipped, saying so) where it is not installed, unless
/// `USHER_TEST_FAKETIME=required` (CI installs it).
fn faketime() -> Option<&'static str> {
    const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    if std::path::Path::new(LIB).exists() {
        return Some(LIB);
    }
    if std::env::var("USHER_TEST_FAKETIME").as_deref() == Ok("required") {
        panic!("{LIB} is missing: apt-get install faketime");
    }
    eprintln!("SKIPPED: this test steps the wall clock with libfaketime; apt-get install faketime");
    None
}

fn finished_runs(env: &Env) -> i64 {
    query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM runs WHERE outcome != 'running'",
    )
}

/// The wall clock stepped back an hour under a 2 s stream (an NTP step, a VM restored):
/// the slots keep coming on time (they are timed on the monotonic clock between wall-clock
/// checks), and the log says once that the clock jumped. Before the jump check, the armed
/// slots waited out the hour (0 runs in 31 s with 3 slots due).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wall_clock_stepped_back_an_hour_does_not_stall_the_schedule() {
    let Some(lib) = faketime() else {
        return;
    };
    let s = sandbox(5).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "2s", 10_000, 50));
    let offset = env.dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let offset_text = offset.display().to_string();
    let d = env.spawn_daemon_with(
        &[],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", &offset_text),
            ("FAKETIME_NO_CACHE", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || finished_runs(&env) >= 2),
        "{}",
        d.log()
    );
    std::fs::write(&offset, "-1h\n").unwrap();
    let before = finished_runs(&env);
    assert!(
        d.wait_log("the wall clock jumped", Duration::from_secs(5)),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_secs(10));
    let after = finished_runs(&env);
    assert!(
        after - before >= 3,
        "{} runs in 10 s of 2 s slots after the step; log:\n{}",
        after - before,
        d.log()
    );
    assert_eq!(
        d.log().matches("the wall clock jumped").count(),
        1,
        "logged once"
    );
}

/// A daemon killed while a POST was in flight leaves it in doubt until its deadline plus
/// the settle margin, in wall-clock time. A restart on a clock stepped back an hour since
/// then would have waited that hour more; it now waits at most what the record allowed
/// when it was written (the hub's 3 s timeout + 1 s + the 5 s margin).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_in_doubt_from_before_a_clock_step_back_do_not_stall_the_stream() {
    let Some(lib) = faketime() else {
        return;
    };
    let s = sandbox(30).await;
    s.crm
        .faults
        .push("crm.hook", Fault::Slow(Duration::from_secs(2)), 1);
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 10_000, 50));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(20), || !s
        .crm
        .faults
        .calls_to("crm.hook")
        .is_empty()));
    d.kill9();
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM in_doubt"),
        1,
        "the POST in flight is in doubt"
    );
    let offset = env.dir.path().join("faketime");
    std::fs::write(&offset, "-1h\n").unwrap();
    let offset_text = offset.display().to_string();
    let d = env.spawn_daemon_with(
        &[],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", &offset_text),
            ("FAKETIME_NO_CACHE", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(25), || s.crm.accepted_records().len()
            >= 30),
        "{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("the wall clock is behind the time the writes in doubt were recorded"),
        "{}",
        d.log()
    );
}
