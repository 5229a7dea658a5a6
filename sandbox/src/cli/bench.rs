//! `usher-sandbox bench-scale`: start a daemon with N streams over M connections against the fake
//! CRM (in this process; usher itself is a child process, measured from /proc), and print
//! start-to-READY, SIGHUP reload time, RSS, CPU while idle, CPU for one tick of every stream
//! with nothing changed, and SIGTERM-to-exit with every stream mid-run.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{EX_FAIL, EX_OK};
use usher::metrics::ProcStat;
use usher_sandbox::Sandbox;

fn wait_notify(sock: &UnixDatagram, what: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains(what)
        {
            return Some(Instant::now());
        }
    }
    None
}

fn count_runs(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.busy_timeout(Duration::from_secs(5))?;
            c.query_row(sql, [], |r| r.get(0))
        })
        .unwrap_or(0)
}

fn wait_runs(db: &Path, at_least: i64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if count_runs(db, "SELECT COUNT(*) FROM runs WHERE outcome != 'running'") >= at_least {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

pub async fn scale(streams: u32, connections: u32, idle_secs: u64) -> i32 {
    let sandbox = match Sandbox::start("127.0.0.1:0".parse().expect("static")).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: cannot start the fakes: {e}");
            return EX_FAIL;
        }
    };
    tokio::task::block_in_place(|| run_scale(&sandbox, streams, connections, idle_secs))
}

