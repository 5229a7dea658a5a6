//! The S-360 ⇄ CRM streams, with the real binary against the fakes over HTTP:
//! the receiver's answers (400/401/413/200, resends stored once, disabled streams still
//! receiving), the relay's delivery contract (refused payloads first and byte for byte, ≤ 50
//! per payload, ≤ 500 per execution, order kept), kill -9 between receipt and forwarding,
//! CRM contacts into S-360 (matching, statusCode errors, one rate budget per instance,
//! 509 = wait), offers → exactly one order each across a timeout and a kill -9, and every
//! CRM target auth.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Env, query_i64, stdout, wait_until};
use serde_json::{Value, json};
use usher_sandbox::s360::{
    DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET, webhook_contact, webhook_order,
};
use usher_sandbox::{S360Sender, Sandbox};

async fn sandbox() -> Sandbox {
    Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn base(s: &Sandbox) -> String {
    format!("http://{}", s.addr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `[receiver]` plus an S-360 connection (`s360`) and a CRM connection (`crm`).
fn head(env: &Env, s: &Sandbox, port: u16, s360_extra: &str) -> String {
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    format!(
        r#"
[receiver]
listen = "127.0.0.1:{port}"
max_body = "64KB"

[connections.s360]
kind = "s360"
base_url = "{base}/s360/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
{s360_extra}

[connections.crm]
kind = "crm"
base_url = "{base}/crm"
"#,
        base = base(s)
    )
}

fn relay_stream(name: &str, entity: &str, enabled: bool, auth: &str, every: &str) -> String {
    format!(
        r#"
[streams.{name}]
source = "s360"
entity = "{entity}"
target = "crm"
enabled = {enabled}
every = "{every}"
jitter = "0s"
max_per_run = 500
max_per_payload = 50

[streams.{name}.s360]
auth = {auth}

[streams.{name}.webhook]
url = "/hooks/{{institution}}/{entity}"
"#
    )
}

const BEARER: &str = r#"{ type = "bearer", token = "hook-token" }"#;

fn sender(port: u16, path: &str) -> S360Sender {
    let mut s = S360Sender::new(&format!("http://127.0.0.1:{port}{path}"));
    s.auth = Some(("authorization".into(), "Bearer hook-token".into()));
    s
}

fn seqs(records: &[Value], path: &[&str]) -> Vec<u64> {
    records
        .iter()
        .map(|r| {
            let mut v = r;
            for p in path {
                v = &v[*p];
            }
            v["seq"].as_u64().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_receiver_answers_as_s360_expects_and_stores_a_resend_once() {
    let s = sandbox().await;
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &s, port, "");
    // Disabled: the receiver keeps storing, nothing is relayed.
    cfg += &relay_stream("contacts", "contacts", false, BEARER, "1h");
    cfg += &relay_stream(
        "orders",
        "orders",
        false,
        r#"{ type = "basic", username = "s360", password = "pw" }"#,
        "1h",
    );
    cfg += &relay_stream(
        "more-contacts",
        "contacts",
        false,
        r#"{ type = "api_key", header = "X-Api-Key", key = "k1" }"#,
        "1h",
    )
    .replace(
        "[streams.more-contacts.s360]",
        "[streams.more-contacts.s360]\npath = \"/hooks-in/other\"",
    );
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();
    let db = env.db_path();
    let inbox = |stream: &str| {
        query_i64(
            &db,
            &format!("SELECT COUNT(*) FROM s360_inbox WHERE stream = '{stream}'"),
        )
    };

    let c = sender(port, "/s360/myvenue/contacts");
    // Malformed JSON, a non-array, an element without its ID: 400 with a reason, nothing stored.
    assert_eq!(c.post_raw(b"[{\"contactNumber\": ".to_vec()).await, 400);
    assert_eq!(c.post_raw(br#"{"contactNumber":"1"}"#.to_vec()).await, 400);
    assert_eq!(
        c.post_raw(br#"[{"contactNumber":"1"},{"type":"INDIVIDUAL"}]"#.to_vec())
            .await,
        400
    );
    let reply = reqwest::Client::new()
        .post(&c.url)
        .header("authorization", "Bearer hook-token")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 400);
    assert!(reply.text().await.unwrap().contains("must be a JSON array"));
    assert_eq!(inbox("contacts"), 0);

    // Bad or missing credentials: 401.
    let mut wrong = c.clone();
    wrong.auth = Some(("authorization".into(), "Bearer nope".into()));
    assert_eq!(wrong.post_raw(b"[]".to_vec()).await, 401);
    wrong.auth = None;
    assert_eq!(wrong.post_raw(b"[]".to_vec()).await, 401);

    // Over max_body (64 KB): 413, nothing stored.
    let big: Vec<Value> = (1..=400).map(webhook_contact).collect();
    assert!(serde_json::to_vec(&big).unwrap().len() > 64 * 1024);
    assert_eq!(c.post_raw(serde_json::to_vec(&big).unwrap()).await, 413);
    assert_eq!(inbox("contacts"), 0);

    // An empty array: 200, nothing stored.
    assert_eq!(c.post_raw(b"[]".to_vec()).await, 200);
    assert_eq!(inbox("contacts"), 0);

    // A payload sent twice is stored once; a changed record is a new version.
    let payload: Vec<Value> = (1..=50).map(webhook_contact).collect();
    let r = c.send(&payload).await;
    assert_eq!(r.statuses, vec![200]);
    assert_eq!(inbox("contacts"), 50);
    let r = c.send(&payload).await;
    assert_eq!(r.statuses, vec![200], "a resend still gets 200");
    assert_eq!(inbox("contacts"), 50, "a resent payload is stored once");
    let mut changed = webhook_contact(7);
    changed["individualContact"]["lastName"] = json!("Changed");
    assert_eq!(c.send(&[changed]).await.statuses, vec![200]);
    assert_eq!(inbox("contacts"), 51);

    // Basic auth on the orders path, API-key header on a configured path.
    let mut o = S360Sender::new(&format!("http://127.0.0.1:{port}/s360/myvenue/orders"));
    let orders: Vec<Value> = (1..=3).map(|i| webhook_order(i, "CLOSED")).collect();
    // Once: after 5 failures a peer gets 429 for a while (tests/receiver_hostile.rs).
    o.tries = 1;
    assert_eq!(o.send(&orders).await.statuses, vec![401]);
    use base64::Engine;
    o.auth = Some((
        "authorization".into(),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("s360:pw")
        ),
    ));
    assert_eq!(o.send(&orders).await.statuses, vec![200]);
    assert_eq!(inbox("orders"), 3);
    let mut k = S360Sender::new(&format!("http://127.0.0.1:{port}/hooks-in/other"));
    k.auth = Some(("x-api-key".into(), "k1".into()));
    assert_eq!(k.send(&payload[..5]).await.statuses, vec![200]);
    assert_eq!(inbox("more-contacts"), 5);
    // Unknown path: 404.
    let mut u = S360Sender::new(&format!("http://127.0.0.1:{port}/s360/other/contacts"));
    u.tries = 1;
    assert_eq!(u.send(&payload[..1]).await.statuses, vec![404]);
    // Nothing was relayed while the streams are disabled.
    assert!(s.crm.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relayed_payloads_keep_order_limits_and_come_back_identical_and_first_when_refused() {
    let s = sandbox().await;
    // The CRM refuses the first three POSTs.
    s.crm.refuse_next(3, 503);
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &s, port, "");
    cfg += &relay_stream("contacts", "contacts", true, BEARER, "1s");
    cfg += &relay_stream("orders", "orders", true, BEARER, "1s");
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();

    let contacts: Vec<Value> = (1..=1230).map(webhook_contact).collect();
    let rep = sender(port, "/s360/myvenue/contacts").send(&contacts).await;
    assert_eq!(rep.gave_up, 0);
    let states = ["CLOSED", "IN_PROGRESS", "ABANDONED"];
    let orders: Vec<Value> = (1..=90)
        .map(|i| webhook_order(i, states[i as usize % 3]))
        .collect();
    sender(port, "/s360/myvenue/orders").send(&orders).await;

    let contact_records = |s: &Sandbox| -> Vec<Value> {
        s.crm
            .received()
            .iter()
            .filter(|r| r.status == 200 && !r.duplicate && r.path.ends_with("contacts"))
            .flat_map(|r| serde_json::from_slice::<Vec<Value>>(&r.body).unwrap())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(40), || contact_records(&s).len()
            >= 1230
            && s.crm.accepted_records().len() >= 1230 + 60),
        "{}",
        d.log()
    );
    // Every record once, in order of receipt, passed through unchanged.
    let got = contact_records(&s);
    assert_eq!(seqs(&got, &[]), (1..=1230).collect::<Vec<_>>());
    assert_eq!(got[0], contacts[0]);
    // Only finalised orders, in order.
    let got_orders: Vec<Value> = s
        .crm
        .received()
        .iter()
        .filter(|r| r.status == 200 && !r.duplicate && r.path.ends_with("orders"))
        .flat_map(|r| serde_json::from_slice::<Vec<Value>>(&r.body).unwrap())
        .collect();
    let expected: Vec<u64> = (1..=90).filter(|i| i % 3 != 1).collect();
    assert_eq!(seqs(&got_orders, &["orderDetailsData"]), expected);
    assert!(
        got_orders
            .iter()
            .all(|o| o["orderDetailsData"]["orderState"] != "IN_PROGRESS")
    );

    // No payload over 50; each refused payload is the next one sent on its path, byte for byte.
    let received = s.crm.received();
    assert!(
        received
            .iter()
            .all(|r| serde_json::from_slice::<Vec<Value>>(&r.body).unwrap().len() <= 50)
    );
    let refused: Vec<usize> = (0..received.len())
        .filter(|i| received[*i].status != 200)
        .collect();
    assert_eq!(refused.len(), 3);
    for i in refused {
        let next = received[i + 1..]
            .iter()
            .find(|r| r.path == received[i].path)
            .expect("the refused payload is sent again");
        assert_eq!(
            next.body, received[i].body,
            "resent byte for byte, before anything newer"
        );
        assert_eq!(next.idempotency_key, received[i].idempotency_key);
    }
    // No execution over 500 records; IN_PROGRESS orders counted as skipped.
    let db = env.db_path();
    assert!(wait_until(Duration::from_secs(10), || query_i64(
        &db,
        "SELECT COALESCE(SUM(created), 0) FROM runs WHERE stream = 'contacts'"
    ) == 1230));
    assert!(
        query_i64(
            &db,
            "SELECT MAX(created) FROM runs WHERE stream = 'contacts'"
        ) <= 500
    );
    assert!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM runs WHERE stream = 'contacts' AND created > 0"
        ) >= 3
    );
    assert!(wait_until(Duration::from_secs(10), || query_i64(
        &db,
        "SELECT COALESCE(SUM(skipped), 0) FROM runs WHERE stream = 'orders'"
    ) == 30));
    assert!(query_i64(&db, "SELECT COUNT(*) FROM runs WHERE outcome = 'refused'") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_between_receipt_and_forwarding_loses_nothing() {
    let s = sandbox().await;
    let env = Env::new();
    let port = free_port();
    let cfg = head(&env, &s, port, "") + &relay_stream("contacts", "contacts", false, BEARER, "1s");
    env.write_config(&cfg);
    let mut d = env.spawn_daemon();
    d.wait_ready();
    let contacts: Vec<Value> = (1..=300).map(webhook_contact).collect();
    let rep = sender(port, "/s360/myvenue/contacts").send(&contacts).await;
    assert_eq!(rep.statuses, vec![200; 6], "every payload acknowledged");
    d.kill9();
    assert!(s.crm.received().is_empty());

    env.write_config(&cfg.replace("enabled = false", "enabled = true"));
    let d2 = env.spawn_daemon();
    d2.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            >= 300),
        "{}",
        d2.log()
    );
    assert_eq!(
        seqs(&s.crm.accepted_records(), &[]),
        (1..=300).collect::<Vec<_>>()
    );
}

/// S-360 resends payloads: v0, then v1, then v0 again. The resent v0 equals a version
/// already stored (not the latest), so it is stored once and never relayed after v1: the
/// CRM ends with v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_of_an_older_version_is_not_stored_again_and_the_newest_stays_last() {
    let s = sandbox().await;
    let env = Env::new();
    let port = free_port();
    let cfg = head(&env, &s, port, "") + &relay_stream("contacts", "contacts", true, BEARER, "1s");
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();
    let c = sender(port, "/s360/myvenue/contacts");
    let v0 = webhook_contact(4_000_033);
    let mut v1 = v0.clone();
    v1["individualContact"]["lastName"] = json!("Married");
    v1["lastModificationDate"] = json!("2026-05-03T09:00:00.000+00:00");
    for v in [&v0, &v1, &v0] {
        assert_eq!(c.send(std::slice::from_ref(v)).await.statuses, vec![200]);
    }
    let db = env.db_path();
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM s360_inbox WHERE stream = 'contacts'"
        ),
        2,
        "v0 and v1 stored, the resent v0 not"
    );
    assert!(
        wait_until(Duration::from_secs(20), || s.crm.accepted_records().len()
            >= 2),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(2500)); // two more executions: nothing else comes
    let got = s.crm.accepted_records();
    assert_eq!(got, vec![v0, v1], "each version once, the newest last");
}

/// CRM → S-360 contacts with the matching rules, an S-360 statusCode error, and two streams
/// on two connections of one instance sharing one budget (20 calls per 2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crm_contacts_match_and_all_streams_of_an_instance_share_one_budget() {
    let s = sandbox().await;
    s.s360.set_rate_limit(20, Duration::from_secs(2), 509);
    // S-360 already knows person1 (once) and person2 (twice: ambiguous).
    let known = s
        .s360
        .add_contact(json!({"individualContact": {"email": "person1@example.org"}}));
    s.s360
        .add_contact(json!({"individualContact": {"email": "person2@example.org"}}));
    s.s360
        .add_contact(json!({"individualContact": {"email": "PERSON2@example.org"}}));
    let numbered = s
        .s360
        .add_contact(json!({"individualContact": {"email": "old@example.org"}}));
    s.crm.add_contacts(2);
    let mut c3 = usher_sandbox::crm::contact(3);
    c3["s360_contact_number"] = json!(numbered);
    s.crm.push_contact(c3);
    for i in 4..=24 {
        s.crm.push_contact(usher_sandbox::crm::contact(i));
    }
    s.crm.add_offers(10);
    // One S-360 refusal in S-360's style.
    s.s360.refuse_email(
        "person5@example.org",
        "INVALID_PARAMETER",
        "phone number is not valid",
    );

    let env = Env::new();
    let port = free_port();
    let limit = r#"rate_limit = { calls = 20, per = "2s" }"#;
    let mut cfg = head(&env, &s, port, limit);
    cfg += &format!(
        r#"
[connections.s360-orders]
kind = "s360"
base_url = "{base}/s360/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
{limit}

[streams.crm-contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
page_size = 10

[streams.crm-offers]
source = "crm"
entity = "offer"
target = "s360-orders"
every = "1h"
page_size = 5
"#,
        base = base(&s)
    );
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();
    let db = env.db_path();
    assert!(
        wait_until(Duration::from_secs(40), || {
            query_i64(&db, "SELECT COUNT(*) FROM runs WHERE ended_at IS NOT NULL") >= 2
        }),
        "{}",
        d.log()
    );
    let outcomes: Vec<String> = {
        common::column(
            &db,
            "SELECT outcome || ' ' || COALESCE(error, '') FROM runs",
        )
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect()
    };
    assert!(
        outcomes.iter().all(|o| o.starts_with("ok")),
        "{outcomes:?}\n{}",
        d.log()
    );

    // Never more than 20 calls in any 2 s at the fake, for both streams together; no 509.
    let calls = s.s360.calls();
    assert!(
        calls.len() > 40,
        "enough calls to test the budget ({})",
        calls.len()
    );
    let max = s.s360.max_calls_within("myvenue", Duration::from_secs(2));
    assert!(max <= 20, "at most 20 calls per 2 s, saw {max}");
    assert!(
        calls.iter().all(|c| c.status != 509),
        "usher never went over the limit"
    );
    let methods: HashSet<&str> = calls.iter().map(|c| c.method.as_str()).collect();
    assert!(
        methods.contains("createOrUpdateOrder") && methods.contains("saveIndividualContactData")
    );

    // Matching: person1 → the known contact; contact 3 → its carried number; person2 →
    // ambiguous (dead letter); one refused by S-360 (dead letter with statusDetail); rest created.
    let link = |id: &str| -> String {
        common::query_text(
            &db,
            &format!(
                "SELECT target_id FROM links WHERE stream = 'crm-contacts' AND source_id = '{id}'"
            ),
        )
        .unwrap()
    };
    assert_eq!(link("CRM-1"), known);
    assert_eq!(link("CRM-3"), numbered);
    let reasons: Vec<String> = {
        common::column(
            &db,
            "SELECT source_id || ': ' || reason FROM dead_letters WHERE stream = 'crm-contacts' ORDER BY id",
        )
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect()
    };
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("CRM-2: ") && reasons[0].contains("ambiguous"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("CRM-5: ")
            && reasons[1].contains("INVALID_PARAMETER: phone number is not valid"),
        "{reasons:?}"
    );
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM links WHERE stream = 'crm-contacts'"
        ),
        22
    );
    let created = s.s360.contacts().len() - 4;
    assert_eq!(created, 20, "contacts 4 and 6..=24 created, once each");
    // Offers: one order each.
    assert_eq!(s.s360.orders().len(), 10);
}

