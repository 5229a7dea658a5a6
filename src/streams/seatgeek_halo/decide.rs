//! The pure part of SeatGeek → Halo: which Halo user an event is (matching) and what is sent
//! (mapping). Values in, values out; the run (`mod.rs`) does the IO and carries them out.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::options::{CustomRef, HaloOptions, IdField, OnDeleted};
use crate::connectors::seatgeek::{Action, ChangeEvent};
use crate::mapping::{FieldMap, Mapping};

// ---------------------------------------------------------------- pure: matching

/// E-mails are compared trimmed and case-insensitively.
pub fn email_key(user: &Value) -> Option<String> {
    let e = user.get("email")?.as_str()?.trim().to_lowercase();
    (!e.is_empty()).then_some(e)
}

/// The indexes (into `events`) of the newest event of each user, in feed order, and of the
/// events a newer event of the same user supersedes. Events without a user ID are left out
/// of both (the caller dead-letters them).
pub fn newest_per_user(events: &[ChangeEvent]) -> (Vec<usize>, Vec<usize>) {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        if let Some(id) = e.user_id.as_deref() {
            last.insert(id, i);
        }
    }
    let mut winners = Vec::with_capacity(last.len());
    let mut superseded = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if let Some(id) = e.user_id.as_deref() {
            if last[id] == i {
                winners.push(i);
            } else {
                superseded.push(i);
            }
        }
    }
    (winners, superseded)
}

/// What Halo knows of one SeatGeek user, as found by the link, the ID field or the e-mail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub link: Option<String>,
    pub by_id_field: Vec<String>,
    pub by_email: Vec<String>,
}

/// What to do with a user's newest event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Update this Halo user; `via` says how it was found (link, id field, e-mail).
    Update {
        halo_id: String,
        via: &'static str,
    },
    Create,
    Deactivate {
        halo_id: String,
    },
    Skip(String),
    Dead(String),
}

/// Link → Halo field holding the SeatGeek ID → e-mail → create. Pure.
pub fn decide(action: Action, found: &Found, on_deleted: OnDeleted, sg_id: &str) -> Decision {
    let target: Option<(String, &'static str)> = if let Some(l) = &found.link {
        Some((l.clone(), "link"))
    } else if found.by_id_field.len() > 1 {
        return Decision::Dead(format!(
            "Halo users {} all hold SeatGeek ID {sg_id:?}; not guessing which is the one",
            found.by_id_field.join(" and ")
        ));
    } else if let Some(id) = found.by_id_field.first() {
        Some((id.clone(), "id field"))
    } else if found.by_email.len() > 1 {
        return Decision::Dead(format!(
            "the e-mail is shared by Halo users {}; not guessing which is the one",
            found.by_email.join(" and ")
        ));
    } else {
        found.by_email.first().map(|id| (id.clone(), "e-mail"))
    };
    match (action, target) {
        (Action::Deleted, None) => Decision::Skip("deleted before it was ever imported".into()),
        (Action::Deleted, Some(_)) if on_deleted == OnDeleted::Ignore => {
            Decision::Skip("deleted at SeatGeek; `on_deleted = \"ignore\"`".into())
        }
        (Action::Deleted, Some((halo_id, _))) => Decision::Deactivate { halo_id },
        (_, Some((halo_id, via))) => Decision::Update { halo_id, via },
        (_, None) => Decision::Create,
    }
}

/// The SeatGeek ID as written into Halo.
pub fn halo_sg_id(opts: &HaloOptions, sg_id: &str) -> String {
    format!("{}{sg_id}", opts.id_prefix)
}

pub(super) fn custom_matches(r: &CustomRef, cf: &Value) -> bool {
    match r {
        CustomRef::Id(id) => cf.get("id").and_then(Value::as_i64) == Some(*id),
        CustomRef::Name(n) => cf
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|x| x.eq_ignore_ascii_case(n)),
    }
}

pub(super) fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The value of the SeatGeek ID field of a Halo user.
pub fn id_field_value(field: &IdField, user: &Value) -> Option<String> {
    match field {
        IdField::Other(n) => user.get(format!("other{n}"))?.as_str().map(str::to_string),
        IdField::Custom(r) => user
            .get("customfields")?
            .as_array()?
            .iter()
            .find(|cf| custom_matches(r, cf))
            .and_then(|cf| cf.get("value"))
            .and_then(value_text),
    }
}

