//! Hard-bounce tests (after Kafka Connect's): for every stream kind, sources carrying
//! sequence numbers, the real binary killed with SIGKILL at random moments (seeded; some
//! restarts with no pause; the target slowed so that kills land while its answers are in
//! flight, between an answer and the commit), many times in a row, then a run to the end.
//! Asserted: every record in the target, none twice, the cursor at the end, and the counts in
//! `runs` reconciling. Also the S-360 instance budget under every fault at once.
//!
//! CI runs `ROUNDS` rounds per stream kind with a fixed seed (printed); `SOAK_ROUNDS=N` runs
//! N rounds with a random seed (or `SOAK_SEED`). To add a stream kind: a `Kind` variant and
//! one arm in each `match` below (seed, config, slow, start, done, check, identity).

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Daemon, Env, query_i64, wait_until};
use serde_json::Value;
use usher_sandbox::callers::CallerCall;
use usher_sandbox::s360::{DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET, webhook_contact};
use usher_sandbox::{Fault, S360Sender, Sandbox};

const ROUNDS: u32 = 5;
const TC_TOKEN: &str = "tc-bounce-token";
const AIR_TOKEN: &str = "air-bounce-token";
const CDP_TOKEN: &str = "cdp-bounce-token";
const TENANT: &str = "9f0c3c9e-0000-4000-8000-000000000001";
const EVENT_TYPE: &str = "5b1c0d2e-0000-4000-8000-000000000002";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// S-360 → CRM relay: S-360's sender posts into usher's receiver (resending on
    /// anything but 200), usher forwards to a CRM webhook.
    Relay,
    CrmContactsToS360,
    CrmOffersToS360,
    TicketCoToAirship,
    CrmToCdp,
    /// SeatGeek user change events → Halo users (matching by the SeatGeek ID field).
    SeatGeekToHalo,
}

/// A seeded LCG (the same as tests/daemon.rs), so that a failure replays from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

fn soak() -> (u32, u64) {
    let rounds: u32 = std::env::var("SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if rounds > ROUNDS {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        } else {
            0xb0b5
        });
    (rounds, seed)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary: the daemon, or (Ticket Co → Airship, a daily run) one CLI trigger.
enum Proc {
    Daemon(Daemon),
    Cli(Child),
}

impl Proc {
    fn kill9(&mut self) {
        match self {
            Proc::Daemon(d) => d.kill9(),
            Proc::Cli(c) => {
                let _ = c.kill(); // SIGKILL
                let _ = c.wait();
            }
        }
    }
}

struct Case {
    kind: Kind,
    n: u64,
    s: Sandbox,
    env: Env,
    port: u16,
    sender: Option<tokio::task::JoinHandle<()>>,
}

const STREAM: &str = "bounce";

impl Case {
    async fn new(kind: Kind) -> Case {
        let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let env = Env::new();
        let port = free_port();
        let n = match kind {
            Kind::Relay => 600,
            Kind::CrmContactsToS360 => 120,
            Kind::CrmOffersToS360 => 80,
            Kind::TicketCoToAirship => 500,
            Kind::CrmToCdp => 1500,
            // Users; the feed holds three change events per user.
            Kind::SeatGeekToHalo => 400,
        };
        let mut c = Case {
            kind,
            n,
            s,
            env,
            port,
            sender: None,
        };
        c.seed();
        // Target writes time out after 2 s and stay in doubt 1 s more: a late answer
        // (`Fault::Late`, 1.5 s) lands inside that, and a restart waits at most ~3 s.
        let daemon = format!(
            "[daemon]\nstate_dir = {:?}\ncontrol_poll = \"500ms\"\nshutdown_timeout = \"20s\"\nsettle_margin = \"1s\"\n",
            c.env.state_dir().display().to_string()
        );
        c.env.write_config(&(daemon + &c.config()));
        c
    }

    fn seed(&mut self) {
        let s = &self.s;
        match self.kind {
            Kind::Relay => {} // the sender starts with the first daemon
            Kind::CrmContactsToS360 => s.crm.add_contacts(self.n),
            Kind::CrmOffersToS360 => s.crm.add_offers(self.n),
            Kind::TicketCoToAirship => {
                s.ticketco.require_token(TC_TOKEN);
                s.airship.require_token(AIR_TOKEN, 77);
                s.airship.add_unit(1, "Oslo Golf");
                s.airship.add_unit(2, "Bergen Bowling");
                s.ticketco.generate(
                    10,
                    self.n,
                    "2026-06-10".parse().unwrap(),
                    20,
                    &["Oslo Golf", "Bergen Bowling"],
                    "+02:00",
                );
            }
            Kind::SeatGeekToHalo => s.seatgeek.add_generated(self.n * 3, self.n as u32, 7),
            Kind::CrmToCdp => {
                s.crm.add_contacts(self.n);
                s.cdp.add_tenant(TENANT, CDP_TOKEN);
                s.cdp.add_event_type(EVENT_TYPE);
            }
        }
    }