/// 509 without our budget knowing better: usher waits as told and retries; nothing twice.
/// One S-360 POST in seven answers 500 (issue 19, item 3: "fifteen runs in a row each
/// failed on its first 500"): a contact create that failed is resolved in the same run
/// (searchContact by e-mail, then sent again), searches and updates are retried: the 300
/// contacts go in ONE run, none twice; the extra calls are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifteen_percent_500s_from_s360_cost_one_run_and_no_duplicate() {
    let s = sandbox().await;
    s.crm.add_contacts(300);
    s.s360.set_rate_limit(100_000, Duration::from_secs(60), 509);
    for _ in 0..400 {
        s.s360
            .faults
            .push("s360.api", usher_sandbox::Fault::Pass, 6);
        s.s360
            .faults
            .push("s360.api", usher_sandbox::Fault::Status(500), 1);
    }
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(
        &env,
        &s,
        port,
        r#"rate_limit = { calls = 100000, per = "1m" }"#,
    );
    cfg += r#"
[streams.crm-contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
page_size = 100
"#;
    env.write_config(&cfg);
    let out = env.cli(&["trigger", "crm-contacts"]);
    assert_eq!(out.status.code(), Some(0), "one run: {}", stdout(&out));
    let mut emails: Vec<String> = s
        .s360
        .contacts()
        .iter()
        .map(|c| {
            c["individualContact"]["email"]
                .as_str()
                .unwrap_or("")
                .to_lowercase()
        })
        .collect();
    emails.sort();
    let n = emails.len();
    emails.dedup();
    assert_eq!(n, emails.len(), "a contact created twice");
    assert_eq!(n, 300);
    let calls = s.s360.faults.calls_to("s360.api");
    let failed = calls.iter().filter(|c| c.status == 500).count();
    eprintln!(
        "15 % 500s: {} S-360 calls ({failed} answered 500) for 300 contacts (a clean run: 600)",
        calls.len()
    );
    assert!(failed >= 30);
}

