//! `[streams.X.s360]`: the options of the three S-360 stream kinds, as written
//! ([`RawS360Stream`]) and validated, built by `streams::options` when either end of a
//! stream is of kind s360 (the `s360` connection's account and the `[receiver]` section are
//! `config/s360.rs`):
//!
//! - source `s360`, target `crm`, entity `contacts`|`orders`: the webhook relay (inbox → CRM,
//!   [`RelayOptions`]);
//! - source `crm`, target `s360`, entity `contact`: CRM contacts → `saveIndividualContactData`
//!   ([`S360ContactOptions`]);
//! - source `crm`, target `s360`, entity `offer`: CRM offer requests → `createOrUpdateOrder`
//!   ([`S360OfferOptions`]).
//!
//! Every problem names the stream and the key.

use std::path::Path;

use serde::Deserialize;

use crate::config::connection::{Connection, ConnectionKind};
use crate::config::load::{Layers, Problem};
use crate::config::raw::RawAuth;
use crate::config::values::{Auth, build_auth};
use crate::mapping::Mapping;
use crate::streams::feed_webhook::options::{FeedOptions, RawFeed, WebhookOptions};

/// `[streams.X.s360]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS360Stream {
    /// Relay: the receiver path (default `/s360/{institution}/{entity}`).
    pub path: Option<String>,
    /// Relay: how S-360 authenticates its POSTs (none, basic, bearer, api_key).
    pub auth: Option<RawAuth>,
    /// Relay of orders: states that are forwarded (default CLOSED, ABANDONED).
    pub forward_states: Option<Vec<String>>,
    /// Contacts: where the CRM record carries the S-360 contact number.
    pub contact_number: Option<String>,
    /// Offers: the point of sales of created orders.
    pub point_of_sales_id: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S360Entity {
    Contacts,
    Orders,
}

impl S360Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            S360Entity::Contacts => "contacts",
            S360Entity::Orders => "orders",
        }
    }
}

/// The webhook relay S-360 → inbox → CRM.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub entity: S360Entity,
    pub institution: String,
    /// The receiver path, e.g. `/s360/myvenue/contacts`.
    pub path: String,
    /// How the POSTs from S-360 authenticate (never OAuth2).
    pub auth: Auth,
    pub forward_states: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct S360ContactOptions {
    /// Path in the CRM record of the S-360 contact number.
    pub contact_number: String,
}

#[derive(Debug, Clone)]
pub struct S360OfferOptions {
    pub point_of_sales_id: i64,
}

/// The options of a stream with an end of kind s360, by kind.
#[derive(Debug, Clone)]
pub enum S360Options {
    /// S-360's webhooks, stored by the receiver, relayed from the inbox to a CRM webhook.
    Relay {
        relay: RelayOptions,
        webhook: WebhookOptions,
    },
    /// CRM contact changes → `saveIndividualContactData`.
    Contacts {
        feed: FeedOptions,
        contacts: S360ContactOptions,
    },
    /// CRM offer requests → one order each through `createOrUpdateOrder`.
    Offers {
        feed: FeedOptions,
        offers: S360OfferOptions,
    },
}

/// The keys of `[streams.X]` beside its `s360` table that an S-360 stream reads, as written.
#[derive(Clone, Copy)]
pub(crate) struct StreamKeys<'a> {
    pub entity: Option<&'a str>,
    pub institution: Option<&'a str>,
    pub feed: Option<&'a RawFeed>,
}

