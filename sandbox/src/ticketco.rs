//! The fake Ticket Co (vendor-apis "Ticket Co — bookings"): active events filtered by local
//! start date, 20 a page; each event's booking lines (`item_grosses`), 100 a page; both
//! end with an empty array. The token must come as `?token=`, else 401. Tests add events
//! and lines, change a line (a cancellation), and inject faults per route
//! (`ticketco.events`, `ticketco.items`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{Value, json};

use super::faults::{self, Faults};

pub const EVENTS_PER_PAGE: usize = 20;
pub const ITEMS_PER_PAGE: usize = 100;

#[derive(Default)]
struct Inner {
    token: Option<String>,
    events: Vec<Value>,
    /// event id → its booking lines, in order.
    items: HashMap<String, Vec<Value>>,
    /// Every `token` value received (to check usher sends it, and only here).
    tokens_seen: u64,
    /// `item_grosses` pages as served, by (event id, page), until a line changes: the
    /// benchmark's second run reads every page again, and a vendor serves that from its
    /// own machines, not from the 2 cores usher is measured on.
    pages: HashMap<(String, usize), bytes::Bytes>,
}

#[derive(Clone, Default)]
pub struct TicketCoFake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl TicketCoFake {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests must carry `?token=T`.
    pub fn require_token(&self, token: &str) {
        self.inner.lock().unwrap().token = Some(token.to_string());
    }

    pub fn add_event(&self, event: Value) {
        let mut i = self.inner.lock().unwrap();
        i.pages.clear();
        i.items.entry(id_text(&event["id"])).or_default();
        i.events.push(event);
    }

    /// Adds a booking line to its event (`event_id`).
    pub fn add_item(&self, item: Value) {
        let mut i = self.inner.lock().unwrap();
        i.pages.clear();
        i.items
            .entry(id_text(&item["event_id"]))
            .or_default()
            .push(item);
    }

    /// Changes the line with this `ref_number`; false when there is none.
    pub fn update_item(&self, ref_number: &str, f: impl Fn(&mut Value)) -> bool {
        let mut i = self.inner.lock().unwrap();
        i.pages.clear();
        for list in i.items.values_mut() {
            for it in list.iter_mut() {
                if it["ref_number"] == ref_number {
                    f(it);
                    return true;
                }
            }
        }
        false
    }

    pub fn requests_with_token(&self) -> u64 {
        self.inner.lock().unwrap().tokens_seen
    }

    /// Generated data: `events` events spread over `days` days from `first_day` at the
    /// venues given in turn, and `bookings` lines spread evenly over them (for the demo and
    /// the benchmark). Times carry the `offset` (e.g. "+01:00").
    pub fn generate(
        &self,
        events: u64,
        bookings: u64,
        first_day: NaiveDate,
        days: u64,
        venues: &[&str],
        offset: &str,
    ) {
        let statuses = ["paid", "paid", "paid", "reserved", "cancelled", "no_show"];
        for e in 0..events {
            let day = first_day + chrono::Days::new(e % days.max(1));
            let id = 100_000 + e;
            self.add_event(json!({
                "id": id, "title": format!("Event {e}"),
                "start_at": format!("{day}T{:02}:00:00{offset}", 10 + e % 10),
                "end_at": format!("{day}T{:02}:00:00{offset}", 12 + e % 10),
                "location_name": venues[(e as usize) % venues.len().max(1)],
                "tags": if e % 3 == 0 { json!(["Golf"]) } else { json!([]) },
                "status": "active",
            }));
        }
        let mut i = self.inner.lock().unwrap();
        let events_list: Vec<(String, String)> = i
            .events
            .iter()
            .map(|e| {
                (
                    id_text(&e["id"]),
                    e["start_at"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        if events_list.is_empty() {
            return;
        }
        i.pages.clear();
        for b in 0..bookings {
            let (eid, start) = &events_list[(b as usize) % events_list.len()];
            let item = json!({
                "uuid": format!("u-{b}"), "ref_number": format!("TC-{b}"),
                "transaction_datestamp": "2026-01-02T10:11:12+00:00",
                "event_id": eid.parse::<u64>().map(Value::from).unwrap_or(json!(eid)),
                "event_name": "Generated", "event_start": start,
                "status": statuses[(b as usize) % statuses.len()], "quantity": 1 + b % 4,
                "price": 10_000 + (b % 50) * 100, "source": if b % 2 == 0 { "web" } else { "box_office" },
                "booking_type": "ticket",
                "buyer_first_name": format!("First{b}"), "buyer_last_name": format!("Last{b}"),
                "buyer_email": format!("buyer{b}@example.org"), "buyer_phone": format!("+47{:08}", b),
                "buyer_email_opt_in": b % 3 == 0, "checked_in_at": null,
            });
            i.items.entry(eid.clone()).or_default().push(item);
        }
    }

    pub fn router(&self) -> Router {
        let events = Router::new()
            .route("/events", get(events))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "ticketco.events"),
                faults::layer,
            ))
            .with_state(self.clone());
        let items = Router::new()
            .route("/item_grosses", get(item_grosses))
            .layer(axum::middleware::from_fn_with_state(
                (self.faults.clone(), "ticketco.items"),
                faults::layer,
            ))
            .with_state(self.clone());
        events.merge(items)
    }

    fn authorized(&self, token: &Option<String>) -> bool {
        let mut i = self.inner.lock().unwrap();
        if token.is_some() {
            i.tokens_seen += 1;
        }
        match &i.token {
            None => true,
            Some(t) => token.as_deref() == Some(t.as_str()),
        }
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "invalid token"})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    token: Option<String>,
    status: Option<String>,
    page: Option<usize>,
    start_from: Option<String>,
    start_to: Option<String>,
}

