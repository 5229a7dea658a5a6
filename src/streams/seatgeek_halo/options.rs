//! `[streams.X.halo]`: the options of the SeatGeek users → Halo stream, as written
//! ([`RawHalo`]) and validated ([`HaloOptions`]), built by `streams::options` when a
//! stream's ends are a `seatgeek` source and a `halo` target (the connections' own checks
//! are `config/halo.rs`). Every problem names the stream and the key.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::connection::{Connection, ConnectionKind};
use crate::config::load::Layers;
use crate::mapping::{FieldMap, Mapping};

/// `[streams.X.halo]` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHalo {
    /// The Halo site (`site_id`) of users that match nobody.
    pub default_site: Option<i64>,
    /// Where Halo keeps the SeatGeek ID: `other1`..`other5`, `custom:NAME` or `custom:ID`.
    pub id_field: Option<String>,
    /// Halo custom field (name, or numeric ID) = "seatgeek.path | transform | ...".
    pub custom_fields: Option<BTreeMap<String, String>>,
    pub import_address: Option<bool>,
    /// `deactivate` (default) or `ignore`.
    pub on_deleted: Option<String>,
    /// Users per POST (default 100, at most 1000).
    pub batch_size: Option<u32>,
    /// Written before the SeatGeek ID in Halo (e.g. `sg2:`), for a second SeatGeek account.
    pub id_prefix: Option<String>,
    /// Up to this many Halo users, a run loads Halo's users once instead of searching per user.
    pub preload_max: Option<u64>,
}

/// A Halo custom field, by ID or by name (names compare case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomRef {
    Id(i64),
    Name(String),
}

impl CustomRef {
    pub fn parse(s: &str) -> CustomRef {
        match s.trim().parse::<i64>() {
            Ok(n) => CustomRef::Id(n),
            Err(_) => CustomRef::Name(s.trim().to_string()),
        }
    }
}

/// The Halo field that holds the SeatGeek ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdField {
    /// `other1`..`other5`.
    Other(u8),
    Custom(CustomRef),
}

