//! The feed → webhook stream: pull a page of the feed, map it, cut it into payloads of at
//! most `max_per_payload` records, store them in the outbox **in the same transaction as the
//! new cursor**, then deliver the outbox in order. A refused payload ends the execution and
//! is sent again, unchanged and first, at the next one. At most `max_per_run` records are
//! delivered per execution; the outbox is drained before the feed is read further, so it
//! never holds more than about a page.

// The kind's options, raw and validated (below `config`, which carries them).
pub mod options;

use crate::progress;
use chrono::{DateTime, Utc};

use crate::connectors::feed::FeedSource;
use crate::connectors::webhook::{Delivery, WebhookTarget};
use crate::engine::{EmptyPages, Flow, RunCtx, RunError, commit_queued, record_id};
use crate::mapping::lookup;
use crate::store::{Counts, PageCommit};
use options::{FeedOptions, WebhookOptions, expand};

pub async fn run(
    ctx: &RunCtx,
    feed: &FeedOptions,
    webhook: &WebhookOptions,
    counts: &mut Counts,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let source_conn = ctx.connection(&spec.source)?;
    let target_conn = ctx.connection(&spec.target)?;
    let source = FeedSource::new(ctx.http.endpoint(&source_conn), feed.clone(), &spec.entity);
    let target = webhook_target(ctx, &target_conn, webhook, spec.institution.as_deref());
    let budget = spec.max_per_run as u64;
    let mut sent = 0u64;

    // What earlier executions left waiting goes first.
    match deliver(ctx, &target, budget, &mut sent, counts).await? {
        Flow::Done => {}
        other => return Ok(other),
    }

    // Dead letters an operator asked to try again (`usher dead-letters retry`), mapped anew.
    let retries = ctx.store.dead_letters_to_retry(&spec.name).await?;
    if !retries.is_empty() {
        let mut items = Vec::new();
        let mut commit = PageCommit {
            stream: spec.name.clone(),
            ..Default::default()
        };
        for (id, text) in retries {
            let mapped = serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| e.to_string())
                .and_then(|rec| spec.mapping.apply(&rec).map_err(|e| e.to_string()));
            match mapped {
                Ok(v) => {
                    items.push(v);
                    commit.resolved_dead_letters.push(id);
                }
                Err(reason) => commit.failed_again.push((id, reason)),
            }
        }
        tracing::info!(stream = %spec.name, resolved = items.len(), failed_again = commit.failed_again.len(), "dead letters tried again");
        counts.queued += items.len() as u64;
        for chunk in items.chunks(spec.max_per_payload as usize) {
            commit.outbox.push((
                serde_json::to_vec(chunk).expect("JSON values serialize"),
                chunk.len() as u64,
            ));
        }
        ctx.store.commit_page(commit).await?;
        progress::page(&ctx.spec.name, counts);
        match deliver(ctx, &target, budget, &mut sent, counts).await? {
            Flow::Done => {}
            other => return Ok(other),
        }
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
            .pull(&spec.name, cursor.as_deref(), spec.page_size, &ctx.cancel)
            .await?;
        counts.pulled += page.records.len() as u64;
        crate::engine::check_not_stuck(&source_conn.name, &cursor, &page)?;
        let mut items = Vec::with_capacity(page.records.len());
        let mut dead = Vec::new();
        let (records, superseded) = newest_per_key(&page.records, &spec.matching);
        counts.skipped += superseded;
        for rec in records {
            let id = record_id(rec, &feed.id);
            let changed = changed_at(rec, &feed.changed_at);
            if let Some(v) = crate::engine::map_record(spec, rec, id, changed, counts, &mut dead)? {
                items.push(v);
            }
        }
        let mut outbox = Vec::new();
        for chunk in items.chunks(spec.max_per_payload as usize) {
            let body = serde_json::to_vec(chunk).expect("JSON values serialize");
            outbox.push((body, chunk.len() as u64));
        }
        counts.queued += items.len() as u64;
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

/// With matching keys (`matching = ["id"]`), a record that appears several times in one
/// page goes once, as its newest (last) version, at the place of that version. Pure.
/// Returns the records to send and how many earlier versions were dropped.
pub fn newest_per_key<'a>(
    records: &'a [serde_json::Value],
    keys: &[String],
) -> (Vec<&'a serde_json::Value>, u64) {
    if keys.is_empty() {
        return (records.iter().collect(), 0);
    }
    let key_of = |r: &serde_json::Value| -> Option<Vec<String>> {
        keys.iter()
            .map(|k| lookup(r, k).map(|v| v.to_string()))
            .collect()
    };
    let mut last = std::collections::HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Some(k) = key_of(r) {
            last.insert(k, i);
        }
    }
    let kept: Vec<&serde_json::Value> = records
        .iter()
        .enumerate()
        .filter(|(i, r)| key_of(r).is_none_or(|k| last.get(&k) == Some(i)))
        .map(|(_, r)| r)
        .collect();
    let dropped = (records.len() - kept.len()) as u64;
    (kept, dropped)
}

/// The stream's webhook target, its URL template filled in (shared with the S-360 relay).
pub(super) fn webhook_target(
    ctx: &RunCtx,
    target_conn: &crate::config::Connection,
    webhook: &WebhookOptions,
    institution: Option<&str>,
) -> WebhookTarget {
    let spec = &ctx.spec;
    let endpoint = ctx.http.endpoint(target_conn).with_recorder(ctx.recorder());
    let url = endpoint.url(&expand(
        &webhook.url,
        &spec.name,
        institution,
        &Some(spec.entity.clone()),
    ));
    WebhookTarget {
        endpoint,
        url,
        accepted: webhook.accepted_statuses.clone(),
    }
}

fn changed_at(rec: &serde_json::Value, path: &str) -> Option<DateTime<Utc>> {
    let s = lookup(rec, path)?.as_str()?;
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Sends waiting payloads in order until the outbox is empty, the run's budget is spent, or
/// one is refused.
pub(super) async fn deliver(
    ctx: &RunCtx,
    target: &WebhookTarget,
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
                .deliver(&row.key, &row.body, &ctx.cancel)
                .await
                .map_err(RunError::Target)?
            {
                Delivery::Accepted => {
                    ctx.store.outbox_delivered(row.id).await?;
                    *sent += row.records;
                    counts.created += row.records;
                }
                Delivery::Refused { status, reason } => {
                    tracing::warn!(stream = %name, payload = row.id, records = row.records, attempts = row.attempts + 1, reason = %reason,
                        "payload refused; it is sent again first at the next execution");
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_newest_version_of_a_record_wins_within_a_page() {
        let page = vec![
            json!({"id": 1, "v": "a"}),
            json!({"id": 2, "v": "b"}),
            json!({"id": 1, "v": "c"}),
            json!({"v": "no id"}),
        ];
        let (kept, dropped) = newest_per_key(&page, &["id".to_string()]);
        assert_eq!(dropped, 1);
        let vs: Vec<_> = kept.iter().map(|r| r["v"].as_str().unwrap()).collect();
        assert_eq!(vs, ["b", "c", "no id"]);
        let (all, none) = newest_per_key(&page, &[]);
        assert_eq!((all.len(), none), (4, 0));
    }
}
