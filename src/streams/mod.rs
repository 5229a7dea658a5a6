//! One room per stream kind: each folder holds the kind's options, raw and validated
//! (`options.rs`), its run (pages through its source, what it decides for each record, what
//! it commits), its checks of its options against the vendors (`validate --online`) and its
//! pure decisions, beside their tests. [`options`] registers the kinds' options:
//! `[streams.X]` as written and [`options::StreamKind`], one variant per kind, built from a
//! stream's ends.
//!
//! The options files stand below `config` (which carries a stream's `StreamKind`), and the
//! runs above the engine: two floors of one folder (ARCHITECTURE.md, "Rooms and floors";
//! `tests/rooms.rs` gives a floor to `streams/options` and `streams/*/options` apart).
//!
//! A kind plugs into the engine through one `match` ([`run`]), handed to the engine as its
//! [`KindRun`]: the set of kinds is closed and compiled in, so a plain enum reads better than
//! a trait-object registry (no boxing of options, no downcasting where the CLI wants one
//! kind's options, every kind visible in one place), and the compiler lists the arms a new
//! variant needs.

// The generic CRM feed → the CRM's webhook (the outbox, sent at every execution).
pub mod feed_webhook;
// A CRM feed → CM.com CDP events.
pub mod feed_cdp;
// S-360 relay (inbox → CRM), CRM contacts → S-360, CRM offers → S-360.
pub mod s360;
// SeatGeek user change events → Halo users.
pub mod seatgeek_halo;
// Ticket Co bookings → Airship (daily window, owed records).
pub mod ticketco_airship;

// `[streams.X]` as written, and the enum of the kinds' options (below `config`).
pub mod options;

use futures::future::BoxFuture;

use crate::engine::{Flow, KindRun, RunCtx, RunError};
use crate::store::Counts;
use options::StreamKind;

/// The stream kind's run: the one place a kind is registered.
pub fn run<'a>(
    ctx: &'a RunCtx,
    trigger: &'a str,
    counts: &'a mut Counts,
) -> BoxFuture<'a, Result<Flow, RunError>> {
    Box::pin(async move {
        match &ctx.spec.kind {
            StreamKind::FeedToWebhook { feed, webhook } => {
                feed_webhook::run(ctx, feed, webhook, counts).await
            }
            StreamKind::S360Relay { relay, webhook } => {
                s360::relay(ctx, relay, webhook, counts).await
            }
            StreamKind::CrmToS360Contacts { feed, contacts } => {
                s360::contacts(ctx, feed, contacts, counts).await
            }
            StreamKind::CrmOffersToS360 { feed, offers } => {
                s360::offers(ctx, feed, offers, counts).await
            }
            StreamKind::TicketCoToAirship(options) => {
                ticketco_airship::run(ctx, options, counts).await
            }
            StreamKind::FeedToCdp { feed, cdp } => {
                feed_cdp::run(ctx, trigger, feed, cdp, counts).await
            }
            StreamKind::SeatGeekToHalo(opts) => {
                seatgeek_halo::run(ctx, opts, counts, Default::default()).await
            }
        }
    })
}

/// [`run`] as the engine takes it.
pub const RUN: KindRun = run;
