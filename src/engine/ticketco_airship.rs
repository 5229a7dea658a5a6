//! The daily Ticket Co → Airship run (vendor-apis "Ticket Co", "Airship"; DESIGN "Ticket Co
//! bookings → Airship").
//!
//! One run: work out the window (attendance dates from yesterday through today +
//! `days_ahead`, "today" in the stream's timezone, read from `RunCtx::clock`; from
//! `backfill_from` on the first run, or from `--from` for `usher backfill`), resolve each
//! configured venue to an Airship unit, list the active events of those venues in the
//! window, then for each event read its booking lines page by page. Each page is one batch:
//!
//! - the ledger (per `ref_number`: hash of the booking last sent, Airship IDs) says new,
//!   known-and-changed, or unchanged ([`decide`], pure);
//! - **new** → `POST /contact` (contact, "Booking" group and tag groups on the venue's unit,
//!   the booking inside); **known and changed** → `POST /booking/update` only, never the
//!   contact; **unchanged** → nothing;
//! - a new booking with neither e-mail nor mobile goes to dead letters (once: its ledger
//!   row remembers it until the record changes);
//! - the batch's ledger rows and dead letters are committed together
//!   (`Store::commit_page`), so a crash re-sends at most one batch, and the re-send is an
//!   upsert in Airship (contact by e-mail/mobile, booking by reference): nothing twice.
//!
//! A booking Airship refuses (4xx), an event whose page is malformed, or a venue with no
//! unit never stops the others and is never written to the ledger: it is tried again next
//! run. The run then ends as `refused` with a summary. The cursor only marks that a first
//! run (and so `backfill_from`) is done.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use chrono_tz::Tz;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{Flow, RunCtx, RunError, SourceError};
use crate::config::TicketCoAirshipOptions;
use crate::connectors::airship::{Airship, WriteError, unit_for};
use crate::connectors::ticketco::{Event, TicketCo, text};
use crate::http::HttpError;
use crate::store::{Counts, DeadLetter, LedgerRow, PageCommit};

/// Writes to Airship in flight at once within a batch.
const CONCURRENT_WRITES: usize = 8;
/// Events whose booking pages are read ahead while earlier ones are written.
const PREFETCH_EVENTS: usize = 4;
/// Safety stop for a source that never ends its pages.
const MAX_PAGES: u32 = 100_000;

/// The attendance dates a run covers, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// Yesterday through today + `days_ahead`, "today" in `tz`; `backfill` moves the start back.
pub fn window(
    now: DateTime<chrono::Utc>,
    tz: Tz,
    days_ahead: u32,
    backfill: Option<NaiveDate>,
) -> Window {
    let today = now.with_timezone(&tz).date_naive();
    let yesterday = today.pred_opt().unwrap_or(today);
    let from = match backfill {
        Some(b) if b < yesterday => b,
        _ => yesterday,
    };
    Window {
        from,
        to: today + chrono::Days::new(days_ahead as u64),
    }
}

/// A vendor time as the venue's local "YYYY-MM-DD HH:MM:SS". A time without an offset is
/// taken as already local.
pub fn local_time(text: &str, tz: Tz) -> Option<String> {
    let t = text.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(wall(&d.with_timezone(&tz).naive_local()));
    }
    for f in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(t, f) {
            return Some(wall(&n));
        }
    }
    None
}

/// "YYYY-MM-DD HH:MM:SS" (written out directly: this runs for every booking of every run).
fn wall(t: &NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The local attendance date of an event start.
pub fn local_date(text: &str, tz: Tz) -> Option<NaiveDate> {
    local_time(text, tz).and_then(|s| NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").ok())
}

/// What one booking line needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Not in the ledger (or dead-lettered before and changed since): write contact + booking.
    New { contact: Value, hash: String },
    /// In the ledger and changed: update the booking only.
    Update {
        booking: Value,
        hash: String,
        ids: Value,
    },
    /// In the ledger and unchanged.
    Unchanged,
    /// A new booking that cannot be sent; `hash` remembers the record so it is set aside once.
    Dead { reason: String, hash: String },
    /// Dead-lettered before and unchanged.
    StillDead,
}

fn sha(v: &Value) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(v).expect("JSON values serialize"),
    ))
}

