//! The SeatGeek → Halo part of `usher-sandbox demo` and `usher-sandbox serve`: generated data for the fakes
//! and what the demo prints about the stream.

use serde_json::json;

use usher::config::StreamSpec;
use usher::engine::RunReport;
use usher_sandbox::Sandbox;

/// `usher-sandbox serve --seatgeek-events N --seatgeek-users M`.
pub fn seed_sandbox(s: &Sandbox, events: u64, users: u32) {
    if events > 0 {
        s.seatgeek.add_generated(events, users.max(1), 1);
    }
}

pub fn print_urls(s: &Sandbox) {
    println!("seatgeek {}", s.url("seatgeek"));
    println!("seatgeek2 {}", s.url("seatgeek2"));
    println!("halo {}", s.url("halo"));
}

/// The demo's data: 600 events for 200 users at SeatGeek, of which Halo already holds 20
/// (same e-mails, other case); one user whose e-mail two Halo users share (a dead letter);
/// one e-mail Halo refuses (a dead letter with Halo's reason); one deleted user; and a second
/// SeatGeek account with 50 users under the same IDs.
pub fn seed_demo(s: &Sandbox) {
    s.seatgeek.add_generated(600, 200, 7);
    for n in 1..=20u32 {
        if let Some(e) = usher_sandbox::seatgeek::gen_email(n, "example.org") {
            s.halo.seed_user(
                json!({"firstname": "Existing", "surname": format!("Person{n}"),
                "emailaddress": e.to_uppercase(), "site_id": 1}),
            );
        }
    }
    for who in ["Twin", "Other"] {
        s.halo
            .seed_user(json!({"firstname": who, "surname": "Shared",
            "emailaddress": "shared@example.org", "site_id": 1}));
    }
    s.seatgeek.push_event(json!({"action": "created", "user": {"id": "SG-9001", "email": "Shared@Example.org", "first_name": "Sam", "last_name": "Shared"}}));
    s.seatgeek.push_event(json!({"action": "created", "user": {"id": "SG-9002", "email": "not an e-mail", "first_name": "Bad", "last_name": "Mail"}}));
    s.seatgeek.push_generated(5, "deleted");
    s.seatgeek2.add_generated(100, 50, 3);
}

/// Prints one SeatGeek → Halo run; returns true when it failed.
pub fn report(s: &Sandbox, spec: &StreamSpec, r: &RunReport) -> bool {
    let c = r.counts;
    println!(
        "\n{}: {} -> {}  ({})",
        spec.name, spec.source, spec.target, r.outcome
    );
    println!(
        "  pulled {} change events; Halo users created {}, updated {}; skipped {} (superseded or deleted), dead-lettered {}; {:.2}s",
        c.pulled, c.created, c.updated, c.skipped, c.failed, r.seconds
    );
    let (posts, saved) = s.halo.post_stats();
    println!(
        "  the fake Halo now holds {} users ({} POSTs so far, {} users saved)",
        s.halo.user_count(),
        posts,
        saved
    );
    if let Some(u) = s
        .halo
        .users()
        .iter()
        .rev()
        .find(|u| u.get("customfields").is_some())
    {
        println!("  a Halo user as imported: {u}");
    }
    if let Some(e) = &r.error {
        println!("  error: {e}");
        return true;
    }
    false
}
