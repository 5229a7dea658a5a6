//! SeatGeek's partner feed of user change events (vendor-apis "SeatGeek"): URLs and JSON.
//!
//! - Auth: OAuth2 client credentials at `POST {base}/oauth/token` (form fields), through
//!   `http` (token cached until 60 s before expiry, one refresh on a 401).
//! - `GET {base}/v1/change-events?entity=user&limit=N[&cursor=C]`; the cursor is opaque and
//!   sent back as received. No cursor is sent for the start of history.
//! - A 400 whose `error` is `invalid_cursor` is [`SourceError::InvalidCursor`]; any other
//!   non-2xx answer is an HTTP error (5xx and timeouts are retried by `http`, the page is
//!   read again). A body that is not the documented JSON is [`SourceError::Malformed`].
//!
//! Decisions where the contract is silent: an event without an `event_id` keeps its place
//! (the event ID is informative only); an event of another `entity` is skipped; an unknown
//! `action` is treated as `updated` when the event carries a user, since the newest state of
//! the user is what the event says. A numeric `next_cursor` is kept as its text.

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::config::Connection;
use crate::http::{Endpoint, Http, HttpError, Retry, describe};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    Deleted,
}

/// One change event, as SeatGeek sent it.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub event_id: Option<String>,
    pub action: Action,
    pub occurred_at: Option<String>,
    /// `user.id`; None when the event has no usable user ID (it goes to dead letters).
    pub user_id: Option<String>,
    pub user: Value,
}

impl ChangeEvent {
    /// The event as JSON text, for dead letters and the dry run.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "event_id": self.event_id,
            "action": match self.action { Action::Created => "created", Action::Updated => "updated", Action::Deleted => "deleted" },
            "occurred_at": self.occurred_at,
            "user": self.user,
        })
        .to_string()
    }
}

#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<ChangeEvent>,
    /// Events of another entity, skipped.
    pub skipped: u64,
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

#[derive(Deserialize)]
struct RawPage {
    data: Option<Vec<RawEvent>>,
    next_cursor: Option<Value>,
    has_more: Option<bool>,
}

#[derive(Deserialize)]
struct RawEvent {
    event_id: Option<Value>,
    entity: Option<String>,
    action: Option<String>,
    occurred_at: Option<String>,
    user: Option<Value>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads one page of change events. Pure, so the shapes are easy to test.
pub fn parse_page(body: &[u8]) -> Result<EventPage, String> {
    let raw: RawPage =
        serde_json::from_slice(body).map_err(|e| format!("not the change-event JSON ({e})"))?;
    let data = raw.data.ok_or("no `data` array")?;
    let mut page = EventPage {
        next_cursor: match raw.next_cursor {
            None | Some(Value::Null) => None,
            Some(v) => Some(text(&v).ok_or("`next_cursor` is not text")?),
        },
        has_more: raw.has_more.unwrap_or(false),
        ..Default::default()
    };
    for e in data {
        if e.entity.as_deref().is_some_and(|x| x != "user") {
            page.skipped += 1;
            continue;
        }
        let user = e.user.unwrap_or(Value::Null);
        let user_id = user.get("id").and_then(text).filter(|s| !s.is_empty());
        let action = match e.action.as_deref() {
            Some("deleted") => Action::Deleted,
            Some("created") => Action::Created,
            _ => Action::Updated,
        };
        page.events.push(ChangeEvent {
            event_id: e.event_id.as_ref().and_then(text),
            action,
            occurred_at: e.occurred_at,
            user_id,
            user,
        });
    }
    Ok(page)
}

/// The client of one `seatgeek` connection.
pub struct SeatGeekSource {
    endpoint: Endpoint,
    stream: String,
}

impl SeatGeekSource {
    pub fn new(http: &Http, conn: &Connection, stream: &str) -> Self {
        SeatGeekSource {
            endpoint: http.endpoint(conn),
            stream: stream.to_string(),
        }
    }

    /// One page of user change events after `cursor` (None: from the start of history).
    pub async fn pull(
        &self,
        cursor: Option<&str>,
        limit: u32,
        cancel: &CancellationToken,
    ) -> Result<EventPage, SourceError> {
        self.fetch(cursor, limit, cancel).await?.parse()
    }

    /// Reads one page without parsing it: the engine fetches the next page while it writes
    /// the current one, and parses it after the current one is committed and dropped, so
    /// that at most one page of parsed events is in memory.
    pub async fn fetch(
        &self,
        cursor: Option<&str>,
        limit: u32,
        cancel: &CancellationToken,
    ) -> Result<PageBody, SourceError> {
        let mut url = self.endpoint.url("v1/change-events");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("entity", "user");
            q.append_pair("limit", &limit.clamp(1, 1000).to_string());
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
        }
        let what = describe(&Method::GET, &url);
        let reply = self
            .endpoint
            .send(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
            .await?;
        if reply.status == 400
            && serde_json::from_slice::<Value>(&reply.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str().map(str::to_string)))
                .as_deref()
                == Some("invalid_cursor")
        {
            return Err(SourceError::InvalidCursor {
                conn: self.endpoint.name.clone(),
                stream: self.stream.clone(),
            });
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
        Ok(PageBody {
            conn: self.endpoint.name.clone(),
            what,
            body: reply.body,
        })
    }
}

/// A page of change events as SeatGeek sent it (a 2xx answer), not parsed yet.
pub struct PageBody {
    conn: String,
    what: String,
    body: bytes::Bytes,
}

impl PageBody {
    pub fn parse(self) -> Result<EventPage, SourceError> {
        parse_page(&self.body).map_err(|reason| SourceError::Malformed {
            conn: self.conn,
            what: self.what,
            reason: format!(
                "{reason}; the answer starts with: {}",
                crate::http::snippet(&self.body)
            ),
        })
    }
}

/// `validate --online`: a token and one event read (nothing is changed at SeatGeek).
pub async fn check(http: &Http, conn: &Connection, cancel: &CancellationToken) -> super::Verdict {
    use super::Verdict;
    let src = SeatGeekSource::new(http, conn, "validate");
    match src.pull(None, 1, cancel).await {
        Ok(_) => Verdict::Valid("token issued, change events readable".into()),
        Err(SourceError::Http(HttpError::CredentialsRefused { what, .. })) => {
            Verdict::WrongCredentials(format!("refused at {what}"))
        }
        Err(e) => Verdict::Unreachable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events_and_keeps_the_cursor_opaque() {
        let p = parse_page(br#"{"data":[{"event_id":"ce_1","entity":"user","action":"deleted","occurred_at":"2026-05-01T10:00:00Z","user":{"id":"SG-1","updated_at":"x"}},
            {"event_id":"ce_2","entity":"venue","action":"updated","user":null},
            {"event_id":"ce_3","entity":"user","action":"updated","user":{"id":7,"email":null}}],"next_cursor":12,"has_more":true}"#).unwrap();
        assert_eq!(p.events.len(), 2);
        assert_eq!(p.skipped, 1);
        assert_eq!(p.events[0].action, Action::Deleted);
        assert_eq!(p.events[1].user_id.as_deref(), Some("7"));
        assert_eq!(p.next_cursor.as_deref(), Some("12"));
        assert!(p.has_more);
    }

    #[test]
    fn a_page_without_data_is_malformed() {
        assert!(
            parse_page(b"{\"error\":\"x\"}")
                .unwrap_err()
                .contains("no `data`")
        );
        assert!(parse_page(b"<html>").is_err());
    }
}