fn trimmed(item: &Value, key: &str) -> Option<String> {
    text(item, key)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The Airship booking for one Ticket Co line.
pub fn booking(item: &Value, event: &Event, unit: i64, o: &TicketCoAirshipOptions) -> Value {
    let tz = o.timezone;
    let mut b = Map::new();
    b.insert("booking_reference".into(), json!(text(item, "ref_number")));
    b.insert("unit_id".into(), json!(unit));
    if let Some(q) = item.get("quantity").and_then(Value::as_i64) {
        b.insert("party_size".into(), json!(q));
    }
    let start = text(item, "event_start").or_else(|| event.start_at.clone());
    if let Some(t) = start.and_then(|s| local_time(&s, tz)) {
        b.insert("party_datetime".into(), json!(t));
    }
    if let Some(t) = text(item, "transaction_datestamp").and_then(|s| local_time(&s, tz)) {
        b.insert("party_enquirytime".into(), json!(t));
    }
    if let Some(stage) = text(item, "status").and_then(|s| o.stages.get(s.trim()).copied()) {
        b.insert("stage_value".into(), json!(stage));
    }
    if let Some(id) = text(item, "source").and_then(|s| o.sources.get(s.trim()).copied()) {
        b.insert("source_id".into(), json!(id));
    }
    if let Some(id) = text(item, "booking_type").and_then(|s| o.types.get(s.trim()).copied()) {
        b.insert("type_id".into(), json!(id));
    }
    if let Some(p) = item.get("price").and_then(Value::as_i64) {
        let sign = if p < 0 { "-" } else { "" };
        let a = p.unsigned_abs();
        b.insert(
            "data".into(),
            json!({"element_01": format!("{sign}{}.{:02}", a / 100, a % 100)}),
        );
    }
    Value::Object(b)
}

/// The `POST /contact` body for a new booking: the contact, its groups on the venue's unit,
/// and the booking inside. `allow_email` is sent only as `true` (an opt-in), so a contact
/// who opted in elsewhere is never opted out; `allow_sms` is never sent.
pub fn contact(
    item: &Value,
    event: &Event,
    booking: &Value,
    unit: i64,
    account_id: i64,
    o: &TicketCoAirshipOptions,
) -> Value {
    let mut c = Map::new();
    c.insert("account_id".into(), json!(account_id));
    for (to, from) in [
        ("first_name", "buyer_first_name"),
        ("last_name", "buyer_last_name"),
        ("email", "buyer_email"),
        ("mobile_number", "buyer_phone"),
    ] {
        if let Some(v) = trimmed(item, from) {
            c.insert(to.into(), json!(v));
        }
    }
    if item.get("buyer_email_opt_in").and_then(Value::as_bool) == Some(true) {
        c.insert("allow_email".into(), json!(true));
    }
    c.insert("source_name".into(), json!(o.source_name));
    let mut groups = vec![json!({"name": o.booking_group})];
    for tag in &o.event_tags {
        if event.tags.iter().any(|t| t.trim() == tag.trim()) {
            let mut g = Map::new();
            g.insert("name".into(), json!(tag));
            if let Some(f) = &o.tag_folder {
                g.insert("folder_name".into(), json!(f));
            }
            groups.push(Value::Object(g));
        }
    }
    c.insert("units".into(), json!([{"id": unit, "groups": groups}]));
    c.insert("bookings".into(), json!([booking]));
    Value::Object(c)
}

/// New, known-and-changed, unchanged or unsendable: pure, from the line and its ledger row.
pub fn decide(
    item: &Value,
    event: &Event,
    unit: i64,
    account_id: i64,
    o: &TicketCoAirshipOptions,
    ledger: Option<&LedgerRow>,
) -> Action {
    let b = booking(item, event, unit, o);
    let hash = sha(&b);
    if let Some(row) = ledger
        && let Some(ids) = &row.target_ids
    {
        if row.content_hash == hash {
            return Action::Unchanged;
        }
        return Action::Update {
            booking: b,
            hash,
            ids: serde_json::from_str(ids).unwrap_or(Value::Null),
        };
    }
    let c = contact(item, event, &b, unit, account_id, o);
    if trimmed(item, "buyer_email").is_none() && trimmed(item, "buyer_phone").is_none() {
        let dead_hash = format!("dead:{}", sha(&c));
        if ledger.is_some_and(|r| r.content_hash == dead_hash) {
            return Action::StillDead;
        }
        return Action::Dead {
            reason: "the booking has neither an e-mail nor a mobile number (Airship needs one to find the contact)".into(),
            hash: dead_hash,
        };
    }
    Action::New { contact: c, hash }
}

/// `usher validate --online`: each configured venue of the stream and its Airship unit.
/// `Err` lines are problems (a venue with no unit, or the units cannot be listed).
pub async fn check_venues(
    http: &crate::http::Http,
    config: &crate::config::Config,
    spec: &crate::config::StreamSpec,
    o: &TicketCoAirshipOptions,
    cancel: &tokio_util::sync::CancellationToken,
) -> Vec<Result<String, String>> {
    let Some(conn) = config.connections.get(&spec.target) else {
        return vec![Err(format!(
            "stream {:?}: target {:?} is not configured",
            spec.name, spec.target
        ))];
    };
    let units = match Airship::new(http, conn).units(cancel).await {
        Ok(u) => u,
        Err(e) => {
            return vec![Err(format!(
                "stream {:?}: cannot list the Airship units: {e}",
                spec.name
            ))];
        }
    };
    o.venues
        .iter()
        .map(|v| match unit_for(v, o.unit_ids.get(v).copied(), &units) {
            Some(id) => Ok(format!("stream {:?}: venue {v:?} → Airship unit {id}", spec.name)),
            None => Err(format!(
                "stream {:?}: venue {v:?} has no Airship unit (no unit of that name in /account/units; set `unit_ids.\"{v}\"`)",
                spec.name
            )),
        })
        .collect()
}

/// The contact a `POST /contact` body is upserted as: e-mail (trimmed, lowercase), else
/// mobile digits.
fn contact_key(contact: &Value) -> Option<String> {
    if let Some(e) = contact["email"]
        .as_str()
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty())
    {
        return Some(format!("email:{e}"));
    }
    let m: String = contact["mobile_number"]
        .as_str()?
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    (!m.is_empty()).then(|| format!("mobile:{m}"))
}

