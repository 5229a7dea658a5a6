//! The rooms of `src/` stand on floors, and a room uses only rooms on the floors below its
//! own: no import circle between rooms (ARCHITECTURE.md, "Rooms and floors"). A room is a
//! top-level module, or a module below one that has a floor of its own (`config/values`,
//! `streams/*/options`): a file belongs to the room of the longest path in [`FLOORS`] that
//! its module path starts with. Read from the source text (every path from `crate::`,
//! `super::` or `self::`, through `{…}` groups over several lines, outside comments and
//! strings), so it costs nothing to run and names the file and line of every wrong way up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A new room gets a floor here; moving a room is a decision to write down.
/// A room is a module path; `*` stands for any one module, each its own room on that floor
/// (`streams/*/options`: each stream kind's options, which do not use each other's).
const FLOORS: &[&[&str]] = &[
    // Words every room may use.
    &["clock", "progress", "secret", "suggest"],
    // Pure or self-contained: the JWT, process-wide counters, mapping, schedules.
    &["jwt", "mapping", "metrics", "schedule"],
    // The only code that speaks SQL.
    &["store"],
    // Reading a configuration table with every problem (`Layers`), and the tables as
    // written (all but a stream's).
    &["config/load", "config/raw"],
    // What every table shares: secrets, URLs, auth blocks, durations, GUIDs.
    &["config/values"],
    // A connection as validated: its kind, URL, auth, rate limit and vendor account.
    &["config/connection"],
    // The CRM feed and webhook options, which other kinds read and write too.
    &["streams/feed_webhook/options"],
    // Each stream kind's options, raw and validated.
    &["streams/*/options"],
    // `[streams.X]` as written and the enum of the kinds' options, built from a stream's ends.
    &["streams/options"],
    // The loader and the validated configuration (it carries each stream's kind and options,
    // and opens the store it describes).
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

/// The module path of a file below `src/`: `config/values.rs` → config::values,
/// `streams/s360/mod.rs` → streams::s360.
fn module_of(rel: &Path) -> Vec<String> {
    let mut m: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    let last = m.pop().unwrap();
    let stem = last.strip_suffix(".rs").unwrap_or(&last);
    if stem != "mod" {
        m.push(stem.to_string());
    }
    m
}

/// The room of a module path (or of an item's path below it), and the entry of `FLOORS` it
/// is: the longest entry it starts with (of two as long, the one with fewer `*`), with each
/// `*` its module (`streams/s360/options` of `streams/*/options`).
fn room_of(path: &[String]) -> Option<(String, &'static str)> {
    let entry = FLOORS
        .iter()
        .flat_map(|f| f.iter())
        .filter(|room| {
            let parts: Vec<&str> = room.split('/').collect();
            parts.len() <= path.len() && parts.iter().zip(path).all(|(p, s)| *p == "*" || p == s)
        })
        .max_by_key(|room| {
            let parts: Vec<&str> = room.split('/').collect();
            (parts.len(), parts.iter().filter(|p| **p != "*").count())
        })
        .copied()?;
    let n = entry.split('/').count();
    Some((path[..n].join("/"), entry))
}

/// The text with comments, strings and character literals blanked (line breaks kept), so
/// that the braces and paths left are the code's own.
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let prev = if i > 0 { Some(c[i - 1]) } else { None };
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        blank(&mut out, c[i]);
                        i += 1;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        blank(&mut out, c[i]);
                        i += 1;
                    }
                    blank(&mut out, c[i]);
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            // A raw string: r"…", r#"…"#, br#"…"# (the `b` went out as code).
            'r' if !prev.is_some_and(|p| ident(p) && p != 'b')
                && matches!(c.get(i + 1), Some('"' | '#')) =>
            {
                let mut j = i + 1;
                while c.get(j) == Some(&'#') {
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push(c[i]);
                    i += 1;
                    continue;
                }
                let hashes = j - i - 1;
                out.push('r');
                for _ in 0..=hashes {
                    out.push(' ');
                }
                i = j + 1;
                while i < c.len() {
                    if c[i] == '"' && (1..=hashes).all(|h| c.get(i + h) == Some(&'#')) {
                        for _ in 0..=hashes {
                            out.push(' ');
                        }
                        i += hashes + 1;
                        break;
                    }
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            '"' => {
                out.push(' ');
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        blank(&mut out, c[i]);
                        i += 1;
                    }
                    if i < c.len() {
                        blank(&mut out, c[i]);
                        i += 1;
                    }
                }
                out.push(' ');
                i += 1;
            }
            // A character literal ('x', '\n', '\''); a lifetime or label stays.
            '\'' if c.get(i + 1) == Some(&'\\') || c.get(i + 2) == Some(&'\'') => {
                out.push(' ');
                i += 1;
                if c.get(i) == Some(&'\\') {
                    out.push(' ');
                    i += 1;
                }
                while i < c.len() && c[i] != '\'' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                out.push(' ');
                i += 1;
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// Every path the code names from the crate's root, with its line (1-based): `crate::a::b`,
/// `super::a` and `self::a` resolved from `module` (and from the inline `mod x { … }` they
/// stand in), each leaf of a group `crate::a::{b, c::d}` on its own.
fn paths_named(code: &str, module: &[String]) -> Vec<(usize, Vec<String>)> {
    let c: Vec<char> = code.chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let word_at = |i: usize| -> String { c[i..].iter().take_while(|ch| ident(**ch)).collect() };
    let mut out = Vec::new();
    let mut line = 1;
    // The inline modules the scan is in: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let starts_word = i == 0 || !(ident(c[i - 1]) || c[i - 1] == '$' || c[i - 1] == ':');
        match ch {
            '\n' => line += 1,
            '{' => {
                depth += 1;
                if let Some(name) = pending_mod.take() {
                    inline.push((name, depth));
                }
            }
            '}' => {
                while inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            ';' => pending_mod = None,
            _ if starts_word && ident(ch) => {
                let word = word_at(i);
                if word == "mod" {
                    let mut j = i + 3;
                    while c.get(j).is_some_and(|x| x.is_whitespace()) {
                        j += 1;
                    }
                    pending_mod = Some(word_at(j));
                }
                let mut here: Vec<String> = module.to_vec();
                here.extend(inline.iter().map(|(n, _)| n.clone()));
                // Where the path goes on after its start (`crate::`, `self::`, `super::…`).
                let mut j = i + word.len() + 2;
                let base = match word.as_str() {
                    "crate" => Some(Vec::new()),
                    "self" => Some(here.clone()),
                    "super" => {
                        let mut b = here.clone();
                        b.pop();
                        while c[j..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':']) {
                            b.pop();
                            j += "super::".len();
                        }
                        Some(b)
                    }
                    _ => None,
                };
                if let Some(base) = base
                    && c[i + word.len()..].starts_with(&[':', ':'])
                {
                    let mut found = Vec::new();
                    tree(&c, &mut j, base, &mut found);
                    let lines = c[i..j].iter().filter(|x| **x == '\n').count();
                    out.extend(found.into_iter().map(|p| (line, p)));
                    line += lines;
                    i = j;
                    continue;
                }
                i += word.len();
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// One use tree from `c[*i]` (after a `::`): `a::b`, `{a, b::c}`, `*`, `self`.
fn tree(c: &[char], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let skip_ws = |i: &mut usize| {
        while c.get(*i).is_some_and(|x| x.is_whitespace()) {
            *i += 1;
        }
    };
    skip_ws(i);
    if c.get(*i) == Some(&'{') {
        *i += 1;
        loop {
            skip_ws(i);
            match c.get(*i) {
                None => return,
                Some('}') => {
                    *i += 1;
                    return;
                }
                Some(',') => *i += 1,
                Some(_) => {
                    let before = *i;
                    tree(c, i, prefix.clone(), out);
                    if *i == before {
                        *i += 1;
                    }
                }
            }
        }
    }
    let word: String = c[*i..]
        .iter()
        .take_while(|ch| ch.is_alphanumeric() || **ch == '_' || **ch == '*')
        .collect();
    *i += word.chars().count();
    let mut path = prefix;
    if word.is_empty() || word == "self" {
        out.push(path);
        return;
    }
    path.push(word);
    if c[*i..].starts_with(&[':', ':']) {
        *i += 2;
        tree(c, i, path, out);
    } else {
        out.push(path);
    }
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
        let module = module_of(rel);
        if module == ["main"] || module == ["lib"] {
            continue;
        }
        let Some((room, entry)) = room_of(&module) else {
            wrong.push(format!(
                "{}: module {} has no room in FLOORS",
                rel.display(),
                module.join("::")
            ));
            continue;
        };
        seen.insert(entry);
        let own = floor[entry];
        let text = std::fs::read_to_string(file).unwrap();
        for (line, path) in paths_named(&code_only(&text), &module) {
            let (used, used_entry) = match room_of(&path) {
                Some((r, _)) if r == room => continue,
                Some(r) => r,
                None => {
                    wrong.push(format!(
                        "{}:{line}: {room} uses {}, which is in no room of FLOORS",
                        rel.display(),
                        path.join("::")
                    ));
                    continue;
                }
            };
            if floor[used_entry] >= own {
                wrong.push(format!(
                    "{}:{line}: {room} (floor {}) uses {} of {used} (floor {}), not below it",
                    rel.display(),
                    own + 1,
                    path.join("::"),
                    floor[used_entry] + 1
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "rooms used the wrong way up:\n{}",
        wrong.join("\n")
    );
    for entry in floor.keys() {
        assert!(
            seen.contains(*entry),
            "FLOORS names {entry:?}, which is not a module of src/"
        );
    }
}

fn paths(code: &str, module: &str) -> Vec<String> {
    let module: Vec<String> = module.split("::").map(str::to_string).collect();
    paths_named(&code_only(code), &module)
        .into_iter()
        .map(|(line, p)| format!("{line}:{}", p.join("::")))
        .collect()
}

#[test]
fn a_use_of_a_room_is_seen() {
    assert_eq!(paths("use crate::store::Store;", "x"), ["1:store::Store"]);
    assert_eq!(
        paths("use crate::{config::Config, http};", "x"),
        ["1:config::Config", "1:http"]
    );
    assert_eq!(
        paths("x(usher_crate::engine::y)", "x"),
        Vec::<String>::new()
    );
    assert_eq!(
        paths("a: crate::config::A, b: crate::engine::B", "x"),
        ["1:config::A", "1:engine::B"]
    );
    // Groups over lines, nested, with `self`.
    assert_eq!(
        paths(
            "use crate::config::{\n    self,\n    values::{secret, url},\n};\nuse crate::store;",
            "x"
        ),
        [
            "1:config",
            "1:config::values::secret",
            "1:config::values::url",
            "5:store"
        ]
    );
    // `super` from a file, and from the inline module of its tests.
    assert_eq!(
        paths(
            "use super::load::Layers;\nfn f() { super::super::store::x() }\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\nuse super::raw::RawAuth;",
            "config::values"
        ),
        [
            "1:config::load::Layers",
            "2:store::x",
            "5:config::values::*",
            "7:config::raw::RawAuth"
        ]
    );
    // Not in comments, strings or character literals.
    assert_eq!(
        paths(
            "// crate::engine\nlet s = \"crate::engine\"; let r = r#\"crate::cli\"#; let c = '{'; /* crate::x */ crate::clock::now()",
            "x"
        ),
        ["2:clock::now"]
    );
}

#[test]
fn a_path_is_in_the_room_of_the_longest_floor_it_starts_with() {
    let room = |s: &str| -> Option<String> {
        let path: Vec<String> = s.split("::").map(str::to_string).collect();
        room_of(&path).map(|(room, entry)| format!("{room} of {entry}"))
    };
    assert_eq!(room("config::Config").unwrap(), "config of config");
    assert_eq!(
        room("config::values::secret").unwrap(),
        "config/values of config/values"
    );
    assert_eq!(room("streams::s360::relay").unwrap(), "streams of streams");
    assert_eq!(
        room("streams::s360::options::RelayOptions").unwrap(),
        "streams/s360/options of streams/*/options"
    );
    assert_eq!(
        room("streams::feed_webhook::options::FeedOptions").unwrap(),
        "streams/feed_webhook/options of streams/feed_webhook/options"
    );
    assert_eq!(
        room("streams::options::StreamKind").unwrap(),
        "streams/options of streams/options"
    );
    assert_eq!(room("nowhere::x"), None);
}
