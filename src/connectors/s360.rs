//! The S-360 public API client (vendor-apis "S-360"): REST-RPC `POST {base}/<service>/<method>`
//! with JSON bodies. Auth (a fresh HS256 JWT per call), the per-instance rate budget, 509/429
//! waits and retries are `http`'s; this module knows paths and JSON only.
//!
//! Decisions where the vendor document is silent:
//! - An answer is SUCCESS only when `statusCode` is `"SUCCESS"`; any other value (or none) is
//!   [`S360Error::Status`] carrying S-360's `statusDetail`, which the engine dead-letters.
//!   `getOrderByExternalReference` answering `NOT_FOUND` is an answer, not an error.
//! - `saveIndividualContactData` with a contact number (an update) is idempotent and retried
//!   on 5xx/timeouts; a create (`contactNumber: null`) is sent once: after an unknown outcome
//!   the engine waits until it can no longer land, then matches by e-mail, so a created
//!   contact is found, not made twice.
//! - `createOrUpdateOrder` is sent once; the engine asks `getOrderByExternalReference`
//!   before any retry.
//! - `searchContact` returns `contacts[]`, each with its `contactNumber`.
//! - `validate --online` calls `searchContact` for an address that cannot exist
//!   (`usher-validate@invalid.invalid`): it proves the JWT and reachability, changes nothing.

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::http::{Endpoint, HttpError, Retry, describe};

pub const CONTACT_SERVICE: &str = "tnco/backend-apis/contactInformationPublicService/v2_21";
pub const ORDER_SERVICE: &str = "tnseb/backend-apis/externalOrderFacade/v1_33";

#[derive(Debug, thiserror::Error)]
pub enum S360Error {
    #[error(transparent)]
    Http(#[from] HttpError),
    /// HTTP 200 with a `statusCode` other than SUCCESS: S-360 refused this record.
    #[error("connection \"{conn}\": {what}: S-360 answered {code}: {detail}")]
    Status {
        conn: String,
        what: String,
        code: String,
        detail: String,
    },
    /// A 2xx answer that is not JSON (cut off, an HTML page from a proxy): S-360 may have
    /// carried the request out, so this is not a refusal of the record.
    #[error("connection \"{conn}\": {what}: broken answer: {reason}")]
    BrokenAnswer {
        conn: String,
        what: String,
        reason: String,
    },
    #[error("connection \"{conn}\": {what}: malformed answer: {reason}")]
    Malformed {
        conn: String,
        what: String,
        reason: String,
    },
}

impl S360Error {
    /// The request may have been carried out (timeout, reset, 5xx).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            S360Error::Http(e) => e.outcome_unknown(),
            S360Error::BrokenAnswer { .. } => true,
            _ => false,
        }
    }
}

pub struct S360Client {
    pub endpoint: Endpoint,
}

impl S360Client {
    /// POSTs `body` to `service/method`; returns `(statusCode, answer)` for a 2xx JSON answer.
    async fn call(
        &self,
        service: &str,
        method: &str,
        body: &Value,
        retry: Retry,
        cancel: &CancellationToken,
    ) -> Result<(String, Value), S360Error> {
        let url = self.endpoint.url(&format!("{service}/{method}"));
        let what = describe(&Method::POST, &url);
        let bytes = bytes::Bytes::from(serde_json::to_vec(body).expect("JSON serializes"));
        let reply = self
            .endpoint
            .send_ok(Method::POST, url, retry, cancel, |rb| {
                rb.header(CONTENT_TYPE, "application/json")
                    .body(bytes.clone())
            })
            .await?;
        let v: Value =
            serde_json::from_slice(&reply.body).map_err(|e| S360Error::BrokenAnswer {
                conn: self.endpoint.name.clone(),
                what: what.clone(),
                reason: format!("not JSON ({e}): {}", reply.snippet()),
            })?;
        let code = v
            .get("statusCode")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Ok((code, v))
    }

    fn status_error(&self, service: &str, method: &str, code: String, v: &Value) -> S360Error {
        let url = self.endpoint.url(&format!("{service}/{method}"));
        S360Error::Status {
            conn: self.endpoint.name.clone(),
            what: describe(&Method::POST, &url),
            code: if code.is_empty() {
                "no statusCode".into()
            } else {
                code
            },
            detail: match v.get("statusDetail") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "no statusDetail".into(),
            },
        }
    }

    async fn success(
        &self,
        service: &str,
        method: &str,
        body: &Value,
        retry: Retry,
        cancel: &CancellationToken,
    ) -> Result<Value, S360Error> {
        let (code, v) = self.call(service, method, body, retry, cancel).await?;
        if code == "SUCCESS" {
            Ok(v)
        } else {
            Err(self.status_error(service, method, code, &v))
        }
    }

    /// Contact numbers of every contact with this e-mail (exact, case-insensitive).
    pub async fn search_contact(
        &self,
        email: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, S360Error> {
        let v = self
            .success(
                CONTACT_SERVICE,
                "searchContact",
                &json!({ "email": email }),
                Retry::Idempotent,
                cancel,
            )
            .await?;
        Ok(v.get("contacts")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| id_text(c.get("contactNumber")))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Creates (`contactNumber` null) or updates a contact; returns its contact number.
    pub async fn save_contact(
        &self,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<String, S360Error> {
        let update = id_text(body.get("contactNumber")).is_some();
        let retry = if update {
            Retry::IdempotentWrite
        } else {
            Retry::CreateOnce
        };
        let v = self
            .success(
                CONTACT_SERVICE,
                "saveIndividualContactData",
                body,
                retry,
                cancel,
            )
            .await?;
        id_text(v.get("contactNumber"))
            .or_else(|| id_text(body.get("contactNumber")))
            .ok_or_else(|| S360Error::Malformed {
                conn: self.endpoint.name.clone(),
                what: "POST saveIndividualContactData".into(),
                reason: "SUCCESS without a contactNumber".into(),
            })
    }

    /// Sends one order, once; returns its order ID.
    pub async fn create_order(
        &self,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<String, S360Error> {
        let v = self
            .success(
                ORDER_SERVICE,
                "createOrUpdateOrder",
                body,
                Retry::CreateOnce,
                cancel,
            )
            .await?;
        id_text(v.get("orderUpdateData").and_then(|o| o.get("orderId"))).ok_or_else(|| {
            S360Error::Malformed {
                conn: self.endpoint.name.clone(),
                what: "POST createOrUpdateOrder".into(),
                reason: "SUCCESS without orderUpdateData.orderId".into(),
            }
        })
    }

    /// The order made for an external reference, if any.
    pub async fn order_by_reference(
        &self,
        reference: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, S360Error> {
        let body = json!({ "externalReference": reference });
        let (code, v) = self
            .call(
                ORDER_SERVICE,
                "getOrderByExternalReference",
                &body,
                Retry::Idempotent,
                cancel,
            )
            .await?;
        match code.as_str() {
            "SUCCESS" => Ok(id_text(v.get("orderId"))),
            "NOT_FOUND" => Ok(None),
            _ => Err(self.status_error(ORDER_SERVICE, "getOrderByExternalReference", code, &v)),
        }
    }

    /// `validate --online`: a search that cannot match proves the JWT and reachability.
    pub async fn check(&self, cancel: &CancellationToken) -> Result<(), S360Error> {
        self.search_contact("usher-validate@invalid.invalid", cancel)
            .await
            .map(|_| ())
    }
}

/// An ID as text (IDs are opaque: numbers and strings both work).
pub fn id_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
