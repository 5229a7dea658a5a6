//! `[streams.X.cdp]`: the options of a stream into CM.com's Customer Data Platform, as
//! written ([`RawCdpStream`]) and validated ([`CdpOptions`]), built by `streams::options`
//! for a stream whose target is of kind cdp (the `cdp` connection's own account is checked
//! in `config/settings.rs`). Every problem names the stream and the key.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::connection::{Connection, ConnectionKind};
use crate::config::load::Layers;
use crate::config::values::is_guid;

/// `[streams.X.cdp]`: what a CDP target stream sends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCdpStream {
    /// The CDP event type (a GUID); the mapping's target fields are its field labels.
    pub event_type_id: Option<String>,
}

/// `[streams.X.cdp]`: the CDP event type; the mapping's target fields are its field labels.
#[derive(Debug, Clone)]
pub struct CdpOptions {
    pub event_type_id: String,
}

/// The `[streams.X.cdp]` options of a stream whose target is a `cdp` connection; refuses
/// the table on any other target, and `seatsio` as a target (it is checked, never written).
pub(crate) fn build(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    raw: Option<&RawCdpStream>,
    mapping: Option<&BTreeMap<String, String>>,
    target: Option<&Connection>,
    max_per_payload: u32,
) -> Option<CdpOptions> {
    let kind = target.map(|t| t.kind);
    if kind == Some(ConnectionKind::Seatsio) {
        l.problem(
            scope,
            &format!("{prefix}.target"),
            "a seatsio connection cannot be a target (usher checks it with `validate --online`)",
        );
        return None;
    }
    if kind != Some(ConnectionKind::Cdp) {
        if raw.is_some() && target.is_some() {
            l.problem(
                scope,
                &format!("{prefix}.cdp"),
                "`cdp` applies only to a target of kind cdp",
            );
        }
        return None;
    }
    if max_per_payload > CDP_MAX_EVENTS {
        l.problem(
            scope,
            &format!("{prefix}.max_per_payload"),
            format!("{max_per_payload} is more than the CDP takes in one POST ({CDP_MAX_EVENTS})"),
        );
    }
    if mapping.is_none_or(|m| m.is_empty()) {
        l.problem(
            scope,
            &format!("{prefix}.mapping"),
            "a CDP stream needs a mapping: each key is a field label of the event type",
        );
    }
    match raw.and_then(|c| c.event_type_id.clone()) {
        None => {
            l.problem(
                scope,
                &format!("{prefix}.cdp.event_type_id"),
                "missing key `event_type_id` (the CDP event type, a GUID)",
            );
            None
        }
        Some(t) if !is_guid(&t) => {
            l.problem(
                scope,
                &format!("{prefix}.cdp.event_type_id"),
                format!("{t:?} is not a GUID (8-4-4-4-12 hexadecimal digits)"),
            );
            None
        }
        Some(t) => Some(CdpOptions { event_type_id: t }),
    }
}

/// The CDP takes at most this many events per POST (vendor-apis).
pub const CDP_MAX_EVENTS: u32 = 100;
