//! A stream's options: `[streams.X]` as written ([`RawStream`]: the keys every stream has
//! and each kind's own table) and the kind it is with its validated options
//! ([`StreamKind`]), built from its two ends' kinds. Each kind's options, raw and
//! validated, are its folder's `options.rs`; this file registers them: a table in
//! [`RawStream`], a variant in [`StreamKind`] and its line in `build`.
//!
//! Below `config`, which reads the keys every stream has (schedule, limits, mapping) and
//! calls `KindDefaults::of`, `Ends::build` and `build` in between, and carries the
//! result in `StreamSpec::kind`; above the kinds' options files, which know nothing of each
//! other but the CRM feed and webhook (`feed_webhook/options.rs`). The rest of `streams/`
//! (the runs) stands above the engine.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::feed_cdp::options::{self as feed_cdp, CdpOptions, RawCdpStream};
use super::feed_webhook::options::{
    self as feed_webhook, FeedOptions, RawFeed, RawWebhook, WebhookOptions,
};
use super::s360::options::{
    self as s360, RawS360Stream, RelayOptions, S360ContactOptions, S360OfferOptions, S360Options,
};
use super::seatgeek_halo::options::{self as seatgeek_halo, HaloOptions, RawHalo};
use super::ticketco_airship::options::{
    self as ticketco_airship, RawAirship, TicketCoAirshipOptions,
};
use crate::config::connection::{Connection, ConnectionKind};
use crate::config::load::{Layers, Problem};
use crate::mapping::Mapping;

/// `[streams.X]` exactly as written: every field optional, unknown keys refused (its field
/// order is the order of the "known keys" a problem lists).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub source: Option<String>,
    pub entity: Option<String>,
    pub target: Option<String>,
    pub enabled: Option<bool>,
    pub every: Option<String>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub jitter: Option<String>,
    pub oldest: Option<String>,
    pub on_bad_record: Option<String>,
    pub page_size: Option<u32>,
    pub max_per_run: Option<u32>,
    pub max_per_payload: Option<u32>,
    pub institution: Option<String>,
    pub mapping: Option<BTreeMap<String, String>>,
    #[serde(rename = "static")]
    pub statics: Option<BTreeMap<String, toml::Value>>,
    pub matching: Option<Vec<String>>,
    // The CRM feed and webhook (feed_webhook/options.rs).
    pub feed: Option<RawFeed>,
    pub webhook: Option<RawWebhook>,
    // S-360: receiver path and auth, matching and order options (s360/options.rs).
    pub s360: Option<RawS360Stream>,
    // Ticket Co x Airship (ticketco_airship/options.rs).
    pub airship: Option<RawAirship>,
    // Integration settings (config/settings.rs) and CM.com CDP (feed_cdp/options.rs).
    /// The company this stream belongs to (default: its connections' company).
    pub company: Option<String>,
    pub cdp: Option<RawCdpStream>,
    // End of integration settings and CDP.
    // SeatGeek / Halo: `[streams.X.halo]` (seatgeek_halo/options.rs).
    pub halo: Option<RawHalo>,
}

/// A stream's kind and its options, as validated: one variant per kind, whose run is the
/// arm of the same name in `streams::run`.
#[derive(Debug, Clone)]
pub enum StreamKind {
    FeedToWebhook {
        feed: FeedOptions,
        webhook: WebhookOptions,
    },
    // S-360
    /// S-360's webhooks, stored by the receiver, relayed from the inbox to a CRM webhook.
    S360Relay {
        relay: RelayOptions,
        webhook: WebhookOptions,
    },
    /// CRM contact changes → `saveIndividualContactData`.
    CrmToS360Contacts {
        feed: FeedOptions,
        contacts: S360ContactOptions,
    },
    /// CRM offer requests → one order each through `createOrUpdateOrder`.
    CrmOffersToS360 {
        feed: FeedOptions,
        offers: S360OfferOptions,
    },
    // Ticket Co x Airship
    TicketCoToAirship(TicketCoAirshipOptions),
    /// CM.com CDP target: contacts from the generic CRM feed as CDP events.
    FeedToCdp {
        feed: FeedOptions,
        cdp: CdpOptions,
    },
    // SeatGeek / Halo
    /// SeatGeek user change events → Halo users (`streams::seatgeek_halo`).
    SeatGeekToHalo(HaloOptions),
}

impl StreamKind {
    /// Whether `usher dead-letters retry` can put this stream's dead letters through again.
    pub fn retries_dead_letters(&self) -> bool {
        matches!(self, StreamKind::FeedToWebhook { .. })
    }

