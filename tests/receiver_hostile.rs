//! Hostile traffic against the S-360 webhook receiver, from outside, against the real binary
//! (issue 24): authentication schemes in any case, and the rest of the issue's findings,
//! one test each, named after what broke.

mod common;

use std::time::Duration;

use common::{Daemon, Env, Spawn, query_i64};
use usher::sandbox::s360::{DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET};

struct Target {
    env: Env,
    daemon: Daemon,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon whose only work is receiving: `contacts` (bearer `hook-token`) and `orders`
/// (Basic `s360`/`pw`), both disabled so nothing is relayed. `receiver` is the `[receiver]`
/// table but for `listen`.
fn start_with(receiver: &str, spawn: &Spawn) -> Target {
    let env = Env::new();
    let port = free_port();
    let metrics_port = free_port();
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    env.write_config(&format!(
        r#"
[receiver]
listen = "127.0.0.1:{port}"
{receiver}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[connections.s360]
kind = "s360"
base_url = "http://127.0.0.1:9/s360/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"

[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:9/crm"

[streams.contacts]
source = "s360"
entity = "contacts"
target = "crm"
enabled = false
every = "1h"

[streams.contacts.s360]
auth = {{ type = "bearer", token = "hook-token" }}

[streams.contacts.webhook]
url = "/hooks/contacts"

[streams.orders]
source = "s360"
entity = "orders"
target = "crm"
enabled = false
every = "1h"

[streams.orders.s360]
auth = {{ type = "basic", username = "s360", password = "pw" }}

[streams.orders.webhook]
url = "/hooks/orders"
"#
    ));
    let daemon = env.spawn_daemon_opts(&[], &[], spawn);
    daemon.wait_ready();
    Target { env, daemon, port }
}

const SMALL: &str = r#"max_body = "64KB""#;

fn start() -> Target {
    start_with(SMALL, &Spawn::default())
}

impl Target {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn inbox(&self) -> i64 {
        query_i64(&self.env.db_path(), "SELECT COUNT(*) FROM s360_inbox")
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn post(t: &Target, path: &str, authorization: &str, body: &str) -> u16 {
    client()
        .post(t.url(path))
        .header("content-type", "application/json")
        .header("authorization", authorization)
        .body(body.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Issue 24, item 6: `basic` and `BEARER` were refused with 401 although RFC 9110 makes the
/// scheme case-insensitive; the credentials themselves stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_schemes_are_case_insensitive() {
    let t = start();
    let contact = |n: u32| format!(r#"[{{"contactNumber":"{n}"}}]"#);
    for (i, scheme) in ["Bearer", "bearer", "BEARER", "bEaReR"].iter().enumerate() {
        let status = post(
            &t,
            "/s360/myvenue/contacts",
            &format!("{scheme} hook-token"),
            &contact(i as u32),
        )
        .await;
        assert_eq!(status, 200, "{scheme}\n{}", t.daemon.log());
    }
    assert_eq!(
        post(
            &t,
            "/s360/myvenue/contacts",
            "bearer HOOK-TOKEN",
            &contact(9)
        )
        .await,
        401,
        "the token itself is case-sensitive"
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode("s360:pw");
    let order = |n: u32| format!(r#"[{{"orderDetailsData":{{"orderId":{n}}}}}]"#);
    for (i, scheme) in ["Basic", "basic", "BASIC"].iter().enumerate() {
        let status = post(
            &t,
            "/s360/myvenue/orders",
            &format!("{scheme} {b64}"),
            &order(i as u32),
        )
        .await;
        assert_eq!(status, 200, "{scheme}\n{}", t.daemon.log());
    }
    assert_eq!(t.inbox(), 7);
}

/// Issue 24, item 3: a JSON key holding ESC and a newline was echoed raw into the text log
/// (in the 400's reason), forging a line `… INFO usher is ready FORGED-LINE`. Now every
/// control character of a logged value is shown escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_control_characters_cannot_forge_a_text_log_line() {
    let t = start_with(
        SMALL,
        &Spawn {
            log_format: "text",
            ..Spawn::default()
        },
    );
    // JSON escapes: the decoded key holds ESC, CR, LF and a whole fake log line. A key that
    // appears twice is refused, with the key in the reason.
    let key = r#"k\u001b[2K\r\n2026-05-01T00:00:00.000000Z  INFO usher is ready FORGED-LINE"#;
    let body = format!(r#"[{{"contactNumber":"1","{key}":1,"{key}":2}}]"#);
    assert_eq!(
        post(&t, "/s360/myvenue/contacts", "Bearer hook-token", &body).await,
        400
    );
    assert!(
        t.daemon
            .wait_log("payload refused (400)", Duration::from_secs(10)),
        "{}",
        t.daemon.log()
    );
    let log = std::fs::read(&t.daemon.log_path).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(!log.contains(&0x1b), "a raw ESC reached the log:\n{text}");
    for line in text.lines().filter(|l| l.contains("FORGED-LINE")) {
        assert!(
            line.contains("payload refused (400)") && line.contains(r"k\u{1b}[2K\r\n2026"),
            "a forged line:\n{text}"
        );
    }
    assert_eq!(t.inbox(), 0);
}

fn vm_hwm_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A JSON array of records made by `record(i)`, as long as fits in `max` bytes.
fn payload_of(max: usize, record: impl Fn(u64) -> String) -> (Vec<u8>, u64) {
    let mut body = b"[".to_vec();
    let mut n = 0;
    loop {
        let r = record(n);
        if body.len() + r.len() + 2 > max {
            break;
        }
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(r.as_bytes());
        n += 1;
    }
    body.push(b']');
    (body, n)
}

async fn post_bytes(t: &Target, body: Vec<u8>) -> (u16, String) {
    let r = client()
        .post(t.url("/s360/myvenue/contacts"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer hook-token")
        .timeout(Duration::from_secs(120))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Issue 24, item 5: 200,000 records in a 5.6 MB body took the daemon to 188 MB (≈30× the
/// body): the whole body became a `serde_json::Value` tree and every record was copied.
/// Now one `max_body` payload (10 MB) raises the peak by a small multiple of its size, and
/// bodies held at once are bounded by `body_memory`, so eight such POSTs at once cannot
/// take eight times that. Prints the figures (README, ARCHITECTURE).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_max_body_payload_takes_a_small_multiple_of_its_size_in_memory() {
    const MAX: usize = 10 * 1024 * 1024;
    type Record = Box<dyn Fn(u64) -> String>;
    let shapes: [(&str, Record); 2] = [
        (
            "S-360 contacts",
            Box::new(|n| serde_json::to_string(&usher::sandbox::s360::webhook_contact(n)).unwrap()),
        ),
        (
            "minimal records",
            Box::new(|n| format!(r#"{{"contactNumber":"{}"}}"#, 3_100_000 + n)),
        ),
    ];
    let mut multiples = Vec::new();
    for (name, record) in &shapes {
        let t = start_with("", &Spawn::default());
        // One small POST first, so that the baseline holds the code paths' own memory.
        assert_eq!(
            post_bytes(&t, br#"[{"contactNumber":"1"}]"#.to_vec())
                .await
                .0,
            200
        );
        let (body, n) = payload_of(MAX, record);
        let len = body.len();
        let before = vm_hwm_kb(t.daemon.pid());
        let (status, answer) = post_bytes(&t, body).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains(&format!("\"stored\":{n}")), "{answer}");
        let after = vm_hwm_kb(t.daemon.pid());
        let multiple = (after - before) as f64 * 1024.0 / len as f64;
        eprintln!(
            "{name}: {n} records in {:.1} MB: peak RSS {:.1} → {:.1} MB, +{multiple:.2}× the body",
            len as f64 / 1048576.0,
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
        multiples.push(multiple);
        if *name == "minimal records" {
            // Eight at once: the budget (default 4 × max_body) holds at most four bodies.
            let bodies: Vec<Vec<u8>> = (0..8u64)
                .map(|k| payload_of(MAX, |n| record(n + (k + 1) * 1_000_000)).0)
                .collect();
            let posts = bodies.into_iter().map(|b| post_bytes(&t, b));
            let statuses: Vec<u16> = futures::future::join_all(posts)
                .await
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            let peak = vm_hwm_kb(t.daemon.pid());
            eprintln!(
                "eight at once: statuses {statuses:?}, peak RSS {:.1} MB (+{:.2}× one body over the single POST's peak)",
                peak as f64 / 1024.0,
                (peak - after) as f64 * 1024.0 / len as f64
            );
            assert!(statuses.iter().all(|s| *s == 200 || *s == 503));
            // At most four bodies (the budget) and what parsing and storing them takes.
            assert!(
                peak - before < (4.0 * 2.5 * len as f64 / 1024.0) as u64 + 16 * 1024,
                "eight POSTs at once took {} MB",
                (peak - before) / 1024
            );
        }
    }
    for m in multiples {
        assert!(
            m < 4.0,
            "a max_body payload raised the peak by {m:.1}× its size"
        );
    }
}
