//! The fake Airship (vendor-apis "Airship"): units (50 a page), contacts upserted by e-mail
//! (trimmed, case-insensitive) else mobile digits, bookings upserted by reference inside
//! `POST /contact`, `POST /booking/update` (404 for an unknown reference), groups created on
//! their unit (identity: unit + name + folder), `POST /contacts/search`. Bearer token and
//! `account_id` checked. It records **every call** (path and body), so a test can assert
//! that a booking update sent no contact write; a test can make it refuse (422) every write
//! that carries a given booking reference. Faults: route `airship`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::faults::{self, Faults};

pub const UNITS_PER_PAGE: usize = 50;

/// One call the fake received.
#[derive(Debug, Clone)]
pub struct AirshipCall {
    /// `/contact`, `/booking/update`, `/contacts/search`, `/account/units`.
    pub path: String,
    pub body: Value,
    pub status: u16,
}

/// A group membership: (contact id, unit id, group name, folder).
pub type Membership = (i64, i64, String, Option<String>);

#[derive(Default)]
struct Inner {
    token: Option<String>,
    account_id: Option<i64>,
    units: Vec<(i64, String)>,
    contacts: Vec<Map<String, Value>>,
    /// Indexes into `contacts`: normalised e-mail and mobile digits.
    by_email: HashMap<String, usize>,
    by_mobile: HashMap<String, usize>,
    /// booking reference → (booking id, contact id, fields as last written)
    bookings: HashMap<String, (i64, i64, Value)>,
    /// How many times each reference was created (must stay 1).
    created: HashMap<String, u64>,
    groups: BTreeSet<(i64, String, Option<String>)>,
    members: BTreeSet<Membership>,
    calls: Vec<AirshipCall>,
    record_bodies: bool,
    reject: HashMap<String, u16>,
    next_booking: i64,
}

#[derive(Clone)]
pub struct AirshipFake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

impl Default for AirshipFake {
    fn default() -> Self {
        Self::new()
    }
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

fn norm_email(s: &str) -> String {
    s.trim().to_lowercase()
}

fn errors(status: u16, msg: &str) -> (u16, Value) {
    (status, json!({"errors": [msg]}))
}

impl AirshipFake {
    pub fn new() -> Self {
        AirshipFake {
            inner: Arc::new(Mutex::new(Inner {
                record_bodies: true,
                next_booking: 1,
                ..Default::default()
            })),
            faults: Faults::new(),
        }
    }

    pub fn require_token(&self, token: &str, account_id: i64) {
        let mut i = self.inner.lock().unwrap();
        i.token = Some(token.to_string());
        i.account_id = Some(account_id);
    }

    pub fn add_unit(&self, id: i64, name: &str) {
        self.inner
            .lock()
            .unwrap()
            .units
            .push((id, name.to_string()));
    }

    /// Keep only paths and statuses of calls (for large benchmarks).
    pub fn record_bodies(&self, on: bool) {
        self.inner.lock().unwrap().record_bodies = on;
    }

    /// Every write carrying this booking reference is refused with `status` until cleared.
    pub fn reject_booking(&self, reference: &str, status: u16) {
        self.inner
            .lock()
            .unwrap()
            .reject
            .insert(reference.to_string(), status);
    }

    pub fn clear_rejects(&self) {
        self.inner.lock().unwrap().reject.clear();
    }

    pub fn calls(&self) -> Vec<AirshipCall> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Successful writes (`/contact` and `/booking/update`).
    pub fn writes(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| (c.path == "/contact" || c.path == "/booking/update") && c.status < 300)
            .count()
    }

    pub fn contacts(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .contacts
            .iter()
            .map(|c| Value::Object(c.clone()))
            .collect()
    }

    pub fn contact_by_email(&self, email: &str) -> Option<Value> {
        let e = norm_email(email);
        self.contacts()
            .into_iter()
            .find(|c| c["email"].as_str().map(norm_email).as_deref() == Some(e.as_str()))
    }

    /// A booking's fields as last written, with its contact's id.
    pub fn booking(&self, reference: &str) -> Option<(i64, Value)> {
        let i = self.inner.lock().unwrap();
        i.bookings.get(reference).map(|(_, c, v)| (*c, v.clone()))
    }

