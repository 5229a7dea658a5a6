//! `usher-sandbox bench-s360`: the S-360 figures, in this process, over loopback HTTP.
//!
//! 1. Receiver: `--clients` concurrent S-360 senders POST arrays of 50 new contacts for
//!    `--seconds`; prints records accepted per second (each 200 means committed to SQLite
//!    with `synchronous=FULL`) and the p50/p99/max latency of the 200s.
//! 2. Relay: `--relay` contacts (default 100 000) stored in the inbox are forwarded to the
//!    fake CRM in payloads of 50, in one execution; prints the time and records per second.
//!
//! Run it in release mode: `cargo run --release -p usher-sandbox -- bench-s360`; `--postgres URL` keeps the
//! state on PostgreSQL (an empty database or schema) instead of SQLite.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{EX_FAIL, EX_OK};
use usher::config;
use usher::engine::in_doubt::InDoubt;
use usher::engine::{RunCtx, run_stream};
use usher::http::Http;
use usher::store::{InboxBatch, InboxRecord, RecordId, Store};
use usher_sandbox::Sandbox;

/// The same record as [`webhook_contact`], written with `format!` so that the senders, which
/// share the machine's cores with the receiver, spend little CPU making their bodies.
fn contact_json(seq: u64) -> String {
    format!(
        r#"{{"contactNumber":"{n}","type":"INDIVIDUAL","role":"PUBLIC","seq":{seq},"creationDate":"2026-05-01T10:00:00.000+00:00","lastModificationDate":"2026-05-02T10:{m:02}:{s:02}.000+00:00","individualContact":{{"firstName":"Ada{seq}","lastName":"Example","email":"ada{seq}@example.org","cellPhoneNumber":"+4712345678","languageCode":"en"}},"addresses":[{{"isMain":true,"line1":"Main st 1","zipCode":"0150","town":"Oslo","countryCode":"NO"}}],"authorizations":[{{"code":"NEWSLETTER","value":true}}],"contactCriteria":[{{"code":"EXTCRM_ID","value":"CRM-{seq}"}}]}}"#,
        n = 3_100_000 + seq,
        m = seq / 60 % 60,
        s = seq % 60
    )
}

pub async fn bench(clients: usize, seconds: u64, relay: u64, postgres: Option<String>) -> i32 {
    let dir = std::env::temp_dir().join(format!("usher-bench-s360-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("bench: {e}");
        return EX_FAIL;
    }
    let result = run(&dir, clients, seconds, relay, postgres).await;
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => EX_OK,
        Err(e) => {
            eprintln!("bench: {e}");
            EX_FAIL
        }
    }
}

