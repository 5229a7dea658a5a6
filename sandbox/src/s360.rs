//! The fake S-360 (vendor-apis "S-360"), two halves:
//!
//! - [`S360Fake`]: the public API under `/s360/{institution}/…`: HS256 JWT checked
//!   (signature, `sub` = the institution in the path, `aud`, `iss`, times in ms with 2 s of
//!   skew, lifetime ≤ 30 s; else 401); a sliding-window rate limiter per instance that counts
//!   every call (refused ones too) and answers 509 (or 429) with `Retry-After`;
//!   `saveIndividualContactData`, `searchContact`, `createOrUpdateOrder` (a new order on every
//!   call, as a real API would: duplicates are the client's fault) and
//!   `getOrderByExternalReference`. Tests can make the next answers errors in S-360's style
//!   (HTTP 200, `statusCode` ≠ SUCCESS) or slow *after* the work is done (an unknown outcome).
//! - [`S360Sender`]: posts JSON arrays into usher's receiver the way S-360 does, at most `bs`
//!   records per POST, and resends a payload that did not get a 200 (up to 12 tries).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use super::faults::{self, Faults};
use usher::jwt;

pub const DEMO_PARTNER_SECRET: &str = "demo-partner-secret";
pub const DEMO_PARTNER: &str = "usher";
pub const DEMO_OPERATOR: &str = "VO-DEMO";

/// One call the API got, as the rate limiter saw it (`at` = time of receipt).
#[derive(Debug, Clone)]
pub struct ApiCall {
    pub institution: String,
    pub method: String,
    pub at: SystemTime,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct Order {
    pub order_id: u64,
    pub external_reference: Option<String>,
    pub body: Value,
}

struct Inner {
    secret: String,
    audience: String,
    issuer: String,
    /// Calls allowed per window, and the window.
    limit: (usize, Duration),
    limit_status: u16,
    window: HashMap<String, VecDeque<std::time::Instant>>,
    calls: Vec<ApiCall>,
    contacts: Vec<Value>,
    next_contact: u64,
    orders: Vec<Order>,
    next_order: u64,
    /// The next answers of a method: S-360-style errors (statusCode, statusDetail).
    errors: HashMap<String, VecDeque<(String, String)>>,
    /// The next answers of a method are delayed this long, after the work is done.
    delays: HashMap<String, VecDeque<Duration>>,
    /// `saveIndividualContactData` for these e-mails answers this (statusCode, statusDetail).
    refused_emails: HashMap<String, (String, String)>,
}

#[derive(Clone)]
pub struct S360Fake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

impl Default for S360Fake {
    fn default() -> Self {
        Self::new()
    }
}

impl S360Fake {
    pub fn new() -> Self {
        S360Fake {
            inner: Arc::new(Mutex::new(Inner {
                secret: DEMO_PARTNER_SECRET.into(),
                audience: DEMO_OPERATOR.into(),
                issuer: DEMO_PARTNER.into(),
                limit: (180, Duration::from_secs(60)),
                limit_status: 509,
                window: HashMap::new(),
                calls: Vec::new(),
                contacts: Vec::new(),
                next_contact: 3_000_000,
                orders: Vec::new(),
                next_order: 10_000_000_000,
                errors: HashMap::new(),
                delays: HashMap::new(),
                refused_emails: HashMap::new(),
            })),
            faults: Faults::new(),
        }
    }

    /// The partner's key and the claims the API expects.
    pub fn set_partner(&self, secret: &str, audience: &str, issuer: &str) {
        let mut i = self.inner.lock().unwrap();
        i.secret = secret.into();
        i.audience = audience.into();
        i.issuer = issuer.into();
    }

    /// Calls per window per instance (S-360: 180 per 60 s), and the status beyond (509/429).
    pub fn set_rate_limit(&self, calls: usize, per: Duration, status: u16) {
        let mut i = self.inner.lock().unwrap();
        i.limit = (calls, per);
        i.limit_status = status;
    }

    /// The next `n` answers of `method` are HTTP 200 with this statusCode and statusDetail.
    pub fn fail_next(&self, method: &str, n: usize, code: &str, detail: &str) {
        let mut i = self.inner.lock().unwrap();
        let q = i.errors.entry(method.into()).or_default();
        for _ in 0..n {
            q.push_back((code.into(), detail.into()));
        }
    }

    /// Saving a contact with this e-mail is always refused in S-360's style.
    pub fn refuse_email(&self, email: &str, code: &str, detail: &str) {
        self.inner
            .lock()
            .unwrap()
            .refused_emails
            .insert(email.to_lowercase(), (code.into(), detail.into()));
    }

    /// The next answer of `method` comes `d` late, after the work is done.
    pub fn delay_next(&self, method: &str, d: Duration) {
        self.inner
            .lock()
            .unwrap()
            .delays
            .entry(method.into())
            .or_default()
            .push_back(d);
    }

