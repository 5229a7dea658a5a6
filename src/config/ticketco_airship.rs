//! Ticket Co x Airship: the connection fields of kinds `ticketco` and `airship`, and the
//! `[streams.X.airship]` options, checked with every problem reported (called from `build.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use chrono::NaiveDate;

use super::load::{Layers, Problem};
use super::raw::{RawAirship, RawConnection};
use super::values::secret;
use super::{Auth, ConnectionKind, TicketCoAirshipOptions};
use crate::secret::Secret;

/// What a `ticketco` or `airship` connection adds: (Ticket Co API token, Airship account ID,
/// Airship auth). Keys of the other kind are refused.
#[allow(clippy::too_many_arguments)] // mirrors `build::secret`'s inputs
pub(super) fn connection_fields(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    kind: Option<ConnectionKind>,
    raw: &RawConnection,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> (Option<Secret>, Option<i64>, Option<Auth>) {
    let ticketco_keys = [
        ("api_token", raw.api_token.is_some()),
        ("api_token_file", raw.api_token_file.is_some()),
        ("api_token_env", raw.api_token_env.is_some()),
    ];
    let airship_keys = [
        ("access_token", raw.access_token.is_some()),
        ("access_token_file", raw.access_token_file.is_some()),
        ("access_token_env", raw.access_token_env.is_some()),
        ("account_id", raw.account_id.is_some()),
    ];
    let refuse = |l: &mut Layers, keys: &[(&str, bool)], k: &str| {
        for (key, set) in keys {
            if *set {
                l.problem(
                    scope,
                    &format!("{prefix}.{key}"),
                    format!("`{key}` does not apply to a connection of kind {k}"),
                );
            }
        }
    };
    let generic = [
        ("auth", raw.auth.is_some()),
        ("tenant", raw.tenant.is_some()),
        ("client_id", raw.client_id.is_some()),
        ("client_secret", raw.client_secret.is_some()),
        ("client_secret_file", raw.client_secret_file.is_some()),
        ("client_secret_env", raw.client_secret_env.is_some()),
    ];
    match kind {
        Some(ConnectionKind::TicketCo) => {
            refuse(l, &airship_keys, "ticketco");
            refuse(l, &generic, "ticketco (the API token is `api_token_file`)");
            let token = secret(
                l,
                scope,
                prefix,
                "api_token",
                raw.api_token.as_ref(),
                raw.api_token_file.as_ref(),
                raw.api_token_env.as_ref(),
                config_dir,
                warnings,
            );
            (token, None, None)
        }
        Some(ConnectionKind::Airship) => {
            refuse(l, &ticketco_keys, "airship");
            refuse(l, &generic, "airship (the token is `access_token_file`)");
            let token = secret(
                l,
                scope,
                prefix,
                "access_token",
                raw.access_token.as_ref(),
                raw.access_token_file.as_ref(),
                raw.access_token_env.as_ref(),
                config_dir,
                warnings,
            );
            let account = match raw.account_id {
                None => {
                    l.problem(
                        scope,
                        &format!("{prefix}.account_id"),
                        "missing key `account_id` (the Airship account number)",
                    );
                    None
                }
                Some(n) if n <= 0 => {
                    l.problem(
                        scope,
                        &format!("{prefix}.account_id"),
                        "`account_id` must be a positive number",
                    );
                    None
                }
                Some(n) => Some(n),
            };
            (None, account, token.map(|token| Auth::Bearer { token }))
        }
        _ => {
            let k = kind.map(|k| k.as_str()).unwrap_or("?");
            refuse(l, &ticketco_keys, k);
            refuse(l, &airship_keys, k);
            (None, None, None)
        }
    }
}

/// `[streams.X.airship]`, for a stream from a `ticketco` source to an `airship` target.
pub(super) fn stream_options(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    raw: Option<&RawAirship>,
    timezone: Option<chrono_tz::Tz>,
) -> Option<TicketCoAirshipOptions> {
    let key = |k: &str| format!("{prefix}.airship.{k}");
    let Some(raw) = raw else {
        l.problem(
            scope,
            &format!("{prefix}.airship"),
            "missing table `[streams.NAME.airship]` (at least `venues`)",
        );
        return None;
    };
    let before = l.problems.len();
    let venues: Vec<String> = raw.venues.clone().unwrap_or_default();
    if venues.is_empty() {
        l.problem(
            scope,
            &key("venues"),
            "missing key `venues` (the Ticket Co venue names to send, as Ticket Co spells them)",
        );
    }
    if let Some(d) = venues.iter().find(|v| v.trim().is_empty()) {
        l.problem(scope, &key("venues"), format!("empty venue name {d:?}"));
    }
    let unit_ids = raw.unit_ids.clone().unwrap_or_default();
    for (venue, id) in &unit_ids {
        if !venues.contains(venue) {
            l.problem(
                scope,
                &key(&format!("unit_ids.{venue}")),
                format!("{venue:?} is not one of `venues`"),
            );
        }
        if *id <= 0 {
            l.problem(
                scope,
                &key(&format!("unit_ids.{venue}")),
                "a unit ID is a positive number",
            );
        }
    }
    let days_ahead = match raw.days_ahead {
        None => 30,
        Some(n) if n <= 366 => n,
        Some(n) => {
            l.problem(
                scope,
                &key("days_ahead"),
                format!("{n} is out of range (0 to 366)"),
            );
            30
        }
    };
    let mut stages: BTreeMap<String, i64> = [
        ("paid".to_string(), 1),
        ("reserved".to_string(), 1),
        ("cancelled".to_string(), 550),
    ]
    .into_iter()
    .collect();
    for (status, v) in raw.stages.iter().flatten() {
        if !["paid", "reserved", "cancelled", "no_show"].contains(&status.as_str()) {
            l.problem(
                scope,
                &key(&format!("stages.{status}")),
                format!(
                    "unknown Ticket Co status {status:?} (known: paid, reserved, cancelled, no_show)"
                ),
            );
        }
        stages.insert(status.clone(), *v);
    }
    let backfill_from = raw.backfill_from.as_ref().and_then(|d| {
        match NaiveDate::parse_from_str(d.trim(), "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(_) => {
                l.problem(
                    scope,
                    &key("backfill_from"),
                    format!("{d:?} is not a date (YYYY-MM-DD)"),
                );
                None
            }
        }
    });
    let event_tags = raw.event_tags.clone().unwrap_or_default();
    if event_tags.iter().any(|t| t.trim().is_empty()) {
        l.problem(scope, &key("event_tags"), "an event tag is empty");
    }
    if l.problems.len() != before {
        return None;
    }
    // The stream's `timezone`, required (its problem is reported with the stream's keys).
    let timezone = timezone?;
    Some(TicketCoAirshipOptions {
        timezone,
        days_ahead,
        venues,
        unit_ids,
        stages,
        sources: raw.sources.clone().unwrap_or_default(),
        types: raw.types.clone().unwrap_or_default(),
        event_tags,
        tag_folder: raw.tag_folder.clone().filter(|f| !f.trim().is_empty()),
        booking_group: raw
            .booking_group
            .clone()
            .unwrap_or_else(|| "Booking".into()),
        backfill_from,
        source_name: raw
            .source_name
            .clone()
            .unwrap_or_else(|| "Ticket Co".into()),
    })
}