async fn run(
    dir: &std::path::Path,
    clients: usize,
    seconds: u64,
    relay: u64,
    postgres: Option<String>,
) -> Result<(), String> {
    let sandbox = Sandbox::start("127.0.0.1:0".parse().expect("static"))
        .await
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("secret"), "bench-secret\n").map_err(|e| e.to_string())?;
    let toml = format!(
        r#"
[daemon]
state_dir = "{state}"
[log]
level = "warn"
[receiver]
listen = "127.0.0.1:0"
[connections.s360]
kind = "s360"
base_url = "http://{addr}/s360/bench"
institution = "bench"
virtual_operator = "VO"
partner_name = "usher"
partner_secret_file = "secret"
[connections.crm]
kind = "crm"
base_url = "http://{addr}/crm"
[streams.load]
source = "s360"
entity = "contacts"
target = "crm"
every = "1h"
[streams.load.s360]
auth = {{ type = "bearer", token = "bench" }}
[streams.load.webhook]
url = "/hooks/load"
[streams.relay]
source = "s360"
entity = "contacts"
target = "crm"
every = "1h"
page_size = 1000
max_per_run = 1000000
max_per_payload = 50
[streams.relay.s360]
path = "/s360/bench/relay"
auth = {{ type = "bearer", token = "bench" }}
[streams.relay.webhook]
url = "/hooks/relay"
"#,
        state = dir.join("state").display(),
        addr = sandbox.addr
    );
    let file = dir.join("usher.toml");
    std::fs::write(&file, toml).map_err(|e| e.to_string())?;
    let mut source = config::Source::new(&file);
    source.env_overrides = false;
    let config = config::load(&source).map_err(|p| {
        p.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let store = match &postgres {
        None => Store::open(&config.daemon.state_dir),
        Some(url) => {
            Store::open_postgres(&usher::store::pg::PgSettings {
                url: url.clone(),
                password: None,
            })
            .await
        }
    }
    .map_err(|e| e.to_string())?;
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let receiver = usher::receiver::start(&config, store.clone(), stop.clone(), &tracker)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no receiver")?;

    // 1. The receiver under load.
    println!(
        "receiver: {clients} concurrent senders, arrays of 50 new contacts, {seconds}s, durable commits ({})",
        if postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite WAL, synchronous=FULL"
        }
    );
    let url = format!("http://{}/s360/bench/contacts", receiver.addr);
    let seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = url.clone();
        let seq = seq.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lat = Vec::new();
            let mut accepted = 0u64;
            let mut other = 0u64;
            while Instant::now() < deadline {
                let first = seq.fetch_add(50, Ordering::Relaxed) + 1;
                let mut body = String::with_capacity(50 * 700);
                body.push('[');
                for s in first..first + 50 {
                    if s > first {
                        body.push(',');
                    }
                    body.push_str(&contact_json(s));
                }
                body.push(']');
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth("bench")
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                        accepted += 50;
                    }
                    _ => other += 1,
                }
            }
            (lat, accepted, other)
        }));
    }
    let mut lat = Vec::new();
    let mut accepted = 0;
    let mut failed = 0;
    for t in tasks {
        let (l, a, o) = t.await.map_err(|e| e.to_string())?;
        lat.extend(l);
        accepted += a;
        failed += o;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let stored = store.inbox_count("load").await.map_err(|e| e.to_string())?;
    println!(
        "  accepted {accepted} records in {} POSTs ({failed} not 200) in {elapsed:.1}s: {:.0} records/s, {:.0} POSTs/s",
        lat.len(),
        accepted as f64 / elapsed,
        lat.len() as f64 / elapsed
    );
    println!(
        "  latency of the 200: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; records in the inbox: {stored}",
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    stop.cancel();
    tracker.close();
    tracker.wait().await;

    // 2. The relay: `relay` contacts from the inbox to the CRM, 50 per payload.
    let t = Instant::now();
    for chunk in (1..=relay).collect::<Vec<_>>().chunks(5000) {
        let mut body = String::new();
        let mut records = Vec::with_capacity(chunk.len());
        for s in chunk {
            let start = body.len() as u32;
            body += &contact_json(*s);
            records.push(InboxRecord {
                start,
                end: body.len() as u32,
                id: RecordId::Text(s.to_string().into()),
            });
        }
        store
            .inbox_insert(vec![InboxBatch {
                stream: "relay".into(),
                body: body.into(),
                records,
            }])
            .await
            .map_err(|e| e.to_string())?;
    }
    println!(
        "relay: {relay} contacts put in the inbox in {:.1}s; forwarding them in one execution",
        t.elapsed().as_secs_f64()
    );
    let config = Arc::new(config);
    let ctx = RunCtx {
        kind_run: usher::streams::RUN,
        doubt: InDoubt::new(&store, "relay", config.daemon.settle_margin),
        store: store.clone(),
        config: config.clone(),
        spec: config.streams["relay"].clone(),
        http: Http::new(),
        cancel: CancellationToken::new(),
        stop: CancellationToken::new(),
        interrupt: Default::default(),
        clock: usher::clock::Clock::process(),
        backfill: None,
    };
    let t = Instant::now();
    let report = run_stream(&ctx, "bench").await;
    let secs = t.elapsed().as_secs_f64();
    let got: usize = sandbox
        .crm
        .received()
        .iter()
        .filter(|r| r.status == 200)
        .count();
    println!(
        "  {} ({:?}): {} records in {got} payloads to the CRM in {secs:.1}s: {:.0} records/s",
        report.outcome,
        report.error,
        report.counts.created,
        report.counts.created as f64 / secs
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use usher_sandbox::s360::webhook_contact;

    #[test]
    fn the_bench_body_is_the_fake_senders_record() {
        let a: serde_json::Value = serde_json::from_str(&super::contact_json(77)).unwrap();
        assert_eq!(a, webhook_contact(77));
    }
}
