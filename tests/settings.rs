//! Integration settings through the real binary: every link of the enablement chain and
//! each documented conflict (validate's exact messages), shared reseller credentials, and
//! seats.io's online check against the fake (each message; status shows it valid).

mod common;

use std::time::Duration;

use common::{Env, stderr, stdout, wait_until};
use usher_sandbox::Sandbox;

/// A reseller and a company; `reseller_flags`, `company_flags` and `blocks` vary per test.
fn config(reseller: &str, company: &str, blocks: &str, connections: &str) -> String {
    format!(
        r#"
[resellers.agency]
{reseller}

[companies.venue-a]
reseller = "agency"
{company}

{blocks}

{connections}
"#
    )
}

const CDP_CONN: &str = r#"
[connections.venue-a-cdp]
kind = "cdp"
company = "venue-a"
base_url = "http://127.0.0.1:9/cdp"
product_token_file = "cdp-token"
tenant_guid = "11111111-2222-3333-4444-555555555555"
"#;

fn validate(env: &Env, toml: &str) -> (Option<i32>, String, String) {
    env.write_secret("cdp-token", "tok-123");
    env.write_config(toml);
    let out = env.cli(&["validate"]);
    (out.status.code(), stdout(&out), stderr(&out))
}

fn assert_refused(toml: &str, key: &str, message: &str) {
    let env = Env::new();
    let (code, out, err) = validate(&env, toml);
    assert_eq!(code, Some(78), "{out}{err}");
    let expected = format!("company \"venue-a\": key `{key}`: {message}");
    assert!(err.contains(&expected), "expected\n  {expected}\nin\n{err}");
    assert!(
        err.contains("usher: the configuration has 1 problem\n"),
        "only the first missing link is named: {err}"
    );
}

#[test]
fn an_integration_with_every_link_is_enabled() {
    let env = Env::new();
    let (code, out, err) = validate(
        &env,
        &config(
            r#"flags = ["cdp"]"#,
            r#"flags = ["cdp"]"#,
            "[companies.venue-a.integrations.cdp]\nenabled = true",
            CDP_CONN,
        ),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("integration cdp of company \"venue-a\": enabled"),
        "{out}"
    );
    assert!(!out.contains("tok-123"));
}

#[test]
fn refused_when_the_reseller_has_not_provided_credentials() {
    assert_refused(
        &config(
            "flags = [\"refund_protect_group\"]\n[resellers.agency.credentials.refund_protect_group]\nclient_id = \"pg\"\nclient_secret_file = \"cdp-token\"",
            r#"flags = ["refund_protect_group"]"#,
            "[companies.venue-a.integrations.refund_protect_group]\ntax_band = \"standard\"\ndeadline_hours = 48",
            "",
        ),
        "companies.venue-a.integrations.refund_protect_group",
        "refused: reseller \"agency\" has not provided the credentials refund_protect_group needs (missing `api_key`, `vendor_code` in [resellers.agency.credentials.refund_protect_group])",
    );
}

#[test]
fn refused_when_the_flag_is_off_for_the_reseller() {
    assert_refused(
        &config(
            "flags = []",
            r#"flags = ["cdp"]"#,
            "[companies.venue-a.integrations.cdp]",
            CDP_CONN,
        ),
        "companies.venue-a.integrations.cdp",
        "refused: feature flag \"cdp\" is off for reseller \"agency\" (add it to resellers.agency.flags)",
    );
}

#[test]
fn refused_when_the_flag_is_off_for_the_company() {
    assert_refused(
        &config(
            r#"flags = ["cdp"]"#,
            "",
            "[companies.venue-a.integrations.cdp]\nenabled = true",
            CDP_CONN,
        ),
        "companies.venue-a.integrations.cdp",
        "refused: feature flag \"cdp\" is off for company \"venue-a\" (add it to companies.venue-a.flags)",
    );
}

#[test]
fn refused_when_the_company_settings_are_incomplete() {
    assert_refused(
        &config(
            "flags = [\"refund_protect_group\"]\n[resellers.agency.credentials.refund_protect_group]\nclient_id = \"pg\"\nclient_secret_file = \"cdp-token\"\napi_key_file = \"cdp-token\"\nvendor_code = \"V1\"",
            r#"flags = ["refund_protect_group"]"#,
            "[companies.venue-a.integrations.refund_protect_group]\ntax_band = \"standard\"",
            "",
        ),
        "companies.venue-a.integrations.refund_protect_group",
        "refused: company settings incomplete: missing `deadline_hours` in [companies.venue-a.integrations.refund_protect_group]",
    );
    assert_refused(
        &config(
            r#"flags = ["cdp"]"#,
            r#"flags = ["cdp"]"#,
            "[companies.venue-a.integrations.cdp]",
            "",
        ),
        "companies.venue-a.integrations.cdp",
        "refused: company settings incomplete: no connection of kind cdp belongs to company \"venue-a\"",
    );
}

