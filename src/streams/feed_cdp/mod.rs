//! Contacts → CM.com CDP events. A contact source gives pages of records; each record is
//! mapped (the mapping's target fields are the event type's field labels), wrapped as an
//! event of the stream's event type, cut into POSTs of at most `max_per_payload` (≤ 100)
//! events, and stored in the outbox **in the same transaction as the new cursor**; the
//! outbox is then delivered in order, as in `feed_webhook`.
//!
//! A 400/401/403 from the CDP is a configuration error: the payload stays first in the
//! outbox, the stream is **paused** (recorded in the state, shown by `status`), and the
//! scheduled runs that follow make no call until a reload (`systemctl reload usher`) or a
//! `usher trigger` lifts the pause.
//!
//! The source is pluggable: [`ContactSource`] is implemented here for the generic CRM feed;
//! another contact source (SeatGeek users, S-360 contacts, Ticket Co customers) implements it
//! and calls [`run_with`].

// The kind's options, raw and validated (below `config`, which carries them).
pub mod options;

use std::future::Future;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::connectors::cdp::{CdpDelivery, CdpTarget};
use crate::connectors::feed::FeedSource;
use crate::engine::{
    EmptyPages, Flow, Page, RunCtx, RunError, SourceError, commit_queued, record_id,
};
use crate::mapping::lookup;
use crate::store::Counts;
use crate::streams::feed_cdp::options::CdpOptions;
use crate::streams::feed_webhook::options::FeedOptions;

