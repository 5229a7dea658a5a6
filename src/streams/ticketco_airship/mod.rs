//! The daily Ticket Co → Airship run (vendor-apis "Ticket Co", "Airship"; DESIGN "Ticket Co
//! bookings → Airship").
//!
//! One run: work out the window (attendance dates from yesterday through today +
//! `days_ahead`, "today" in the stream's timezone, read from `RunCtx::clock`; from
//! `backfill_from` on the first run, or from `--from` for `usher backfill`), resolve each
//! configured venue to an Airship unit, list the active events of those venues in the
//! window, then read each event's booking lines page by page (a few events ahead, while
//! earlier ones are written).
//!
//! An event whose pages are byte for byte those of an earlier run that settled every one
//! of its lines is skipped whole ([`event_digest`]: the pages, the event, its unit, the
//! stream's options and usher's version; `page_digests`, forgotten on a cursor reset).
//! Ticket Co has no "changed since" filter, so this is what keeps a day with few changes
//! cheap: the pages are still read, but not their lines. The other events' lines are
//! decided in batches of about [`BATCH_LINES`], lines of several events together:
//!
//! - the ledger (per `ref_number`: hash of the booking last sent, Airship IDs) says new,
//!   known-and-changed, or unchanged ([`decide`], pure);
//! - **new** → `POST /contact` (contact, "Booking" group and tag groups on the venue's unit,
//!   the booking inside); **known and changed** → `POST /booking/update` only, never the
//!   contact; **unchanged** → nothing;
//! - a new booking with neither e-mail nor mobile goes to dead letters (once: its ledger
//!   row remembers it until the record changes);
//! - the batch's ledger rows, dead letters, owed records and the digests of the events it
//!   settled are committed together (`Store::commit_page`), so a crash re-sends at most one
//!   batch, and the re-send is an upsert in Airship (contact by e-mail/mobile, booking by
//!   reference): nothing twice.
//!
//! **What is not settled stays owed** (`owed` table, `engine::owed`), whatever the window
//! of later runs: a booking Airship refuses (4xx: `booking:<ref>`), an event whose pages
//! could not be read whole or whose venue has no unit (`event:<id>`), each with its event's
//! JSON, and the window itself until the run has listed it and put every event through
//! (`window`, written as the run starts, so a crash leaves it owed). None of them stops
//! the others or is written to the ledger. Every run reads the events of its window plus
//! the events of what is owed (once each, whatever their dates; never skipped by their
//! digest), from the owed window's start if that is earlier; a booking is no longer owed
//! once it is in the ledger (sent, updated, unchanged) or in dead letters, an event once
//! its lines all are. A run that ends with anything owed is `refused`. The cursor only
//! marks that a first run (and so `backfill_from`) is done, and is written only when
//! nothing is owed.

// The kind's options, raw and validated (below `config`, which carries them).
pub mod options;

use crate::progress;
use std::collections::HashMap;

use chrono::NaiveDate;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::connectors::airship::{Airship, WriteError, unit_for};
use crate::connectors::ticketco::{Event, Line, LinePage, RawLines, TicketCo};
use crate::engine::owed::OwedBook;
use crate::engine::{Flow, RunCtx, RunError, SourceError};
use crate::http::HttpError;
use crate::store::{Counts, DeadLetter, LedgerRow, Owed, PageCommit, PageDigest};
use options::TicketCoAirshipOptions;

/// Writes to Airship in flight at once within a batch.
const CONCURRENT_WRITES: usize = 8;
/// Events whose booking pages are read ahead while earlier ones are written.
const PREFETCH_EVENTS: usize = 8;
/// Booking lines decided (and looked up in the ledger) together; a crash re-sends at most
/// one batch's writes, which Airship upserts.
const BATCH_LINES: usize = 500;
/// Safety stop for a source that never ends its pages.
const MAX_PAGES: u32 = 100_000;

