//! A connection as validated: its kind, base URL, timeouts, retries, rate limit, auth and
//! the account fields of its vendor. Built by `build.rs` (and the vendor modules it calls);
//! below the stream kinds' options, which check a stream's ends against it.

use std::time::Duration;

use url::Url;

use super::values::Auth;
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct Connection {
    pub name: String,
    pub kind: ConnectionKind,
    pub base_url: Url,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts after the first for retryable failures (5xx, resets, timeouts).
    pub max_retries: u32,
    pub rate_limit: Option<RateLimit>,
    pub auth: Auth,
    // S-360: the instance's account (kind s360 only).
    pub s360: Option<S360Account>,
    // Ticket Co x Airship
    /// Ticket Co: the API token (sent as `?token=`, never in a message). Airship's personal
    /// access token is `auth` (bearer).
    pub api_token: Option<Secret>,
    /// Airship: the account every contact is written to.
    pub account_id: Option<i64>,
    // SeatGeek / Halo: the Halo tenant (the token call's `tenant`); None for other kinds.
    pub tenant: Option<String>,
}

impl Connection {
    /// The key of the rate budget this connection draws from. S-360 limits calls per
    /// instance, so every S-360 connection to one institution shares one budget.
    pub fn budget_key(&self) -> String {
        match &self.s360 {
            Some(a) => format!("s360:{}", a.institution),
            None => self.name.clone(),
        }
    }

    /// How long a 429/509 without `Retry-After` means to wait, when the vendor documents it.
    pub fn rate_window(&self) -> Option<Duration> {
        match self.kind {
            ConnectionKind::S360 => Some(S360_RATE_WINDOW),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A generic HTTP CRM: cursor feed source and webhook target (vendor-apis "ExtCRM").
    Crm,
    // S-360
    /// An S-360 instance: REST-RPC API with an HS256 JWT (vendor-apis "S-360").
    S360,
    // Ticket Co x Airship
    /// Ticket Co bookings (source); API token in the query string.
    TicketCo,
    /// Airship hospitality CRM (target); personal access token and account ID.
    Airship,
    // Integration settings branch: CM.com Customer Data Platform (target) and seats.io.
    Cdp,
    Seatsio,
    // SeatGeek / Halo
    /// SeatGeek's partner feed of user change events (source).
    SeatGeek,
    /// Halo PSA/ITSM users (target).
    Halo,
    // end SeatGeek / Halo
}

impl ConnectionKind {
    pub const NAMES: &'static [&'static str] = &[
        "crm", "s360", "ticketco", "airship", "cdp", "seatsio", "seatgeek", "halo",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crm" => Some(ConnectionKind::Crm),
            "s360" => Some(ConnectionKind::S360),
            // Ticket Co x Airship
            "ticketco" => Some(ConnectionKind::TicketCo),
            "airship" => Some(ConnectionKind::Airship),
            "cdp" => Some(ConnectionKind::Cdp),
            "seatsio" => Some(ConnectionKind::Seatsio),
            // SeatGeek / Halo
            "seatgeek" => Some(ConnectionKind::SeatGeek),
            "halo" => Some(ConnectionKind::Halo),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Crm => "crm",
            ConnectionKind::S360 => "s360",
            // Ticket Co x Airship
            ConnectionKind::TicketCo => "ticketco",
            ConnectionKind::Airship => "airship",
            ConnectionKind::Cdp => "cdp",
            ConnectionKind::Seatsio => "seatsio",
            // SeatGeek / Halo
            ConnectionKind::SeatGeek => "seatgeek",
            ConnectionKind::Halo => "halo",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u32,
    pub per: Duration,
}

/// S-360's documented limit: 180 calls per minute per instance, all endpoints together.
pub const S360_RATE_LIMIT: RateLimit = RateLimit {
    calls: 180,
    per: Duration::from_secs(60),
};
/// S-360's documented window: what a 509/429 without `Retry-After` means.
pub const S360_RATE_WINDOW: Duration = Duration::from_secs(20);

/// One S-360 instance's API account.
#[derive(Debug, Clone)]
pub struct S360Account {
    /// The institution code: the JWT's `sub`, the default host, the budget's key.
    pub institution: String,
    /// The JWT's `aud`.
    pub virtual_operator: String,
    /// The JWT's `iss`.
    pub partner_name: String,
    /// The HS256 key.
    pub partner_secret: Secret,
}
