//! Field mappings: target field ← source path, through small named transforms, plus static
//! (constant) fields. Pure functions over JSON values: mapping never does IO.
//!
//! In config, `[streams.X.mapping]` holds `target = "source.path | transform | ..."` and
//! `[streams.X.static]` holds `target = constant`. Target keys may be dotted
//! (`address.city`) to build nested objects. An empty mapping passes the record through.

use serde_json::{Map, Value};

/// A transform applied to a mapped value, left to right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    Trim,
    Lowercase,
    Uppercase,
    /// Phone number reduced to its digits.
    Digits,
    /// Phone number as `+` and digits when it had a leading `+`, else digits.
    Phone,
    /// The date part (`YYYY-MM-DD`) of an ISO-8601 date or date-time.
    Date,
    /// Missing, null or empty: the record cannot be mapped.
    Required,
    /// Missing or null: this value instead.
    Default(String),
    /// The value as a string.
    String,
}

impl Transform {
    pub const NAMES: &'static [&'static str] = &[
        "trim",
        "lowercase",
        "uppercase",
        "digits",
        "phone",
        "date",
        "required",
        "default:VALUE",
        "string",
    ];

    fn parse(text: &str) -> Option<Transform> {
        let text = text.trim();
        if let Some(v) = text.strip_prefix("default:") {
            return Some(Transform::Default(v.to_string()));
        }
        Some(match text {
            "trim" => Transform::Trim,
            "lowercase" => Transform::Lowercase,
            "uppercase" => Transform::Uppercase,
            "digits" => Transform::Digits,
            "phone" => Transform::Phone,
            "date" => Transform::Date,
            "required" => Transform::Required,
            "string" => Transform::String,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMap {
    pub target: String,
    pub source: String,
    pub transforms: Vec<Transform>,
}

#[derive(Debug, Clone, Default)]
pub struct Mapping {
    pub fields: Vec<FieldMap>,
    pub statics: Vec<(String, Value)>,
}

/// Why one record could not be mapped; goes to dead letters or stops the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("field `{target}` (from `{from}`) is required but missing or empty")]
    Missing { target: String, from: String },
    #[error("field `{target}` (from `{from}`): {reason}")]
    Invalid {
        target: String,
        from: String,
        reason: String,
    },
}

impl Mapping {
    /// Parses one `target = "source | transform"` line. The error names what is wrong.
    pub fn parse_field(target: &str, expr: &str) -> Result<FieldMap, String> {
        let mut parts = expr.split('|');
        let source = parts.next().unwrap_or("").trim().to_string();
        if source.is_empty() {
            return Err("the source path is empty".into());
        }
        if target.trim().is_empty() {
            return Err("the target field is empty".into());
        }
        let mut transforms = Vec::new();
        for t in parts {
            match Transform::parse(t) {
                Some(t) => transforms.push(t),
                None => {
                    let name = t.trim().split(':').next().unwrap_or("").trim();
                    return Err(format!(
                        "unknown transform `{}`{} (known: {})",
                        t.trim(),
                        crate::suggest::did_you_mean(name, Transform::NAMES),
                        Transform::NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(FieldMap {
            target: target.to_string(),
            source,
            transforms,
        })
    }

    pub fn is_passthrough(&self) -> bool {
        self.fields.is_empty()
    }

    /// No field mappings and no statics: a record goes out exactly as it came in.
    pub fn is_identity(&self) -> bool {
        self.fields.is_empty() && self.statics.is_empty()
    }

    /// Maps one record. With no field mappings the record passes through unchanged
    /// (statics still apply on top).
    pub fn apply(&self, record: &Value) -> Result<Value, MapError> {
        let mut out = if self.fields.is_empty() {
            match record {
                Value::Object(m) => m.clone(),
                other => {
                    let mut m = Map::new();
                    m.insert("value".into(), other.clone());
                    m
                }
            }
        } else {
            Map::new()
        };
        for f in &self.fields {
            let mut v = lookup(record, &f.source).cloned().unwrap_or(Value::Null);
            for t in &f.transforms {
                v = apply_transform(t, v).map_err(|reason| match reason {
                    None => MapError::Missing {
                        target: f.target.clone(),
                        from: f.source.clone(),
                    },
                    Some(reason) => MapError::Invalid {
                        target: f.target.clone(),
                        from: f.source.clone(),
                        reason,
                    },
                })?;
            }
            set_path(&mut out, &f.target, v);
        }
        for (k, v) in &self.statics {
            set_path(&mut out, k, v.clone());
        }
        Ok(Value::Object(out))
    }
}

/// `Err(None)`: required and missing; `Err(Some(reason))`: the value does not fit.
fn apply_transform(t: &Transform, v: Value) -> Result<Value, Option<String>> {
    let as_str = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    Ok(match t {
        Transform::Required => match &v {
            Value::Null => return Err(None),
            Value::String(s) if s.trim().is_empty() => return Err(None),
            _ => v,
        },
        Transform::Default(d) => match v {
            Value::Null => Value::String(d.clone()),
            other => other,
        },
        _ if v.is_null() => Value::Null,
        Transform::Trim => as_str(&v)
            .map(|s| Value::String(s.trim().to_string()))
            .unwrap_or(v),
        Transform::Lowercase => as_str(&v)
            .map(|s| Value::String(s.to_lowercase()))
            .unwrap_or(v),
        Transform::Uppercase => as_str(&v)
            .map(|s| Value::String(s.to_uppercase()))
            .unwrap_or(v),
        Transform::String => as_str(&v).map(Value::String).unwrap_or(v),
        Transform::Digits => Value::String(digits(
            &as_str(&v).ok_or_else(|| Some("not text".to_string()))?,
        )),
        Transform::Phone => {
            let s = as_str(&v).ok_or_else(|| Some("not text".to_string()))?;
            let d = digits(&s);
            if d.is_empty() {
                Value::Null
            } else if s.trim_start().starts_with('+') {
                Value::String(format!("+{d}"))
            } else {
                Value::String(d)
            }
        }
        Transform::Date => {
            let s = as_str(&v).ok_or_else(|| Some("not a date".to_string()))?;
            let date = s.trim().get(..10).unwrap_or("");
            chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
                .map_err(|_| Some(format!("{s:?} is not an ISO-8601 date")))?;
            Value::String(date.to_string())
        }
    })
}

pub fn digits(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_digit()).collect()
}

/// Follows a dotted path (`a.b.0.c`); numeric parts index arrays.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() || path == "." {
        return Some(v);
    }
    let mut cur = v;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn set_path(out: &mut Map<String, Value>, path: &str, v: Value) {
    let mut parts = path.split('.').peekable();
    let mut cur = out;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), v);
            return;
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        cur = entry.as_object_mut().expect("just made an object");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(lines: &[(&str, &str)]) -> Mapping {
        Mapping {
            fields: lines
                .iter()
                .map(|(t, s)| Mapping::parse_field(t, s).unwrap())
                .collect(),
            statics: vec![("source".into(), json!("usher"))],
        }
    }

    #[test]
    fn maps_paths_transforms_and_statics() {
        let m = mapping(&[
            ("email", "contact.email | trim | lowercase | required"),
            ("address.city", "addresses.0.town"),
            ("phone", "tel | phone"),
            ("born", "birth | date"),
        ]);
        let out = m
            .apply(
                &json!({"contact": {"email": "  Ada@Example.ORG "}, "addresses": [{"town": "Oslo"}],
                           "tel": "+47 123 45 678", "birth": "1990-01-31T00:00:00Z"}),
            )
            .unwrap();
        assert_eq!(
            out,
            json!({"email": "ada@example.org", "address": {"city": "Oslo"}, "phone": "+4712345678",
                   "born": "1990-01-31", "source": "usher"})
        );
    }

    #[test]
    fn a_missing_required_field_is_an_error_naming_it() {
        let m = mapping(&[("email", "email | trim | required")]);
        let err = m.apply(&json!({"email": "   "})).unwrap_err();
        assert!(err.to_string().contains("`email`"), "{err}");
        assert!(m.apply(&json!({})).is_err());
    }

    #[test]
    fn empty_mapping_passes_through_with_statics() {
        let m = Mapping {
            fields: vec![],
            statics: vec![("x".into(), json!(1))],
        };
        assert_eq!(m.apply(&json!({"a": 2})).unwrap(), json!({"a": 2, "x": 1}));
    }

    #[test]
    fn unknown_transform_is_refused() {
        let err = Mapping::parse_field("a", "b | shout").unwrap_err();
        assert!(err.contains("unknown transform `shout`"), "{err}");
        let err = Mapping::parse_field("a", "b | lowercse").unwrap_err();
        assert!(err.contains("did you mean `lowercase`?"), "{err}");
    }
}
