//! Integration settings and the CDP target, measured (not asserted):
//! - config load time with N companies (reseller, flags, a CDP block, a CDP connection and a
//!   CRM → CDP stream each) against N plain CRM → webhook streams, median of 5 loads;
//! - throughput of one CRM → CDP run against the fakes, against a CRM → webhook run of the
//!   same records, page and payload sizes (100 records per POST), in one process.
//!
//! `cargo run --release -p usher-sandbox --example bench_settings -- [N] [CONTACTS]` (defaults 1000, 20000).

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use usher::config::{self, Source};
use usher::engine::{RunCtx, run_stream};
use usher::http::Http;
use usher::store::Store;
use usher_sandbox::Sandbox;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const EVENT: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn header(dir: &std::path::Path) -> String {
    format!(
        "[daemon]\nstate_dir = {:?}\n[log]\nlevel = \"error\"\n",
        dir.join("state").display().to_string()
    )
}

fn plain(dir: &std::path::Path, base: &str, n: usize) -> String {
    let mut t = header(dir);
    t += &format!("[connections.crm]\nkind = \"crm\"\nbase_url = \"{base}/crm\"\n");
    for i in 0..n {
        t += &format!(
            "[streams.s{i}]\nsource = \"crm\"\nentity = \"contact\"\ntarget = \"crm\"\nevery = \"15m\"\npage_size = 1000\nmax_per_payload = 100\nmax_per_run = 1000000\n[streams.s{i}.webhook]\nurl = \"/hooks/s{i}\"\n[streams.s{i}.mapping]\nEmail = \"email | trim | lowercase | required\"\n"
        );
    }
    t
}

fn companies(dir: &std::path::Path, base: &str, n: usize) -> String {
    let mut t = header(dir);
    t += &format!(
        "[connections.crm]\nkind = \"crm\"\nbase_url = \"{base}/crm\"\n[resellers.agency]\nflags = [\"cdp\"]\n"
    );
    for i in 0..n {
        t += &format!(
            "[companies.c{i}]\nreseller = \"agency\"\nflags = [\"cdp\"]\n[companies.c{i}.integrations.cdp]\nenabled = true\n\
             [connections.cdp{i}]\nkind = \"cdp\"\ncompany = \"c{i}\"\nbase_url = \"{base}/cdp\"\nproduct_token_file = \"token\"\ntenant_guid = \"{TENANT}\"\n\
             [streams.s{i}]\nsource = \"crm\"\nentity = \"contact\"\ntarget = \"cdp{i}\"\nevery = \"15m\"\npage_size = 1000\nmax_per_payload = 100\nmax_per_run = 1000000\n[streams.s{i}.cdp]\nevent_type_id = \"{EVENT}\"\n[streams.s{i}.mapping]\nEmail = \"email | trim | lowercase | required\"\n"
        );
    }
    t
}

fn median_load(path: &std::path::Path) -> (f64, config::Config) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let t = Instant::now();
        let c = config::load(&Source {
            main_file: path.to_path_buf(),
            env_overrides: false,
            state_dir_override: None,
            read_secrets: true,
        })
        .unwrap_or_else(|p| panic!("{:?}", p.first()));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        last = Some(c);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[2], last.unwrap())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(1000);
    let contacts = args.get(1).copied().unwrap_or(20_000);
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(contacts as u64);
    s.cdp.add_tenant(TENANT, "tok");
    let base = format!("http://{}", s.addr);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "tok\n").unwrap();

    let p1 = dir.path().join("plain.toml");
    std::fs::write(&p1, plain(dir.path(), &base, n)).unwrap();
    let p2 = dir.path().join("companies.toml");
    std::fs::write(&p2, companies(dir.path(), &base, n)).unwrap();
    let (plain_ms, plain_cfg) = median_load(&p1);
    let (comp_ms, comp_cfg) = median_load(&p2);
    println!(
        "config load, median of 5: {n} webhook streams {plain_ms:.1} ms; {n} companies with a CDP block, connection and stream {comp_ms:.1} ms (ratio {:.2})",
        comp_ms / plain_ms
    );

    for (label, cfg, stream) in [
        ("crm → webhook", plain_cfg, "s0"),
        ("crm → cdp", comp_cfg, "s0"),
    ] {
        let state = dir.path().join(format!("state-{}", label.len()));
        std::fs::create_dir_all(&state).unwrap();
        let store = Store::open(&state).unwrap();
        let cfg = Arc::new(cfg);
        let ctx = RunCtx {
            kind_run: usher::streams::RUN,
            doubt: usher::engine::in_doubt::InDoubt::new(&store, stream, cfg.daemon.settle_margin),
            store,
            spec: cfg.streams[stream].clone(),
            config: cfg.clone(),
            http: Http::new(),
            cancel: CancellationToken::new(),
            stop: CancellationToken::new(),
            interrupt: Default::default(),
            clock: usher::clock::Clock::process(),
            backfill: None,
        };
        let t = Instant::now();
        let r = run_stream(&ctx, "bench").await;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{label}: {} records delivered in {secs:.2} s ({:.0} records/s), outcome {}",
            r.counts.created,
            r.counts.created as f64 / secs,
            r.outcome
        );
    }
    println!(
        "CDP POSTs: {} (at most 100 events each)",
        s.cdp.batches().len()
    );
}