/// Pages of contact records, oldest change first, with an opaque cursor.
pub trait ContactSource: Sync {
    /// The page after `cursor` (None: from the start).
    fn pull(
        &self,
        cursor: Option<&str>,
        limit: u32,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send;
    /// The record's own ID, for dead letters and logs.
    fn record_id(&self, rec: &Value) -> Option<String>;
    /// When the record last changed, for the stream's `oldest` and the lag metric.
    fn changed_at(&self, rec: &Value) -> Option<DateTime<Utc>>;
}

/// The generic CRM change feed as a contact source.
pub struct CrmContacts {
    pub feed: FeedSource,
    pub options: FeedOptions,
    /// The stream's name, for the "reset the cursor" error.
    pub stream: String,
}

impl ContactSource for CrmContacts {
    fn pull(
        &self,
        cursor: Option<&str>,
        limit: u32,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send {
        self.feed.pull(&self.stream, cursor, limit, cancel)
    }

    fn record_id(&self, rec: &Value) -> Option<String> {
        record_id(rec, &self.options.id)
    }

    fn changed_at(&self, rec: &Value) -> Option<DateTime<Utc>> {
        let s = lookup(rec, &self.options.changed_at)?.as_str()?;
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// The CRM feed → CDP stream.
pub async fn run(
    ctx: &RunCtx,
    trigger: &str,
    feed: &FeedOptions,
    cdp: &CdpOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let source_conn = ctx.connection(&ctx.spec.source)?;
    let source = CrmContacts {
        feed: FeedSource::new(
            ctx.http.endpoint(&source_conn),
            feed.clone(),
            &ctx.spec.entity,
        ),
        options: feed.clone(),
        stream: ctx.spec.name.clone(),
    };
    run_with(ctx, trigger, &source, cdp, counts).await
}

/// Any contact source → CDP.
pub async fn run_with<S: ContactSource>(
    ctx: &RunCtx,
    trigger: &str,
    source: &S,
    cdp: &CdpOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let target_conn = ctx.connection(&spec.target)?;
    let account = ctx
        .config
        .settings
        .cdp
        .get(&target_conn.name)
        .ok_or_else(|| {
            RunError::Setup(format!(
                "connection {:?} has no CDP account",
                target_conn.name
            ))
        })?;
    let mut target = CdpTarget::new(&ctx.http, &target_conn, account);
    target.endpoint = target.endpoint.with_recorder(ctx.recorder());

    if let Some(p) = ctx.store.stream_pause(&spec.name).await? {
        if trigger == "schedule" {
            return Ok(Flow::Refused(format!(
                "paused since {}: {}; fix the configuration, then reload (systemctl reload usher) or run `usher trigger {}`",
                p.paused_at, p.reason, spec.name
            )));
        }
        tracing::info!(stream = %spec.name, trigger, "pause lifted by the trigger; trying the CDP again");
        ctx.store.lift_pauses(Some(&spec.name)).await?;
    }

    let budget = spec.max_per_run as u64;
    let mut sent = 0u64;
    match deliver(ctx, &target, budget, &mut sent, counts).await? {
        Flow::Done => {}
        other => return Ok(other),
    }

    let mut cursor = ctx.store.cursor(&spec.name).await?;
    let mut empty_pages = EmptyPages::default();
    loop {
        if sent >= budget {
            return Ok(Flow::Done);
        }
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
        let page = source
            .pull(cursor.as_deref(), spec.page_size, &ctx.cancel)
            .await?;
        counts.pulled += page.records.len() as u64;
        crate::engine::check_not_stuck(&spec.source, &cursor, &page)?;
        let mut events = Vec::with_capacity(page.records.len());
        let mut dead = Vec::new();
        for rec in &page.records {
            let id = source.record_id(rec);
            let changed = source.changed_at(rec);
            if let Some(v) = crate::engine::map_record(spec, rec, id, changed, counts, &mut dead)? {
                events.push(v);
            }
        }
        let outbox: Vec<(Vec<u8>, u64)> = events
            .chunks(spec.max_per_payload as usize)
            .map(|chunk| {
                (
                    CdpTarget::events(&cdp.event_type_id, chunk),
                    chunk.len() as u64,
                )
            })
            .collect();
        counts.queued += events.len() as u64;
        commit_queued(ctx, &mut cursor, page.next_cursor.clone(), outbox, dead).await?;
        crate::progress::page(&ctx.spec.name, counts);
        match deliver(ctx, &target, budget, &mut sent, counts).await? {
            Flow::Done => {}
            other => return Ok(other),
        }
        if !page.has_more || empty_pages.end_run(&spec.name, page.records.is_empty()) {
            return Ok(Flow::Done);
        }
    }
}

/// Sends waiting POSTs in order until the outbox is empty, the budget is spent, one is
/// refused, or a configuration error pauses the stream.
async fn deliver(
    ctx: &RunCtx,
    target: &CdpTarget,
    budget: u64,
    sent: &mut u64,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let name = &ctx.spec.name;
    loop {
        let rows = ctx
            .store
            .outbox_pending(name, budget.saturating_sub(*sent), *sent == 0)
            .await?;
        if rows.is_empty() {
            return Ok(Flow::Done);
        }
        for row in rows {
            if ctx.should_stop() {
                return Ok(Flow::Stopped);
            }
            match target
                .send(&row.body, &ctx.cancel)
                .await
                .map_err(RunError::Target)?
            {
                CdpDelivery::Accepted => {
                    ctx.store.outbox_delivered(row.id).await?;
                    *sent += row.records;
                    counts.created += row.records;
                }
                CdpDelivery::ConfigError { status, reason } => {
                    tracing::error!(stream = %name, payload = row.id, status, reason = %reason,
                        "configuration error at the CDP: stream paused until a reload or a trigger");
                    ctx.store
                        .outbox_refused(row.id, Some(status), reason.clone())
                        .await?;
                    ctx.store.pause_stream(name, &reason).await?;
                    return Ok(Flow::Refused(format!(
                        "paused: {reason}; fix the configuration, then reload (systemctl reload usher) or run `usher trigger {name}`"
                    )));
                }
                CdpDelivery::Refused { status, reason } => {
                    tracing::warn!(stream = %name, payload = row.id, records = row.records, reason = %reason,
                        "CDP refused the events; they are sent again first at the next execution");
                    ctx.store
                        .outbox_refused(row.id, status, reason.clone())
                        .await?;
                    return Ok(Flow::Refused(format!(
                        "payload {} ({} records) refused: {reason}",
                        row.id, row.records
                    )));
                }
            }
        }
    }
}