#[test]
fn a_block_that_is_off_is_not_an_error_and_says_what_would_refuse_it() {
    let env = Env::new();
    let (code, out, err) = validate(
        &env,
        &config(
            r#"flags = ["cdp"]"#,
            "",
            "[companies.venue-a.integrations.cdp]\nenabled = false",
            CDP_CONN,
        ),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("integration cdp of company \"venue-a\": off (toggle); when on: feature flag \"cdp\" is off for company \"venue-a\""),
        "{out}"
    );
}

#[test]
fn conflicting_integrations_on_one_company_are_refused_naming_both() {
    for (a, b, la, lb) in [
        (
            "refund_protect_group",
            "manual_refund_protection",
            "Refund Protect Group",
            "Manual Refund Protection",
        ),
        (
            "szamlazz",
            "conditional_tax_bands",
            "Szamlazz",
            "Conditional tax bands",
        ),
    ] {
        let reseller = format!(
            "flags = [\"{a}\", \"{b}\"]\n[resellers.agency.credentials.refund_protect_group]\nclient_id = \"pg\"\nclient_secret_file = \"cdp-token\"\napi_key_file = \"cdp-token\"\nvendor_code = \"V1\""
        );
        let blocks = format!(
            "[companies.venue-a.integrations.{a}]\ntax_band = \"standard\"\ndeadline_hours = 48\n[companies.venue-a.integrations.{b}]\nenabled = true"
        )
        .replace(
            "[companies.venue-a.integrations.szamlazz]\ntax_band = \"standard\"\ndeadline_hours = 48",
            "[companies.venue-a.integrations.szamlazz]",
        );
        assert_refused(
            &config(
                &reseller,
                &format!("flags = [\"{a}\", \"{b}\"]"),
                &blocks,
                "",
            ),
            "companies.venue-a.integrations",
            &format!(
                "integrations {a} ({la}) and {b} ({lb}) exclude each other on one company; turn one of them off"
            ),
        );
        // With one of them off, the same company is valid.
        let env = Env::new();
        let off = blocks.replace(
            &format!("[companies.venue-a.integrations.{b}]\nenabled = true"),
            &format!("[companies.venue-a.integrations.{b}]\nenabled = false"),
        );
        let (code, out, err) = validate(
            &env,
            &config(&reseller, &format!("flags = [\"{a}\", \"{b}\"]"), &off, ""),
        );
        assert_eq!(code, Some(0), "{a}/{b} with {b} off: {out}{err}");
    }
}

