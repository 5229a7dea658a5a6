//! Hostile input for the core: broken configs (each refused by `validate` and by `run` with
//! exit 78 and a message naming file and key), faults from the feed and the webhook, odd
//! state (foreign or future cursors, empty or newer databases), rate budgets, secrets.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Env, crm_stream_config, query_i64, stderr, stdout};
use usher_sandbox::{Fault, Sandbox};

const CONN: &str = "[connections.crm]\nkind = \"crm\"\nbase_url = \"http://127.0.0.1:9/crm\"\n";
const STREAM_HEAD: &str = "[streams.s]\nsource = \"crm\"\nentity = \"contact\"\ntarget = \"crm\"\n";
const HOOK: &str = "[streams.s.webhook]\nurl = \"/hooks\"\n";

fn stream(extra: &str) -> String {
    format!("{CONN}\n{STREAM_HEAD}every = \"15m\"\n{extra}\n{HOOK}")
}

/// (what, main file text, drop-in text, key the problem names, words in the message)
fn broken() -> Vec<(
    &'static str,
    String,
    Option<String>,
    &'static str,
    &'static str,
)> {
    vec![
        ("unknown top-level section", format!("{}\n[colours]\nx = 1\n", stream("")), None, "colours", "unknown section"),
        ("unknown stream key", stream("speed = 3"), None, "streams.s.speed", "unknown key `speed`"),
        ("unknown connection key", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nflavour = 1"), None, "connections.crm.flavour", "unknown key"),
        ("page_size a string", stream("page_size = \"big\""), None, "streams.s.page_size", "expected"),
        ("page_size zero", stream("page_size = 0"), None, "streams.s.page_size", "out of range"),
        ("page_size negative", stream("page_size = -5"), None, "streams.s.page_size", "expected"),
        ("enabled not a bool", stream("enabled = \"yes\""), None, "streams.s.enabled", "expected"),
        ("bad duration", stream("").replace("every = \"15m\"", "every = \"quarter hour\""), None, "streams.s.every", "invalid duration"),
        ("no schedule", stream("").replace("every = \"15m\"\n", ""), None, "streams.s.every", "missing schedule"),
        ("both schedules", stream("cron = \"0 3 * * *\""), None, "streams.s.cron", "not both"),
        ("bad cron", stream("").replace("every = \"15m\"", "cron = \"0 25 * * *\""), None, "streams.s.cron", "invalid cron"),
        ("cron with 7 words", stream("").replace("every = \"15m\"", "cron = \"a b c d e f g h\""), None, "streams.s.cron", "invalid cron"),
        ("unknown timezone", stream("").replace("every = \"15m\"", "cron = \"0 3 * * *\"\ntimezone = \"Europe/Atlantis\""), None, "streams.s.timezone", "unknown timezone"),
        ("timezone on an interval", stream("timezone = \"UTC\""), None, "streams.s.timezone", "cron"),
        ("unknown source connection", stream("").replace("source = \"crm\"", "source = \"crn\""), None, "streams.s.source", "unknown connection \"crn\""),
        ("unknown target connection", stream("").replace("target = \"crm\"", "target = \"nope\""), None, "streams.s.target", "unknown connection \"nope\""),
        ("missing entity", stream("").replace("entity = \"contact\"\n", ""), None, "streams.s.entity", "missing key `entity`"),
        ("bad base URL", stream("").replace("http://127.0.0.1:9/crm", "127.0.0.1:9"), None, "connections.crm.base_url", "URL"),
        ("ftp base URL", stream("").replace("http://127.0.0.1:9/crm", "ftp://example.org/"), None, "connections.crm.base_url", "not an http(s) URL"),
        ("unknown kind", stream("").replace("kind = \"crm\"", "kind = \"salesforce\""), None, "connections.crm.kind", "unknown kind"),
        ("missing kind", stream("").replace("kind = \"crm\"\n", ""), None, "connections.crm.kind", "missing key `kind`"),
        ("missing secret", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"bearer\" }"), None, "connections.crm.auth.token", "missing secret"),
        ("unreadable secret file", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"bearer\", token_file = \"/nonexistent/token\" }"), None, "connections.crm.auth.token_file", "cannot read secret file"),
        ("secret env unset", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"bearer\", token_env = \"USHER_TEST_SURELY_UNSET_VAR\" }"), None, "connections.crm.auth.token_env", "is not set"),
        ("two ways to give a secret", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"bearer\", token = \"x\", token_env = \"HOME\" }"), None, "connections.crm.auth.token", "only one"),
        ("unknown auth type", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"kerberos\" }"), None, "connections.crm.auth.type", "unknown auth type"),
        ("auth key of another type", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"none\", username = \"u\" }"), None, "connections.crm.auth.username", "does not apply"),
        ("bad api-key header", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"api_key\", header = \"X Bad\", key = \"k\" }"), None, "connections.crm.auth.header", "not a valid header name"),
        ("unknown transform", stream("[streams.s.mapping]\nemail = \"email | shout\""), None, "streams.s.mapping.email", "unknown transform"),
        ("empty mapping source", stream("[streams.s.mapping]\nemail = \" | trim\""), None, "streams.s.mapping.email", "source path is empty"),
        ("bad oldest date", stream("oldest = \"last year\""), None, "streams.s.oldest", "is not a date"),
        ("bad on_bad_record", stream("on_bad_record = \"ignore\""), None, "streams.s.on_bad_record", "neither"),
        ("near-miss on_bad_record", stream("on_bad_record = \"dead-letter\""), None, "streams.s.on_bad_record", "did you mean `dead_letter`?"),
        ("near-miss auth type", stream("").replace("kind = \"crm\"", "kind = \"crm\"\nauth = { type = \"baerer\", token = \"t\" }"), None, "connections.crm.auth.type", "did you mean `bearer`?"),
        ("near-miss stream key", stream("evry = \"1m\""), None, "streams.s.evry", "did you mean `every`?"),
        ("payload over run", stream("max_per_run = 10\nmax_per_payload = 50"), None, "streams.s.max_per_payload", "larger than max_per_run"),
        ("webhook URL missing", stream("").replace(HOOK, ""), None, "streams.s.webhook.url", "missing key `url`"),
        ("unknown URL placeholder", stream("").replace("url = \"/hooks\"", "url = \"/hooks/{venue}\""), None, "streams.s.webhook.url", "unknown placeholder"),
        ("non-2xx accepted status", stream("").replace("url = \"/hooks\"", "url = \"/hooks\"\naccepted_statuses = [500]"), None, "streams.s.webhook.accepted_statuses", "2xx"),
        ("bad stream name", stream("").replace("[streams.s]", "[streams.\"a b\"]").replace("[streams.s.webhook]", "[streams.\"a b\".webhook]"), None, "streams.a b", "only letters"),
        ("bad log level", format!("[log]\nlevel = \"loud\"\n{}", stream("")), None, "log.level", "invalid level"),
        ("bad log format", format!("[log]\nformat = \"xml\"\n{}", stream("")), None, "log.format", "unknown format"),
        ("metrics not on loopback", format!("[metrics]\nlisten = \"0.0.0.0:9187\"\n{}", stream("")), None, "metrics.listen", "not a loopback"),
        ("bad control_poll", format!("[daemon]\ncontrol_poll = \"often\"\n{}", stream("")), None, "daemon.control_poll", "invalid duration"),
        ("drop-in with a wrong type", stream(""), Some("[streams.s]\nmax_per_run = \"lots\"\n".into()), "streams.s.max_per_run", "expected"),
        ("drop-in with a syntax error", stream(""), Some("[streams.s\n".into()), "-", "usher.d/50-broken.toml"),
        ("duplicate key in one file", format!("{}\n[connections.crm]\nkind = \"crm\"\n", stream("")), None, "-", "usher.toml"),
    ]
}

