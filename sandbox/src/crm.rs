//! The fake CRM (vendor-apis "ExtCRM"): a cursor-paginated change feed of contacts that a
//! test can grow, and a webhook receiver that records every payload byte for byte, can
//! refuse the next K, and drops a redelivery whose `Idempotency-Key` it already accepted.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::faults::{self, Faults};

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub body: Bytes,
    pub idempotency_key: Option<String>,
    pub status: u16,
    /// True when this key had been accepted before (a redelivery, not stored again).
    pub duplicate: bool,
}

#[derive(Default)]
struct Inner {
    contacts: Vec<Value>,
    received: Vec<Received>,
    accepted_keys: HashSet<String>,
    /// Statuses for the next refused POSTs, taken one per POST.
    refuse: std::collections::VecDeque<u16>,
    /// When set, every request must carry this header with this value.
    auth: Option<(String, String)>,
    /// Fault mode: every answer is the first page, whatever the cursor.
    repeat_first_page: bool,
    /// Fault mode: past the end, `has_more` stays true on empty pages.
    endless_has_more: bool,
    // S-360 streams: offer requests (a second feed) and OAuth2 client credentials.
    offers: Vec<Value>,
    /// When set, `/oauth/token` issues tokens to this client and requests need one.
    oauth: Option<(String, String)>,
    issued: HashSet<String>,
    tokens_issued: u64,
}

#[derive(Clone, Default)]
pub struct CrmFake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

/// A generated contact with sequence number `seq` (1-based).
pub fn contact(seq: u64) -> Value {
    let day = seq / 1000;
    let secs = seq % 86_400;
    json!({
        "id": format!("CRM-{seq}"),
        "seq": seq,
        "s360_contact_number": null,
        "first_name": format!("First{seq}"),
        "last_name": format!("Last{seq}"),
        "email": format!("  Person{seq}@Example.org "),
        "phone": format!("+47 {:08}", seq),
        "updated_at": format!("2026-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            1 + (day / 28) % 12, 1 + day % 28, secs / 3600 % 24, secs / 60 % 60, secs % 60),
    })
}

impl CrmFake {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `n` generated contacts to the feed (sequence numbers continue).
    pub fn add_contacts(&self, n: u64) {
        let mut i = self.inner.lock().unwrap();
        let start = i.contacts.len() as u64;
        for seq in start + 1..=start + n {
            i.contacts.push(contact(seq));
        }
    }

    /// Appends one contact as given.
    pub fn push_contact(&self, v: Value) {
        self.inner.lock().unwrap().contacts.push(v);
    }

    pub fn contact_count(&self) -> usize {
        self.inner.lock().unwrap().contacts.len()
    }

    /// Every request must carry `header: value` (e.g. `authorization: Bearer x`), else 401.
    pub fn require_header(&self, header: &str, value: &str) {
        self.inner.lock().unwrap().auth = Some((header.to_ascii_lowercase(), value.to_string()));
    }

    /// Fault mode: the feed answers its first page whatever the cursor.
    pub fn repeat_first_page(&self, on: bool) {
        self.inner.lock().unwrap().repeat_first_page = on;
    }

    /// Fault mode: past the end, the feed keeps saying `has_more` on empty pages.
    pub fn endless_has_more(&self, on: bool) {
        self.inner.lock().unwrap().endless_has_more = on;
    }

    /// The next `k` webhook POSTs are refused with `status`.
    pub fn refuse_next(&self, k: usize, status: u16) {
        let mut i = self.inner.lock().unwrap();
        for _ in 0..k {
            i.refuse.push_back(status);
        }
    }

    /// Every POST received, refused and duplicate ones included.
    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// The records of every accepted, non-duplicate payload, in order of receipt.
    pub fn accepted_records(&self) -> Vec<Value> {
        self.received()
            .iter()
            .filter(|r| r.status == 200 && !r.duplicate)
            .flat_map(|r| serde_json::from_slice::<Vec<Value>>(&r.body).unwrap_or_default())
            .collect()
    }

    // S-360 streams ------------------------------------------------------------------

    /// Appends `n` generated offer requests (`OFF-1`…), alternating SALE and RESERVATION.
    pub fn add_offers(&self, n: u64) {
        let mut i = self.inner.lock().unwrap();
        let start = i.offers.len() as u64;
        for seq in start + 1..=start + n {
            i.offers.push(json!({
                "id": format!("OFF-{seq}"),
                "seq": seq,
                "kind": if seq % 2 == 0 { "RESERVATION" } else { "SALE" },
                "contact_number": format!("{}", 3_200_000 + seq),
                "performance_id": 7,
                "quantity": 1 + seq % 4,
                "tariff_id": 3,
                "created_at": "2026-05-01T10:00:00Z",
            }));
        }
    }

    pub fn push_offer(&self, v: Value) {
        self.inner.lock().unwrap().offers.push(v);
    }

    /// Requests must carry a bearer token from `/oauth/token`, which answers only this client.
    pub fn require_oauth(&self, client_id: &str, client_secret: &str) {
        self.inner.lock().unwrap().oauth = Some((client_id.into(), client_secret.into()));
    }

    pub fn tokens_issued(&self) -> u64 {
        self.inner.lock().unwrap().tokens_issued
    }

    pub fn router(&self) -> Router {
        let feed = Router::new()
            .route("/api/changes", get(changes))
            // S-360 streams
            .route("/api/offer-requests", get(offer_requests))
            .route("/oauth/token", post(token))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "crm.feed"),
                faults::layer,
            ))
            .with_state(self.clone());
        let hooks = Router::new()
            .route("/hooks/{*path}", post(hook))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "crm.hook"),
                faults::layer,
            ))
            .with_state(self.clone());
        feed.merge(hooks)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let i = self.inner.lock().unwrap();
        if i.oauth.is_some() {
            let bearer = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            return bearer.is_some_and(|t| i.issued.contains(t));
        }
        match &i.auth {
            None => true,
            Some((h, v)) => {
                headers.get(h.as_str()).and_then(|x| x.to_str().ok()) == Some(v.as_str())
            }
        }
    }
}

