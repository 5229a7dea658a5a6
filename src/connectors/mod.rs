//! One module per vendor: URLs and JSON, nothing else. Policy (retries, budgets, batching,
//! commits) lives in `http` and `engine`.

pub mod feed;
// S-360
pub mod s360;
pub mod webhook;
// Ticket Co x Airship
pub mod airship;
pub mod ticketco;
// Integration settings branch: CM.com CDP and seats.io.
pub mod cdp;
pub mod seatsio;
// SeatGeek / Halo
pub mod halo;
pub mod seatgeek;

use std::fmt;

use reqwest::Method;
use tokio_util::sync::CancellationToken;

use crate::config::{Connection, ConnectionKind};
use crate::http::{Http, HttpError, Retry};

/// What `usher validate --online` says of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(String),
    WrongCredentials(String),
    Unreachable(String),
    /// Reachable and answering, but the account is not usable as configured (e.g. a
    /// seats.io workspace that is inactive or not found).
    Invalid(String),
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Valid(m) => write!(f, "valid ({m})"),
            Verdict::WrongCredentials(m) => write!(f, "wrong credentials ({m})"),
            Verdict::Unreachable(m) => write!(f, "unreachable ({m})"),
            Verdict::Invalid(m) => write!(f, "invalid ({m})"),
        }
    }
}

/// Checks one connection against its vendor without changing anything there.
pub async fn check_online(http: &Http, conn: &Connection, cancel: &CancellationToken) -> Verdict {
    check_online_with(http, conn, &crate::config::Settings::default(), cancel).await
}

/// [`check_online`] with the settings that hold vendor accounts (CDP tenant, seats.io keys).
pub async fn check_online_with(
    http: &Http,
    conn: &Connection,
    settings: &crate::config::Settings,
    cancel: &CancellationToken,
) -> Verdict {
    match conn.kind {
        // Integration settings branch: CM.com CDP and seats.io.
        ConnectionKind::Cdp => {
            let Some(account) = settings.cdp.get(&conn.name) else {
                return Verdict::WrongCredentials("no CDP account configured".into());
            };
            let target = cdp::CdpTarget::new(http, conn, account);
            match target.check(cancel).await {
                Ok(cdp::CdpDelivery::Accepted) => {
                    Verdict::Valid("product token accepted for the tenant".into())
                }
                Ok(cdp::CdpDelivery::ConfigError { status, .. }) => {
                    Verdict::WrongCredentials(format!("HTTP {status}: {}", cdp::explain(status)))
                }
                Ok(cdp::CdpDelivery::Refused {
                    status: Some(s),
                    reason,
                }) => Verdict::Unreachable(format!("HTTP {s}: {reason}")),
                Ok(cdp::CdpDelivery::Refused {
                    status: None,
                    reason,
                }) => Verdict::Unreachable(reason),
                Err(e) => Verdict::Unreachable(e.to_string()),
            }
        }
        ConnectionKind::Seatsio => {
            let Some(account) = settings.seatsio.get(&conn.name) else {
                return Verdict::WrongCredentials("no seats.io account configured".into());
            };
            match seatsio::check(http, conn, account, cancel).await {
                c @ seatsio::SeatsioCheck::Valid(_) => Verdict::Valid(c.message()),
                seatsio::SeatsioCheck::Unreachable(detail) => Verdict::Unreachable(detail),
                c @ seatsio::SeatsioCheck::KeyRefused => Verdict::WrongCredentials(c.message()),
                c => Verdict::Invalid(c.message()),
            }
        }
        // SeatGeek / Halo
        ConnectionKind::SeatGeek => seatgeek::check(http, conn, cancel).await,
        ConnectionKind::Halo => halo::check(http, conn, cancel).await,
        ConnectionKind::Crm => {
            // A generic CRM has no standard "who am I" call: ask its base URL and judge the
            // status. 401/403 mean the credentials are refused; any other answer, reachable.
            let ep = http.endpoint(conn);
            match ep
                .send(
                    Method::GET,
                    conn.base_url.clone(),
                    Retry::Once,
                    cancel,
                    |rb| rb,
                )
                .await
            {
                Ok(r) if r.status == 401 || r.status == 403 => Verdict::WrongCredentials(format!(
                    "HTTP {} from {}",
                    r.status,
                    conn.base_url.path()
                )),
                Ok(r) => Verdict::Valid(format!("HTTP {} from {}", r.status, conn.base_url.path())),
                Err(HttpError::CredentialsRefused { what, .. }) => Verdict::WrongCredentials(what),
                Err(e) => Verdict::Unreachable(e.to_string()),
            }
        }
        // S-360
        ConnectionKind::S360 => {
            let client = s360::S360Client {
                endpoint: http.endpoint(conn),
            };
            match client.check(cancel).await {
                Ok(()) => Verdict::Valid("searchContact answered SUCCESS with the JWT".into()),
                Err(s360::S360Error::Http(HttpError::CredentialsRefused { what, .. })) => {
                    Verdict::WrongCredentials(format!("JWT refused at {what}"))
                }
                Err(s360::S360Error::Http(HttpError::Status {
                    status: 401 | 403,
                    what,
                    ..
                })) => Verdict::WrongCredentials(format!("JWT refused at {what}")),
                Err(s360::S360Error::Status { code, detail, .. }) => {
                    Verdict::WrongCredentials(format!("S-360 answered {code}: {detail}"))
                }
                Err(e) => Verdict::Unreachable(e.to_string()),
            }
        }
        // Ticket Co x Airship
        ConnectionKind::TicketCo => ticketco::check(http, conn, cancel).await,
        ConnectionKind::Airship => airship::check(http, conn, cancel).await,
    }
}
