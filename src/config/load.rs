//! Figment layers (main file, drop-ins in name order, `USHER_` environment) and the
//! key-by-key extraction that lets `validate` report every problem at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Tag, Value};
use figment::{Figment, Metadata, Source};
use serde::de::DeserializeOwned;

/// One thing wrong with the configuration, with enough context to find and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the offending key came from, when known: `file:line` (the key's line, or its
    /// table's), or the environment variable(s).
    pub origin: Option<String>,
    /// `stream "x"`, `connection "y"`, or a section name.
    pub scope: String,
    /// The full dotted key, e.g. `streams.x.every`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{origin}: ")?,
            None => write!(f, "(no file): ")?,
        }
        // A whole-file problem (a syntax error, a missing file) has no key to name.
        if self.key.is_empty() || self.key == "-" {
            write!(f, "{}: {}", self.scope, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.scope, self.key, self.message)
        }
    }
}

/// The merged configuration sources plus the list of problems found so far.
pub struct Layers {
    pub figment: Figment,
    pub main_file: PathBuf,
    pub files: Vec<PathBuf>,
    pub problems: Vec<Problem>,
    /// Whether secrets are read and checked (see `Source::read_secrets`).
    pub read_secrets: bool,
    /// The merged tree, computed once: figment merges every provider on each lookup, which
    /// made a config of a thousand streams take a second to load.
    merged: Option<Dict>,
    /// Keys filled from another place (a reseller's shared credentials): a problem of the
    /// filled key is reported under the key the sysadmin wrote, in the file it is in.
    pub aliases: BTreeMap<String, (String, String)>,
    /// The text of each file a problem was located in, read once (for `line_of`).
    texts: std::cell::RefCell<BTreeMap<PathBuf, Option<String>>>,
}

/// Builds the figment: main file, then `usher.d/*.toml` beside it in name order, then the
/// environment. A missing main file or an unreadable drop-in folder is a problem, not a panic.
pub fn layers(main_file: &Path, env_overrides: bool) -> Layers {
    let main_file = absolute(main_file);
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut figment = Figment::new();
    if main_file.is_file() {
        files.push(main_file.clone());
        figment = figment.merge(Toml::file_exact(&main_file));
    } else {
        problems.push(Problem {
            origin: Some(main_file.display().to_string()),
            scope: "config".into(),
            key: "-".into(),
            message: "the main configuration file does not exist or is not a file".into(),
        });
    }
    let dropins = main_file
        .parent()
        .map(|dir| dir.join("usher.d"))
        .unwrap_or_else(|| PathBuf::from("usher.d"));
    if dropins.is_dir() {
        match std::fs::read_dir(&dropins) {
            Ok(entries) => {
                let mut names: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                    .collect();
                names.sort();
                for path in names {
                    figment = figment.merge(Toml::file_exact(&path));
                    files.push(path);
                }
            }
            Err(err) => problems.push(Problem {
                origin: Some(dropins.display().to_string()),
                scope: "config".into(),
                key: "-".into(),
                message: format!("cannot read the drop-in folder: {err}"),
            }),
        }
    }
    if env_overrides {
        // The names the files define, which an override must match (see `env_key`). When a
        // file does not parse, its syntax error is the problem; overrides are not checked.
        let parsed = figment.extract::<Dict>().ok();
        let known = Arc::new(parsed.as_ref().map(named_entries).unwrap_or_default());
        if parsed.is_some() {
            for (var, _) in std::env::vars_os() {
                let var = var.to_string_lossy();
                let Some(rest) = strip_env_prefix(&var) else {
                    continue;
                };
                if let Err(message) = env_key(rest, &known) {
                    problems.push(Problem {
                        origin: Some(format!("environment variable {var}")),
                        scope: "config".into(),
                        key: rest
                            .split("__")
                            .collect::<Vec<_>>()
                            .join(".")
                            .to_lowercase(),
                        message,
                    });
                }
            }
        }
        // Only `USHER_<SECTION>__<KEY>` is an override: a variable without `__` (such as
        // `USHER_TEST_POSTGRES` or a wrapper script's own `USHER_HOME`) names no key and
        // is none of the configuration's business.
        figment = figment.merge(
            Env::prefixed("USHER_")
                .lowercase(false)
                .filter_map(move |k| {
                    if !k.as_str().contains("__") {
                        return None;
                    }
                    env_key(k.as_str(), &known)
                        .ok()
                        .map(figment::value::Uncased::from)
                }),
        );
    }
    Layers {
        figment,
        main_file,
        files,
        problems,
        read_secrets: true,
        merged: None,
        aliases: BTreeMap::new(),
        texts: Default::default(),
    }
}

