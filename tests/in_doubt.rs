//! Writes in doubt (issue 23), the real binary against fakes whose target holds a create
//! and carries it out late, whether or not usher is still there: a SIGKILL while the create
//! is in flight, then a restart at once, creates nothing twice; a create whose answer is
//! lost to a client timeout is resolved in the same run without a second create. For every
//! stream kind that creates once: Halo users, S-360 contacts, S-360 orders.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, query_i64, stdout};
use serde_json::Value;
use usher_sandbox::s360::{DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET};
use usher_sandbox::{Fault, Sandbox};

async fn sandbox() -> Sandbox {
    Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The target holds the first create this long before carrying it out.
const LATE: Duration = Duration::from_secs(4);

/// `[daemon]` with a settle margin of 3 s; the target connections time out after 2 or 3 s,
/// so a create is in doubt until 5 or 6 s after it left: the late one (4 s) lands inside.
fn daemon_table(env: &Env) -> String {
    format!(
        "[daemon]\nstate_dir = {:?}\ncontrol_poll = \"500ms\"\nsettle_margin = \"3s\"\n",
        env.state_dir().display().to_string()
    )
}

fn halo_config(env: &Env, s: &Sandbox, timeout: &str) -> String {
    env.write_secret("sg-secret", "sg-demo-secret");
    env.write_secret("halo-secret", "halo-demo-secret");
    format!(
        r#"{daemon}
[connections.seatgeek]
kind = "seatgeek"
base_url = "{sg}"
client_id = "usher-demo"
client_secret_file = "sg-secret"

[connections.halo]
kind = "halo"
base_url = "{halo}"
tenant = "demo"
client_id = "usher-demo"
client_secret_file = "halo-secret"
timeout = "{timeout}"

[streams.sg]
source = "seatgeek"
entity = "user"
target = "halo"
every = "1h"
page_size = 1000

[streams.sg.halo]
default_site = 18
id_field = "custom:CFSeatGeekId"
batch_size = 100
"#,
        daemon = daemon_table(env),
        sg = s.url("seatgeek"),
        halo = s.url("halo"),
    )
}

fn s360_config(env: &Env, s: &Sandbox, entity: &str, timeout: &str) -> String {
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    format!(
        r#"{daemon}
[connections.s360]
kind = "s360"
base_url = "{s360}/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
timeout = "{timeout}"

[connections.crm]
kind = "crm"
base_url = "{crm}"

[streams.push]
source = "crm"
entity = "{entity}"
target = "s360"
every = "1h"
page_size = 50
"#,
        daemon = daemon_table(env),
        s360 = s.url("s360"),
        crm = s.url("crm"),
    )
}

/// `usher trigger STREAM` as a child process (no daemon runs: it takes the lock itself).
fn spawn_trigger(env: &Env, stream: &str) -> Child {
    let log = std::fs::File::create(env.dir.path().join(format!(
        "trigger-{}.log",
        Instant::now().elapsed().as_nanos()
    )))
    .unwrap();
    Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(["trigger", stream])
        .env("RUST_LOG", "usher=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits until the late create of a run started at `started` has surely been carried out.
async fn settle_fakes(started: Instant) {
    let until = started + LATE + Duration::from_millis(1500);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
}

/// Starts a trigger, SIGKILLs it 1.5 s later (the late create is in flight), then runs a
/// second trigger at once and returns its exit code, output and wall time.
fn kill_during_create_then_trigger(env: &Env, stream: &str) -> (i32, String, Duration) {
    let mut first = spawn_trigger(env, stream);
    std::thread::sleep(Duration::from_millis(1500));
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let t = Instant::now();
    let out = env.cli(&["trigger", stream]);
    let took = t.elapsed();
    let text = format!("{}{}", stdout(&out), common::stderr(&out));
    (out.status.code().unwrap_or(-1), text, took)
}

fn halo_ids_per_sg(s: &Sandbox) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for u in s.halo.users() {
        let sg = u["customfields"]
            .as_array()
            .and_then(|cfs| {
                cfs.iter()
                    .find(|c| c["name"] == "CFSeatGeekId")
                    .and_then(|c| c["value"].as_str().map(str::to_string))
            })
            .expect("every user usher made carries its SeatGeek ID");
        *out.entry(sg).or_insert(0) += 1;
    }
    out
}

fn assert_no_twins(per_key: &HashMap<String, usize>, expected: usize, what: &str) {
    let twins: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twins.is_empty(), "{what} created twice: {twins:?}");
    assert_eq!(per_key.len(), expected, "every {what} present once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_halo_create_still_being_saved_at_a_kill_is_not_created_again() {
    let s = sandbox().await;
    s.seatgeek.add_generated(100, 100, 7);
    s.halo.faults.push("halo.users.post", Fault::Late(LATE), 1);
    let env = Env::new();
    env.write_config(&halo_config(&env, &s, "3s"));
    let (code, text, took) = kill_during_create_then_trigger(&env, "sg");
    // Let the dead process's create finish on Halo's side before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(code, 0, "{text}");
    assert_no_twins(&halo_ids_per_sg(&s), 100, "Halo user");
    assert!(
        text.contains("writes of an earlier run may still land"),
        "the restarted run waited for the create to settle: {text}"
    );
    // The restart pays at most one timeout (3 s) plus the margin (3 s), not more.
    eprintln!("the restarted trigger took {took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}\n{text}");
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM links WHERE stream = 'sg'"
        ),
        100
    );
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM in_doubt"),
        0,
        "nothing left in doubt after a run that saw every answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_halo_create_whose_answer_times_out_is_resolved_in_the_same_run() {
    let s = sandbox().await;
    s.seatgeek.add_generated(100, 100, 8);
    s.halo.faults.push("halo.users.post", Fault::Late(LATE), 1);
    let env = Env::new();
    // Halo answers after 4 s; usher gives up after 2 s and waits until 2 + 3 s have passed.
    env.write_config(&halo_config(&env, &s, "2s"));
    let started = Instant::now();
    let out = env.cli(&["trigger", "sg"]);
    let text = format!("{}{}", stdout(&out), common::stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    settle_fakes(started).await;
    assert_no_twins(&halo_ids_per_sg(&s), 100, "Halo user");
    let (posts, _) = s.halo.post_stats();
    assert_eq!(
        posts, 1,
        "the late POST was found by the SeatGeek ID, not sent again"
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT created FROM runs WHERE stream = 'sg' ORDER BY id DESC LIMIT 1"
        ),
        100
    );
    assert!(text.contains("finding out what Halo saved"), "{text}");
}

