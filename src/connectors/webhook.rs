//! The generic webhook target (vendor-apis "ExtCRM"): POST a JSON array to a URL; the
//! statuses the stream lists (default 200) mean accepted, anything else means the same
//! payload, byte for byte, goes again first at the next execution. It is sent once per
//! execution (`Retry::CreateOnce`); only 429/509 are waited for and repeated, since they mean
//! "not processed". Each POST carries `Idempotency-Key: usher-<stream>-<outbox id>-<nonce>`
//! (the nonce is the payload's own, random, kept in the outbox), the same on every resend,
//! so a receiver can drop a redelivery after a crash, and never the same for two payloads,
//! also after the state was started afresh or restored from a backup.

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use tokio_util::sync::CancellationToken;

use crate::http::{Endpoint, HttpError, Retry};

pub struct WebhookTarget {
    pub endpoint: Endpoint,
    pub url: url::Url,
    pub accepted: Vec<u16>,
}

/// What became of one payload.
#[derive(Debug)]
pub enum Delivery {
    Accepted,
    Refused { status: Option<u16>, reason: String },
}

impl WebhookTarget {
    pub async fn deliver(
        &self,
        key: &str,
        body: &[u8],
        cancel: &CancellationToken,
    ) -> Result<Delivery, HttpError> {
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
                        .header("Idempotency-Key", key)
                        .body(body.clone())
                },
            )
            .await;
        match result {
            Ok(reply) if self.accepted.contains(&reply.status) => Ok(Delivery::Accepted),
            Ok(reply) => Ok(Delivery::Refused {
                status: Some(reply.status),
                reason: format!("HTTP {}: {}", reply.status, reply.snippet()),
            }),
            Err(e @ HttpError::Cancelled { .. }) => Err(e),
            Err(e @ HttpError::CredentialsRefused { .. }) => Ok(Delivery::Refused {
                status: Some(401),
                reason: e.to_string(),
            }),
            Err(e) => Ok(Delivery::Refused {
                status: None,
                reason: e.to_string(),
            }),
        }
    }
}
