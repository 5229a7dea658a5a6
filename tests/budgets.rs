//! Rate budgets kept in the state (issue 19, item 7), the real binary against the S-360
//! fake: SIGKILLed `usher trigger` processes restarted back to back never break S-360's
//! window, and a running `Retry-After` is honoured by the next process.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, stdout};
use usher_sandbox::s360::{DEMO_OPERATOR, DEMO_PARTNER, DEMO_PARTNER_SECRET};
use usher_sandbox::{Fault, Sandbox};

async fn sandbox() -> Sandbox {
    Sandbox::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// CRM contacts → S-360 with the instance's limit at 20 calls per 6 s, as the fake has it.
/// A write in flight at a kill keeps the next process waiting until it can no longer land
/// (timeout 1 s + 1 s, no margin here).
fn config(env: &Env, s: &Sandbox) -> String {
    env.write_secret("s360-secret", DEMO_PARTNER_SECRET);
    format!(
        r#"
[daemon]
state_dir = {state:?}
settle_margin = "0s"

[connections.s360]
kind = "s360"
base_url = "{s360}/myvenue"
institution = "myvenue"
virtual_operator = "{DEMO_OPERATOR}"
partner_name = "{DEMO_PARTNER}"
partner_secret_file = "s360-secret"
rate_limit = {{ calls = 20, per = "6s" }}
timeout = "1s"

[connections.crm]
kind = "crm"
base_url = "{crm}"

[streams.push]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
page_size = 5
"#,
        s360 = s.url("s360"),
        crm = s.url("crm"),
        state = env.state_dir().display().to_string(),
    )
}

fn spawn_trigger(env: &Env) -> Child {
    Command::new(common::bin())
        .arg("--config")
        .arg(env.config_path())
        .args(["trigger", "push"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_restarted_back_to_back_keep_the_vendors_window() {
    let s = sandbox().await;
    s.s360.set_rate_limit(20, Duration::from_secs(6), 509);
    s.crm.add_contacts(60);
    let env = Env::new();
    env.write_config(&config(&env, &s));
    // Six processes, each SIGKILLed 2.5 s after it started, one right after the other:
    // each would make its 20 calls at once if it did not know the calls before it.
    for _ in 0..6 {
        let mut p = spawn_trigger(&env);
        std::thread::sleep(Duration::from_millis(2500));
        let _ = p.kill();
        let _ = p.wait();
        eprintln!("calls so far: {}", s.s360.calls().len());
    }
    let out = env.cli(&["trigger", "push"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let refused = s.s360.calls().iter().filter(|c| c.status == 509).count();
    assert_eq!(refused, 0, "S-360 answered 509: its window was broken");
    let most = s.s360.max_calls_within("myvenue", Duration::from_secs(6));
    assert!(most <= 20, "{most} calls within one 6 s window");
    assert_eq!(s.s360.contacts().len(), 60, "every contact once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_outlives_the_process_that_was_told() {
    let s = sandbox().await;
    s.crm.add_contacts(5);
    let env = Env::new();
    env.write_config(&config(&env, &s));
    s.s360.faults.push(
        "s360.api",
        Fault::RateLimited {
            status: 509,
            retry_after_secs: 4,
        },
        1,
    );
    let mut first = spawn_trigger(&env);
    // Killed while it waits out the Retry-After; the next process starts at once.
    assert!(common::wait_until(Duration::from_secs(10), || {
        s.s360.faults.calls().iter().any(|c| c.status == 509)
    }));
    std::thread::sleep(Duration::from_millis(300));
    let _ = first.kill();
    let _ = first.wait();
    let t = Instant::now();
    let out = env.cli(&["trigger", "push"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let calls = s.s360.faults.calls();
    let told = calls.iter().position(|c| c.status == 509).unwrap();
    let next = &calls[told + 1];
    let gap = next.at.duration_since(calls[told].at).unwrap();
    assert!(
        gap >= Duration::from_millis(3900),
        "the next process called {gap:?} after a Retry-After of 4 s"
    );
    eprintln!("second process took {:?}", t.elapsed());
    assert_eq!(s.s360.contacts().len(), 5);
}
