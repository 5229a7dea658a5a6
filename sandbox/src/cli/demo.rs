//! `usher-sandbox demo` and `usher-sandbox serve`: the bundled fakes with generated data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use figment::providers::Serialized;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{EX_DATAERR, EX_FAIL, EX_OK, report_problems};
use usher::config::{self, LogFormat};
use usher::engine::in_doubt::InDoubt;
use usher::engine::{RunCtx, lock, run_stream};
use usher::http::Http;
use usher::store::Store;
use usher_sandbox::Sandbox;

// Ticket Co x Airship
fn secret_file(config_file: &std::path::Path, name: &str) -> Option<String> {
    let p = config_file.parent()?.join("demo-secrets").join(name);
    Some(std::fs::read_to_string(p).ok()?.trim().to_string())
}

/// The bearer token the demo's fake CRM expects: the content of config/demo-secrets/crm-token.
fn demo_token(config_file: &std::path::Path) -> Option<String> {
    let p = config_file.parent()?.join("demo-secrets/crm-token");
    Some(std::fs::read_to_string(p).ok()?.trim().to_string())
}

/// The demo's configuration and secrets, built into the binary, so that `usher-sandbox demo`
/// runs from any folder.
const DEMO_TOML: &str = include_str!("../../../config/demo.toml");
const DEMO_SECRETS: &[(&str, &str)] = &[
    (
        "airship-token",
        include_str!("../../../config/demo-secrets/airship-token"),
    ),
    (
        "cdp-token",
        include_str!("../../../config/demo-secrets/cdp-token"),
    ),
    (
        "crm-token",
        include_str!("../../../config/demo-secrets/crm-token"),
    ),
    (
        "halo-secret",
        include_str!("../../../config/demo-secrets/halo-secret"),
    ),
    (
        "s360-hook-token",
        include_str!("../../../config/demo-secrets/s360-hook-token"),
    ),
    (
        "s360-partner-secret",
        include_str!("../../../config/demo-secrets/s360-partner-secret"),
    ),
    (
        "seatgeek-secret",
        include_str!("../../../config/demo-secrets/seatgeek-secret"),
    ),
    (
        "seatsio-secret-key",
        include_str!("../../../config/demo-secrets/seatsio-secret-key"),
    ),
    (
        "ticketco-token",
        include_str!("../../../config/demo-secrets/ticketco-token"),
    ),
];

/// The demo configuration in a checkout, relative to the working folder.
const CHECKOUT_DEMO: &str = "config/demo.toml";

/// Where the demo's configuration is, and its state when nobody said: `--demo-config`;
/// else `config/demo.toml` in this folder (a checkout: state in `./state/demo`); else the
/// built-in copy, written to a new folder under the temporary folder with the state beside
/// it (so that running from `/` or `$HOME` writes nothing there).
fn locate_demo(
    explicit: Option<PathBuf>,
    state: Option<PathBuf>,
) -> std::io::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(p) = explicit {
        return Ok((p, state));
    }
    let checkout = PathBuf::from(CHECKOUT_DEMO);
    if checkout.is_file() {
        return Ok((checkout, state));
    }
    let dir = write_builtin_demo(&std::env::temp_dir())?;
    Ok((
        dir.join("demo.toml"),
        state.or_else(|| Some(dir.join("state"))),
    ))
}

