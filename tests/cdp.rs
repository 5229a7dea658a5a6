//! The CRM feed → CM.com CDP stream through the real binary against the fakes: batches of
//! at most 100 events with the token and tenant checked, a 403 that pauses the stream
//! (recorded, shown by status, no hammering) until a trigger, and the integration's enable
//! toggle off and on across reloads with the state kept.

mod common;

use std::time::Duration;

use common::{Env, query_i64, stderr, stdout, wait_until};
use rustix::process::Signal;
use usher_sandbox::Sandbox;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const EVENT_TYPE: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

async fn sandbox(contacts: u64) -> Sandbox {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(contacts);
    s.cdp.add_tenant(TENANT, "tok-good");
    s.cdp.add_event_type(EVENT_TYPE);
    s
}

fn config(s: &Sandbox, every: &str, enabled: bool, tenant: &str) -> String {
    format!(
        r#"
[resellers.agency]
flags = ["cdp"]

[companies.venue-a]
reseller = "agency"
flags = ["cdp"]

[companies.venue-a.integrations.cdp]
enabled = {enabled}

[connections.crm]
kind = "crm"
base_url = "{crm}"
max_retries = 0

[connections.venue-a-cdp]
kind = "cdp"
company = "venue-a"
base_url = "{cdp}"
product_token_file = "cdp-token"
tenant_guid = "{tenant}"
max_retries = 0

[streams.contacts-to-cdp]
source = "crm"
entity = "contact"
target = "venue-a-cdp"
every = "{every}"
jitter = "0s"
page_size = 250
max_per_payload = 100
max_per_run = 10000

[streams.contacts-to-cdp.cdp]
event_type_id = "{EVENT_TYPE}"

[streams.contacts-to-cdp.mapping]
Email = "email | trim | lowercase | required"
"First name" = "first_name"
ContactId = "id"
"#,
        crm = s.url("crm"),
        cdp = s.url("cdp"),
    )
}

