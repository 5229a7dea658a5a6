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
use serde_json::Value;

use crate::http::{Http, HttpError, Retry};

/// One page of a source, as the source gave it.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub records: Vec<Value>,
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, thiserror::Error)]
/// Why a source could not give a page.
pub enum SourceError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("connection \"{conn}\": {what}: malformed page: {reason}")]
    Malformed {
        conn: String,
        what: String,
        reason: String,
    },
    #[error(
        "connection \"{conn}\": the source refused the stored cursor as invalid or expired; \
         reset it with `usher cursor reset {stream}` (the re-import creates no duplicates)"
    )]
    InvalidCursor { conn: String, stream: String },
    #[error(
        "connection \"{conn}\": the feed answered cursor {cursor:?} with the same cursor and more records; stopping so as not to loop"
    )]
    Stuck {
        conn: String,
        cursor: Option<String>,
    },
}

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

/// Checks one connection as the configuration uses it: a CRM through the feed and webhook
/// paths of its streams (a generic CRM has no "who am I" call, and its root says nothing),
/// every other kind as [`check_online_with`].
pub async fn check_online_in(
    http: &Http,
    conn: &Connection,
    config: &crate::config::Config,
    cancel: &CancellationToken,
) -> Verdict {
    if conn.kind != ConnectionKind::Crm {
        return check_online_with(http, conn, &config.settings, cancel).await;
    }
    use crate::streams::options::StreamKind;
    let mut verdicts = Vec::new();
    for spec in config.streams.values() {
        let feed = match &spec.kind {
            StreamKind::FeedToWebhook { feed, .. }
            | StreamKind::CrmToS360Contacts { feed, .. }
            | StreamKind::CrmOffersToS360 { feed, .. }
            | StreamKind::FeedToCdp { feed, .. } => Some(feed),
            _ => None,
        };
        if let Some(feed) = feed.filter(|_| spec.source == conn.name) {
            verdicts.push(check_feed(http, conn, spec, feed, cancel).await);
        }
        let webhook = match &spec.kind {
            StreamKind::FeedToWebhook { webhook, .. } | StreamKind::S360Relay { webhook, .. } => {
                Some(webhook)
            }
            _ => None,
        };
        if let Some(webhook) = webhook.filter(|_| spec.target == conn.name) {
            let path = crate::streams::feed_webhook::options::expand(
                &webhook.url,
                &spec.name,
                spec.institution.as_deref(),
                &Some(spec.entity.clone()),
            );
            verdicts.push(check_webhook(http, conn, &spec.name, &path, cancel).await);
        }
    }
    if verdicts.is_empty() {
        return check_root(http, conn, cancel).await;
    }
    // The worst verdict decides; every check is named.
    let text = verdicts
        .iter()
        .map(|v| match v {
            Verdict::Valid(m)
            | Verdict::WrongCredentials(m)
            | Verdict::Unreachable(m)
            | Verdict::Invalid(m) => m.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ");
    if verdicts
        .iter()
        .any(|v| matches!(v, Verdict::WrongCredentials(_)))
    {
        Verdict::WrongCredentials(text)
    } else if verdicts
        .iter()
        .any(|v| matches!(v, Verdict::Unreachable(_)))
    {
        Verdict::Unreachable(text)
    } else if verdicts.iter().any(|v| matches!(v, Verdict::Invalid(_))) {
        Verdict::Invalid(text)
    } else {
        Verdict::Valid(text)
    }
}

/// The stream's feed, asked for one record from the start (a read: nothing changes).
async fn check_feed(
    http: &Http,
    conn: &Connection,
    spec: &crate::config::StreamSpec,
    feed: &crate::streams::feed_webhook::options::FeedOptions,
    cancel: &CancellationToken,
) -> Verdict {
    let source = feed::FeedSource::new(http.endpoint(conn), feed.clone(), &spec.entity);
    let at = format!("feed of stream {:?} at {}", spec.name, source.path);
    match source.pull(&spec.name, None, 1, cancel).await {
        Ok(page) => Verdict::Valid(format!(
            "{at} answered a page ({} record(s))",
            page.records.len()
        )),
        Err(SourceError::Http(e)) => match e {
            HttpError::CredentialsRefused { .. }
            | HttpError::Status {
                status: 401 | 403, ..
            } => Verdict::WrongCredentials(format!("{at}: credentials refused")),
            HttpError::Status { status, .. } => {
                Verdict::Invalid(format!("{at}: HTTP {status}, not a page of the feed"))
            }
            other => Verdict::Unreachable(format!("{at}: {other}")),
        },
        Err(e) => Verdict::Invalid(format!("{at}: {e}")),
    }
}

/// The stream's webhook path, asked with a GET (a check sends no POST: it would deliver).
/// A 405 says the path is there and takes another method; a 404, that it is not there.
async fn check_webhook(
    http: &Http,
    conn: &Connection,
    stream: &str,
    path: &str,
    cancel: &CancellationToken,
) -> Verdict {
    let ep = http.endpoint(conn);
    let url = ep.url(path);
    let at = format!("webhook of stream {stream:?} at {}", url.path());
    match ep
        .send(Method::GET, url, Retry::Once, cancel, |rb| rb)
        .await
    {
        Ok(r) if r.status == 401 || r.status == 403 => {
            Verdict::WrongCredentials(format!("{at}: HTTP {} to a GET", r.status))
        }
        Ok(r) if r.status == 404 || r.status == 410 => {
            Verdict::Invalid(format!("{at}: HTTP {}: no webhook there", r.status))
        }
        Ok(r) if r.status == 405 => Verdict::Valid(format!(
            "{at} is there (HTTP 405 to a GET: it takes POST, which a check does not send)"
        )),
        Ok(r) => Verdict::Valid(format!(
            "{at} answered HTTP {} to a GET (a check sends no POST)",
            r.status
        )),
        Err(HttpError::CredentialsRefused { .. }) => {
            Verdict::WrongCredentials(format!("{at}: credentials refused"))
        }
        Err(e) => Verdict::Unreachable(format!("{at}: {e}")),
    }
}

/// A CRM connection no stream uses: its base URL, which proves only that it answers.
async fn check_root(http: &Http, conn: &Connection, cancel: &CancellationToken) -> Verdict {
    let ep = http.endpoint(conn);
    let path = conn.base_url.path().to_string();
    let unused = "no stream uses this connection, so no feed or webhook path was checked";
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
        Ok(r) if r.status == 401 || r.status == 403 => {
            Verdict::WrongCredentials(format!("HTTP {} from {path}", r.status))
        }
        Ok(r) if r.is_success() => {
            Verdict::Valid(format!("HTTP {} from {path}; {unused}", r.status))
        }
        Ok(r) => Verdict::Invalid(format!("HTTP {} from {path}; {unused}", r.status)),
        Err(HttpError::CredentialsRefused { what, .. }) => Verdict::WrongCredentials(what),
        Err(e) => Verdict::Unreachable(e.to_string()),
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