/// What kind of S-360 stream (if any) a stream is, from its source and target kinds, and
/// its options: from `[streams.X.s360]`, the stream's `entity` and `institution`, and the
/// feed or webhook options of its crm end. A stream with no end of kind s360 that writes
/// `s360` is refused.
#[allow(clippy::too_many_arguments)] // the stream's keys it reads, as `streams::options` holds them
pub(crate) fn build(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    raw: Option<&RawS360Stream>,
    stream: StreamKeys<'_>,
    source: Option<&Connection>,
    target: Option<&Connection>,
    feed: Option<FeedOptions>,
    webhook: Option<WebhookOptions>,
    mapping: &mut Mapping,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<S360Options> {
    let key = |k: &str| format!("{prefix}.{k}");
    let s = raw;
    let (source, target) = (source?, target?);
    let is_s360 = |c: &Connection| c.kind == ConnectionKind::S360;
    if !is_s360(source) && !is_s360(target) {
        if s.is_some() {
            l.problem(
                scope,
                &key("s360"),
                "`s360` applies only to a stream whose source or target is of kind s360",
            );
        }
        return None;
    }
    let entity = stream.entity.unwrap_or("");
    if is_s360(source) {
        let Some(webhook) = webhook else {
            l.problem(
                scope,
                &key("target"),
                "an S-360 webhook stream needs a target of kind crm",
            );
            return None;
        };
        let entity = match entity {
            "contacts" | "contact" => S360Entity::Contacts,
            "orders" | "order" => S360Entity::Orders,
            other => {
                l.problem(
                    scope,
                    &key("entity"),
                    format!(
                        "{other:?}: an S-360 webhook stream carries \"contacts\" or \"orders\""
                    ),
                );
                return None;
            }
        };
        let account = source.s360.as_ref()?;
        let institution = stream
            .institution
            .map(str::to_string)
            .unwrap_or_else(|| account.institution.clone());
        let path = s
            .and_then(|s| s.path.clone())
            .unwrap_or_else(|| "/s360/{institution}/{entity}".into())
            .replace("{institution}", &institution)
            .replace("{entity}", entity.as_str());
        if !path.starts_with('/') || path.contains(['{', '?', '#']) {
            l.problem(
                scope,
                &key("s360.path"),
                format!("{path:?} is not a receiver path (like \"/s360/myvenue/contacts\")"),
            );
        }
        let auth = match s.and_then(|s| s.auth.as_ref()) {
            None => {
                warnings.push(Problem {
                    origin: l.origin_of(prefix),
                    scope: scope.into(),
                    key: key("s360.auth"),
                    message: "the receiver accepts unauthenticated POSTs on this path; \
                              set `auth` unless a proxy in front authenticates S-360"
                        .into(),
                });
                Auth::None
            }
            Some(a) => {
                let auth = build_auth(l, scope, &key("s360.auth"), a, config_dir, warnings)?;
                match auth {
                    Auth::OAuth2 { .. } => {
                        l.problem(
                            scope,
                            &key("s360.auth.type"),
                            "the receiver checks basic, bearer, api_key or none",
                        );
                        return None;
                    }
                    Auth::None => warnings.push(Problem {
                        origin: l.origin_of(prefix),
                        scope: scope.into(),
                        key: key("s360.auth"),
                        message: "the receiver accepts unauthenticated POSTs on this path".into(),
                    }),
                    _ => {}
                }
                auth
            }
        };
        if s.is_some_and(|s| s.contact_number.is_some() || s.point_of_sales_id.is_some()) {
            l.problem(
                scope,
                &key("s360"),
                "`contact_number` and `point_of_sales_id` apply to CRM → S-360 streams",
            );
        }
        let forward_states = s
            .and_then(|s| s.forward_states.clone())
            .unwrap_or_else(|| vec!["CLOSED".into(), "ABANDONED".into()]);
        return Some(S360Options::Relay {
            relay: RelayOptions {
                entity,
                institution,
                path,
                auth,
                forward_states,
            },
            webhook,
        });
    }
    // CRM → S-360.
    let Some(mut feed) = feed else {
        l.problem(
            scope,
            &key("source"),
            "a stream into S-360 reads a source of kind crm",
        );
        return None;
    };
    if s.is_some_and(|s| s.path.is_some() || s.auth.is_some() || s.forward_states.is_some()) {
        l.problem(
            scope,
            &key("s360"),
            "`path`, `auth` and `forward_states` apply to S-360 webhook streams",
        );
    }
    let feed_path_set = stream.feed.is_some_and(|f| f.path.is_some());
    let changed_set = stream.feed.is_some_and(|f| f.changed_at.is_some());
    match entity {
        "contact" | "contacts" => {
            if mapping.is_passthrough() {
                *mapping = default_contact_mapping();
            }
            Some(S360Options::Contacts {
                feed,
                contacts: S360ContactOptions {
                    contact_number: s
                        .and_then(|s| s.contact_number.clone())
                        .unwrap_or_else(|| "s360_contact_number".into()),
                },
            })
        }
        "offer" | "offers" | "offer-request" | "offer-requests" => {
            if !feed_path_set {
                feed.path = "/api/offer-requests".into();
            }
            if !changed_set {
                feed.changed_at = "created_at".into();
            }
            Some(S360Options::Offers {
                feed,
                offers: S360OfferOptions {
                    point_of_sales_id: s.and_then(|s| s.point_of_sales_id).unwrap_or(1),
                },
            })
        }
        other => {
            l.problem(
                scope,
                &key("entity"),
                format!("{other:?}: a stream into S-360 carries \"contact\" or \"offer\""),
            );
            None
        }
    }
}

/// CRM contact → `saveIndividualContactData` body, when the stream maps nothing itself.
pub fn default_contact_mapping() -> Mapping {
    let mut m = Mapping::default();
    for (t, e) in [
        ("individualContact.firstName", "first_name | trim"),
        ("individualContact.lastName", "last_name | trim"),
        ("individualContact.email", "email | trim | lowercase"),
        ("individualContact.cellPhoneNumber", "phone | trim"),
    ] {
        m.fields
            .push(Mapping::parse_field(t, e).expect("static mapping parses"));
    }
    m
}

/// `s360.auth` (how S-360 authenticates to the receiver) on its own, for a stream whose kind
/// is not built (a connection broken): its secret is the stream's own problem.
pub(crate) fn check_own_auth(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    raw: Option<&RawS360Stream>,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) {
    if let Some(a) = raw.and_then(|s| s.auth.as_ref()) {
        build_auth(
            l,
            scope,
            &format!("{prefix}.s360.auth"),
            a,
            config_dir,
            warnings,
        );
    }
}