/// Every save of a page refused for one reason is the configuration (issue 19, item 5): the
/// run fails with S-360's reason, sets nothing aside, keeps the cursor; then goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_contact_refused_for_one_reason_stops_the_run_not_the_records() {
    let s = sandbox().await;
    s.crm.add_contacts(8);
    s.s360.fail_next(
        "saveIndividualContactData",
        8,
        "INVALID_CONFIGURATION",
        "virtual operator cannot create contacts",
    );
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &s, port, "");
    cfg += r#"
[streams.crm-contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
"#;
    env.write_config(&cfg);
    let out = env.cli(&["trigger", "crm-contacts"]);
    let text = format!("{}{}", stdout(&out), common::stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("S-360 refused every create of this page (8 contacts)"),
        "{text}"
    );
    let db = env.db_path();
    assert_eq!(query_i64(&db, "SELECT COUNT(*) FROM dead_letters"), 0);
    assert_eq!(
        query_i64(&db, "SELECT COUNT(*) FROM cursors WHERE cursor IS NOT NULL"),
        0
    );
    let out = env.cli(&["trigger", "crm-contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(s.s360.contacts().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_509_or_429_means_wait_and_retry() {
    let s = sandbox().await;
    s.s360.set_rate_limit(6, Duration::from_secs(2), 509);
    s.crm.add_contacts(8);
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(
        &env,
        &s,
        port,
        r#"rate_limit = { calls = 1000, per = "1m" }"#,
    );
    cfg += r#"
[streams.crm-contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
"#;
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();
    let db = env.db_path();
    assert!(
        wait_until(Duration::from_secs(30), || query_i64(
            &db,
            "SELECT COUNT(*) FROM links"
        ) == 8),
        "{}",
        d.log()
    );
    assert!(
        s.s360.calls().iter().any(|c| c.status == 509),
        "the fake did limit"
    );
    assert_eq!(s.s360.contacts().len(), 8, "each contact created once");
    assert!(d.log().contains("rate limited; waiting as asked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offer_whose_outcome_is_unknown_yields_one_order_across_a_timeout_and_a_kill_9() {
    let s = sandbox().await;
    s.crm.add_offers(3);
    // The first order is made, but its answer comes after usher's 1 s timeout.
    s.s360
        .delay_next("createOrUpdateOrder", Duration::from_millis(2500));
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &s, port, "timeout = \"1s\"");
    cfg += r#"
[streams.crm-offers]
source = "crm"
entity = "offer"
target = "s360"
every = "1h"
"#;
    env.write_config(&cfg);
    let mut d = env.spawn_daemon();
    d.wait_ready();
    let db = env.db_path();
    assert!(
        wait_until(Duration::from_secs(20), || query_i64(
            &db,
            "SELECT COUNT(*) FROM ledger WHERE status = 'done'"
        ) == 3),
        "{}",
        d.log()
    );
    let refs = |s: &Sandbox| -> Vec<String> {
        s.s360
            .orders()
            .iter()
            .map(|o| o.external_reference.clone().unwrap())
            .collect()
    };
    assert_eq!(
        refs(&s),
        vec!["OFF-1", "OFF-2", "OFF-3"],
        "one order per offer"
    );
    assert!(
        d.log()
            .contains("order outcome unknown; asking S-360 before any retry")
    );
    let first = &s.s360.orders()[0].body;
    assert_eq!(first["externalReference"], "OFF-1");
    assert_eq!(first["orderType"], "SALE");
    assert_eq!(first["operations"][0]["tariffId"], 3);

    // A crash while the answer is on its way: the next run waits until the order can no
    // longer land (8 s timeout + 1 s + the 5 s margin), then asks before sending.
    s.crm.add_offers(1);
    s.s360
        .delay_next("createOrUpdateOrder", Duration::from_secs(30));
    env.write_config(&cfg.replace("timeout = \"1s\"", "timeout = \"8s\""));
    d.signal(rustix::process::Signal::HUP);
    assert!(d.wait_log("configuration reloaded", Duration::from_secs(10)));
    env.cli(&["trigger", "crm-offers"]);
    assert!(
        wait_until(Duration::from_secs(15), || s.s360.orders().len() == 4),
        "{}",
        d.log()
    );
    d.kill9();
    let d2 = env.spawn_daemon();
    d2.wait_ready();
    assert!(
        wait_until(Duration::from_secs(40), || query_i64(
            &db,
            "SELECT COUNT(*) FROM ledger WHERE status = 'done'"
        ) == 4),
        "{}",
        d2.log()
    );
    assert!(d2.log().contains("writes of an earlier run may still land"));
    assert_eq!(
        refs(&s),
        vec!["OFF-1", "OFF-2", "OFF-3", "OFF-4"],
        "still one order per offer"
    );
    assert!(d2.log().contains("S-360 already has the order"));
}

/// The way back from a damaged state (README, "Starting again"): a state started afresh
/// reads every offer again, and before, each became a second order (only an offer whose
/// ledger row said "attempt" was looked up). Now an offer the ledger does not know is
/// looked up at S-360 by its external reference first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offers_read_again_by_a_state_started_afresh_are_not_ordered_twice() {
    let s = sandbox().await;
    s.crm.add_offers(3);
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &s, port, "");
    cfg += r#"
[streams.crm-offers]
source = "crm"
entity = "offer"
target = "s360"
every = "1h"
"#;
    env.write_config(&cfg);
    let trigger = |env: &Env| {
        let out = env.cli(&["trigger", "crm-offers"]);
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    };
    trigger(&env);
    assert_eq!(s.s360.orders().len(), 3);
    for f in ["usher.db", "usher.db-wal", "usher.db-shm"] {
        let _ = std::fs::remove_file(env.state_dir().join(f));
    }
    s.crm.add_offers(1);
    trigger(&env);
    let refs: Vec<String> = s
        .s360
        .orders()
        .iter()
        .map(|o| o.external_reference.clone().unwrap())
        .collect();
    assert_eq!(
        refs,
        ["OFF-1", "OFF-2", "OFF-3", "OFF-4"],
        "one order per offer"
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM ledger WHERE status = 'done'"
        ),
        4,
        "the three known orders are recorded, with their S-360 ids"
    );
}

/// Each CRM target auth (none, Basic, bearer, API-key header, OAuth2 client credentials)
/// against its own CRM fake that demands it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_crm_target_auth_is_accepted_by_a_crm_that_demands_it() {
    let kinds = [
        ("none", "".to_string()),
        (
            "basic",
            r#"auth = { type = "basic", username = "u", password = "p" }"#.to_string(),
        ),
        (
            "bearer",
            r#"auth = { type = "bearer", token = "t0k" }"#.to_string(),
        ),
        (
            "apikey",
            r#"auth = { type = "api_key", header = "X-Crm-Key", key = "k3y" }"#.to_string(),
        ),
        ("oauth", String::new()),
    ];
    let mut fakes = Vec::new();
    for (k, _) in &kinds {
        let s = sandbox().await;
        match *k {
            "basic" => s.crm.require_header("authorization", "Basic dTpw"),
            "bearer" => s.crm.require_header("authorization", "Bearer t0k"),
            "apikey" => s.crm.require_header("x-crm-key", "k3y"),
            "oauth" => s.crm.require_oauth("crm-client", "crm-secret"),
            _ => {}
        }
        fakes.push(s);
    }
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &fakes[0], port, "");
    for ((k, auth), s) in kinds.iter().zip(&fakes) {
        let auth = if *k == "oauth" {
            format!(
                r#"auth = {{ type = "oauth2", token_url = "{}/crm/oauth/token", client_id = "crm-client", client_secret = "crm-secret" }}"#,
                base(s)
            )
        } else {
            auth.clone()
        };
        cfg += &format!(
            "\n[connections.crm-{k}]\nkind = \"crm\"\nbase_url = \"{}/crm\"\n{auth}\n",
            base(s)
        );
        cfg += &relay_stream(&format!("to-{k}"), "contacts", true, BEARER, "1s")
            .replace("target = \"crm\"", &format!("target = \"crm-{k}\""))
            .replace(
                &format!("[streams.to-{k}.s360]"),
                &format!("[streams.to-{k}.s360]\npath = \"/in/{k}\""),
            );
    }
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();
    for (k, _) in &kinds {
        let r = sender(port, &format!("/in/{k}"))
            .send(&(1..=3).map(webhook_contact).collect::<Vec<_>>())
            .await;
        assert_eq!(r.statuses, vec![200]);
    }
    for ((k, _), s) in kinds.iter().zip(&fakes) {
        assert!(
            wait_until(Duration::from_secs(15), || s.crm.accepted_records().len()
                == 3),
            "auth {k}: {:?}\n{}",
            s.crm
                .received()
                .iter()
                .map(|r| r.status)
                .collect::<Vec<_>>(),
            d.log()
        );
    }
    assert_eq!(fakes[4].crm.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_s360_online_and_warns_about_an_open_receiver() {
    let s = sandbox().await;
    let env = Env::new();
    let port = free_port();
    let cfg = head(&env, &s, port, "")
        + &relay_stream("contacts", "contacts", true, BEARER, "1h")
            .replace(&format!("auth = {BEARER}\n"), "");
    env.write_config(&cfg);
    let out = env.cli(&["validate", "--online"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", common::stderr(&out));
    assert!(
        text.contains("receiver accepts unauthenticated POSTs"),
        "{text}"
    );
    assert!(text.contains("connection \"s360\" (s360): valid"), "{text}");
    env.write_secret("s360-secret", "wrong-secret");
    let out = env.cli(&["validate", "--online"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("connection \"s360\" (s360): wrong credentials"),
        "{text}"
    );
    assert!(!text.contains("wrong-secret"));
}

#[test]
fn s360_config_problems_are_all_reported() {
    let env = Env::new();
    env.write_config(
        r#"
[connections.s360]
kind = "s360"
institution = "my venue"
virtual_operator = "VO"
auth = { type = "bearer", token = "x" }

[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"

[streams.a]
source = "s360"
entity = "contacts"
target = "crm"
every = "15m"
[streams.a.webhook]
url = "/hooks/{institution}"

[streams.b]
source = "crm"
entity = "tickets"
target = "s360"
every = "15m"
"#,
    );
    let out = env.cli(&["validate"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for needle in [
        "key `connections.s360.partner_name`: missing key `partner_name`",
        "key `connections.s360.partner_secret`: missing secret",
        "key `connections.s360.institution`: \"my venue\" is not an institution code",
        "key `connections.s360.auth`: `auth` does not apply to a connection of kind s360",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }

    // With the connection fixed: the stream problems.
    env.write_secret("s360-secret", "x");
    env.write_config(
        r#"
[connections.s360]
kind = "s360"
institution = "myvenue"
virtual_operator = "VO"
partner_name = "usher"
partner_secret_file = "s360-secret"

[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"

[streams.a]
source = "s360"
entity = "contacts"
target = "crm"
every = "15m"
[streams.a.webhook]
url = "/hooks/{institution}"

[streams.b]
source = "s360"
entity = "contacts"
target = "crm"
every = "15m"
[streams.b.webhook]
url = "/hooks/b"

[streams.c]
source = "crm"
entity = "tickets"
target = "s360"
every = "15m"
"#,
    );
    let out = env.cli(&["validate"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for needle in [
        "key `streams.a.source`: an S-360 webhook stream needs the `[receiver]` section",
        "key `streams.b.s360.path`: receiver path \"/s360/myvenue/contacts\" is also used by stream \"a\"",
        "key `streams.c.entity`: \"tickets\": a stream into S-360 carries \"contact\" or \"offer\"",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

/// SIGTERM while S-360 is posting: every POST is either answered 200 after its commit or
/// not answered (and resent by S-360 to the restarted usher); nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_s360_posts_loses_nothing() {
    let s = sandbox().await;
    let env = Env::new();
    let port = free_port();
    let cfg = head(&env, &s, port, "") + &relay_stream("contacts", "contacts", false, BEARER, "1h");
    env.write_config(&cfg);
    let mut d = env.spawn_daemon();
    d.wait_ready();
    let mut snd = sender(port, "/s360/myvenue/contacts");
    snd.batch = 10;
    snd.pause = Duration::from_millis(300);
    snd.tries = 40;
    let contacts: Vec<Value> = (1..=400).map(webhook_contact).collect();
    let sending = tokio::spawn(async move { snd.send(&contacts).await });
    let db = env.db_path();
    assert!(wait_until(Duration::from_secs(20), || query_i64(
        &db,
        "SELECT COUNT(*) FROM s360_inbox"
    ) >= 100));
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)),
        Some(Some(0)),
        "{}",
        d.log()
    );
    let d2 = env.spawn_daemon();
    d2.wait_ready();
    let rep = sending.await.unwrap();
    assert_eq!(rep.gave_up, 0, "{:?}", rep.statuses);
    assert!(
        rep.statuses.iter().any(|s| *s != 200),
        "some POSTs went unanswered during the restart"
    );
    let ids: Vec<i64> = {
        common::column(&db, "SELECT record_id FROM s360_inbox ORDER BY id")
            .into_iter()
            .map(|v| v.unwrap().parse::<i64>().unwrap())
            .collect()
    };
    assert_eq!(
        ids,
        (3_100_001..=3_100_400).collect::<Vec<_>>(),
        "each record once, in order"
    );
}

/// Issue 24, item 4: an `orderId` above 2^64 was stored as `1.8446744073709552e+19`, so three
/// different orders became one record (answered `{"duplicates":1,"stored":0}` and never
/// relayed), and bodies were re-serialised (`0.30000000000000000001` became `0.3`). Now IDs
/// are their exact text, each record is stored and relayed byte for byte as received, and
/// an ID usher cannot keep exactly is refused with 400 naming the element.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_ids_and_exact_bodies_are_stored_and_relayed_byte_for_byte() {
    let s = sandbox().await;
    let env = Env::new();
    let port = free_port();
    let mut cfg = head(&env, &s, port, "");
    cfg += &relay_stream("orders", "orders", true, BEARER, "1s");
    env.write_config(&cfg);
    let d = env.spawn_daemon();
    d.wait_ready();
    let o = sender(port, "/s360/myvenue/orders");
    let post = |body: String| {
        let o = o.clone();
        async move {
            let r = reqwest::Client::new()
                .post(&o.url)
                .header("authorization", "Bearer hook-token")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // Odd spacing, key order and number spellings that a parse and re-serialisation change.
    let order = |id: &str| {
        format!(
            "{{ \"orderDetailsData\" : {{\"orderState\":\"CLOSED\", \"orderId\": {id},\n  \"rate\": 0.30000000000000000001, \"big\": 12345678901234567890123, \"e\": \"\\u00e9\"}} }}"
        )
    };
    let ids = [
        "18446744073709551616",
        "18446744073709551617",
        "18446744073709551618",
    ];
    let records: Vec<String> = ids.iter().map(|id| order(id)).collect();
    let body = format!("[{}]", records.join(" ,\n"));
    let (status, answer) = post(body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["stored"], 3, "{answer}");
    assert_eq!(answer["duplicates"], 0, "{answer}");
    // A resend of the same bytes is stored once.
    let (_, again) = post(body).await;
    assert!(again.contains("\"duplicates\":3"), "{again}");

    let stored: Vec<(String, String)> = common::rows(
        &env.db_path(),
        "SELECT record_id, body FROM s360_inbox ORDER BY id",
    )
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
    .collect();
    let expected: Vec<(String, String)> = ids
        .iter()
        .map(|i| i.to_string())
        .zip(records.iter().cloned())
        .collect();
    assert_eq!(stored, expected);

    // Relayed unchanged: the CRM gets the records' bytes as S-360 sent them.
    assert!(
        wait_until(Duration::from_secs(30), || !s
            .crm
            .accepted_records()
            .is_empty()),
        "{}",
        d.log()
    );
    let payload = s
        .crm
        .received()
        .into_iter()
        .find(|r| r.status == 200)
        .unwrap()
        .body;
    assert_eq!(
        String::from_utf8(payload.to_vec()).unwrap(),
        format!("[{}]", records.join(","))
    );

    // IDs usher cannot keep exactly: 400 naming the element, nothing stored.
    for bad in ["1.5", "1e3", "-4", "18446744073709551616.0", "true"] {
        let (status, reason) = post(format!("[{},{}]", order("7"), order(bad))).await;
        assert_eq!(status, 400, "{bad}: {reason}");
        assert!(
            reason.contains("element 1: `orderDetailsData.orderId`"),
            "{bad}: {reason}"
        );
    }
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM s360_inbox"),
        3
    );
}

/// Issue 21: one run pulled 150 with `max_per_run = 25`. A run of a CRM → S-360 contacts
/// (or offers) stream takes at most `max_per_run` records; the next run goes on from the
/// last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_per_run_caps_crm_to_s360_contacts_and_offers_runs() {
    let s = sandbox().await;
    for i in 1..=150 {
        s.crm.push_contact(usher_sandbox::crm::contact(i));
    }
    s.crm.add_offers(30);
    let env = Env::new();
    let mut cfg = head(&env, &s, free_port(), "");
    cfg += r#"
[streams.crm-offers]
source = "crm"
entity = "offer"
target = "s360"
every = "1h"
max_per_run = 10

[streams.crm-contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
page_size = 100
max_per_run = 25
"#;
    env.write_config(&cfg);
    let out = env.cli(&["trigger", "crm-offers"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert_eq!(s.s360.orders().len(), 10, "one run of offers, 10 orders");
    let out = env.cli(&["trigger", "crm-contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert_eq!(s.s360.contacts().len(), 25, "one run, 25 records");
    let out = env.cli(&["trigger", "crm-contacts"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert_eq!(s.s360.contacts().len(), 50, "the next 25, none twice");
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(DISTINCT target_id) FROM links WHERE stream = 'crm-contacts'"
        ),
        50
    );

    // A key its runs do not read is refused, naming the stream kind.
    env.write_config(&format!("{cfg}max_per_payload = 10\n"));
    let out = env.cli(&["validate"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("key `streams.crm-contacts.max_per_payload`: `max_per_payload` does not apply to a crm → s360 contacts stream"),
        "{err}"
    );
    env.write_config(&format!("{cfg}institution = \"myvenue\"\n"));
    let err = common::stderr(&env.cli(&["validate"]));
    assert!(
        err.contains("key `streams.crm-contacts.institution`: `institution` does not apply to a crm → s360 contacts stream"),
        "{err}"
    );
}
