//! A POST's body → inbox records. Pure.
//!
//! **A record is kept byte for byte as received**: the body is split into its array elements
//! as raw slices (serde_json `RawValue`), and each record is only walked (never turned into
//! a `serde_json::Value`), to refuse an object with a key twice and to find its ID. No tree
//! of the body is built, so a body takes about its own size in memory plus ~40 bytes a
//! record (ARCHITECTURE, "S-360 ⇄ CRM").
//!
//! **An ID is its exact JSON text**: a string's content, or a number's digits as written.
//! An ID usher cannot keep exactly (a fraction, an exponent, a sign, more than
//! [`MAX_ID_LEN`] bytes, control characters) is refused with the element's index, never
//! rounded: `18446744073709551617` stays that, where a parse to `f64` made three different
//! orders one record.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::store::{InboxRecord, RecordId};
use crate::streams::s360::options::S360Entity;

/// Longest record ID kept (bytes).
pub const MAX_ID_LEN: usize = 256;

/// The path of the ID in a record of `entity`.
fn id_path(entity: S360Entity) -> &'static [&'static str] {
    match entity {
        S360Entity::Contacts => &["contactNumber"],
        S360Entity::Orders => &["orderDetailsData", "orderId"],
    }
}

/// Checks a body and finds its records; `Err` is the reason for a 400.
pub fn parse_body(entity: S360Entity, body: &[u8]) -> Result<Vec<InboxRecord>, String> {
    if u32::try_from(body.len()).is_err() {
        return Err("the body is over 4 GB".into());
    }
    // Counted first (a cheap pass: nothing is kept), so that the list of records is made at
    // its size once instead of doubling, which would hold 1.5× its size while it copies.
    let count = serde_json::from_slice::<Vec<IgnoredAny>>(body).map_or(0, |v| v.len());
    let mut refusal = None;
    let mut records = Vec::with_capacity(count);
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = de
        .deserialize_any(Elements {
            entity,
            body,
            records: &mut records,
            refusal: &mut refusal,
        })
        .and_then(|()| de.end());
    match (walked, refusal) {
        (Ok(()), _) => Ok(records),
        (Err(_), Some(Refusal::NotAnArray)) => {
            Err(match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => "the body must be a JSON array of records".into(),
                Err(e) => format!("the body is not JSON: {e}"),
            })
        }
        (Err(_), Some(Refusal::Element(reason))) => Err(reason),
        (Err(e), None) => Err(format!("the body is not JSON: {e}")),
    }
}

enum Refusal {
    NotAnArray,
    Element(String),
}

/// The body's top level: an array whose elements are taken as raw slices.
struct Elements<'a> {
    entity: S360Entity,
    body: &'a [u8],
    records: &'a mut Vec<InboxRecord>,
    refusal: &'a mut Option<Refusal>,
}

impl Elements<'_> {
    fn not_an_array<E: de::Error>(self) -> Result<(), E> {
        *self.refusal = Some(Refusal::NotAnArray);
        Err(E::custom("not an array"))
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // Every slice lies within the body: its offset is plain address arithmetic, and fits
        // in u32 (the body does).
        let base = self.body.as_ptr() as usize;
        let offset = |s: &str| (s.as_ptr() as usize - base) as u32;
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            let i = self.records.len();
            match record(self.entity, i, raw.get()) {
                Ok(id) => {
                    let start = offset(raw.get());
                    self.records.push(InboxRecord {
                        start,
                        end: start + raw.get().len() as u32,
                        id: match id {
                            Id::Written(s) => RecordId::Span(offset(s), offset(s) + s.len() as u32),
                            Id::Decoded(s) => RecordId::Text(s),
                        },
                    });
                }
                Err(reason) => {
                    *self.refusal = Some(Refusal::Element(reason));
                    return Err(de::Error::custom("refused element"));
                }
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_an_array()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_array()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_array()
    }
}

/// A record's ID: its text as written in the body, or decoded when it holds escapes.
enum Id<'a> {
    Written(&'a str),
    Decoded(Box<str>),
}

/// Checks element `i` (its raw text) and returns its ID.
fn record(entity: S360Entity, i: usize, text: &str) -> Result<Id<'_>, String> {
    if !text.starts_with('{') {
        return Err(format!("element {i} is not an object"));
    }
    let path = id_path(entity);
    let mut found = None;
    let mut de = serde_json::Deserializer::from_str(text);
    Walk {
        path,
        found: &mut found,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .map_err(|e| format!("element {i}: {e}"))?;
    let field = path.join(".");
    let Some(raw) = found else {
        return Err(format!("element {i} has no `{field}`"));
    };
    id_text(raw.get()).map_err(|why| format!("element {i}: `{field}` {why}"))
}

/// The ID a raw JSON value stands for, or why it cannot be one.
fn id_text(raw: &str) -> Result<Id<'_>, String> {
    let (id, len) = if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        // JSON strings hold no raw control characters: only escapes can bring them.
        let id = if inner.contains('\\') {
            let s: String = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            if s.chars().any(char::is_control) {
                return Err("holds control characters".into());
            }
            Id::Decoded(s.into())
        } else {
            Id::Written(inner)
        };
        let (empty, len) = match &id {
            Id::Written(s) => (s.trim().is_empty(), s.len()),
            Id::Decoded(s) => (s.trim().is_empty(), s.len()),
        };
        if empty {
            return Err("is empty".into());
        }
        (id, len)
    } else if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        (Id::Written(raw), raw.len())
    } else {
        let shown: String = raw.chars().take(40).collect();
        return Err(format!(
            "must be a string or an integer written in plain digits, not {shown}"
        ));
    };
    if len > MAX_ID_LEN {
        return Err(format!("is longer than {MAX_ID_LEN} bytes"));
    }
    Ok(id)
}