// The pure part (window, local times, the booking and contact sent, the decision per
// line): `decide.rs`.
mod decide;
pub use decide::*;

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
    let mut out: Vec<Result<String, String>> = o
        .venues
        .iter()
        .map(|v| match unit_for(v, o.unit_ids.get(v).copied(), &units) {
            // An explicit unit ID must be one of the account's units too.
            Some(id) if o.unit_ids.contains_key(v) && !units.iter().any(|u| u.id == id) => {
                Err(format!(
                    "stream {:?}: `airship.unit_ids.\"{v}\"` = {id} is not a unit of this Airship account (its units: {})",
                    spec.name,
                    units
                        .iter()
                        .map(|u| format!("{} {:?}", u.id, u.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Some(id) => Ok(format!("stream {:?}: venue {v:?} → Airship unit {id}", spec.name)),
            None => Err(format!(
                "stream {:?}: venue {v:?} has no Airship unit (no unit of that name in /account/units; set `unit_ids.\"{v}\"`)",
                spec.name
            )),
        })
        .collect();
    // Groups (and their folder) are made by Airship on a unit when a contact first names
    // them (vendor-apis: `POST /contact`): there is nothing to check before, say so.
    let mut groups = vec![o.booking_group.clone()];
    groups.extend(o.event_tags.iter().cloned());
    out.push(Ok(format!(
        "stream {:?}: groups {} are created on each unit by Airship when first used{}",
        spec.name,
        groups
            .iter()
            .map(|g| format!("{g:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        o.tag_folder
            .as_deref()
            .map(|f| format!(" (tag groups in folder {f:?})"))
            .unwrap_or_default()
    )));
    out
}

/// The contact a `POST /contact` body is upserted as: e-mail (trimmed, lowercase), else
/// mobile digits.
fn contact_key(contact: &Contact) -> Option<String> {
    if let Some(e) = contact
        .email
        .as_deref()
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty())
    {
        return Some(format!("email:{e}"));
    }
    let m: String = contact
        .mobile_number
        .as_deref()?
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    (!m.is_empty()).then(|| format!("mobile:{m}"))
}

/// Why some bookings were not sent this run (they stay owed and are tried again).
#[derive(Default)]
struct Problems {
    lines: Vec<String>,
    refused: u64,
}

impl Problems {
    fn add(&mut self, stream: &str, line: String) {
        tracing::warn!(stream, problem = %line, "not sent this run; owed, tried again next run");
        if self.lines.len() < 20 {
            self.lines.push(line);
        }
    }
}

/// The key of an owed booking (one Airship refused): its `ref_number`.
fn booking_key(reference: &str) -> String {
    format!("booking:{reference}")
}

/// The key of an owed event: its lines could not be read whole, or its venue has no unit.
fn event_key(event_id: &str) -> String {
    format!("event:{event_id}")
}

/// The key of the owed window: written when a run starts, removed when it has listed
/// every event of its window and put each through (settled, or owed itself). A run that
/// fails, is stopped or killed before then leaves it, and the next run reads the window
/// again from its start, so that the days that run covered alone (yesterday's
/// cancellations and no-shows) are not skipped.
const WINDOW_KEY: &str = "window";

/// An owed event (or the event of an owed booking): the event's JSON is the record, so a
/// later run reads its lines again by `item_grosses?event_id=`, whatever its date.
fn owed_event(key: String, event: &Event, reason: String) -> Owed {
    Owed {
        key,
        scope: Some(event.id.clone()),
        record: event.to_json(),
        reason,
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
    let mut air = Airship::new(&ctx.http, &*ctx.connection(&spec.target)?);
    air.endpoint = air.endpoint.with_recorder(ctx.recorder());
    let first_run = ctx.store.cursor(name).await?.is_none();
    let backfill = match &ctx.backfill {
        Some(b) => Some(b.from),
        None if first_run => o.backfill_from,
        None => None,
    };
    let now = ctx.clock.now();
    let mut w = window(now, o.timezone, o.days_ahead, backfill);
    let mut problems = Problems::default();

    // What earlier runs still owe: the events of owed bookings and owed events are read
    // again whatever their dates; the window of a run that did not finish is read again.
    let owed_rows = ctx.store.owed(name).await?;
    let mut book = OwedBook::new(&owed_rows);
    let mut owed_events: Vec<Event> = Vec::new();
    // Event ID → the references of its owed bookings.
    let mut owed_bookings: HashMap<String, Vec<String>> = HashMap::new();
    for row in &owed_rows {
        if row.key == WINDOW_KEY {
            if let Some(from) = serde_json::from_str::<Value>(&row.record)
                .ok()
                .and_then(|v| v["from"].as_str().map(str::to_string))
                .and_then(|d| NaiveDate::parse_from_str(&d, "%Y-%m-%d").ok())
                && from < w.from
            {
                w.from = from;
            }
            continue;
        }
        let Some(event) = Event::from_json(&row.record) else {
            problems.add(
                name,
                format!(
                    "owed record {} cannot be read again (its stored event is not usable): {}",
                    row.key, row.reason
                ),
            );
            continue;
        };
        if let Some(r) = row.key.strip_prefix("booking:") {
            owed_bookings
                .entry(event.id.clone())
                .or_default()
                .push(r.to_string());
        }
        if !owed_events.iter().any(|e| e.id == event.id) {
            owed_events.push(event);
        }
    }
    let owed_scopes: std::collections::HashSet<String> =
        owed_events.iter().map(|e| e.id.clone()).collect();
    tracing::info!(stream = name, from = %w.from, to = %w.to, first_run, owed = owed_rows.len(), "window");
    // Owed until this run has read it to its end (committed before anything is read).
    book.owe(Owed {
        key: WINDOW_KEY.into(),
        scope: None,
        record: json!({"from": w.from.to_string(), "to": w.to.to_string()}).to_string(),
        reason: format!(
            "the run started {} has not read the window {} to {} to its end (it is still running, or it failed, was stopped or killed); the next run reads it again",
            now.format("%Y-%m-%d %H:%M UTC"),
            w.from,
            w.to
        ),
    });
    let mut start = PageCommit {
        stream: name.to_string(),
        ..Default::default()
    };
    book.commit_into(&mut start);
    ctx.store.commit_page(start).await?;
    progress::page(&ctx.spec.name, counts);

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
    let mut listed_whole = true;
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
                listed_whole = false;
                problems.add(name, format!("the event list stopped at page {page}: {e}"));
                break;
            }
        }
        page += 1;
        if page > MAX_PAGES {
            break;
        }
    }
    // Plus the events of what is owed, whatever their dates (once each).
    for event in owed_events {
        if events.iter().any(|e: &Event| e.id == event.id) {
            continue;
        }
        let venue = event.location_name.as_deref().unwrap_or_default().trim();
        if !venue_unit.contains_key(venue) {
            // The stream no longer sends this venue: nothing of it is owed any more.
            tracing::info!(stream = name, event = %event.id, venue, "owed event of a venue no longer configured; no longer owed");
            book.settle(&event_key(&event.id));
            for r in owed_bookings.get(&event.id).into_iter().flatten() {
                book.settle(&booking_key(r));
            }
            continue;
        }
        events.push(event);
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
                book.owe(owed_event(
                    event_key(&event.id),
                    &event,
                    format!("event {}: venue {venue:?} has no Airship unit", event.id),
                ));
            }
        }
    }
    // The next few events' pages are read while a batch is written (reads only: a run
    // stopped here has committed everything before it and loses nothing). Lines of several
    // events make one batch, so that a run where little changed looks its bookings up in
    // the ledger a few hundred at a time.
    let tc = &tc;
    let cancel = &ctx.cancel;
    let with_unit = &with_unit;
    let mut fetched = futures::stream::iter((0..with_unit.len()).map(|ix| {
        let event_id = with_unit[ix].0.id.as_str();
        async move {
            let mut pages = Vec::new();
            let mut page = 1;
            let err = loop {
                match tc.item_grosses(event_id, page, cancel).await {
                    Ok(lines) if lines.is_empty() => break None,
                    Ok(lines) => pages.push(lines),
                    Err(e) => break Some(e),
                }
                page += 1;
                if page > MAX_PAGES {
                    break None;
                }
            };
            (ix, pages, err)
        }
    }))
    .buffered(PREFETCH_EVENTS);
    // The pages are read by one future and handed over a channel to the other, which
    // decides and writes: both make progress while the other waits on the network or
    // the database.
    let (tx, rx) = tokio::sync::mpsc::channel(PREFETCH_EVENTS);
    let reader = async move {
        while let Some(fetched) = fetched.next().await {
            if tx.send(fetched).await.is_err() {
                break; // the writer stopped
            }
        }
    };
    // Events whose pages are byte for byte those of a run that settled every booking in
    // them (and nothing else that shapes what is sent changed) are skipped whole, unless
    // something of them is owed.
    let scopes: Vec<String> = with_unit.iter().map(|(e, _)| event_scope(e)).collect();
    let stored = ctx.store.page_digests(name, scopes.clone()).await?;
    let base = digest_base(o, air.account_id);
    let problems_ref = &mut problems;
    let book_ref = &mut book;
    let writer = async move {
        let mut rx = rx;
        let problems = problems_ref;
        let book = book_ref;
        let mut settling = Settling::default();
        let mut pending: Vec<Pending> = Vec::new();
        while let Some((ix, pages, err)) = rx.recv().await {
            let (event, unit) = &with_unit[ix];
            let records: u64 = pages.iter().map(|p| p.len() as u64).sum();
            // Only an event read to its last page can be skipped or remembered.
            let digest = err
                .is_none()
                .then(|| event_digest(&base, event, *unit, &pages));
            if let Some(d) = &digest
                && !owed_scopes.contains(&event.id)
                && stored
                    .get(&scopes[ix])
                    .is_some_and(|s| s.digest == *d && s.records == records)
            {
                counts.pulled += records;
                counts.skipped += records;
            } else {
                if let Some(d) = digest
                    && records > 0
                {
                    settling.expect(ix, scopes[ix].clone(), d, records);
                }
                // The references of the event's lines, when some of its bookings are owed.
                let mut seen: Option<std::collections::HashSet<String>> =
                    owed_bookings.contains_key(&event.id).then(Default::default);
                let mut read_whole = err.is_none();
                for page in pages {
                    counts.pulled += page.len() as u64;
                    match page.lines() {
                        Ok((lines, raw)) => {
                            if let Some(seen) = &mut seen {
                                seen.extend(lines.iter().filter_map(|l| {
                                    l.ref_number
                                        .as_deref()
                                        .map(str::trim)
                                        .filter(|r| !r.is_empty())
                                        .map(str::to_string)
                                }));
                            }
                            pending.extend(lines.into_iter().enumerate().map(|(i, line)| Pending {
                                event: ix,
                                line,
                                raw: (raw.clone(), i),
                            }))
                        }
                        Err(reason) => {
                            settling.forget(ix);
                            read_whole = false;
                            let line = format!("event {}: {reason}", event.id);
                            problems.add(name, line.clone());
                            book.owe(owed_event(event_key(&event.id), event, line));
                        }
                    }
                    if pending.len() >= BATCH_LINES {
                        if ctx.should_stop() {
                            return Ok(Some(Flow::Stopped));
                        }
                        let items = std::mem::take(&mut pending);
                        batch(
                            ctx,
                            &air,
                            o,
                            with_unit,
                            items,
                            counts,
                            problems,
                            &mut settling,
                            book,
                        )
                        .await?;
                    }
                }
                if read_whole {
                    // Owed bookings the event no longer has: Ticket Co has nothing to send.
                    if let Some(seen) = seen {
                        for r in &owed_bookings[&event.id] {
                            if !seen.contains(r) {
                                tracing::info!(stream = name, booking = %r, event = %event.id, "owed booking no longer among its event's lines in Ticket Co; no longer owed");
                                book.settle(&booking_key(r));
                            }
                        }
                    }
                    if records == 0 {
                        book.settle(&event_key(&event.id));
                    }
                }
            }
            if let Some(e) = err {
                fatal_source(&e)?;
                let line = format!(
                    "event {} ({}): {e}",
                    event.id,
                    event.title.as_deref().unwrap_or("?")
                );
                problems.add(name, line.clone());
                book.owe(owed_event(event_key(&event.id), event, line));
            }
            if let Some(p) = ctx.backfill.as_ref().and_then(|b| b.progress.as_ref()) {
                p.inc(1);
            }
            if ctx.should_stop() {
                return Ok(Some(Flow::Stopped));
            }
        }
        if !pending.is_empty() {
            batch(
                ctx,
                &air,
                o,
                with_unit,
                pending,
                counts,
                problems,
                &mut settling,
                book,
            )
            .await?;
        }
        Ok::<_, RunError>(None)
    };
    let ((), written) = tokio::join!(reader, writer);
    if let Some(flow) = written? {
        return Ok(flow);
    }
    for (venue, n) in unitless {
        problems.add(
            name,
            format!("{n} event(s) at venue {venue:?} not sent: the venue has no Airship unit"),
        );
    }

    // Every event of the window went through (settled, or owed itself): the window is no
    // longer owed. The first run (with its backfill) is done only when nothing is owed.
    if listed_whole {
        book.settle(WINDOW_KEY);
    }
    let mut end = PageCommit {
        stream: name.to_string(),
        ..Default::default()
    };
    if book.is_empty() && (first_run || ctx.backfill.is_some()) {
        // Later runs cover yesterday onwards.
        end.cursor = Some(Some(format!("first run done {}", now.format("%Y-%m-%d"))));
    }
    book.commit_into(&mut end);
    if end.cursor.is_some() || !end.owed.is_empty() || !end.settled.is_empty() {
        ctx.store.commit_page(end).await?;
    }
    if problems.lines.is_empty() && book.is_empty() {
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
        if !book.is_empty() {
            if !problems.lines.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&format!(
                "{} record(s) owed (see `usher status`): not marked as sent, tried again at every run until Airship accepts them",
                book.len()
            ));
        }
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

/// The scope of an event's digest in `page_digests`.
fn event_scope(e: &Event) -> String {
    format!("ticketco-event:{}", e.id)
}

/// The part of every event digest of a run that is not the event: this version of usher
/// (which decides how a line becomes a booking), the stream's options and the account.
fn digest_base(o: &TicketCoAirshipOptions, account_id: i64) -> Sha256 {
    let mut h = Sha256::new();
    h.update(b"usher ticketco-airship event digest\n");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(format!("\n{o:?}\naccount {account_id}\n").as_bytes());
    h
}

/// What an event's bookings are made of: the event, its unit and its pages as they came.
fn event_digest(base: &Sha256, event: &Event, unit: i64, pages: &[LinePage]) -> String {
    let mut h = base.clone();
    h.update(format!("{event:?}\nunit {unit}\n").as_bytes());
    for p in pages {
        h.update((p.body().len() as u64).to_le_bytes());
        h.update(p.body());
    }
    hex::encode(h.finalize())
}

/// Events read whole whose lines are on their way through batches: once every line of
/// one is settled (in the ledger or in dead letters, none refused), its digest is
/// committed with the batch that settled the last one.
#[derive(Default)]
struct Settling {
    events: HashMap<usize, Track>,
}

struct Track {
    scope: String,
    digest: String,
    records: u64,
    remaining: u64,
    ok: bool,
}

impl Settling {
    fn expect(&mut self, event: usize, scope: String, digest: String, records: u64) {
        self.events.insert(
            event,
            Track {
                scope,
                digest,
                records,
                remaining: records,
                ok: true,
            },
        );
    }

    fn forget(&mut self, event: usize) {
        self.events.remove(&event);
    }

    /// `n` lines of `event` went through a batch (`ok`: all settled); the digest to commit
    /// when that was the event's last.
    fn settled(&mut self, event: usize, n: u64, ok: bool) -> Option<PageDigest> {
        let t = self.events.get_mut(&event)?;
        t.remaining = t.remaining.saturating_sub(n);
        t.ok &= ok;
        if t.remaining > 0 {
            return None;
        }
        let t = self.events.remove(&event)?;
        t.ok.then_some(PageDigest {
            scope: t.scope,
            digest: t.digest,
            records: t.records,
        })
    }
}

/// A booking line waiting for its batch.
struct Pending {
    /// Index into the run's events (with their units).
    event: usize,
    line: Line,
    /// The page it came from and its place there (for a dead letter's record).
    raw: (RawLines, usize),
}

/// One batch of booking lines (of one or more events): decide, write, then commit the
/// ledger rows and dead letters.
#[allow(clippy::too_many_arguments)] // the batch's whole context, passed once
async fn batch(
    ctx: &RunCtx,
    air: &Airship,
    o: &TicketCoAirshipOptions,
    events: &[(Event, i64)],
    items: Vec<Pending>,
    counts: &mut Counts,
    problems: &mut Problems,
    settling: &mut Settling,
    book: &mut OwedBook,
) -> Result<(), RunError> {
    let name = ctx.spec.name.as_str();
    let mut dead = Vec::new();
    let mut lines = Vec::with_capacity(items.len());
    // Per event: lines in this batch, and whether all of them were settled.
    let mut per_event: HashMap<usize, (u64, bool)> = HashMap::new();
    for item in &items {
        per_event.entry(item.event).or_insert((0, true)).0 += 1;
    }
    for item in items {
        match item
            .line
            .ref_number
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            Some(r) => lines.push((r.to_string(), item)),
            None => {
                counts.failed += 1;
                dead.push(DeadLetter {
                    source_id: None,
                    record: item.raw.0.raw(item.raw.1),
                    reason: format!(
                        "booking line of event {} has no ref_number",
                        events[item.event].0.id
                    ),
                });
            }
        }
    }
    // In key order: neighbouring ledger rows share the database's pages.
    let mut keys: Vec<String> = lines.iter().map(|(r, _)| r.clone()).collect();
    keys.sort_unstable();
    keys.dedup();
    let known: HashMap<String, LedgerRow> = ctx
        .store
        .ledger_get(name, keys)
        .await?
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    let mut ledger = Vec::new();
    let mut writes = Vec::new();
    let mut starts = LocalTimes::default();
    for (r, item) in &lines {
        let (event, unit) = &events[item.event];
        match decide(
            &item.line,
            event,
            *unit,
            air.account_id,
            o,
            known.get(r),
            &mut starts,
        ) {
            Action::Unchanged | Action::StillDead => {
                counts.skipped += 1;
                book.settle(&booking_key(r));
            }
            Action::Dead { reason, hash } => {
                book.settle(&booking_key(r));
                tracing::warn!(stream = name, booking = %r, reason = %reason, "booking set aside in dead letters");
                counts.failed += 1;
                dead.push(DeadLetter {
                    source_id: Some(r.clone()),
                    record: item.raw.0.raw(item.raw.1),
                    reason: reason.clone(),
                });
                ledger.push(LedgerRow {
                    key: r.clone(),
                    content_hash: hash,
                    target_ids: None,
                    status: Some("dead_letter".into()),
                });
            }
            action => writes.push((r.clone(), item.event, action)),
        }
    }
    // Writes for one contact (same e-mail, else same mobile) go one after another, so that
    // two new bookings of one buyer never race to create the contact twice; different
    // contacts' writes run side by side.
    let mut groups: Vec<Vec<(String, usize, Action)>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for (r, ev, action) in writes {
        let key = match &action {
            Action::New { contact, .. } => {
                contact_key(contact).unwrap_or_else(|| format!("ref:{r}"))
            }
            _ => format!("ref:{r}"),
        };
        match group_of.get(&key) {
            Some(g) => groups[*g].push((r, ev, action)),
            None => {
                group_of.insert(key, groups.len());
                groups.push(vec![(r, ev, action)]);
            }
        }
    }
    let results: Vec<(String, usize, Action, Result<String, WriteError>)> =
        futures::stream::iter(groups.into_iter().map(|group| async move {
            let mut out = Vec::with_capacity(group.len());
            for (r, ev, action) in group {
                let res = match &action {
                    Action::New { contact, .. } => air.write_contact(contact, &ctx.cancel).await,
                    Action::Update { booking, .. } => {
                        air.update_booking(booking, &ctx.cancel).await
                    }
                    _ => unreachable!("only writes are queued"),
                };
                out.push((r, ev, action, res));
            }
            out
        }))
        .buffer_unordered(CONCURRENT_WRITES)
        .flat_map(futures::stream::iter)
        .collect()
        .await;
    let mut fatal = None;
    let mut refusals = crate::engine::refusals::Refusals::default();
    for (r, ev, action, res) in results {
        if res.is_err()
            && let Some(e) = per_event.get_mut(&ev)
        {
            e.1 = false;
        }
        let kind = match &action {
            Action::New { .. } => "new booking",
            _ => "booking update",
        };
        match &res {
            Ok(_) => refusals.accepted(kind),
            Err(WriteError::Refused { status, reason, .. }) => {
                refusals.refused(kind, &format!("HTTP {status}: {reason}"))
            }
            Err(_) => {}
        }
        match (action, res) {
            (Action::New { hash, .. }, Ok(id)) => {
                counts.created += 1;
                book.settle(&booking_key(&r));
                ledger.push(LedgerRow {
                    key: r,
                    content_hash: hash,
                    target_ids: Some(json!({"contact_id": id}).to_string()),
                    status: Some("sent".into()),
                });
            }
            (Action::Update { hash, mut ids, .. }, Ok(id)) => {
                counts.updated += 1;
                book.settle(&booking_key(&r));
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
                let line = format!("booking {r}: {what}: HTTP {status}: {reason}");
                problems.add(name, line.clone());
                book.owe(owed_event(booking_key(&r), &events[ev].0, line));
            }
            (_, Err(WriteError::Http(e))) => {
                if fatal.is_none() {
                    fatal = Some(e);
                }
            }
            (_, Ok(_)) => {}
        }
    }
    let digests: Vec<PageDigest> = if fatal.is_some() {
        Vec::new()
    } else {
        per_event
            .into_iter()
            .filter_map(|(ev, (n, ok))| {
                // The event's last lines, all settled: the event itself is no longer owed.
                let d = settling.settled(ev, n, ok)?;
                book.settle(&event_key(&events[ev].0.id));
                Some(d)
            })
            .collect()
    };
    // What was written (and what is owed) is recorded even when the run ends here.
    if !ledger.is_empty() || !dead.is_empty() || !digests.is_empty() || book.has_changes() {
        let mut commit = PageCommit {
            stream: name.to_string(),
            cursor: None,
            ledger,
            dead_letters: dead,
            digests,
            ..Default::default()
        };
        book.commit_into(&mut commit);
        ctx.store.commit_page(commit).await?;
        progress::page(&ctx.spec.name, counts);
    }
    match fatal {
        Some(e) => Err(RunError::Target(e)),
        // Every booking of the batch refused for one reason (a unit, a source or type ID
        // Airship does not have): the configuration, not the bookings. They stay owed; the
        // run stops here with the reason instead of refusing the rest one by one.
        None => match refusals.message(
            "Airship",
            "bookings",
            "they stay owed and are sent again by the next run",
        ) {
            Some(msg) => Err(RunError::Setup(msg)),
            None => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, NaiveDateTime};
    use chrono_tz::Tz;
    use serde::Serialize;
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

    fn line(v: &Value) -> Line {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// A JSON object whose keys keep the order they were inserted in, as `serde_json::Map`
    /// did when usher first wrote ledgers (the `preserve_order` feature).
    #[derive(Default)]
    struct Map(Vec<(String, Box<serde_json::value::RawValue>)>);

    impl Map {
        fn new() -> Self {
            Map::default()
        }
        fn insert(&mut self, k: String, v: impl Serialize) {
            let raw = serde_json::value::to_raw_value(&v).unwrap();
            self.0.push((k, raw));
        }
    }

    impl Serialize for Map {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }

    /// The booking as the first version of usher built it (a JSON object, field by field):
    /// its hash is what ledgers written then hold.
    fn booking_as_first_written(item: &Value, unit: i64, o: &TicketCoAirshipOptions) -> Map {
        let tz = o.timezone;
        let text = |k: &str| crate::connectors::ticketco::text(item, k);
        let mut b = Map::new();
        b.insert("booking_reference".into(), json!(text("ref_number")));
        b.insert("unit_id".into(), json!(unit));
        if let Some(q) = item.get("quantity").and_then(Value::as_i64) {
            b.insert("party_size".into(), json!(q));
        }
        if let Some(t) = text("event_start").and_then(|s| local_time(&s, tz)) {
            b.insert("party_datetime".into(), json!(t));
        }
        if let Some(t) = text("transaction_datestamp").and_then(|s| local_time(&s, tz)) {
            b.insert("party_enquirytime".into(), json!(t));
        }
        for (key, table, field) in [
            ("status", &o.stages, "stage_value"),
            ("source", &o.sources, "source_id"),
            ("booking_type", &o.types, "type_id"),
        ] {
            if let Some(v) = text(key).and_then(|s| table.get(s.trim()).copied()) {
                b.insert(field.into(), json!(v));
            }
        }
        if let Some(p) = item.get("price").and_then(Value::as_i64) {
            let sign = if p < 0 { "-" } else { "" };
            let a = p.unsigned_abs();
            b.insert(
                "data".into(),
                json!({"element_01": format!("{sign}{}.{:02}", a / 100, a % 100)}),
            );
        }
        b
    }

    /// The contact of a new booking as the first version of usher built it (hashed for a
    /// dead-lettered booking).
    fn contact_as_first_written(item: &Value, unit: i64, o: &TicketCoAirshipOptions) -> Map {
        let mut c = Map::new();
        c.insert("account_id".into(), json!(11));
        for (to, from) in [
            ("first_name", "buyer_first_name"),
            ("last_name", "buyer_last_name"),
            ("email", "buyer_email"),
            ("mobile_number", "buyer_phone"),
        ] {
            if let Some(v) = crate::connectors::ticketco::text(item, from)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
            {
                c.insert(to.into(), json!(v));
            }
        }
        if item.get("buyer_email_opt_in").and_then(Value::as_bool) == Some(true) {
            c.insert("allow_email".into(), json!(true));
        }
        c.insert("source_name".into(), json!(o.source_name));
        let mut first = Map::new();
        first.insert("name".into(), json!(o.booking_group));
        let mut groups = vec![first];
        for tag in &o.event_tags {
            if event().tags.iter().any(|t| t.trim() == tag.trim()) {
                let mut g = Map::new();
                g.insert("name".into(), json!(tag));
                if let Some(f) = &o.tag_folder {
                    g.insert("folder_name".into(), json!(f));
                }
                groups.push(g);
            }
        }
        let mut u = Map::new();
        u.insert("id".into(), json!(unit));
        u.insert("groups".into(), &groups);
        c.insert("units".into(), [u]);
        c.insert("bookings".into(), [booking_as_first_written(item, unit, o)]);
        c
    }

    #[test]
    fn ledger_hashes_match_those_written_before_the_typed_booking() {
        let o = opts();
        let mut partial = item();
        for k in ["quantity", "source", "price"] {
            partial.as_object_mut().unwrap().remove(k);
        }
        partial["status"] = json!("no_show");
        partial["ref_number"] = json!(88123);
        let mut negative = item();
        negative["price"] = json!(-1205);
        negative["ref_number"] = json!("TC-\"Zoë\" \u{1F600}/\\\n");
        for v in [item(), partial, negative] {
            let typed = booking(&line(&v), &event(), 7, &o, &mut LocalTimes::default());
            assert_eq!(
                sha(&typed),
                sha(&booking_as_first_written(&v, 7, &o)),
                "{v}"
            );
            let c = contact(&line(&v), &event(), &typed, 7, 11, &o);
            assert_eq!(
                serde_json::to_vec(&c).unwrap(),
                serde_json::to_vec(&contact_as_first_written(&v, 7, &o)).unwrap(),
                "{v}"
            );
        }
    }

    #[test]
    fn lines_read_fields_leniently_as_before() {
        let l = line(&json!({"ref_number": 12, "quantity": "2", "price": 1.5,
            "status": ["paid"], "buyer_email": null, "buyer_email_opt_in": "yes",
            "buyer_phone": 4712345678u64, "extra": {"nested": [1, 2]}, "source": "web"}));
        assert_eq!(l.ref_number.as_deref(), Some("12"));
        assert_eq!(l.quantity, None);
        assert_eq!(l.price, None);
        assert_eq!(l.status, None);
        assert_eq!(l.buyer_email, None);
        assert!(!l.buyer_email_opt_in);
        assert_eq!(l.buyer_phone.as_deref(), Some("4712345678"));
        assert_eq!(l.source.as_deref(), Some("web"));
        // An element that is not an object is a line without fields, not a bad page.
        let page = crate::connectors::ticketco::LinePage::parse(bytes::Bytes::from_static(
            br#"{"item_grosses": [3, {"ref_number": "A"}, "x"], "more": 1}"#,
        ))
        .unwrap();
        assert_eq!(page.len(), 3);
        let (lines, raw) = page.lines().unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], Line::default());
        assert_eq!(lines[1].ref_number.as_deref(), Some("A"));
        assert_eq!(raw.raw(1), r#"{"ref_number": "A"}"#);
        assert_eq!(raw.raw(2), r#""x""#);
        for bad in [
            &b"[]"[..],
            br#"{"item_grosses": {}}"#,
            br#"{"other": []}"#,
            b"{",
        ] {
            assert!(
                crate::connectors::ticketco::LinePage::parse(bytes::Bytes::from_static(bad))
                    .is_err()
            );
        }
    }

    #[test]
    fn wall_times_are_written_as_chrono_would() {
        for t in [
            "2026-06-01T16:00:00",
            "0999-01-02T03:04:05",
            "9999-12-31T23:59:59",
        ] {
            let n = NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S").unwrap();
            assert_eq!(wall(&n), n.format("%Y-%m-%d %H:%M:%S").to_string());
        }
        let tz: Tz = "Europe/Oslo".parse().unwrap();
        let mut memo = LocalTimes::default();
        for _ in 0..2 {
            assert_eq!(
                memo.get("2026-06-01T14:00:00Z", tz).as_deref(),
                Some("2026-06-01 16:00:00")
            );
            assert_eq!(memo.get("not a time", tz), None);
        }
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
        let b = serde_json::to_value(booking(
            &line(&item()),
            &event(),
            7,
            &opts(),
            &mut LocalTimes::default(),
        ))
        .unwrap();
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
        let Action::New { contact, hash } = decide(
            &line(&item()),
            &event(),
            7,
            11,
            &o,
            None,
            &mut LocalTimes::default(),
        ) else {
            panic!("a booking not in the ledger is new");
        };
        let contact = serde_json::to_value(&contact).unwrap();
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
            decide(
                &line(&item()),
                &event(),
                7,
                11,
                &o,
                Some(&row),
                &mut LocalTimes::default()
            ),
            Action::Unchanged
        );
        let mut cancelled = item();
        cancelled["status"] = json!("cancelled");
        cancelled["buyer_email_opt_in"] = json!(false);
        match decide(
            &line(&cancelled),
            &event(),
            7,
            11,
            &o,
            Some(&row),
            &mut LocalTimes::default(),
        ) {
            Action::Update { booking, .. } => {
                let booking = serde_json::to_value(booking).unwrap();
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
        let Action::Dead { hash, .. } = decide(
            &line(&i),
            &event(),
            7,
            11,
            &opts(),
            None,
            &mut LocalTimes::default(),
        ) else {
            panic!("dead letter expected");
        };
        let row = LedgerRow {
            key: "TC-1".into(),
            content_hash: hash,
            target_ids: None,
            status: Some("dead_letter".into()),
        };
        assert_eq!(
            decide(
                &line(&i),
                &event(),
                7,
                11,
                &opts(),
                Some(&row),
                &mut LocalTimes::default()
            ),
            Action::StillDead
        );
        i["buyer_phone"] = json!("+47 1234");
        assert!(matches!(
            decide(
                &line(&i),
                &event(),
                7,
                11,
                &opts(),
                Some(&row),
                &mut LocalTimes::default()
            ),
            Action::New { .. }
        ));
    }
}
