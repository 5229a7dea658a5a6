//! Airship (vendor-apis "Airship"): units, contacts with bookings and groups, booking
//! updates. URLs and JSON only; bearer auth (the personal access token) is `http`'s.
//!
//! Decisions where the vendor doc is silent:
//! - `POST /contact` and `POST /booking/update` are upserts keyed by e-mail/mobile and
//!   `booking_reference`, so they are sent with `Retry::Idempotent` (a 5xx or a reset is
//!   repeated; repeating creates nothing twice).
//! - A 4xx other than 401/429 on one write is that booking's problem
//!   ([`WriteError::Refused`]): the engine goes on with the next booking. A 401, a 5xx after
//!   retries or a transport error is the connection's problem ([`WriteError::Http`]).
//! - The answer's `id` may be a number or a string; it is kept as text.
//! - Units are matched to Ticket Co venue names trimmed and case-insensitively.

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Connection;
use crate::http::{Endpoint, Http, HttpError, Retry, describe};

#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The booking was refused (422 validation, 404 unknown reference, …): retried next run.
    #[error("connection \"{conn}\": {what}: HTTP {status}: {reason}")]
    Refused {
        conn: String,
        what: String,
        status: u16,
        reason: String,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
}

pub struct Airship {
    pub endpoint: Endpoint,
    pub account_id: i64,
}

impl Airship {
    pub fn new(http: &Http, conn: &Connection) -> Self {
        Airship {
            endpoint: http.endpoint(conn),
            account_id: conn.account_id.unwrap_or_default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.endpoint.name
    }

    /// Every unit of the account (`/account/units`, all pages).
    pub async fn units(&self, cancel: &CancellationToken) -> Result<Vec<Unit>, HttpError> {
        let mut out = Vec::new();
        let mut page = 1u32;
        loop {
            let mut url = self.endpoint.url("account/units");
            url.query_pairs_mut().append_pair("page", &page.to_string());
            let what = describe(&Method::GET, &url);
            let reply = self
                .endpoint
                .send(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
                .await?;
            if reply.status == 401 {
                return Err(HttpError::CredentialsRefused {
                    conn: self.endpoint.name.clone(),
                    what,
                });
            }
            let bad = |snippet: String| HttpError::Status {
                conn: self.endpoint.name.clone(),
                what: what.clone(),
                status: reply.status,
                snippet,
                attempts: reply.attempts,
            };
            if !reply.is_success() {
                return Err(bad(reply.snippet()));
            }
            let body: Value = serde_json::from_slice(&reply.body)
                .map_err(|_| bad(format!("not JSON: {}", reply.snippet())))?;
            let Some(data) = body.get("data").and_then(Value::as_array) else {
                return Err(bad("no `data` array".into()));
            };
            out.extend(data.iter().filter_map(|u| {
                let id = match u.get("id")? {
                    Value::Number(n) => n.as_i64()?,
                    Value::String(s) => s.parse().ok()?,
                    _ => return None,
                };
                Some(Unit {
                    id,
                    name: u.get("name")?.as_str()?.to_string(),
                })
            }));
            let last = body.get("last_page").and_then(Value::as_u64).unwrap_or(1);
            if data.is_empty() || page as u64 >= last || page >= 10_000 {
                return Ok(out);
            }
            page += 1;
        }
    }

    /// `POST /contact`: the contact with its units, groups and (new) bookings → contact ID.
    pub async fn write_contact<T: serde::Serialize + ?Sized>(
        &self,
        body: &T,
        cancel: &CancellationToken,
    ) -> Result<String, WriteError> {
        self.post("contact", body, cancel).await
    }

    /// `POST /booking/update`: a known booking's fields, never its contact → booking ID.
    pub async fn update_booking<T: serde::Serialize + ?Sized>(
        &self,
        body: &T,
        cancel: &CancellationToken,
    ) -> Result<String, WriteError> {
        self.post("booking/update", body, cancel).await
    }

    async fn post<T: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
        cancel: &CancellationToken,
    ) -> Result<String, WriteError> {
        let url = self.endpoint.url(path);
        let what = describe(&Method::POST, &url);
        let bytes = bytes::Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
        let reply = self
            .endpoint
            .send(Method::POST, url, Retry::IdempotentWrite, cancel, |rb| {
                rb.header(CONTENT_TYPE, "application/json")
                    .body(bytes.clone())
            })
            .await?;
        match reply.status {
            200..=299 => {
                let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                Ok(match v.get("id") {
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::String(s)) => s.clone(),
                    _ => String::new(),
                })
            }
            401 => Err(HttpError::CredentialsRefused {
                conn: self.endpoint.name.clone(),
                what,
            }
            .into()),
            s @ 400..=499 => Err(WriteError::Refused {
                conn: self.endpoint.name.clone(),
                what,
                status: s,
                reason: errors_text(&reply.body),
            }),
            s => Err(HttpError::Status {
                conn: self.endpoint.name.clone(),
                what,
                status: s,
                snippet: reply.snippet(),
                attempts: reply.attempts,
            }
            .into()),
        }
    }
}

/// Airship's `{"errors": [...]}` as one line.
fn errors_text(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("errors") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("; "),
            _ => crate::http::snippet(body),
        },
        Err(_) => crate::http::snippet(body),
    }
}

/// `validate --online`: list the units (the token must be accepted).
pub async fn check(http: &Http, conn: &Connection, cancel: &CancellationToken) -> super::Verdict {
    match Airship::new(http, conn).units(cancel).await {
        Ok(u) => super::Verdict::Valid(format!("{} unit(s) in the account", u.len())),
        Err(HttpError::CredentialsRefused { what, .. }) => {
            super::Verdict::WrongCredentials(format!("HTTP 401 from {what}"))
        }
        Err(e) => super::Verdict::Unreachable(e.to_string()),
    }
}

/// The unit of a Ticket Co venue: an explicit ID, else the unit of that name.
pub fn unit_for(venue: &str, explicit: Option<i64>, units: &[Unit]) -> Option<i64> {
    explicit.or_else(|| {
        let v = venue.trim().to_lowercase();
        units
            .iter()
            .find(|u| u.name.trim().to_lowercase() == v)
            .map(|u| u.id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn venues_match_units_by_name_or_explicit_id() {
        let units = vec![
            Unit {
                id: 7,
                name: "Oslo Golf ".into(),
            },
            Unit {
                id: 9,
                name: "Bergen Bowling".into(),
            },
        ];
        assert_eq!(unit_for("oslo golf", None, &units), Some(7));
        assert_eq!(unit_for("Nowhere", None, &units), None);
        assert_eq!(unit_for("Nowhere", Some(42), &units), Some(42));
    }

    #[test]
    fn errors_array_becomes_one_line() {
        assert_eq!(
            errors_text(br#"{"errors":["email invalid","x"]}"#),
            "email invalid; x"
        );
    }
}
