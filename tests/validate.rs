//! `usher validate` (and `run`) on good and bad configurations: every problem at once, each
//! naming the file and the key; exit 0 when valid, 78 when not.

mod common;

use common::{Env, stderr, stdout};

const GOOD: &str = r#"
[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"
auth = { type = "bearer", token_file = "crm-token" }

[streams.contacts]
source = "crm"
entity = "contact"
target = "crm"
every = "15m"

[streams.contacts.webhook]
url = "/hooks/contacts"

[streams.contacts.mapping]
email = "email | trim | lowercase | required"
"#;

#[test]
fn a_good_config_is_valid() {
    let env = Env::new();
    env.write_secret("crm-token", "s3cr3t-token");
    env.write_config(GOOD);
    let out = env.cli(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("configuration is valid: 1 connection(s), 1 stream(s)"));
    assert!(!stdout(&out).contains("s3cr3t-token"));
}

#[test]
fn every_problem_is_reported_with_file_and_key() {
    let env = Env::new();
    env.write_config(
        r#"
[connections.crm]
kind = "crmm"
base_url = "not a url"
colour = "blue"

[connections.hub]
kind = "crm"
base_url = "http://127.0.0.1:9/"
auth = { type = "bearer", token_file = "missing-token-file" }

[streams.contacts]
source = "crm"
entity = "contact"
target = "hub"
every = "fast"
page_size = "many"

[streams.contacts.webhook]
url = "/hooks"

[streams.contacts.mapping]
email = "email | shout"
"#,
    );
    env.write_dropin(
        "20-more.toml",
        r#"
[streams.orders]
source = "nowhere"
entity = "order"
target = "hub"
cron = "61 * * * *"
timezone = "Mars/Base"
"#,
    );
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let main = env.config_path().display().to_string();
    let dropin = env.dir.path().join("etc/usher.d/20-more.toml").display().to_string();
    let expect = [
        (main.as_str(), "connections.crm.kind", "unknown kind \"crmm\""),
        (main.as_str(), "connections.crm.base_url", "is not a URL"),
        (main.as_str(), "connections.crm.colour", "unknown key `colour`"),
        (main.as_str(), "connections.hub.auth.token_file", "cannot read secret file"),
        (main.as_str(), "streams.contacts.every", "invalid duration \"fast\""),
        (main.as_str(), "streams.contacts.page_size", "expected"),
        (main.as_str(), "streams.contacts.mapping.email", "unknown transform `shout`"),
        (dropin.as_str(), "streams.orders.source", "unknown connection \"nowhere\""),
        (dropin.as_str(), "streams.orders.timezone", "unknown timezone"),
        (dropin.as_str(), "streams.orders.webhook.url", "missing key `url`"),
    ];
    for (file, key, msg) in expect {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("key `{key}`")))
            .unwrap_or_else(|| panic!("no problem for {key} in:\n{err}"));
        assert!(line.starts_with(file), "{key}: wrong file in {line:?}");
        assert!(line.contains(msg), "{key}: expected {msg:?} in {line:?}");
    }
    assert!(err.contains("problems"), "{err}");

    // `run` refuses the same config with the same code, before touching the state.
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("key `streams.contacts.every`"));
    assert!(!env.db_path().exists(), "a refused config must not create state");
}

#[test]
fn environment_overrides_apply_and_are_named_when_bad() {
    let env = Env::new();
    env.write_secret("crm-token", "t");
    env.write_config(GOOD);
    let out = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .arg("validate")
        .env("USHER_STREAMS__CONTACTS__EVERY", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains("key `streams.contacts.every`"), "{err}");
    assert!(err.contains("USHER_"), "the problem names the environment as its origin: {err}");
}

#[test]
fn a_missing_main_file_is_a_config_error() {
    let env = Env::new();
    let out = env.cli(&["validate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("does not exist"));
}

#[test]
fn a_toml_syntax_error_names_the_file() {
    let env = Env::new();
    env.write_config("[connections.crm\nkind = 1\n");
    let out = env.cli(&["validate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains(&env.config_path().display().to_string()), "{}", stderr(&out));
}
