//! Cursor reset and trigger through the CLI, with and without a running daemon, and the
//! control files themselves.

mod common;

use std::time::Duration;

use common::{Env, crm_stream_config, query_i64, stdout, wait_until};
use usher_sandbox::Sandbox;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_and_trigger_through_a_running_daemon() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(60);
    let env = Env::new();
    env.write_config(&crm_stream_config(
        &format!("http://{}", s.addr),
        "1h",
        1000,
        50,
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s
        .crm
        .accepted_records()
        .len()
        == 60));
    assert!(wait_until(Duration::from_secs(5), || stdout(
        &env.cli(&["cursor", "show", "contacts"])
    )
    .contains("c60")));

    let out = env.cli(&["cursor", "reset", "contacts"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        // "by the daemon (pid …)", or on PostgreSQL "by instance host:pid:…"
        stdout(&out).contains("reset done by "),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&env.cli(&["cursor", "show", "contacts"])).contains("at the start"));
    let audited = query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM audit WHERE action = 'cursor-reset' AND stream = 'contacts' AND actor LIKE '%usher cursor reset%'",
    );
    assert_eq!(audited, 1);

    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("trigger done by "),
        "{}",
        stdout(&out)
    );
    // The re-import delivers the history again (a webhook target upserts by id).
    assert!(
        wait_until(Duration::from_secs(10), || s.crm.accepted_records().len()
            == 120),
        "{}",
        d.log()
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM audit WHERE action = 'trigger'"
        ),
        1
    );

    // A control file dropped by hand is picked up by the poll, acted on and removed.
    let file = env.state_dir().join("control/reset.contacts");
    std::fs::write(&file, "ops-team\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !file.exists()),
        "picked up within a few seconds"
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM audit WHERE action = 'cursor-reset' AND actor = 'ops-team'"
        ),
        1
    );
    // One naming an unknown stream is refused, audited and removed.
    let bad = env.state_dir().join("control/trigger.nope");
    std::fs::write(&bad, "").unwrap();
    assert!(wait_until(Duration::from_secs(5), || !bad.exists()));
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM audit WHERE action = 'control-rejected'"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_and_trigger_without_a_daemon() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(75);
    let env = Env::new();
    env.write_config(&crm_stream_config(
        &format!("http://{}", s.addr),
        "1h",
        1000,
        50,
    ));
    assert!(stdout(&env.cli(&["cursor", "show", "contacts"])).contains("at the start"));
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("contacts: ok"), "{}", stdout(&out));
    assert_eq!(s.crm.accepted_records().len(), 75);
    assert!(stdout(&env.cli(&["cursor", "show", "contacts"])).contains("c75"));
    let out = env.cli(&["cursor", "reset", "contacts"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("cursor reset (was \"c75\")"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM audit WHERE action = 'cursor-reset'"
        ),
        1
    );
    let out = env.cli(&["cursor", "reset", "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

/// A reset and a trigger given together (issue 19, item 4): the reset holds the stream in
/// its own task; the trigger must run as soon as the stream is free, not at the next slot
/// (here an hour away).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trigger_given_with_a_reset_runs_as_soon_as_the_reset_is_done() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(40);
    let env = Env::new();
    env.write_config(&crm_stream_config(
        &format!("http://{}", s.addr),
        "1h",
        1000,
        50,
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s
        .crm
        .accepted_records()
        .len()
        == 40));
    // Both files at once (the trigger written first), then SIGUSR1.
    let control = env.state_dir().join("control");
    std::fs::write(control.join("trigger.contacts"), "ops\n").unwrap();
    std::fs::write(control.join("reset.contacts"), "ops\n").unwrap();
    d.signal(rustix::process::Signal::USR1);
    assert!(
        wait_until(Duration::from_secs(10), || s.crm.accepted_records().len()
            == 80),
        "the re-import ran at once after the reset: {} records\n{}",
        s.crm.accepted_records().len(),
        d.log()
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM runs WHERE trigger = 'trigger'"
        ),
        1
    );
}
