//! Benchmark of the SeatGeek users → Halo stream: N change events for U users into an empty
//! Halo, the fakes in a separate process (`usher-sandbox serve --seatgeek-events N
//! --seatgeek-users U`), one run of the stream (`usher trigger`) under `/usr/bin/time -v`.
//! Prints wall time, events/s, usher's own CPU seconds (user + system) and peak RSS, and the
//! fakes' CPU seconds (from /proc), for each size, and usher's CPU over the fakes' (the fakes
//! do the same work every run, so that ratio compares runs on hosts of different speed).
//!
//! With `BENCH_POSTGRES=postgres://…` (e.g. `scripts/pg-test-cluster.sh start`) each size
//! runs twice more, interleaved: SQLite, PostgreSQL, SQLite, PostgreSQL (a fresh schema
//! each time), and the PostgreSQL server's CPU (every `postgres` process, from /proc) is
//! printed beside usher's, with PostgreSQL's wall over SQLite's.
//!
//! ```text
//! cargo build --release --workspace && cargo run --release -p usher-sandbox --example bench_seatgeek_halo
//! cargo run --release -p usher-sandbox --example bench_seatgeek_halo -- 100000:20000 1000000:200000
//! BENCH_POSTGRES=$(scripts/pg-test-cluster.sh start) cargo run --release -p usher-sandbox --example bench_seatgeek_halo -- 1000000:200000
//! ```

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn usher_bin() -> PathBuf {
    built("usher")
}

/// The fakes: `usher-sandbox serve`.
fn sandbox_bin() -> PathBuf {
    built("usher-sandbox")
}

/// target/release/examples/bench_seatgeek_halo → target/release/NAME (`cargo build --release
/// --workspace` builds both binaries).
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join(name))
        .expect("the binaries beside examples/");
    assert!(
        bin.is_file(),
        "{} is not built: cargo build --release --workspace",
        bin.display()
    );
    bin
}

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // After the name: state is field 0; utime is 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// utime + stime + the reaped children's cutime + cstime of a process, in seconds.
fn proc_cpu_with_children(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / 100.0
}

/// CPU seconds of every PostgreSQL server process: the postmaster, with the backends it
/// reaped (a run's connections end with it), and the backends still running.
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(proc_cpu_with_children)
        .sum()
}

/// A fresh schema on the server for one run; the URL that puts usher in it.
fn pg_schema(base: &str, n: u32) -> String {
    let schema = format!("bench_{}_{n}", std::process::id());
    let ok = Command::new("psql")
        .args(["-X", "-q", "-c"])
        .arg(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .arg(base)
        .status()
        .expect("psql");
    assert!(ok.success(), "psql could not create {schema}");
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-csearch_path%3D{schema}")
}

fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .unwrap_or("?")
}

fn wall_secs(s: &str) -> f64 {
    // h:mm:ss or m:ss.ss
    s.split(':').fold(0.0, |acc, part| {
        acc * 60.0 + part.parse::<f64>().unwrap_or(0.0)
    })
}

