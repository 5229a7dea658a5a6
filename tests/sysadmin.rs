//! What a sysadmin meets running usher for a year (issue 21): `usher reload` (the unit's
//! ExecReload) failing when the daemon refuses a configuration, log priorities for the
//! journal, log files kept to a number, progress of `usher trigger`, help texts, the demo
//! from any folder, the man pages.

mod common;

use std::time::Duration;

use common::{Env, crm_stream_config, stderr, stdout, wait_until};
use usher::sandbox::Sandbox;

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

#[test]
fn the_unit_reloads_through_usher_reload_not_a_bare_signal() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/usher.service"
    ))
    .unwrap();
    let reload: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        reload,
        ["ExecReload=/usr/bin/usher reload --config /etc/usher/usher.toml"],
        "systemctl reload must wait for the daemon's verdict"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_reload_fails_and_the_old_config_keeps_running() {
    let s = sandbox(5).await;
    let env = Env::new();
    let good = crm_stream_config(&base(&s), "1h", 1000, 50);
    env.write_config(&good);

    // No daemon: nothing to reload.
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no usher daemon runs"),
        "{}",
        stderr(&out)
    );

    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s
        .crm
        .accepted_records()
        .len()
        == 5));

    // A config the CLI itself finds broken: refused before the daemon is signalled.
    env.write_config(&good.replace("every = \"1h\"", "every = \"1h\"\ncolour = 2"));
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("streams.contacts.colour"), "{err}");
    assert!(err.contains("reload refused"), "{err}");
    assert!(
        !d.log().contains("reload refused"),
        "not signalled: {}",
        d.log()
    );

    // A config only the daemon can judge (a secret in an environment variable that this
    // shell has and the service has not): the daemon refuses, and so does `usher reload`.
    let with_env_token = good.replace(
        "max_retries = 3",
        "max_retries = 3\nauth = { type = \"bearer\", token_env = \"CRM_TOKEN_ONLY_IN_THE_SHELL\" }",
    );
    env.write_config(&with_env_token);
    let out = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .arg("reload")
        .env("CRM_TOKEN_ONLY_IN_THE_SHELL", "s3cr3t-token-value")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}\n{}", d.log());
    assert!(err.contains("CRM_TOKEN_ONLY_IN_THE_SHELL"), "{err}");
    assert!(err.contains("the daemon (pid"), "{err}");
    assert!(!err.contains("s3cr3t-token-value"), "{err}");
    assert!(d.log().contains("reload refused"), "{}", d.log());
    assert!(d.child.id() > 0);

    // A good config: taken, and said so.
    env.write_config(&crm_stream_config(&base(&s), "2h", 1000, 50));
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("configuration reloaded by the daemon"),
        "{}",
        stdout(&out)
    );
    assert!(d.log().contains("configuration reloaded"), "{}", d.log());
    let mut d = d;
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(Some(0)));
}
