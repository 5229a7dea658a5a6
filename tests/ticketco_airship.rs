//! Ticket Co → Airship, the real binary against the fakes over HTTP, with "today" set by
//! `--now`: the window's edges (in the venue's local time, across a daylight-saving
//! change), new / known / unchanged bookings (an update never writes the contact), groups
//! on the right unit, dead letters, a 422 and a malformed page confined to one booking or
//! event and owed (tried again at every run, whatever the window, and shown by `status`)
//! until Airship takes it, a failed run's window read again, `status` showing the last
//! run's outcome and error, kill -9 mid-run, backfill, a stream without `timezone`
//! refused, `validate --online`, and the query-string token never shown.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, query_i64, stderr, stdout, wait_until};
use serde_json::{Value, json};
use usher_sandbox::{Fault, Sandbox};

const TC_TOKEN: &str = "tc-SECRET-token-4471";
const AIR_TOKEN: &str = "air-SECRET-pat-9923";

async fn sandbox() -> Sandbox {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.ticketco.require_token(TC_TOKEN);
    s.airship.require_token(AIR_TOKEN, 77);
    s.airship.add_unit(1, "Oslo Golf");
    s.airship.add_unit(2, "Bergen Bowling");
    s.airship.add_unit(3, "TRD padel hall");
    s
}

/// A stream named `bookings`; `extra` goes into `[streams.bookings.airship]`.
fn setup(s: &Sandbox, extra: &str) -> Env {
    let env = Env::new();
    let tc = env.write_secret("ticketco-token", TC_TOKEN);
    let air = env.write_secret("airship-token", AIR_TOKEN);
    env.write_config(&format!(
        r#"
[connections.tc]
kind = "ticketco"
base_url = "{tc_url}"
api_token_file = {tc:?}
max_retries = 1

[connections.air]
kind = "airship"
base_url = "{air_url}"
access_token_file = {air:?}
account_id = 77
max_retries = 1
timeout = "3s"

[streams.bookings]
source = "tc"
target = "air"
timezone = "Europe/Oslo"

[streams.bookings.airship]
venues = ["Oslo Golf", "Bergen Bowling", "Trondheim Padel"]
unit_ids = {{ "Trondheim Padel" = 3 }}
event_tags = ["Golf"]
tag_folder = "Activities"
sources = {{ web = 4 }}
types = {{ ticket = 9 }}
{extra}
"#,
        tc_url = s.url("ticketco"),
        air_url = s.url("airship"),
        tc = tc.display().to_string(),
        air = air.display().to_string(),
    ));
    env
}

fn event(id: u64, venue: &str, start: &str, tags: &[&str]) -> Value {
    json!({"id": id, "title": format!("Event {id}"), "start_at": start, "end_at": start,
        "location_name": venue, "tags": tags, "status": "active"})
}

fn item(reference: &str, event_id: u64, start: &str) -> Value {
    let n = reference.trim_start_matches("TC-");
    json!({"uuid": format!("u-{reference}"), "ref_number": reference,
        "transaction_datestamp": "2026-05-02T14:01:42+00:00", "event_id": event_id,
        "event_name": "x", "event_start": start, "status": "paid", "quantity": 2, "price": 45000,
        "source": "web", "booking_type": "ticket", "buyer_first_name": format!("Ada{n}"),
        "buyer_last_name": "Example", "buyer_email": format!(" Ada{n}@Example.org "),
        "buyer_phone": format!("+47 1234 {n}"), "buyer_email_opt_in": true, "checked_in_at": null})
}

/// Adds an event with one booking `TC-<id>` starting at `start`.
fn add(s: &Sandbox, id: u64, venue: &str, start: &str, tags: &[&str]) {
    s.ticketco.add_event(event(id, venue, start, tags));
    s.ticketco.add_item(item(&format!("TC-{id}"), id, start));
}

fn run(env: &Env, now: &str) -> std::process::Output {
    let out = env.cli_at(now, &["trigger", "bookings"]);
    for text in [stdout(&out), stderr(&out)] {
        assert!(
            !text.contains(TC_TOKEN) && !text.contains(AIR_TOKEN),
            "a token was printed: {text}"
        );
    }
    out
}

fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", stdout(out), stderr(out));
    assert!(out.status.success(), "the run failed:\n{text}");
    text
}