fn cursor(env: &Env) -> String {
    common::query_text(
        &env.db_path(),
        "SELECT COALESCE(cursor, '') FROM cursors WHERE stream = 'contacts-to-cdp'",
    )
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_go_in_batches_of_at_most_100_with_token_and_tenant() {
    let s = sandbox(250).await;
    let env = Env::new();
    env.write_secret("cdp-token", "tok-good");
    env.write_config(&config(&s, "1h", true, TENANT));
    let out = tokio::task::spawn_blocking({
        let cfg = env.config_path();
        move || {
            std::process::Command::new(common::bin())
                .arg("--config")
                .arg(cfg)
                .args(["trigger", "contacts-to-cdp"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let sizes: Vec<usize> = s.cdp.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![100, 100, 50]);
    let events = s.cdp.events();
    assert_eq!(events[0]["EventTypeId"], EVENT_TYPE);
    assert_eq!(events[0]["Event"]["Email"], "person1@example.org");
    assert_eq!(events[0]["Event"]["First name"], "First1");
    assert_eq!(events[249]["Event"]["ContactId"], "CRM-250");
    for c in s.cdp.calls() {
        assert_eq!(c.tenant, TENANT);
        assert_eq!(c.token.as_deref(), Some("tok-good"));
        assert_eq!(c.status, 202);
    }
    assert_eq!(query_i64(&env.db_path(), "SELECT COUNT(*) FROM outbox"), 0);

    // validate --online: the token is checked for the tenant (an empty array).
    let o = env.cli(&["validate", "--online"]);
    assert!(
        stdout(&o).contains(
            "connection \"venue-a-cdp\" (cdp): valid (product token accepted for the tenant)"
        ),
        "{}",
        stdout(&o)
    );
    // A tenant the token is not for: 403, a configuration error named as such.
    env.write_config(&config(
        &s,
        "1h",
        true,
        "99999999-2222-3333-4444-555555555555",
    ));
    let o = env.cli(&["validate", "--online"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(
        stdout(&o).contains("connection \"venue-a-cdp\" (cdp): wrong credentials (HTTP 403: the product token is not valid for this tenant"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("tok-good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_pauses_the_stream_with_a_clear_message_until_a_trigger() {
    let s = sandbox(30).await;
    let env = Env::new();
    env.write_secret("cdp-token", "tok-good");
    env.write_config(&config(&s, "1s", true, TENANT));
    s.cdp.force_always(Some(403));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(
        wait_until(Duration::from_secs(10), || stdout(&env.cli(&["status"]))
            .contains("paused")),
        "{}",
        d.log()
    );
    let status = stdout(&env.cli(&["status"]));
    assert!(
        status.contains("contacts-to-cdp: paused: since")
            && status.contains("POST /cdp/events/v1.0/tenants/11111111-2222-3333-4444-555555555555/events: HTTP 403: the product token is not valid for this tenant"),
        "{status}"
    );
    // Scheduled runs keep coming (1s) but make no call while paused.
    // (The daemon's start-up online check POSTs an empty array: not counted.)
    let posts = || s.cdp.calls().iter().filter(|c| c.events > 0).count();
    assert_eq!(posts(), 1, "one POST of events, then paused");
    let runs = query_i64(&env.db_path(), "SELECT COUNT(*) FROM runs");
    assert!(wait_until(Duration::from_secs(10), || query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM runs"
    ) >= runs + 2));
    assert_eq!(posts(), 1, "no call while paused");
    // The payload waits in the outbox; the cursor has moved past what it holds.
    assert_eq!(query_i64(&env.db_path(), "SELECT COUNT(*) FROM outbox"), 1);

    // Fixed at the CDP; `usher trigger` lifts the pause and the events go in.
    s.cdp.force_always(None);
    let o = env.cli(&["trigger", "contacts-to-cdp"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        wait_until(Duration::from_secs(10), || s.cdp.events().len() == 30),
        "{}",
        d.log()
    );
    assert!(!stdout(&env.cli(&["status"])).contains("paused"));
    d.signal(Signal::TERM);
    d.wait_exit(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toggle_off_pauses_without_losing_state_and_on_resumes_across_reloads() {
    let s = sandbox(30).await;
    let env = Env::new();
    env.write_secret("cdp-token", "tok-good");
    env.write_config(&config(&s, "1s", true, TENANT));
    let mut d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s.cdp.events().len() == 30));

    // A payload left waiting (the CDP answers 503), then the integration is turned off.
    // (Wait for the refused POST of the 20 new contacts: until the first run has deleted its
    // delivered payload, the outbox may still hold that one.)
    s.cdp.force_always(Some(503));
    s.crm.add_contacts(20);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .cdp
            .calls()
            .iter()
            .any(|c| c.status == 503 && c.events == 20)
            && query_i64(&env.db_path(), "SELECT COUNT(*) FROM outbox") == 1),
        "{}",
        d.log()
    );
    env.write_config(&config(&s, "1s", false, TENANT));
    d.signal(Signal::HUP);
    assert!(d.wait_log("configuration reloaded", Duration::from_secs(10)));
    // A run that started before the reload finishes on the old configuration (still on):
    // let it end, with the CDP still refusing, before the CDP is healed. (A tick that fired
    // just before the reload may still be on its way to start: give it a tick's time.)
    std::thread::sleep(Duration::from_millis(1500));
    assert!(wait_until(Duration::from_secs(10), || query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM runs WHERE outcome = 'running'"
    ) == 0));
    std::thread::sleep(Duration::from_millis(300));
    s.cdp.force_always(None);
    let cursor_off = cursor(&env);
    // (Reloads also check the connection online with an empty array: not counted.)
    let posts = || s.cdp.calls().iter().filter(|c| c.events > 0).count();
    let calls_off = posts();
    let outbox_body: Vec<u8> = common::query_bytes(&env.db_path(), "SELECT body FROM outbox")
        .unwrap_or_else(|| panic!("the waiting payload\n{}", d.log()));
    s.crm.add_contacts(10);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(posts(), calls_off, "no call while off");
    // Not even a trigger runs a stream whose integration is off.
    let o = env.cli(&["trigger", "contacts-to-cdp"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.log().contains("not run: paused"),
        "{}{}\n{}",
        stdout(&o),
        stderr(&o),
        d.log()
    );
    assert_eq!(posts(), calls_off, "no call on a trigger while off");
    assert_eq!(cursor(&env), cursor_off, "cursor kept while off");
    let body_now: Vec<u8> = common::query_bytes(&env.db_path(), "SELECT body FROM outbox").unwrap();
    assert_eq!(body_now, outbox_body, "the waiting payload kept while off");
    let status = stdout(&env.cli(&["status"]));
    assert!(
        status.contains("contacts-to-cdp: paused: integration cdp of company venue-a is off"),
        "{status}"
    );
    assert!(
        status.contains("venue-a/cdp (reseller agency): off (toggle) [streams: contacts-to-cdp]"),
        "{status}"
    );

    // On again: the waiting payload first, then the rest; nothing lost, nothing twice.
    env.write_config(&config(&s, "1s", true, TENANT));
    d.signal(Signal::HUP);
    assert!(
        wait_until(Duration::from_secs(15), || s.cdp.events().len() == 60),
        "{} events; {}",
        s.cdp.events().len(),
        d.log()
    );
    let ids: Vec<String> = s
        .cdp
        .events()
        .iter()
        .map(|e| e["Event"]["ContactId"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..=60).map(|i| format!("CRM-{i}")).collect();
    assert_eq!(ids, expected, "in order, once each");
    assert_ne!(cursor(&env), cursor_off);
    d.signal(Signal::TERM);
    d.wait_exit(Duration::from_secs(20));
}
