//! Secrets audit across every stream kind: the S-360 relay (bearer and Basic receiver
//! credentials) into a CRM with OAuth2 client credentials, CRM → S-360 contacts and offers
//! (partner secret, signed JWTs), CRM → CDP (product token), Ticket Co → Airship (the Ticket
//! Co token rides in the query string; the Airship token), and a seats.io online check
//! (secret and admin keys), all with RUST_LOG=trace and faults on every fake. No secret may
//! appear in a log line, `status --json`, any CLI output or error, or the SQLite files
//! (-wal included); state files are 0600 and the control folder 0700.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{Env, query_i64, wait_until};
use usher_sandbox::s360::{DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET, webhook_contact};
use usher_sandbox::{Fault, S360Sender, Sandbox};

const HOOK_BEARER: &str = "hook-SECRET-bearer-5521";
const HOOK_USER: &str = "s360hook";
const HOOK_PW: &str = "hook-SECRET-basic-8830";
const CRM_CLIENT_SECRET: &str = "crm-SECRET-client-1177";
const TC_TOKEN: &str = "tc-SECRET-token-6614";
const AIR_TOKEN: &str = "air-SECRET-pat-4409";
const CDP_TOKEN: &str = "cdp-SECRET-product-3392";
const SEATS_KEY: &str = "seats-SECRET-key-2071";
const SEATS_ADMIN: &str = "seats-SECRET-admin-5150";
const SG_SECRET: &str = "sg-SECRET-client-4242";
const HALO_SECRET: &str = "halo-SECRET-client-7373";
const TENANT: &str = "9f0c3c9e-0000-4000-8000-00000000aa01";
const EVENT_TYPE: &str = "5b1c0d2e-0000-4000-8000-00000000bb02";

