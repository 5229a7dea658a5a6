//! Several instances on one PostgreSQL (issue 20): streams spread over the live instances,
//! operator requests from any host carried out by the holder, failover after SIGKILL and
//! SIGSTOP, and a stopped holder that wakes up commits nothing. Runs only when the suite
//! runs on PostgreSQL (`USHER_TEST_POSTGRES`, as CI does); says SKIPPED otherwise.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Env, psql, stderr, stdout, wait_until};
use rustix::process::Signal;
use usher_sandbox::Sandbox;

/// The server, or None (and SKIPPED said) when the suite runs on SQLite.
fn pg_env() -> Option<Env> {
    if common::postgres().is_none() {
        eprintln!("SKIPPED: several instances need PostgreSQL (USHER_TEST_POSTGRES)");
        return None;
    }
    Some(Env::new())
}

/// `n` CRM feed → webhook streams, each its own lease group.
fn config(base: &str, n: usize, every: &str) -> String {
    let mut c = format!(
        r#"[daemon]
control_poll = "300ms"
shutdown_timeout = "20s"
lease = "3s"
settle_margin = "1s"

[connections.crm]
kind = "crm"
base_url = "{base}/crm"
max_retries = 3

[connections.hub]
kind = "crm"
base_url = "{base}/crm"
timeout = "2s"
"#
    );
    for i in 0..n {
        c.push_str(&format!(
            r#"
[streams.contacts-{i}]
source = "crm"
entity = "contact"
target = "hub"
every = "{every}"
jitter = "0s"
page_size = 50
max_per_run = 100000
max_per_payload = 50

[streams.contacts-{i}.webhook]
url = "/hooks/contacts-{i}"
"#
        ));
    }
    c
}