fn writes_for(s: &Sandbox, reference: &str) -> Vec<(String, Value)> {
    s.airship
        .calls()
        .into_iter()
        .filter(|c| c.path != "/account/units")
        .filter(|c| {
            c.body["booking_reference"] == reference
                || c.body["bookings"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["booking_reference"] == reference))
        })
        .map(|c| (c.path, c.body))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn window_edges_groups_and_a_cancellation_the_next_day() {
    let s = sandbox().await;
    let env = setup(&s, "");
    // "today" is 10 June 2026 in Oslo (UTC+2); the window is 9 June through 10 July.
    add(&s, 1, "Oslo Golf", "2026-06-08T23:30:00+02:00", &[]); // day before yesterday: out
    add(&s, 2, "Oslo Golf", "2026-06-08T22:30:00Z", &[]); // 00:30 on 9 June local: in
    add(&s, 3, "Oslo Golf", "2026-07-10T21:30:00Z", &[]); // 23:30 on 10 July local: in
    add(&s, 4, "Oslo Golf", "2026-07-10T22:30:00Z", &[]); // 00:30 on 11 July local: out
    add(
        &s,
        5,
        "Bergen Bowling",
        "2026-06-10T19:00:00+02:00",
        &["Golf", "Kids"],
    ); // today
    add(
        &s,
        6,
        "Somewhere Else",
        "2026-06-12T19:00:00+02:00",
        &["Golf"],
    ); // not a listed venue
    add(&s, 8, "Trondheim Padel", "2026-06-20T18:00:00+02:00", &[]); // unit by explicit ID
    let mut no_contact = item("TC-7", 5, "2026-06-10T19:00:00+02:00");
    no_contact["buyer_email"] = json!("  ");
    no_contact["buyer_phone"] = Value::Null;
    s.ticketco.add_item(no_contact);

    let out = run(&env, "2026-06-10T01:00:00Z");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("created 4, updated 0"), "{text}");
    let mut refs: Vec<String> = s.airship.creations().keys().cloned().collect();
    refs.sort();
    assert_eq!(
        refs,
        vec!["TC-2", "TC-3", "TC-5", "TC-8"],
        "exactly the bookings inside the window"
    );

    // Booking fields, in venue local time.
    let (_, b2) = s.airship.booking("TC-2").unwrap();
    assert_eq!(b2["party_datetime"], "2026-06-09 00:30:00");
    assert_eq!(b2["party_enquirytime"], "2026-05-02 16:01:42");
    assert_eq!(b2["unit_id"], 1);
    assert_eq!(b2["stage_value"], 1);
    assert_eq!(b2["source_id"], 4);
    assert_eq!(b2["type_id"], 9);
    assert_eq!(b2["party_size"], 2);
    assert_eq!(b2["data"]["element_01"], "450.00");
    assert_eq!(
        s.airship.booking("TC-3").unwrap().1["party_datetime"],
        "2026-07-10 23:30:00"
    );
    assert_eq!(s.airship.booking("TC-8").unwrap().1["unit_id"], 3);

    // Contacts and groups: "Booking" on the booked venue's unit, the tag group beside it.
    let c5 = s
        .airship
        .contact_by_email("ada5@example.org")
        .expect("contact of TC-5");
    assert_eq!(c5["first_name"], "Ada5");
    assert_eq!(c5["mobile_number"], "+47 1234 5");
    assert_eq!(c5["allow_email"], true);
    assert_eq!(c5["allow_sms"], false, "usher never sets allow_sms");
    let id5 = c5["id"].as_i64().unwrap();
    let c2 = s.airship.contact_by_email("ada2@example.org").unwrap()["id"]
        .as_i64()
        .unwrap();
    let members = s.airship.memberships();
    let of = |c: i64| -> Vec<(i64, String, Option<String>)> {
        members
            .iter()
            .filter(|m| m.0 == c)
            .map(|m| (m.1, m.2.clone(), m.3.clone()))
            .collect()
    };
    assert_eq!(
        of(id5),
        vec![
            (2, "Booking".into(), None),
            (2, "Golf".into(), Some("Activities".into()))
        ]
    );
    assert_eq!(of(c2), vec![(1, "Booking".into(), None)]);

    // The booking with neither e-mail nor mobile: one dead letter with its reason.
    let db = env.db_path();
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM dead_letters WHERE source_id = 'TC-7' AND reason LIKE '%neither an e-mail nor a mobile%'"
        ),
        1
    );
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM ledger WHERE stream = 'bookings' AND target_ids IS NOT NULL"
        ),
        4
    );

    // The same day again: nothing is written, nothing dead-lettered twice.
    let writes = s.airship.writes();
    let text = ok(&run(&env, "2026-06-10T01:30:00Z"));
    assert!(text.contains("created 0, updated 0"), "{text}");
    assert_eq!(
        s.airship.writes(),
        writes,
        "a second run the same day writes nothing"
    );
    assert_eq!(query_i64(&db, "SELECT COUNT(*) FROM dead_letters"), 1);

    // Overnight TC-5 (yesterday's event) is cancelled, and the buyer's opt-in and e-mail
    // change in Ticket Co: the next day's run updates the booking only.
    assert!(s.ticketco.update_item("TC-5", |b| {
        b["status"] = json!("cancelled");
        b["buyer_email_opt_in"] = json!(false);
        b["buyer_first_name"] = json!("Changed");
    }));
    let before = s.airship.calls().len();
    let text = ok(&run(&env, "2026-06-11T01:00:00Z"));
    // The window moved a day: TC-4 (00:30 on 11 July) is now in it and new.
    assert!(text.contains("created 1, updated 1"), "{text}");
    assert!(s.airship.booking("TC-4").is_some());
    let calls: Vec<_> = s.airship.calls()[before..]
        .iter()
        .filter(|c| {
            c.path != "/account/units" && c.body["bookings"][0]["booking_reference"] != "TC-4"
        })
        .cloned()
        .collect();
    assert_eq!(calls.len(), 1, "one write for TC-5: {calls:?}");
    assert_eq!(calls[0].path, "/booking/update");
    assert_eq!(calls[0].body["booking_reference"], "TC-5");
    assert_eq!(calls[0].body["stage_value"], 550);
    for key in ["email", "first_name", "allow_email", "units", "account_id"] {
        assert!(
            calls[0].body.get(key).is_none(),
            "a booking update carries no contact field `{key}`"
        );
    }
    assert_eq!(
        writes_for(&s, "TC-5")
            .iter()
            .filter(|(p, _)| p == "/contact")
            .count(),
        1,
        "the contact was written once, when the booking was new"
    );
    let c5 = s.airship.contact_by_email("ada5@example.org").unwrap();
    assert_eq!(
        c5["allow_email"], true,
        "consent is not touched by a booking update"
    );
    assert_eq!(c5["first_name"], "Ada5");
    assert_eq!(s.airship.booking("TC-5").unwrap().1["stage_value"], 550);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn times_are_right_on_both_sides_of_a_daylight_saving_change() {
    let s = sandbox().await;
    let env = setup(&s, "days_ahead = 5");
    // Oslo moves from UTC+1 to UTC+2 in the night of 29 March 2026.
    add(&s, 1, "Oslo Golf", "2026-03-28T18:00:00Z", &[]); // 19:00 CET
    add(&s, 2, "Oslo Golf", "2026-03-30T17:00:00Z", &[]); // 19:00 CEST
    add(&s, 3, "Oslo Golf", "2026-03-29T00:30:00Z", &[]); // 01:30 CET, before the change
    add(&s, 4, "Oslo Golf", "2026-03-29T01:30:00Z", &[]); // 03:30 CEST, after it
    add(&s, 5, "Oslo Golf", "2026-04-01T21:59:00Z", &[]); // 23:59 CEST 1 April: last day, in
    add(&s, 6, "Oslo Golf", "2026-04-01T22:00:00Z", &[]); // 00:00 CEST 2 April: out
    s.ticketco.update_item("TC-2", |b| {
        b["transaction_datestamp"] = json!("2026-03-30T08:00:00+00:00")
    });
    // 03:00 CET on 27 March: "today" is the 27th, the window 26 March – 1 April.
    let text = ok(&run(&env, "2026-03-27T02:00:00Z"));
    assert!(text.contains("created 5"), "{text}");
    let dt = |r: &str| {
        s.airship.booking(r).unwrap().1["party_datetime"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(dt("TC-1"), "2026-03-28 19:00:00");
    assert_eq!(dt("TC-2"), "2026-03-30 19:00:00");
    assert_eq!(dt("TC-3"), "2026-03-29 01:30:00");
    assert_eq!(dt("TC-4"), "2026-03-29 03:30:00");
    assert_eq!(dt("TC-5"), "2026-04-01 23:59:00");
    assert!(s.airship.booking("TC-6").is_none());
    assert_eq!(
        s.airship.booking("TC-2").unwrap().1["party_enquirytime"],
        "2026-03-30 10:00:00"
    );
    assert_eq!(
        s.airship.booking("TC-1").unwrap().1["party_enquirytime"],
        "2026-05-02 16:01:42"
    );
    // After the change, 03:00 CEST is 01:00 UTC: "today" is then the 30th.
    add(&s, 7, "Oslo Golf", "2026-04-04T10:00:00+02:00", &[]);
    let text = ok(&run(&env, "2026-03-30T01:00:00Z"));
    assert!(
        text.contains("created 2, updated 0"),
        "TC-6 and TC-7 now in the window: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_airship_422_or_a_venue_without_unit_stops_nothing_else_and_is_retried() {
    let s = sandbox().await;
    let env = setup(&s, "");
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        cfg.replace(
            "\"Bergen Bowling\", ",
            "\"Bergen Bowling\", \"Stavanger Spa\", ",
        ),
    )
    .unwrap();
    add(&s, 20, "Stavanger Spa", "2026-06-12T19:00:00+02:00", &[]);
    for id in 1..=4 {
        add(
            &s,
            id,
            "Oslo Golf",
            &format!("2026-06-1{id}T19:00:00+02:00"),
            &[],
        );
        s.ticketco.add_item(item(
            &format!("TC-{id}{id}"),
            id,
            &format!("2026-06-1{id}T19:00:00+02:00"),
        ));
    }
    add(&s, 9, "Nowhere Hall", "2026-06-12T19:00:00+02:00", &[]);
    s.airship.reject_booking("TC-2", 422);
    let out = run(&env, "2026-06-10T01:00:00Z");
    let text = stdout(&out);
    assert!(
        !out.status.success(),
        "a refused booking makes the run end as refused: {text}"
    );
    assert!(text.contains("refused"), "{text}");
    assert!(
        text.contains("booking TC-2: POST /airship/contact: HTTP 422"),
        "{text}"
    );
    assert!(
        text.contains("venue \"Stavanger Spa\" has no Airship unit"),
        "{text}"
    );
    let mut refs: Vec<String> = s.airship.creations().keys().cloned().collect();
    refs.sort();
    assert_eq!(
        refs,
        vec!["TC-1", "TC-11", "TC-22", "TC-3", "TC-33", "TC-4", "TC-44"]
    );
    let db = env.db_path();
    assert_eq!(
        query_i64(&db, "SELECT COUNT(*) FROM ledger WHERE key = 'TC-2'"),
        0,
        "a refused booking is not marked as sent"
    );
    assert_eq!(query_i64(&db, "SELECT COUNT(*) FROM dead_letters"), 0);

    // Next run: Airship accepts it (and the spa got its unit); nothing else is written again.
    s.airship.clear_rejects();
    s.airship.add_unit(4, "Stavanger Spa");
    let before = s.airship.calls().len();
    let text = ok(&run(&env, "2026-06-10T02:00:00Z"));
    assert!(text.contains("created 2, updated 0"), "{text}");
    let mut new: Vec<Value> = s.airship.calls()[before..]
        .iter()
        .filter(|c| c.path == "/contact")
        .map(|c| c.body["bookings"][0]["booking_reference"].clone())
        .collect();
    new.sort_by_key(|v| v.to_string());
    assert_eq!(new, vec![json!("TC-2"), json!("TC-20")]);
    assert_eq!(s.airship.booking("TC-20").unwrap().1["unit_id"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_ticketco_page_skips_only_its_event_until_the_next_run() {
    let s = sandbox().await;
    let env = setup(&s, "");
    for id in 1..=3 {
        add(
            &s,
            id,
            "Oslo Golf",
            &format!("2026-06-1{id}T19:00:00+02:00"),
            &[],
        );
    }
    // The first item page asked for comes back as HTML (a 200 that is not JSON).
    s.ticketco.faults.push("ticketco.items", Fault::Html, 1);
    let out = run(&env, "2026-06-10T01:00:00Z");
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("malformed page"), "{text}");
    assert!(
        text.contains("GET /ticketco/item_grosses: malformed"),
        "the call is named without its query: {text}"
    );
    let sent: Vec<String> = s.airship.creations().keys().cloned().collect();
    assert_eq!(
        sent.len(),
        2,
        "the two other events' bookings went: {sent:?}"
    );
    let missing = ["TC-1", "TC-2", "TC-3"]
        .into_iter()
        .find(|r| !sent.iter().any(|x| x == r))
        .unwrap();
    let event = missing.trim_start_matches("TC-");
    assert!(
        text.contains(&format!("event {event} (Event {event})")),
        "{text}"
    );
    let db = env.db_path();
    assert_eq!(
        query_i64(
            &db,
            &format!("SELECT COUNT(*) FROM ledger WHERE key = '{missing}'")
        ),
        0
    );
    let text = ok(&run(&env, "2026-06-10T02:00:00Z"));
    assert!(text.contains("created 1, updated 0"), "{text}");
    assert!(s.airship.booking(missing).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unchanged_event_is_skipped_whole_until_a_line_or_the_mapping_changes() {
    let s = sandbox().await;
    let env = setup(&s, "");
    for id in 1..=3 {
        add(&s, id, "Oslo Golf", "2026-06-12T19:00:00+02:00", &[]);
    }
    s.ticketco
        .add_item(item("TC-100", 1, "2026-06-12T19:00:00+02:00"));
    let db = env.db_path();
    let digests = || query_i64(&db, "SELECT COUNT(*) FROM page_digests");
    let text = ok(&run(&env, "2026-06-10T01:00:00Z"));
    assert!(text.contains("created 4, updated 0"), "{text}");
    assert_eq!(digests(), 3, "one digest per event, each settled");

    // The same pages: every event is skipped whole, nothing is written.
    let writes = s.airship.writes();
    let text = ok(&run(&env, "2026-06-10T02:00:00Z"));
    assert!(
        text.contains("pulled 4, created 0, updated 0, skipped 4"),
        "{text}"
    );
    assert_eq!(s.airship.writes(), writes);

    // One line changes: its booking (only) is updated.
    assert!(
        s.ticketco
            .update_item("TC-2", |i| i["status"] = json!("cancelled"))
    );
    let text = ok(&run(&env, "2026-06-10T03:00:00Z"));
    assert!(text.contains("created 0, updated 1, skipped 3"), "{text}");
    let updates: Vec<(String, Value)> = writes_for(&s, "TC-2")
        .into_iter()
        .filter(|(path, _)| path == "/booking/update")
        .collect();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].1["stage_value"], 550);

    // A mapping that shapes every booking changes: every event is looked at again, and the
    // bookings it changes are updated.
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        cfg.replace(
            "types = { ticket = 9 }",
            "types = { ticket = 9 }\nstages = { paid = 7 }",
        ),
    )
    .unwrap();
    let text = ok(&run(&env, "2026-06-10T04:00:00Z"));
    assert!(text.contains("created 0, updated 3, skipped 1"), "{text}");
    assert_eq!(s.airship.booking("TC-100").unwrap().1["stage_value"], 7);

    // A cursor reset forgets the digests: the next run checks every line against the
    // ledger again, and still writes nothing.
    let out = env.cli(&["cursor", "reset", "bookings"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(digests(), 0);
    let writes = s.airship.writes();
    let text = ok(&run(&env, "2026-06-10T05:00:00Z"));
    assert!(text.contains("created 0, updated 0, skipped 4"), "{text}");
    assert_eq!(s.airship.writes(), writes);
    assert_eq!(digests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_run_then_rerun_sends_each_booking_once() {
    let s = sandbox().await;
    let env = setup(&s, "");
    s.ticketco.generate(
        30,
        3000,
        "2026-06-10".parse().unwrap(),
        20,
        &["Oslo Golf", "Bergen Bowling"],
        "+02:00",
    );
    // Slow Airship down a little so that the kill lands mid-run.
    s.airship
        .faults
        .push("airship", Fault::Slow(Duration::from_millis(5)), 3000);
    let mut child = Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(["trigger", "bookings"])
        .env("USHER_TEST_NOW", "2026-06-10T01:00:00Z")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || s.airship.writes() >= 600),
        "writes: {}",
        s.airship.writes()
    );
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let written = s.airship.writes();
    assert!(written < 3000, "the kill landed mid-run ({written} writes)");
    s.airship.faults.clear();
    let text = ok(&run(&env, "2026-06-10T01:10:00Z"));
    assert!(text.contains("pulled 3000"), "{text}");
    let creations = s.airship.creations();
    assert_eq!(creations.len(), 3000, "every booking reached Airship");
    assert!(
        creations.values().all(|n| *n == 1),
        "no booking was created twice"
    );
    assert_eq!(s.airship.booking_count(), 3000);
    assert_eq!(s.airship.contacts().len(), 3000, "no contact twice");
    // Resent after the kill: at most the batch in flight (500 lines and the rest of the
    // page that reached 500: here pages of 100).
    assert!(
        s.airship.writes() - 3000 <= 600,
        "resent {}",
        s.airship.writes() - 3000
    );
    let db = env.db_path();
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM ledger WHERE target_ids IS NOT NULL"
        ),
        3000
    );
    let w = s.airship.writes();
    let text = ok(&run(&env, "2026-06-10T01:20:00Z"));
    assert!(
        text.contains("created 0, updated 0, skipped 3000"),
        "{text}"
    );
    assert_eq!(s.airship.writes(), w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_from_applies_to_the_first_run_then_usher_backfill_goes_further() {
    let s = sandbox().await;
    let env = setup(&s, "backfill_from = \"2026-05-01\"");
    add(&s, 1, "Oslo Golf", "2026-04-15T19:00:00+02:00", &[]);
    add(&s, 2, "Oslo Golf", "2026-05-03T19:00:00+02:00", &[]);
    add(&s, 3, "Oslo Golf", "2026-06-12T19:00:00+02:00", &[]);
    let text = ok(&run(&env, "2026-06-10T01:00:00Z"));
    assert!(text.contains("created 2"), "first run: from 1 May: {text}");
    assert!(s.airship.booking("TC-2").is_some() && s.airship.booking("TC-1").is_none());
    // Not again: a change to May's booking is not seen by a daily run.
    s.ticketco
        .update_item("TC-2", |b| b["status"] = json!("no_show"));
    add(&s, 4, "Oslo Golf", "2026-05-04T19:00:00+02:00", &[]);
    let text = ok(&run(&env, "2026-06-11T01:00:00Z"));
    assert!(text.contains("pulled 1, created 0, updated 0"), "{text}");
    // A one-off backfill from April.
    let out = env.cli_at(
        "2026-06-11T02:00:00Z",
        &["backfill", "bookings", "--from", "2026-04-01"],
    );
    let text = ok(&out);
    assert!(
        text.contains("created 2, updated 1"),
        "TC-1 and TC-4 new, TC-2 updated: {text}"
    );
    let (_, b2) = s.airship.booking("TC-2").unwrap();
    assert_eq!(
        b2["stage_value"], 1,
        "no stage is configured for no_show: Airship keeps the last one"
    );
    assert!(s.airship.booking("TC-1").is_some() && s.airship.booking("TC-4").is_some());
    assert!(!text.contains(TC_TOKEN));
    let out = env.cli(&["backfill", "bookings", "--from", "April"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validate_online_reports_a_venue_without_unit_and_bad_tokens_without_showing_them() {
    let s = sandbox().await;
    let env = setup(&s, "");
    let out = env.cli(&["validate", "--online"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("venue \"Oslo Golf\" → Airship unit 1"),
        "{text}"
    );
    assert!(
        text.contains("venue \"Trondheim Padel\" → Airship unit 3"),
        "{text}"
    );
    let status = stdout(&env.cli(&["status"]));
    assert!(
        status.contains("cron \"0 3 * * *\" Europe/Oslo"),
        "daily at 03:00 local by default: {status}"
    );

    let env = setup(&s, "");
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        cfg.replace(
            "\"Bergen Bowling\", ",
            "\"Bergen Bowling\", \"Stavanger Spa\", ",
        ),
    )
    .unwrap();
    env.write_secret("ticketco-token", "wrong-TOKEN-value");
    let out = env.cli(&["validate", "--online"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("venue \"Stavanger Spa\" has no Airship unit"),
        "{text}"
    );
    assert!(
        text.contains("connection \"tc\" (ticketco): wrong credentials"),
        "{text}"
    );
    assert!(
        text.contains("connection \"air\" (airship): valid"),
        "{text}"
    );
    assert!(!text.contains("wrong-TOKEN-value") && !stderr(&out).contains("wrong-TOKEN-value"));

    // A run with the wrong token names the call, never the token.
    let out = run(&env, "2026-06-10T01:00:00Z");
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("credentials refused") && text.contains("GET /ticketco/events"),
        "{text}"
    );
    assert!(!text.contains("wrong-TOKEN-value"));
    if common::postgres().is_none() {
        let db = std::fs::read(env.db_path()).unwrap();
        assert!(!String::from_utf8_lossy(&db).contains("wrong-TOKEN-value"));
    }
    assert!(s.ticketco.requests_with_token() > 0);
}

/// `usher status --json`'s entry for the stream.
fn status_json(env: &Env) -> Value {
    let out = env.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all: Value = serde_json::from_str(&stdout(&out)).unwrap();
    all["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "bookings")
        .cloned()
        .unwrap()
}

/// The text `usher status` line of the stream.
fn status_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("bookings "))
        .unwrap_or_else(|| panic!("no line for the stream: {text}"))
        .to_string()
}

fn first_run_done(env: &Env) -> bool {
    query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM cursors WHERE stream = 'bookings' AND cursor LIKE 'first run done%'",
    ) == 1
}

fn owed(env: &Env) -> i64 {
    query_i64(
        &env.db_path(),
        "SELECT COUNT(*) FROM owed WHERE stream = 'bookings'",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_booking_refused_on_the_backfill_stays_owed_and_the_backfill_is_not_done_until_it_goes() {
    let s = sandbox().await;
    let env = setup(&s, "backfill_from = \"2026-06-01\"");
    // "today" is 10 June; TC-1's attendance was two days ago, inside `backfill_from`.
    add(&s, 1, "Oslo Golf", "2026-06-08T19:00:00+02:00", &[]);
    add(&s, 2, "Oslo Golf", "2026-06-12T19:00:00+02:00", &[]);
    s.airship.reject_booking("TC-1", 422);
    let out = run(&env, "2026-06-10T01:00:00Z");
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("booking TC-1: POST /airship/contact: HTTP 422"),
        "{text}"
    );
    assert!(s.airship.booking("TC-2").is_some());
    assert!(
        !first_run_done(&env),
        "a backfill with a booking still owed is not done"
    );
    assert_eq!(owed(&env), 1);

    // `status` shows what is owed, and the run as refused.
    let text = stdout(&env.cli(&["status"]));
    assert!(status_line(&text).contains(" refused "), "{text}");
    assert!(
        text.contains("bookings: 1 record(s) owed since")
            && text.contains("last: booking TC-1: POST /airship/contact: HTTP 422"),
        "{text}"
    );
    let st = status_json(&env);
    assert_eq!(st["owed"]["records"], 1, "{st}");
    assert_eq!(st["owed"]["attempts"], 1, "{st}");
    assert!(
        st["owed"]["last_reason"]
            .as_str()
            .unwrap()
            .contains("booking TC-1"),
        "{st}"
    );
    assert_eq!(st["last_run"]["outcome"], "refused");

    // A day later Airship takes it: nothing owed, the backfill done.
    s.airship.clear_rejects();
    let text = ok(&run(&env, "2026-06-11T01:00:00Z"));
    assert!(text.contains("created 1"), "{text}");
    assert_eq!(s.airship.creations().get("TC-1"), Some(&1));
    assert_eq!(owed(&env), 0);
    assert!(first_run_done(&env));
    let st = status_json(&env);
    assert_eq!(st["owed"]["records"], 0, "{st}");
    assert_eq!(st["last_error"], Value::Null, "{st}");
    let text = stdout(&env.cli(&["status"]));
    assert!(status_line(&text).contains(" ok "), "{text}");
    assert!(!text.contains("owed"), "{text}");

    // The backfill is not done again: an older event is not picked up by a daily run.
    add(&s, 3, "Oslo Golf", "2026-06-03T19:00:00+02:00", &[]);
    ok(&run(&env, "2026-06-12T01:00:00Z"));
    assert!(s.airship.booking("TC-3").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_booking_is_tried_again_after_its_event_left_the_window() {
    let s = sandbox().await;
    let env = setup(&s, "");
    add(&s, 9, "Oslo Golf", "2026-06-09T19:00:00+02:00", &[]); // yesterday
    add(&s, 10, "Oslo Golf", "2026-06-15T19:00:00+02:00", &[]);
    s.airship.reject_booking("TC-9", 422);
    let out = run(&env, "2026-06-10T01:00:00Z");
    assert!(!out.status.success(), "{}", stdout(&out));
    let tries = || writes_for(&s, "TC-9").len();
    assert_eq!(tries(), 1);

    // Two days later the event is out of the window; the booking is still tried, and
    // still refused: the run is refused, not ok.
    let out = run(&env, "2026-06-12T01:00:00Z");
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(tries(), 2, "the owed booking was tried again");
    assert_eq!(owed(&env), 1);
    let text = stdout(&env.cli(&["status"]));
    assert!(status_line(&text).contains(" refused "), "{text}");
    assert!(text.contains("bookings: 1 record(s) owed since"), "{text}");
    let st = status_json(&env);
    assert_eq!(st["owed"]["attempts"], 2, "{st}");
    assert!(
        st["last_error"].as_str().unwrap().contains("booking TC-9"),
        "{st}"
    );

    // The day after, Airship takes it.
    s.airship.clear_rejects();
    let text = ok(&run(&env, "2026-06-13T01:00:00Z"));
    assert!(text.contains("created 1, updated 0"), "{text}");
    assert_eq!(s.airship.creations().get("TC-9"), Some(&1));
    assert_eq!(
        s.airship.booking("TC-9").unwrap().1["party_datetime"],
        "2026-06-09 19:00:00"
    );
    assert_eq!(owed(&env), 0);
    let st = status_json(&env);
    assert_eq!(
        st["last_error"],
        Value::Null,
        "the last run ended well: {st}"
    );
    assert_eq!(st["last_outcome"], "ok", "{st}");
    let text = stdout(&env.cli(&["status"]));
    assert!(status_line(&text).contains(" ok "), "{text}");
    assert!(!text.contains("TC-9"), "no old error shown: {text}");
    // Nothing is owed now: the next run does not look for it.
    ok(&run(&env, "2026-06-14T01:00:00Z"));
    assert_eq!(tries(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_not_read_whole_or_without_unit_stays_owed_whole_whatever_its_date() {
    let s = sandbox().await;
    let env = setup(&s, "");
    let cfg = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        cfg.replace(
            "\"Bergen Bowling\", ",
            "\"Bergen Bowling\", \"Stavanger Spa\", ",
        ),
    )
    .unwrap();
    add(&s, 1, "Oslo Golf", "2026-06-09T19:00:00+02:00", &[]); // yesterday
    add(&s, 2, "Stavanger Spa", "2026-06-09T20:00:00+02:00", &[]); // no unit yet
    // Event 1's booking page comes back as HTML (event 2 is not read: no unit).
    s.ticketco.faults.push("ticketco.items", Fault::Html, 1);
    let out = run(&env, "2026-06-10T01:00:00Z");
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(s.airship.creations().is_empty());
    let st = status_json(&env);
    assert_eq!(st["owed"]["records"], 2, "{st}");
    let db = env.db_path();
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM owed WHERE key IN ('event:1', 'event:2')"
        ),
        2
    );

    // Two days later (both events out of the window) the page reads well and the spa has
    // its unit: both bookings go, nothing is owed.
    s.airship.add_unit(4, "Stavanger Spa");
    let text = ok(&run(&env, "2026-06-12T01:00:00Z"));
    assert!(text.contains("created 2, updated 0"), "{text}");
    assert_eq!(s.airship.booking("TC-2").unwrap().1["unit_id"], 4);
    assert!(s.airship.booking("TC-1").is_some());
    assert_eq!(owed(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_run_leaves_its_window_owed_so_yesterdays_changes_are_not_skipped() {
    let s = sandbox().await;
    let env = setup(&s, "");
    add(&s, 5, "Oslo Golf", "2026-06-10T19:00:00+02:00", &[]); // today
    ok(&run(&env, "2026-06-10T01:00:00Z"));
    // That evening TC-5 is cancelled; the next night Airship is down, and the run fails.
    assert!(
        s.ticketco
            .update_item("TC-5", |b| b["status"] = json!("cancelled"))
    );
    s.airship.faults.push("airship", Fault::Status(503), 50);
    let out = run(&env, "2026-06-11T01:00:00Z");
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(
        status_json(&env)["last_run"]["outcome"],
        "failed",
        "Airship down"
    );
    s.airship.faults.clear();
    // The night after, 10 June is no longer "yesterday", but its run never finished.
    let text = ok(&run(&env, "2026-06-12T01:00:00Z"));
    assert!(text.contains("updated 1"), "{text}");
    assert_eq!(s.airship.booking("TC-5").unwrap().1["stage_value"], 550);
    assert_eq!(owed(&env), 0);
    let st = status_json(&env);
    assert_eq!(st["last_error"], Value::Null, "{st}");
}

#[test]
fn a_stream_without_timezone_is_refused_naming_the_key() {
    let env = Env::new();
    env.write_secret("ticketco-token", TC_TOKEN);
    env.write_secret("airship-token", AIR_TOKEN);
    let conf = |schedule: &str| {
        format!(
            r#"
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
{schedule}

[streams.bookings.airship]
venues = ["Oslo Golf"]
"#
        )
    };
    for schedule in ["", "cron = \"0 3 * * *\"", "every = \"6h\""] {
        env.write_config(&conf(schedule));
        let out = env.cli(&["validate"]);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert_eq!(out.status.code(), Some(78), "{schedule}: {text}");
        assert!(
            text.contains("streams.bookings.timezone") && text.contains("missing key `timezone`"),
            "{schedule}: {text}"
        );
        assert!(text.contains("daylight saving"), "{text}");
        let out = env.cli(&["run"]);
        assert_eq!(out.status.code(), Some(78), "`usher run` refuses it too");
    }
    // With the venues' zone, any schedule is valid (an interval one included).
    env.write_config(&conf("every = \"6h\"\ntimezone = \"Europe/Oslo\""));
    let out = env.cli(&["validate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_the_last_runs_outcome_and_error_never_an_older_one() {
    let s = sandbox().await;
    let env = setup(&s, "");
    add(&s, 1, "Oslo Golf", "2026-06-12T19:00:00+02:00", &[]);
    s.airship.faults.push("airship", Fault::Status(503), 50);
    let out = run(&env, "2026-06-10T01:00:00Z");
    assert!(!out.status.success(), "{}", stdout(&out));
    let st = status_json(&env);
    assert!(st["last_error"].as_str().unwrap().contains("503"), "{st}");
    let text = stdout(&env.cli(&["status"]));
    assert!(status_line(&text).contains(" failed "), "{text}");
    assert!(
        text.contains("! bookings: ") && text.contains("503"),
        "{text}"
    );

    s.airship.faults.clear();
    ok(&run(&env, "2026-06-10T02:00:00Z"));
    let st = status_json(&env);
    assert_eq!(st["last_run"]["outcome"], "ok", "{st}");
    assert_eq!(
        st["last_error"],
        Value::Null,
        "the last run ended well: no error from an older run: {st}"
    );
    let text = stdout(&env.cli(&["status"]));
    assert!(status_line(&text).contains(" ok "), "{text}");
    assert!(!text.contains("503"), "{text}");
    assert_eq!(st["last_outcome"], "ok", "{st}");
}
