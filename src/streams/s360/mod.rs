//! The S-360 streams.
//!
//! - [`relay`]: S-360's webhooks, stored in `s360_inbox` by the receiver, → CRM webhook. The
//!   inbox position is the cursor; it moves with the outbox rows of the records it covers
//!   (one `commit_page`). Delivery is the feed → webhook stream's own ([`crate::streams::feed_webhook::deliver`]):
//!   refused payloads go again first, byte for byte; at most `max_per_run` records per
//!   execution, `max_per_payload` per POST. Orders not in a forwarded state are counted as
//!   skipped; records changed before `oldest` too. With the identity mapping a record goes
//!   out as the bytes S-360 sent (the stored text, joined into the payload's array), else as
//!   its mapped value.
//! - [`contacts`]: CRM change feed → `saveIndividualContactData`. Matching: the link, else
//!   the contact number in the CRM record, else `searchContact` by e-mail (one match: that
//!   contact; more: dead letter), else create. The link is stored either way, with the page.
//! - [`offers`]: CRM offer requests → one order each. Before an order is sent, the ledger
//!   row of the offer says `attempt` (committed); a run that finds `attempt` (a crash or a
//!   timeout before) asks `getOrderByExternalReference` before sending anything. Done offers
//!   are `done` in the ledger, with the order ID, in the page's commit.

use crate::progress;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{
    BadRecordPolicy, FeedOptions, RelayOptions, S360ContactOptions, S360Entity, S360OfferOptions,
    WebhookOptions,
};
use crate::connectors::feed::FeedSource;
use crate::connectors::s360::{S360Client, S360Error, id_text};
use crate::engine::{Flow, RunCtx, RunError, record_id};
use crate::mapping::lookup;
use crate::store::{Counts, DeadLetter, LedgerRow, PageCommit};
use crate::streams::feed_webhook::{deliver, webhook_target};

fn parse_time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v?.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// When an S-360 record last changed, for the oldest date.
pub fn s360_changed_at(entity: S360Entity, rec: &Value) -> Option<DateTime<Utc>> {
    match entity {
        S360Entity::Contacts => parse_time(rec.get("lastModificationDate"))
            .or_else(|| parse_time(rec.get("creationDate"))),
        S360Entity::Orders => parse_time(lookup(rec, "orderDetailsData.creationDateTime")),
    }
}

/// A mapping failure: dead letter or stop, as the stream says.
fn bad_record(
    ctx: &RunCtx,
    id: Option<String>,
    rec: &Value,
    reason: String,
    counts: &mut Counts,
    dead: &mut Vec<DeadLetter>,
) -> Result<(), RunError> {
    match ctx.spec.on_bad_record {
        BadRecordPolicy::DeadLetter => {
            tracing::warn!(stream = %ctx.spec.name, record = id.as_deref().unwrap_or("?"), reason = %reason, "record set aside in dead letters");
            counts.failed += 1;
            dead.push(DeadLetter {
                source_id: id,
                record: rec.to_string(),
                reason,
            });
            Ok(())
        }
        BadRecordPolicy::Stop => Err(RunError::BadRecord {
            id: id.unwrap_or_else(|| "without an id".into()),
            reason,
        }),
    }
}

/// Dead-letters a record S-360 refused (whatever the stream's policy: the record is the
/// problem, not the stream).
fn refused_record(
    ctx: &RunCtx,
    id: Option<String>,
    rec: &Value,
    reason: String,
    counts: &mut Counts,
    dead: &mut Vec<DeadLetter>,
) {
    tracing::warn!(stream = %ctx.spec.name, record = id.as_deref().unwrap_or("?"), reason = %reason, "S-360 refused the record; set aside in dead letters");
    counts.failed += 1;
    dead.push(DeadLetter {
        source_id: id,
        record: rec.to_string(),
        reason,
    });
}

