//! Operations: /metrics and /healthz on the loopback port, and the dead-letters commands.

mod common;

use std::time::Duration;

use common::{Env, crm_stream_config, query_i64, stdout, wait_until};
use serde_json::json;
use usher_sandbox::Sandbox;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn with_required_email(cfg: &str) -> String {
    format!(
        "{cfg}\n[streams.contacts.mapping]\nid = \"id\"\nemail = \"email | trim | lowercase | required\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_health_on_the_loopback_port() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(50);
    s.crm.push_contact(
        json!({"id": "NOEMAIL", "email": null, "updated_at": "2026-06-01T10:00:00Z"}),
    );
    let env = Env::new();
    let port = free_port();
    env.write_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
        with_required_email(&crm_stream_config(
            &format!("http://{}", s.addr),
            "1h",
            1000,
            50
        ))
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s
        .crm
        .accepted_records()
        .len()
        == 50));
    let client = reqwest::Client::new();
    let mut text = String::new();
    for _ in 0..100 {
        text = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("usher_records_pulled_total{stream=\"contacts\"} 51") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for needle in [
        "usher_records_pulled_total{stream=\"contacts\"} 51",
        "usher_records_written_total{stream=\"contacts\"} 50",
        "usher_records_dead_lettered_total{stream=\"contacts\"} 1",
        "usher_dead_letters{stream=\"contacts\"} 1",
        "usher_outbox_payloads{stream=\"contacts\"} 0",
        "usher_cursor_lag_seconds{stream=\"contacts\"}",
        "usher_last_success_timestamp_seconds{stream=\"contacts\"}",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    let h = client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthz_says_why_when_a_stream_keeps_failing() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(5);
    s.crm.refuse_next(1000, 500);
    let env = Env::new();
    let port = free_port();
    env.write_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
        crm_stream_config(&format!("http://{}", s.addr), "1s", 1000, 50)
    ));
    let text = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        text.replace("shutdown_timeout", "health_failures = 2\nshutdown_timeout"),
    )
    .unwrap();
    let d = env.spawn_daemon();
    d.wait_ready();
    let client = reqwest::Client::new();
    let mut body = serde_json::Value::Null;
    let ok = {
        let mut ok = false;
        for _ in 0..100 {
            let r = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .unwrap();
            if r.status() == 503 {
                body = r.json().await.unwrap();
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok
    };
    assert!(ok, "healthz turned 503: {}", d.log());
    let reason = body["reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("stream contacts: the last 2 runs failed"),
        "{reason}"
    );
    assert!(reason.contains("refused"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_list_retry_and_drop() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(3);
    s.crm.push_contact(
        json!({"id": "NOEMAIL-1", "email": null, "updated_at": "2026-06-01T10:00:00Z"}),
    );
    s.crm.push_contact(
        json!({"id": "NOEMAIL-2", "email": "  ", "updated_at": "2026-06-01T10:00:00Z"}),
    );
    let env = Env::new();
    let base = crm_stream_config(&format!("http://{}", s.addr), "1h", 1000, 50);
    env.write_config(&with_required_email(&base));
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    assert_eq!(s.crm.accepted_records().len(), 3);
    let list = stdout(&env.cli(&["dead-letters", "list", "contacts"]));
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(
        list.contains("NOEMAIL-1") && list.contains("`email`"),
        "{list}"
    );

    // Retried with the mapping unchanged: they fail again and stay.
    assert_eq!(
        env.cli(&["dead-letters", "retry", "contacts"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM dead_letters"),
        2
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM dead_letters WHERE retry_requested = 1"
        ),
        0
    );

    // The operator relaxes the mapping and retries one: it goes through.
    env.write_config(&format!("{base}\n[streams.contacts.mapping]\nid = \"id\"\nemail = \"email | trim | default:unknown\"\n"));
    let id = query_i64(&env.db_path(), "SELECT MIN(id) FROM dead_letters").to_string();
    assert_eq!(
        env.cli(&["dead-letters", "retry", "contacts", "--id", &id])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(env.cli(&["trigger", "contacts"]).status.code(), Some(0));
    let ids: Vec<String> = s
        .crm
        .accepted_records()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"NOEMAIL-1".to_string()), "{ids:?}");
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM dead_letters"),
        1
    );

    // Drop the rest; every action is in the audit trail.
    assert_eq!(
        env.cli(&["dead-letters", "drop", "contacts", "--all"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        query_i64(&env.db_path(), "SELECT COUNT(*) FROM dead_letters"),
        0
    );
    assert_eq!(
        query_i64(
            &env.db_path(),
            "SELECT COUNT(*) FROM audit WHERE action LIKE 'dead-letters-%'"
        ),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_files_rotate_daily_in_the_configured_directory() {
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(5);
    let env = Env::new();
    let logs = env.dir.path().join("logs");
    env.write_config(&format!(
        "[log]\ndirectory = {:?}\nfile_prefix = \"usher.log\"\n{}",
        logs.display().to_string(),
        crm_stream_config(&format!("http://{}", s.addr), "1h", 1000, 50)
    ));
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(10), || s
        .crm
        .accepted_records()
        .len()
        == 5));
    d.signal(rustix::process::Signal::TERM);
    let mut d = d;
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(Some(0)));
    let files: Vec<_> = std::fs::read_dir(&logs).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one file for today");
    let name = files[0].file_name().to_string_lossy().to_string();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(
        name,
        format!("usher.log.{today}"),
        "daily rotation names the file by date"
    );
    let text = std::fs::read_to_string(files[0].path()).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first["level"].is_string(), "JSON lines: {first}");
    assert!(text.contains("run finished"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_tell_start_time_runs_durations_requests_and_waits() {
    use usher_sandbox::Fault;
    let s = Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    s.crm.add_contacts(5);
    // The feed's first answer asks for a pause: the run waits it out, then goes on.
    s.crm.faults.push(
        "crm.feed",
        Fault::RateLimited {
            status: 429,
            retry_after_secs: 1,
        },
        1,
    );
    let env = Env::new();
    let port = free_port();
    env.write_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
        crm_stream_config(&format!("http://{}", s.addr), "1h", 1000, 50)
    ));
    let spawned = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let d = env.spawn_daemon();
    d.wait_ready();
    assert!(wait_until(Duration::from_secs(15), || s
        .crm
        .accepted_records()
        .len()
        == 5));
    // Scraped for the first time well after the start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = reqwest::Client::new();
    let mut text = String::new();
    for _ in 0..50 {
        let r = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap();
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
            "{:?}",
            r.headers()
        );
        text = r.text().await.unwrap();
        if text.contains("usher_runs_total{stream=\"contacts\",outcome=\"ok\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let start = value("process_start_time_seconds ");
    assert!(
        start > spawned - 1.5 && start < spawned + 1.5,
        "process_start_time_seconds {start} is the process start ({spawned}), not the first scrape:\n{text}"
    );
    for needle in [
        "usher_runs_total{stream=\"contacts\",outcome=\"ok\"} 1",
        "usher_run_duration_seconds_count{stream=\"contacts\"} 1",
        "usher_run_duration_seconds_bucket{le=\"+Inf\",stream=\"contacts\"} 1",
        "usher_http_requests_total{connection=\"crm\",class=\"4xx\"} 1",
        "usher_waits_total{connection=\"crm\",reason=\"retry_after\"} 1",
        "usher_wait_seconds_total{connection=\"crm\",reason=\"retry_after\"}",
        &format!(
            "usher_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "usher_records_pulled_total{stream=\"contacts\"} 5",
        "# TYPE usher_run_duration_seconds histogram",
        "# EOF",
    ] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    assert!(value("usher_http_requests_total{connection=\"crm\",class=\"2xx\"}") >= 1.0);
    assert!(value("usher_http_requests_total{connection=\"hub\",class=\"2xx\"}") >= 1.0);
}