#[derive(Deserialize)]
struct FeedQuery {
    entity: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "unauthorized"})),
    )
        .into_response()
}

async fn changes(
    State(crm): State<CrmFake>,
    headers: HeaderMap,
    Query(q): Query<FeedQuery>,
) -> Response {
    if !crm.authorized(&headers) {
        return unauthorized();
    }
    if q.entity.as_deref().is_some_and(|e| e != "contact") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "unknown entity"})),
        )
            .into_response();
    }
    // The cursor is opaque to clients; here it is "c" and the position.
    let pos = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.strip_prefix('c').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": "invalid_cursor"})),
                )
                    .into_response();
            }
        },
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let i = crm.inner.lock().unwrap();
    let pos = if i.repeat_first_page {
        0
    } else {
        pos.min(i.contacts.len())
    };
    let end = (pos + limit).min(i.contacts.len());
    let items: Vec<Value> = i.contacts[pos..end].to_vec();
    axum::Json(json!({
        "items": items,
        "next": format!("c{end}"),
        "has_more": end < i.contacts.len() || i.endless_has_more,
    }))
    .into_response()
}

async fn hook(
    State(crm): State<CrmFake>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !crm.authorized(&headers) {
        return unauthorized();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut i = crm.inner.lock().unwrap();
    let (status, duplicate) = if let Some(s) = i.refuse.pop_front() {
        (s, false)
    } else if serde_json::from_slice::<Vec<Value>>(&body).is_err() {
        (400, false)
    } else {
        let dup = key
            .as_ref()
            .is_some_and(|k| !i.accepted_keys.insert(k.clone()));
        (200, dup)
    };
    i.received.push(Received {
        path,
        body,
        idempotency_key: key,
        status,
        duplicate,
    });
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({"status": if status == 200 { "accepted" } else { "refused" }})),
    )
        .into_response()
}

// S-360 streams ----------------------------------------------------------------------

async fn offer_requests(
    State(crm): State<CrmFake>,
    headers: HeaderMap,
    Query(q): Query<FeedQuery>,
) -> Response {
    if !crm.authorized(&headers) {
        return unauthorized();
    }
    let pos = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.strip_prefix('o').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": "invalid_cursor"})),
                )
                    .into_response();
            }
        },
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let i = crm.inner.lock().unwrap();
    let pos = pos.min(i.offers.len());
    let end = (pos + limit).min(i.offers.len());
    axum::Json(json!({
        "items": i.offers[pos..end].to_vec(),
        "next": format!("o{end}"),
        "has_more": end < i.offers.len(),
    }))
    .into_response()
}

/// OAuth2 client credentials, from the form or from HTTP Basic.
async fn token(State(crm): State<CrmFake>, body: Bytes) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let mut i = crm.inner.lock().unwrap();
    let ok = match &i.oauth {
        Some((id, secret)) => {
            form.get("grant_type").map(String::as_str) == Some("client_credentials")
                && form.get("client_id") == Some(id)
                && form.get("client_secret") == Some(secret)
        }
        None => false,
    };
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    i.tokens_issued += 1;
    let t = format!("crm-token-{}", i.tokens_issued);
    i.issued.insert(t.clone());
    axum::Json(json!({"access_token": t, "token_type": "Bearer", "expires_in": 3600}))
        .into_response()
}