/// One run; returns its wall seconds.
fn run(events: u64, users: u64, postgres: Option<&str>) -> f64 {
    let bin = usher_bin();
    let mut sandbox = Command::new(sandbox_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--contacts", "0"])
        .args(["--seatgeek-events", &events.to_string()])
        .args(["--seatgeek-users", &users.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start usher-sandbox serve");
    let mut lines = BufReader::new(sandbox.stdout.take().expect("stdout")).lines();
    let (mut sg, mut halo) = (None, None);
    while sg.is_none() || halo.is_none() {
        let line = lines.next().expect("sandbox output").expect("a line");
        if let Some(u) = line.strip_prefix("seatgeek ") {
            sg = Some(u.to_string());
        }
        if let Some(u) = line.strip_prefix("halo ") {
            halo = Some(u.to_string());
        }
    }
    let (sg, halo) = (sg.unwrap(), halo.unwrap());
    let fake_cpu_before = proc_cpu(sandbox.id());
    let dir = std::env::temp_dir().join(format!("usher-bench-{}-{events}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sg-secret"), "sg-demo-secret\n").unwrap();
    std::fs::write(dir.join("halo-secret"), "halo-demo-secret\n").unwrap();
    std::fs::write(
        dir.join("usher.toml"),
        format!(
            r#"
[daemon]
state_dir = "{state}"
{pg}

[log]
level = "warn"

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

[streams.bench]
source = "seatgeek"
entity = "user"
target = "halo"
every = "15m"
page_size = 500

[streams.bench.static]
inactive = false

[streams.bench.halo]
default_site = 18
id_field = "custom:CFSeatGeekId"
batch_size = 500

[streams.bench.halo.custom_fields]
CFMarketingOptIn = "marketing_opt_in | string"
"#,
            state = dir.join("state").display(),
            pg = postgres
                .map(|u| format!("state = {u:?}"))
                .unwrap_or_default()
        ),
    )
    .unwrap();
    let pg_cpu_before = postgres.map(|_| postgres_cpu());
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(&bin)
        .arg("--config")
        .arg(dir.join("usher.toml"))
        .args(["trigger", "bench"])
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .expect("run /usr/bin/time -v usher trigger");
    // BENCH_RUST_LOG=usher=debug: the run's log kept for a look at where the time goes.
    if std::env::var("BENCH_RUST_LOG").is_ok() {
        let log = std::env::temp_dir().join(format!(
            "bench-usher-{}.log",
            if postgres.is_some() {
                "postgres"
            } else {
                "sqlite"
            }
        ));
        let _ = std::fs::write(&log, &out.stderr);
        println!("  the run's log: {}", log.display());
    }
    let wall = started.elapsed().as_secs_f64();
    let fake_cpu = proc_cpu(sandbox.id()) - fake_cpu_before;
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let user: f64 = field(&stderr, "User time (seconds):")
        .parse()
        .unwrap_or(0.0);
    let sys: f64 = field(&stderr, "System time (seconds):")
        .parse()
        .unwrap_or(0.0);
    let rss_kb: f64 = field(&stderr, "Maximum resident set size (kbytes):")
        .parse()
        .unwrap_or(0.0);
    let elapsed = wall_secs(field(
        &stderr,
        "Elapsed (wall clock) time (h:mm:ss or m:ss):",
    ));
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("bench:"))
        .unwrap_or("?");
    let backend = if postgres.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!("{events} events for {users} users, state on {backend}:");
    println!("  usher: {summary}");
    println!(
        "  wall {elapsed:.2} s ({wall:.2} s with process start), {:.0} events/s",
        events as f64 / elapsed.max(0.001)
    );
    println!(
        "  usher CPU {:.2} s (user {user:.2} + sys {sys:.2}) = {:.2} CPU s per million events",
        user + sys,
        (user + sys) * 1e6 / events as f64
    );
    println!("  usher peak RSS {:.1} MB", rss_kb / 1024.0);
    println!("  fakes' CPU during the run {fake_cpu:.2} s (separate process)");
    if let Some(before) = pg_cpu_before {
        println!(
            "  PostgreSQL's CPU during the run {:.2} s (every postgres process)",
            postgres_cpu() - before
        );
    }
    // The hosts these run on differ in speed by up to 2x from one day to the next; the fakes
    // do the same work every time, so usher's CPU over theirs compares runs across hosts.
    println!(
        "  usher CPU / fakes' CPU {:.2} (compares runs on different hosts)",
        (user + sys) / fake_cpu.max(0.01)
    );
    if !out.status.success() {
        println!("  usher exited with {:?}: {stdout}", out.status.code());
    }
    let _ = std::fs::remove_dir_all(&dir);
    elapsed
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<(u64, u64)> = if args.is_empty() {
        vec![(100_000, 20_000), (1_000_000, 200_000)]
    } else {
        args.iter()
            .map(|a| {
                let (e, u) = a.split_once(':').expect("EVENTS:USERS");
                (e.parse().expect("events"), u.parse().expect("users"))
            })
            .collect()
    };
    let postgres = std::env::var("BENCH_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty());
    let mut n = 0;
    for (e, u) in sizes {
        match &postgres {
            None => {
                run(e, u, None);
            }
            Some(base) => {
                let (mut lite, mut pg) = (Vec::new(), Vec::new());
                for _ in 0..2 {
                    lite.push(run(e, u, None));
                    n += 1;
                    pg.push(run(e, u, Some(&pg_schema(base, n))));
                }
                let ratios: Vec<String> = lite
                    .iter()
                    .zip(&pg)
                    .map(|(l, p)| format!("{:.2}", p / l.max(0.001)))
                    .collect();
                println!(
                    "{e} events: PostgreSQL wall / SQLite wall, pair by pair: {}",
                    ratios.join(", ")
                );
            }
        }
    }
}