    pub fn booking_count(&self) -> usize {
        self.inner.lock().unwrap().bookings.len()
    }

    /// How many times each reference was created (a duplicate shows as 2+).
    pub fn creations(&self) -> HashMap<String, u64> {
        self.inner.lock().unwrap().created.clone()
    }

    pub fn memberships(&self) -> Vec<Membership> {
        self.inner.lock().unwrap().members.iter().cloned().collect()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/account/units", get(units))
            .route("/contact", post(contact))
            .route("/booking/update", post(booking_update))
            .route("/contacts/search", post(search))
            .route("/_stats", get(stats))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "airship"),
                faults::layer,
            ))
            .with_state(self.clone())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let i = self.inner.lock().unwrap();
        match &i.token {
            None => true,
            Some(t) => {
                headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(format!("Bearer {t}").as_str())
            }
        }
    }

    fn record(&self, path: &str, body: Value, status: u16) {
        let mut i = self.inner.lock().unwrap();
        let body = if i.record_bodies { body } else { Value::Null };
        i.calls.push(AirshipCall {
            path: path.to_string(),
            body,
            status,
        });
    }

    fn answer(&self, path: &str, body: Value, (status, reply): (u16, Value)) -> Response {
        self.record(path, body, status);
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(reply),
        )
            .into_response()
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"errors": ["Unauthenticated."]})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct PageQuery {
    page: Option<usize>,
}

async fn units(
    State(a): State<AirshipFake>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    if !a.authorized(&headers) {
        return unauthorized();
    }
    let page = q.page.unwrap_or(1).max(1);
    let reply = {
        let i = a.inner.lock().unwrap();
        let last = i.units.len().div_ceil(UNITS_PER_PAGE).max(1);
        let data: Vec<Value> = i
            .units
            .iter()
            .skip((page - 1) * UNITS_PER_PAGE)
            .take(UNITS_PER_PAGE)
            .map(|(id, name)| json!({"id": id, "name": name}))
            .collect();
        json!({"current_page": page, "data": data, "last_page": last})
    };
    a.answer("/account/units", Value::Null, (200, reply))
}

