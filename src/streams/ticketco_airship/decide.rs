//! The pure part of Ticket Co → Airship: the window a run covers, Airship's local times, the
//! booking and contact sent for a line, and what to do with each line given the ledger
//! (`decide`). Values in, values out; the run (`mod.rs`) does the IO and carries them out.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::options::TicketCoAirshipOptions;
use crate::connectors::ticketco::{Event, Line};
use crate::store::LedgerRow;

/// The attendance dates a run covers, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// Yesterday through today + `days_ahead`, "today" in `tz`; `backfill` moves the start back.
pub fn window(
    now: DateTime<chrono::Utc>,
    tz: Tz,
    days_ahead: u32,
    backfill: Option<NaiveDate>,
) -> Window {
    let today = now.with_timezone(&tz).date_naive();
    let yesterday = today.pred_opt().unwrap_or(today);
    let from = match backfill {
        Some(b) if b < yesterday => b,
        _ => yesterday,
    };
    Window {
        from,
        to: today + chrono::Days::new(days_ahead as u64),
    }
}

/// A vendor time as the venue's local "YYYY-MM-DD HH:MM:SS". A time without an offset is
/// taken as already local.
pub fn local_time(text: &str, tz: Tz) -> Option<String> {
    let t = text.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(wall(&d.with_timezone(&tz).naive_local()));
    }
    for f in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(t, f) {
            return Some(wall(&n));
        }
    }
    None
}

/// "YYYY-MM-DD HH:MM:SS" (written out digit by digit: this runs for every booking of every
/// run).
pub(super) fn wall(t: &NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    let Ok(year) = u32::try_from(t.year()) else {
        return t.format("%Y-%m-%d %H:%M:%S").to_string();
    };
    if year > 9999 {
        return t.format("%Y-%m-%d %H:%M:%S").to_string();
    }
    let mut b = *b"0000-00-00 00:00:00";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    String::from_utf8(b.to_vec()).expect("ASCII digits")
}

/// [`local_time`] with the last answer remembered: the lines of one event carry the same
/// start, so most lookups are the one before.
#[derive(Debug, Default)]
pub struct LocalTimes {
    last: Option<(String, Option<String>)>,
}

impl LocalTimes {
    pub fn get(&mut self, text: &str, tz: Tz) -> Option<String> {
        if let Some((k, v)) = &self.last
            && k == text
        {
            return v.clone();
        }
        let v = local_time(text, tz);
        self.last = Some((text.to_string(), v.clone()));
        v
    }
}

/// The local attendance date of an event start.
pub fn local_date(text: &str, tz: Tz) -> Option<NaiveDate> {
    local_time(text, tz).and_then(|s| NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").ok())
}

/// What one booking line needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Not in the ledger (or dead-lettered before and changed since): write contact + booking.
    New { contact: Contact, hash: String },
    /// In the ledger and changed: update the booking only.
    Update {
        booking: Booking,
        hash: String,
        ids: Value,
    },
    /// In the ledger and unchanged.
    Unchanged,
    /// A new booking that cannot be sent; `hash` remembers the record so it is set aside once.
    Dead { reason: String, hash: String },
    /// Dead-lettered before and unchanged.
    StillDead,
}

/// SHA-256 of a value's JSON, in hex: the ledger's content hash.
pub(super) fn sha<T: Serialize + ?Sized>(v: &T) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(v).expect("JSON values serialize"),
    ))
}

pub(super) fn trimmed(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The Airship booking of one Ticket Co line (inside `POST /contact`, or the body of
/// `POST /booking/update`). Its JSON is what the ledger hashes: the fields are in the order
/// the first version of usher wrote them (as a JSON object), so ledgers written before keep
/// matching.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Booking {
    pub booking_reference: Option<String>,
    pub unit_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub party_size: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub party_datetime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub party_enquirytime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_value: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<BookingData>,
}

/// A booking's custom elements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BookingData {
    /// The booking value, in major units ("450.00").
    pub element_01: String,
}