fn s360_contacts_per_email(s: &Sandbox) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for c in s.s360.contacts() {
        let e = c["individualContact"]["email"]
            .as_str()
            .unwrap_or("")
            .to_lowercase();
        *out.entry(e).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s360_contact_create_in_flight_at_a_kill_is_not_created_again() {
    let s = sandbox().await;
    s.crm.add_contacts(5);
    s.s360
        .faults
        .push("s360.api:saveIndividualContactData", Fault::Late(LATE), 1);
    let env = Env::new();
    env.write_config(&s360_config(&env, &s, "contact", "3s"));
    let (code, text, _) = kill_during_create_then_trigger(&env, "push");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(code, 0, "{text}");
    assert_no_twins(&s360_contacts_per_email(&s), 5, "S-360 contact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s360_contact_create_whose_answer_times_out_is_resolved_in_the_same_run() {
    let s = sandbox().await;
    s.crm.add_contacts(5);
    s.s360
        .faults
        .push("s360.api:saveIndividualContactData", Fault::Late(LATE), 1);
    let env = Env::new();
    env.write_config(&s360_config(&env, &s, "contact", "2s"));
    let started = Instant::now();
    let out = env.cli(&["trigger", "push"]);
    let text = format!("{}{}", stdout(&out), common::stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    settle_fakes(started).await;
    assert_no_twins(&s360_contacts_per_email(&s), 5, "S-360 contact");
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM links WHERE stream = 'push'"
        ),
        5
    );
}

fn orders_per_reference(s: &Sandbox) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for o in s.s360.orders() {
        *out.entry(o.external_reference.clone().unwrap_or_default())
            .or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s360_order_in_flight_at_a_kill_is_not_ordered_again() {
    let s = sandbox().await;
    s.crm.add_offers(3);
    s.s360
        .faults
        .push("s360.api:createOrUpdateOrder", Fault::Late(LATE), 1);
    let env = Env::new();
    env.write_config(&s360_config(&env, &s, "offer", "3s"));
    let (code, text, _) = kill_during_create_then_trigger(&env, "push");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(code, 0, "{text}");
    assert_no_twins(&orders_per_reference(&s), 3, "S-360 order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s360_order_whose_answer_times_out_is_resolved_in_the_same_run() {
    let s = sandbox().await;
    s.crm.add_offers(3);
    s.s360
        .faults
        .push("s360.api:createOrUpdateOrder", Fault::Late(LATE), 1);
    let env = Env::new();
    env.write_config(&s360_config(&env, &s, "offer", "2s"));
    let started = Instant::now();
    let out = env.cli(&["trigger", "push"]);
    let text = format!("{}{}", stdout(&out), common::stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}");
    settle_fakes(started).await;
    assert_no_twins(&orders_per_reference(&s), 3, "S-360 order");
}

/// `usher status` says that the stream waits for an unanswered write, while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_says_a_stream_waits_for_an_unanswered_write() {
    let s = sandbox().await;
    s.seatgeek.add_generated(50, 50, 9);
    s.halo
        .faults
        .push("halo.users.post", Fault::Late(Duration::from_secs(6)), 1);
    let env = Env::new();
    let cfg =
        halo_config(&env, &s, "2s").replace("settle_margin = \"3s\"", "settle_margin = \"6s\"");
    env.write_config(&cfg);
    let mut run = spawn_trigger(&env, "sg");
    // The POST times out at 2 s; the run then waits until 2 + 6 s.
    let mut seen = String::new();
    let ok = common::wait_until(Duration::from_secs(7), || {
        let out = env.cli(&["status"]);
        seen = stdout(&out);
        seen.contains("waiting") && seen.contains("unanswered write to settle")
    });
    assert!(ok, "status during the wait:\n{seen}");
    let status = run.wait().unwrap();
    assert!(status.success());
    let per: HashMap<String, usize> = halo_ids_per_sg(&s);
    assert!(per.values().all(|n| *n == 1), "{per:?}");
    let v: Value = serde_json::from_str(&stdout(&env.cli(&["status", "--json"]))).unwrap();
    assert!(
        v.to_string().contains("\"in_doubt\":null") || !v.to_string().contains("settle"),
        "nothing in doubt after the run: {v}"
    );
}
