//! The fake SeatGeek partner feed (vendor-apis "SeatGeek"): OAuth2 client credentials
//! (form fields or HTTP Basic), and `GET /v1/change-events?entity=user` with opaque cursors.
//!
//! Events are generated compactly (user number, version, action), so that a million of them
//! fit in a few tens of MB; a test can also append events as JSON. Generated users are
//! `SG-<n>` with e-mail `user<n>@<domain>`; their `tier` field is `v<version>`, the number
//! of events of that user so far, so a test can check that the newest event won.
//! `expire_cursors` makes every cursor handed out so far answer 400 `invalid_cursor`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::faults::{self, Faults};

/// The credentials the fake accepts unless a test sets others (config/demo-secrets).
pub const DEMO_CLIENT_ID: &str = "usher-demo";
pub const DEMO_CLIENT_SECRET: &str = "sg-demo-secret";

/// 2026-01-01T00:00:00Z: generated event `k` occurred `k` seconds later.
const EPOCH: i64 = 1_767_225_600;

#[derive(Debug, Clone)]
enum Ev {
    Gen { user: u32, version: u32, action: u8 },
    Raw(Box<Value>),
}

struct Inner {
    client_id: String,
    client_secret: String,
    token_lifetime: u64,
    /// token → expiry (unix seconds).
    tokens: HashMap<String, u64>,
    tokens_issued: u64,
    events: Vec<Ev>,
    /// Events of each generated user so far (index = user number).
    versions: Vec<u32>,
    generation: u32,
    domain: String,
}

#[derive(Clone)]
pub struct SeatGeekFake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

