//! The fake CM.com CDP: `POST /events/v1.0/tenants/{tenantGuid}/events` with
//! `X-CM-PRODUCTTOKEN`. No token → 401; a token not for this tenant (or an unknown tenant)
//! → 403; a body that is not an array of at most 100 `{EventTypeId, Event}` with a known
//! event type → 400; else 202 and the batch is recorded. A test can force the next answers
//! (e.g. 403 for a revoked token).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;

use super::faults::{self, Faults};

/// One POST the fake got.
#[derive(Debug, Clone)]
pub struct CdpCall {
    pub tenant: String,
    pub token: Option<String>,
    pub status: u16,
    pub events: usize,
}

#[derive(Default)]
struct Inner {
    /// tenant → the product tokens valid for it.
    tenants: HashMap<String, HashSet<String>>,
    /// Event types that exist; empty = any GUID.
    event_types: HashSet<String>,
    /// Accepted batches, in order.
    batches: Vec<Vec<Value>>,
    calls: Vec<CdpCall>,
    /// Statuses forced on the next POSTs.
    forced: VecDeque<u16>,
    /// A status forced on every POST until cleared (a revoked token).
    always: Option<u16>,
}

#[derive(Clone, Default)]
pub struct CdpFake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

impl CdpFake {
    pub fn new() -> Self {
        Self::default()
    }

    /// `token` is valid for `tenant`.
    pub fn add_tenant(&self, tenant: &str, token: &str) {
        self.inner
            .lock()
            .unwrap()
            .tenants
            .entry(tenant.to_string())
            .or_default()
            .insert(token.to_string());
    }

    pub fn add_event_type(&self, id: &str) {
        self.inner
            .lock()
            .unwrap()
            .event_types
            .insert(id.to_string());
    }

    /// The next `k` POSTs answer `status`.
    pub fn force_next(&self, k: usize, status: u16) {
        let mut i = self.inner.lock().unwrap();
        for _ in 0..k {
            i.forced.push_back(status);
        }
    }

    /// Every POST answers `status` until `force_always(None)`.
    pub fn force_always(&self, status: Option<u16>) {
        self.inner.lock().unwrap().always = status;
    }

    pub fn batches(&self) -> Vec<Vec<Value>> {
        self.inner.lock().unwrap().batches.clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.batches().into_iter().flatten().collect()
    }

    pub fn calls(&self) -> Vec<CdpCall> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/events/v1.0/tenants/{tenant}/events", post(events))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "cdp.events"),
                faults::layer,
            ))
            .with_state(self.clone())
    }
}

fn valid_batch(body: &[u8], types: &HashSet<String>) -> Option<Vec<Value>> {
    let items: Vec<Value> = serde_json::from_slice(body).ok()?;
    if items.len() > 100 {
        return None;
    }
    for it in &items {
        let t = it.get("EventTypeId")?.as_str()?;
        if !usher::config::is_guid(t) || (!types.is_empty() && !types.contains(t)) {
            return None;
        }
        it.get("Event")?.as_object()?;
    }
    Some(items)
}

async fn events(
    State(cdp): State<CdpFake>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let token = headers
        .get("x-cm-producttoken")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut i = cdp.inner.lock().unwrap();
    let status = if let Some(s) = i.forced.pop_front().or(i.always) {
        s
    } else {
        match &token {
            None => 401,
            Some(t) if !i.tenants.get(&tenant).is_some_and(|ts| ts.contains(t)) => 403,
            Some(_) => match valid_batch(&body, &i.event_types) {
                None => 400,
                Some(items) => {
                    if !items.is_empty() {
                        i.batches.push(items);
                    }
                    202
                }
            },
        }
    };
    let events = serde_json::from_slice::<Vec<Value>>(&body)
        .map(|v| v.len())
        .unwrap_or(0);
    i.calls.push(CdpCall {
        tenant,
        token,
        status,
        events,
    });
    let text = match status {
        401 => "missing product token",
        403 => "product token not valid for this tenant",
        400 => "invalid events",
        _ => "",
    };
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        text.to_string(),
    )
}