    fn config(&self) -> String {
        let env = &self.env;
        let crm = self.s.url("crm");
        let s360 = |extra: &str| {
            env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
            format!(
                r#"
[connections.s360]
kind = "s360"
base_url = "{}/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
{extra}

[connections.crm]
kind = "crm"
base_url = "{crm}"
timeout = "2s"
"#,
                self.s.url("s360")
            )
        };
        match self.kind {
            Kind::SeatGeekToHalo => {
                env.write_secret("sg-secret", "sg-demo-secret");
                env.write_secret("halo-secret", "halo-demo-secret");
                format!(
                    r#"
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
timeout = "2s"

[streams.{STREAM}]
source = "seatgeek"
entity = "user"
target = "halo"
every = "1s"
jitter = "0s"
page_size = 60

[streams.{STREAM}.halo]
default_site = 18
id_field = "custom:CFSeatGeekId"
batch_size = 20
preload_max = 0
"#,
                    sg = self.s.url("seatgeek"),
                    halo = self.s.url("halo"),
                )
            }
            Kind::Relay => {
                s360("timeout = \"2s\"")
                    + &format!(
                        r#"
[receiver]
listen = "127.0.0.1:{port}"
max_body = "256KB"

[streams.{STREAM}]
source = "s360"
entity = "contacts"
target = "crm"
every = "1s"
jitter = "0s"
max_per_run = 500
max_per_payload = 50

[streams.{STREAM}.s360]
auth = {{ type = "bearer", token = "hook-token" }}

[streams.{STREAM}.webhook]
url = "/hooks/{{institution}}/contacts"
"#,
                        port = self.port
                    )
            }
            Kind::CrmContactsToS360 | Kind::CrmOffersToS360 => {
                let entity = if self.kind == Kind::CrmOffersToS360 {
                    "offer"
                } else {
                    "contact"
                };
                s360("timeout = \"2s\"")
                    + &format!(
                        r#"
[streams.{STREAM}]
source = "crm"
entity = "{entity}"
target = "s360"
every = "1s"
jitter = "0s"
page_size = 10
"#
                    )
            }
            Kind::TicketCoToAirship => {
                let tc = env.write_secret("ticketco-token", TC_TOKEN);
                let air = env.write_secret("airship-token", AIR_TOKEN);
                format!(
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
timeout = "2s"

[streams.{STREAM}]
source = "tc"
target = "air"
timezone = "Europe/Oslo"

[streams.{STREAM}.airship]
venues = ["Oslo Golf", "Bergen Bowling"]
"#,
                    tc_url = self.s.url("ticketco"),
                    air_url = self.s.url("airship"),
                    tc = tc.display().to_string(),
                    air = air.display().to_string(),
                )
            }
            Kind::CrmToCdp => {
                env.write_secret("cdp-token", CDP_TOKEN);
                format!(
                    r#"
[resellers.agency]
flags = ["cdp"]

[companies.venue-a]
reseller = "agency"
flags = ["cdp"]

[companies.venue-a.integrations.cdp]
enabled = true

[connections.crm]
kind = "crm"
base_url = "{crm}"

[connections.venue-a-cdp]
kind = "cdp"
company = "venue-a"
base_url = "{cdp}"
product_token_file = "cdp-token"
tenant_guid = "{TENANT}"
timeout = "2s"

[streams.{STREAM}]
source = "crm"
entity = "contact"
target = "venue-a-cdp"
every = "1s"
jitter = "0s"
page_size = 100
max_per_payload = 20
max_per_run = 100000

[streams.{STREAM}.cdp]
event_type_id = "{EVENT_TYPE}"

[streams.{STREAM}.mapping]
Email = "email | trim | lowercase | required"
ContactId = "id"
Seq = "seq"
"#,
                    cdp = self.s.url("cdp"),
                )
            }
        }
    }

    /// Slows the target down so that kills land while its answers are in flight; one write
    /// in four is held and carried out 1.5 s late whether or not usher is still there (a
    /// kill or a 2 s timeout then leaves it in doubt; it lands inside timeout + margin).
    /// Not for the CDP: its API has no way to recognise a repeat, so a write that lands
    /// after usher gave up on it and a resend are two events there (at-least-once).
    fn slow_target(&self) {
        let (faults, route, ms) = match self.kind {
            Kind::Relay => (&self.s.crm.faults, "crm.hook", 250),
            Kind::CrmContactsToS360 | Kind::CrmOffersToS360 => {
                (&self.s.s360.faults, "s360.api", 25)
            }
            Kind::TicketCoToAirship => (&self.s.airship.faults, "airship", 40),
            Kind::CrmToCdp => (&self.s.cdp.faults, "cdp.events", 100),
            Kind::SeatGeekToHalo => (&self.s.halo.faults, "halo.users.post", 60),
        };
        if self.kind == Kind::CrmToCdp {
            faults.push(route, Fault::Slow(Duration::from_millis(ms)), 100_000);
            return;
        }
        for _ in 0..25_000 {
            faults.push(route, Fault::Slow(Duration::from_millis(ms)), 3);
            faults.push(route, Fault::Late(Duration::from_millis(1500)), 1);
        }
    }

    fn clear_faults(&self) {
        self.s.crm.faults.clear();
        self.s.s360.faults.clear();
        self.s.airship.faults.clear();
        self.s.cdp.faults.clear();
        self.s.halo.faults.clear();
    }

    fn start(&mut self, round: u32) -> Proc {
        self.start_sender();
        self.spawn(round)
    }

