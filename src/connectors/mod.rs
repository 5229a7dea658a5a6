//! One module per vendor: URLs and JSON, nothing else. Policy (retries, budgets, batching,
//! commits) lives in `http` and `engine`.

pub mod feed;
pub mod webhook;
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
        }
    }
}

/// Checks one connection against its vendor without changing anything there.
pub async fn check_online(http: &Http, conn: &Connection, cancel: &CancellationToken) -> Verdict {
    match conn.kind {
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
    }
}