impl Default for SeatGeekFake {
    fn default() -> Self {
        Self::new("example.org")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn iso(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The e-mail of generated user `n` (users divisible by 97 have none).
pub fn gen_email(n: u32, domain: &str) -> Option<String> {
    (!n.is_multiple_of(97)).then(|| format!("user{n}@{domain}"))
}

#[derive(Serialize)]
struct Address {
    line1: String,
    city: &'static str,
    postcode: String,
    country: &'static str,
}

#[derive(Serialize)]
struct GenUser {
    id: String,
    email: Option<String>,
    first_name: String,
    last_name: String,
    phone: String,
    address: Address,
    marketing_opt_in: bool,
    tier: String,
    updated_at: String,
}

#[derive(Serialize)]
struct DeletedUser {
    id: String,
    updated_at: String,
}

#[derive(Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // built one at a time while serializing a page
enum UserOut {
    Full(GenUser),
    Deleted(DeletedUser),
}

#[derive(Serialize)]
struct EventOut {
    event_id: String,
    entity: &'static str,
    action: &'static str,
    occurred_at: String,
    user: UserOut,
}

/// Generated user `n` as of its `version`-th event.
pub fn gen_user(n: u32, version: u32, domain: &str, at: &str) -> Value {
    serde_json::to_value(full_user(n, version, domain, at)).expect("serializes")
}

fn full_user(n: u32, version: u32, domain: &str, at: &str) -> GenUser {
    GenUser {
        id: format!("SG-{n}"),
        email: gen_email(n, domain),
        first_name: format!("First{n}"),
        last_name: format!("Last{n}"),
        phone: format!("+47 {:08}", n),
        address: Address {
            line1: format!("Street {n}"),
            city: "Oslo",
            postcode: format!("{:04}", n % 10_000),
            country: "NO",
        },
        marketing_opt_in: version.is_multiple_of(2),
        tier: format!("v{version}"),
        updated_at: at.to_string(),
    }
}

const ACTIONS: [&str; 3] = ["created", "updated", "deleted"];

impl SeatGeekFake {
    /// A fake whose generated users have e-mails at `domain`.
    pub fn new(domain: &str) -> Self {
        SeatGeekFake {
            inner: Arc::new(Mutex::new(Inner {
                client_id: DEMO_CLIENT_ID.into(),
                client_secret: DEMO_CLIENT_SECRET.into(),
                token_lifetime: 3600,
                tokens: HashMap::new(),
                tokens_issued: 0,
                events: Vec::new(),
                versions: Vec::new(),
                generation: 1,
                domain: domain.into(),
            })),
            faults: Faults::new(),
        }
    }

    pub fn set_credentials(&self, client_id: &str, client_secret: &str) {
        let mut i = self.inner.lock().unwrap();
        i.client_id = client_id.into();
        i.client_secret = client_secret.into();
    }

    pub fn set_token_lifetime(&self, secs: u64) {
        self.inner.lock().unwrap().token_lifetime = secs;
    }

    pub fn tokens_issued(&self) -> u64 {
        self.inner.lock().unwrap().tokens_issued
    }

    /// Appends `events` generated events over users `1..=users`: first a `created` event for
    /// each user (in number order, while events last), then `updated` events for users
    /// picked pseudo-randomly (deterministic for a `seed`).
    pub fn add_generated(&self, events: u64, users: u32, seed: u64) {
        let mut i = self.inner.lock().unwrap();
        if i.versions.len() <= users as usize {
            i.versions.resize(users as usize + 1, 0);
        }
        i.events.reserve(events as usize);
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        for k in 0..events {
            let (user, action) = if k < users as u64 {
                (k as u32 + 1, 0u8)
            } else {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((((x >> 33) % users as u64) + 1) as u32, 1u8)
            };
            i.versions[user as usize] += 1;
            let version = i.versions[user as usize];
            i.events.push(Ev::Gen {
                user,
                version,
                action,
            });
        }
    }

    /// Appends an event for generated user `n` (a new version of it), e.g. `deleted`.
    pub fn push_generated(&self, n: u32, action: &str) {
        let mut i = self.inner.lock().unwrap();
        if i.versions.len() <= n as usize {
            i.versions.resize(n as usize + 1, 0);
        }
        i.versions[n as usize] += 1;
        let version = i.versions[n as usize];
        let action = ACTIONS.iter().position(|a| *a == action).unwrap_or(1) as u8;
        i.events.push(Ev::Gen {
            user: n,
            version,
            action,
        });
    }

    /// Appends one event as given (`event_id` and `occurred_at` are filled in when absent).
    pub fn push_event(&self, mut ev: Value) {
        let mut i = self.inner.lock().unwrap();
        let k = i.events.len() as i64 + 1;
        if let Value::Object(m) = &mut ev {
            m.entry("event_id")
                .or_insert_with(|| json!(format!("ce_{k:09}")));
            m.entry("occurred_at")
                .or_insert_with(|| json!(iso(EPOCH + k)));
            m.entry("entity").or_insert_with(|| json!("user"));
        }
        i.events.push(Ev::Raw(Box::new(ev)));
    }

    /// The number of events generated user `n` has had (its last `tier` is `v<that>`).
    pub fn version(&self, n: u32) -> u32 {
        self.inner
            .lock()
            .unwrap()
            .versions
            .get(n as usize)
            .copied()
            .unwrap_or(0)
    }

    pub fn event_count(&self) -> usize {
        self.inner.lock().unwrap().events.len()
    }

    /// Every cursor handed out so far becomes unknown (400 `invalid_cursor`).
    pub fn expire_cursors(&self) {
        self.inner.lock().unwrap().generation += 1;
    }

    /// Every token handed out so far becomes expired (401 `invalid_token`).
    pub fn expire_tokens(&self) {
        self.inner.lock().unwrap().tokens.clear();
    }

    pub fn router(&self) -> Router {
        let token = Router::new()
            .route("/oauth/token", post(token))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "seatgeek.token"),
                faults::layer,
            ))
            .with_state(self.clone());
        let events = Router::new()
            .route("/v1/change-events", get(change_events))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "seatgeek.events"),
                faults::layer,
            ))
            .with_state(self.clone());
        token.merge(events)
    }
}

fn error(status: StatusCode, e: &str) -> Response {
    (status, axum::Json(json!({ "error": e }))).into_response()
}

