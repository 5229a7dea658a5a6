//! S-360 relay: S-360's webhooks, stored in `s360_inbox` by the receiver, → the CRM's
//! webhook (see the folder's `mod.rs`).

use super::*;

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
pub(super) fn json_array(items: &[String]) -> Vec<u8> {
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