#[test]
fn every_broken_config_is_refused_by_validate_and_run_naming_file_and_key() {
    let cases = broken();
    assert!(cases.len() >= 30);
    for (what, main, dropin, key, words) in cases {
        let env = Env::new();
        // Hostile configs carry their own [daemon] table sometimes; keep the state apart anyway.
        let main = if main.contains("[daemon]") {
            main.replace(
                "[daemon]",
                &format!(
                    "[daemon]\nstate_dir = {:?}",
                    env.state_dir().display().to_string()
                ),
            )
        } else {
            main
        };
        env.write_config(&main);
        let file = match &dropin {
            Some(text) => {
                env.write_dropin("50-broken.toml", text);
                env.dir.path().join("etc/usher.d/50-broken.toml")
            }
            None => env.config_path(),
        };
        for cmd in ["validate", "run"] {
            let out = env.cli(&[cmd]);
            let err = stderr(&out);
            assert_eq!(
                out.status.code(),
                Some(78),
                "{what}: `{cmd}` exit code; stderr:\n{err}"
            );
            let line = err
                .lines()
                .find(|l| l.contains(&format!("key `{key}`")) && l.contains(words))
                .or_else(|| err.lines().find(|l| key == "-" && l.contains(words)))
                .unwrap_or_else(|| {
                    panic!("{what}: `{cmd}` names no `{key}` with {words:?}:\n{err}")
                });
            let file = file.display().to_string();
            assert!(
                line.contains(&file) || key == "-",
                "{what}: names the file {file} in {line:?}"
            );
        }
        assert!(
            !env.db_path().exists(),
            "{what}: a refused config creates no state"
        );
    }
}