/// The sections whose entries are named by the sysadmin.
const NAMED: &[&str] = &["connections", "streams", "resellers", "companies"];

/// Section → the names of its entries, as the files define them.
fn named_entries(root: &Dict) -> BTreeMap<String, Vec<String>> {
    NAMED
        .iter()
        .map(|s| {
            let names = root
                .get(*s)
                .and_then(Value::as_dict)
                .map(|d| d.keys().cloned().collect())
                .unwrap_or_default();
            (s.to_string(), names)
        })
        .collect()
}

/// `USHER_X__Y` without its prefix; None for a variable that is not an override (no `__`).
fn strip_env_prefix(var: &str) -> Option<&str> {
    let rest = var
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("USHER_"))
        .map(|_| &var[6..])?;
    rest.contains("__").then_some(rest)
}

/// How a name compares with an environment variable's segment: `-` is written `_` (a
/// variable's name cannot hold a `-`), and case does not count.
fn fold(name: &str) -> String {
    name.replace('-', "_").to_ascii_lowercase()
}

/// The dotted key that `USHER_` + `var` overrides, or why it is refused. `__` separates the
/// keys; keys are lower case; the segment after `STREAMS`, `CONNECTIONS`, `RESELLERS` or
/// `COMPANIES` names an entry the files define, compared with `fold` (so
/// `USHER_STREAMS__CONTACTS_TO_CRM__EVERY` sets `streams.contacts-to-crm.every`). An override
/// never creates an entry: one that matches none is refused rather than read as a new,
/// half-written stream or connection.
fn env_key(var: &str, known: &BTreeMap<String, Vec<String>>) -> Result<String, String> {
    let mut parts: Vec<String> = var.split("__").map(str::to_ascii_lowercase).collect();
    if parts.iter().any(String::is_empty) {
        return Err("an empty key between `__` separators".into());
    }
    if let (Some(names), true) = (known.get(&parts[0]), parts.len() > 1) {
        let what = parts[0].strip_suffix('s').unwrap_or(&parts[0]).to_string();
        let wanted = fold(&parts[1]);
        let matching: Vec<&String> = names.iter().filter(|n| fold(n) == wanted).collect();
        match matching.as_slice() {
            [one] => parts[1] = (*one).clone(),
            [] => {
                let mut m = format!(
                    "overrides {what} {:?}, which no file defines; an override changes a {what} \
                     that a file defines (with `-` written `_`), it does not create one",
                    parts[1]
                );
                let folded: Vec<String> = names.iter().map(|n| fold(n)).collect();
                if let Some(near) = crate::suggest::closest(&wanted, &folded) {
                    let i = folded.iter().position(|f| f == near).unwrap_or(0);
                    m.push_str(&format!("; did you mean {what} {:?}?", names[i]));
                } else if !names.is_empty() {
                    m.push_str(&format!(" (defined: {})", names.join(", ")));
                }
                return Err(m);
            }
            many => {
                let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                return Err(format!(
                    "matches several {}s ({}): rename one of them to override it",
                    what,
                    names.join(", ")
                ));
            }
        }
    }
    Ok(parts.join("."))
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

impl Layers {
    /// Where a key's value came from: `file:line` (the key's line, or its table's when the
    /// key is not written), or a description of the provider (the environment).
    pub fn origin_of(&self, key: &str) -> Option<String> {
        // Walk up the key until something has metadata (a missing key has none).
        let mut at = key.to_string();
        let file = loop {
            if let Some(md) = self.figment.find_metadata(&at) {
                match &md.source {
                    Some(Source::File(path)) => break path.clone(),
                    // A value filled in by usher itself (a default, the demo's ports): its
                    // table in the file is the place to look.
                    Some(Source::Code(_)) => {}
                    _ => return Some(describe(md)),
                }
            }
            match at.rfind('.') {
                Some(i) => at.truncate(i),
                None => break self.files.first()?.clone(),
            }
        };
        let line = self
            .texts
            .borrow_mut()
            .entry(file.clone())
            .or_insert_with(|| std::fs::read_to_string(&file).ok())
            .as_deref()
            .and_then(|text| line_of(text, key));
        Some(match line {
            Some(n) => format!("{}:{n}", file.display()),
            None => file.display().to_string(),
        })
    }

    pub fn problem(&mut self, scope: &str, key: &str, message: impl Into<String>) {
        let p = self.make(scope, key, message);
        self.problems.push(p);
    }

    /// A problem (or warning) about `key`, with its origin, not yet recorded.
    pub fn make(&self, scope: &str, key: &str, message: impl Into<String>) -> Problem {
        // A key filled from a reseller's credentials is reported where it is written.
        let alias = self.aliases.iter().find_map(|(from, (to, why))| {
            let rest = key.strip_prefix(from.as_str())?;
            (rest.is_empty() || rest.starts_with('.')).then(|| (format!("{to}{rest}"), why))
        });
        let (key, scope) = match alias {
            Some((k, why)) => (k, format!("{scope} ({why})")),
            None => (key.to_string(), scope.to_string()),
        };
        let origin = self.origin_of(&key);
        Problem {
            origin,
            scope,
            key,
            message: message.into(),
        }
    }

    /// The raw value at `path` (dotted), if present.
    pub fn value(&mut self, path: &str) -> Option<Value> {
        let root = self.root();
        let mut parts = path.split('.');
        let mut cur = root.get(parts.next()?)?;
        for part in parts {
            cur = cur.as_dict()?.get(part)?;
        }
        Some(cur.clone())
    }

    /// The top-level table, with syntax errors of any file reported (once).
    pub fn root(&mut self) -> &Dict {
        if self.merged.is_none() {
            let merged = match self.figment.extract::<Dict>() {
                Ok(d) => d,
                Err(err) => {
                    self.push_figment_errors("config", "", err);
                    Dict::new()
                }
            };
            self.merged = Some(merged);
        }
        self.merged.as_ref().expect("set above")
    }

    /// Deserializes the table at `path` into `T`. On failure, each key is tried on its own so
    /// that every bad key is reported, not only the first, and `T` is built from the good
    /// keys so that the caller's checks go on. `T`'s fields must all be optional.
    pub fn table<T: DeserializeOwned + Default>(&mut self, scope: &str, path: &str) -> Option<T> {
        let value = self.value(path)?;
        self.table_from(scope, path, &value)
    }

    pub fn table_from<T: DeserializeOwned + Default>(
        &mut self,
        scope: &str,
        path: &str,
        value: &Value,
    ) -> Option<T> {
        match value.deserialize::<T>() {
            Ok(t) => Some(t),
            Err(first) => {
                let Value::Dict(_, dict) = value else {
                    let msg = kind_message(&first);
                    self.problem(scope, path, format!("expected a table: {msg}"));
                    return None;
                };
                let before = self.problems.len();
                let good = self.salvage::<T>(scope, path, &[], dict);
                if self.problems.len() == before {
                    let msg = kind_message(&first);
                    self.problem(scope, path, msg);
                }
                // Go on with the keys that were fine, so that later checks report their
                // problems too; the problems above already make the load fail.
                Value::Dict(Tag::Default, good).deserialize::<T>().ok()
            }
        }
    }

    /// The keys of `dict` (at `inner` below `path`) that `T` accepts, each tried on its
    /// own; every key it refuses is reported. A refused table is tried key by key in turn,
    /// so that one unknown key in `[streams.X.halo]` neither hides the table's other
    /// problems nor drops its good keys (which would then be reported as missing).
    fn salvage<T: DeserializeOwned>(
        &mut self,
        scope: &str,
        path: &str,
        inner: &[&str],
        dict: &Dict,
    ) -> Dict {
        // `{inner[0]: {inner[1]: … {k: v}}}`, the shape `T` is tried on.
        let wrap = |k: &str, v: Value| -> Value {
            let mut cur = Dict::new();
            cur.insert(k.to_string(), v);
            for outer in inner.iter().rev() {
                let mut d = Dict::new();
                d.insert((*outer).to_string(), Value::Dict(Tag::Default, cur));
                cur = d;
            }
            Value::Dict(Tag::Default, cur)
        };
        let mut good = Dict::new();
        for (k, v) in dict {
            let err = match wrap(k, v.clone()).deserialize::<T>() {
                Ok(_) => {
                    good.insert(k.clone(), v.clone());
                    continue;
                }
                Err(err) => err,
            };
            if let Value::Dict(_, sub) = v
                && inner.len() < 4
            {
                let mut deeper = inner.to_vec();
                deeper.push(k);
                let before = self.problems.len();
                let kept = self.salvage::<T>(scope, path, &deeper, sub);
                let kept = Value::Dict(Tag::Default, kept);
                if wrap(k, kept.clone()).deserialize::<T>().is_ok() {
                    good.insert(k.clone(), kept);
                }
                if self.problems.len() != before {
                    continue;
                }
            }
            for e in err {
                let mut key = path.to_string();
                for part in &e.path {
                    key.push('.');
                    key.push_str(part);
                }
                if let figment::error::Kind::UnknownField(name, _) = &e.kind
                    && !key.ends_with(name.as_str())
                {
                    key = format!("{key}.{name}");
                }
                let p = self.make(scope, &key, kind_message(&e));
                if !self.problems.contains(&p) {
                    self.problems.push(p);
                }
            }
        }
        good
    }

    fn push_figment_errors(&mut self, scope: &str, path: &str, err: figment::Error) {
        for e in err {
            let origin = e.metadata.as_ref().map(describe);
            let key = if e.path.is_empty() {
                if path.is_empty() {
                    "-".to_string()
                } else {
                    path.to_string()
                }
            } else {
                e.path.join(".")
            };
            let origin = origin.or_else(|| self.origin_of(&key));
            self.problems.push(Problem {
                origin,
                scope: scope.into(),
                key,
                message: kind_message(&e),
            });
        }
    }
}

fn describe(md: &Metadata) -> String {
    match &md.source {
        Some(Source::File(path)) => path.display().to_string(),
        _ => md.name.to_string(),
    }
}

/// A serde error's message in words a sysadmin reads, without figment's own key/file suffix.
fn kind_message(e: &figment::Error) -> String {
    use figment::error::Kind;
    match &e.kind {
        Kind::UnknownField(name, expected) => {
            let mut m = format!("unknown key `{name}`");
            if !expected.is_empty() {
                m.push_str(&crate::suggest::did_you_mean(name, expected));
                m.push_str(&format!(" (known keys: {})", expected.join(", ")));
            }
            m
        }
        Kind::InvalidType(actual, expected) => {
            format!("expected {}, found {actual}", plain(expected))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("expected {}, found {actual}", plain(expected))
        }
        Kind::MissingField(name) => format!("missing key `{name}`"),
        Kind::Message(m) => m.clone(),
        other => other.to_string(),
    }
}

/// serde's name for what it expected (`u32`, `a sequence`), as a sysadmin would say it.
fn plain(expected: &str) -> String {
    let unsigned = ["u8", "u16", "u32", "u64", "u128", "usize"];
    let signed = ["i8", "i16", "i32", "i64", "i128", "isize"];
    match expected {
        e if unsigned.contains(&e) => "a whole number (0 or more, no quotes)".into(),
        e if signed.contains(&e) => "a whole number (no quotes)".into(),
        "f32" | "f64" => "a number (no quotes)".into(),
        "a boolean" | "bool" => "true or false (no quotes)".into(),
        "a string" | "string" => "text in quotes".into(),
        "a sequence" => "a list such as [\"a\", \"b\"]".into(),
        "a map" => "a table".into(),
        e if e.starts_with("struct ") => "a table".into(),
        other => other.to_string(),
    }
}

/// The line (1-based) of `key` (dotted) in a TOML file's text: the line that writes it, or,
/// when it is not written there, the line of the nearest table or key above it (its
/// `[table]` header, the inline table holding it). None when the file has none of it.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let want = dotted(key);
    if want.is_empty() {
        return None;
    }
    let mut table: Vec<String> = Vec::new();
    let mut best: Option<(usize, usize)> = None; // (how much of the key matched, line)
    let mut consider = |path: &[String], line: usize| {
        if path.len() <= want.len() && want[..path.len()] == *path {
            let better = best.is_none_or(|(n, _)| path.len() > n);
            if better && !path.is_empty() {
                best = Some((path.len(), line));
            }
        }
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let inner = line.trim_start_matches('[');
            let end = inner.find(']').unwrap_or(inner.len());
            table = dotted(&inner[..end]);
            consider(&table, i + 1);
        } else if let Some(eq) = key_end(line) {
            let mut path = table.clone();
            path.extend(dotted(&line[..eq]));
            consider(&path, i + 1);
        }
    }
    best.map(|(_, line)| line)
}

