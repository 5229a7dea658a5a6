//! `[streams.X.airship]`: the options of the daily Ticket Co bookings → Airship stream, as
//! written ([`RawAirship`]) and validated ([`TicketCoAirshipOptions`]), and the zone its
//! runs keep (the stream's `timezone`, required), built by `streams::options` when a
//! stream's ends are a `ticketco` source and an `airship` target (the connections' own
//! fields are checked in `config/ticketco_airship.rs`). Every problem names the stream and
//! the key.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::Deserialize;

use crate::config::connection::ConnectionKind;
use crate::config::load::Layers;
use crate::schedule::parse_tz;

/// `[streams.X.airship]` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAirship {
    pub days_ahead: Option<u32>,
    pub venues: Option<Vec<String>>,
    pub unit_ids: Option<BTreeMap<String, i64>>,
    pub stages: Option<BTreeMap<String, i64>>,
    pub sources: Option<BTreeMap<String, i64>>,
    pub types: Option<BTreeMap<String, i64>>,
    pub event_tags: Option<Vec<String>>,
    pub tag_folder: Option<String>,
    pub booking_group: Option<String>,
    pub backfill_from: Option<String>,
    pub source_name: Option<String>,
}

/// `[streams.X.airship]`: the daily Ticket Co bookings → Airship run.
#[derive(Debug, Clone)]
pub struct TicketCoAirshipOptions {
    /// "today" and the venues' local time: the stream's `timezone`, required (the offsets
    /// in Ticket Co's times change with daylight saving, so they do not give the zone).
    pub timezone: chrono_tz::Tz,
    /// Attendance dates from yesterday through today + `days_ahead`.
    pub days_ahead: u32,
    /// Ticket Co venue names (`location_name`) to send; others are left out.
    pub venues: Vec<String>,
    /// Venue name → Airship unit ID, for venues whose unit is not found by name.
    pub unit_ids: BTreeMap<String, i64>,
    /// Ticket Co status → Airship `stage_value`; a status not listed sends no stage.
    pub stages: BTreeMap<String, i64>,
    /// Ticket Co `source` → Airship `source_id`.
    pub sources: BTreeMap<String, i64>,
    /// Ticket Co `booking_type` → Airship `type_id`.
    pub types: BTreeMap<String, i64>,
    /// Event tags that put the contact in a group of the same name on the venue's unit.
    pub event_tags: Vec<String>,
    /// The folder those tag groups go in, if any.
    pub tag_folder: Option<String>,
    /// The group every contact joins on the booked venue's unit.
    pub booking_group: String,
    /// The first run imports from this date (attendance date), not from yesterday.
    pub backfill_from: Option<chrono::NaiveDate>,
    /// `source_name` on contacts written.
    pub source_name: String,
}

/// Whether a stream's ends (their kinds as written) make it a Ticket Co → Airship stream.
pub(crate) fn is_ours(source: Option<ConnectionKind>, target: Option<ConnectionKind>) -> bool {
    source == Some(ConnectionKind::TicketCo) && target == Some(ConnectionKind::Airship)
}

/// When the stream writes neither `every` nor `cron`: daily at 03:00 in the venues' zone.
pub(crate) const DEFAULT_CRON: &str = "0 3 * * *";

/// The entity when the stream writes none.
pub(crate) const ENTITY: &str = "booking";

/// The venues' time zone, the stream's `timezone`. The window's "today" and the local times
/// sent to Airship are the venue's, so it is required: never a silent UTC.
pub(crate) fn venue_timezone(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    timezone: Option<&str>,
) -> Option<chrono_tz::Tz> {
    let key = format!("{prefix}.timezone");
    match timezone.map(parse_tz) {
        None => {
            l.problem(
                scope,
                &key,
                "missing key `timezone` (the venues' time zone, e.g. \"Europe/Oslo\"): a Ticket Co → Airship \
                 stream takes \"today\" (its window of attendance dates) and the local times it sends to \
                 Airship (`party_datetime`, `party_enquirytime`) in it; the offsets in Ticket Co's times are \
                 not a zone (they change with daylight saving), so usher does not guess it",
            );
            None
        }
        Some(Ok(tz)) => Some(tz),
        Some(Err(e)) => {
            l.problem(scope, &key, e.to_string());
            None
        }
    }
}

/// `[streams.X.airship]`, for a stream from a `ticketco` source to an `airship` target, in
/// the venues' zone (the stream's `timezone`: see [`venue_timezone`]).
pub(crate) fn build(
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