    /// S-360's sender (the relay only), once.
    fn start_sender(&mut self) {
        if self.kind == Kind::Relay && self.sender.is_none() {
            // S-360's sender: payloads of 50, each resent until a 200, through every kill.
            let mut snd = S360Sender::new(&format!(
                "http://127.0.0.1:{}/s360/myvenue/contacts",
                self.port
            ));
            snd.auth = Some(("authorization".into(), "Bearer hook-token".into()));
            snd.tries = 100_000;
            snd.pause = Duration::from_millis(30);
            let records: Vec<Value> = (1..=self.n).map(webhook_contact).collect();
            // Payloads spread over time, so that kills land while S-360 posts too.
            self.sender = Some(tokio::spawn(async move {
                let (mut posts, mut resends) = (0, 0);
                for chunk in records.chunks(50) {
                    let rep = snd.send(chunk).await;
                    assert_eq!(rep.gave_up, 0);
                    posts += rep.posts;
                    resends += rep.resends;
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                eprintln!("sender: {posts} posts, {resends} resends");
            }));
        }
    }

    fn spawn(&self, round: u32) -> Proc {
        match self.kind {
            Kind::TicketCoToAirship => Proc::Cli(
                Command::new(common::bin())
                    .arg("--config")
                    .arg(self.env.config_path())
                    .args(["trigger", STREAM])
                    .env(
                        "USHER_TEST_NOW",
                        format!("2026-06-10T01:{:02}:00Z", round.min(59)),
                    )
                    .env_remove("RUST_LOG")
                    .stdin(Stdio::null())
                    .stdout(self.cli_log(round))
                    .stderr(self.cli_log(round))
                    .spawn()
                    .unwrap(),
            ),
            _ => Proc::Daemon(self.env.spawn_daemon()),
        }
    }

    /// Where a CLI run's output goes (appended; read back when a run fails).
    fn cli_log(&self, round: u32) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.env.dir.path().join(format!("cli-{round}.log")))
            .unwrap()
    }

    fn progress(&self) -> usize {
        match self.kind {
            Kind::Relay => self.s.crm.accepted_records().len(),
            Kind::CrmContactsToS360 => self.s.s360.contacts().len(),
            Kind::CrmOffersToS360 => self.s.s360.orders().len(),
            Kind::TicketCoToAirship => self.s.airship.booking_count(),
            Kind::CrmToCdp => self.s.cdp.events().len(),
            Kind::SeatGeekToHalo => self.s.halo.user_count(),
        }
    }

    fn cursor(&self) -> Option<String> {
        common::query_text(
            &self.env.db_path(),
            &format!("SELECT cursor FROM cursors WHERE stream = '{STREAM}'"),
        )
    }

    /// The stream has nothing left to do.
    fn done(&self) -> bool {
        let db = self.env.db_path();
        if common::postgres().is_none() && !db.exists() {
            return false;
        }
        match self.kind {
            Kind::Relay => {
                self.sender.as_ref().is_some_and(|h| h.is_finished())
                    && self.s.crm.accepted_records().len() as u64 >= self.n
                    && query_i64(&db, "SELECT COUNT(*) FROM outbox") == 0
            }
            Kind::CrmContactsToS360 => self.cursor() == Some(format!("c{}", self.n)),
            Kind::CrmOffersToS360 => self.cursor() == Some(format!("o{}", self.n)),
            Kind::TicketCoToAirship => unreachable!("a CLI run ends by itself"),
            // Caught up: every user in Halo and a completed run that found nothing new.
            Kind::SeatGeekToHalo => {
                self.s.halo.user_count() as u64 >= self.n
                    && query_i64(
                        &db,
                        &format!(
                            "SELECT COUNT(*) FROM runs WHERE stream = '{STREAM}' AND outcome = 'ok' AND pulled = 0"
                        ),
                    ) > 0
            }
            Kind::CrmToCdp => {
                self.cursor() == Some(format!("c{}", self.n))
                    && query_i64(&db, "SELECT COUNT(*) FROM outbox") == 0
            }
        }
    }

    /// Every record present once in the target, the cursor at the end.
    fn check(&self) {
        let n = self.n;
        let db = self.env.db_path();
        let once = |what: &str, keys: Vec<String>, expected: Vec<String>| {
            let mut seen: HashMap<String, u32> = HashMap::new();
            for k in keys {
                *seen.entry(k).or_default() += 1;
            }
            let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
            assert!(twice.is_empty(), "{what} twice: {twice:?}");
            let missing: Vec<_> = expected.iter().filter(|k| !seen.contains_key(*k)).collect();
            assert!(missing.is_empty(), "{what} missing: {missing:?}");
            assert_eq!(seen.len(), expected.len(), "{what}: nothing unexpected");
        };
        match self.kind {
            Kind::SeatGeekToHalo => {
                // One Halo user per SeatGeek ID, found by the field that holds it.
                let users = self.s.halo.users();
                let ids: Vec<String> = users
                    .iter()
                    .filter_map(|u| {
                        u["customfields"].as_array().and_then(|cfs| {
                            cfs.iter()
                                .find(|c| c["name"].as_str() == Some("CFSeatGeekId"))
                                .and_then(|c| c["value"].as_str().map(str::to_string))
                        })
                    })
                    .collect();
                assert_eq!(
                    ids.len(),
                    users.len(),
                    "every Halo user holds its SeatGeek ID"
                );
                once(
                    "Halo user",
                    ids,
                    (1..=n).map(|i| format!("SG-{i}")).collect(),
                );
                assert_eq!(
                    query_i64(&db, "SELECT COUNT(*) FROM links"),
                    n as i64,
                    "a link per user"
                );
            }
            Kind::Relay => {
                // "Twice" for a webhook: a redelivery must be a byte-identical resend (same
                // Idempotency-Key) of an earlier payload; the accepted set is complete.
                let got: Vec<String> = self
                    .s
                    .crm
                    .accepted_records()
                    .iter()
                    .map(|r| r["seq"].to_string())
                    .collect();
                once(
                    "relayed record",
                    got,
                    (1..=n).map(|i| i.to_string()).collect(),
                );
                identical_resends(&self.s);
                let max_id = query_i64(
                    &db,
                    &format!("SELECT MAX(id) FROM s360_inbox WHERE stream = '{STREAM}'"),
                );
                assert_eq!(self.cursor(), Some(max_id.to_string()), "cursor at the end");
            }
            Kind::CrmContactsToS360 => {
                let emails = self
                    .s
                    .s360
                    .contacts()
                    .iter()
                    .map(|c| {
                        c["individualContact"]["email"]
                            .as_str()
                            .unwrap_or("")
                            .trim()
                            .to_lowercase()
                    })
                    .collect();
                once(
                    "S-360 contact",
                    emails,
                    (1..=n).map(|i| format!("person{i}@example.org")).collect(),
                );
                assert_eq!(
                    query_i64(
                        &db,
                        &format!("SELECT COUNT(*) FROM links WHERE stream = '{STREAM}'")
                    ),
                    n as i64
                );
            }
            Kind::CrmOffersToS360 => {
                let refs = self
                    .s
                    .s360
                    .orders()
                    .iter()
                    .map(|o| o.external_reference.clone().unwrap_or_default())
                    .collect();
                once(
                    "S-360 order",
                    refs,
                    (1..=n).map(|i| format!("OFF-{i}")).collect(),
                );
            }
            Kind::TicketCoToAirship => {
                let creations = self.s.airship.creations();
                assert!(
                    creations.values().all(|c| *c == 1),
                    "a booking created twice: {:?}",
                    creations
                        .iter()
                        .filter(|(_, c)| **c > 1)
                        .collect::<Vec<_>>()
                );
                once(
                    "Airship booking",
                    creations.keys().cloned().collect(),
                    (0..n).map(|i| format!("TC-{i}")).collect(),
                );
                let emails = self
                    .s
                    .airship
                    .contacts()
                    .iter()
                    .map(|c| c["email"].as_str().unwrap_or("").to_lowercase())
                    .collect();
                once(
                    "Airship contact",
                    emails,
                    (0..n).map(|i| format!("buyer{i}@example.org")).collect(),
                );
                assert_eq!(
                    query_i64(
                        &db,
                        "SELECT COUNT(*) FROM ledger WHERE target_ids IS NOT NULL"
                    ),
                    n as i64,
                    "the ledger knows every booking"
                );
            }
            Kind::CrmToCdp => {
                // A redelivered batch must be exactly an earlier batch, resent whole.
                let batches = self.s.cdp.batches();
                let mut first: HashMap<String, usize> = HashMap::new();
                for (bi, b) in batches.iter().enumerate() {
                    for e in b {
                        let id = event_contact_id(e);
                        if let Some(&earlier) = first.get(&id) {
                            assert_eq!(
                                batches[earlier], *b,
                                "{id} delivered again, but not as a resend of its batch"
                            );
                        } else {
                            first.insert(id, bi);
                        }
                    }
                }
                let ids: HashSet<String> = first.into_keys().collect();
                once(
                    "CDP contact",
                    ids.into_iter().collect(),
                    (1..=n).map(|i| format!("CRM-{i}")).collect(),
                );
            }
        }
        match self.kind {
            Kind::CrmContactsToS360 | Kind::CrmToCdp => {
                assert_eq!(self.cursor(), Some(format!("c{n}")), "cursor at the end")
            }
            Kind::CrmOffersToS360 => {
                assert_eq!(self.cursor(), Some(format!("o{n}")), "cursor at the end")
            }
            _ => {}
        }
        self.reconcile();
    }

    /// The counts of every completed run reconcile. Counts are written when a run ends, so a
    /// killed run has none ('interrupted'); per completed run, by what each engine counts:
    /// - feed/inbox → outbox (relay, CDP): `pulled = queued + skipped + failed` (`created`
    ///   counts deliveries from the outbox, which may hold records of earlier runs);
    /// - CRM → S-360 contacts and offers, Ticket Co → Airship (written one by one):
    ///   `pulled = created + updated + skipped + failed`.
    ///
    /// `failed` = dead-lettered; `skipped` = unchanged or superseded.
    fn reconcile(&self) {
        let n = |v: &Option<String>| v.as_deref().unwrap_or("0").parse::<i64>().unwrap();
        let rows: Vec<(i64, String, [i64; 6])> = common::rows(
            &self.env.db_path(),
            &format!(
                "SELECT id, outcome, pulled, created, updated, skipped, failed, queued FROM runs
                 WHERE stream = '{STREAM}' ORDER BY id"
            ),
        )
        .iter()
        .map(|r| {
            (
                n(&r[0]),
                r[1].clone().unwrap_or_default(),
                [n(&r[2]), n(&r[3]), n(&r[4]), n(&r[5]), n(&r[6]), n(&r[7])],
            )
        })
        .collect();
        let ok: Vec<_> = rows.iter().filter(|r| r.1 == "ok").collect();
        assert!(!ok.is_empty(), "a run completed: {rows:?}");
        let mut pulled_total = 0;
        for (id, _, [pulled, created, updated, skipped, failed, queued]) in &ok {
            let written = match self.kind {
                Kind::Relay | Kind::CrmToCdp => queued,
                _ => &(created + updated),
            };
            assert_eq!(
                *pulled,
                written + skipped + failed,
                "run {id}: pulled = written + skipped + dead-lettered ({rows:?})"
            );
            pulled_total += pulled;
        }
        let dead = query_i64(
            &self.env.db_path(),
            &format!("SELECT COUNT(*) FROM dead_letters WHERE stream = '{STREAM}'"),
        );
        assert_eq!(dead, 0, "nothing dead-lettered in a clean import");
        // (In a long soak the killed runs may have pulled everything: the last pulls 0.)
        eprintln!("{:?}: completed runs pulled {pulled_total}", self.kind);
    }
}