/// Writes the built-in demo (demo.toml, demo-secrets/) to a new folder in `parent`.
fn write_builtin_demo(parent: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = parent.join(format!("usher-demo-{}-{stamp}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir.join("demo-secrets"))?;
    let write = |path: PathBuf, text: &str| -> std::io::Result<()> {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?
            .write_all(text.as_bytes())
    };
    write(dir.join("demo.toml"), DEMO_TOML)?;
    for (name, text) in DEMO_SECRETS {
        write(dir.join("demo-secrets").join(name), text)?;
    }
    Ok(dir)
}

pub async fn demo(
    demo_config: Option<PathBuf>,
    contacts: u64,
    state_override: Option<PathBuf>,
) -> i32 {
    let (demo_config, state_override) = match locate_demo(demo_config, state_override) {
        Ok(found) => found,
        Err(e) => {
            eprintln!(
                "usher demo: cannot write the built-in demo configuration under {}: {e}",
                std::env::temp_dir().display()
            );
            return EX_FAIL;
        }
    };
    println!("usher demo: configuration {}", demo_config.display());
    let sandbox = match Sandbox::start("127.0.0.1:0".parse().expect("static address")).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usher demo: cannot start the fakes on 127.0.0.1: {e}");
            return EX_FAIL;
        }
    };
    sandbox.crm.add_contacts(contacts);
    // Two records the mapping refuses (no e-mail): they go to dead letters, the rest goes on.
    sandbox.crm.push_contact(json!({"id": "CRM-NOEMAIL-1", "first_name": "No", "last_name": "Email", "email": null, "updated_at": "2026-06-01T10:00:00Z"}));
    sandbox.crm.push_contact(json!({"id": "CRM-NOEMAIL-2", "first_name": "Blank", "last_name": "Email", "email": "   ", "updated_at": "2026-06-01T10:00:01Z"}));
    // Ticket Co x Airship: 40 events around today at two venues, 400 bookings, and one
    // booking with neither e-mail nor mobile (it goes to dead letters).
    TicketCoSeed {
        ticketco_events: 40,
        ticketco_bookings: 400,
        ticketco_first_day: Some(
            usher::clock::Clock::process().now().date_naive() - chrono::Days::new(1),
        ),
        ticketco_days: 30,
        ticketco_venues: "Oslo Golf,Bergen Bowling".into(),
        ticketco_token: secret_file(&demo_config, "ticketco-token"),
        airship_token: secret_file(&demo_config, "airship-token"),
        airship_account: 1,
    }
    .apply(&sandbox);
    sandbox
        .ticketco
        .add_item(json!({"ref_number": "TC-NOCONTACT", "event_id": 100000,
        "status": "paid", "quantity": 1, "buyer_first_name": "No", "buyer_last_name": "Contact"}));
    // SeatGeek / Halo
    super::seatgeek_halo_demo::seed_demo(&sandbox);
    if let Some(token) = demo_token(&demo_config) {
        sandbox
            .crm
            .require_header("authorization", &format!("Bearer {token}"));
    }

    // Integration settings branch: the CDP tenant and seats.io key the demo config uses.
    seed_settings(&sandbox, &demo_config);

    // Point every connection of the demo config at the sandbox, keeping each one's path.
    let text = std::fs::read_to_string(&demo_config).unwrap_or_default();
    let table: toml::Table = toml::from_str(&text).unwrap_or_default();
    let mut overrides = serde_json::Map::new();
    if let Some(conns) = table.get("connections").and_then(|c| c.as_table()) {
        for (name, c) in conns {
            let path = c
                .get("base_url")
                .and_then(|u| u.as_str())
                .and_then(|u| url::Url::parse(u).ok())
                .map(|u| u.path().to_string())
                .unwrap_or_else(|| "/crm".into());
            overrides.insert(
                name.clone(),
                json!({ "base_url": format!("http://{}{path}", sandbox.addr) }),
            );
        }
    }
    let source = config::Source {
        main_file: demo_config.clone(),
        env_overrides: false,
        state_dir_override: state_override,
        read_secrets: true,
    };
    let mut layer = json!({ "connections": overrides });
    // S-360: the receiver listens on a free port in the demo.
    if table.contains_key("receiver") {
        layer["receiver"] = super::demo_s360::listen_override();
    }
    let extra = figment::Figment::from(Serialized::defaults(layer));
    let config = match config::load_with(&source, extra) {
        Ok(c) => c,
        Err(p) => return report_problems(&p),
    };
    let _log = usher::logging::init(&config.log, LogFormat::Auto);
    let state_dir = config.daemon.state_dir.clone();
    let _lock = match lock::acquire(&state_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("usher demo: {e}");
            return EX_FAIL;
        }
    };
    // A fresh state each time, so that the demo always shows a first import.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(state_dir.join(format!("{}{suffix}", usher::store::DB_FILE)));
    }
    let store = match Store::open(&state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usher demo: {e}");
            return EX_DATAERR;
        }
    };
    println!(
        "usher demo: fakes on http://{}, state in {}",
        sandbox.addr,
        state_dir.display()
    );
    println!(
        "  the fake CRM's feed holds {} contacts ({} of them without an e-mail)",
        sandbox.crm.contact_count(),
        2
    );
    // S-360: S-360's webhooks into the receiver, offers and known contacts into the fakes.
    for line in super::demo_s360::seed(&config, &store, &sandbox).await {
        println!("  {line}");
    }
    let config = Arc::new(config);
    let http = usher::engine::budget_log::http_client(&store)
        .await
        .unwrap_or_else(|_| Http::new());
    let cancel = CancellationToken::new();
    let mut failed = false;
    for spec in config.streams.values() {
        if !spec.enabled {
            println!("\n{}: disabled, not run", spec.name);
            continue;
        }
        let ctx = RunCtx {
            kind_run: usher::streams::RUN,
            store: store.clone(),
            config: config.clone(),
            doubt: InDoubt::new(&store, &spec.name, config.daemon.settle_margin),
            spec: spec.clone(),
            http: http.clone(),
            cancel: cancel.clone(),
            stop: cancel.clone(),
            interrupt: Default::default(),
            clock: usher::clock::Clock::process(),
            backfill: None,
        };
        // SeatGeek / Halo
        if let usher::streams::options::StreamKind::SeatGeekToHalo(_) = &spec.kind {
            let r = run_stream(&ctx, "demo").await;
            failed |= super::seatgeek_halo_demo::report(&sandbox, spec, &r);
            continue;
        }
        let before = sandbox.crm.received().len();
        let r = run_stream(&ctx, "demo").await;
        let got = &sandbox.crm.received()[before..];
        let records: usize = got
            .iter()
            .filter(|p| p.status == 200)
            .map(|p| {
                serde_json::from_slice::<Vec<serde_json::Value>>(&p.body)
                    .map(|v| v.len())
                    .unwrap_or(0)
            })
            .sum();
        let c = r.counts;
        println!(
            "\n{}: {} -> {}  ({})",
            spec.name, spec.source, spec.target, r.outcome
        );
        println!(
            "  pulled {} from {}, queued {}, created {}, updated {}, dead-lettered {}, skipped {} in {:.2}s",
            c.pulled, spec.source, c.queued, c.created, c.updated, c.failed, c.skipped, r.seconds
        );
        let paths: std::collections::BTreeSet<_> =
            got.iter().map(|p| format!("/hooks/{}", p.path)).collect();
        // Only webhook targets show what the fake CRM received; the others are reported from
        // their own fakes below (or by their created/updated counts).
        if !got.is_empty() {
            println!(
                "  {} received {} payloads ({} records) at {}",
                spec.target,
                got.len(),
                records,
                paths.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(first) = got.first()
            && let Ok(v) = serde_json::from_slice::<Vec<serde_json::Value>>(&first.body)
            && let Some(rec) = v.first()
        {
            println!("  first record as delivered: {rec}");
        }
        // Ticket Co x Airship
        if matches!(
            spec.kind,
            usher::streams::options::StreamKind::TicketCoToAirship(_)
        ) {
            println!(
                "  airship now holds {} contacts and {} bookings ({} writes)",
                sandbox.airship.contacts().len(),
                sandbox.airship.booking_count(),
                sandbox.airship.writes()
            );
        }
        if let usher::streams::options::StreamKind::FeedToCdp { .. } = &spec.kind {
            let batches = sandbox.cdp.batches();
            println!(
                "  the CDP holds {} events from {} POSTs (at most 100 each); first: {}",
                batches.iter().map(Vec::len).sum::<usize>(),
                batches.len(),
                batches
                    .first()
                    .and_then(|b| b.first())
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
        if let Some(e) = &r.error {
            println!("  error: {e}");
            failed = true;
        }
    }
    // Integration settings: each company's integrations and the online checks.
    for i in &config.settings.integrations {
        println!(
            "
integration {} of company {}: {}",
            i.integration, i.company, i.why
        );
    }
    for conn in config.connections.values() {
        if matches!(
            conn.kind,
            usher::config::ConnectionKind::Seatsio | usher::config::ConnectionKind::Cdp
        ) {
            let v = usher::connectors::check_online_in(&http, conn, &config, &cancel).await;
            let message = match &v {
                usher::connectors::Verdict::Valid(m) => m.clone(),
                other => other.to_string(),
            };
            let _ = store
                .record_online_check(&conn.name, conn.kind.as_str(), v.is_valid(), &message)
                .await;
            println!("connection {} ({}): {v}", conn.name, conn.kind.as_str());
        }
    }
    println!(
        "\nstate written to {}; try `usher --config {} --state-dir {} status`",
        store.describe(),
        demo_config.display(),
        state_dir.display()
    );
    sandbox.stop();
    if failed { EX_FAIL } else { EX_OK }
}

// Ticket Co x Airship
/// `usher-sandbox serve` flags that seed the fake Ticket Co and Airship (the benchmark uses them).
#[derive(clap::Args, Debug, Clone)]
pub struct TicketCoSeed {
    /// Ticket Co events to generate (spread over `--ticketco-days` days).
    #[arg(long, default_value_t = 0)]
    pub ticketco_events: u64,
    /// Ticket Co booking lines to generate, spread evenly over the events.
    #[arg(long, default_value_t = 0)]
    pub ticketco_bookings: u64,
    /// The first event day (YYYY-MM-DD); default yesterday (UTC).
    #[arg(long)]
    pub ticketco_first_day: Option<chrono::NaiveDate>,
    /// Days the generated events are spread over.
    #[arg(long, default_value_t = 30)]
    pub ticketco_days: u64,
    /// Venue names, comma-separated; each is also an Airship unit (IDs 1, 2, …).
    #[arg(long, default_value = "Oslo Golf,Bergen Bowling")]
    pub ticketco_venues: String,
    /// Token the fake Ticket Co requires (`?token=`).
    #[arg(long)]
    pub ticketco_token: Option<String>,
    /// Bearer token the fake Airship requires.
    #[arg(long)]
    pub airship_token: Option<String>,
    /// The account ID the fake Airship answers for.
    #[arg(long, default_value_t = 1)]
    pub airship_account: i64,
}

impl TicketCoSeed {
    fn apply(&self, s: &Sandbox) {
        let venues: Vec<&str> = self
            .ticketco_venues
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        for (i, v) in venues.iter().enumerate() {
            s.airship.add_unit(i as i64 + 1, v);
        }
        if let Some(t) = &self.ticketco_token {
            s.ticketco.require_token(t);
        }
        if let Some(t) = &self.airship_token {
            s.airship.require_token(t, self.airship_account);
        }
        if self.ticketco_bookings > 10_000 {
            s.airship.record_bodies(false);
        }
        let first = self
            .ticketco_first_day
            .unwrap_or_else(|| chrono::Utc::now().date_naive() - chrono::Days::new(1));
        s.ticketco.generate(
            self.ticketco_events,
            self.ticketco_bookings,
            first,
            self.ticketco_days,
            &venues,
            "+00:00",
        );
    }
}

pub async fn sandbox(
    listen: SocketAddr,
    contacts: u64,
    seed: TicketCoSeed,
    seatgeek_events: u64,
    seatgeek_users: u32,
) -> i32 {
    usher::logging::init_cli();
    let sandbox = match Sandbox::start(listen).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usher-sandbox serve: cannot listen on {listen}: {e}");
            return EX_FAIL;
        }
    };
    sandbox.crm.add_contacts(contacts);
    // Ticket Co x Airship
    seed.apply(&sandbox);
    // SeatGeek / Halo
    super::seatgeek_halo_demo::seed_sandbox(&sandbox, seatgeek_events, seatgeek_users);
    println!("crm {}", sandbox.url("crm"));
    println!("ticketco {}", sandbox.url("ticketco"));
    println!("airship {}", sandbox.url("airship"));
    println!("airship-stats {}/_stats", sandbox.url("airship"));
    println!("cdp {}", sandbox.url("cdp"));
    println!("seatsio {}/eu", sandbox.url("seatsio"));
    super::seatgeek_halo_demo::print_urls(&sandbox);
    let _ = tokio::signal::ctrl_c().await;
    EX_OK
}

/// Integration settings branch: the fake CDP knows the demo's tenant, token and event type,
/// and the fake seats.io the demo's secret key (read from config/demo-secrets).
fn seed_settings(sandbox: &Sandbox, config_file: &std::path::Path) {
    let secret = |name: &str| {
        config_file
            .parent()
            .and_then(|d| std::fs::read_to_string(d.join("demo-secrets").join(name)).ok())
            .map(|s| s.trim().to_string())
    };
    if let Some(token) = secret("cdp-token") {
        sandbox
            .cdp
            .add_tenant("0d1b2c3d-4e5f-4a7b-8c9d-0e1f2a3b4c5d", &token);
    }
    sandbox
        .cdp
        .add_event_type("6f0e4c4a-2b1d-4a8e-9c3f-5d7e8f9a0b1c");
    if let Some(key) = secret("seatsio-secret-key") {
        sandbox.seatsio.add_secret_key("eu", &key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_demo_is_the_checkouts_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_builtin_demo(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(written.join("demo.toml")).unwrap(),
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/demo.toml"))
                .unwrap()
        );
        let shipped = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/demo-secrets"
        ))
        .unwrap()
        .count();
        assert_eq!(DEMO_SECRETS.len(), shipped, "every demo secret is built in");
        for (name, _) in DEMO_SECRETS {
            assert!(written.join("demo-secrets").join(name).is_file(), "{name}");
        }
    }
}
