//! What a sysadmin meets running usher for a year (issue 21): `usher reload` (the unit's
//! ExecReload) failing when the daemon refuses a configuration, log priorities for the
//! journal, log files kept to a number, progress of `usher trigger`, help texts, the demo
//! from any folder, the man pages.

mod common;

use std::time::Duration;

use common::{Env, crm_stream_config, stderr, stdout, wait_until};
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

/// Starts `usher run` with stdout and stderr in `log`, `JOURNAL_STREAM` set to `journal`
/// (None: the file's own device and inode, as systemd sets it for the journal's socket),
/// makes it log an error (a refused reload) and stops it; returns what it wrote.
fn log_of_a_run(env: &Env, journal: Option<&str>) -> String {
    use std::os::unix::fs::MetadataExt;
    let log = env
        .dir
        .path()
        .join(format!("stdout-{}.log", journal.is_some()));
    let file = std::fs::File::create(&log).unwrap();
    let m = file.metadata().unwrap();
    let stream = journal
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}:{}", m.dev(), m.ino()));
    let mut child = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(["--log-format", "text", "run"])
        .env("JOURNAL_STREAM", stream)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || read()
            .contains("usher is ready")),
        "{}",
        read()
    );
    // `daemon.state_dir` changed (a warning) in a config that is also invalid (errors).
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(env.config_path(), format!("{cfg}\n[bogus]\nx = 1\n")).unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || read()
            .contains("reload refused")),
        "{}",
        read()
    );
    std::fs::write(env.config_path(), cfg).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(child.wait().unwrap().success());
    read()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_lines_carry_their_priority_when_stdout_is_the_journal() {
    let s = sandbox(3).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 1000, 50));

    let text = log_of_a_run(&env, None);
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} in:\n{text}"))
            .to_string()
    };
    assert!(line("usher is ready").starts_with("<6>"), "{text}");
    assert!(line("reload refused").starts_with("<3>"), "{text}");
    assert!(line("configuration problem").starts_with("<3>"), "{text}");
    assert!(line("stopping:").starts_with("<6>"), "{text}");
    for l in text.lines().filter(|l| l.contains(" WARN ")) {
        assert!(l.starts_with("<4>"), "{l}");
    }

    // JOURNAL_STREAM naming another stream (stderr redirected elsewhere, a child of a
    // service run by hand): no prefixes.
    let text = log_of_a_run(&env, Some("1:1"));
    assert!(text.contains("reload refused"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with('<')), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_log_files_are_pruned_to_keep_files() {
    let s = sandbox(3).await;
    let env = Env::new();
    let logs = env.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // Five older days, created oldest first (files are pruned by age), and a file of
    // someone else's that does not start with the prefix.
    let old = [
        "2026-01-01",
        "2026-01-02",
        "2026-01-03",
        "2026-01-04",
        "2026-01-05",
    ];
    for day in old {
        std::fs::write(logs.join(format!("usher.log.{day}")), "{}\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(logs.join("notes.txt"), "mine\n").unwrap();
    env.write_config(&format!(
        "[log]\ndirectory = {:?}\nkeep_files = 3\n{}",
        logs.display().to_string(),
        crm_stream_config(&base(&s), "1h", 1000, 50)
    ));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(Some(0)));
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(
        names,
        [
            "notes.txt".to_string(),
            "usher.log.2026-01-04".into(),
            "usher.log.2026-01-05".into(),
            format!("usher.log.{today}"),
        ],
        "today's file and the two newest before it"
    );

    // 0 is refused by validate.
    env.write_config(&format!(
        "[log]\ndirectory = {:?}\nkeep_files = 0\n",
        logs.display().to_string()
    ));
    let out = env.cli(&["validate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("log.keep_files"), "{}", stderr(&out));
}

/// A CRM feed that answers its first call with 429 and `Retry-After: 2`.
async fn sandbox_asking_for_a_pause() -> Sandbox {
    let s = sandbox(5).await;
    s.crm.faults.push(
        "crm.feed",
        usher_sandbox::Fault::RateLimited {
            status: 429,
            retry_after_secs: 2,
        },
        1,
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trigger_says_what_it_waits_for_and_the_pages_it_committed() {
    let s = sandbox_asking_for_a_pause().await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 1000, 50));
    // Not a terminal: plain lines on stderr.
    let out = env.cli(&["trigger", "contacts"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("usher: contacts: waiting 2 s for the Retry-After of crm"),
        "{err}"
    );
    assert!(
        err.contains("usher: contacts: 1 page(s) committed: pulled 5"),
        "{err}"
    );
    assert!(stdout(&out).contains("contacts: ok"), "{}", stdout(&out));
    assert_eq!(s.crm.accepted_records().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trigger_on_a_terminal_shows_the_wait_on_its_progress_line() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: needs script(1) (util-linux) for a terminal");
        return;
    }
    let s = sandbox_asking_for_a_pause().await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 1000, 50));
    // script(1) gives the command a terminal and copies what it shows.
    let command = format!(
        "{} --config {} trigger contacts",
        common::bin(),
        env.config_path().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("contacts: waiting 2 s for the Retry-After of crm"),
        "{shown:?}"
    );
    assert!(
        !shown.contains("usher: contacts: waiting"),
        "a progress line, not plain lines: {shown:?}"
    );
    assert!(shown.contains("contacts: ok"), "{shown:?}");
}

const REFERENCE: &str = include_str!("../doc/configuration.md");

/// The keys of each table of the reference: `[daemon]` → state_dir, control_poll, …
fn reference_keys() -> std::collections::BTreeMap<String, Vec<String>> {
    let mut tables = std::collections::BTreeMap::new();
    let mut table = String::new();
    for line in REFERENCE.lines() {
        if let Some(h) = line.strip_prefix("#### ") {
            table = h
                .trim_matches(|c| c == '`' || c == '[' || c == ']')
                .to_string();
            tables.insert(table.clone(), Vec::new());
        } else if let Some(row) = line.strip_prefix("| `") {
            let cell = row.split(" |").next().unwrap();
            let keys = tables.get_mut(&table).expect("a row under a heading");
            for k in cell.split([',', '/', '+']) {
                keys.push(k.trim().trim_matches('`').to_string());
            }
        }
    }
    tables
}

#[test]
fn the_readme_reference_is_doc_configuration_md() {
    let readme = include_str!("../README.md");
    let begin = "<!-- BEGIN doc/configuration.md -->\n";
    let start = readme.find(begin).expect("the README has the reference") + begin.len();
    let end = readme.find("<!-- END doc/configuration.md -->").unwrap();
    assert!(
        readme[start..end] == *REFERENCE,
        "README.md's configuration reference differs from doc/configuration.md: copy the file between the markers"
    );
}

#[test]
fn every_key_the_loader_knows_is_in_the_reference() {
    // One unknown key in every table: the loader answers with the keys it knows there.
    let env = Env::new();
    let tables = [
        ("daemon", "[daemon]\nstate_dir = \"STATE\"\n"),
        ("log", "[log]\n"),
        ("metrics", "[metrics]\n"),
        ("receiver", "[receiver]\n"),
        ("connections.NAME", "[connections.c]\nkind = \"crm\"\n"),
        (
            "connections.NAME.auth",
            "[connections.c.auth]\ntype = \"none\"\n",
        ),
        (
            "streams.NAME",
            "[streams.s]\nsource = \"c\"\ntarget = \"c\"\nentity = \"contact\"\nevery = \"1m\"\n",
        ),
        ("streams.NAME.feed", "[streams.s.feed]\n"),
        ("streams.NAME.webhook", "[streams.s.webhook]\n"),
        ("streams.NAME.s360", "[streams.s.s360]\n"),
        ("streams.NAME.halo", "[streams.s.halo]\n"),
        ("streams.NAME.airship", "[streams.s.airship]\n"),
        ("streams.NAME.cdp", "[streams.s.cdp]\n"),
        ("resellers.NAME", "[resellers.r]\n"),
        ("companies.NAME", "[companies.x]\n"),
    ];
    let mut text = String::new();
    for (i, (_, toml)) in tables.iter().enumerate() {
        text.push_str(&toml.replace("STATE", &env.state_dir().display().to_string()));
        text.push_str(&format!("zz_unknown_{i} = 1\n"));
    }
    std::fs::write(env.config_path(), text).unwrap();
    let err = stderr(&env.cli(&["validate"]));
    let documented = reference_keys();
    for (i, (table, _)) in tables.iter().enumerate() {
        let needle = format!("unknown key `zz_unknown_{i}` (known keys: ");
        let line = err
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no list of the keys of [{table}] in:\n{err}"));
        let known = &line[line.find(&needle).unwrap() + needle.len()..];
        let known = known.trim_end_matches(')');
        let in_doc = documented
            .get(*table)
            .unwrap_or_else(|| panic!("doc/configuration.md has no [{table}]"));
        for key in known.split(", ") {
            // A secret `X` is documented once, for X, X_file and X_env.
            let base = key.trim_end_matches("_file").trim_end_matches("_env");
            assert!(
                in_doc.iter().any(|k| k == key || k == base),
                "[{table}] {key} is not in doc/configuration.md (it documents {in_doc:?})"
            );
        }
    }
}

#[test]
fn man_pages_have_files_signals_exit_status_and_usher_toml_5() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .arg("generate-assets")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let usher1 = std::fs::read_to_string(dir.path().join("man/usher.1")).unwrap();
    for section in [
        ".SH \"FILES\"",
        ".SH \"SIGNALS\"",
        ".SH \"EXIT STATUS\"",
        ".SH \"SEE ALSO\"",
    ] {
        assert!(usher1.contains(section), "{section} in usher.1");
    }
    assert!(usher1.contains("\\fB78\\fR"), "exit 78 explained");
    assert!(usher1.contains("\\fBSIGHUP\\fR"));
    let usher5 = std::fs::read_to_string(dir.path().join("man5/usher.toml.5")).unwrap();
    assert!(usher5.starts_with(".TH USHER.TOML 5"), "{usher5}");
    for (table, keys) in reference_keys() {
        assert!(usher5.contains(&format!(".SH \"[{table}]\"")), "[{table}]");
        for key in keys {
            let shown = format!("\\fB{}", key.replace('-', "\\-"));
            assert!(usher5.contains(&shown), "[{table}] {key} in usher.toml.5");
        }
    }
    // groff reads both without a warning.
    for page in [
        dir.path().join("man/usher.1"),
        dir.path().join("man5/usher.toml.5"),
    ] {
        match std::process::Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
            .arg(&page)
            .output()
        {
            Ok(o) => assert!(
                o.stderr.is_empty(),
                "{}: {}",
                page.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => eprintln!("SKIPPED: groff is not installed; the pages were not rendered"),
        }
    }
}

#[test]
fn every_argument_has_help() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            if sub.get_about().is_none() {
                missing.push(format!("{path} {} (the command)", sub.get_name()));
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut cmd = usher::cli::Cli::command();
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, "usher", &mut missing);
    assert!(missing.is_empty(), "without help: {missing:#?}");

    let help = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        stdout(&out)
    };
    assert!(help(&["status"]).contains("--json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trigger_through_the_daemon_follows_the_run_on_a_terminal() {
    if common::sqlite_only(
        "a local daemon's control files (on PostgreSQL a trigger is a request row)",
    ) {
        return;
    }
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: needs script(1) (util-linux) for a terminal");
        return;
    }
    let s = sandbox(5).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(&base(&s), "1h", 1000, 50));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || s
        .crm
        .accepted_records()
        .len()
        == 5));
    // The next run meets a 429 with `Retry-After: 3` on the feed.
    s.crm.add_contacts(5);
    s.crm.faults.push(
        "crm.feed",
        usher_sandbox::Fault::RateLimited {
            status: 429,
            retry_after_secs: 3,
        },
        1,
    );
    let command = format!(
        "{} --config {} trigger contacts",
        common::bin(),
        env.config_path().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}\n{}", d.log());
    assert!(
        shown.contains("contacts: waiting 3 s for the Retry-After of crm")
            || shown.contains("contacts: waiting 2 s for the Retry-After of crm"),
        "{shown:?}"
    );
    assert!(
        shown.contains("contacts: ok in the daemon (pid"),
        "the run's result: {shown:?}"
    );
    assert_eq!(s.crm.accepted_records().len(), 10);
    // Not on a terminal: as before, it returns once the daemon took the request.
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("trigger done by the daemon"),
        "{}",
        stdout(&out)
    );
}