fn rejected(i: &Inner, refs: &[String]) -> Option<(u16, Value)> {
    refs.iter().find_map(|r| {
        i.reject
            .get(r)
            .map(|s| errors(*s, &format!("booking {r} is invalid")))
    })
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

async fn contact(
    State(a): State<AirshipFake>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !a.authorized(&headers) {
        return unauthorized();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return a.answer("/contact", Value::Null, errors(422, "body is not JSON"));
    };
    let result = write_contact(&a, &body);
    a.answer("/contact", body, result)
}

fn write_contact(a: &AirshipFake, body: &Value) -> (u16, Value) {
    let mut guard = a.inner.lock().unwrap();
    let i = &mut *guard;
    match body["account_id"].as_i64() {
        None => return errors(422, "account_id must be an integer"),
        Some(n) if i.account_id.is_some_and(|want| want != n) => {
            return errors(403, "account_id does not match the token");
        }
        _ => {}
    }
    let bookings: Vec<Value> = body["bookings"].as_array().cloned().unwrap_or_default();
    let refs: Vec<String> = bookings
        .iter()
        .filter_map(|b| b["booking_reference"].as_str().map(str::to_string))
        .collect();
    if refs.len() != bookings.len() {
        return errors(422, "every booking needs a booking_reference");
    }
    if let Some(r) = rejected(i, &refs) {
        return r;
    }
    let email = body["email"]
        .as_str()
        .map(norm_email)
        .filter(|e| !e.is_empty());
    let mobile = body["mobile_number"]
        .as_str()
        .map(digits)
        .filter(|m| !m.is_empty());
    if email.is_none() && mobile.is_none() {
        return errors(422, "email or mobile_number is required");
    }
    let known_units: HashSet<i64> = i.units.iter().map(|(id, _)| *id).collect();
    let units = body["units"].as_array().cloned().unwrap_or_default();
    for u in &units {
        if !u["id"].as_i64().is_some_and(|id| known_units.contains(&id)) {
            return errors(422, &format!("unit {} not found", u["id"]));
        }
    }
    for b in &bookings {
        if !b["unit_id"]
            .as_i64()
            .is_some_and(|id| known_units.contains(&id))
        {
            return errors(422, &format!("unit {} not found", b["unit_id"]));
        }
    }
    // Upsert the contact: by e-mail, else by mobile digits.
    let pos = email
        .as_ref()
        .and_then(|e| i.by_email.get(e).copied())
        .or_else(|| mobile.as_ref().and_then(|m| i.by_mobile.get(m).copied()));
    let pos = match pos {
        Some(p) => p,
        None => {
            let id = i.contacts.len() as i64 + 1;
            let mut c = Map::new();
            c.insert("id".into(), json!(id));
            c.insert("allow_email".into(), json!(false));
            c.insert("allow_sms".into(), json!(false));
            i.contacts.push(c);
            i.contacts.len() - 1
        }
    };
    let contact_id = i.contacts[pos]["id"].as_i64().unwrap_or_default();
    for k in [
        "first_name",
        "last_name",
        "email",
        "mobile_number",
        "allow_email",
        "allow_sms",
        "source_name",
    ] {
        if let Some(v) = body.get(k).filter(|v| !v.is_null()) {
            i.contacts[pos].insert(k.into(), v.clone());
        }
    }
    if let Some(e) = &email {
        i.by_email.insert(e.clone(), pos);
    }
    if let Some(m) = &mobile {
        i.by_mobile.insert(m.clone(), pos);
    }
    for u in &units {
        let unit = u["id"].as_i64().unwrap_or_default();
        for g in u["groups"].as_array().into_iter().flatten() {
            let name = g["name"].as_str().unwrap_or_default().to_string();
            let folder = g["folder_name"].as_str().map(str::to_string);
            i.groups.insert((unit, name.clone(), folder.clone()));
            i.members.insert((contact_id, unit, name, folder));
        }
    }
    for b in bookings {
        let r = b["booking_reference"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match i.bookings.get_mut(&r) {
            Some((_, c, fields)) => {
                *c = contact_id;
                merge(fields, &b);
            }
            None => {
                let id = i.next_booking;
                i.next_booking += 1;
                *i.created.entry(r.clone()).or_default() += 1;
                i.bookings.insert(r, (id, contact_id, b));
            }
        }
    }
    (200, json!({"id": contact_id}))
}

async fn booking_update(
    State(a): State<AirshipFake>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !a.authorized(&headers) {
        return unauthorized();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return a.answer(
            "/booking/update",
            Value::Null,
            errors(422, "body is not JSON"),
        );
    };
    let result = {
        let mut i = a.inner.lock().unwrap();
        match body["booking_reference"].as_str().map(str::to_string) {
            None => errors(422, "booking_reference is required"),
            Some(r) => match rejected(&i, std::slice::from_ref(&r)) {
                Some(x) => x,
                None => match i.bookings.get_mut(&r) {
                    None => errors(404, "booking not found"),
                    Some((id, _, fields)) => {
                        merge(fields, &body);
                        (200, json!({"id": *id}))
                    }
                },
            },
        }
    };
    a.answer("/booking/update", body, result)
}

async fn search(
    State(a): State<AirshipFake>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !a.authorized(&headers) {
        return unauthorized();
    }
    let e = body["email"].as_str().map(norm_email).unwrap_or_default();
    let found: Vec<Value> = a
        .contacts()
        .into_iter()
        .filter(|c| c["email"].as_str().map(norm_email).as_deref() == Some(e.as_str()))
        .map(|c| {
            json!({"id": c["id"], "email": c["email"], "mobile_number": c["mobile_number"],
            "first_name": c["first_name"], "last_name": c["last_name"]})
        })
        .collect();
    a.answer("/contacts/search", body, (200, json!(found)))
}

/// Counters for a benchmark driving the fake from another process (not part of Airship).
async fn stats(State(a): State<AirshipFake>) -> Response {
    let i = a.inner.lock().unwrap();
    let count = |p: &str| {
        i.calls
            .iter()
            .filter(|c| c.path == p && c.status < 300)
            .count()
    };
    axum::Json(json!({
        "contact_writes": count("/contact"),
        "booking_updates": count("/booking/update"),
        "calls": i.calls.len(),
        "contacts": i.contacts.len(),
        "bookings": i.bookings.len(),
    }))
    .into_response()
}
