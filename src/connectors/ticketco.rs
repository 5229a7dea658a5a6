//! Ticket Co (vendor-apis "Ticket Co — bookings"): active events by start date, and each
//! event's booking lines (`item_grosses`), page by page. URLs and JSON only.
//!
//! The API token goes in the query string (`?token=T`). It is added by `http`
//! (`HttpAuth::Query`) when the request is built, so the URLs this module holds never carry
//! it, and every message names the call as `GET /events`, never with its query.
//!
//! Decisions where the vendor doc is silent:
//! - An event is kept only when it has an `id` (number or string, kept opaque as text); any
//!   other field may be missing. `tags` may be strings or `{"name": …}` objects.
//! - A page whose JSON lacks the `events`/`item_grosses` array is malformed: an error for
//!   that call, which the engine confines to that event (or ends the listing).
//! - A 401 is reported as "credentials refused" naming the connection.
//! - A booking line's fields are read leniently ([`Line`]): a text field may be a string or
//!   a number, a field of another type reads as absent, and an element that is not an
//!   object is a line without fields (it goes to dead letters for its missing
//!   `ref_number`); only a page that is not `{"item_grosses": [...]}` is malformed.

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::config::Connection;
use crate::http::{Endpoint, Http, HttpAuth, HttpError, Retry, describe};

/// One Ticket Co event, as much as usher needs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub title: Option<String>,
    pub start_at: Option<String>,
    /// The venue name.
    pub location_name: Option<String>,
    pub tags: Vec<String>,
}

pub struct TicketCo {
    endpoint: Endpoint,
}

impl TicketCo {
    pub fn new(http: &Http, conn: &Connection) -> Self {
        let auth = match &conn.api_token {
            Some(token) => HttpAuth::Query {
                param: "token".into(),
                token: token.clone(),
            },
            None => HttpAuth::None,
        };
        TicketCo {
            endpoint: http.endpoint_with(conn, auth),
        }
    }

    pub fn name(&self) -> &str {
        &self.endpoint.name
    }

    /// One page of active events starting between two local dates (inclusive).
    pub async fn events(
        &self,
        page: u32,
        start_from: Option<&str>,
        start_to: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Event>, SourceError> {
        let mut url = self.endpoint.url("events");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("status", "active");
            q.append_pair("page", &page.to_string());
            if let Some(d) = start_from {
                q.append_pair("start_from", d);
            }
            if let Some(d) = start_to {
                q.append_pair("start_to", d);
            }
        }
        let body = self.get(url, cancel).await?;
        let what = describe(&Method::GET, &self.endpoint.url("events"));
        let list = array(&body, "events").map_err(|reason| self.malformed(&what, reason))?;
        Ok(list.iter().filter_map(parse_event).collect())
    }

    /// One page of an event's booking lines (pages run 1, 2, 3… until an empty page).
    pub async fn item_grosses(
        &self,
        event_id: &str,
        page: u32,
        cancel: &CancellationToken,
    ) -> Result<LinePage, SourceError> {
        let mut url = self.endpoint.url("item_grosses");
        url.query_pairs_mut()
            .append_pair("event_id", event_id)
            .append_pair("page", &page.to_string());
        let body = self.get_bytes(url, cancel).await?;
        let what = describe(&Method::GET, &self.endpoint.url("item_grosses"));
        LinePage::parse(body).map_err(|reason| self.malformed(&what, reason))
    }

    async fn get(&self, url: url::Url, cancel: &CancellationToken) -> Result<Value, SourceError> {
        let what = describe(&Method::GET, &url);
        let body = self.get_bytes(url, cancel).await?;
        serde_json::from_slice(&body).map_err(|e| {
            self.malformed(
                &what,
                format!(
                    "not JSON ({e}); the answer starts with: {}",
                    crate::http::snippet(&body)
                ),
            )
        })
    }

