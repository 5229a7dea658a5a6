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
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
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
    let dropin = env
        .dir
        .path()
        .join("etc/usher.d/20-more.toml")
        .display()
        .to_string();
    let expect = [
        (
            main.as_str(),
            "connections.crm.kind",
            "unknown kind \"crmm\"",
        ),
        (main.as_str(), "connections.crm.base_url", "is not a URL"),
        (
            main.as_str(),
            "connections.crm.colour",
            "unknown key `colour`",
        ),
        (
            main.as_str(),
            "connections.hub.auth.token_file",
            "cannot read secret file",
        ),
        (
            main.as_str(),
            "streams.contacts.every",
            "invalid duration \"fast\"",
        ),
        (main.as_str(), "streams.contacts.page_size", "expected"),
        (
            main.as_str(),
            "streams.contacts.mapping.email",
            "unknown transform `shout`",
        ),
        (
            dropin.as_str(),
            "streams.orders.source",
            "unknown connection \"nowhere\"",
        ),
        (
            dropin.as_str(),
            "streams.orders.timezone",
            "unknown timezone",
        ),
        (
            dropin.as_str(),
            "streams.orders.webhook.url",
            "missing key `url`",
        ),
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
    assert!(
        !env.db_path().exists(),
        "a refused config must not create state"
    );
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
    assert!(
        err.contains("USHER_"),
        "the problem names the environment as its origin: {err}"
    );
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
    assert!(
        stderr(&out).contains(&env.config_path().display().to_string()),
        "{}",
        stderr(&out)
    );
}

/// The README's stream names have a `-`, which an environment variable's name cannot hold.
const DASHED: &str = r#"
[connections.crm-main]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"
auth = { type = "bearer", token_file = "crm-token" }

[streams.contacts-to-crm]
source = "crm-main"
entity = "contact"
target = "crm-main"
every = "15m"

[streams.contacts-to-crm.webhook]
url = "/hooks/contacts"
"#;

