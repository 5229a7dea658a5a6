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

use reqwest::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Connection;
use crate::engine::SourceError;
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

    /// One page of an event's booking lines (pages run 1, 2, 3… until an empty array).
    pub async fn item_grosses(
        &self,
        event_id: &str,
        page: u32,
        cancel: &CancellationToken,
    ) -> Result<Vec<Value>, SourceError> {
        let mut url = self.endpoint.url("item_grosses");
        url.query_pairs_mut()
            .append_pair("event_id", event_id)
            .append_pair("page", &page.to_string());
        let body = self.get(url, cancel).await?;
        let what = describe(&Method::GET, &self.endpoint.url("item_grosses"));
        let mut body = body;
        match body.get_mut("item_grosses").map(Value::take) {
            Some(Value::Array(a)) => Ok(a),
            _ => Err(self.malformed(&what, "no `item_grosses` array".into())),
        }
    }

    async fn get(&self, url: url::Url, cancel: &CancellationToken) -> Result<Value, SourceError> {
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
        serde_json::from_slice(&reply.body).map_err(|e| {
            self.malformed(
                &what,
                format!(
                    "not JSON ({e}); the answer starts with: {}",
                    reply.snippet()
                ),
            )
        })
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