/// Why some bookings were not sent this run (they are tried again next run).
#[derive(Default)]
struct Problems {
    lines: Vec<String>,
    refused: u64,
    /// A listing or an event page failed: the first run's backfill is not done.
    incomplete: bool,
}

impl Problems {
    fn add(&mut self, stream: &str, line: String) {
        tracing::warn!(stream, problem = %line, "not sent this run; tried again next run");
        if self.lines.len() < 20 {
            self.lines.push(line);
        }
    }
}

pub async fn run(
    ctx: &RunCtx,
    o: &TicketCoAirshipOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let name = spec.name.as_str();
    let tc = TicketCo::new(&ctx.http, &*ctx.connection(&spec.source)?);
    let air = Airship::new(&ctx.http, &*ctx.connection(&spec.target)?);
    let first_run = ctx.store.cursor(name).await?.is_none();
    let backfill = match &ctx.backfill {
        Some(b) => Some(b.from),
        None if first_run => o.backfill_from,
        None => None,
    };
    let now = ctx.clock.now();
    let w = window(now, o.timezone, o.days_ahead, backfill);
    tracing::info!(stream = name, from = %w.from, to = %w.to, first_run, "window");
    let mut problems = Problems::default();

    // Venues → units.
    let units = if o.venues.iter().all(|v| o.unit_ids.contains_key(v)) {
        Vec::new()
    } else {
        air.units(&ctx.cancel).await.map_err(RunError::Target)?
    };
    let mut venue_unit: HashMap<String, Option<i64>> = HashMap::new();
    for v in &o.venues {
        let u = unit_for(v, o.unit_ids.get(v).copied(), &units);
        if u.is_none() {
            problems.add(
                name,
                format!("venue {v:?} has no Airship unit (none of that name in /account/units, and no `unit_ids` entry)"),
            );
        }
        venue_unit.insert(v.trim().to_string(), u);
    }

    // The events of the window (asked a day wider on each side, then cut by local date).
    let pad = chrono::Days::new(1);
    let ask_from = (w.from - pad).format("%Y-%m-%d").to_string();
    let ask_to = (w.to + pad).format("%Y-%m-%d").to_string();
    let mut events = Vec::new();
    let mut page = 1;
    loop {
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
        match tc
            .events(page, Some(&ask_from), Some(&ask_to), &ctx.cancel)
            .await
        {
            Ok(list) if list.is_empty() => break,
            Ok(list) => events.extend(list.into_iter().filter(|e| {
                let venue_ok = e
                    .location_name
                    .as_deref()
                    .is_some_and(|l| venue_unit.contains_key(l.trim()));
                let date_ok = e
                    .start_at
                    .as_deref()
                    .and_then(|s| local_date(s, o.timezone))
                    .is_some_and(|d| d >= w.from && d <= w.to);
                venue_ok && date_ok
            })),
            Err(e) => {
                fatal_source(&e)?;
                problems.incomplete = true;
                problems.add(name, format!("the event list stopped at page {page}: {e}"));
                break;
            }
        }
        page += 1;
        if page > MAX_PAGES {
            break;
        }
    }
    if let Some(p) = ctx.backfill.as_ref().and_then(|b| b.progress.as_ref()) {
        p.set_length(events.len() as u64);
    }

    let mut unitless: HashMap<String, u64> = HashMap::new();
    let mut with_unit = Vec::with_capacity(events.len());
    for event in events {
        let venue = event.location_name.as_deref().unwrap_or_default().trim();
        match venue_unit.get(venue).copied().flatten() {
            Some(unit) => with_unit.push((event, unit)),
            None => {
                *unitless.entry(venue.to_string()).or_default() += 1;
                problems.incomplete = true;
            }
        }
    }
    // The next few events' pages are read while a batch is written (reads only: a run
    // stopped here has committed everything before it and loses nothing).
    let tc = &tc;
    let cancel = &ctx.cancel;
    let mut fetched =
        futures::stream::iter(with_unit.into_iter().map(|(event, unit)| async move {
            let mut pages = Vec::new();
            let mut page = 1;
            let err = loop {
                match tc.item_grosses(&event.id, page, cancel).await {
                    Ok(items) if items.is_empty() => break None,
                    Ok(items) => pages.push(items),
                    Err(e) => break Some(e),
                }
                page += 1;
                if page > MAX_PAGES {
                    break None;
                }
            };
            (event, unit, pages, err)
        }))
        .buffered(PREFETCH_EVENTS);
    while let Some((event, unit, pages, err)) = fetched.next().await {
        for items in pages {
            if ctx.should_stop() {
                return Ok(Flow::Stopped);
            }
            counts.pulled += items.len() as u64;
            batch(ctx, &air, o, &event, unit, items, counts, &mut problems).await?;
        }
        if let Some(e) = err {
            fatal_source(&e)?;
            problems.incomplete = true;
            problems.add(
                name,
                format!(
                    "event {} ({}): {e}",
                    event.id,
                    event.title.as_deref().unwrap_or("?")
                ),
            );
        }
        if let Some(p) = ctx.backfill.as_ref().and_then(|b| b.progress.as_ref()) {
            p.inc(1);
        }
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
    }
    for (venue, n) in unitless {
        problems.add(
            name,
            format!("{n} event(s) at venue {venue:?} not sent: the venue has no Airship unit"),
        );
    }

    if !problems.incomplete && (first_run || ctx.backfill.is_some()) {
        // The first run (with its backfill) is done; later runs cover yesterday onwards.
        ctx.store
            .commit_page(PageCommit {
                stream: name.to_string(),
                cursor: Some(Some(format!("first run done {}", now.format("%Y-%m-%d")))),
                ..Default::default()
            })
            .await?;
    }
    if problems.lines.is_empty() {
        Ok(Flow::Done)
    } else {
        let mut msg = String::new();
        if problems.refused > 0 {
            msg.push_str(&format!(
                "{} booking(s) refused by Airship; ",
                problems.refused
            ));
        }
        msg.push_str(&problems.lines.join("; "));
        msg.push_str(" (not marked as sent: tried again next run)");
        Ok(Flow::Refused(msg))
    }
}