/// Walks a JSON value and fails on an object with the same key twice (which JSON parsers
/// resolve differently: `{"contactNumber":"1","contactNumber":"2"}` is no record to store).
/// Along `path` (keys from this level down) it keeps the raw text of the value at its end.
struct Walk<'p, 'de> {
    path: &'static [&'static str],
    found: &'p mut Option<&'de RawValue>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// An object key, borrowed from the body unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct K;
        impl<'de> Visitor<'de> for K {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(K)
    }
}

impl<'de> Visitor<'de> for Walk<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut ignored = None;
        while seq
            .next_element_seed(Walk {
                path: &[],
                found: &mut ignored,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        let mut ignored = None;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let on_path = self.path.first() == Some(&&*k);
            if !seen.insert(k.clone()) {
                return Err(de::Error::custom(format!(
                    "the key `{k}` appears twice in one object"
                )));
            }
            match (on_path, self.path.len()) {
                (true, 1) => *self.found = Some(map.next_value::<&'de RawValue>()?),
                (true, _) => map.next_value_seed(Walk {
                    path: &self.path[1..],
                    found: &mut *self.found,
                })?,
                (false, _) => map.next_value_seed(Walk {
                    path: &[],
                    found: &mut ignored,
                })?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(entity: S360Entity, body: &str) -> Vec<String> {
        let batch = crate::store::InboxBatch {
            stream: "s".into(),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            records: parse_body(entity, body.as_bytes()).unwrap(),
        };
        batch
            .records
            .iter()
            .map(|r| batch.record(r).unwrap().0.to_string())
            .collect()
    }

    fn refused(entity: S360Entity, body: &str) -> String {
        parse_body(entity, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn bodies_are_checked() {
        use S360Entity::*;
        assert!(refused(Contacts, "{").contains("not JSON"));
        assert!(refused(Contacts, "[{\"contactNumber\": ").contains("not JSON"));
        assert!(refused(Contacts, "[] x").contains("not JSON"));
        assert!(refused(Contacts, "{}").contains("must be a JSON array"));
        assert!(refused(Contacts, "\"x\"").contains("must be a JSON array"));
        assert!(refused(Contacts, r#"[{"x":1}]"#).contains("element 0 has no `contactNumber`"));
        assert!(refused(Contacts, r#"[{"contactNumber":"1"},2]"#).contains("element 1 is not"));
        assert!(
            refused(Contacts, r#"[{"contactNumber":"1","a":{"b":1,"b":2}}]"#)
                .contains("element 0: the key `b` appears twice")
        );
        assert!(
            refused(Contacts, r#"[{"contactNumber":"1","contactNumber":"2"}]"#)
                .contains("`contactNumber` appears twice")
        );
        assert_eq!(
            ids(
                Orders,
                r#"[{"orderDetailsData":{"orderId":17,"orderState":"CLOSED"}}]"#
            ),
            ["17"]
        );
        assert!(parse_body(Orders, b"[]").unwrap().is_empty());
        assert!(parse_body(Orders, b" [ ] ").unwrap().is_empty());
    }

    #[test]
    fn ids_are_kept_as_written() {
        use S360Entity::*;
        let big = r#"[{"orderDetailsData":{"orderId":18446744073709551616}},
                      {"orderDetailsData":{"orderId":18446744073709551617}},
                      {"orderDetailsData":{"orderId":"A-\u0031"}}]"#;
        assert_eq!(
            ids(Orders, big),
            ["18446744073709551616", "18446744073709551617", "A-1"]
        );
        assert_eq!(ids(Contacts, r#"[{"contactNumber":0}]"#), ["0"]);
        for bad in [
            "1.5",
            "1e3",
            "-7",
            "true",
            "{}",
            "[1]",
            "\"\"",
            "\" \"",
            "\"a\\nb\"",
        ] {
            let body = format!(r#"[{{"contactNumber":"1"}},{{"contactNumber":{bad}}}]"#);
            let why = refused(Contacts, &body);
            assert!(
                why.starts_with("element 1: `contactNumber`"),
                "{bad}: {why}"
            );
        }
        assert!(refused(Contacts, r#"[{"contactNumber":null}]"#).contains("must be a string"));
        let long = format!(r#"[{{"contactNumber":"{}"}}]"#, "9".repeat(MAX_ID_LEN + 1));
        assert!(refused(Contacts, &long).contains("longer than"));
    }

    #[test]
    fn records_are_sliced_byte_for_byte() {
        let body = "[ {\"contactNumber\" : \"1\", \"x\": 0.30000000000000000001 } ,\n{\"contactNumber\":2}]";
        let records = parse_body(S360Entity::Contacts, body.as_bytes()).unwrap();
        let texts: Vec<&str> = records
            .iter()
            .map(|r| &body[r.start as usize..r.end as usize])
            .collect();
        assert_eq!(
            texts,
            [
                "{\"contactNumber\" : \"1\", \"x\": 0.30000000000000000001 }",
                "{\"contactNumber\":2}"
            ]
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!("[{}]", "[".repeat(50_000) + &"]".repeat(50_000));
        assert!(refused(S360Entity::Contacts, &deep).contains("element 0 is not an object"));
        let n = 5_000;
        let deep_obj = format!(
            "[{}1{}]",
            "{\"contactNumber\":\"7\",\"a\":".repeat(n),
            "}".repeat(n)
        );
        assert!(refused(S360Entity::Contacts, &deep_obj).contains("recursion limit"));
    }
}