    /// The kind's name, and the keys every stream has that its runs do not read. A key that
    /// validates must do something: written on a stream whose runs ignore it, it is refused.
    pub fn unused_keys(&self) -> (&'static str, &'static [&'static str]) {
        match self {
            StreamKind::FeedToWebhook { .. } => ("crm → crm webhook", &[]),
            // S-360
            StreamKind::S360Relay { .. } => ("s360 → crm relay", &["matching"]),
            // One call per record: no payloads; no URL to fill `{institution}` in.
            StreamKind::CrmToS360Contacts { .. } => (
                "crm → s360 contacts",
                &["max_per_payload", "matching", "institution"],
            ),
            StreamKind::CrmOffersToS360 { .. } => (
                "crm → s360 offers",
                &["max_per_payload", "matching", "institution"],
            ),
            // Ticket Co x Airship: a window of dates, its own options (`[streams.X.airship]`).
            StreamKind::TicketCoToAirship(_) => (
                "ticketco → airship",
                &[
                    "page_size",
                    "max_per_run",
                    "max_per_payload",
                    "oldest",
                    "on_bad_record",
                    "matching",
                    "mapping",
                    "static",
                    "institution",
                ],
            ),
            StreamKind::FeedToCdp { .. } => ("crm → cdp", &["matching", "institution"]),
            // SeatGeek / Halo: users per POST is `halo.batch_size`.
            StreamKind::SeatGeekToHalo(_) => (
                "seatgeek → halo",
                &["max_per_payload", "matching", "institution"],
            ),
        }
    }
}

/// What a stream's kind fills in for the keys every stream has, known from its ends' kinds
/// (as written, also when a connection is broken) before anything else is read.
#[derive(Debug, Default)]
pub(crate) struct KindDefaults {
    /// The kind's runs keep a time zone of their own, the stream's `timezone`: required,
    /// and it serves an `every` schedule too. `Some(None)` when it is missing or not a zone
    /// (reported).
    pub zone: Option<Option<chrono_tz::Tz>>,
    /// The cron schedule, in that zone, of a stream that writes neither `every` nor `cron`.
    pub cron: Option<&'static str>,
    /// The entity of a stream that writes none.
    pub entity: Option<&'static str>,
}

impl KindDefaults {
    pub(crate) fn of(
        l: &mut Layers,
        scope: &str,
        prefix: &str,
        source: Option<ConnectionKind>,
        target: Option<ConnectionKind>,
        timezone: Option<&str>,
    ) -> KindDefaults {
        // Ticket Co x Airship: "today" and the local times sent are the venues'.
        if ticketco_airship::is_ours(source, target) {
            return KindDefaults {
                zone: Some(ticketco_airship::venue_timezone(l, scope, prefix, timezone)),
                cron: Some(ticketco_airship::DEFAULT_CRON),
                entity: Some(ticketco_airship::ENTITY),
            };
        }
        KindDefaults::default()
    }
}

/// A `[streams.X]` table whose keys every stream has are read: what its kind is built from.
pub(crate) struct Stream<'a> {
    pub name: &'a str,
    /// `stream "NAME"`, and `streams.NAME`: where its problems go.
    pub scope: &'a str,
    pub prefix: &'a str,
    pub raw: &'a RawStream,
    /// The ends' connections: None when missing, unknown or broken.
    pub source: Option<&'a Connection>,
    pub target: Option<&'a Connection>,
    /// The ends' kinds as written, also when a connection is broken.
    pub source_kind: Option<ConnectionKind>,
    pub target_kind: Option<ConnectionKind>,
    /// `institution`, or the S-360 source's.
    pub institution: Option<&'a str>,
    pub max_per_payload: u32,
    /// The zone of a kind that keeps one ([`KindDefaults::zone`]), when it is valid.
    pub zone: Option<chrono_tz::Tz>,
}

/// What a stream's source reads and its target writes, each checked on its own so that a
/// bad source does not hide the target's problems (also with a connection broken).
pub(crate) struct Ends {
    feed: Option<FeedOptions>,
    webhook: Option<WebhookOptions>,
    cdp: Option<CdpOptions>,
}

