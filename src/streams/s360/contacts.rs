//! CRM contacts → S-360 (`saveIndividualContactData`; see the folder's `mod.rs`).

use super::*;

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
    let mut left = u64::from(spec.max_per_run);
    loop {
        let page = match next_page(ctx, &source, &cursor, &mut left, counts).await? {
            ControlFlow::Continue(page) => page,
            ControlFlow::Break(flow) => return Ok(flow),
        };
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
            let Some(id) = wanted(ctx, feed, rec, counts, &mut dead)? else {
                continue;
            };
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
        commit(ctx, &mut cursor, &page, links, Vec::new(), dead, counts).await?;
        if !page.has_more || page.records.is_empty() {
            return Ok(Flow::Done);
        }
    }
}

/// Creates a contact (`contactNumber` null), sent once; when the POST fails or its answer is
/// lost, S-360 may have made the contact: once no earlier POST can still land (its deadline
/// plus the settle margin), `searchContact` by the e-mail says; found, it is the contact; not
/// found, it is sent again, while the connection's retry policy allows. Never two contacts.
pub(super) async fn create_contact(
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
pub(super) async fn commit_partial(
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
