//! CRM offer requests → S-360 orders (`createOrUpdateOrder`; see the folder's `mod.rs`).

use super::*;

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

pub(super) const ATTEMPT: &str = "attempt";
pub(super) const DONE: &str = "done";
/// Sends of one offer within one run, each after `getOrderByExternalReference` said "none".
pub(super) const MAX_SENDS: u32 = 3;

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
    let mut left = u64::from(spec.max_per_run);
    loop {
        let page = match next_page(ctx, &source, &cursor, &mut left, counts).await? {
            ControlFlow::Continue(page) => page,
            ControlFlow::Break(flow) => return Ok(flow),
        };
        let mut ledger = Vec::new();
        let mut links = Vec::new();
        let mut dead = Vec::new();
        for rec in &page.records {
            let Some(id) = wanted(ctx, feed, rec, counts, &mut dead)? else {
                continue;
            };
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
        commit(ctx, &mut cursor, &page, links, ledger, dead, counts).await?;
        if !page.has_more || page.records.is_empty() {
            return Ok(Flow::Done);
        }
    }
}