fn cli_trace(env: &Env, now: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new(common::bin());
    if let Some(now) = now {
        cmd.env("USHER_TEST_NOW", now);
    }
    let o = cmd
        .arg("--config")
        .arg(env.config_path())
        .args(args)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    format!(
        "$ usher {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_leaks_from_any_stream_kind_under_faults_at_trace_level() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.require_oauth("crm-client", CRM_CLIENT_SECRET);
    s.crm.add_contacts(30);
    s.crm.add_offers(4);
    s.ticketco.require_token(TC_TOKEN);
    s.airship.require_token(AIR_TOKEN, 77);
    s.airship.add_unit(1, "Oslo Golf");
    s.ticketco.generate(
        3,
        20,
        "2026-06-10".parse().unwrap(),
        5,
        &["Oslo Golf"],
        "+02:00",
    );
    s.cdp.add_tenant(TENANT, CDP_TOKEN);
    s.cdp.add_event_type(EVENT_TYPE);
    s.seatsio.add_secret_key("eu", SEATS_KEY);
    s.seatsio
        .add_workspace("eu", SEATS_ADMIN, "ws-active", true);
    s.seatgeek.set_credentials("usher-sg", SG_SECRET);
    s.seatgeek.add_generated(60, 20, 3);
    s.halo.set_credentials("venue", "usher-halo", HALO_SECRET);
    s.seatgeek
        .faults
        .push("seatgeek.events", Fault::Status(500), 1);
    s.seatgeek.faults.push("seatgeek.events", Fault::Reset, 1);
    s.halo.faults.push("halo.users.post", Fault::Status(503), 1);
    s.halo.faults.push(
        "halo.users.get",
        Fault::RateLimited {
            status: 429,
            retry_after_secs: 1,
        },
        1,
    );
    // Faults everywhere: errors and retries are where secrets slip into messages.
    s.crm.faults.push("crm.feed", Fault::Status(500), 1);
    s.crm.faults.push("crm.feed", Fault::Reset, 1);
    s.crm.faults.push("crm.hook", Fault::Truncated, 1);
    s.crm.faults.push("crm.hook", Fault::Status(503), 1);
    // (No Html on the CRM webhook: by contract a 200 is acceptance whatever its body.)
    s.crm.faults.push("crm.hook", Fault::Status(500), 1);
    s.s360.faults.push(
        "s360.api",
        Fault::RateLimited {
            status: 509,
            retry_after_secs: 1,
        },
        1,
    );
    s.s360.faults.push("s360.api", Fault::Reset, 1);
    s.s360.faults.push("s360.api", Fault::Status(500), 1);
    s.cdp.faults.push("cdp.events", Fault::Status(500), 1);
    s.cdp.faults.push("cdp.events", Fault::Reset, 1);
    s.ticketco.faults.push("ticketco.events", Fault::Reset, 1);
    s.ticketco
        .faults
        .push("ticketco.items", Fault::Truncated, 1);
    s.ticketco.faults.push("ticketco.items", Fault::Html, 1);
    s.ticketco
        .faults
        .push("ticketco.items", Fault::Status(500), 1);
    s.airship.faults.push("airship", Fault::Reset, 1);
    s.airship.faults.push("airship", Fault::Status(500), 1);

    let env = Env::new();
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    env.write_secret("tc-token", TC_TOKEN);
    env.write_secret("air-token", AIR_TOKEN);
    env.write_secret("cdp-token", CDP_TOKEN);
    env.write_secret("seats-key", SEATS_KEY);
    env.write_secret("seats-admin", SEATS_ADMIN);
    env.write_secret("sg-secret", SG_SECRET);
    env.write_secret("halo-secret", HALO_SECRET);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.write_config(&format!(
        r#"
[receiver]
listen = "127.0.0.1:{port}"

[resellers.agency]
flags = ["cdp", "seatsio"]

[companies.venue-a]
reseller = "agency"
flags = ["cdp", "seatsio"]

[companies.venue-a.integrations.cdp]
enabled = true

[companies.venue-a.integrations.seatsio]
enabled = true

[connections.s360]
kind = "s360"
base_url = "{s360}/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
timeout = "3s"

[connections.crm]
kind = "crm"
base_url = "{crm}"
auth = {{ type = "oauth2", token_url = "{crm}/oauth/token", client_id = "crm-client", client_secret = "{CRM_CLIENT_SECRET}" }}
timeout = "3s"

[connections.tc]
kind = "ticketco"
base_url = "{tc}"
api_token_file = "tc-token"
max_retries = 1

[connections.air]
kind = "airship"
base_url = "{air}"
access_token_file = "air-token"
account_id = 77
max_retries = 1
timeout = "3s"

[connections.venue-a-cdp]
kind = "cdp"
company = "venue-a"
base_url = "{cdp}"
product_token_file = "cdp-token"
tenant_guid = "{TENANT}"
timeout = "3s"

[connections.seats]
kind = "seatsio"
region = "eu"
base_url = "{seats}/eu"
secret_key_file = "seats-key"
admin_key_file = "seats-admin"
workspace_key = "ws-active"
company = "venue-a"

[streams.relay-bearer]
source = "s360"
entity = "contacts"
target = "crm"
every = "1s"
jitter = "0s"

[streams.relay-bearer.s360]
auth = {{ type = "bearer", token = "{HOOK_BEARER}" }}

[streams.relay-bearer.webhook]
url = "/hooks/bearer"

[streams.relay-basic]
source = "s360"
entity = "orders"
target = "crm"
every = "1s"
jitter = "0s"

[streams.relay-basic.s360]
auth = {{ type = "basic", username = "{HOOK_USER}", password = "{HOOK_PW}" }}

[streams.relay-basic.webhook]
url = "/hooks/basic"

[streams.to-s360]
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

[streams.to-cdp]
source = "crm"
entity = "contact"
target = "venue-a-cdp"
every = "1s"
jitter = "0s"

[streams.to-cdp.cdp]
event_type_id = "{EVENT_TYPE}"

[streams.to-cdp.mapping]
Email = "email | trim | lowercase | required"
ContactId = "id"

[connections.seatgeek]
kind = "seatgeek"
base_url = "{sg}"
client_id = "usher-sg"
client_secret_file = "sg-secret"

[connections.halo]
kind = "halo"
base_url = "{halo}"
tenant = "venue"
client_id = "usher-halo"
client_secret_file = "halo-secret"
timeout = "3s"

[streams.users]
source = "seatgeek"
entity = "user"
target = "halo"
every = "1s"
jitter = "0s"

[streams.users.halo]
default_site = 18
id_field = "custom:CFSeatGeekId"

[streams.bookings]
source = "tc"
target = "air"
timezone = "Europe/Oslo"

[streams.bookings.airship]
venues = ["Oslo Golf"]
"#,
        s360 = s.url("s360"),
        crm = s.url("crm"),
        tc = s.url("ticketco"),
        air = s.url("airship"),
        cdp = s.url("cdp"),
        seats = s.url("seatsio"),
        sg = s.url("seatgeek"),
        halo = s.url("halo"),
    ));

    let mut d = env.spawn_daemon_with(&[], &[("RUST_LOG", "trace")]);
    d.wait_ready();
    let base = format!("http://127.0.0.1:{port}/s360/myvenue");
    let mut bearer = S360Sender::new(&format!("{base}/contacts"));
    bearer.auth = Some(("authorization".into(), format!("Bearer {HOOK_BEARER}")));
    let mut basic = S360Sender::new(&format!("{base}/orders"));
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{HOOK_USER}:{HOOK_PW}"));
    basic.auth = Some(("authorization".into(), format!("Basic {b64}")));
    let contacts: Vec<_> = (1..=10).map(webhook_contact).collect();
    let orders: Vec<_> = (1..=5)
        .map(|i| usher_sandbox::s360::webhook_order(i, "CLOSED"))
        .collect();
    assert_eq!(bearer.send(&contacts).await.gave_up, 0);
    assert_eq!(basic.send(&orders).await.gave_up, 0);
    // A wrong credential too: refused, and the attempt must not log what was offered.
    let mut wrong = S360Sender::new(&format!("{base}/contacts"));
    wrong.auth = Some(("authorization".into(), format!("Bearer {HOOK_BEARER}x")));
    wrong.tries = 1;
    assert_eq!(wrong.send(&contacts[..1]).await.statuses, vec![401]);

    let db = env.db_path();
    let done = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), || {
            s.crm.accepted_records().len() >= 15
                && query_i64(&db, "SELECT COUNT(*) FROM links WHERE stream = 'to-s360'") == 30
                && s.s360.orders().len() >= 4
                && s.cdp.events().len() >= 30
                && s.halo.user_count() >= 20
        })
    });
    if !done {
        std::fs::write("/tmp/secrets-daemon.log", d.log()).unwrap();
    }
    assert!(
        done,
        "every stream ran: relayed {}, linked {}, orders {}, CDP events {}",
        s.crm.accepted_records().len(),
        query_i64(&db, "SELECT COUNT(*) FROM links WHERE stream = 'to-s360'"),
        s.s360.orders().len(),
        s.cdp.events().len()
    );
    assert!(s.crm.tokens_issued() >= 1, "OAuth2 tokens were issued");
    assert!(
        s.seatgeek.tokens_issued() >= 1 && s.halo.tokens_issued() >= 1,
        "SeatGeek and Halo tokens were issued"
    );

    // A crash leaves the -wal file behind: the state files as the daemon left them.
    d.kill9();
    // (path, bytes, mode)
    let snapshot = |env: &Env| -> Vec<(std::path::PathBuf, Vec<u8>, u32)> {
        std::fs::read_dir(env.state_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                (p.clone(), std::fs::read(&p).unwrap(), mode)
            })
            .collect()
    };
    let mut state = snapshot(&env);
    if env.pg.is_none() {
        assert!(
            state
                .iter()
                .any(|(p, _, _)| p.to_string_lossy().ends_with("-wal")),
            "a -wal file to search"
        );
    }

    // The CLI (its trace log on stderr): the daily run with faults, twice, validate
    // --online, status, cursors, and an error (a token the vendor refuses).
    let mut out = String::new();
    out += &cli_trace(&env, Some("2026-06-10T01:00:00Z"), &["trigger", "bookings"]);
    out += &cli_trace(&env, Some("2026-06-10T01:05:00Z"), &["trigger", "bookings"]);
    assert!(
        s.airship.booking_count() > 0,
        "bookings reached Airship\n{out}"
    );
    out += &cli_trace(&env, None, &["validate", "--online"]);
    out += &cli_trace(&env, None, &["status", "--json"]);
    out += &cli_trace(&env, None, &["status"]);
    out += &cli_trace(&env, None, &["cursor", "show", "to-s360"]);
    s.ticketco.require_token("another-token");
    out += &cli_trace(&env, Some("2026-06-10T02:00:00Z"), &["trigger", "bookings"]);
    assert!(out.lines().count() > 100, "trace logging was on in the CLI");
    state.extend(snapshot(&env));

    let log = d.log();
    assert!(log.lines().count() > 100, "trace logging was on");
    let secrets = [
        DEMO_PARTNER_SECRET,
        HOOK_BEARER,
        HOOK_PW,
        &b64,
        CRM_CLIENT_SECRET,
        "crm-token-1",
        TC_TOKEN,
        AIR_TOKEN,
        CDP_TOKEN,
        SEATS_KEY,
        SEATS_ADMIN,
        SG_SECRET,
        HALO_SECRET,
        "eyJhbGciOi", // a signed S-360 JWT
    ];
    // On PostgreSQL the database is searched too: every row of every table as text, its
    // BYTEA values (shown as \x + hex) decoded.
    if let Some(url) = &env.pg {
        let tables = common::psql(
            url,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
        );
        for t in tables.iter().filter_map(|r| r[0].clone()) {
            let rows = common::psql(url, &format!("SELECT t::text FROM {t} t"));
            let mut bytes = Vec::new();
            for text in rows.iter().filter_map(|r| r[0].clone()) {
                bytes.extend_from_slice(text.as_bytes());
                for hex in text.split("\\x").skip(1) {
                    let digits: String =
                        hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                    for i in (0..digits.len() / 2 * 2).step_by(2) {
                        if let Ok(b) = u8::from_str_radix(&digits[i..i + 2], 16) {
                            bytes.push(b);
                        }
                    }
                }
            }
            state.push((
                std::path::PathBuf::from(format!("PostgreSQL table {t}")),
                bytes,
                0o600,
            ));
        }
    }
    let mut leaks = Vec::new();
    for secret in secrets {
        for (i, line) in log.lines().enumerate() {
            if line.contains(secret) {
                leaks.push(format!("log line {i}: {line}"));
            }
        }
        for line in out.lines() {
            if line.contains(secret) {
                leaks.push(format!("CLI: {line}"));
            }
        }
        for (p, bytes, _) in &state {
            if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                leaks.push(format!("{secret} in {}", p.display()));
            }
        }
    }
    if std::env::var("SECRETS_DUMP").is_ok() {
        std::fs::write("/tmp/secrets-cli.log", &out).unwrap();
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));

    for (p, _, mode) in &state {
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
    }
    let mode = std::fs::metadata(env.state_dir().join("control"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the control folder");
}
