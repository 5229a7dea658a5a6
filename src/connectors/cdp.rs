//! CM.com Customer Data Platform (target): contacts go in as CDP events.
//!
//! `POST {base}/events/v1.0/tenants/{tenantGuid}/events` with `X-CM-PRODUCTTOKEN` (the
//! connection's `auth`, set from `product_token_file`) and a JSON array of
//! `{"EventTypeId": "<guid>", "Event": {"<field label>": value}}`. 200 or 202 = accepted.
//!
//! Decisions where vendor-apis is silent:
//! - 400, 401 and 403 are configuration errors (unknown event type, missing token, token not
//!   for this tenant): the engine pauses the stream instead of sending again at each tick.
//!   Any other refusal (5xx, a transport error) is an ordinary refusal: the payload stays
//!   first in the outbox and goes again at the next execution.
//! - Each POST is sent once per execution (`Retry::Once`, like the webhook target), since the
//!   CDP documents no idempotency key; 429/509 are waited for by `http`. A redelivery after
//!   a crash between "accepted" and "recorded" sends the same events again (at-least-once);
//!   CDP events are facts about a contact, so a repeat is harmless.
//! - `validate --online` POSTs an empty array: 200/202 = valid, 401/403 = refused.

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{CdpAccount, Connection};
use crate::http::{Endpoint, Http, HttpError, Retry};

/// What the CDP accepts as "done".
const ACCEPTED: [u16; 2] = [200, 202];
/// Statuses that no resend can fix: the configuration must change.
const CONFIG_ERRORS: [u16; 3] = [400, 401, 403];

pub struct CdpTarget {
    pub endpoint: Endpoint,
    pub url: url::Url,
}

/// What became of one POST of events.
#[derive(Debug)]
pub enum CdpDelivery {
    Accepted,
    /// 400/401/403: the stream pauses until the configuration is fixed.
    ConfigError {
        status: u16,
        reason: String,
    },
    /// Anything else: sent again, first, at the next execution.
    Refused {
        status: Option<u16>,
        reason: String,
    },
}

impl CdpTarget {
    pub fn new(http: &Http, conn: &Connection, account: &CdpAccount) -> Self {
        let endpoint = http.endpoint(conn);
        let url = endpoint.url(&format!(
            "/events/v1.0/tenants/{}/events",
            account.tenant_guid
        ));
        CdpTarget { endpoint, url }
    }

    /// The request body for some mapped contacts: one event of `event_type_id` each.
    pub fn events(event_type_id: &str, mapped: &[Value]) -> Vec<u8> {
        let events: Vec<Value> = mapped
            .iter()
            .map(|m| json!({"EventTypeId": event_type_id, "Event": m}))
            .collect();
        serde_json::to_vec(&events).expect("JSON values serialize")
    }

    pub async fn send(
        &self,
        body: &[u8],
        cancel: &CancellationToken,
    ) -> Result<CdpDelivery, HttpError> {
        let body = bytes::Bytes::copy_from_slice(body);
        let result = self
            .endpoint
            .send(
                Method::POST,
                self.url.clone(),
                Retry::CreateOnce,
                cancel,
                |rb| {
                    rb.header(CONTENT_TYPE, "application/json")
                        .body(body.clone())
                },
            )
            .await;
        match result {
            Ok(r) if ACCEPTED.contains(&r.status) => Ok(CdpDelivery::Accepted),
            Ok(r) if CONFIG_ERRORS.contains(&r.status) => Ok(CdpDelivery::ConfigError {
                status: r.status,
                reason: format!(
                    "connection \"{}\": POST {}: HTTP {}: {}",
                    self.endpoint.name,
                    self.url.path(),
                    r.status,
                    explain(r.status)
                ),
            }),
            Ok(r) => Ok(CdpDelivery::Refused {
                status: Some(r.status),
                reason: format!("HTTP {}: {}", r.status, r.snippet()),
            }),
            Err(e @ HttpError::Cancelled { .. }) => Err(e),
            Err(e) => Ok(CdpDelivery::Refused {
                status: None,
                reason: e.to_string(),
            }),
        }
    }

    /// `validate --online`: an empty array changes nothing and proves token and tenant.
    pub async fn check(&self, cancel: &CancellationToken) -> Result<CdpDelivery, HttpError> {
        self.send(b"[]", cancel).await
    }
}

/// What a configuration error means, in the words of the CDP block.
pub fn explain(status: u16) -> &'static str {
    match status {
        401 => "the product token is missing or refused (check product_token_file)",
        403 => {
            "the product token is not valid for this tenant (check product_token_file and tenant_guid)"
        }
        400 => {
            "the CDP refused the events (check the stream's cdp.event_type_id and that the mapping's keys are field labels of that event type)"
        }
        _ => "refused",
    }
}