/// The Airship booking for one Ticket Co line.
pub fn booking(
    item: &Line,
    event: &Event,
    unit: i64,
    o: &TicketCoAirshipOptions,
    starts: &mut LocalTimes,
) -> Booking {
    let tz = o.timezone;
    let lookup = |table: &std::collections::BTreeMap<String, i64>, v: &Option<String>| {
        v.as_deref().and_then(|s| table.get(s.trim()).copied())
    };
    Booking {
        booking_reference: item.ref_number.clone(),
        unit_id: unit,
        party_size: item.quantity,
        party_datetime: item
            .event_start
            .as_deref()
            .or(event.start_at.as_deref())
            .and_then(|s| starts.get(s, tz)),
        party_enquirytime: item
            .transaction_datestamp
            .as_deref()
            .and_then(|s| local_time(s, tz)),
        stage_value: lookup(&o.stages, &item.status),
        source_id: lookup(&o.sources, &item.source),
        type_id: lookup(&o.types, &item.booking_type),
        data: item.price.map(|p| {
            let sign = if p < 0 { "-" } else { "" };
            let a = p.unsigned_abs();
            BookingData {
                element_01: format!("{sign}{}.{:02}", a / 100, a % 100),
            }
        }),
    }
}

/// The `POST /contact` body for a new booking: the contact, its groups on the venue's unit,
/// and the booking inside. Its JSON (hashed for a dead-lettered booking) keeps the field
/// order of the first version of usher, as [`Booking`] does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contact {
    pub account_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mobile_number: Option<String>,
    /// Only ever `Some(true)`: an opt-in elsewhere is never removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_email: Option<bool>,
    pub source_name: String,
    pub units: Vec<ContactUnit>,
    pub bookings: Vec<Booking>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContactUnit {
    pub id: i64,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folder_name: Option<String>,
}

/// The contact for a new booking: its groups on the venue's unit (the booking group, and
/// a group per configured tag the event carries), and the booking inside. `allow_email` is
/// sent only as `true` (an opt-in), so a contact who opted in elsewhere is never opted out;
/// `allow_sms` is never sent.
pub fn contact(
    item: &Line,
    event: &Event,
    booking: &Booking,
    unit: i64,
    account_id: i64,
    o: &TicketCoAirshipOptions,
) -> Contact {
    let mut groups = vec![Group {
        name: o.booking_group.clone(),
        folder_name: None,
    }];
    for tag in &o.event_tags {
        if event.tags.iter().any(|t| t.trim() == tag.trim()) {
            groups.push(Group {
                name: tag.clone(),
                folder_name: o.tag_folder.clone(),
            });
        }
    }
    Contact {
        account_id,
        first_name: trimmed(&item.buyer_first_name),
        last_name: trimmed(&item.buyer_last_name),
        email: trimmed(&item.buyer_email),
        mobile_number: trimmed(&item.buyer_phone),
        allow_email: item.buyer_email_opt_in.then_some(true),
        source_name: o.source_name.clone(),
        units: vec![ContactUnit { id: unit, groups }],
        bookings: vec![booking.clone()],
    }
}

/// New, known-and-changed, unchanged or unsendable: pure, from the line and its ledger row.
pub fn decide(
    item: &Line,
    event: &Event,
    unit: i64,
    account_id: i64,
    o: &TicketCoAirshipOptions,
    ledger: Option<&LedgerRow>,
    starts: &mut LocalTimes,
) -> Action {
    let b = booking(item, event, unit, o, starts);
    let hash = sha(&b);
    if let Some(row) = ledger
        && let Some(ids) = &row.target_ids
    {
        if row.content_hash == hash {
            return Action::Unchanged;
        }
        return Action::Update {
            booking: b,
            hash,
            ids: serde_json::from_str(ids).unwrap_or(Value::Null),
        };
    }
    let c = contact(item, event, &b, unit, account_id, o);
    if trimmed(&item.buyer_email).is_none() && trimmed(&item.buyer_phone).is_none() {
        let dead_hash = format!("dead:{}", sha(&c));
        if ledger.is_some_and(|r| r.content_hash == dead_hash) {
            return Action::StillDead;
        }
        return Action::Dead {
            reason: "the booking has neither an e-mail nor a mobile number (Airship needs one to find the contact)".into(),
            hash: dead_hash,
        };
    }
    Action::New { contact: c, hash }
}
