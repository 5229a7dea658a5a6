//! Hostile traffic against the S-360 webhook receiver, from outside, against the real binary
//! (issue 24), one test per finding, named after what broke: stalled connections and floods
//! of idle and slowloris connections beside a legitimate sender, running out of descriptors,
//! authentication schemes in any case, log injection, and memory per payload.

mod common;

use std::time::Duration;

use common::{Daemon, Env, Spawn, query_i64};
use usher_sandbox::s360::{DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET};

struct Target {
    env: Env,
    daemon: Daemon,
    port: u16,
    metrics_port: u16,
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
    Target {
        env,
        daemon,
        port,
        metrics_port,
    }
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
    let _alone = one_heavy_test_at_a_time();
    const MAX: usize = 10 * 1024 * 1024;
    type Record = Box<dyn Fn(u64) -> String>;
    let shapes: [(&str, Record); 2] = [
        (
            "S-360 contacts",
            Box::new(|n| serde_json::to_string(&usher_sandbox::s360::webhook_contact(n)).unwrap()),
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
            // Some are stored, not all refused: with the inbox's duplicate check reading the
            // whole inbox (SQLite's plan before `+id`), all eight were 503. (Usually four or
            // five; on PostgreSQL from a debug build, three bodies of 374k records stored in
            // one group can take longer than the receiver's 60 s and be answered 503, which
            // S-360 sends again: a 503 loses nothing.)
            let stored = statuses.iter().filter(|s| **s == 200).count();
            assert!((1..8).contains(&stored), "{statuses:?}");
            // At most four bodies (the budget), each with what parsing and storing it took
            // alone (just measured), and some slack.
            assert!(
                peak - before < 4 * (after - before) + 16 * 1024,
                "eight POSTs at once took {} MB, one alone {} MB",
                (peak - before) / 1024,
                (after - before) / 1024
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

use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONTACTS_HEAD: &str = "POST /s360/myvenue/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer hook-token\r\nContent-Type: application/json\r\n";

/// Reads until the peer closes; what was read, and when it closed (None: still open at
/// `limit`).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Instant>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn metrics_text(t: &Target) -> String {
    client()
        .get(format!("http://127.0.0.1:{}/metrics", t.metrics_port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

async fn healthz(t: &Target) -> (u16, String) {
    let r = client()
        .get(format!("http://127.0.0.1:{}/healthz", t.metrics_port))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Issue 24, item 1: a connection that sends nothing, a partial request line, headers
/// without the blank line, a body that stops (with credentials) and a kept-alive connection
/// were all held open indefinitely (590 s tried). Now each is closed at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_within_their_timeouts() {
    let t = start_with(
        "max_body = \"64KB\"\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\nidle_timeout = \"3s\"",
        &Spawn::default(),
    );
    let addr = ("127.0.0.1", t.port);
    let limit = Duration::from_secs(10);
    let opened = |what: &'static str, send: Vec<u8>| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        s.write_all(&send).await.unwrap();
        let (got, closed) = read_until_closed(&mut s, limit).await;
        (what, start, got, closed)
    };
    let slowloris = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        s.write_all(b"POST /s360/myvenue/contacts HTTP/1.1\r\n")
            .await
            .unwrap();
        // One header byte every 300 ms: never idle, never done.
        let mut closed = None;
        while closed.is_none() && start.elapsed() < limit {
            if s.write_all(b"X").await.is_err() {
                closed = Some(Instant::now());
                break;
            }
            closed = read_until_closed(&mut s, Duration::from_millis(300))
                .await
                .1;
        }
        ("slowloris headers", start, Vec::new(), closed)
    };
    let keep_alive = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let body = r#"[{"contactNumber":"1"}]"#;
        s.write_all(
            format!(
                "{CONTACTS_HEAD}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let start = Instant::now();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let (got, closed) = read_until_closed(&mut s, limit).await;
        ("kept alive after a 200", start, got, closed)
    };
    let results = tokio::join!(
        opened("nothing sent", Vec::new()),
        opened("a partial request line", b"POST /s360/myvenue/con".to_vec()),
        opened(
            "headers without the blank line",
            b"POST /s360/myvenue/contacts HTTP/1.1\r\nHost: x\r\n".to_vec()
        ),
        opened(
            "a body that stops",
            format!("{CONTACTS_HEAD}Content-Length: 1000\r\n\r\n[{{\"contactNumber\"").into_bytes()
        ),
        slowloris,
        keep_alive,
    );
    let results = [
        results.0, results.1, results.2, results.3, results.4, results.5,
    ];
    for (what, start, got, closed) in results {
        let expected = if what.starts_with("kept") { 3.0 } else { 2.0 };
        let Some(closed) = closed else {
            panic!("{what}: still open after {limit:?}\n{}", t.daemon.log());
        };
        let after = (closed - start).as_secs_f64();
        eprintln!("{what}: closed after {after:.2}s (timeout {expected}s)");
        assert!(
            after >= expected - 0.2 && after < expected + 2.0,
            "{what}: closed after {after:.2}s, timeout {expected}s"
        );
        if what == "a body that stops" {
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 408"), "{what}: {text}");
        } else {
            assert!(got.is_empty(), "{what}: {}", String::from_utf8_lossy(&got));
        }
    }
    let m = metrics_text(&t).await;
    assert!(
        metric(&m, "usher_receiver_timeouts_total{phase=\"header\"}") >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "usher_receiver_timeouts_total{phase=\"body\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "usher_receiver_timeouts_total{phase=\"idle\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "usher_receiver_connections"), 0.0, "{m}");
    assert_eq!(t.inbox(), 1);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The heavy tests one at a time, whether they run as threads of one process (`cargo test`)
/// or as processes (`cargo nextest`): the two floods (thousands of connections each) and the
/// max-body payload (tens of MB into the inbox). On a 2-core machine two floods at once
/// starve each other's legitimate sender; with the state on PostgreSQL, the payload's
/// insert into the same server (another daemon's, as a neighbour on a shared server would)
/// held the flood's legitimate commits behind its WAL for over 2 s (46 of 51 answered).
/// Neither is what these tests measure.
fn one_heavy_test_at_a_time() -> std::fs::File {
    let f = std::fs::File::create(std::env::temp_dir().join("usher-tests-flood.lock")).unwrap();
    f.lock().unwrap();
    f
}

/// Issue 24, item 1: 2,000 idle connections under a 1,024 descriptor limit pinned the
/// daemon's descriptors at 1,024 within a second; the legitimate sender got 65 of 65 POSTs
/// timed out for 11 minutes, `/healthz` timed out, and no log line named the cause. Now,
/// with 2,000 idle and 300 slowloris connections (each opened again when closed) and a
/// legitimate sender at once, the sender keeps ≥ 99 % of its POSTs answered 200 within 2 s,
/// every idle connection is closed within `header_timeout`, the descriptors stay well under
/// the limit, `/healthz` says why it is degraded, and the log names the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slowloris_floods_leave_the_legitimate_sender_served() {
    let _alone = one_heavy_test_at_a_time();
    const IDLE: usize = 2000;
    const SLOWLORIS: usize = 300;
    const ATTACK: Duration = Duration::from_secs(15);
    let t = start_with(
        "header_timeout = \"3s\"\nidle_timeout = \"3s\"\nbody_timeout = \"5s\"",
        &Spawn {
            nofile: Some(1024),
            ..Spawn::default()
        },
    );
    let pid = t.daemon.pid();
    let addr = ("127.0.0.1", t.port);
    let stop = tokio_util::sync::CancellationToken::new();

    // 2,000 idle connections, opened at once, each opened again 1 s after it was closed:
    // the lifetime of every one (None: still open after 30 s).
    let idle: Vec<_> = (0..IDLE)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut lifetimes = Vec::new();
                while !stop.is_cancelled() {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let start = Instant::now();
                    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(30)).await;
                    lifetimes.push(closed.map(|c| c - start));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                lifetimes
            })
        })
        .collect();
    // 300 slowloris connections: a header byte every 500 ms, a new one when closed.
    let slowloris: Vec<_> = (0..SLOWLORIS)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut opened = 0u32;
                while !stop.is_cancelled() {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    opened += 1;
                    let _ = s
                        .write_all(b"POST /s360/myvenue/contacts HTTP/1.1\r\n")
                        .await;
                    while !stop.is_cancelled() {
                        if s.write_all(b"X").await.is_err() {
                            break;
                        }
                        if read_until_closed(&mut s, Duration::from_millis(500))
                            .await
                            .1
                            .is_some()
                        {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                opened
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The legitimate sender: a POST every 50 ms, each given 2 s.
    let legit = client();
    let started = Instant::now();
    let (mut ok, mut sent, mut slowest, mut max_fds) = (0u32, 0u32, Duration::ZERO, 0usize);
    let mut failures = Vec::new();
    let mut health = None;
    while started.elapsed() < ATTACK {
        let body = format!(r#"[{{"contactNumber":"{}"}}]"#, 5_000_000 + sent);
        let t0 = Instant::now();
        let r = legit
            .post(t.url("/s360/myvenue/contacts"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer hook-token")
            .timeout(Duration::from_secs(2))
            .body(body)
            .send()
            .await;
        sent += 1;
        match r {
            Ok(r) if r.status() == 200 => {
                ok += 1;
                slowest = slowest.max(t0.elapsed());
            }
            Ok(r) => failures.push(format!("{}", r.status())),
            Err(e) => failures.push(format!("{e}: {:?}", std::error::Error::source(&e))),
        }
        max_fds = max_fds.max(open_fds(pid));
        if health.is_none() && started.elapsed() > Duration::from_secs(5) {
            health = Some(healthz(&t).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = metrics_text(&t).await;
    stop.cancel();
    let mut lifetimes = Vec::new();
    for h in idle {
        for l in h.await.unwrap() {
            lifetimes.push(l.expect("an idle connection was still open after 30 s"));
        }
    }
    let mut reconnects = 0;
    for h in slowloris {
        reconnects += h.await.unwrap();
    }
    lifetimes.sort();
    let ratio = ok as f64 / sent as f64;
    eprintln!(
        "legitimate sender: {ok}/{sent} answered 200 within 2 s ({:.1} %), slowest {:.0} ms, failures {failures:?}",
        ratio * 100.0,
        slowest.as_secs_f64() * 1000.0
    );
    eprintln!(
        "idle connections: {} opened and closed; lifetime min {:.2}s, median {:.2}s, max {:.2}s; slowloris connections opened: {reconnects}; daemon descriptors at most {max_fds} of 1024",
        lifetimes.len(),
        lifetimes[0].as_secs_f64(),
        lifetimes[lifetimes.len() / 2].as_secs_f64(),
        lifetimes[lifetimes.len() - 1].as_secs_f64()
    );
    assert!(ratio >= 0.99, "{ok}/{sent}: {failures:?}\n{during}");
    // Enough POSTs to measure (one after the other; a loaded machine answers fewer).
    assert!(sent >= 40, "only {sent} POSTs in {ATTACK:?}");
    assert!(
        lifetimes.len() >= IDLE,
        "{} idle connections",
        lifetimes.len()
    );
    assert!(
        lifetimes.last().unwrap() < &Duration::from_secs(5),
        "an idle connection lived {:?} (header_timeout 3s)",
        lifetimes.last().unwrap()
    );
    assert!(max_fds < 700, "the daemon held {max_fds} descriptors");
    let (status, reasons) = health.unwrap();
    assert_eq!(status, 503, "{reasons}");
    assert!(
        reasons.contains("degraded") && reasons.contains("at its cap of 512"),
        "{reasons}"
    );
    assert!(
        metric(&during, "usher_receiver_connections_evicted_total") > 0.0,
        "{during}"
    );
    // The cap, and those chosen to close that have not closed yet (at most 32).
    assert!(
        metric(&during, "usher_receiver_connections") <= 512.0 + 32.0,
        "{during}"
    );
    assert!(
        t.daemon.log().contains("at its cap of connections"),
        "no line names the cause:\n{}",
        t.daemon.log()
    );
    // Every 200 stored once, nothing else.
    assert_eq!(t.inbox(), ok as i64);
    // Healthy again once the flood is over.
    let mut healthy = false;
    for _ in 0..30 {
        if healthz(&t).await.0 == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(healthy, "{:?}", healthz(&t).await);
}

fn set_nofile(pid: u32, soft: u64) -> u64 {
    use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    let old = prlimit(
        Pid::from_raw(pid as i32),
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: hard,
        },
    )
    .expect("prlimit on the daemon");
    old.current.unwrap_or(u64::MAX)
}

/// Issue 24, item 1: when the descriptors ran out, the daemon's relay failed "could not
/// connect" and not one log line named the cause. Now a failing accept closes an idle
/// connection to free a descriptor, backs off instead of spinning, is counted, degrades
/// `/healthz`, and is logged at most once per 10 s; the legitimate sender still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_counted_logged_at_a_bounded_rate_and_survived() {
    let _alone = one_heavy_test_at_a_time();
    let t = start();
    let pid = t.daemon.pid();
    // Room for a dozen more descriptors, no more.
    let before = open_fds(pid) as u64;
    let old = set_nofile(pid, before + 12);
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", t.port)).await {
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = metrics_text(&t).await;
    let errors = metric(&m, "usher_receiver_accept_errors_total");
    let (status, reasons) = healthz(&t).await;
    // The legitimate sender gets in while the flood holds every descriptor.
    let posted = post(
        &t,
        "/s360/myvenue/contacts",
        "Bearer hook-token",
        r#"[{"contactNumber":"42"}]"#,
    )
    .await;
    let log = t.daemon.log();
    set_nofile(pid, old);
    drop(idle);
    let lines = log
        .lines()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    eprintln!(
        "accept errors: {errors}; log lines about them: {lines}; /healthz {status} {reasons}"
    );
    assert!(errors > 0.0, "{m}");
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines about accept errors in 3 s:\n{log}"
    );
    assert!(
        log.contains("too many open files"),
        "the cause is not named:\n{log}"
    );
    assert_eq!(status, 503, "{reasons}");
    assert!(
        reasons.contains("could not accept connections"),
        "{reasons}"
    );
    assert_eq!(posted, 200, "{log}");
    assert!(
        common::wait_until(Duration::from_secs(10), || (open_fds(pid) as u64)
            < before + 4),
        "descriptors were not given back: {} open, {before} before",
        open_fds(pid)
    );
}

/// Every new `[receiver]` key is checked like the others: each problem reported, with the
/// file and the key, by `validate` and `run` alike.
#[test]
fn bad_receiver_settings_are_all_reported_with_file_and_key() {
    let env = Env::new();
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    env.write_config(&format!(
        r#"
[receiver]
listen = "127.0.0.1:8360"
max_body = "2048MB"
body_memory = "1KB"
header_timeout = "soon"
body_timeout = "0s"
idle_timeout = "2h"
max_connections = 0
trusted_proxies = ["10.0.0.0/33", "proxy.example"]

[connections.s360]
kind = "s360"
base_url = "http://127.0.0.1:9/s360/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
"#
    ));
    let needles = [
        "key `receiver.max_body`: \"2048MB\" is not a size from 1KB to 1024MB",
        "key `receiver.body_memory`: \"1KB\" is not a size of at least `max_body`",
        "key `receiver.header_timeout`: invalid duration",
        "key `receiver.body_timeout`: 0s is out of range (1s to 1h)",
        "key `receiver.idle_timeout`: 2h is out of range (1s to 10m)",
        "key `receiver.max_connections`: 0 is out of range (1 to 100000)",
        "key `receiver.trusted_proxies`: \"10.0.0.0/33\" is not an IP address or network",
        "key `receiver.trusted_proxies`: \"proxy.example\" is not an IP address or network",
    ];
    for args in [&["validate"][..], &["run"][..]] {
        let out = env.cli(args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        for needle in needles {
            assert!(
                err.contains(needle),
                "{args:?}: missing {needle:?} in:\n{err}"
            );
        }
        assert!(err.contains("usher.toml"), "{err}");
    }
}

/// Issue 24, item 2: 3,000 wrong Basic passwords in 0.5 s were all answered 401, on a
/// kept-alive connection, with one WARN line each and no peer address. Now a peer is
/// refused (429 with `Retry-After`, credentials not even looked at) after 5 failures, each
/// 401 closes its connection, and the log has one line at the first failure and one summary
/// per interval (here: at shutdown) naming the peer and the counts. Behind a trusted proxy
/// the peer is the client `X-Forwarded-For` names, so one guesser does not lock out S-360
/// coming through the same proxy, and a client cannot pick its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guessing_is_refused_per_peer_and_logged_once_per_interval() {
    let mut t = start_with(
        "max_body = \"64KB\"\ntrusted_proxies = [\"127.0.0.1\"]",
        &Spawn::default(),
    );
    let url = t.url("/s360/myvenue/orders");
    use base64::Engine;
    let basic = |pw: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("s360:{pw}"))
        )
    };
    let order = |n: u32| format!(r#"[{{"orderDetailsData":{{"orderId":{n}}}}}]"#);
    let through_proxy = client();
    let attempt = |c: &reqwest::Client, forwarded: Option<&str>, pw: &str, n: u32| {
        let mut rb = c
            .post(&url)
            .header("content-type", "application/json")
            .header("authorization", basic(pw))
            .body(order(n));
        if let Some(f) = forwarded {
            rb = rb.header("x-forwarded-for", f);
        }
        rb.send()
    };

    // 3,000 guesses from 203.0.113.7 through the proxy, ten at a time.
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    let mut retry_after = Vec::new();
    for round in 0..300 {
        let guesses = (0..10).map(|i| {
            attempt(
                &through_proxy,
                Some("203.0.113.7"),
                &format!("guess{round}-{i}"),
                1,
            )
        });
        for r in futures::future::join_all(guesses).await {
            let r = r.unwrap();
            *statuses.entry(r.status().as_u16()).or_default() += 1;
            let close = r
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(
                close.as_deref(),
                Some("close"),
                "a refusal closes its connection"
            );
            if let Some(v) = r.headers().get("retry-after") {
                retry_after.push(v.to_str().unwrap().parse::<u64>().unwrap());
            }
        }
    }
    eprintln!(
        "3,000 guesses in {:.1}s: {statuses:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(statuses.get(&401), Some(&5), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&2995), "{statuses:?}");
    assert!(
        retry_after.iter().all(|s| (1..=12).contains(s)),
        "{retry_after:?}"
    );
    // Even the right password is refused while the guesser's allowance is spent...
    assert_eq!(
        attempt(&through_proxy, Some("203.0.113.7"), "pw", 2)
            .await
            .unwrap()
            .status(),
        429
    );
    // ...but S-360 behind the same proxy is not that peer.
    assert_eq!(
        attempt(&through_proxy, Some("198.51.100.9"), "pw", 3)
            .await
            .unwrap()
            .status(),
        200
    );
    // A direct client (127.0.0.2, not a trusted proxy) cannot borrow S-360's name.
    let direct = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut direct_statuses = Vec::new();
    for n in 0..8 {
        let r = attempt(&direct, Some("198.51.100.9"), "nope", n)
            .await
            .unwrap();
        direct_statuses.push(r.status().as_u16());
    }
    assert_eq!(direct_statuses, [401, 401, 401, 401, 401, 429, 429, 429]);
    assert_eq!(
        attempt(&through_proxy, Some("198.51.100.9"), "pw", 4)
            .await
            .unwrap()
            .status(),
        200
    );

    // A 401 ends the connection: the next request on it cannot be sent.
    let mut s = TcpStream::connect(("127.0.0.1", t.port)).await.unwrap();
    let head = format!(
        "POST /s360/myvenue/orders HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nX-Forwarded-For: 192.0.2.50\r\nContent-Length: 2\r\n\r\n[]",
        basic("wrong")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(closed.is_some(), "the connection stayed open after a 401");

    let m = metrics_text(&t).await;
    assert_eq!(
        metric(&m, "usher_receiver_auth_failures_total"),
        5.0 + 5.0 + 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "usher_receiver_auth_throttled_total"),
        2995.0 + 1.0 + 3.0,
        "{m}"
    );

    // The log: per peer, a line at its first failure and one summary (at shutdown here).
    t.daemon.signal(rustix::process::Signal::TERM);
    assert!(t.daemon.wait_exit(Duration::from_secs(30)).is_some());
    let log = t.daemon.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("credentials refused"))
        .collect();
    let joined = refused.join("\n");
    assert!(refused.len() <= 5, "{} lines:\n{joined}", refused.len());
    let summary = |peer: &str| {
        refused
            .iter()
            .find(|l| l.contains(&format!("\"peer\":\"{peer}\"")) && l.contains("refused_429"))
            .unwrap_or_else(|| panic!("no summary for {peer}:\n{joined}"))
            .to_string()
    };
    let guesser = summary("203.0.113.7");
    assert!(
        guesser.contains("\"failures\":5") && guesser.contains("\"refused_429\":2996"),
        "{guesser}"
    );
    let spoofer = summary("127.0.0.2");
    assert!(
        spoofer.contains("\"failures\":5") && spoofer.contains("\"refused_429\":3"),
        "{spoofer}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("\"peer\":\"192.0.2.50\"")),
        "{joined}"
    );
    assert!(
        !log.contains("198.51.100.9"),
        "S-360 never failed:\n{joined}"
    );
    assert_eq!(t.inbox(), 2);
}