pub async fn relay(
    ctx: &RunCtx,
    relay: &RelayOptions,
    webhook: &WebhookOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let target_conn = ctx.connection(&spec.target)?;
    let target = webhook_target(ctx, &target_conn, webhook, Some(&relay.institution));
    let budget = spec.max_per_run as u64;
    let mut sent = 0u64;
    match deliver(ctx, &target, budget, &mut sent, counts).await? {
        Flow::Done => {}
        other => return Ok(other),
    }
    let mut cursor: i64 = ctx
        .store
        .cursor(&spec.name)
        .await?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        if sent >= budget {
            return Ok(Flow::Done);
        }
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
        let want = (budget - sent).min(spec.page_size.max(spec.max_per_payload) as u64);
        let rows = ctx
            .store
            .inbox_after(&spec.name, cursor, want as u32)
            .await?;
        let Some(last) = rows.last().map(|r| r.id) else {
            return Ok(Flow::Done);
        };
        counts.pulled += rows.len() as u64;
        // Each forwarded record as JSON text: as received when the mapping changes nothing
        // (S-360's bytes reach the CRM unchanged: exact digits of a long ID, every decimal),
        // else the mapped value.
        let raw = spec.mapping.is_identity();
        let mut items: Vec<String> = Vec::with_capacity(rows.len());
        let mut dead = Vec::new();
        for row in rows {
            let rec: Value = match serde_json::from_str(&row.body) {
                Ok(v) => v,
                Err(e) => {
                    // The receiver stored valid JSON; a damaged row is set aside, not forwarded.
                    bad_record(
                        ctx,
                        Some(format!("inbox {}", row.id)),
                        &Value::String(row.body.clone()),
                        format!("stored record is not JSON: {e}"),
                        counts,
                        &mut dead,
                    )?;
                    continue;
                }
            };
            if relay.entity == S360Entity::Orders {
                let state = lookup(&rec, "orderDetailsData.orderState")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !relay.forward_states.iter().any(|s| s == state) {
                    counts.skipped += 1;
                    continue;
                }
            }
            if let (Some(oldest), Some(changed)) =
                (spec.oldest, s360_changed_at(relay.entity, &rec))
                && changed < oldest
            {
                counts.skipped += 1;
                continue;
            }
            if raw {
                items.push(row.body);
                continue;
            }
            match spec.mapping.apply(&rec) {
                Ok(v) => items.push(v.to_string()),
                Err(e) => bad_record(
                    ctx,
                    Some(row.record_id),
                    &rec,
                    e.to_string(),
                    counts,
                    &mut dead,
                )?,
            }
        }
        let outbox: Vec<(Vec<u8>, u64)> = items
            .chunks(spec.max_per_payload as usize)
            .map(|c| (json_array(c), c.len() as u64))
            .collect();
        counts.queued += items.len() as u64;
        ctx.store
            .commit_page(PageCommit {
                stream: spec.name.clone(),
                cursor: Some(Some(last.to_string())),
                outbox,
                dead_letters: dead,
                ..Default::default()
            })
            .await?;
        progress::page(&ctx.spec.name, counts);
        cursor = last;
        match deliver(ctx, &target, budget, &mut sent, counts).await? {
            Flow::Done => {}
            other => return Ok(other),
        }
    }
}

/// `[a,b,…]` from the JSON texts of its elements, as serde_json writes an array.
fn json_array(items: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item.as_bytes());
    }
    out.push(b']');
    out
}

fn client(ctx: &RunCtx) -> Result<S360Client, RunError> {
    let conn = ctx.connection(&ctx.spec.target)?;
    Ok(S360Client {
        endpoint: ctx.http.endpoint(&conn).with_recorder(ctx.recorder()),
    })
}

fn source(ctx: &RunCtx, feed: &FeedOptions) -> Result<FeedSource, RunError> {
    let conn = ctx.connection(&ctx.spec.source)?;
    Ok(FeedSource::new(
        ctx.http.endpoint(&conn),
        feed.clone(),
        &ctx.spec.entity,
    ))
}

/// A transport-level failure ends the run (the cursor stays before the page); a refusal by
/// S-360 is the record's problem.
fn fatal(e: S360Error) -> RunError {
    match e {
        S360Error::Http(h) => RunError::Target(h),
        other => RunError::Setup(other.to_string()),
    }
}