/// Errors that end the run rather than one event: shutdown, refused credentials, and a
/// source that cannot be reached at all.
fn fatal_source(e: &SourceError) -> Result<(), RunError> {
    match e {
        SourceError::Http(
            HttpError::Cancelled { .. }
            | HttpError::CredentialsRefused { .. }
            | HttpError::Transport { .. }
            | HttpError::RateLimited { .. },
        ) => Err(RunError::Setup(e.to_string())),
        _ => Ok(()),
    }
}

/// One page of booking lines: decide, write, then commit the ledger rows and dead letters.
#[allow(clippy::too_many_arguments)] // the batch's whole context, passed once
async fn batch(
    ctx: &RunCtx,
    air: &Airship,
    o: &TicketCoAirshipOptions,
    event: &Event,
    unit: i64,
    items: Vec<Value>,
    counts: &mut Counts,
    problems: &mut Problems,
) -> Result<(), RunError> {
    let name = ctx.spec.name.as_str();
    let mut dead = Vec::new();
    let mut lines = Vec::new();
    for item in items {
        match text(&item, "ref_number")
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
        {
            Some(r) => lines.push((r, item)),
            None => {
                counts.failed += 1;
                dead.push(DeadLetter {
                    source_id: None,
                    record: item.to_string(),
                    reason: format!("booking line of event {} has no ref_number", event.id),
                });
            }
        }
    }
    let keys: Vec<String> = lines.iter().map(|(r, _)| r.clone()).collect();
    let known: HashMap<String, LedgerRow> = ctx
        .store
        .ledger_get(name, keys)
        .await?
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    let mut ledger = Vec::new();
    let mut writes = Vec::new();
    for (r, item) in &lines {
        match decide(item, event, unit, air.account_id, o, known.get(r)) {
            Action::Unchanged | Action::StillDead => counts.skipped += 1,
            Action::Dead { reason, hash } => {
                tracing::warn!(stream = name, booking = %r, reason = %reason, "booking set aside in dead letters");
                counts.failed += 1;
                dead.push(DeadLetter {
                    source_id: Some(r.clone()),
                    record: item.to_string(),
                    reason: reason.clone(),
                });
                ledger.push(LedgerRow {
                    key: r.clone(),
                    content_hash: hash,
                    target_ids: None,
                    status: Some("dead_letter".into()),
                });
            }
            action => writes.push((r.clone(), action)),
        }
    }
    // Writes for one contact (same e-mail, else same mobile) go one after another, so that
    // two new bookings of one buyer never race to create the contact twice; different
    // contacts' writes run side by side.
    let mut groups: Vec<Vec<(String, Action)>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for (r, action) in writes {
        let key = match &action {
            Action::New { contact, .. } => {
                contact_key(contact).unwrap_or_else(|| format!("ref:{r}"))
            }
            _ => format!("ref:{r}"),
        };
        match group_of.get(&key) {
            Some(g) => groups[*g].push((r, action)),
            None => {
                group_of.insert(key, groups.len());
                groups.push(vec![(r, action)]);
            }
        }
    }
    let results: Vec<(String, Action, Result<String, WriteError>)> =
        futures::stream::iter(groups.into_iter().map(|group| async move {
            let mut out = Vec::with_capacity(group.len());
            for (r, action) in group {
                let res = match &action {
                    Action::New { contact, .. } => air.write_contact(contact, &ctx.cancel).await,
                    Action::Update { booking, .. } => {
                        air.update_booking(booking, &ctx.cancel).await
                    }
                    _ => unreachable!("only writes are queued"),
                };
                out.push((r, action, res));
            }
            out
        }))
        .buffer_unordered(CONCURRENT_WRITES)
        .flat_map(futures::stream::iter)
        .collect()
        .await;
    let mut fatal = None;
    for (r, action, res) in results {
        match (action, res) {
            (Action::New { hash, .. }, Ok(id)) => {
                counts.created += 1;
                ledger.push(LedgerRow {
                    key: r,
                    content_hash: hash,
                    target_ids: Some(json!({"contact_id": id}).to_string()),
                    status: Some("sent".into()),
                });
            }
            (Action::Update { hash, mut ids, .. }, Ok(id)) => {
                counts.updated += 1;
                if let Some(m) = ids.as_object_mut() {
                    m.insert("booking_id".into(), json!(id));
                } else {
                    ids = json!({"booking_id": id});
                }
                ledger.push(LedgerRow {
                    key: r,
                    content_hash: hash,
                    target_ids: Some(ids.to_string()),
                    status: Some("updated".into()),
                });
            }
            (
                _,
                Err(WriteError::Refused {
                    what,
                    status,
                    reason,
                    ..
                }),
            ) => {
                problems.refused += 1;
                problems.add(
                    name,
                    format!("booking {r}: {what}: HTTP {status}: {reason}"),
                );
            }
            (_, Err(WriteError::Http(e))) => {
                if fatal.is_none() {
                    fatal = Some(e);
                }
            }
            (_, Ok(_)) => {}
        }
    }
    // What was written is recorded even when the run ends here.
    if !ledger.is_empty() || !dead.is_empty() {
        ctx.store
            .commit_page(PageCommit {
                stream: name.to_string(),
                cursor: None,
                ledger,
                dead_letters: dead,
                ..Default::default()
            })
            .await?;
    }
    match fatal {
        Some(e) => Err(RunError::Target(e)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn opts() -> TicketCoAirshipOptions {
        TicketCoAirshipOptions {
            timezone: "Europe/Oslo".parse().unwrap(),
            days_ahead: 30,
            venues: vec!["Oslo Golf".into()],
            unit_ids: BTreeMap::new(),
            stages: [("paid".to_string(), 1), ("cancelled".to_string(), 550)]
                .into_iter()
                .collect(),
            sources: [("web".to_string(), 3)].into_iter().collect(),
            types: [("ticket".to_string(), 5)].into_iter().collect(),
            event_tags: vec!["Golf".into()],
            tag_folder: Some("Activities".into()),
            booking_group: "Booking".into(),
            backfill_from: None,
            source_name: "Ticket Co".into(),
        }
    }

    fn event() -> Event {
        Event {
            id: "1".into(),
            title: None,
            start_at: Some("2026-06-01T16:00:00+02:00".into()),
            location_name: Some("Oslo Golf".into()),
            tags: vec!["Golf".into(), "Kids".into()],
        }
    }

    fn item() -> Value {
        json!({"ref_number":"TC-1","transaction_datestamp":"2026-05-02T14:01:42+00:00",
            "event_start":"2026-06-01T14:00:00Z","status":"paid","quantity":2,"price":45000,
            "source":"web","booking_type":"ticket","buyer_first_name":" Ada ","buyer_last_name":"Example",
            "buyer_email":"ada@example.org","buyer_phone":"+4712345678","buyer_email_opt_in":true})
    }

    #[test]
    fn the_window_is_yesterday_to_thirty_days_ahead_in_local_time() {
        let tz: Tz = "Europe/Oslo".parse().unwrap();
        // 23:30 UTC on 31 May is already 1 June in Oslo.
        let now = DateTime::parse_from_rfc3339("2026-05-31T23:30:00Z")
            .unwrap()
            .to_utc();
        let w = window(now, tz, 30, None);
        assert_eq!(w.from, NaiveDate::from_ymd_opt(2026, 5, 31).unwrap());
        assert_eq!(w.to, NaiveDate::from_ymd_opt(2026, 7, 1).unwrap());
        let b = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
        assert_eq!(window(now, tz, 30, Some(b)).from, b);
    }

    #[test]
    fn booking_fields_are_in_venue_local_time() {
        let b = booking(&item(), &event(), 7, &opts());
        assert_eq!(b["party_datetime"], "2026-06-01 16:00:00");
        assert_eq!(b["party_enquirytime"], "2026-05-02 16:01:42");
        assert_eq!(b["stage_value"], 1);
        assert_eq!(b["source_id"], 3);
        assert_eq!(b["type_id"], 5);
        assert_eq!(b["party_size"], 2);
        assert_eq!(b["data"]["element_01"], "450.00");
        assert_eq!(b["unit_id"], 7);
    }

    #[test]
    fn new_known_changed_and_unchanged() {
        let o = opts();
        let Action::New { contact, hash } = decide(&item(), &event(), 7, 11, &o, None) else {
            panic!("a booking not in the ledger is new");
        };
        assert_eq!(contact["first_name"], "Ada");
        assert_eq!(contact["allow_email"], true);
        assert!(contact.get("allow_sms").is_none());
        assert_eq!(
            contact["units"][0]["groups"],
            json!([{"name":"Booking"},{"name":"Golf","folder_name":"Activities"}])
        );
        let row = LedgerRow {
            key: "TC-1".into(),
            content_hash: hash,
            target_ids: Some("{\"contact_id\":\"5\"}".into()),
            status: None,
        };
        assert_eq!(
            decide(&item(), &event(), 7, 11, &o, Some(&row)),
            Action::Unchanged
        );
        let mut cancelled = item();
        cancelled["status"] = json!("cancelled");
        cancelled["buyer_email_opt_in"] = json!(false);
        match decide(&cancelled, &event(), 7, 11, &o, Some(&row)) {
            Action::Update { booking, .. } => {
                assert_eq!(booking["stage_value"], 550);
                assert!(booking.get("email").is_none() && booking.get("allow_email").is_none());
            }
            other => panic!("a changed known booking is an update: {other:?}"),
        }
    }

    #[test]
    fn no_email_and_no_mobile_is_set_aside_once() {
        let mut i = item();
        i["buyer_email"] = json!("  ");
        i["buyer_phone"] = Value::Null;
        let Action::Dead { hash, .. } = decide(&i, &event(), 7, 11, &opts(), None) else {
            panic!("dead letter expected");
        };
        let row = LedgerRow {
            key: "TC-1".into(),
            content_hash: hash,
            target_ids: None,
            status: Some("dead_letter".into()),
        };
        assert_eq!(
            decide(&i, &event(), 7, 11, &opts(), Some(&row)),
            Action::StillDead
        );
        i["buyer_phone"] = json!("+47 1234");
        assert!(matches!(
            decide(&i, &event(), 7, 11, &opts(), Some(&row)),
            Action::New { .. }
        ));
    }
}