/// A Halo user's ID as JSON text (kept opaque, sent back as it came).
pub fn halo_id(user: &Value) -> Option<String> {
    match user.get("id")? {
        Value::Null => None,
        v => Some(v.to_string()),
    }
}

pub(super) fn halo_email(user: &Value) -> Option<String> {
    let e = user.get("emailaddress")?.as_str()?.trim().to_lowercase();
    (!e.is_empty()).then_some(e)
}

/// Exact matches among search results: by the SeatGeek ID field, and by e-mail.
pub fn exact_matches(
    field: &IdField,
    users: &[Value],
    sg_value: Option<&str>,
    email: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let mut by_id = Vec::new();
    let mut by_email = Vec::new();
    for u in users {
        let Some(id) = halo_id(u) else { continue };
        if sg_value.is_some() && id_field_value(field, u).as_deref() == sg_value {
            by_id.push(id.clone());
        }
        if email.is_some() && halo_email(u).as_deref() == email {
            by_email.push(id);
        }
    }
    by_id.dedup();
    by_email.dedup();
    (by_id, by_email)
}

// ---------------------------------------------------------------- pure: mapping

/// The mappings of one stream, prepared once per run.
pub struct Mapper {
    system: Mapping,
    custom: Vec<(CustomRef, Mapping)>,
}

impl Mapper {
    pub fn new(system: &Mapping, opts: &HaloOptions) -> Self {
        Mapper {
            system: system.clone(),
            custom: opts
                .custom_fields
                .iter()
                .map(|(r, f)| {
                    (
                        r.clone(),
                        Mapping {
                            fields: vec![FieldMap {
                                target: "v".into(),
                                ..f.clone()
                            }],
                            statics: vec![],
                        },
                    )
                })
                .collect(),
        }
    }

    /// The Halo user to POST for one SeatGeek user (without `id`/`site_id`). Null values are
    /// left out, so a field SeatGeek does not send never wipes what Halo holds.
    pub fn halo_user(
        &self,
        opts: &HaloOptions,
        sg_id: &str,
        user: &Value,
    ) -> Result<Map<String, Value>, crate::mapping::MapError> {
        let mut out = match self.system.apply(user)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        out.retain(|_, v| !v.is_null());
        if !out.contains_key("name") {
            let part = |k: &str| out.get(k).and_then(Value::as_str).unwrap_or("").trim();
            let name = format!("{} {}", part("firstname"), part("surname"))
                .trim()
                .to_string();
            if !name.is_empty() {
                out.insert("name".into(), Value::String(name));
            }
        }
        let mut customs = Vec::new();
        let id_value = Value::String(halo_sg_id(opts, sg_id));
        match &opts.id_field {
            IdField::Other(n) => {
                out.insert(format!("other{n}"), id_value);
            }
            IdField::Custom(r) => customs.push(custom_field(r, id_value)),
        }
        for (r, m) in &self.custom {
            if let Value::Object(mut v) = m.apply(user)?
                && let Some(v) = v.remove("v")
                && !v.is_null()
            {
                customs.push(custom_field(r, v));
            }
        }
        if !customs.is_empty() {
            out.insert("customfields".into(), Value::Array(customs));
        }
        if opts.import_address
            && let Some(Value::Object(a)) = user.get("address")
        {
            let mut addr = Map::new();
            for k in ["line1", "line2", "city", "postcode", "country"] {
                if let Some(v) = a.get(k)
                    && !v.is_null()
                {
                    addr.insert(k.into(), v.clone());
                }
            }
            if !addr.is_empty() {
                out.insert("primary_address".into(), Value::Object(addr));
            }
        }
        Ok(out)
    }
}

pub(super) fn custom_field(r: &CustomRef, value: Value) -> Value {
    match r {
        CustomRef::Id(id) => json!({"id": id, "value": value}),
        CustomRef::Name(n) => json!({"name": n, "value": value}),
    }
}