impl IdField {
    pub fn parse(s: &str) -> Option<IdField> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("custom:") {
            if rest.trim().is_empty() {
                return None;
            }
            return Some(IdField::Custom(CustomRef::parse(rest)));
        }
        match s {
            "other1" | "other2" | "other3" | "other4" | "other5" => {
                Some(IdField::Other(s.as_bytes()[5] - b'0'))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDeleted {
    Deactivate,
    Ignore,
}

/// The validated options; system-field mappings and statics are the stream's own
/// `[streams.X.mapping]` and `[streams.X.static]` (a default mapping when none is given).
#[derive(Debug, Clone)]
pub struct HaloOptions {
    pub default_site: i64,
    pub id_field: IdField,
    pub custom_fields: Vec<(CustomRef, FieldMap)>,
    pub import_address: bool,
    pub on_deleted: OnDeleted,
    pub batch_size: usize,
    pub id_prefix: String,
    pub preload_max: u64,
    /// `max_per_run` when written: the most events one run takes. None: all there are.
    pub max_events: Option<u64>,
}

/// Halo user fields a mapping or a static may write.
pub const SYSTEM_FIELDS: &[&str] = &[
    "firstname",
    "surname",
    "name",
    "emailaddress",
    "phonenumber",
    "mobilenumber",
    "mobilenumber2",
    "login",
    "title",
    "jobtitle",
    "notes",
    "inactive",
    "other1",
    "other2",
    "other3",
    "other4",
    "other5",
];

/// The mapping used when `[streams.X.mapping]` is empty.
pub fn default_mapping() -> Vec<FieldMap> {
    [
        ("firstname", "first_name | trim"),
        ("surname", "last_name | trim"),
        ("emailaddress", "email | trim"),
        ("phonenumber", "phone | phone"),
    ]
    .iter()
    .map(|(t, s)| Mapping::parse_field(t, s).expect("static mapping parses"))
    .collect()
}

/// Checks `[streams.X.halo]` and the stream's mapping for a SeatGeek → Halo stream.
fn build_options(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    raw: Option<&RawHalo>,
    mapping: &mut Mapping,
    max_per_run: Option<u32>,
) -> Option<HaloOptions> {
    let key = |k: &str| format!("{prefix}.halo.{k}");
    let before = l.problems.len();
    let empty = RawHalo::default();
    let raw = raw.unwrap_or(&empty);
    let default_site = match raw.default_site {
        Some(s) => s,
        None => {
            l.problem(
                scope,
                &key("default_site"),
                "missing key `default_site` (the Halo site ID for users that match nobody)",
            );
            0
        }
    };
    let id_field = match raw.id_field.as_deref() {
        None => {
            l.problem(
                scope,
                &key("id_field"),
                "missing key `id_field` (`other1`..`other5`, `custom:NAME` or `custom:ID`)",
            );
            None
        }
        Some(t) => {
            let f = IdField::parse(t);
            if f.is_none() {
                l.problem(
                    scope,
                    &key("id_field"),
                    format!("{t:?} is not `other1`..`other5`, `custom:NAME` or `custom:ID`"),
                );
            }
            f
        }
    };
    let mut custom_fields = Vec::new();
    for (name, expr) in raw.custom_fields.iter().flatten() {
        match Mapping::parse_field(name, expr) {
            Ok(f) => {
                let r = CustomRef::parse(name);
                if id_field.as_ref() == Some(&IdField::Custom(r.clone())) {
                    l.problem(
                        scope,
                        &key(&format!("custom_fields.{name}")),
                        "this custom field holds the SeatGeek ID (`id_field`); usher writes it",
                    );
                }
                custom_fields.push((r, f));
            }
            Err(e) => l.problem(scope, &key(&format!("custom_fields.{name}")), e),
        }
    }
    let on_deleted = match raw.on_deleted.as_deref() {
        None | Some("deactivate") => OnDeleted::Deactivate,
        Some("ignore") => OnDeleted::Ignore,
        Some(o) => {
            l.problem(
                scope,
                &key("on_deleted"),
                format!("{o:?} is neither \"deactivate\" nor \"ignore\""),
            );
            OnDeleted::Deactivate
        }
    };
    let batch_size = match raw.batch_size {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => {
            l.problem(
                scope,
                &key("batch_size"),
                format!("{n} is out of range (1 to 1000)"),
            );
            100
        }
    };
    if mapping.fields.is_empty() {
        mapping.fields = default_mapping();
    }
    let id_other = match &id_field {
        Some(IdField::Other(n)) => Some(format!("other{n}")),
        _ => None,
    };
    let targets: Vec<(String, &str)> = mapping
        .fields
        .iter()
        .map(|f| (f.target.clone(), "mapping"))
        .chain(mapping.statics.iter().map(|(k, _)| (k.clone(), "static")))
        .collect();
    for (t, table) in targets {
        let k = format!("{prefix}.{table}.{t}");
        if !SYSTEM_FIELDS.contains(&t.as_str()) {
            l.problem(
                scope,
                &k,
                format!(
                    "`{t}` is not a Halo user field usher writes (known: {}; custom fields go under `halo.custom_fields`)",
                    SYSTEM_FIELDS.join(", ")
                ),
            );
        } else if id_other.as_deref() == Some(t.as_str()) {
            l.problem(
                scope,
                &k,
                format!("`{t}` holds the SeatGeek ID (`halo.id_field`); usher writes it"),
            );
        }
    }
    if l.problems.len() != before {
        return None;
    }
    Some(HaloOptions {
        default_site,
        id_field: id_field?,
        custom_fields,
        import_address: raw.import_address.unwrap_or(true),
        on_deleted,
        batch_size,
        id_prefix: raw.id_prefix.clone().unwrap_or_default(),
        preload_max: raw.preload_max.unwrap_or(20_000),
        max_events: max_per_run.map(u64::from),
    })
}

/// A stream's SeatGeek → Halo options, from `[streams.X.halo]` and the stream's `entity`,
/// `max_per_run` and mapping: None when the stream is of another kind (or has problems,
/// which are reported). A stream of any other kind that writes `halo` is refused.
#[allow(clippy::too_many_arguments)] // the stream's keys it reads, as `streams::options` holds them
pub(crate) fn build(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    raw: Option<&RawHalo>,
    entity: Option<&String>,
    max_per_run: Option<u32>,
    source: Option<&Connection>,
    target: Option<&Connection>,
    mapping: &mut Mapping,
) -> Option<HaloOptions> {
    use ConnectionKind::{Halo, SeatGeek};
    let sk = source.map(|s| s.kind);
    let tk = target.map(|t| t.kind);
    let ours = sk == Some(SeatGeek) || tk == Some(Halo);
    if !ours {
        if raw.is_some() {
            l.problem(
                scope,
                &format!("{prefix}.halo"),
                "`halo` applies only to a stream from a seatgeek source to a halo target",
            );
        }
        return None;
    }
    let mut ok = true;
    if let Some(k) = sk
        && k != SeatGeek
    {
        l.problem(
            scope,
            &format!("{prefix}.source"),
            format!("a halo target takes a seatgeek source, not {}", k.as_str()),
        );
        ok = false;
    }
    if let Some(k) = tk
        && k != Halo
    {
        l.problem(
            scope,
            &format!("{prefix}.target"),
            format!("a seatgeek source feeds a halo target, not {}", k.as_str()),
        );
        ok = false;
    }
    if let Some(e) = entity
        && e != "user"
    {
        l.problem(
            scope,
            &format!("{prefix}.entity"),
            format!("SeatGeek → Halo imports entity \"user\", not {e:?}"),
        );
        ok = false;
    }
    let opts = build_options(l, scope, prefix, raw, mapping, max_per_run);
    if ok { opts } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_fields_parse() {
        assert_eq!(IdField::parse("other3"), Some(IdField::Other(3)));
        assert_eq!(
            IdField::parse("custom:145"),
            Some(IdField::Custom(CustomRef::Id(145)))
        );
        assert_eq!(
            IdField::parse("custom:CFSeatGeekId"),
            Some(IdField::Custom(CustomRef::Name("CFSeatGeekId".into())))
        );
        assert_eq!(IdField::parse("other6"), None);
        assert_eq!(IdField::parse("custom:"), None);
        assert_eq!(IdField::parse("email"), None);
    }
}