impl Ends {
    pub(crate) fn build(l: &mut Layers, s: &Stream<'_>) -> Ends {
        let raw = s.raw;
        let feed = match s.source.map(|c| c.kind) {
            Some(ConnectionKind::Crm) => Some(feed_webhook::feed(raw.feed.as_ref())),
            // Integration settings branch: cdp and seatsio are not sources.
            Some(k @ (ConnectionKind::Cdp | ConnectionKind::Seatsio)) => {
                l.problem(
                    s.scope,
                    &format!("{}.source", s.prefix),
                    format!("a connection of kind {} cannot be a source", k.as_str()),
                );
                None
            }
            // S-360
            Some(ConnectionKind::S360) | None => None,
            _ => None,
        };
        // CM.com CDP target; also refuses seatsio as a target.
        let cdp = feed_cdp::build(
            l,
            s.scope,
            s.prefix,
            raw.cdp.as_ref(),
            raw.mapping.as_ref(),
            s.target,
            s.max_per_payload,
        );
        let webhook = if s.target_kind == Some(ConnectionKind::Crm) {
            Some(feed_webhook::webhook(
                l,
                s.scope,
                s.prefix,
                s.name,
                s.institution,
                &raw.entity,
                raw.webhook.as_ref(),
                s.target,
            ))
        } else {
            if raw.webhook.is_some() && s.target.is_some() {
                l.problem(
                    s.scope,
                    &format!("{}.webhook", s.prefix),
                    "`webhook` applies only to a target of kind crm",
                );
            }
            None
        };
        if raw.feed.is_some() && s.source.is_some_and(|c| c.kind != ConnectionKind::Crm) {
            l.problem(
                s.scope,
                &format!("{}.feed", s.prefix),
                "`feed` applies only to a source of kind crm",
            );
        }
        Ends { feed, webhook, cdp }
    }
}

/// With a connection broken the kind is not built; what a kind's table holds that is its
/// own problem still is checked: the stream's own secret (what S-360 sends to the receiver).
pub(crate) fn check_own_secrets(
    l: &mut Layers,
    s: &Stream<'_>,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) {
    s360::check_own_auth(
        l,
        s.scope,
        s.prefix,
        s.raw.s360.as_ref(),
        config_dir,
        warnings,
    );
}

/// The stream's kind and its options, from its ends (both sound): None when it has problems
/// (reported). A kind's table written on a stream of another kind is refused.
pub(crate) fn build(
    l: &mut Layers,
    s: &Stream<'_>,
    ends: Ends,
    mapping: &mut Mapping,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<StreamKind> {
    let raw = s.raw;
    // SeatGeek / Halo
    let halo = seatgeek_halo::build(
        l,
        s.scope,
        s.prefix,
        raw.halo.as_ref(),
        raw.entity.as_ref(),
        raw.max_per_run,
        s.source,
        s.target,
        mapping,
    );
    let is_crm = |c: Option<&Connection>| c.is_some_and(|c| c.kind == ConnectionKind::Crm);
    let Ends { feed, webhook, cdp } = ends;
    let kind = match (feed, webhook) {
        // SeatGeek / Halo
        _ if halo.is_some() => halo.map(StreamKind::SeatGeekToHalo),
        (Some(feed), Some(webhook)) if is_crm(s.source) && is_crm(s.target) => {
            Some(StreamKind::FeedToWebhook { feed, webhook })
        }
        // CM.com CDP target.
        (Some(feed), None) if cdp.is_some() => cdp.map(|cdp| StreamKind::FeedToCdp { feed, cdp }),
        // S-360
        (feed, webhook) => s360::build(
            l,
            s.scope,
            s.prefix,
            raw.s360.as_ref(),
            s360::StreamKeys {
                entity: raw.entity.as_deref(),
                institution: raw.institution.as_deref(),
                feed: raw.feed.as_ref(),
            },
            s.source,
            s.target,
            feed,
            webhook,
            mapping,
            config_dir,
            warnings,
        )
        .map(|k| match k {
            S360Options::Relay { relay, webhook } => StreamKind::S360Relay { relay, webhook },
            S360Options::Contacts { feed, contacts } => {
                StreamKind::CrmToS360Contacts { feed, contacts }
            }
            S360Options::Offers { feed, offers } => StreamKind::CrmOffersToS360 { feed, offers },
        }),
    };
    // Ticket Co x Airship
    if ticketco_airship::is_ours(s.source_kind, s.target_kind) {
        return ticketco_airship::build(l, s.scope, s.prefix, raw.airship.as_ref(), s.zone)
            .map(StreamKind::TicketCoToAirship);
    }
    if raw.airship.is_some() {
        l.problem(
            s.scope,
            &format!("{}.airship", s.prefix),
            "`airship` applies only to a stream from a ticketco source to an airship target",
        );
    }
    kind
}