/// An instance of its own (its own state folder for the lock and control files), on the
/// environment's shared PostgreSQL state.
fn instance(env: &Env, name: &str) -> Daemon {
    let dir = env.dir.path().join(format!("state-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    env.spawn_daemon_with(&[], &[("USHER_DAEMON__STATE_DIR", dir.to_str().unwrap())])
}

/// The CLI as run on another host: its own state folder, no daemon beside it.
fn cli_elsewhere(env: &Env, args: &[&str]) -> std::process::Output {
    let dir: PathBuf = env.dir.path().join("state-cli");
    std::fs::create_dir_all(&dir).unwrap();
    Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(args)
        .env("USHER_DAEMON__STATE_DIR", &dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn url(env: &Env) -> String {
    env.pg.clone().unwrap()
}

/// Lease group → holder (None when free or expired).
fn holders(env: &Env) -> BTreeMap<String, Option<String>> {
    psql(
        &url(env),
        "SELECT key, CASE WHEN expires_ms > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint
                     THEN holder END FROM leases ORDER BY key",
    )
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone()))
    .collect()
}

fn pid_of(holder: &str) -> u32 {
    holder.split(':').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_spread_and_operator_requests_from_any_host_reach_the_holder() {
    let Some(env) = pg_env() else { return };
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(120);
    env.write_config(&config(&format!("http://{}", s.addr), 4, "1h"));
    let a = instance(&env, "a");
    a.wait_ready();
    let b = instance(&env, "b");
    b.wait_ready();
    // Spread: each instance holds some of the four groups, none all of them.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let h = holders(&env);
            let pids: Vec<u32> = h.values().flatten().map(|x| pid_of(x)).collect();
            pids.len() == 4
                && pids.iter().filter(|p| **p == a.pid()).count() == 2
                && pids.iter().filter(|p| **p == b.pid()).count() == 2
        }),
        "leases {:?}\nA: {}\nB: {}",
        holders(&env),
        a.log(),
        b.log()
    );
    // Every stream ran once, each on its holder: the webhook got every contact four times.
    assert!(
        wait_until(Duration::from_secs(30), || s.crm.accepted_records().len()
            == 480),
        "{} accepted\nA: {}\nB: {}",
        s.crm.accepted_records().len(),
        a.log(),
        b.log()
    );

    // A reset from a host with no daemon: the holder does it and says so.
    let h = holders(&env);
    let holder = h["contacts-3"].clone().unwrap();
    let out = cli_elsewhere(&env, &["cursor", "reset", "contacts-3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("contacts-3: reset done by instance {holder}"))
            && text.contains("cursor reset (was \"c120\")"),
        "{text}"
    );
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let audit = psql(
        &url(&env),
        "SELECT actor FROM audit WHERE action = 'cursor-reset' AND stream = 'contacts-3'",
    );
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(
        audit[0][0]
            .as_deref()
            .unwrap()
            .contains(&format!("@{host} via `usher cursor reset`")),
        "{audit:?}"
    );
    // Then a trigger: the holder runs it (from the start: the cursor was reset).
    let out = cli_elsewhere(&env, &["trigger", "contacts-3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("trigger done by instance {holder}")),
        "{}",
        stdout(&out)
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            psql(
                &url(&env),
                "SELECT count(*) FROM runs WHERE stream = 'contacts-3' AND outcome = 'ok'",
            )[0][0]
                .as_deref()
                == Some("2")
        }),
        "{}",
        a.log()
    );
    // The triggered run (the last) ran on the holder (an earlier one may have run on the
    // instance that held every group before the second one started).
    let run_holders = psql(
        &url(&env),
        "SELECT holder FROM runs WHERE stream = 'contacts-3' ORDER BY id DESC LIMIT 1",
    );
    assert_eq!(run_holders, vec![vec![Some(holder.clone())]]);
    // An unknown stream is refused before anything is written.
    let out = cli_elsewhere(&env, &["trigger", "nope"]);
    assert_ne!(out.status.code(), Some(0));
    // A control file on the instance that does not hold the stream is passed on to the
    // holder through the state.
    let (other, other_dir) = if pid_of(&holder) == a.pid() {
        (&b, "state-b")
    } else {
        (&a, "state-a")
    };
    let before = s.crm.accepted_records().len();
    std::fs::write(
        env.dir
            .path()
            .join(other_dir)
            .join("control/trigger.contacts-3"),
        "tester\n",
    )
    .unwrap();
    other.signal(Signal::USR1);
    assert!(
        wait_until(Duration::from_secs(20), || {
            psql(
                &url(&env),
                "SELECT count(*) FROM requests WHERE done_at IS NOT NULL AND actor LIKE 'tester (control file on %'",
            )[0][0]
                .as_deref()
                == Some("1")
        }),
        "{}",
        other.log()
    );
    assert_eq!(
        s.crm.accepted_records().len(),
        before,
        "a rerun from the cursor sends nothing new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_or_stopped_instance_s_streams_move_within_a_lease() {
    let Some(env) = pg_env() else { return };
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(50);
    env.write_config(&config(&format!("http://{}", s.addr), 4, "2s"));
    let mut a = instance(&env, "a");
    a.wait_ready();
    let b = instance(&env, "b");
    b.wait_ready();
    let spread = |env: &Env| {
        let h = holders(env);
        let pids: HashSet<u32> = h.values().flatten().map(|x| pid_of(x)).collect();
        h.values().all(Option::is_some) && pids.len() == 2
    };
    assert!(
        wait_until(Duration::from_secs(30), || spread(&env)),
        "{:?}",
        holders(&env)
    );

    // SIGSTOP B: A has every group within a lease (3 s) plus a turn and a tick.
    b.signal(Signal::STOP);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || {
            holders(&env)
                .values()
                .all(|h| h.as_deref().is_some_and(|h| pid_of(h) == a.pid()))
        }),
        "{:?}\n{}",
        holders(&env),
        a.log()
    );
    let stop_failover = t.elapsed();
    eprintln!("failover after SIGSTOP: {stop_failover:?}");
    assert!(stop_failover < Duration::from_secs(8), "{stop_failover:?}");
    // B wakes up: it learns it lost its leases, commits nothing under them, and takes its
    // share back gradually.
    b.signal(Signal::CONT);
    assert!(
        b.wait_log("lost the lease of a stream group", Duration::from_secs(15)),
        "{}",
        b.log()
    );
    assert!(
        wait_until(Duration::from_secs(40), || spread(&env)),
        "{:?}",
        holders(&env)
    );

    // SIGKILL A: B has every group within a lease plus a turn.
    a.kill9();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || {
            holders(&env)
                .values()
                .all(|h| h.as_deref().is_some_and(|h| pid_of(h) == b.pid()))
        }),
        "{:?}\n{}",
        holders(&env),
        b.log()
    );
    let kill_failover = t.elapsed();
    eprintln!("failover after SIGKILL: {kill_failover:?}");
    assert!(kill_failover < Duration::from_secs(8), "{kill_failover:?}");
    // Whatever happened, every stream delivered every contact exactly once.
    assert!(
        wait_until(Duration::from_secs(30), || s.crm.accepted_records().len()
            == 200),
        "{}\n{}",
        s.crm.accepted_records().len(),
        b.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    let mut per_path: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in s
        .crm
        .received()
        .iter()
        .filter(|r| r.status == 200 && !r.duplicate)
    {
        let body: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
        for rec in body {
            per_path
                .entry(r.path.clone())
                .or_default()
                .push(rec["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(per_path.len(), 4, "{:?}", per_path.keys());
    for (path, ids) in per_path {
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(
            (ids.len(), unique.len()),
            (50, 50),
            "{path}: every contact once"
        );
    }
}

/// A holder paused past its lease in the middle of a run, seen from the vendor's side (the
/// fake notes which process made each call, from the kernel's socket tables): once the
/// new holder has called, the old one, woken up, calls nothing more, not even a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_woken_up_after_its_lease_calls_no_vendor() {
    let Some(env) = pg_env() else { return };
    usher_sandbox::callers::record();
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let n = 400;
    s.crm.add_contacts(n as u64);
    // A long run that spends most of its time between calls: the feed allows two reads a
    // second, five contacts a page (80 reads), so a pause mostly lands in a wait.
    env.write_config(
        &config(&format!("http://{}", s.addr), 1, "1s")
            .replace("page_size = 50", "page_size = 5")
            .replace(
                "max_retries = 3",
                "max_retries = 3\nrate_limit = { calls = 2, per = \"1s\" }",
            ),
    );
    let a = instance(&env, "a");
    a.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            >= 20),
        "{}",
        a.log()
    );
    let b = instance(&env, "b");
    b.wait_ready();
    // Three pauses of the holder, each in the middle of the stream's run.
    let mut woken: Vec<(u32, Instant)> = Vec::new();
    for _ in 0..3 {
        let holder = [&a, &b]
            .into_iter()
            .find(|d| {
                holders(&env)
                    .values()
                    .flatten()
                    .any(|h| pid_of(h) == d.pid())
            })
            .unwrap();
        holder.signal(Signal::STOP);
        // Past the lease and the new holder's wait for the writes in doubt (lease 3 s,
        // target timeout 2 s, settle margin 1 s): the other instance is inside its run.
        std::thread::sleep(Duration::from_millis(9_000));
        holder.signal(Signal::CONT);
        woken.push((holder.pid(), Instant::now()));
        std::thread::sleep(Duration::from_millis(2_500));
    }
    assert!(
        wait_until(Duration::from_secs(60), || s.crm.accepted_records().len()
            >= n),
        "{} of {n}\n{}\n{}",
        s.crm.accepted_records().len(),
        a.log(),
        b.log()
    );
    // From the fake's log: no call of one instance falls inside the other's run, i.e.
    // overlaps one of its calls or lands in a gap of less than 2 s between two of them
    // (its run goes on: two reads a second; a handover takes a lease, 3 s, at least).
    let mut calls: Vec<_> = s
        .callers
        .calls()
        .into_iter()
        .filter(|c| c.pid.is_some_and(|p| p == a.pid() || p == b.pid()))
        .collect();
    calls.sort_by_key(|c| c.received);
    for c in &calls {
        let others: Vec<_> = calls.iter().filter(|o| o.pid != c.pid).collect();
        let before = others.iter().rev().find(|o| o.received <= c.received);
        let after = others.iter().find(|o| o.received >= c.received);
        if let Some(p) = before {
            let inside = p.answered > c.received
                || after.is_some_and(|n| {
                    n.received.duration_since(p.answered) < Duration::from_secs(2)
                });
            assert!(
                !inside,
                "instance {:?} called {} {} inside a run of instance {:?} (pauses ended at {:?})",
                c.pid,
                c.method,
                c.path,
                p.pid,
                woken
                    .iter()
                    .map(|(pid, t)| (pid, c.received.saturating_duration_since(*t)))
                    .collect::<Vec<_>>()
            );
        }
    }
    let switches = calls.windows(2).filter(|w| w[0].pid != w[1].pid).count();
    assert!(
        switches >= 2,
        "the pauses moved the stream: {switches} switches"
    );
    eprintln!(
        "{} calls, the stream moved {switches} times; no instance called inside the other's run",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_state_moves_to_postgresql_without_resending_anything() {
    let Some(dst) = pg_env() else { return };
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(120);
    let base = format!("http://{}", s.addr);
    // The SQLite state of one host: a run of each of two streams, a reset in the audit.
    let mut src = Env::new();
    src.pg = None;
    src.write_config(&config(&base, 2, "1h").replace(
        "lease = \"3s\"\n",
        &format!("state_dir = {:?}\n", src.state_dir().display().to_string()),
    ));
    for stream in ["contacts-0", "contacts-1"] {
        let out = src.cli(&["trigger", stream]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert_eq!(s.crm.accepted_records().len(), 240);
    let url = url(&dst);
    let out = src.cli(&["state", "migrate", "--to", &url]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains("cursors") && text.contains("copied "),
        "{text}"
    );
    // Everything is there, and new rows get new ids.
    let cursors = psql(&url, "SELECT stream, cursor FROM cursors ORDER BY stream");
    assert_eq!(
        cursors,
        vec![
            vec![Some("contacts-0".into()), Some("c120".into())],
            vec![Some("contacts-1".into()), Some("c120".into())]
        ]
    );
    let runs = psql(&url, "SELECT count(*), max(id) FROM runs");
    assert_eq!(runs[0][0].as_deref(), Some("2"), "{runs:?}");
    // A second migrate into the same database is refused: it holds state now.
    let out = src.cli(&["state", "migrate", "--to", &url]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("already holds state"),
        "{}",
        stderr(&out)
    );
    // A password in the URL is refused before anything is opened.
    let out = src.cli(&[
        "state",
        "migrate",
        "--to",
        "postgres://u:hunter2@127.0.0.1:1/x",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    // An instance on the migrated state goes on from the cursors: nothing is sent again.
    dst.write_config(&config(&base, 2, "1h"));
    let d = instance(&dst, "a");
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || {
            psql(&url, "SELECT count(*) FROM runs WHERE outcome = 'ok'")[0][0].as_deref()
                == Some("4")
        }),
        "{}",
        d.log()
    );
    assert_eq!(s.crm.accepted_records().len(), 240, "nothing sent twice");
    let ids = psql(&url, "SELECT id FROM runs ORDER BY id");
    assert_eq!(ids.len(), 4, "{ids:?}");
}

/// Failover time, measured (a bench, not a timed test: `cargo test --test several
/// failover_figures -- --ignored --nocapture` with USHER_TEST_POSTGRES set). Two instances,
/// eight stream groups, lease 3 s; 20 times the holder of a group is SIGKILLed (its own
/// machine sees the process gone) and 20 times SIGSTOPped (as another machine sees a dead
/// or cut-off host: the lease must run out): the time until the other instance holds the
/// group, median and max.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn failover_figures() {
    let Some(env) = pg_env() else { return };
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(10);
    env.write_config(&config(&format!("http://{}", s.addr), 8, "1h"));
    let mut inst = [instance(&env, "a"), instance(&env, "b")];
    for d in &inst {
        d.wait_ready();
    }
    let mut figures: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 0..40 {
        let stop = round % 2 == 1;
        // Both instances up and holding a share.
        assert!(wait_until(Duration::from_secs(60), || {
            let pids: HashSet<u32> = holders(&env)
                .values()
                .flatten()
                .map(|h| pid_of(h))
                .collect();
            pids.len() == 2 && holders(&env).values().all(Option::is_some)
        }));
        let victim = (round / 2) % 2;
        let other = 1 - victim;
        let vpid = inst[victim].pid();
        let t = Instant::now();
        if stop {
            inst[victim].signal(Signal::STOP);
        } else {
            inst[victim].kill9();
        }
        let opid = inst[other].pid();
        assert!(wait_until(Duration::from_secs(30), || holders(&env)
            .values()
            .all(|h| h.as_deref().is_some_and(|h| pid_of(h) == opid))));
        let took = t.elapsed();
        figures
            .entry(if stop {
                "SIGSTOP (lease runs out)"
            } else {
                "SIGKILL (seen dead on its machine)"
            })
            .or_default()
            .push(took);
        if stop {
            inst[victim].signal(Signal::CONT);
        } else {
            inst[victim] = instance(&env, if victim == 0 { "a" } else { "b" });
            inst[victim].wait_ready();
        }
        let _ = vpid;
    }
    for (what, mut v) in figures {
        v.sort();
        println!(
            "failover after {what}: {} times, median {:.2} s, max {:.2} s (lease 3 s, renewed every 1 s)",
            v.len(),
            v[v.len() / 2].as_secs_f64(),
            v[v.len() - 1].as_secs_f64()
        );
    }
}
