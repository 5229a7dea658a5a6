//! The rooms of `src/` (its top-level modules) stand on floors, and a room uses only rooms
//! on the floors below its own: no import circle between rooms (ARCHITECTURE.md, "Rooms and
//! floors"). Read from the source text (`crate::<room>` in every line that is not a
//! comment), so it costs nothing to run and names the file of every wrong way up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A new room gets a floor here; moving a room is a decision to write down.
const FLOORS: &[&[&str]] = &[
    // Words every room may use.
    &["clock", "progress", "secret", "suggest"],
    // Pure or self-contained: the JWT, process-wide counters, mapping, schedules.
    &["jwt", "mapping", "metrics", "schedule"],
    // The only code that speaks SQL.
    &["store"],
    // The loader and the validated configuration (it opens the store it describes).
    &["config"],
    // Edges: logs, the HTTP client and its policy, the S-360 receiver.
    &["http", "logging", "receiver"],
    // One module per vendor: URLs and JSON.
    &["connectors"],
    // What every stream shares: runs, commits, the daemon.
    &["engine"],
    // One room per stream kind, plugged into the engine from above (`engine::KindRun`).
    &["streams"],
    // What `usher status` prints.
    &["status"],
    // The subcommands.
    &["cli"],
];

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The rooms a line names through `crate::room` or `crate::{room, …}`.
fn rooms_named(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            group
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().split("::").next().unwrap_or("").trim())
                .collect()
        } else {
            vec![
                rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or(""),
            ]
        };
        out.extend(
            names
                .into_iter()
                .filter(|n| !n.is_empty() && *n != "self")
                .map(str::to_string),
        );
    }
    out
}

#[test]
fn a_room_uses_only_rooms_on_the_floors_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let floor: BTreeMap<&str, usize> = FLOORS
        .iter()
        .enumerate()
        .flat_map(|(i, rooms)| rooms.iter().map(move |r| (*r, i)))
        .collect();
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let room = first.strip_suffix(".rs").unwrap_or(first);
        if room == "main" || room == "lib" {
            continue;
        }
        seen.insert(room.to_string());
        let Some(&own) = floor.get(room) else {
            wrong.push(format!(
                "{}: room {room:?} has no floor in FLOORS",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for used in rooms_named(line) {
                if used == room {
                    continue;
                }
                match floor.get(used.as_str()) {
                    Some(&f) if f < own => {}
                    Some(_) => wrong.push(format!(
                        "{}:{}: {room} (floor {own}) uses {used} (floor {}), not below it",
                        rel.display(),
                        n + 1,
                        floor[used.as_str()]
                    )),
                    None => wrong.push(format!(
                        "{}:{}: {room} uses {used:?}, which has no floor in FLOORS",
                        rel.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "rooms used the wrong way up:\n{}",
        wrong.join("\n")
    );
    for room in floor.keys() {
        assert!(
            seen.contains(*room),
            "FLOORS names {room:?}, which is not a room of src/"
        );
    }
}

#[test]
fn a_use_of_a_room_is_seen() {
    assert_eq!(rooms_named("use crate::store::Store;"), ["store"]);
    assert_eq!(
        rooms_named("use crate::{config::Config, http};"),
        ["config", "http"]
    );
    assert_eq!(
        rooms_named("x(usher_crate::engine::y)"),
        Vec::<String>::new()
    );
    assert_eq!(
        rooms_named("a: crate::config::A, b: crate::engine::B"),
        ["config", "engine"]
    );
}