pub async fn contacts(
    ctx: &RunCtx,
    feed: &FeedOptions,
    opts: &S360ContactOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let source = source(ctx, feed)?;
    let s360 = client(ctx)?;
    let mut cursor = ctx.store.cursor(&spec.name).await?;
    // `max_per_run`: the run takes at most this many records from the feed; the last page
    // asks for only what is left, so the cursor ends right after the last record handled.
    let mut left = u64::from(spec.max_per_run);
    loop {
        if left == 0 {
            return Ok(Flow::Done);
        }
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
        let want = left.min(u64::from(spec.page_size)) as u32;
        let page = source
            .pull(&spec.name, cursor.as_deref(), want, &ctx.cancel)
            .await?;
        counts.pulled += page.records.len() as u64;
        left = left.saturating_sub(page.records.len() as u64);
        crate::engine::check_not_stuck(&spec.source, &cursor, &page)?;
        let ids: Vec<String> = page
            .records
            .iter()
            .filter_map(|r| record_id(r, &feed.id))
            .collect();
        let mut known: HashMap<String, String> = ctx
            .store
            .links(&spec.name, ids)
            .await?
            .into_iter()
            .collect();
        let mut links = Vec::new();
        let mut dead = Vec::new();
        let mut refusals = crate::engine::refusals::Refusals::default();
        for rec in &page.records {
            let Some(id) = record_id(rec, &feed.id) else {
                bad_record(
                    ctx,
                    None,
                    rec,
                    format!("no id at `{}`", feed.id),
                    counts,
                    &mut dead,
                )?;
                continue;
            };
            if let (Some(oldest), Some(changed)) =
                (spec.oldest, parse_time(lookup(rec, &feed.changed_at)))
                && changed < oldest
            {
                counts.skipped += 1;
                continue;
            }
            let mut body = match spec.mapping.apply(rec) {
                Ok(v) => v,
                Err(e) => {
                    bad_record(ctx, Some(id), rec, e.to_string(), counts, &mut dead)?;
                    continue;
                }
            };
            let email = lookup(&body, "individualContact.email")
                .and_then(Value::as_str)
                .map(|e| e.trim().to_lowercase())
                .filter(|e| !e.is_empty());
            let number = match known.get(&id) {
                Some(n) => Some(n.clone()),
                None => match id_text(lookup(rec, &opts.contact_number)) {
                    Some(n) => Some(n),
                    None => {
                        let Some(email) = email.clone() else {
                            bad_record(
                                ctx,
                                Some(id),
                                rec,
                                "no link, no S-360 contact number and no e-mail to match on".into(),
                                counts,
                                &mut dead,
                            )?;
                            continue;
                        };
                        match s360.search_contact(&email, &ctx.cancel).await {
                            Ok(found) if found.len() > 1 => {
                                refused_record(
                                    ctx,
                                    Some(id),
                                    rec,
                                    format!(
                                        "ambiguous: {} S-360 contacts have this e-mail ({})",
                                        found.len(),
                                        found.join(", ")
                                    ),
                                    counts,
                                    &mut dead,
                                );
                                continue;
                            }
                            Ok(found) => found.into_iter().next(),
                            Err(e @ S360Error::Status { .. }) => {
                                refusals.refused("search", &s360_reason(&e));
                                refused_record(
                                    ctx,
                                    Some(id),
                                    rec,
                                    e.to_string(),
                                    counts,
                                    &mut dead,
                                );
                                continue;
                            }
                            Err(e) => {
                                commit_partial(ctx, links, dead).await?;
                                return Err(fatal(e));
                            }
                        }
                    }
                },
            };
            if let Value::Object(m) = &mut body {
                m.insert(
                    "contactNumber".into(),
                    number.clone().map(Value::String).unwrap_or(Value::Null),
                );
            }
            let saved = match (&number, &email) {
                (None, Some(email)) => create_contact(ctx, &s360, &body, email).await?,
                _ => s360.save_contact(&body, &ctx.cancel).await,
            };
            let kind = if number.is_some() { "update" } else { "create" };
            match saved {
                Ok(n) => {
                    refusals.accepted(kind);
                    if number.is_some() {
                        counts.updated += 1;
                    } else {
                        counts.created += 1;
                    }
                    known.insert(id.clone(), n.clone());
                    links.push((id, n));
                }
                Err(e @ S360Error::Status { .. }) | Err(e @ S360Error::Malformed { .. }) => {
                    refusals.refused(kind, &s360_reason(&e));
                    refused_record(ctx, Some(id), rec, e.to_string(), counts, &mut dead);
                }
                Err(e) => {
                    commit_partial(ctx, links, dead).await?;
                    return Err(fatal(e));
                }
            }
        }
        // Every save of the page refused for one reason is the configuration, not the records.
        if let Some(msg) = refusals.message(
            "S-360",
            "contacts",
            crate::engine::refusals::KEPT_BEFORE_CURSOR,
        ) {
            commit_partial(ctx, links, dead).await?;
            return Err(RunError::Setup(msg));
        }
        let next = page.next_cursor.clone().or_else(|| cursor.clone());
        ctx.store
            .commit_page(PageCommit {
                stream: spec.name.clone(),
                cursor: Some(next.clone()),
                links,
                dead_letters: dead,
                ..Default::default()
            })
            .await?;
        progress::page(&ctx.spec.name, counts);
        cursor = next;
        if !page.has_more || page.records.is_empty() {
            return Ok(Flow::Done);
        }
    }
}