#[test]
fn a_company_connection_uses_the_resellers_credentials_by_reference() {
    let env = Env::new();
    env.write_secret("shared-token", "shared-tok");
    let conn = r#"
[connections.venue-a-cdp]
kind = "cdp"
company = "venue-a"
credentials_from = "reseller"
base_url = "http://127.0.0.1:9/cdp"
tenant_guid = "11111111-2222-3333-4444-555555555555"
"#;
    let (code, out, err) = validate(
        &env,
        &config(
            "flags = [\"cdp\"]\n[resellers.agency.credentials.cdp]\nproduct_token_file = \"shared-token\"",
            r#"flags = ["cdp"]"#,
            "[companies.venue-a.integrations.cdp]",
            conn,
        ),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    // Without the reseller's block: named, along with the missing secret.
    let env = Env::new();
    let (code, _out, err) = validate(
        &env,
        &config(
            r#"flags = ["cdp"]"#,
            r#"flags = ["cdp"]"#,
            "[companies.venue-a.integrations.cdp]",
            conn,
        ),
    );
    assert_eq!(code, Some(78));
    assert!(
        err.contains("connection \"venue-a-cdp\": key `connections.venue-a-cdp.credentials_from`: reseller \"agency\" has not provided credentials for cdp (add [resellers.agency.credentials.cdp])"),
        "{err}"
    );
}

#[test]
fn unknown_flags_resellers_and_integrations_are_named() {
    let env = Env::new();
    let (code, _out, err) = validate(
        &env,
        r#"
[resellers.agency]
flags = ["teleport"]

[companies.venue-a]
reseller = "nobody"

[companies.venue-a.integrations.warp]
"#,
    );
    assert_eq!(code, Some(78));
    for needle in [
        "key `resellers.agency.flags`: unknown feature flag \"teleport\"",
        "key `companies.venue-a.reseller`: unknown reseller \"nobody\"",
        "key `companies.venue-a.integrations.warp`: unknown integration \"warp\"",
    ] {
        assert!(err.contains(needle), "{needle} in {err}");
    }
}

fn seatsio_conn(
    name: &str,
    base: &str,
    region: &str,
    key_file: &str,
    workspace: Option<&str>,
) -> String {
    let ws = workspace
        .map(|w| format!("admin_key_file = \"admin-key\"\nworkspace_key = \"{w}\"\n"))
        .unwrap_or_default();
    format!(
        "[connections.{name}]\nkind = \"seatsio\"\nregion = \"{region}\"\nbase_url = \"{base}\"\nsecret_key_file = \"{key_file}\"\nmax_retries = 0\n{ws}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seatsio_online_check_gives_each_message() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.seatsio.add_secret_key("eu", "sk-eu");
    s.seatsio.add_secret_key("na", "sk-na");
    s.seatsio.add_workspace("eu", "ak-eu", "ws-active", true);
    s.seatsio.add_workspace("eu", "ak-eu", "ws-inactive", false);
    let env = Env::new();
    env.write_secret("sk-eu", "sk-eu");
    env.write_secret("sk-na", "sk-na");
    env.write_secret("admin-key", "ak-eu");
    let eu = format!("{}/eu", s.url("seatsio"));
    let mut toml = String::new();
    toml += &seatsio_conn("good", &eu, "eu", "sk-eu", Some("ws-active"));
    toml += &seatsio_conn("wrong-region", &eu, "eu", "sk-na", None);
    toml += &seatsio_conn("inactive", &eu, "eu", "sk-eu", Some("ws-inactive"));
    toml += &seatsio_conn("unknown-ws", &eu, "eu", "sk-eu", Some("ws-nope"));
    toml += &seatsio_conn("down", "http://127.0.0.1:9/eu", "eu", "sk-eu", None);
    env.write_config(&toml);
    let out = tokio::task::spawn_blocking(move || {
        let o = env.cli(&["validate", "--online"]);
        (o, env)
    })
    .await
    .unwrap();
    let (o, env) = out;
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(78), "{text}{}", stderr(&o));
    for line in [
        "connection \"good\" (seatsio): valid (secret key accepted in region eu, workspace active)",
        "connection \"wrong-region\" (seatsio): wrong credentials (secret key refused (check the key and the region))",
        "connection \"inactive\" (seatsio): invalid (workspace inactive)",
        "connection \"unknown-ws\" (seatsio): invalid (workspace not found for this key)",
        "connection \"down\" (seatsio): unreachable (",
    ] {
        assert!(text.contains(line), "{line}\nin\n{text}");
    }
    assert!(!text.contains("sk-eu") && !text.contains("ak-eu"), "{text}");
    // The region is a path prefix: the na key was tried in eu, never in na.
    assert!(s.seatsio.calls().iter().all(|c| c.starts_with("eu ")));

    // A company's seats.io block: the daemon checks it at start, status shows it.
    env.write_config(&format!(
        "[resellers.agency]\nflags = [\"seatsio\"]\n[companies.venue-a]\nreseller = \"agency\"\nflags = [\"seatsio\"]\n[companies.venue-a.integrations.seatsio]\nenabled = true\n{}company = \"venue-a\"\n",
        seatsio_conn("seats", &eu, "eu", "sk-eu", Some("ws-active"))
    ));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(10), || {
            stdout(&env.cli(&["status"])).contains(
            "seats (seatsio): enabled, valid (secret key accepted in region eu, workspace active"
        )
        }),
        "{}\n{}",
        stdout(&env.cli(&["status"])),
        d.log()
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&env.cli(&["status", "--json"]))).unwrap();
    let c = &json["connections"][0];
    assert_eq!(c["connection"], "seats");
    assert_eq!(c["state"], "enabled");
    assert_eq!(c["last_check"]["valid"], true);
    assert_eq!(json["integrations"][0]["why"], "enabled");
    d.signal(rustix::process::Signal::TERM);
    d.wait_exit(Duration::from_secs(20));
}

#[test]
fn cdp_stream_options_are_checked() {
    let env = Env::new();
    let (code, _out, err) = validate(
        &env,
        &format!(
            r#"
{CDP_CONN}
[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"

[resellers.agency]
flags = ["cdp"]
[companies.venue-a]
reseller = "agency"
flags = ["cdp"]
[companies.venue-a.integrations.cdp]

[streams.to-cdp]
source = "crm"
entity = "contact"
target = "venue-a-cdp"
every = "1h"
max_per_payload = 150
max_per_run = 1000

[streams.to-cdp.cdp]
event_type_id = "not-a-guid"

[streams.to-cdp.mapping]
Email = "email | trim | lowercase | required"
"#
        ),
    );
    assert_eq!(code, Some(78));
    for needle in [
        "key `streams.to-cdp.max_per_payload`: 150 is more than the CDP takes in one POST (100)",
        "key `streams.to-cdp.cdp.event_type_id`: \"not-a-guid\" is not a GUID",
    ] {
        assert!(err.contains(needle), "{needle} in {err}");
    }
}

#[test]
fn cdp_and_seatsio_default_their_base_url_from_the_vendor_and_region() {
    let env = Env::new();
    env.write_secret("sk", "sk-eu");
    let (code, out, err) = validate(
        &env,
        r#"
[connections.cdp]
kind = "cdp"
product_token_file = "cdp-token"
tenant_guid = "11111111-2222-3333-4444-555555555555"

[connections.seats]
kind = "seatsio"
region = "oc"
secret_key_file = "sk"

[connections.seats-bad]
kind = "seatsio"
region = "mars"
secret_key_file = "sk"
"#,
    );
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(
        err.contains(
            "key `connections.seats-bad.region`: unknown region \"mars\" (eu, na, sa or oc)"
        ),
        "{err}"
    );
    assert!(!err.contains("connections.cdp."), "{err}");
    assert!(!err.contains("connections.seats."), "{err}");
}