fn event_contact_id(e: &Value) -> String {
    // The CDP event carries the mapped fields somewhere in its body; find ContactId.
    fn find(v: &Value) -> Option<String> {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(s)) = m.get("ContactId") {
                    return Some(s.clone());
                }
                m.values().find_map(find)
            }
            Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    find(e).unwrap_or_else(|| panic!("no ContactId in {e}"))
}

fn identical_resends(s: &Sandbox) {
    let received = s.crm.received();
    let mut by_key: HashMap<&str, &bytes::Bytes> = HashMap::new();
    for r in &received {
        if let Some(k) = &r.idempotency_key {
            if let Some(b) = by_key.get(k.as_str()) {
                assert_eq!(*b, &r.body, "a resent payload is byte for byte the same");
            } else {
                by_key.insert(k, &r.body);
            }
        }
    }
}

async fn bounce(kind: Kind) {
    let (rounds, seed) = soak();
    eprintln!("{kind:?}: {rounds} rounds, seed {seed} (SOAK_ROUNDS / SOAK_SEED replay it)");
    let mut rng = Rng(seed ^ kind as u64);
    let mut c = Case::new(kind).await;
    let mut kills = 0;
    for round in 0..rounds {
        c.slow_target();
        let mut p = c.start(round);
        let wait_ms = 100 + rng.next(900);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        p.kill9();
        kills += 1;
        c.clear_faults();
        eprintln!(
            "{kind:?} round {round}: SIGKILL after {wait_ms} ms, {} in the target",
            c.progress()
        );
        // Some restarts with no pause, some after one.
        if rng.next(3) != 0 {
            tokio::time::sleep(Duration::from_millis(rng.next(300))).await;
        }
    }
    // The run to the end, without faults.
    let mut p = c.start(rounds);
    match &mut p {
        Proc::Cli(child) => {
            let status = tokio::task::block_in_place(|| child.wait()).unwrap();
            let log = std::fs::read_to_string(c.env.dir.path().join(format!("cli-{rounds}.log")));
            assert!(status.success(), "the last run failed: {log:?}");
        }
        Proc::Daemon(d) => {
            let ok =
                tokio::task::block_in_place(|| wait_until(Duration::from_secs(150), || c.done()));
            assert!(ok, "not done: {} in the target\n{}", c.progress(), d.log());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    tokio::task::block_in_place(|| c.check());
    eprintln!("{kind:?}: {kills} kills, {} records, all once", c.n);
    p.kill9();
}

/// Rounds of the several-instance bounce per stream kind (five kinds: 100 in all).
const SEVERAL_ROUNDS: u32 = 20;

/// One of three instances on the environment's PostgreSQL state: its own state folder (the
/// lock), a 3 s lease, and (instance 0 on the case's port) its own receiver port.
fn spawn_instance(c: &Case, i: usize, ports: &[u16]) -> Daemon {
    let dir = c.env.dir.path().join(format!("state-{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let listen = format!("127.0.0.1:{}", ports[i]);
    let mut vars = vec![
        ("USHER_DAEMON__STATE_DIR", dir.to_str().unwrap().to_string()),
        ("USHER_DAEMON__LEASE", "3s".to_string()),
    ];
    if c.kind == Kind::Relay {
        vars.push(("USHER_RECEIVER__LISTEN", listen));
    }
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    c.env.spawn_daemon_with(&[], &vars)
}

/// Issue 20: three instances on one PostgreSQL, random SIGKILL and SIGSTOP/SIGCONT of
/// instances during runs, then the same identities as the one-instance bounce: every
/// record in the target once, the cursor at the end, the runs reconciling. Needs
/// PostgreSQL (`USHER_TEST_POSTGRES`); says SKIPPED otherwise.
async fn bounce_several(kind: Kind) {
    if common::postgres().is_none() {
        eprintln!("SKIPPED: several instances need PostgreSQL (USHER_TEST_POSTGRES)");
        return;
    }
    let rounds: u32 = std::env::var("SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SEVERAL_ROUNDS);
    let (_, seed) = soak();
    eprintln!("{kind:?} on three instances: {rounds} rounds, seed {seed}");
    let mut rng = Rng(seed ^ (kind as u64 + 100));
    // The fakes note which process made each call (from the kernel's socket tables).
    usher_sandbox::callers::record();
    let mut c = Case::new(kind).await;
    let ports = [c.port, free_port(), free_port()];
    c.start_sender();
    let mut instances: Vec<Daemon> = (0..3).map(|i| spawn_instance(&c, i, &ports)).collect();
    let (mut kills, mut stops) = (0, 0);
    // When each instance was killed or stopped, by PID.
    let mut downed: Vec<(u32, Instant)> = Vec::new();
    // When each killed instance was killed, by PID (a PID is killed once).
    let mut killed: Vec<(u32, Instant)> = Vec::new();
    let s360 = matches!(kind, Kind::CrmContactsToS360 | Kind::CrmOffersToS360);
    for round in 0..rounds {
        c.slow_target();
        if s360 && rng.next(2) == 0 {
            // A Retry-After that every instance must honour (checked below).
            c.s.s360.faults.push_front(
                "s360.api",
                Fault::RateLimited {
                    status: if rng.next(2) == 0 { 429 } else { 509 },
                    retry_after_secs: 1 + rng.next(2),
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.next(900))).await;
        let i = rng.next(3) as usize;
        downed.push((instances[i].pid(), Instant::now()));
        if rng.next(3) == 0 {
            // Paused for less or more than its lease (3 s), then woken up.
            let pause = Duration::from_millis(500 + rng.next(4000));
            instances[i].signal(rustix::process::Signal::STOP);
            tokio::time::sleep(pause).await;
            instances[i].signal(rustix::process::Signal::CONT);
            stops += 1;
            eprintln!(
                "{kind:?} round {round}: instance {i} stopped for {pause:?}, {} in the target",
                c.progress()
            );
        } else {
            killed.push((instances[i].pid(), Instant::now()));
            instances[i].kill9();
            kills += 1;
            eprintln!(
                "{kind:?} round {round}: instance {i} killed, {} in the target",
                c.progress()
            );
            if rng.next(3) != 0 {
                tokio::time::sleep(Duration::from_millis(rng.next(300))).await;
            }
            instances[i] = spawn_instance(&c, i, &ports);
        }
        c.clear_faults();
    }
    let ok = tokio::task::block_in_place(|| wait_until(Duration::from_secs(120), || c.done()));
    let logs = || {
        instances
            .iter()
            .enumerate()
            .map(|(i, d)| format!("--- instance {i}\n{}", d.log()))
            .collect::<String>()
    };
    assert!(ok, "not done: {} in the target\n{}", c.progress(), logs());
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| c.check());
    // Every run of the stream was recorded by the holder of its lease at the time, and the
    // runs cut short by a lost lease or a kill committed nothing the check above missed.
    let holders = common::column(
        &c.env.db_path(),
        &format!("SELECT DISTINCT holder FROM runs WHERE stream = '{STREAM}'"),
    );
    assert!(holders.iter().all(Option::is_some), "{holders:?}");
    let (calls, callers) =
        std::panic::catch_unwind(|| one_instance_at_a_time(&c.s.callers.calls(), &killed, &downed))
            .unwrap_or_else(|_| panic!("two instances at once; their logs:\n{}", logs()));
    if s360 {
        s360_limits_held(&c.s.callers.calls(), &downed);
    }
    eprintln!(
        "{kind:?} on three instances: {kills} kills, {stops} stops, {} holders, {} records, all once; {calls} calls to the vendors by {callers} instances, never two at once",
        holders.len(),
        c.n
    );
    for d in &mut instances {
        d.kill9();
    }
}

/// From the fakes' log of who called: the calls of two instances to the vendors never
/// overlap in time, i.e. no instance calls while another is inside a run of the stream
/// (the test's only stream). A call still in flight when its instance was killed is not
/// counted (a dead process is inside no run). Returns the number of calls checked and of
/// the instances that made them.
fn one_instance_at_a_time(
    calls: &[CallerCall],
    killed: &[(u32, Instant)],
    downed: &[(u32, Instant)],
) -> (usize, usize) {
    let me = std::process::id();
    let killed_at = |pid: u32| killed.iter().find(|(p, _)| *p == pid).map(|(_, t)| *t);
    let mut ours: Vec<&CallerCall> = calls
        .iter()
        .filter(|c| c.pid.is_some_and(|p| p != me))
        // A process killed with the call in flight: the fake may still be handling it.
        .filter(|c| killed_at(c.pid.unwrap()).is_none_or(|k| c.answered < k || c.received > k))
        .collect();
    let unknown = calls.iter().filter(|c| c.pid.is_none()).count();
    assert!(
        unknown * 20 <= calls.len(),
        "the fakes could not tell the caller of {unknown} of {} calls",
        calls.len()
    );
    ours.sort_by_key(|c| c.received);
    // The latest answer so far of each process.
    let mut last: HashMap<u32, (Instant, String, Instant)> = HashMap::new();
    for c in &ours {
        let pid = c.pid.unwrap();
        for (other, (answered, what, received)) in &last {
            assert!(
                *other == pid || *answered <= c.received,
                "instance {pid} called {} {} while instance {other} was still inside a run ({what} received {:?} before, answered {:?} after); kills and stops since 10 s before: {:?}",
                c.method,
                c.path,
                c.received.duration_since(*received),
                answered.duration_since(c.received),
                downed
                    .iter()
                    .filter(|(_, t)| *t + Duration::from_secs(10) > c.received)
                    .map(|(p, t)| (
                        p,
                        t.checked_duration_since(c.received).map_or_else(
                            || -(c.received.duration_since(*t).as_secs_f64()),
                            |d| d.as_secs_f64()
                        )
                    ))
                    .collect::<Vec<_>>()
            );
        }
        let e = last
            .entry(pid)
            .or_insert((c.answered, String::new(), c.received));
        if c.answered >= e.0 {
            *e = (c.answered, format!("{} {}", c.method, c.path), c.received);
        }
    }
    let pids: HashSet<u32> = ours.iter().filter_map(|c| c.pid).collect();
    (ours.len(), pids.len())
}

/// S-360 across three instances, from the fake's log: never more than the documented 180
/// calls in any minute, and no call before a `Retry-After` has passed, whichever instance
/// got it and whichever calls next. A Retry-After answered to an instance that was killed
/// or stopped within a second of it is not counted: it may never have been recorded.
fn s360_limits_held(calls: &[CallerCall], downed: &[(u32, Instant)]) {
    let mut api: Vec<&CallerCall> = calls
        .iter()
        .filter(|c| c.path.starts_with("/s360/") && c.pid != Some(std::process::id()))
        .collect();
    api.sort_by_key(|c| c.received);
    let per = Duration::from_secs(60);
    let busiest = (0..api.len())
        .map(|i| {
            api[i..]
                .iter()
                .take_while(|o| o.received.duration_since(api[i].received) < per)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(busiest <= 180, "{busiest} calls to S-360 within a minute");
    let mut honoured = 0;
    for (i, c) in api.iter().enumerate() {
        let Some(secs) = c.retry_after.as_deref().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let lost = downed.iter().any(|(p, t)| {
            Some(*p) == c.pid && *t >= c.received && *t < c.answered + Duration::from_secs(1)
        });
        if lost {
            continue;
        }
        let earliest = c.answered + Duration::from_secs(secs);
        // The first call sent after the answer could be read (one in flight already is not).
        if let Some(next) = api[i + 1..].iter().find(|o| o.received >= c.answered) {
            assert!(
                next.received + Duration::from_millis(5) >= earliest,
                "a call {:?} before the Retry-After ({secs} s) answered to instance {:?} had passed (next call by {:?})",
                earliest.duration_since(next.received),
                c.pid,
                next.pid
            );
        }
        honoured += 1;
    }
    eprintln!("S-360: at most {busiest} calls in a minute; {honoured} Retry-After honoured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_bounce_s360_to_crm_relay() {
    bounce_several(Kind::Relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_bounce_crm_contacts_to_s360() {
    bounce_several(Kind::CrmContactsToS360).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_bounce_crm_offers_to_s360() {
    bounce_several(Kind::CrmOffersToS360).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_bounce_crm_to_cdp() {
    bounce_several(Kind::CrmToCdp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_instances_bounce_seatgeek_to_halo() {
    bounce_several(Kind::SeatGeekToHalo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_s360_to_crm_relay() {
    bounce(Kind::Relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_crm_contacts_to_s360() {
    bounce(Kind::CrmContactsToS360).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_crm_offers_to_s360() {
    bounce(Kind::CrmOffersToS360).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_ticketco_to_airship() {
    bounce(Kind::TicketCoToAirship).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_crm_to_cdp() {
    bounce(Kind::CrmToCdp).await;
}

/// Every fault against S-360 (all of them, on consecutive calls)
/// with a budget of 10 calls per 2 s: from the fake's timestamps, no call before a
/// Retry-After has passed and never more than 10 calls in any 2 s. Each CRM record still
/// makes exactly one S-360 contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s360_budget_and_retry_after_hold_under_every_fault() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let n = 20;
    s.crm.add_contacts(n);
    let env = Env::new();
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    env.write_config(&format!(
        r#"
[connections.s360]
kind = "s360"
base_url = "{}/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
timeout = "1s"
max_retries = 6
rate_limit = {{ calls = 10, per = "2s" }}

[connections.crm]
kind = "crm"
base_url = "{}"

[streams.contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1s"
jitter = "0s"
page_size = 10
"#,
        s.url("s360"),
        s.url("crm")
    ));
    let all = [
        Fault::Status(500),
        Fault::RateLimited {
            status: 429,
            retry_after_secs: 2,
        },
        Fault::Status(503),
        Fault::RateLimitedUntil {
            status: 509,
            secs_ahead: 3,
        },
        Fault::Slow(Duration::from_millis(1500)),
        Fault::RateLimitedBare { status: 429 },
        Fault::Reset,
        Fault::RateLimited {
            status: 509,
            retry_after_secs: 1,
        },
        Fault::Truncated,
        Fault::Html,
        Fault::RateLimitedUntil {
            status: 429,
            secs_ahead: 2,
        },
    ];
    // Every fault, queued up front: the first 11 calls to S-360 each get one.
    for f in all.iter() {
        s.s360.faults.push("s360.api", f.clone(), 1);
    }
    let d = env.spawn_daemon();
    d.wait_ready();
    let db = env.db_path();
    let ok = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(90), || {
            query_i64(&db, "SELECT COUNT(*) FROM links WHERE stream = 'contacts'") == n as i64
        })
    });
    assert!(ok, "all contacts linked\n{}", d.log());

    let calls = s.s360.faults.calls_to("s360.api");
    let injected: Vec<_> = calls.iter().filter_map(|c| c.fault.clone()).collect();
    eprintln!("{} calls, {} with a fault", calls.len(), injected.len());
    for f in &all {
        assert!(
            injected
                .iter()
                .any(|g| std::mem::discriminant(g) == std::mem::discriminant(f)),
            "{f:?} was injected"
        );
    }
    // Retry-After: the next call waits at least as asked (an HTTP date has whole seconds).
    for (i, c) in calls.iter().enumerate() {
        let earliest = match &c.fault {
            Some(Fault::RateLimited {
                retry_after_secs, ..
            }) => c.at + Duration::from_secs(*retry_after_secs),
            Some(Fault::RateLimitedUntil { secs_ahead, .. }) => {
                let t = c.at + Duration::from_secs(*secs_ahead);
                let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
            }
            _ => continue,
        };
        if let Some(next) = calls.get(i + 1) {
            assert!(
                next.at >= earliest,
                "call {} came {:?} before the Retry-After of call {i} ({:?}) had passed",
                i + 1,
                earliest.duration_since(next.at).unwrap_or_default(),
                c.fault
            );
        }
    }
    // The budget, counted over every call (faulted ones too).
    let per = Duration::from_secs(2);
    let mut max = 0;
    for (i, c) in calls.iter().enumerate() {
        let k = calls[i..]
            .iter()
            .take_while(|o| o.at.duration_since(c.at).unwrap_or_default() < per)
            .count();
        max = max.max(k);
    }
    assert!(max <= 10, "at most 10 calls per 2 s, saw {max}");
    // One S-360 contact per CRM record, whatever the faults did.
    let mut emails: Vec<String> = s
        .s360
        .contacts()
        .iter()
        .map(|c| {
            c["individualContact"]["email"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_lowercase()
        })
        .collect();
    emails.sort();
    let before = emails.len();
    emails.dedup();
    assert_eq!(before, emails.len(), "a contact created twice");
    assert_eq!(emails.len() as u64, n);
}

/// Found by `s360_budget_and_retry_after_hold_under_every_fault`: a 200 whose body was cut
/// off or was an HTML page was taken as S-360 refusing the record, which was dead-lettered
/// and passed by the cursor (lost; and for a cut-off SUCCESS the contact existed unlinked).
/// A broken answer now means "outcome unknown": contacts end the run (the next run matches
/// by e-mail), offers ask S-360 for the order before any resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncated_or_html_s360_answer_is_not_a_refusal() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(6);
    s.crm.add_offers(4);
    for f in [Fault::Truncated, Fault::Html, Fault::Truncated, Fault::Html] {
        s.s360.faults.push("s360.api", f, 2);
    }
    let env = Env::new();
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    env.write_config(&format!(
        r#"
[connections.s360]
kind = "s360"
base_url = "{}/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"

[connections.crm]
kind = "crm"
base_url = "{}"

[streams.contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1s"
jitter = "0s"

[streams.offers]
source = "crm"
entity = "offer"
target = "s360"
every = "1s"
jitter = "0s"
"#,
        s.url("s360"),
        s.url("crm")
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    let db = env.db_path();
    let ok = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(30), || {
            query_i64(&db, "SELECT COUNT(*) FROM links WHERE stream = 'contacts'") == 6
                && query_i64(
                    &db,
                    "SELECT COUNT(*) FROM ledger WHERE stream = 'offers' AND target_ids IS NOT NULL",
                ) == 4
        })
    });
    assert!(ok, "every record delivered\n{}", d.log());
    assert_eq!(
        query_i64(&db, "SELECT COUNT(*) FROM dead_letters"),
        0,
        "a broken answer is no refusal"
    );
    let mut emails: Vec<String> = s
        .s360
        .contacts()
        .iter()
        .map(|c| {
            c["individualContact"]["email"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_lowercase()
        })
        .collect();
    emails.sort();
    emails.dedup();
    assert_eq!(emails.len(), 6);
    assert_eq!(s.s360.contacts().len(), 6, "no contact twice");
    let mut refs: Vec<String> = s
        .s360
        .orders()
        .iter()
        .map(|o| o.external_reference.clone().unwrap_or_default())
        .collect();
    refs.sort();
    assert_eq!(
        refs,
        vec!["OFF-1", "OFF-2", "OFF-3", "OFF-4"],
        "one order per offer"
    );
    assert!(
        s.s360
            .faults
            .calls_to("s360.api")
            .iter()
            .filter(|c| c.fault.is_some())
            .count()
            == 8,
        "every fault was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_bounce_seatgeek_to_halo() {
    bounce(Kind::SeatGeekToHalo).await;
}