fn run_scale(sandbox: &Sandbox, streams: u32, connections: u32, idle_secs: u64) -> i32 {
    let dir = match tempfile_dir() {
        Some(d) => d,
        None => return EX_FAIL,
    };
    let state = dir.join("state");
    let mut cfg = format!(
        "[daemon]\nstate_dir = {:?}\ncontrol_poll = \"2s\"\nmax_concurrent_runs = 16\n\n[log]\nlevel = \"warn\"\n\n",
        state.display().to_string()
    );
    for c in 0..connections {
        cfg.push_str(&format!(
            "[connections.crm{c}]\nkind = \"crm\"\nbase_url = \"http://{}/crm\"\n\n",
            sandbox.addr
        ));
    }
    for s in 0..streams {
        let c = s % connections;
        cfg.push_str(&format!(
            "[streams.s{s}]\nsource = \"crm{c}\"\nentity = \"contact\"\ntarget = \"crm{c}\"\nevery = \"15m\"\njitter = \"0s\"\n[streams.s{s}.webhook]\nurl = \"/hooks/s{s}\"\n\n"
        ));
    }
    let config = dir.join("usher.toml");
    if std::fs::write(&config, &cfg).is_err() {
        return EX_FAIL;
    }
    let sock_path = dir.join("notify.sock");
    let Ok(sock) = UnixDatagram::bind(&sock_path) else {
        eprintln!("bench: cannot bind the notify socket");
        return EX_FAIL;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    // The product binary, built beside this one (`target/<profile>/usher`).
    let exe = std::env::current_exe()
        .map(|p| p.with_file_name("usher"))
        .unwrap_or_else(|_| "usher".into());
    let spawn = || {
        Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("NOTIFY_SOCKET", &sock_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
    };
    let db = state.join("usher.db");
    println!(
        "bench-scale: {streams} streams over {connections} connections, fakes on {}",
        sandbox.addr
    );

    // 1. Cold start (no state): READY, then every stream's first run.
    let t0 = Instant::now();
    let Ok(mut child) = spawn() else {
        return EX_FAIL;
    };
    let Some(ready) = wait_notify(&sock, "READY=1", Duration::from_secs(60)) else {
        eprintln!("bench: no READY=1");
        return EX_FAIL;
    };
    println!(
        "start to READY (cold, empty state):      {:>8.1} ms",
        (ready - t0).as_secs_f64() * 1000.0
    );
    let pid = child.id();
    let cpu0 = ProcStat::read_pid(pid).unwrap_or_default();
    let first_runs = Instant::now();
    if !wait_runs(&db, streams as i64, Duration::from_secs(300)) {
        eprintln!("bench: the first runs did not finish");
        let _ = child.kill();
        return EX_FAIL;
    }
    let cpu1 = ProcStat::read_pid(pid).unwrap_or_default();
    println!(
        "first run of every stream:                {:>8.2} s wall, {:.2} s CPU",
        first_runs.elapsed().as_secs_f64(),
        cpu1.cpu_seconds() - cpu0.cpu_seconds()
    );

    // 2. Idle between ticks (slots are 15 minutes apart; none falls in the window unless
    //    the window crosses a quarter hour, which is reported).
    std::thread::sleep(Duration::from_secs(1));
    let runs_before = count_runs(&db, "SELECT COUNT(*) FROM runs");
    let a = ProcStat::read_pid(pid).unwrap_or_default();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let b = ProcStat::read_pid(pid).unwrap_or_default();
    let wall = t.elapsed().as_secs_f64();
    let runs_after = count_runs(&db, "SELECT COUNT(*) FROM runs");
    println!(
        "CPU while idle ({idle_secs} s window):            {:>8.3} % of a core{}",
        (b.cpu_seconds() - a.cpu_seconds()) / wall * 100.0,
        if runs_after != runs_before {
            " (a scheduled tick fell in the window)"
        } else {
            ""
        }
    );
    println!(
        "RSS after the first runs:                 {:>8.1} MB",
        b.rss_bytes as f64 / 1e6
    );

    // 3. One tick of every stream with nothing changed (trigger control files, SIGUSR1).
    let done_before = count_runs(&db, "SELECT COUNT(*) FROM runs WHERE outcome != 'running'");
    let c0 = ProcStat::read_pid(pid).unwrap_or_default();
    let t = Instant::now();
    for s in 0..streams {
        let _ = usher::engine::control::write(
            &state,
            usher::engine::control::Action::Trigger,
            &format!("s{s}"),
            "bench",
        );
    }
    signal(pid, rustix::process::Signal::USR1);
    if !wait_runs(&db, done_before + streams as i64, Duration::from_secs(300)) {
        eprintln!("bench: the triggered runs did not finish");
    }
    let c1 = ProcStat::read_pid(pid).unwrap_or_default();
    println!(
        "one tick of every stream, nothing changed: {:>8.2} s wall, {:.3} s CPU ({:.2} ms CPU per stream)",
        t.elapsed().as_secs_f64(),
        c1.cpu_seconds() - c0.cpu_seconds(),
        (c1.cpu_seconds() - c0.cpu_seconds()) * 1000.0 / streams as f64
    );

    // 4. Reload.
    std::thread::sleep(Duration::from_millis(500));
    while wait_notify(&sock, "", Duration::from_millis(50)).is_some() {}
    let t = Instant::now();
    signal(pid, rustix::process::Signal::HUP);
    match wait_notify(&sock, "READY=1", Duration::from_secs(60)) {
        Some(r) => println!(
            "SIGHUP to READY, nothing changed:         {:>8.1} ms",
            (r - t).as_secs_f64() * 1000.0
        ),
        None => println!("SIGHUP to READY (reload):                 no READY=1"),
    }
    // A reload that changes every stream's schedule (all jobs re-armed).
    let _ = std::fs::write(&config, cfg.replace("every = \"15m\"", "every = \"10m\""));
    while wait_notify(&sock, "", Duration::from_millis(50)).is_some() {}
    let t = Instant::now();
    signal(pid, rustix::process::Signal::HUP);
    match wait_notify(&sock, "READY=1", Duration::from_secs(60)) {
        Some(r) => println!(
            "SIGHUP to READY, every schedule changed:  {:>8.1} ms",
            (r - t).as_secs_f64() * 1000.0
        ),
        None => println!("SIGHUP to READY (all changed): no READY=1"),
    }
    let m = ProcStat::read_pid(pid).unwrap_or_default();
    println!(
        "RSS now / peak:                           {:>8.1} MB / {:.1} MB",
        m.rss_bytes as f64 / 1e6,
        m.peak_rss_bytes as f64 / 1e6
    );

    // 5. Warm restart (state present): READY.
    signal(pid, rustix::process::Signal::TERM);
    let _ = child.wait();
    let t0 = Instant::now();
    let Ok(mut child) = spawn() else {
        return EX_FAIL;
    };
    match wait_notify(&sock, "READY=1", Duration::from_secs(60)) {
        Some(r) => println!(
            "start to READY (warm, state present):     {:>8.1} ms",
            (r - t0).as_secs_f64() * 1000.0
        ),
        None => println!("start to READY (warm): no READY=1"),
    }

    // 6. SIGTERM with every stream mid-run (slow webhook answers keep them busy).
    sandbox.crm.add_contacts(200);
    sandbox.crm.faults.push(
        "crm.hook",
        usher_sandbox::Fault::Slow(Duration::from_millis(200)),
        100_000,
    );
    for s in 0..streams {
        let _ = usher::engine::control::write(
            &state,
            usher::engine::control::Action::Trigger,
            &format!("s{s}"),
            "bench",
        );
    }
    signal(child.id(), rustix::process::Signal::USR1);
    std::thread::sleep(Duration::from_secs(2));
    let running = count_runs(&db, "SELECT COUNT(*) FROM runs WHERE outcome = 'running'");
    let t = Instant::now();
    signal(child.id(), rustix::process::Signal::TERM);
    let status = child.wait();
    println!(
        "SIGTERM to exit with {running} runs in flight:  {:>8.2} s (exit {:?}; the unit allows 90 s)",
        t.elapsed().as_secs_f64(),
        status.ok().and_then(|s| s.code())
    );
    let left = count_runs(&db, "SELECT COUNT(*) FROM runs WHERE outcome = 'running'");
    println!("runs left unfinished after SIGTERM:       {left:>8}");
    sandbox.crm.faults.clear();
    let _ = std::fs::remove_dir_all(&dir);
    EX_OK
}

fn tempfile_dir() -> Option<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("usher-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).ok()?;
    Some(d)
}