async fn events(State(tc): State<TicketCoFake>, Query(q): Query<EventsQuery>) -> Response {
    if !tc.authorized(&q.token) {
        return unauthorized();
    }
    let page = q.page.unwrap_or(1).max(1);
    let i = tc.inner.lock().unwrap();
    // Dates are the venue's local dates: the date part of `start_at` as written.
    fn date(e: &Value) -> &str {
        e["start_at"].as_str().unwrap_or("").get(..10).unwrap_or("")
    }
    let list: Vec<&Value> = i
        .events
        .iter()
        .filter(|e| q.status.as_deref().is_none_or(|s| e["status"] == s))
        .filter(|e| q.start_from.as_deref().is_none_or(|f| date(e) >= f))
        .filter(|e| q.start_to.as_deref().is_none_or(|t| date(e) <= t))
        .collect();
    let start = (page - 1) * EVENTS_PER_PAGE;
    let slice: Vec<&Value> = list
        .iter()
        .skip(start)
        .take(EVENTS_PER_PAGE)
        .copied()
        .collect();
    json_page("events", &slice)
}

#[derive(Deserialize)]
struct ItemsQuery {
    token: Option<String>,
    event_id: Option<String>,
    page: Option<usize>,
}

async fn item_grosses(State(tc): State<TicketCoFake>, Query(q): Query<ItemsQuery>) -> Response {
    if !tc.authorized(&q.token) {
        return unauthorized();
    }
    let page = q.page.unwrap_or(1).max(1);
    let mut i = tc.inner.lock().unwrap();
    let key = (q.event_id.clone().unwrap_or_default(), page);
    let body = match i.pages.get(&key) {
        Some(b) => b.clone(),
        None => {
            let list = q
                .event_id
                .as_ref()
                .and_then(|e| i.items.get(e))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let start = (page - 1) * ITEMS_PER_PAGE;
            let slice: Vec<&Value> = list.iter().skip(start).take(ITEMS_PER_PAGE).collect();
            let body = bytes::Bytes::from(json_page_bytes("item_grosses", &slice));
            i.pages.insert(key, body.clone());
            body
        }
    };
    drop(i);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `{"<key>": [...]}`, written straight from the stored values (no copy of them).
fn json_page(key: &str, items: &[&Value]) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json_page_bytes(key, items),
    )
        .into_response()
}

fn json_page_bytes(key: &str, items: &[&Value]) -> Vec<u8> {
    let mut body = Vec::with_capacity(512 * items.len() + 32);
    body.extend_from_slice(b"{");
    serde_json::to_writer(&mut body, key).expect("a key serializes");
    body.extend_from_slice(b":");
    serde_json::to_writer(&mut body, items).expect("JSON values serialize");
    body.extend_from_slice(b"}");
    body
}
