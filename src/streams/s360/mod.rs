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
use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::BadRecordPolicy;
use crate::connectors::feed::FeedSource;
use crate::connectors::s360::{S360Client, S360Error, id_text};
use crate::engine::{Flow, Page, RunCtx, RunError, record_id};
use crate::mapping::lookup;
use crate::store::{Counts, DeadLetter, LedgerRow, PageCommit};
use crate::streams::feed_webhook::options::{FeedOptions, WebhookOptions};
use crate::streams::feed_webhook::{deliver, webhook_target};
use options::{RelayOptions, S360ContactOptions, S360Entity, S360OfferOptions};

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

/// The next page of a CRM → S-360 run's feed, or how the run ends: `max_per_run` taken
/// (`left`: the run takes at most that many records, and the last page asks for only what is
/// left, so the cursor ends right after the last record handled), or asked to stop.
async fn next_page(
    ctx: &RunCtx,
    source: &FeedSource,
    cursor: &Option<String>,
    left: &mut u64,
    counts: &mut Counts,
) -> Result<ControlFlow<Flow, Page>, RunError> {
    if *left == 0 {
        return Ok(ControlFlow::Break(Flow::Done));
    }
    if ctx.should_stop() {
        return Ok(ControlFlow::Break(Flow::Stopped));
    }
    let want = (*left).min(u64::from(ctx.spec.page_size)) as u32;
    let page = source
        .pull(&ctx.spec.name, cursor.as_deref(), want, &ctx.cancel)
        .await?;
    counts.pulled += page.records.len() as u64;
    *left = left.saturating_sub(page.records.len() as u64);
    crate::engine::check_not_stuck(&ctx.spec.source, cursor, &page)?;
    Ok(ControlFlow::Continue(page))
}

/// A feed record's ID, or None when the run passes it by: without an ID it is a bad record
/// (dead letter, or the run stops, as the stream says); changed before `oldest`, skipped.
fn wanted(
    ctx: &RunCtx,
    feed: &FeedOptions,
    rec: &Value,
    counts: &mut Counts,
    dead: &mut Vec<DeadLetter>,
) -> Result<Option<String>, RunError> {
    let Some(id) = record_id(rec, &feed.id) else {
        bad_record(
            ctx,
            None,
            rec,
            format!("no id at `{}`", feed.id),
            counts,
            dead,
        )?;
        return Ok(None);
    };
    if let (Some(oldest), Some(changed)) =
        (ctx.spec.oldest, parse_time(lookup(rec, &feed.changed_at)))
        && changed < oldest
    {
        counts.skipped += 1;
        return Ok(None);
    }
    Ok(Some(id))
}

/// Commits what a page of a CRM → S-360 run learnt (links, ledger rows, dead letters) with
/// the cursor after it.
async fn commit(
    ctx: &RunCtx,
    cursor: &mut Option<String>,
    page: &Page,
    links: Vec<(String, String)>,
    ledger: Vec<LedgerRow>,
    dead: Vec<DeadLetter>,
    counts: &Counts,
) -> Result<(), RunError> {
    let next = page.next_cursor.clone().or_else(|| cursor.clone());
    ctx.store
        .commit_page(PageCommit {
            stream: ctx.spec.name.clone(),
            cursor: Some(next.clone()),
            links,
            ledger,
            dead_letters: dead,
            ..Default::default()
        })
        .await?;
    progress::page(&ctx.spec.name, counts);
    *cursor = next;
    Ok(())
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

// One file per kind; what they share (S-360 client, feed source, refusals, dead letters)
// stays here.
mod contacts;
mod offers;
// The three kinds' options, raw and validated (below `config`, which carries them).
pub mod options;
mod relay;
pub use contacts::*;
pub use offers::*;
pub use relay::*;

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

/// What S-360 said, without the record: its statusCode and statusDetail.
fn s360_reason(e: &S360Error) -> String {
    match e {
        S360Error::Status { code, detail, .. } => format!("{code}: {detail}"),
        other => other.to_string(),
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
