//! SeatGeek user change events → Halo users, as Halo's own integrator imports them.
//!
//! One page at a time: pull change events after the cursor → keep the newest event of each
//! user (feed order is the truth) → find each user's Halo user (the stream's link, else the
//! Halo field that holds the SeatGeek ID, else the e-mail, trimmed and case-insensitive) →
//! map → POST updates, then creates, in batches → **commit the page**: the new cursor, the
//! links of every user written, and the dead letters, in one transaction.
//!
//! No second Halo user for one SeatGeek ID: a crash after Halo saved a batch but before the
//! commit leaves no link, but the next run finds the user by the SeatGeek ID that usher
//! wrote into Halo; a cursor reset keeps the links. A batch Halo may *still be saving* (its
//! answer was lost to a crash or a timeout) is in doubt: neither the same run nor the next
//! one looks those users up before the POST can no longer land (`engine::in_doubt`). A
//! create batch that fails or goes unanswered is resolved in the same run
//! ([`resolve_creates`]): wait, ask Halo by the ID field, link what it saved, send the rest. An e-mail (or SeatGeek ID) held by two
//! Halo users is never guessed at: the event goes to dead letters naming both IDs.
//!
//! Halo refuses a whole array for one bad element (400): the batch is halved until the bad
//! user is alone, that user goes to dead letters with Halo's reason, the rest is saved.
//!
//! Finding unlinked users: when Halo holds at most `preload_max` users, the run reads them
//! all once (the first time a page needs it) into an in-memory index; otherwise it searches
//! Halo per user (a few at a time). Users created during the run are found by their link.
//!
//! The matching and mapping functions are pure (`decide.rs`); this file does the IO.

// The kind's options, raw and validated (below `config`, which carries them).
pub mod options;

use crate::progress;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use crate::config::BadRecordPolicy;
use crate::connectors::halo::{HaloClient, Saved};
use crate::connectors::seatgeek::{ChangeEvent, EventPage, PageBody, SeatGeekSource};
use crate::engine::{Flow, RunCtx, RunError, SourceError};
use crate::store::{Counts, DeadLetter, PageCommit};
use options::{CustomRef, HaloOptions, IdField};

/// Searches in flight at once when matching by search.
const SEARCH_CONCURRENCY: usize = 8;
/// Halo's largest page.
const HALO_PAGE: u32 = 1000;

// The pure part (matching, mapping): `decide.rs`.
mod decide;
pub use decide::*;

// ---------------------------------------------------------------- IO: finding users

/// How unlinked users are found in Halo during one run.
enum Lookup {
    /// Every Halo user present when the run first needed it: SeatGeek ID → Halo IDs,
    /// e-mail → Halo IDs.
    Index {
        by_sg: HashMap<String, Vec<String>>,
        by_email: HashMap<String, Vec<String>>,
    },
    Search,
}

async fn load_lookup(
    ctx: &RunCtx,
    halo: &HaloClient,
    opts: &HaloOptions,
) -> Result<Lookup, RunError> {
    let (count, _) = halo
        .users(None, 1, 1, &ctx.cancel)
        .await
        .map_err(RunError::Target)?;
    if opts.preload_max == 0 || count > opts.preload_max {
        tracing::info!(stream = %ctx.spec.name, halo_users = count, "matching by search (Halo holds more than preload_max users)");
        return Ok(Lookup::Search);
    }
    let mut by_sg: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_email: HashMap<String, Vec<String>> = HashMap::new();
    let mut page_no = 1;
    let mut seen = 0u64;
    loop {
        let (total, users) = halo
            .users(None, page_no, HALO_PAGE, &ctx.cancel)
            .await
            .map_err(RunError::Target)?;
        for u in &users {
            let Some(id) = halo_id(u) else { continue };
            if let Some(v) = id_field_value(&opts.id_field, u) {
                by_sg.entry(v).or_default().push(id.clone());
            }
            if let Some(e) = halo_email(u) {
                by_email.entry(e).or_default().push(id);
            }
        }
        seen += users.len() as u64;
        if users.is_empty() || seen >= total {
            break;
        }
        page_no += 1;
    }
    tracing::info!(stream = %ctx.spec.name, halo_users = seen, "Halo users loaded for matching");
    Ok(Lookup::Index { by_sg, by_email })
}

/// All exact matches of one search text (every page of the answer).
async fn search_all(
    ctx: &RunCtx,
    halo: &HaloClient,
    opts: &HaloOptions,
    text: &str,
    sg_value: Option<&str>,
    email: Option<&str>,
) -> Result<(Vec<String>, Vec<String>), RunError> {
    let mut page_no = 1;
    let mut seen = 0u64;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    loop {
        let (total, users) = halo
            .users(Some(text), page_no, 100, &ctx.cancel)
            .await
            .map_err(RunError::Target)?;
        let (x, y) = exact_matches(&opts.id_field, &users, sg_value, email);
        a.extend(x);
        b.extend(y);
        seen += users.len() as u64;
        if users.is_empty() || seen >= total {
            return Ok((a, b));
        }
        page_no += 1;
    }
}