/// Where the key of a `key = value` line ends (the `=`), outside quotes.
fn key_end(line: &str) -> Option<usize> {
    let first = line.chars().next()?;
    if !(first.is_ascii_alphanumeric()
        || first == '_'
        || first == '-'
        || first == '"'
        || first == '\'')
    {
        return None;
    }
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '=') => return Some(i),
            _ => {}
        }
    }
    None
}

/// `a."b c".d` → [a, b c, d].
fn dotted(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in key.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '.') => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out.retain(|s| !s.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeMap<String, Vec<String>> {
        let mut k = BTreeMap::new();
        k.insert(
            "streams".to_string(),
            vec!["contacts-to-crm".to_string(), "Orders".to_string()],
        );
        k.insert("connections".to_string(), vec!["crm-main".to_string()]);
        k
    }

    #[test]
    fn an_override_reaches_a_name_with_a_dash_and_any_case() {
        let k = known();
        assert_eq!(
            env_key("STREAMS__CONTACTS_TO_CRM__EVERY", &k).unwrap(),
            "streams.contacts-to-crm.every"
        );
        assert_eq!(
            env_key("STREAMS__ORDERS__WEBHOOK__URL", &k).unwrap(),
            "streams.Orders.webhook.url"
        );
        assert_eq!(
            env_key("CONNECTIONS__CRM_MAIN__AUTH__TOKEN_FILE", &k).unwrap(),
            "connections.crm-main.auth.token_file"
        );
        assert_eq!(
            env_key("DAEMON__STATE_DIR", &k).unwrap(),
            "daemon.state_dir"
        );
    }

    #[test]
    fn an_override_that_matches_no_entry_is_refused() {
        let e = env_key("STREAMS__CONTACTS_TO_CRN__EVERY", &known()).unwrap_err();
        assert!(e.contains("no file defines"), "{e}");
        assert!(e.contains("did you mean stream \"contacts-to-crm\""), "{e}");
        let mut k = known();
        k.get_mut("streams").unwrap().push("contacts_to_crm".into());
        let e = env_key("STREAMS__CONTACTS_TO_CRM__EVERY", &k).unwrap_err();
        assert!(e.contains("several streams"), "{e}");
    }

    #[test]
    fn a_variable_without_a_double_underscore_is_not_an_override() {
        assert_eq!(strip_env_prefix("USHER_CONFIG"), None);
        assert_eq!(strip_env_prefix("PATH"), None);
        assert_eq!(strip_env_prefix("USHER_LOG__LEVEL"), Some("LOG__LEVEL"));
    }

    #[test]
    fn a_key_is_found_on_its_line_or_its_tables() {
        let text = "[daemon]\nstate_dir = \"/x\"\n\n[connections.crm]\nkind = \"crm\"\nauth = { type = \"bearer\", token_file = \"t\" }\n\n[streams.\"a b\"]\nevery = \"1m\"\n[streams.\"a b\".webhook]\nurl = \"/h\"\n";
        assert_eq!(line_of(text, "daemon.state_dir"), Some(2));
        assert_eq!(line_of(text, "connections.crm.kind"), Some(5));
        assert_eq!(line_of(text, "connections.crm.auth.token_file"), Some(6));
        assert_eq!(line_of(text, "connections.crm.base_url"), Some(4));
        assert_eq!(line_of(text, "streams.a b.every"), Some(9));
        assert_eq!(
            line_of(text, "streams.a b.webhook.accepted_statuses"),
            Some(10)
        );
        assert_eq!(line_of(text, "metrics.listen"), None);
    }

    #[test]
    fn serde_type_words_are_plain() {
        assert_eq!(plain("u32"), "a whole number (0 or more, no quotes)");
        assert_eq!(plain("a boolean"), "true or false (no quotes)");
    }
}