/// What S-360 said, without the record: its statusCode and statusDetail.
fn s360_reason(e: &S360Error) -> String {
    match e {
        S360Error::Status { code, detail, .. } => format!("{code}: {detail}"),
        other => other.to_string(),
    }
}

/// Creates a contact (`contactNumber` null), sent once; when the POST fails or its answer is
/// lost, S-360 may have made the contact: once no earlier POST can still land (its deadline
/// plus the settle margin), `searchContact` by the e-mail says; found, it is the contact; not
/// found, it is sent again, while the connection's retry policy allows. Never two contacts.
async fn create_contact(
    ctx: &RunCtx,
    s360: &S360Client,
    body: &Value,
    email: &str,
) -> Result<Result<String, S360Error>, RunError> {
    let mut tries = 0;
    loop {
        let e = match s360.save_contact(body, &ctx.cancel).await {
            Err(e) if e.outcome_unknown() && tries < s360.endpoint.max_retries() => e,
            other => return Ok(other),
        };
        tries += 1;
        tracing::warn!(stream = %ctx.spec.name, error = %e, "a contact create failed or its answer was lost; asking S-360 before sending it again");
        if !ctx.doubt.settle(ctx).await? {
            return Ok(Err(S360Error::Http(crate::http::HttpError::Cancelled {
                what: "POST saveIndividualContactData".into(),
            })));
        }
        match s360.search_contact(email, &ctx.cancel).await {
            Ok(found) if found.len() == 1 => {
                tracing::info!(stream = %ctx.spec.name, "the earlier attempt had made the contact; linked, not sent again");
                return Ok(Ok(found.into_iter().next().expect("one")));
            }
            Ok(found) if found.is_empty() => continue,
            Ok(found) => {
                return Ok(Err(S360Error::Status {
                    conn: s360.endpoint.name.clone(),
                    what: "POST searchContact".into(),
                    code: "AMBIGUOUS".into(),
                    detail: format!(
                        "{} S-360 contacts have this e-mail ({}) after a create whose answer was lost",
                        found.len(),
                        found.join(", ")
                    ),
                }));
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// Keeps what a failed page already learnt (links, dead letters) without moving the cursor:
/// the page is pulled again and matched through the links.
async fn commit_partial(
    ctx: &RunCtx,
    links: Vec<(String, String)>,
    dead: Vec<DeadLetter>,
) -> Result<(), RunError> {
    // Dead letters are not kept here: the page comes again and would set them aside twice.
    drop(dead);
    if links.is_empty() {
        return Ok(());
    }
    ctx.store
        .commit_page(PageCommit {
            stream: ctx.spec.name.clone(),
            cursor: None,
            links,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// The `createOrUpdateOrder` body of an offer request (vendor-apis "Details fixed").
pub fn order_body(offer: &Value, id: &str, point_of_sales_id: i64) -> Result<Value, String> {
    let kind = match offer.get("kind").and_then(Value::as_str) {
        Some("SALE") => "SALE",
        Some("RESERVATION") => "RESERVATION",
        Some(other) => return Err(format!("kind {other:?} is neither SALE nor RESERVATION")),
        None => return Err("no `kind` (SALE or RESERVATION)".into()),
    };
    let contact = id_text(offer.get("contact_number")).ok_or("no `contact_number`")?;
    let performance = offer
        .get("performance_id")
        .filter(|v| !v.is_null())
        .ok_or("no `performance_id`")?;
    let quantity = offer
        .get("quantity")
        .and_then(Value::as_u64)
        .filter(|q| *q > 0)
        .ok_or("no positive `quantity`")?;
    let mut op = json!({"performanceId": performance, "quantity": quantity});
    if let Some(t) = offer.get("tariff_id").filter(|v| !v.is_null()) {
        op["tariffId"] = t.clone();
    }
    Ok(json!({
        "pointOfSalesId": point_of_sales_id,
        "orderType": kind,
        "externalReference": id,
        "purchaserContactNumber": contact,
        "operations": [op],
    }))
}

const ATTEMPT: &str = "attempt";
const DONE: &str = "done";
/// Sends of one offer within one run, each after `getOrderByExternalReference` said "none".
const MAX_SENDS: u32 = 3;

pub async fn offers(
    ctx: &RunCtx,
    feed: &FeedOptions,
    opts: &S360OfferOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let source = source(ctx, feed)?;
    let s360 = client(ctx)?;
    let mut cursor = ctx.store.cursor(&spec.name).await?;
    // `max_per_run`: the run takes at most this many records from the feed; the last page
    // asks for only what is left, so the cursor ends right after the last record handled.
    let mut left = u64::from(spec.max_per_run);
    loop {
        if left == 0 {
            return Ok(Flow::Done);
        }
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
        let want = left.min(u64::from(spec.page_size)) as u32;
        let page = source
            .pull(&spec.name, cursor.as_deref(), want, &ctx.cancel)
            .await?;
        counts.pulled += page.records.len() as u64;
        left = left.saturating_sub(page.records.len() as u64);
        crate::engine::check_not_stuck(&spec.source, &cursor, &page)?;
        let mut ledger = Vec::new();
        let mut links = Vec::new();
        let mut dead = Vec::new();
        for rec in &page.records {
            let Some(id) = record_id(rec, &feed.id) else {
                bad_record(
                    ctx,
                    None,
                    rec,
                    format!("no id at `{}`", feed.id),
                    counts,
                    &mut dead,
                )?;
                continue;
            };
            if let (Some(oldest), Some(changed)) =
                (spec.oldest, parse_time(lookup(rec, &feed.changed_at)))
                && changed < oldest
            {
                counts.skipped += 1;
                continue;
            }
            let prior = ctx.store.ledger_entry(&spec.name, &id).await?;
            let prior_status = prior.as_ref().and_then(|p| p.0.clone());
            if prior_status.as_deref() == Some(DONE) {
                counts.skipped += 1;
                continue;
            }
            let body = if spec.mapping.is_passthrough() {
                order_body(rec, &id, opts.point_of_sales_id)
            } else {
                spec.mapping
                    .apply(rec)
                    .map_err(|e| e.to_string())
                    .map(|mut v| {
                        v["externalReference"] = Value::String(id.clone());
                        v
                    })
            };
            let body = match body {
                Ok(b) => b,
                Err(reason) => {
                    bad_record(ctx, Some(id), rec, reason, counts, &mut dead)?;
                    continue;
                }
            };
            let hash = hex::encode(Sha256::digest(body.to_string().as_bytes()));
            // An earlier attempt whose outcome is unknown, or an offer the ledger does not
            // know (a new offer, or a state started afresh or restored from a backup, which
            // re-reads offers already ordered): S-360 decides before anything is sent. One
            // more call per new offer; never a second order.
            let mut order = None;
            if prior_status.is_none() || prior_status.as_deref() == Some(ATTEMPT) {
                order = s360
                    .order_by_reference(&id, &ctx.cancel)
                    .await
                    .map_err(fatal)?;
                if order.is_some() {
                    tracing::info!(stream = %spec.name, offer = %id, "S-360 already has the order (an earlier attempt, or a state started afresh); recorded, not sent again");
                }
            }
            if order.is_none() {
                // Recorded before sending, so that after a crash the next run asks first.
                ctx.store
                    .commit_page(PageCommit {
                        stream: spec.name.clone(),
                        cursor: None,
                        ledger: vec![LedgerRow {
                            key: id.clone(),
                            content_hash: hash.clone(),
                            target_ids: None,
                            status: Some(ATTEMPT.into()),
                        }],
                        ..Default::default()
                    })
                    .await?;
                progress::page(&ctx.spec.name, counts);
                let mut sends = 0;
                loop {
                    sends += 1;
                    match s360.create_order(&body, &ctx.cancel).await {
                        Ok(o) => {
                            counts.created += 1;
                            order = Some(o);
                            break;
                        }
                        Err(e @ S360Error::Status { .. })
                        | Err(e @ S360Error::Malformed { .. }) => {
                            refused_record(
                                ctx,
                                Some(id.clone()),
                                rec,
                                e.to_string(),
                                counts,
                                &mut dead,
                            );
                            ledger.push(LedgerRow {
                                key: id.clone(),
                                content_hash: hash.clone(),
                                target_ids: None,
                                status: Some("refused".into()),
                            });
                            break;
                        }
                        Err(e) if e.outcome_unknown() => {
                            tracing::warn!(stream = %spec.name, offer = %id, error = %e, "order outcome unknown; asking S-360 before any retry");
                            // Not before the unanswered POST can no longer land.
                            if !ctx.doubt.settle(ctx).await? {
                                return Ok(Flow::Stopped);
                            }
                            match s360
                                .order_by_reference(&id, &ctx.cancel)
                                .await
                                .map_err(fatal)?
                            {
                                Some(o) => {
                                    counts.created += 1;
                                    order = Some(o);
                                    break;
                                }
                                None if sends < MAX_SENDS => continue,
                                None => return Err(fatal(e)),
                            }
                        }
                        Err(e) => return Err(fatal(e)),
                    }
                }
            } else {
                counts.updated += 1;
            }
            if let Some(o) = order {
                ledger.push(LedgerRow {
                    key: id.clone(),
                    content_hash: hash,
                    target_ids: Some(o.clone()),
                    status: Some(DONE.into()),
                });
                links.push((id, o));
            }
        }
        let next = page.next_cursor.clone().or_else(|| cursor.clone());
        ctx.store
            .commit_page(PageCommit {
                stream: spec.name.clone(),
                cursor: Some(next.clone()),
                links,
                ledger,
                dead_letters: dead,
                ..Default::default()
            })
            .await?;
        progress::page(&ctx.spec.name, counts);
        cursor = next;
        if !page.has_more || page.records.is_empty() {
            return Ok(Flow::Done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_becomes_an_order_body() {
        let offer = json!({"id":"OFF-9","kind":"RESERVATION","contact_number":"3346662","performance_id":7,"quantity":2,"tariff_id":3});
        let b = order_body(&offer, "OFF-9", 1).unwrap();
        assert_eq!(
            b,
            json!({"pointOfSalesId":1,"orderType":"RESERVATION","externalReference":"OFF-9",
                   "purchaserContactNumber":"3346662","operations":[{"performanceId":7,"quantity":2,"tariffId":3}]})
        );
        assert!(
            order_body(&json!({"kind":"OPTION"}), "x", 1)
                .unwrap_err()
                .contains("OPTION")
        );
    }

    #[test]
    fn oldest_date_fields() {
        let c = json!({"creationDate":"2026-01-01T00:00:00.000+00:00","lastModificationDate":"2026-05-01T10:00:00.000+00:00"});
        assert_eq!(
            s360_changed_at(S360Entity::Contacts, &c)
                .unwrap()
                .to_rfc3339(),
            "2026-05-01T10:00:00+00:00"
        );
        let c = json!({"creationDate":"2026-01-01T00:00:00.000+00:00"});
        assert_eq!(
            s360_changed_at(S360Entity::Contacts, &c)
                .unwrap()
                .to_rfc3339(),
            "2026-01-01T00:00:00+00:00"
        );
        let o = json!({"orderDetailsData":{"creationDateTime":"2026-05-01T10:09:27.503+00:00"}});
        assert!(s360_changed_at(S360Entity::Orders, &o).is_some());
    }
}