async fn sandbox(n: u64) -> Sandbox {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(n);
    s
}

fn ids(s: &Sandbox) -> Vec<String> {
    s.crm
        .accepted_records()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_exactly(s: &Sandbox, n: u64) {
    let got = ids(s);
    let set: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(got.len(), set.len(), "no record twice");
    assert_eq!(set.len() as u64, n, "every record once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_from_the_feed_never_move_the_cursor_past_undelivered_records() {
    let s = sandbox(120).await;
    let env = Env::new();
    let cfg = crm_stream_config(&format!("http://{}", s.addr), "1h", 10_000, 50)
        .replace("max_retries = 3", "max_retries = 1\ntimeout = \"1s\"");
    env.write_config(&cfg);
    // Each fault outlasts the retries, so the run fails; the cursor must not move past what
    // was delivered, and a clean run afterwards delivers the rest exactly once.
    let faults = [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Truncated,
        Fault::Html,
        Fault::Reset,
        Fault::Slow(Duration::from_millis(1500)),
    ];
    for fault in faults {
        s.crm.faults.push("crm.feed", fault.clone(), 2);
        let out = env.cli(&["trigger", "contacts"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{fault:?}: the run fails: {}",
            stdout(&out)
        );
        let err = stdout(&out);
        assert!(
            err.contains("connection \"crm\"") && err.contains("GET /crm/api/changes"),
            "{fault:?}: names connection and call: {err}"
        );
        s.crm.faults.clear();
        let delivered = ids(&s).len();
        let cursor = stdout(&env.cli(&["cursor", "show", "contacts"]));
        let pos: usize = cursor
            .trim()
            .rsplit('c')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            pos <= delivered,
            "{fault:?}: cursor {cursor} is past the {delivered} delivered"
        );
        // One page goes through before the next fault.
        s.crm.faults.push("crm.feed", Fault::Status(500), 0);
    }
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_exactly(&s, 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feed_that_repeats_itself_or_never_ends_does_not_loop() {
    let s = sandbox(120).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(
        &format!("http://{}", s.addr),
        "1h",
        10_000,
        50,
    ));
    s.crm.repeat_first_page(true);
    let out = tokio::task::spawn_blocking({
        let p = env.config_path();
        move || {
            std::process::Command::new(common::bin())
                .arg("--config")
                .arg(p)
                .args(["trigger", "contacts"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("same cursor and more records"),
        "{}",
        stdout(&out)
    );
    assert_exactly(&s, 50);
    s.crm.repeat_first_page(false);
    s.crm.endless_has_more(true);
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "an endless `has_more` on empty pages ends the run: {}",
        stdout(&out)
    );
    assert_exactly(&s, 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_future_and_lost_state_are_recovered_or_refused_clearly() {
    if common::sqlite_only("a foreign, newer or lost state file") {
        return;
    }
    let s = sandbox(40).await;
    let env = Env::new();
    env.write_config(&crm_stream_config(
        &format!("http://{}", s.addr),
        "1h",
        10_000,
        50,
    ));
    // A missing database is created; an empty file is a new database too.
    std::fs::write(env.db_path(), b"").unwrap();
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    assert_exactly(&s, 40);
    // A cursor in a foreign format: the source refuses it; the error says to reset.
    let c = rusqlite::Connection::open(env.db_path()).unwrap();
    c.execute("UPDATE cursors SET cursor = 'zzz-not-ours'", [])
        .unwrap();
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("usher cursor reset contacts"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stdout(&env.cli(&["cursor", "show", "contacts"])).trim(),
        "contacts: zzz-not-ours",
        "not moved"
    );
    // A cursor from the future: the feed answers "caught up"; nothing breaks.
    c.execute("UPDATE cursors SET cursor = 'c999999'", [])
        .unwrap();
    s.crm.add_contacts(5);
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    // A reset recovers everything; the webhook target gets the history again.
    assert_eq!(
        env.cli(&["cursor", "reset", "contacts"]).status.code(),
        Some(0)
    );
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    assert_eq!(ids(&s).iter().collect::<HashSet<_>>().len(), 45);
    // A database left by a newer usher: refused with exit 65 and a clear message, untouched.
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let before = std::fs::read(env.db_path()).unwrap();
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        stderr(&out).contains("written by a newer usher"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(env.db_path()).unwrap(),
        before,
        "a newer database is not touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_budget_is_never_exceeded() {
    let s = sandbox(200).await;
    let env = Env::new();
    let cfg = crm_stream_config(&format!("http://{}", s.addr), "1h", 10_000, 50)
        .replace(
            "max_retries = 3",
            "max_retries = 3\nrate_limit = { calls = 4, per = \"1s\" }",
        )
        .replace("page_size = 50", "page_size = 10");
    env.write_config(&cfg);
    s.crm.faults.push("crm.feed", Fault::Status(500), 3);
    let out = env.cli(&["trigger", "contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let calls = s.crm.faults.calls_to("crm.feed");
    assert!(calls.len() >= 20);
    for (i, c) in calls.iter().enumerate() {
        let in_window = calls[i..]
            .iter()
            .take_while(|d| {
                d.at.duration_since(c.at).unwrap_or_default() < Duration::from_millis(1000)
            })
            .count();
        assert!(in_window <= 4, "{in_window} calls within 1 s of call {i}");
    }
    assert_exactly(&s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resuming_from_every_checkpoint_gives_the_full_import() {
    if common::sqlite_only("writing each checkpoint into the state file") {
        return;
    }
    let full: Vec<String> = (1..=100).map(|i| format!("CRM-{i}")).collect();
    // A full import, one page per execution, noting each committed cursor.
    let s = sandbox(100).await;
    let env = Env::new();
    let cfg = crm_stream_config(&format!("http://{}", s.addr), "1h", 10, 10)
        .replace("page_size = 50", "page_size = 10");
    env.write_config(&cfg);
    let mut checkpoints = Vec::new();
    for _ in 0..11 {
        assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
        let c = common::query_text(
            &env.db_path(),
            "SELECT cursor FROM cursors WHERE stream = 'contacts'",
        )
        .unwrap();
        if checkpoints.last() != Some(&c) {
            checkpoints.push(c);
        }
    }
    assert_eq!(ids(&s), full);
    assert!(checkpoints.len() >= 10, "{checkpoints:?}");
    for (k, cp) in checkpoints.iter().enumerate() {
        let s2 = sandbox(100).await;
        let env2 = Env::new();
        env2.write_config(&crm_stream_config(
            &format!("http://{}", s2.addr),
            "1h",
            10_000,
            50,
        ));
        assert_eq!(
            env2.cli(&["cursor", "reset", "contacts"]).status.code(),
            Some(0)
        );
        let c = rusqlite::Connection::open(env2.db_path()).unwrap();
        c.execute(
            "INSERT INTO cursors (stream, cursor, updated_at) VALUES ('contacts', ?1, '2026-01-01T00:00:00Z')",
            [cp],
        )
        .unwrap();
        drop(c);
        assert_eq!(env2.cli(&["trigger", "contacts"]).status.code(), Some(0));
        let tail = ids(&s2);
        let head = &full[..full.len() - tail.len()];
        let mut union: Vec<String> = head.to_vec();
        union.extend(tail.iter().cloned());
        assert_eq!(union, full, "resuming from checkpoint {k} ({cp})");
        assert_eq!(
            tail.len(),
            100 - 10 * (k + 1),
            "checkpoint {k} covers {} records",
            10 * (k + 1)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_logs_status_errors_or_the_database() {
    let s = sandbox(60).await;
    s.crm
        .require_header("authorization", "Bearer tok-FEED-s3cr3t");
    let env = Env::new();
    let token = env.write_secret("feed-token", "tok-FEED-s3cr3t");
    let cfg = crm_stream_config(&format!("http://{}", s.addr), "1h", 10_000, 50)
        .replace(
            "max_retries = 3",
            &format!("max_retries = 3\nauth = {{ type = \"bearer\", token_file = {:?} }}", token.display().to_string()),
        )
        .replace(
            "[connections.hub]\nkind = \"crm\"",
            "[connections.hub]\nkind = \"crm\"\nauth = { type = \"bearer\", token_env = \"HUB_TOKEN\" }",
        );
    env.write_config(&cfg);
    // The hub's token differs from what the fake wants: its POSTs are refused with 401.
    s.crm.faults.push("crm.feed", Fault::Status(500), 1);
    s.crm.faults.push(
        "crm.feed",
        Fault::RateLimited {
            status: 429,
            retry_after_secs: 1,
        },
        1,
    );
    let d = env.spawn_daemon_with(
        &[],
        &[("HUB_TOKEN", "tok-HUB-s3cr3t"), ("RUST_LOG", "trace")],
    );
    d.wait_ready();
    assert!(common::wait_until(Duration::from_secs(15), || query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM runs WHERE outcome != 'running'"
    ) >= 1));
    let status = stdout(&env.cli(&["status", "--json"]));
    let status_text = stdout(&env.cli(&["status"]));
    drop(d);
    let log = std::fs::read_to_string(
        env.dir
            .path()
            .read_dir()
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(
        log.contains("TRACE") || log.contains("\"level\":\"TRACE\""),
        "trace logging was on"
    );
    assert!(
        status.contains("refused"),
        "the refusal is visible: {status}"
    );
    let mut db = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        if let Ok(b) = std::fs::read(format!("{}{suffix}", env.db_path().display())) {
            db.extend(b);
        }
    }
    for secret in ["tok-FEED-s3cr3t", "tok-HUB-s3cr3t"] {
        assert!(!log.contains(secret), "{secret} in the log");
        assert!(
            !status.contains(secret) && !status_text.contains(secret),
            "{secret} in status"
        );
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} in the database"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    for f in std::fs::read_dir(env.state_dir()).unwrap().flatten() {
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        let name = f.file_name().to_string_lossy().to_string();
        if name == "control" {
            assert_eq!(mode, 0o700, "control folder");
        } else {
            assert_eq!(mode & 0o077, 0, "{name} is private ({mode:o})");
        }
    }
}