async fn find_unlinked(
    ctx: &RunCtx,
    halo: &HaloClient,
    opts: &HaloOptions,
    lookup: &Lookup,
    sg_id: &str,
    email: Option<&str>,
) -> Result<Found, RunError> {
    let sg_value = halo_sg_id(opts, sg_id);
    match lookup {
        Lookup::Index { by_sg, by_email } => Ok(Found {
            link: None,
            by_id_field: by_sg.get(&sg_value).cloned().unwrap_or_default(),
            by_email: email
                .and_then(|e| by_email.get(e).cloned())
                .unwrap_or_default(),
        }),
        Lookup::Search => {
            let (by_id, _) = search_all(ctx, halo, opts, &sg_value, Some(&sg_value), None).await?;
            if !by_id.is_empty() {
                return Ok(Found {
                    by_id_field: by_id,
                    ..Default::default()
                });
            }
            let by_email = match email {
                Some(e) => search_all(ctx, halo, opts, e, None, Some(e)).await?.1,
                None => Vec::new(),
            };
            Ok(Found {
                by_email,
                ..Default::default()
            })
        }
    }
}

// ---------------------------------------------------------------- IO: validate --online

/// `validate --online` for one stream: what its `[streams.X.halo]` options name exists in
/// Halo (the default site; the custom fields of `id_field` and `custom_fields`). One line
/// per check: `Ok` says what was found, `Err` what is missing (issue 19, item 5).
pub async fn check_options(
    http: &crate::http::Http,
    config: &crate::config::Config,
    spec: &crate::config::StreamSpec,
    opts: &HaloOptions,
    cancel: &tokio_util::sync::CancellationToken,
) -> Vec<Result<String, String>> {
    let stream = &spec.name;
    let Some(conn) = config.connections.get(&spec.target) else {
        return vec![Err(format!(
            "stream {stream:?}: target {:?} is not configured",
            spec.target
        ))];
    };
    let halo = match HaloClient::connect(http, conn, cancel).await {
        Ok(h) => h,
        Err(e) => return vec![Err(format!("stream {stream:?}: {e}"))],
    };
    let mut out = Vec::new();
    match halo.sites(cancel).await {
        Ok(sites) => match sites.iter().find(|(id, _)| *id == opts.default_site) {
            Some((id, name)) => out.push(Ok(format!(
                "stream {stream:?}: default_site {id} is Halo's site {name:?}"
            ))),
            None => out.push(Err(format!(
                "stream {stream:?}: `halo.default_site` {} is not a site in Halo (its sites: {})",
                opts.default_site,
                sites
                    .iter()
                    .map(|(id, n)| format!("{id} {n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
        Err(e) => out.push(Err(format!(
            "stream {stream:?}: cannot list Halo's sites: {e}"
        ))),
    }
    let mut wanted: Vec<(String, &CustomRef)> = Vec::new();
    if let IdField::Custom(r) = &opts.id_field {
        wanted.push(("halo.id_field".into(), r));
    }
    for (r, _) in &opts.custom_fields {
        wanted.push(("halo.custom_fields".into(), r));
    }
    if wanted.is_empty() {
        return out;
    }
    match halo.custom_fields(cancel).await {
        Ok(Some(fields)) => {
            for (key, r) in wanted {
                let found = fields.iter().find(|(id, name)| match r {
                    CustomRef::Id(want) => id == want,
                    CustomRef::Name(want) => name.eq_ignore_ascii_case(want),
                });
                match found {
                    Some((id, name)) => out.push(Ok(format!(
                        "stream {stream:?}: `{key}` custom field {name:?} (ID {id}) exists in Halo"
                    ))),
                    None => out.push(Err(format!(
                        "stream {stream:?}: `{key}` names custom field {} that Halo does not have (its custom fields: {})",
                        match r {
                            CustomRef::Id(id) => format!("ID {id}"),
                            CustomRef::Name(n) => format!("{n:?}"),
                        },
                        fields
                            .iter()
                            .map(|(id, n)| format!("{n} ({id})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            }
        }
        Ok(None) => out.push(Ok(format!(
            "stream {stream:?}: custom fields not checked (this Halo has no /api/FieldInfo)"
        ))),
        Err(e) => out.push(Err(format!(
            "stream {stream:?}: cannot list Halo's custom fields: {e}"
        ))),
    }
    out
}

// ---------------------------------------------------------------- IO: the run

/// One line of `usher import`'s report: what happened (or, dry, would happen) to an event.
#[derive(Debug, Clone)]
pub struct EventLine {
    pub event_id: Option<String>,
    pub user_id: Option<String>,
    /// matched / created / updated / deactivated / skipped / superseded / dead letter.
    pub outcome: String,
    pub halo_id: Option<String>,
    pub fields: Option<Value>,
}

/// What the run does besides its normal work: a record limit and the dry run.
#[derive(Default)]
pub struct RunMode<'a> {
    /// Take at most this many events (`usher import --limit`).
    pub limit: Option<u64>,
    /// Write nothing to Halo or the state; report each event here.
    pub dry_run: bool,
    pub report: Option<&'a mut (dyn FnMut(EventLine) + Send)>,
}

impl RunMode<'_> {
    fn line(&mut self, l: EventLine) {
        if let Some(r) = self.report.as_mut() {
            r(l);
        }
    }
}

pub async fn run(
    ctx: &RunCtx,
    opts: &HaloOptions,
    counts: &mut Counts,
    mut mode: RunMode<'_>,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let source_conn = ctx.connection(&spec.source)?;
    let target_conn = ctx.connection(&spec.target)?;
    let source = SeatGeekSource::new(&ctx.http, &source_conn, &spec.name);
    let mut halo = HaloClient::connect(&ctx.http, &target_conn, &ctx.cancel)
        .await
        .map_err(RunError::Target)?;
    halo.endpoint = halo.endpoint.with_recorder(ctx.recorder());
    let mapper = Mapper::new(&spec.mapping, opts);
    let limit = mode.limit.or(opts.max_events);
    let mut lookup: Option<Lookup> = None;
    // Dry run: users this import would have created, so that a later event of one of them
    // shows as an update of that user.
    let mut dry_created: HashSet<String> = HashSet::new();

    let mut cursor = ctx.store.cursor(&spec.name).await?;
    // A page's commit runs while the next page is worked on; whatever ends the run, the
    // commit in flight lands (or fails) before the run says how it ended.
    let mut in_flight: Option<InFlight> = None;
    let pages = pages(
        ctx,
        opts,
        &source,
        &halo,
        &mapper,
        limit,
        &mut lookup,
        &mut dry_created,
        &mut cursor,
        counts,
        &mut mode,
        &mut in_flight,
    )
    .await;
    let landed = match in_flight.take() {
        Some(f) => f.land(&spec.name).await,
        None => Ok(()),
    };
    let flow = pages?;
    landed?;
    Ok(flow)
}

/// A page's commit, sent and not yet known to have landed.
struct InFlight {
    commit: tokio::task::JoinHandle<Result<(), crate::store::StoreError>>,
    /// The counts when the page was done, for the progress line once it landed.
    counts: Counts,
}

impl InFlight {
    fn send(ctx: &RunCtx, page: PageCommit, counts: Counts) -> InFlight {
        let store = ctx.store.clone();
        let (stream, links) = (page.stream.clone(), page.links.len());
        InFlight {
            commit: tokio::spawn(async move {
                let t = std::time::Instant::now();
                store.commit_page(page).await?;
                tracing::debug!(stream = %stream, links, commit_ms = t.elapsed().as_millis() as u64, "page committed");
                Ok(())
            }),
            counts,
        }
    }

    async fn land(self, stream: &str) -> Result<(), RunError> {
        self.commit
            .await
            .map_err(|e| crate::store::StoreError::Task(e.to_string()))??;
        progress::page(stream, &self.counts);
        Ok(())
    }
}

/// The run's pages, one after the other. Page N's commit (its cursor, links and dead
/// letters in one transaction) runs while page N+1 is read, matched and written to Halo:
/// on PostgreSQL that hides the commit's round trips and log flush. Page N+1 sees page N's
/// links from memory (`overlay`), committed or not: the stream's links are written by
/// this run alone. If page N's commit fails, the run fails before page N+1 commits, and
/// the next run redoes both pages from page N's cursor: what page N+1 wrote to Halo is
/// found again by the SeatGeek ID, as after a crash between a write and its commit.
#[allow(clippy::too_many_arguments)] // the run's pieces; one call site
async fn pages(
    ctx: &RunCtx,
    opts: &HaloOptions,
    source: &SeatGeekSource,
    halo: &HaloClient,
    mapper: &Mapper,
    limit: Option<u64>,
    lookup: &mut Option<Lookup>,
    dry_created: &mut HashSet<String>,
    cursor: &mut Option<String>,
    counts: &mut Counts,
    mode: &mut RunMode<'_>,
    in_flight: &mut Option<InFlight>,
) -> Result<Flow, RunError> {
    let spec = &ctx.spec;
    let mut taken = 0u64;
    let mut empty_pages = crate::engine::EmptyPages::default();
    let page_limit = |taken: u64| -> u32 {
        match limit {
            Some(l) => (l.saturating_sub(taken)).min(spec.page_size as u64) as u32,
            None => spec.page_size,
        }
    };
    // The next page, read (not parsed) while the current one was written.
    let mut prefetched: Option<Result<PageBody, SourceError>> = None;
    // The links of the page whose commit is in flight.
    let mut overlay: HashMap<String, String> = HashMap::new();
    loop {
        if limit.is_some_and(|l| taken >= l) {
            return Ok(Flow::Done);
        }
        if ctx.should_stop() {
            return Ok(Flow::Stopped);
        }
        let page = match prefetched.take() {
            Some(p) => p?.parse()?,
            None => {
                source
                    .pull(cursor.as_deref(), page_limit(taken), &ctx.cancel)
                    .await?
            }
        };
        if page.has_more
            && !page.events.is_empty()
            && cursor.is_some()
            && page.next_cursor == *cursor
        {
            return Err(SourceError::Stuck {
                conn: spec.source.clone(),
                cursor: cursor.clone(),
            }
            .into());
        }
        let n = page.events.len() as u64;
        counts.pulled += n;
        counts.skipped += page.skipped;
        taken += n;
        let next = page.next_cursor.clone().or_else(|| cursor.clone());
        // Read the next page while this one is written (reads only; dropped if unused).
        let more = page.has_more && limit.is_none_or(|l| taken < l);
        let dry_run = mode.dry_run;
        let t_work = std::time::Instant::now();
        let work = process_page(
            ctx,
            opts,
            halo,
            mapper,
            lookup,
            &page,
            &overlay,
            counts,
            mode,
            dry_created,
        );
        let fetch = async {
            if more && !dry_run {
                Some(
                    source
                        .fetch(next.as_deref(), page_limit(taken), &ctx.cancel)
                        .await,
                )
            } else {
                None
            }
        };
        let landed = async {
            match in_flight.take() {
                Some(f) => f.land(&spec.name).await,
                None => Ok(()),
            }
        };
        let (w, p, landed) = tokio::join!(work, fetch, landed);
        prefetched = p;
        landed?;
        let commit = w?;
        tracing::debug!(stream = %spec.name, events = n, work_ms = t_work.elapsed().as_millis() as u64, "page worked");
        if !mode.dry_run {
            overlay = commit.links.iter().cloned().collect();
            *in_flight = Some(InFlight::send(
                ctx,
                PageCommit {
                    stream: spec.name.clone(),
                    cursor: Some(next.clone()),
                    links: commit.links,
                    dead_letters: commit.dead,
                    ..Default::default()
                },
                *counts,
            ));
        }
        *cursor = next;
        if !page.has_more || empty_pages.end_run(&spec.name, page.events.is_empty()) {
            return Ok(Flow::Done);
        }
    }
}

/// What one page leaves to commit.
struct PageResult {
    links: Vec<(String, String)>,
    dead: Vec<DeadLetter>,
}

/// One user to write.
struct Write {
    /// Index into the page's events.
    event: usize,
    sg_id: String,
    /// The Halo user as JSON text: serialized when mapped, so a page holds ~400 bytes per
    /// write instead of a tree of maps (~2.5 KB).
    body: String,
    outcome: &'static str,
    /// The Halo ID for updates; None for creates.
    halo_id: Option<String>,
    /// Write the link after saving (creates, and matches not found by the link).
    link: bool,
}

#[allow(clippy::too_many_arguments)] // the run's pieces; one call site
async fn process_page(
    ctx: &RunCtx,
    opts: &HaloOptions,
    halo: &HaloClient,
    mapper: &Mapper,
    lookup: &mut Option<Lookup>,
    page: &EventPage,
    overlay: &HashMap<String, String>,
    counts: &mut Counts,
    mode: &mut RunMode<'_>,
    dry_created: &mut HashSet<String>,
) -> Result<PageResult, RunError> {
    let spec = &ctx.spec;
    let events = &page.events;
    let mut dead = Vec::new();
    let mut dead_letter = |mode: &mut RunMode<'_>,
                           counts: &mut Counts,
                           e: &ChangeEvent,
                           reason: String|
     -> Result<(), RunError> {
        if spec.on_bad_record == BadRecordPolicy::Stop && !mode.dry_run {
            return Err(RunError::BadRecord {
                id: e.user_id.clone().unwrap_or_else(|| "without an id".into()),
                reason,
            });
        }
        tracing::warn!(stream = %spec.name, user = e.user_id.as_deref().unwrap_or("?"), reason = %reason, "event set aside in dead letters");
        counts.failed += 1;
        mode.line(EventLine {
            event_id: e.event_id.clone(),
            user_id: e.user_id.clone(),
            outcome: format!("dead letter: {reason}"),
            halo_id: None,
            fields: None,
        });
        dead.push(DeadLetter {
            source_id: e.user_id.clone(),
            record: e.to_json(),
            reason,
        });
        Ok(())
    };

    let (winners, superseded) = newest_per_user(events);
    counts.skipped += superseded.len() as u64;
    if mode.report.is_some() {
        for &i in &superseded {
            mode.line(EventLine {
                event_id: events[i].event_id.clone(),
                user_id: events[i].user_id.clone(),
                outcome: "superseded by a newer event of the user in this page".into(),
                halo_id: None,
                fields: None,
            });
        }
    }
    for e in events.iter().filter(|e| e.user_id.is_none()) {
        dead_letter(mode, counts, e, "the event carries no user ID".into())?;
    }
    let mut todo = Vec::with_capacity(winners.len());
    for i in winners {
        let e = &events[i];
        if let (Some(oldest), Some(at)) =
            (spec.oldest, e.occurred_at.as_deref().and_then(parse_time))
            && at < oldest
        {
            counts.skipped += 1;
            mode.line(EventLine {
                event_id: e.event_id.clone(),
                user_id: e.user_id.clone(),
                outcome: "skipped: older than `oldest`".into(),
                halo_id: None,
                fields: None,
            });
            continue;
        }
        todo.push(i);
    }

    // Links first, then Halo for the rest.
    let ids: Vec<String> = todo
        .iter()
        .map(|&i| events[i].user_id.clone().expect("winners have IDs"))
        .collect();
    let mut links: HashMap<String, String> = HashMap::with_capacity(ids.len());
    for id in &ids {
        if let Some(t) = overlay.get(id) {
            links.insert(id.clone(), t.clone());
        }
    }
    // The page before's links (in flight) win over what the store shows of them.
    for (s, t) in ctx.store.links(&spec.name, ids).await? {
        links.entry(s).or_insert(t);
    }
    let unlinked: Vec<usize> = todo
        .iter()
        .copied()
        .filter(|&i| {
            let id = events[i].user_id.as_deref().expect("winners have IDs");
            !links.contains_key(id) && !dry_created.contains(id)
        })
        .collect();
    let mut found: HashMap<usize, Found> = HashMap::with_capacity(unlinked.len());
    if !unlinked.is_empty() {
        if lookup.is_none() {
            *lookup = Some(load_lookup(ctx, halo, opts).await?);
        }
        let lk = lookup.as_ref().expect("just loaded");
        let results: Vec<Result<(usize, Found), RunError>> = futures::stream::iter(unlinked)
            .map(|i| async move {
                let e = &events[i];
                let email = email_key(&e.user);
                let f = find_unlinked(
                    ctx,
                    halo,
                    opts,
                    lk,
                    e.user_id.as_deref().expect("winners have IDs"),
                    email.as_deref(),
                )
                .await?;
                Ok((i, f))
            })
            .buffer_unordered(SEARCH_CONCURRENCY)
            .collect()
            .await;
        for r in results {
            let (i, f) = r?;
            found.insert(i, f);
        }
    }

    let mut writes = Vec::new();
    for i in todo {
        let e = &events[i];
        let sg_id = e.user_id.clone().expect("winners have IDs");
        let f = match links.get(&sg_id) {
            Some(l) => Found {
                link: Some(l.clone()),
                ..Default::default()
            },
            None if dry_created.contains(&sg_id) => Found {
                link: Some("(created earlier in this import)".into()),
                ..Default::default()
            },
            None => found.remove(&i).unwrap_or_default(),
        };
        let linked = f.link.is_some();
        match decide(e.action, &f, opts.on_deleted, &sg_id) {
            Decision::Skip(why) => {
                counts.skipped += 1;
                mode.line(EventLine {
                    event_id: e.event_id.clone(),
                    user_id: Some(sg_id),
                    outcome: format!("skipped: {why}"),
                    halo_id: f.link,
                    fields: None,
                });
            }
            Decision::Dead(reason) => dead_letter(mode, counts, e, reason)?,
            Decision::Deactivate { halo_id } => {
                let id: Value =
                    serde_json::from_str(&halo_id).unwrap_or(Value::String(halo_id.clone()));
                writes.push(Write {
                    event: i,
                    sg_id,
                    body: json!({"id": id, "inactive": true}).to_string(),
                    outcome: "deactivated",
                    halo_id: Some(halo_id),
                    link: !linked,
                });
            }
            d @ (Decision::Update { .. } | Decision::Create) => {
                let mut body = match mapper.halo_user(opts, &sg_id, &e.user) {
                    Ok(b) => b,
                    Err(err) => {
                        dead_letter(mode, counts, e, err.to_string())?;
                        continue;
                    }
                };
                match d {
                    Decision::Update { halo_id, via } => {
                        let id: Value = serde_json::from_str(&halo_id)
                            .unwrap_or(Value::String(halo_id.clone()));
                        body.insert("id".into(), id);
                        writes.push(Write {
                            event: i,
                            sg_id,
                            body: to_json(&body),
                            outcome: match via {
                                "link" => "updated (matched by link)",
                                "id field" => "updated (matched by SeatGeek ID field)",
                                _ => "updated (matched by e-mail)",
                            },
                            halo_id: Some(halo_id),
                            link: !linked,
                        });
                    }
                    _ => {
                        body.insert("site_id".into(), json!(opts.default_site));
                        writes.push(Write {
                            event: i,
                            sg_id,
                            body: to_json(&body),
                            outcome: "created",
                            halo_id: None,
                            link: true,
                        });
                    }
                }
            }
        }
    }

    let mut result = PageResult {
        links: Vec::new(),
        dead: Vec::new(),
    };
    if mode.dry_run {
        for w in writes {
            if w.halo_id.is_none() {
                dry_created.insert(w.sg_id.clone());
            }
            match w.outcome {
                "created" => counts.created += 1,
                _ => counts.updated += 1,
            }
            let e = &events[w.event];
            mode.line(EventLine {
                event_id: e.event_id.clone(),
                user_id: Some(w.sg_id),
                outcome: format!("would be {}", w.outcome),
                halo_id: w.halo_id,
                fields: serde_json::from_str(&w.body).ok(),
            });
        }
        result.dead = dead;
        return Ok(result);
    }

    let t_save = std::time::Instant::now();
    tracing::debug!(stream = %spec.name, unlinked = found.len(), "page matched");
    // Updates first (idempotent: retried on 5xx), then creates (sent once; a batch that
    // failed or whose answer was lost is resolved below, in this run).
    let (updates, creates): (Vec<Write>, Vec<Write>) =
        writes.into_iter().partition(|w| w.halo_id.is_some());
    let mut saved = Vec::with_capacity(updates.len() + creates.len());
    let mut unsettled = Vec::new();
    let mut failure = None;
    for (group, idempotent) in [(updates, true), (creates, false)] {
        let mut rest = group.into_iter().peekable();
        while rest.peek().is_some() {
            let batch: Vec<Write> = rest.by_ref().take(opts.batch_size).collect();
            let s = save_isolating(ctx, halo, batch, idempotent).await;
            saved.extend(s.done);
            if let Some(e) = s.error {
                if idempotent || !create_may_be_resolved(&e) {
                    return Err(RunError::Target(e));
                }
                unsettled.extend(s.unsettled);
                failure = Some(e);
            }
        }
    }
    if let Some(e) = failure {
        saved.extend(resolve_creates(ctx, opts, halo, lookup, unsettled, e).await?);
    }
    // Every create (or update) of the page refused for one reason is the configuration.
    let mut refusals = crate::engine::refusals::Refusals::default();
    for (w, outcome) in &saved {
        let kind = if w.halo_id.is_none() {
            "create"
        } else {
            "update"
        };
        match outcome {
            Ok(_) => refusals.accepted(kind),
            Err(reason) => refusals.refused(kind, reason),
        }
    }
    if let Some(msg) =
        refusals.message("Halo", "users", crate::engine::refusals::KEPT_BEFORE_CURSOR)
    {
        return Err(RunError::Setup(msg));
    }
    for (w, outcome) in saved {
        let e = &events[w.event];
        match outcome {
            Ok(id) => {
                if w.halo_id.is_none() {
                    counts.created += 1;
                } else {
                    counts.updated += 1;
                }
                if w.link {
                    result.links.push((w.sg_id.clone(), id.clone()));
                }
                if mode.report.is_none() {
                    continue;
                }
                mode.line(EventLine {
                    event_id: e.event_id.clone(),
                    user_id: Some(w.sg_id),
                    outcome: w.outcome.to_string(),
                    halo_id: Some(id),
                    fields: serde_json::from_str(&w.body).ok(),
                });
            }
            Err(reason) => dead_letter(mode, counts, e, reason)?,
        }
    }
    tracing::debug!(stream = %spec.name, save_ms = t_save.elapsed().as_millis() as u64, "page saved to Halo");
    result.dead = dead;
    Ok(result)
}

/// What became of a batch: the writes settled (with their Halo ID, or the reason to set
/// them aside), and, when a POST failed, the writes not settled and the error.
struct Saving {
    done: Vec<(Write, Result<String, String>)>,
    unsettled: Vec<Write>,
    error: Option<crate::http::HttpError>,
}

/// POSTs a batch; on a 400 (nothing saved) halves it until the refused user is alone.
/// Stops at the first POST that fails otherwise: that part and the parts not yet sent are
/// returned unsettled (Halo may have saved the failed part).
async fn save_isolating(
    ctx: &RunCtx,
    halo: &HaloClient,
    batch: Vec<Write>,
    idempotent: bool,
) -> Saving {
    let mut done = Vec::with_capacity(batch.len());
    let mut stack = vec![batch];
    while let Some(part) = stack.pop() {
        let body = json_array(part.iter().map(|w| w.body.as_str()));
        match halo.save(body, part.len(), idempotent, &ctx.cancel).await {
            Ok(Saved::Ok(ids)) => done.extend(part.into_iter().zip(ids.into_iter().map(Ok))),
            Ok(Saved::Refused(reason)) if part.len() == 1 => {
                let reason = format!("Halo refused the user: {reason}");
                done.extend(part.into_iter().map(|w| (w, Err(reason.clone()))));
            }
            Ok(Saved::Refused(reason)) => {
                tracing::info!(stream = %ctx.spec.name, users = part.len(), reason = %reason, "Halo refused a batch; halving it to find the refused user");
                let mut first = part;
                let second = first.split_off(first.len() / 2);
                stack.push(second);
                stack.push(first);
            }
            Err(e) => {
                let mut unsettled = part;
                unsettled.extend(stack.into_iter().flatten());
                return Saving {
                    done,
                    unsettled,
                    error: Some(e),
                };
            }
        }
    }
    Saving {
        done,
        unsettled: Vec::new(),
        error: None,
    }
}

/// A create batch that failed this way may have been saved, or not: the run finds out and
/// goes on. Anything else (credentials, a long Retry-After, shutdown, a state that cannot
/// record the write) ends the run.
fn create_may_be_resolved(e: &crate::http::HttpError) -> bool {
    use crate::http::HttpError;
    match e {
        // Timed out, broken off, or not connected (then nothing was sent: asking is harmless).
        HttpError::Transport { .. } => true,
        // 5xx, and a 2xx whose answer is broken (Halo did the work; the IDs are unknown).
        HttpError::Status { status, .. } => *status >= 500 || (200..300).contains(status),
        _ => false,
    }
}

/// Creates whose batch failed or whose answer was lost, resolved in the same run: wait
/// until an unanswered POST can no longer land (its deadline plus the settle margin), find
/// which of the users Halo saved (by the SeatGeek ID written into them), link those, send
/// the rest once more; again while the connection's retry policy allows. This keeps "never
/// create twice": nothing is sent again before Halo has been asked, and Halo is asked only
/// once no earlier POST of these users can still be saved.
async fn resolve_creates(
    ctx: &RunCtx,
    opts: &HaloOptions,
    halo: &HaloClient,
    lookup: &mut Option<Lookup>,
    mut pending: Vec<Write>,
    mut error: crate::http::HttpError,
) -> Result<Vec<(Write, Result<String, String>)>, RunError> {
    let mut out = Vec::with_capacity(pending.len());
    for round in 1..=halo.endpoint.max_retries().max(1) {
        tracing::warn!(stream = %ctx.spec.name, users = pending.len(), round, error = %error,
            "a create batch failed or its answer was lost; finding out what Halo saved before sending the rest again");
        if !ctx.doubt.settle(ctx).await? {
            return Err(RunError::Target(crate::http::HttpError::Cancelled {
                what: "POST /api/users".into(),
            }));
        }
        let found = find_created(ctx, opts, halo, lookup, &pending).await?;
        let mut resend = Vec::with_capacity(pending.len());
        for w in pending {
            match found.get(&w.sg_id).map(Vec::as_slice) {
                None | Some([]) => resend.push(w),
                Some([id]) => {
                    let id = id.clone();
                    out.push((w, Ok(id)));
                }
                Some(ids) => {
                    let reason = format!(
                        "Halo users {} all hold SeatGeek ID {:?}; not guessing which is the one",
                        ids.join(" and "),
                        w.sg_id
                    );
                    out.push((w, Err(reason)));
                }
            }
        }
        let mut failed = Vec::new();
        let mut last = None;
        let mut rest = resend.into_iter().peekable();
        while rest.peek().is_some() {
            let batch: Vec<Write> = rest.by_ref().take(opts.batch_size).collect();
            let s = save_isolating(ctx, halo, batch, false).await;
            out.extend(s.done);
            if let Some(e) = s.error {
                if !create_may_be_resolved(&e) {
                    return Err(RunError::Target(e));
                }
                failed.extend(s.unsettled);
                failed.extend(rest.by_ref());
                last = Some(e);
            }
        }
        match last {
            None => return Ok(out),
            Some(e) => {
                pending = failed;
                error = e;
            }
        }
    }
    Err(RunError::Target(error))
}

/// Which of `pending` Halo holds, by the SeatGeek ID field: SeatGeek ID → Halo IDs. Reads
/// all of Halo's users again when that takes fewer calls than a search per user (the index
/// of this run is then fresh for the pages that follow), else searches per user.
async fn find_created(
    ctx: &RunCtx,
    opts: &HaloOptions,
    halo: &HaloClient,
    lookup: &mut Option<Lookup>,
    pending: &[Write],
) -> Result<HashMap<String, Vec<String>>, RunError> {
    let reload = match lookup {
        Some(Lookup::Index { .. }) => {
            let (count, _) = halo
                .users(None, 1, 1, &ctx.cancel)
                .await
                .map_err(RunError::Target)?;
            count <= opts.preload_max && count.div_ceil(HALO_PAGE as u64) + 1 < pending.len() as u64
        }
        _ => false,
    };
    if reload {
        *lookup = Some(load_lookup(ctx, halo, opts).await?);
        if let Some(Lookup::Index { by_sg, .. }) = lookup {
            return Ok(pending
                .iter()
                .filter_map(|w| {
                    by_sg
                        .get(&halo_sg_id(opts, &w.sg_id))
                        .map(|ids| (w.sg_id.clone(), ids.clone()))
                })
                .collect());
        }
    }
    let ids: Vec<String> = pending.iter().map(|w| w.sg_id.clone()).collect();
    let results: Vec<Result<(String, Vec<String>), RunError>> = futures::stream::iter(ids)
        .map(|sg_id| async move {
            let value = halo_sg_id(opts, &sg_id);
            let (by_id, _) = search_all(ctx, halo, opts, &value, Some(&value), None).await?;
            Ok((sg_id, by_id))
        })
        .buffer_unordered(SEARCH_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

fn to_json(user: &Map<String, Value>) -> String {
    serde_json::to_string(user).expect("JSON maps serialize")
}

/// `[a,b,…]` from JSON texts, in one allocation.
fn json_array<'a>(items: impl Iterator<Item = &'a str> + Clone) -> Vec<u8> {
    let len = items.clone().map(|t| t.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(len.max(2));
    out.push(b'[');
    for (i, t) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(t.as_bytes());
    }
    out.push(b']');
    out
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::options::{OnDeleted, default_mapping};
    use super::*;
    use crate::connectors::seatgeek::Action;
    use crate::mapping::Mapping;

    fn opts(id_field: IdField) -> HaloOptions {
        HaloOptions {
            default_site: 18,
            id_field,
            custom_fields: vec![(
                CustomRef::Name("CFMarketingOptIn".into()),
                Mapping::parse_field("CFMarketingOptIn", "marketing_opt_in | string").unwrap(),
            )],
            import_address: true,
            on_deleted: OnDeleted::Deactivate,
            batch_size: 100,
            id_prefix: "sg2:".into(),
            preload_max: 100,
            max_events: None,
        }
    }

    fn ev(id: Option<&str>, action: Action, first: &str) -> ChangeEvent {
        ChangeEvent {
            event_id: None,
            action,
            occurred_at: None,
            user_id: id.map(str::to_string),
            user: json!({"id": id, "first_name": first}),
        }
    }

    #[test]
    fn the_newest_event_of_a_user_wins_within_a_page() {
        let events = vec![
            ev(Some("a"), Action::Created, "A1"),
            ev(Some("b"), Action::Created, "B1"),
            ev(None, Action::Updated, "X"),
            ev(Some("a"), Action::Updated, "A2"),
            ev(Some("a"), Action::Deleted, "A3"),
        ];
        let (w, s) = newest_per_user(&events);
        assert_eq!(w, vec![1, 4]);
        assert_eq!(s, vec![0, 3]);
    }

    #[test]
    fn matching_goes_link_then_id_field_then_email_then_create() {
        let d = OnDeleted::Deactivate;
        let all = Found {
            link: Some("1".into()),
            by_id_field: vec!["2".into()],
            by_email: vec!["3".into()],
        };
        assert_eq!(
            decide(Action::Updated, &all, d, "x"),
            Decision::Update {
                halo_id: "1".into(),
                via: "link"
            }
        );
        let f = Found {
            link: None,
            ..all.clone()
        };
        assert_eq!(
            decide(Action::Updated, &f, d, "x"),
            Decision::Update {
                halo_id: "2".into(),
                via: "id field"
            }
        );
        let f = Found {
            by_id_field: vec![],
            ..f
        };
        assert_eq!(
            decide(Action::Created, &f, d, "x"),
            Decision::Update {
                halo_id: "3".into(),
                via: "e-mail"
            }
        );
        assert_eq!(
            decide(Action::Updated, &Found::default(), d, "x"),
            Decision::Create
        );
    }

    #[test]
    fn a_shared_email_is_never_guessed_at() {
        let f = Found {
            by_email: vec!["40".into(), "41".into()],
            ..Default::default()
        };
        match decide(Action::Updated, &f, OnDeleted::Deactivate, "x") {
            Decision::Dead(r) => assert!(r.contains("40 and 41"), "{r}"),
            other => panic!("{other:?}"),
        }
        // …but a link or the ID field settles it.
        let f = Found {
            by_id_field: vec!["41".into()],
            ..f
        };
        assert!(matches!(
            decide(Action::Updated, &f, OnDeleted::Deactivate, "x"),
            Decision::Update { .. }
        ));
    }

    #[test]
    fn deletes_deactivate_ignore_or_skip() {
        let f = Found {
            link: Some("9".into()),
            ..Default::default()
        };
        assert_eq!(
            decide(Action::Deleted, &f, OnDeleted::Deactivate, "x"),
            Decision::Deactivate {
                halo_id: "9".into()
            }
        );
        assert!(matches!(
            decide(Action::Deleted, &f, OnDeleted::Ignore, "x"),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(
                Action::Deleted,
                &Found::default(),
                OnDeleted::Deactivate,
                "x"
            ),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn exact_matches_ignore_substring_hits_and_compare_emails_loosely() {
        let field = IdField::Custom(CustomRef::Name("CFSeatGeekId".into()));
        let users = vec![
            json!({"id": 1, "emailaddress": " Ada@Example.org ", "customfields": [{"id": 145, "name": "CFSeatGeekId", "value": "SG-12"}]}),
            json!({"id": 2, "emailaddress": "ada@example.org.uk", "customfields": [{"id": 145, "name": "cfseatgeekid", "value": "SG-1"}]}),
        ];
        let (a, b) = exact_matches(&field, &users, Some("SG-1"), Some("ada@example.org"));
        assert_eq!(a, vec!["2".to_string()]);
        assert_eq!(b, vec!["1".to_string()]);
        assert_eq!(
            id_field_value(&IdField::Other(2), &json!({"other2": "x"})).as_deref(),
            Some("x")
        );
    }

    #[test]
    fn mapping_writes_system_custom_id_and_address_fields_and_drops_nulls() {
        let o = opts(IdField::Other(1));
        let mut system = Mapping {
            fields: default_mapping(),
            statics: vec![("inactive".into(), json!(false))],
        };
        system
            .fields
            .push(Mapping::parse_field("jobtitle", "title").unwrap());
        let m = Mapper::new(&system, &o);
        let user = json!({"id": "SG-7", "email": " Ada@Example.org ", "first_name": "Ada", "last_name": "Example",
            "phone": "+47 123 45 678", "marketing_opt_in": true,
            "address": {"line1": "Main st 1", "city": "Oslo", "postcode": "0150", "country": "NO", "line2": null}});
        let out = Value::Object(m.halo_user(&o, "SG-7", &user).unwrap());
        assert_eq!(out["firstname"], "Ada");
        assert_eq!(out["surname"], "Example");
        assert_eq!(out["name"], "Ada Example");
        assert_eq!(out["emailaddress"], "Ada@Example.org");
        assert_eq!(out["phonenumber"], "+4712345678");
        assert_eq!(out["inactive"], false);
        assert_eq!(out["other1"], "sg2:SG-7");
        assert!(
            out.get("jobtitle").is_none(),
            "a missing source field is not sent"
        );
        assert_eq!(
            out["customfields"],
            json!([{"name": "CFMarketingOptIn", "value": "true"}])
        );
        assert_eq!(
            out["primary_address"],
            json!({"line1": "Main st 1", "city": "Oslo", "postcode": "0150", "country": "NO"})
        );

        let mut o2 = opts(IdField::Custom(CustomRef::Id(145)));
        o2.import_address = false;
        let out = Value::Object(m.halo_user(&o2, "SG-7", &user).unwrap());
        assert!(out.get("primary_address").is_none());
        assert_eq!(
            out["customfields"][0],
            json!({"id": 145, "value": "sg2:SG-7"})
        );
    }
}