    /// A 2xx answer's body; 401 is "credentials refused", any other status an error.
    async fn get_bytes(
        &self,
        url: url::Url,
        cancel: &CancellationToken,
    ) -> Result<bytes::Bytes, SourceError> {
        let what = describe(&Method::GET, &url);
        let reply = self
            .endpoint
            .send(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
            .await?;
        if reply.status == 401 {
            return Err(HttpError::CredentialsRefused {
                conn: self.endpoint.name.clone(),
                what,
            }
            .into());
        }
        if !reply.is_success() {
            return Err(HttpError::Status {
                conn: self.endpoint.name.clone(),
                what,
                status: reply.status,
                snippet: reply.snippet(),
                attempts: reply.attempts,
            }
            .into());
        }
        Ok(reply.body)
    }

    fn malformed(&self, what: &str, reason: String) -> SourceError {
        SourceError::Malformed {
            conn: self.endpoint.name.clone(),
            what: what.to_string(),
            reason,
        }
    }
}

fn array<'a>(body: &'a Value, key: &str) -> Result<&'a Vec<Value>, String> {
    match body.get(key) {
        Some(Value::Array(a)) => Ok(a),
        _ => Err(format!("no `{key}` array")),
    }
}

/// Text of a string or number field.
pub fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One booking line (an `item_grosses` element), the fields usher reads, parsed straight
/// from the page (no `serde_json::Value` per line: a daily run reads every line of the
/// window, changed or not, so this is the run's hot path). As with [`text`], a text field
/// may come as a string or a number, a field of any other type reads as absent, and an
/// element that is not an object is a line without fields (it goes to dead letters for
/// its missing `ref_number`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Line {
    pub ref_number: Option<String>,
    pub transaction_datestamp: Option<String>,
    pub event_start: Option<String>,
    pub status: Option<String>,
    pub source: Option<String>,
    pub booking_type: Option<String>,
    pub quantity: Option<i64>,
    /// The line total in minor units.
    pub price: Option<i64>,
    pub buyer_first_name: Option<String>,
    pub buyer_last_name: Option<String>,
    pub buyer_email: Option<String>,
    pub buyer_phone: Option<String>,
    /// True only for a JSON `true`.
    pub buyer_email_opt_in: bool,
}

/// One page of booking lines as Ticket Co sent it, its shape checked and its lines
/// counted, not yet read: a run reads them only when the page may hold a change.
#[derive(Debug, Clone)]
pub struct LinePage {
    body: bytes::Bytes,
    count: usize,
}

/// A page of booking lines as Ticket Co sent it (shared, cheap to clone).
#[derive(Debug, Clone)]
pub struct RawLines(bytes::Bytes);

impl LinePage {
    /// `{"item_grosses": [LINE, …]}`; anything else is malformed (the reason says what).
    pub fn parse(body: bytes::Bytes) -> Result<LinePage, String> {
        #[derive(Deserialize)]
        struct Page {
            item_grosses: Option<Vec<serde::de::IgnoredAny>>,
        }
        let page: Page = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "not the item_grosses JSON ({e}); the answer starts with: {}",
                crate::http::snippet(&body)
            )
        })?;
        let count = page.item_grosses.ok_or("no `item_grosses` array")?.len();
        Ok(LinePage { body, count })
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// The page as it came.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The lines, and the page to read a line's JSON from later.
    pub fn lines(self) -> Result<(Vec<Line>, RawLines), String> {
        #[derive(Deserialize)]
        struct Page {
            item_grosses: Vec<Line>,
        }
        let page: Page = serde_json::from_slice(&self.body)
            .map_err(|e| format!("the booking lines cannot be read ({e})"))?;
        Ok((page.item_grosses, RawLines(self.body)))
    }
}

impl RawLines {
    /// Line `i` as Ticket Co sent it, as JSON text (read again from the page: only dead
    /// letters need it).
    pub fn raw(&self, i: usize) -> String {
        #[derive(Deserialize)]
        struct Raw<'a> {
            #[serde(borrow)]
            item_grosses: Vec<&'a serde_json::value::RawValue>,
        }
        serde_json::from_slice::<Raw>(&self.0)
            .ok()
            .and_then(|p| p.item_grosses.get(i).map(|r| r.get().to_string()))
            .unwrap_or_default()
    }
}

/// A JSON value read leniently: what [`Line`]'s fields accept.
enum Scalar {
    Text(String),
    Int(i64),
    /// A number that is not an i64 (kept as text).
    Number(String),
    Bool(bool),
    Other,
}