fn validate_with_env(env: &Env, vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(common::bin());
    cmd.arg("--config").arg(env.config_path()).arg("validate");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn an_environment_override_reaches_a_stream_whose_name_has_a_dash() {
    let env = Env::new();
    env.write_secret("crm-token", "t");
    env.write_config(DASHED);
    let out = validate_with_env(&env, &[("USHER_STREAMS__CONTACTS_TO_CRM__EVERY", "soon")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("key `streams.contacts-to-crm.every`: invalid duration \"soon\""),
        "{err}"
    );
    assert!(!err.contains("contacts_to_crm"), "no new stream: {err}");
    assert!(err.contains("1 problem"), "{err}");

    // A good value applies; a variable without `__` is not an override at all.
    let out = validate_with_env(
        &env,
        &[
            ("USHER_STREAMS__CONTACTS_TO_CRM__EVERY", "5m"),
            ("USHER_CONNECTIONS__CRM_MAIN__TIMEOUT", "3s"),
            ("USHER_SOMETHING", "x"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_environment_override_that_matches_no_stream_is_refused_naming_the_variable() {
    let env = Env::new();
    env.write_secret("crm-token", "t");
    env.write_config(DASHED);
    let out = validate_with_env(&env, &[("USHER_STREAMS__CONTACTS_TO_CRN__EVERY", "5m")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("USHER_STREAMS__CONTACTS_TO_CRN__EVERY"))
        .unwrap_or_else(|| panic!("the variable is named: {err}"));
    assert!(line.contains("no file defines"), "{line}");
    assert!(
        line.contains("did you mean stream \"contacts-to-crm\""),
        "{line}"
    );
    assert!(!err.contains("missing key"), "no half-made stream: {err}");
}

const TICKETCO_AIRSHIP: &str = r#"
[connections.tc]
kind = "ticketco"
base_url = "http://127.0.0.1:9/ticketco"
api_token_file = "ticketco-token"

[connections.air]
kind = "airship"
base_url = "http://127.0.0.1:9/airship"
access_token_file = "airship-token"
account_id = 77

[streams.bookings]
source = "tc"
target = "air"
timezone = "Europe/Oslo"

[streams.bookings.airship]
venues = ["Oslo Golf"]
"#;

#[test]
fn one_unreadable_secret_file_is_one_problem() {
    let env = Env::new();
    env.write_secret("ticketco-token", "t");
    env.write_config(TICKETCO_AIRSHIP);
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("key `connections.air.access_token_file`: cannot read secret file"),
        "{err}"
    );
    for follow_on in [
        "missing schedule",
        "applies only to",
        "missing key `entity`",
        "is not valid",
    ] {
        assert!(
            !err.contains(follow_on),
            "{follow_on:?} is a follow-on: {err}"
        );
    }
    assert!(err.contains("has 1 problem\n"), "{err}");
}

#[test]
fn one_unknown_key_in_a_halo_block_hides_none_of_its_other_problems() {
    let env = Env::new();
    env.write_secret("sg-secret", "s");
    env.write_secret("halo-secret", "h");
    env.write_config(
        r#"
[connections.seatgeek]
kind = "seatgeek"
base_url = "http://127.0.0.1:9/seatgeek"
client_id = "usher"
client_secret_file = "sg-secret"

[connections.halo]
kind = "halo"
base_url = "http://127.0.0.1:9/halo"
tenant = "demo"
client_id = "usher"
client_secret_file = "halo-secret"

[streams.sg]
source = "seatgeek"
entity = "user"
target = "halo"
every = "1h"

[streams.sg.halo]
default_site = 1
id_field = "other9"
batch_sise = 10
batch_size = 5000
"#,
    );
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(
            "key `streams.sg.halo.batch_sise`: unknown key `batch_sise`; did you mean `batch_size`?"
        ),
        "{err}"
    );
    assert!(
        err.contains("key `streams.sg.halo.batch_size`: 5000 is out of range (1 to 1000)"),
        "{err}"
    );
    assert!(
        err.contains("key `streams.sg.halo.id_field`: \"other9\" is not"),
        "{err}"
    );
    assert!(
        !err.contains("missing key"),
        "nothing written is missing: {err}"
    );
}

#[test]
fn messages_name_the_line_and_speak_plainly() {
    if common::sqlite_only(
        "line numbers in a config the harness writes a `state` line into on PostgreSQL",
    ) {
        return;
    }
    let env = Env::new();
    env.write_secret("crm-token", "t");
    env.write_config(
        r#"[connections.crm]
kind = "crmm"
base_url = "http://127.0.0.1:9/crm"

[streams.contacts]
source = "crn"
entity = "contact"
target = "crm"
cron = "0 25 * * *"
page_size = "many"
max_per_run = -5

[streams.contacts.webhook]
url = "/hooks/contacts"

[streams.contacts.mapping]
email = "email | lowercse"
"#,
    );
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    // `write_config` puts a four-line [daemon] table and a blank line first.
    let main = env.config_path().display().to_string();
    let expect = [
        (
            7,
            "connections.crm.kind",
            "unknown kind \"crmm\"; did you mean `crm`?",
        ),
        (
            11,
            "streams.contacts.source",
            "unknown connection \"crn\"; did you mean `crm`?",
        ),
        (
            14,
            "streams.contacts.cron",
            "the hour field \"25\" is out of range (0 to 23)",
        ),
        (
            15,
            "streams.contacts.page_size",
            "expected a whole number (0 or more, no quotes), found string \"many\"",
        ),
        (
            16,
            "streams.contacts.max_per_run",
            "expected a whole number (0 or more, no quotes)",
        ),
        (
            22,
            "streams.contacts.mapping.email",
            "did you mean `lowercase`?",
        ),
    ];
    for (line_no, key, words) in expect {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("key `{key}`")))
            .unwrap_or_else(|| panic!("no problem for {key} in:\n{err}"));
        assert!(
            line.starts_with(&format!("{main}:{line_no}: ")),
            "{key}: expected line {line_no} in {line:?}"
        );
        assert!(
            line.contains(words),
            "{key}: expected {words:?} in {line:?}"
        );
    }
    for parser_words in ["Component error", "u32", "key `-`"] {
        assert!(!err.contains(parser_words), "{parser_words:?} in {err}");
    }

    // A whole-file problem has no key placeholder.
    env.write_config("[connections.crm\nkind = 1\n");
    let err = stderr(&env.cli(&["validate"]));
    assert!(!err.contains("key `-`"), "{err}");
}

#[test]
fn a_secret_file_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let token = env.write_secret("crm-token", "s3cr3t-token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.write_config(GOOD);
    let out = env.cli(&["validate"]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning, not an error: {text}"
    );
    let warning = text
        .lines()
        .find(|l| l.starts_with("warning:") && l.contains("can be read by group or others"))
        .unwrap_or_else(|| panic!("no warning in {text}"));
    assert!(warning.contains(&token.display().to_string()), "{warning}");
    assert!(warning.contains("chmod 600"), "{warning}");
    assert!(!text.contains("s3cr3t-token"));

    // A copy systemd made in $CREDENTIALS_DIRECTORY is systemd's to protect: no warning.
    let out = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .arg("validate")
        .env("CREDENTIALS_DIRECTORY", token.parent().unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stdout(&out).contains("warning"), "{}", stdout(&out));

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = stdout(&env.cli(&["validate"]));
    assert!(!text.contains("warning"), "{text}");
}

#[test]
fn a_missing_reseller_credential_file_is_named_where_it_is_written() {
    if common::sqlite_only(
        "line numbers in a config the harness writes a `state` line into on PostgreSQL",
    ) {
        return;
    }
    let env = Env::new();
    env.write_config(
        r#"
[resellers.agency]
flags = ["cdp"]

[resellers.agency.credentials.cdp]
product_token_file = "shared-token"

[companies.venue-a]
reseller = "agency"
flags = ["cdp"]

[companies.venue-a.integrations.cdp]

[connections.venue-a-cdp]
kind = "cdp"
company = "venue-a"
credentials_from = "reseller"
base_url = "http://127.0.0.1:9/cdp"
tenant_guid = "11111111-2222-3333-4444-555555555555"
"#,
    );
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("cannot read secret file"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("key `resellers.agency.credentials.cdp.product_token_file`"),
        "{line}"
    );
    // Line 11 of the file: after write_config's five-line [daemon] head.
    let main = env.config_path().display().to_string();
    assert!(line.starts_with(&format!("{main}:11: ")), "{line}");
    assert!(line.contains("connection \"venue-a-cdp\""), "{line}");
    assert!(!err.contains("BTreeMap"), "{err}");
}

#[test]
fn a_shell_validate_reads_a_relative_secret_from_the_credentials_folder_as_the_service_would() {
    let env = Env::new();
    env.write_config(GOOD);
    // As the package lays it out: /etc/usher/credentials/NAME, the source of the unit's
    // `LoadCredential=NAME:/etc/usher/credentials/NAME`; nothing beside usher.toml.
    let folder = env.dir.path().join("etc/credentials");
    std::fs::create_dir(&folder).unwrap();
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "cannot read secret file {}",
            folder.join("crm-token").display()
        )),
        "names the file the service would read: {err}"
    );
    std::fs::write(folder.join("crm-token"), "s3cr3t\n").unwrap();
    let out = env.cli(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn status_shows_the_state_beside_the_problems_of_an_invalid_config() {
    let env = Env::new();
    env.write_config(&format!(
        "{GOOD}\n[streams.broken]\nsource = \"crm\"\nentity = \"contact\"\ntarget = \"crm\"\nevery = \"often\"\n[streams.broken.webhook]\nurl = \"/h\"\n"
    ));
    let out = env.cli(&["status"]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(78), "{text}{err}");
    assert!(
        text.contains("contacts"),
        "the valid stream is shown: {text}"
    );
    assert!(
        err.contains("key `streams.broken.every`: invalid duration \"often\""),
        "{err}"
    );

    let out = env.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["streams"][0]["stream"], "contacts", "{json}");
    assert!(
        json["config_problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("streams.broken.every")),
        "{json}"
    );
}

/// Issue 21: `validate --online` called a CRM "valid (HTTP 405 from /)". It now checks the
/// feed and webhook paths that the streams use, and says what it checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_online_checks_a_crms_feed_and_webhook_paths() {
    let s = usher_sandbox::Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(3);
    let env = Env::new();
    env.write_secret("crm-token", "s3cr3t-token");
    let good = GOOD.replace("http://127.0.0.1:9/crm", &format!("http://{}/crm", s.addr));
    let online = |env: Env| async move {
        tokio::task::spawn_blocking(move || (env.cli(&["validate", "--online"]), env))
            .await
            .unwrap()
    };
    env.write_config(&good);
    let (out, env) = online(env).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let line = text
        .lines()
        .find(|l| l.starts_with("connection \"crm\" (crm): valid"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("feed of stream \"contacts\" at /api/changes?entity=contact answered a page"),
        "{line}"
    );
    assert!(
        line.contains("webhook of stream \"contacts\" at /crm/hooks/contacts is there"),
        "{line}"
    );
    assert!(
        !text.contains("from /)") && !text.contains("s3cr3t"),
        "{text}"
    );

    // A feed path the CRM does not have is not a valid connection.
    env.write_config(&format!(
        "{good}\n[streams.contacts.feed]\npath = \"/api/nothing?entity={{entity}}\"\n"
    ));
    let (out, _env) = online(env).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("connection \"crm\" (crm): invalid (feed of stream \"contacts\" at /api/nothing?entity=contact: HTTP 404"),
        "{text}"
    );
}

#[test]
fn a_stream_of_a_broken_connection_still_reports_its_own_problems() {
    let env = Env::new();
    env.write_config(
        r#"
[receiver]
listen = "127.0.0.1:18360"

[connections.s360]
kind = "s360"
institution = "myvenue"
virtual_operator = "VO"
partner_name = "usher"
partner_secret_file = "no-such-partner-secret"

[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"

[streams.relay]
source = "s360"
entity = "contacts"
target = "crm"
every = "soon"

[streams.relay.s360]
auth = { type = "bearer", token_file = "no-such-hook-token" }

[streams.relay.webhook]
url = "/hooks/contacts"
"#,
    );
    let out = env.cli(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for own in [
        "key `connections.s360.partner_secret_file`: cannot read secret file",
        "key `streams.relay.every`: invalid duration \"soon\"",
        "key `streams.relay.s360.auth.token_file`: cannot read secret file",
    ] {
        assert!(err.contains(own), "{own:?} in {err}");
    }
    assert!(err.contains("has 3 problems\n"), "nothing else: {err}");
}

#[test]
fn a_misspelt_stream_name_on_the_command_line_gets_a_suggestion() {
    let env = Env::new();
    env.write_secret("crm-token", "t");
    env.write_config(GOOD);
    let out = env.cli(&["cursor", "show", "contact"]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("no stream \"contact\" in the configuration; did you mean `contacts`?"),
        "{err}"
    );
}