    /// Adds a contact as S-360 holds it; returns its number.
    pub fn add_contact(&self, mut v: Value) -> String {
        let mut i = self.inner.lock().unwrap();
        i.next_contact += 1;
        let n = i.next_contact.to_string();
        v["contactNumber"] = Value::String(n.clone());
        i.contacts.push(v);
        n
    }

    pub fn contacts(&self) -> Vec<Value> {
        self.inner.lock().unwrap().contacts.clone()
    }

    pub fn orders(&self) -> Vec<Order> {
        self.inner.lock().unwrap().orders.clone()
    }

    pub fn calls(&self) -> Vec<ApiCall> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The most calls of one instance within any `per` (by the fake's receipt times).
    pub fn max_calls_within(&self, institution: &str, per: Duration) -> usize {
        let times: Vec<SystemTime> = self
            .calls()
            .iter()
            .filter(|c| c.institution == institution)
            .map(|c| c.at)
            .collect();
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]).unwrap_or_default() >= per {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/{institution}/{area}/backend-apis/{service}/{version}/{method}",
                post(api),
            )
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "s360.api"),
                faults::layer,
            ))
            .with_state(self.clone())
    }
}

fn s360(status: StatusCode, v: Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn email_of(v: &Value) -> Option<String> {
    v.get("individualContact")?
        .get("email")?
        .as_str()
        .map(|e| e.trim().to_lowercase())
}

async fn api(
    State(fake): State<S360Fake>,
    Path((institution, _area, _service, _version, method)): Path<(
        String,
        String,
        String,
        String,
        String,
    )>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let now = std::time::Instant::now();
    let received = SystemTime::now();
    // Rate limit first: every call counts, refused ones included.
    let limited = {
        let mut i = fake.inner.lock().unwrap();
        let (calls, per) = i.limit;
        let status = i.limit_status;
        let w = i.window.entry(institution.clone()).or_default();
        while w.front().is_some_and(|t| now.duration_since(*t) >= per) {
            w.pop_front();
        }
        let over = w.len() >= calls;
        let retry = w
            .front()
            .map(|t| per.saturating_sub(now.duration_since(*t)))
            .unwrap_or(per);
        w.push_back(now);
        over.then_some((status, retry))
    };
    let resp = if let Some((status, retry)) = limited {
        let mut r = s360(
            StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            json!({"statusCode": "RATE_LIMITED", "statusDetail": "too many calls"}),
        );
        let secs = retry.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        r
    } else {
        handle(&fake, &institution, &method, &headers, &body).await
    };
    fake.inner.lock().unwrap().calls.push(ApiCall {
        institution,
        method,
        at: received,
        status: resp.status().as_u16(),
    });
    resp
}

async fn handle(
    fake: &S360Fake,
    institution: &str,
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    // The JWT: signature, claims, times.
    {
        let i = fake.inner.lock().unwrap();
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = token
            .and_then(|t| jwt::verify(t, &i.secret, jwt::now_ms(), 2000).ok())
            .is_some_and(|c| c.sub == institution && c.aud == i.audience && c.iss == i.issuer);
        if !ok {
            return s360(
                StatusCode::UNAUTHORIZED,
                json!({"statusCode": "UNAUTHORIZED", "statusDetail": "invalid token"}),
            );
        }
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return s360(
            StatusCode::BAD_REQUEST,
            json!({"statusCode": "BAD_REQUEST", "statusDetail": "body is not JSON"}),
        );
    };
    let (error, delay) = {
        let mut i = fake.inner.lock().unwrap();
        let mut e = i.errors.get_mut(method).and_then(|q| q.pop_front());
        if e.is_none() && method == "saveIndividualContactData" {
            e = email_of(&req).and_then(|m| i.refused_emails.get(&m).cloned());
        }
        let d = i.delays.get_mut(method).and_then(|q| q.pop_front());
        (e, d)
    };
    if let Some((code, detail)) = error {
        return s360(
            StatusCode::OK,
            json!({"statusCode": code, "statusDetail": detail}),
        );
    }
    let answer = {
        let mut i = fake.inner.lock().unwrap();
        match method {
            "saveIndividualContactData" => match req.get("contactNumber") {
                None | Some(Value::Null) => {
                    i.next_contact += 1;
                    let n = i.next_contact.to_string();
                    let mut c = req.clone();
                    c["contactNumber"] = Value::String(n.clone());
                    i.contacts.push(c);
                    json!({"statusCode": "SUCCESS", "contactNumber": n})
                }
                Some(num) => {
                    let n = match num {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    match i
                        .contacts
                        .iter_mut()
                        .find(|c| c["contactNumber"].as_str() == Some(n.as_str()))
                    {
                        Some(c) => {
                            if let (Value::Object(dst), Value::Object(src)) = (c, &req) {
                                for (k, v) in src {
                                    dst.insert(k.clone(), v.clone());
                                }
                            }
                            json!({"statusCode": "SUCCESS", "contactNumber": n})
                        }
                        None => json!({"statusCode": "CONTACT_NOT_FOUND",
                                        "statusDetail": format!("no contact {n}")}),
                    }
                }
            },
            "searchContact" => {
                let email = req["email"].as_str().unwrap_or("").trim().to_lowercase();
                let found: Vec<Value> = i
                    .contacts
                    .iter()
                    .filter(|c| email_of(c).as_deref() == Some(email.as_str()))
                    .cloned()
                    .collect();
                json!({"statusCode": "SUCCESS", "contacts": found})
            }
            "createOrUpdateOrder" => {
                i.next_order += 1;
                let id = i.next_order;
                i.orders.push(Order {
                    order_id: id,
                    external_reference: req["externalReference"].as_str().map(str::to_string),
                    body: req.clone(),
                });
                json!({"statusCode": "SUCCESS", "orderUpdateData": {"orderId": id}})
            }
            "getOrderByExternalReference" => {
                let r = req["externalReference"].as_str().unwrap_or("");
                match i
                    .orders
                    .iter()
                    .find(|o| o.external_reference.as_deref() == Some(r))
                {
                    Some(o) => json!({"statusCode": "SUCCESS", "orderId": o.order_id}),
                    None => json!({"statusCode": "NOT_FOUND"}),
                }
            }
            other => {
                json!({"statusCode": "UNKNOWN_METHOD", "statusDetail": format!("no method {other}")})
            }
        }
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    s360(StatusCode::OK, answer)
}

/// A contact element as S-360's webhook sends it; `seq` makes it unique.
pub fn webhook_contact(seq: u64) -> Value {
    json!({
        "contactNumber": format!("{}", 3_100_000 + seq),
        "type": "INDIVIDUAL",
        "role": "PUBLIC",
        "seq": seq,
        "creationDate": "2026-05-01T10:00:00.000+00:00",
        "lastModificationDate": format!("2026-05-02T10:{:02}:{:02}.000+00:00", seq / 60 % 60, seq % 60),
        "individualContact": {"firstName": format!("Ada{seq}"), "lastName": "Example",
            "email": format!("ada{seq}@example.org"), "cellPhoneNumber": "+4712345678", "languageCode": "en"},
        "addresses": [{"isMain": true, "line1": "Main st 1", "zipCode": "0150", "town": "Oslo", "countryCode": "NO"}],
        "authorizations": [{"code": "NEWSLETTER", "value": true}],
        "contactCriteria": [{"code": "EXTCRM_ID", "value": format!("CRM-{seq}")}]
    })
}

/// An order element as S-360's webhook sends it.
pub fn webhook_order(seq: u64, state: &str) -> Value {
    json!({"orderDetailsData": {
        "orderId": 10_000_700_000u64 + seq, "orderState": state, "orderType": "SALE", "seq": seq,
        "contactNumber": format!("{}", 3_100_000 + seq),
        "creationDateTime": "2026-05-01T10:09:27.503+00:00",
        "saleAmount": 40000, "reservationAmount": 0, "optionAmount": 0,
        "operationDatas": [{"operationId": 1, "kind": "SINGLE_ENTRY", "quantity": 2, "unitPrice": 20000,
                            "productId": 9, "productCode": "ASTDN", "performanceId": 7, "eventId": 5}]}})
}

/// S-360's webhook sender, pointed at usher's receiver.
#[derive(Clone)]
pub struct S360Sender {
    client: reqwest::Client,
    pub url: String,
    /// `(header, value)` sent with every POST (e.g. `authorization`, `Bearer …`).
    pub auth: Option<(String, String)>,
    /// Records per POST (S-360's `bs`).
    pub batch: usize,
    /// Tries per payload before giving up (S-360: 12).
    pub tries: u32,
    /// Pause between tries (S-360 waits for its next run; tests wait less).
    pub pause: Duration,
}

/// What a send did.
#[derive(Debug, Default, Clone)]
pub struct SendReport {
    pub posts: u64,
    pub resends: u64,
    pub statuses: Vec<u16>,
    pub gave_up: u64,
}

impl S360Sender {
    pub fn new(url: &str) -> Self {
        S360Sender {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client builds"),
            url: url.into(),
            auth: None,
            batch: 50,
            tries: 12,
            pause: Duration::from_millis(100),
        }
    }

    /// POSTs raw bytes once; the status (0 = no answer).
    pub async fn post_raw(&self, body: Vec<u8>) -> u16 {
        let mut rb = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body);
        if let Some((h, v)) = &self.auth {
            rb = rb.header(h.as_str(), v.as_str());
        }
        match rb.send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Sends records in payloads of `batch`, each resent until it gets a 200.
    pub async fn send(&self, records: &[Value]) -> SendReport {
        let mut rep = SendReport::default();
        for chunk in records.chunks(self.batch.max(1)) {
            let body = serde_json::to_vec(chunk).expect("JSON serializes");
            let mut ok = false;
            for t in 0..self.tries {
                if t > 0 {
                    rep.resends += 1;
                    tokio::time::sleep(self.pause).await;
                }
                rep.posts += 1;
                let s = self.post_raw(body.clone()).await;
                rep.statuses.push(s);
                if s == 200 {
                    ok = true;
                    break;
                }
            }
            if !ok {
                rep.gave_up += 1;
            }
        }
        rep
    }
}