impl Scalar {
    fn text(self) -> Option<String> {
        match self {
            Scalar::Text(s) | Scalar::Number(s) => Some(s),
            Scalar::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    fn int(self) -> Option<i64> {
        match self {
            Scalar::Int(i) => Some(i),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Text(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(match i64::try_from(v) {
                    Ok(i) => Scalar::Int(i),
                    Err(_) => Scalar::Number(v.to_string()),
                })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(serde_json::Number::from_f64(v)
                    .map_or(Scalar::Other, |n| Scalar::Number(n.to_string())))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_none<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Line {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Key {
            RefNumber,
            TransactionDatestamp,
            EventStart,
            Status,
            Source,
            BookingType,
            Quantity,
            Price,
            BuyerFirstName,
            BuyerLastName,
            BuyerEmail,
            BuyerPhone,
            BuyerEmailOptIn,
            #[serde(other)]
            Other,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Line;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a booking line")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Line, A::Error> {
                let mut l = Line::default();
                // A repeated key: the last one wins, as in a `Value`.
                while let Some(k) = a.next_key::<Key>()? {
                    if let Key::Other = k {
                        a.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let v: Scalar = a.next_value()?;
                    match k {
                        Key::RefNumber => l.ref_number = v.text(),
                        Key::TransactionDatestamp => l.transaction_datestamp = v.text(),
                        Key::EventStart => l.event_start = v.text(),
                        Key::Status => l.status = v.text(),
                        Key::Source => l.source = v.text(),
                        Key::BookingType => l.booking_type = v.text(),
                        Key::Quantity => l.quantity = v.int(),
                        Key::Price => l.price = v.int(),
                        Key::BuyerFirstName => l.buyer_first_name = v.text(),
                        Key::BuyerLastName => l.buyer_last_name = v.text(),
                        Key::BuyerEmail => l.buyer_email = v.text(),
                        Key::BuyerPhone => l.buyer_phone = v.text(),
                        Key::BuyerEmailOptIn => {
                            l.buyer_email_opt_in = matches!(v, Scalar::Bool(true))
                        }
                        Key::Other => {}
                    }
                }
                Ok(l)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Line, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Line::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Line, E> {
                Ok(Line::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Line, E> {
                Ok(Line::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Line, E> {
                Ok(Line::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Line, E> {
                Ok(Line::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Line, E> {
                Ok(Line::default())
            }
            fn visit_unit<E>(self) -> Result<Line, E> {
                Ok(Line::default())
            }
        }
        d.deserialize_any(V)
    }
}

impl Event {
    /// The event as Ticket Co's JSON (what usher reads of it), for a record to keep: an
    /// owed booking keeps its event so that a later run can read its lines again (Ticket Co
    /// has no booking-by-id call).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "id": self.id,
            "title": self.title,
            "start_at": self.start_at,
            "location_name": self.location_name,
            "tags": self.tags,
        })
        .to_string()
    }

    /// An event kept by [`Event::to_json`] (or any Ticket Co event JSON).
    pub fn from_json(text: &str) -> Option<Event> {
        parse_event(&serde_json::from_str(text).ok()?)
    }
}

fn parse_event(v: &Value) -> Option<Event> {
    let tags = match v.get("tags") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|t| match t {
                Value::String(s) => Some(s.clone()),
                Value::Object(_) => t.get("name").and_then(Value::as_str).map(str::to_string),
                _ => None,
            })
            .collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        _ => Vec::new(),
    };
    Some(Event {
        id: text(v, "id")?,
        title: text(v, "title"),
        start_at: text(v, "start_at"),
        location_name: text(v, "location_name"),
        tags,
    })
}

/// `validate --online`: one call to the first page of events.
pub async fn check(http: &Http, conn: &Connection, cancel: &CancellationToken) -> super::Verdict {
    let tc = TicketCo::new(http, conn);
    match tc.events(1, None, None, cancel).await {
        Ok(events) => super::Verdict::Valid(format!(
            "GET /events answered with {} event(s) on page 1",
            events.len()
        )),
        Err(SourceError::Http(HttpError::CredentialsRefused { what, .. })) => {
            super::Verdict::WrongCredentials(format!("HTTP 401 from {what}"))
        }
        Err(e) => super::Verdict::Unreachable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_keep_opaque_ids_and_read_tags_in_either_shape() {
        let e = parse_event(&json!({"id": 904783, "location_name": "Oslo Golf",
            "tags": ["Golf", {"name": "Kids"}, 3]}))
        .unwrap();
        assert_eq!(e.id, "904783");
        assert_eq!(e.tags, vec!["Golf", "Kids"]);
        assert!(parse_event(&json!({"title": "no id"})).is_none());
    }
}
