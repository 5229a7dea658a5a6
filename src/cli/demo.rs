//! `usher demo` and `usher sandbox`: the bundled fakes with generated data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use figment::providers::Serialized;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{EX_DATAERR, EX_FAIL, EX_OK, report_problems};
use crate::config::{self, LogFormat};
use crate::engine::{RunCtx, lock, run_stream};
use crate::http::Http;
use crate::sandbox::Sandbox;
use crate::store::Store;

/// The bearer token the demo's fake CRM expects: the content of config/demo-secrets/crm-token.
fn demo_token(config_file: &std::path::Path) -> Option<String> {
    let p = config_file.parent()?.join("demo-secrets/crm-token");
    Some(std::fs::read_to_string(p).ok()?.trim().to_string())
}

pub async fn demo(demo_config: PathBuf, contacts: u64, state_override: Option<PathBuf>) -> i32 {
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
    // SeatGeek / Halo
    super::seatgeek_halo_demo::seed_demo(&sandbox);
    if let Some(token) = demo_token(&demo_config) {
        sandbox
            .crm
            .require_header("authorization", &format!("Bearer {token}"));
    }

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
    };
    let extra = figment::Figment::from(Serialized::defaults(json!({ "connections": overrides })));
    let config = match config::load_with(&source, extra) {
        Ok(c) => c,
        Err(p) => return report_problems(&p),
    };
    let _log = crate::logging::init(&config.log, LogFormat::Auto);
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
        let _ = std::fs::remove_file(state_dir.join(format!("{}{suffix}", crate::store::DB_FILE)));
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
    let config = Arc::new(config);
    let http = Http::new();
    let cancel = CancellationToken::new();
    let mut failed = false;
    for spec in config.streams.values() {
        if !spec.enabled {
            println!("\n{}: disabled, not run", spec.name);
            continue;
        }
        let ctx = RunCtx {
            store: store.clone(),
            config: config.clone(),
            spec: spec.clone(),
            http: http.clone(),
            cancel: cancel.clone(),
            interrupt: Default::default(),
        };
        // SeatGeek / Halo
        if let crate::config::StreamKind::SeatGeekToHalo(_) = &spec.kind {
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
            "  pulled {} from {}, queued {}, delivered {}, dead-lettered {}, skipped {} in {:.2}s",
            c.pulled, spec.source, c.queued, c.created, c.failed, c.skipped, r.seconds
        );
        let paths: std::collections::BTreeSet<_> =
            got.iter().map(|p| format!("/hooks/{}", p.path)).collect();
        println!(
            "  {} received {} payloads ({} records) at {}",
            spec.target,
            got.len(),
            records,
            paths.into_iter().collect::<Vec<_>>().join(", ")
        );
        if let Some(first) = got.first()
            && let Ok(v) = serde_json::from_slice::<Vec<serde_json::Value>>(&first.body)
            && let Some(rec) = v.first()
        {
            println!("  first record as delivered: {rec}");
        }
        if let Some(e) = &r.error {
            println!("  error: {e}");
            failed = true;
        }
    }
    println!(
        "\nstate written to {}; try `usher --config {} --state-dir {} status`",
        store.path().display(),
        demo_config.display(),
        state_dir.display()
    );
    sandbox.stop();
    if failed { EX_FAIL } else { EX_OK }
}

pub async fn sandbox(
    listen: SocketAddr,
    contacts: u64,
    seatgeek_events: u64,
    seatgeek_users: u32,
) -> i32 {
    crate::logging::init_cli();
    let sandbox = match Sandbox::start(listen).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usher sandbox: cannot listen on {listen}: {e}");
            return EX_FAIL;
        }
    };
    sandbox.crm.add_contacts(contacts);
    // SeatGeek / Halo
    super::seatgeek_halo_demo::seed_sandbox(&sandbox, seatgeek_events, seatgeek_users);
    println!("crm {}", sandbox.url("crm"));
    super::seatgeek_halo_demo::print_urls(&sandbox);
    let _ = tokio::signal::ctrl_c().await;
    EX_OK
}
