//! Figment layers (main file, drop-ins in name order, `USHER_` environment) and the
//! key-by-key extraction that lets `validate` report every problem at once.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Tag, Value};
use figment::{Figment, Metadata, Source};
use serde::de::DeserializeOwned;

/// One thing wrong with the configuration, with enough context to find and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or "environment") the offending key came from, when known.
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
        write!(f, "{}: key `{}`: {}", self.scope, self.key, self.message)
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
        // Only `USHER_<SECTION>__<KEY>` is an override: a variable without `__` (such as
        // `USHER_TEST_POSTGRES` or a wrapper script's own `USHER_HOME`) names no key and
        // is none of the configuration's business.
        figment = figment.merge(
            Env::prefixed("USHER_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
    }
    Layers {
        figment,
        main_file,
        files,
        problems,
        read_secrets: true,
        merged: None,
    }
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
    /// Where a key's value came from: the file path, or a description of the provider.
    pub fn origin_of(&self, key: &str) -> Option<String> {
        // Walk up the key until something has metadata (a missing key has none).
        let mut key = key.to_string();
        loop {
            if let Some(md) = self.figment.find_metadata(&key) {
                return Some(describe(md));
            }
            match key.rfind('.') {
                Some(i) => key.truncate(i),
                None => return self.files.first().map(|f| f.display().to_string()),
            }
        }
    }

    pub fn problem(&mut self, scope: &str, key: &str, message: impl Into<String>) {
        let origin = self.origin_of(key);
        self.problems.push(Problem {
            origin,
            scope: scope.to_string(),
            key: key.to_string(),
            message: message.into(),
        });
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
                let mut good = Dict::new();
                for (k, v) in dict {
                    let mut single = Dict::new();
                    single.insert(k.clone(), v.clone());
                    match Value::Dict(Tag::Default, single).deserialize::<T>() {
                        Ok(_) => {
                            good.insert(k.clone(), v.clone());
                        }
                        Err(err) => {
                            for e in err {
                                let mut key = format!("{path}.{k}");
                                // serde's path includes the key itself first; keep what is below it.
                                for part in e.path.iter().skip(1) {
                                    key.push('.');
                                    key.push_str(part);
                                }
                                if let figment::error::Kind::UnknownField(name, _) = &e.kind
                                    && !key.ends_with(name.as_str())
                                {
                                    key = format!("{key}.{name}");
                                }
                                let msg = kind_message(&e);
                                self.problem(scope, &key, msg);
                            }
                        }
                    }
                }
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
                m.push_str(&format!(" (known keys: {})", expected.join(", ")));
            }
            m
        }
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value {actual}, expected {expected}")
        }
        Kind::MissingField(name) => format!("missing key `{name}`"),
        Kind::Message(m) => m.clone(),
        other => other.to_string(),
    }
}