async fn token(State(f): State<SeatGeekFake>, headers: HeaderMap, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64_decode(b.trim()))
        .and_then(|s| {
            s.split_once(':')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        });
    let (id, secret) = match (form.get("client_id"), form.get("client_secret"), basic) {
        (Some(a), Some(b), _) => (a.clone(), b.clone()),
        (_, _, Some(p)) => p,
        _ => return error(StatusCode::UNAUTHORIZED, "invalid_client"),
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let mut i = f.inner.lock().unwrap();
    if id != i.client_id || secret != i.client_secret {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    i.tokens_issued += 1;
    let tok = format!("sgt-{}-{}", i.tokens_issued, rand::random::<u64>());
    let life = i.token_lifetime;
    i.tokens.insert(tok.clone(), now_secs() + life);
    axum::Json(json!({"access_token": tok, "token_type": "Bearer", "expires_in": life}))
        .into_response()
}

/// Just enough Base64 for HTTP Basic.
fn base64_decode(s: &str) -> Option<String> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        bits = (bits << 6) | A.iter().position(|a| *a == c)? as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Deserialize)]
struct EventsQuery {
    entity: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn change_events(
    State(f): State<SeatGeekFake>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let i = f.inner.lock().unwrap();
    match bearer.and_then(|b| i.tokens.get(&b).copied()) {
        Some(exp) if exp > now_secs() => {}
        _ => return error(StatusCode::UNAUTHORIZED, "invalid_token"),
    }
    if q.entity.as_deref() != Some("user") {
        return error(StatusCode::BAD_REQUEST, "unknown entity");
    }
    let pos = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => {
            let parsed = c
                .strip_prefix('g')
                .and_then(|r| r.split_once('p'))
                .and_then(|(g, p)| Some((g.parse::<u32>().ok()?, p.parse::<usize>().ok()?)));
            match parsed {
                Some((g, p)) if g == i.generation && p <= i.events.len() => p,
                _ => return error(StatusCode::BAD_REQUEST, "invalid_cursor"),
            }
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let end = (pos + limit).min(i.events.len());
    let mut out = Vec::with_capacity(end - pos);
    let mut raws: Vec<(usize, Value)> = Vec::new();
    for (k, ev) in i.events[pos..end].iter().enumerate() {
        let k = pos + k;
        match ev {
            Ev::Gen {
                user,
                version,
                action,
            } => {
                let at = iso(EPOCH + k as i64 + 1);
                let user = if *action == 2 {
                    UserOut::Deleted(DeletedUser {
                        id: format!("SG-{user}"),
                        updated_at: at.clone(),
                    })
                } else {
                    UserOut::Full(full_user(*user, *version, &i.domain, &at))
                };
                out.push(Some(EventOut {
                    event_id: format!("ce_{:09}", k + 1),
                    entity: "user",
                    action: ACTIONS[*action as usize],
                    occurred_at: at,
                    user,
                }));
            }
            Ev::Raw(v) => {
                raws.push((out.len(), (**v).clone()));
                out.push(None);
            }
        }
    }
    let next = format!("g{}p{end}", i.generation);
    let has_more = end < i.events.len();
    drop(i);
    let data: Vec<Value> = if raws.is_empty() {
        Vec::new()
    } else {
        let mut raws = raws.into_iter().peekable();
        out.drain(..)
            .map(|e| match e {
                Some(e) => serde_json::to_value(e).expect("serializes"),
                None => raws.next().map(|(_, v)| v).unwrap_or(Value::Null),
            })
            .collect()
    };
    let body = if data.is_empty() {
        #[derive(Serialize)]
        struct PageOut<'a> {
            data: Vec<EventOut>,
            next_cursor: &'a str,
            has_more: bool,
        }
        serde_json::to_vec(&PageOut {
            data: out.into_iter().flatten().collect(),
            next_cursor: &next,
            has_more,
        })
    } else {
        serde_json::to_vec(&json!({"data": data, "next_cursor": next, "has_more": has_more}))
    }
    .expect("serializes");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
