//! The webhook receiver for S-360: one HTTP listener (`[receiver] listen`), one path per
//! relay stream (e.g. `/s360/myvenue/contacts`), auth per stream (Basic, bearer, API-key
//! header, or none). A POST's body must be a JSON array of records, each with its own ID
//! (`contactNumber`, or `orderDetailsData.orderId`).
//!
//! **200 only after the records are committed to SQLite** (`s360_inbox`): the handler hands
//! its records to one writer task, which commits whatever POSTs are waiting in one
//! transaction (group commit: one fsync for many POSTs) and then answers each. Otherwise:
//! 400 with a reason and nothing stored (malformed JSON, duplicate keys, not an array, an
//! element without its ID or with an ID usher cannot keep exactly), 401 bad credentials, 415
//! a Content-Type other than JSON, 404 unknown path, 405 not a POST, 413 over `max_body`,
//! 503 when the database cannot be written or there is no room for the body
//! (`body_memory`). Records are stored byte for byte as received ([`body`]). A record equal
//! to a stored version (ID and bytes) is a resend: stored once, still 200. An empty array:
//! 200, nothing stored.
//!
//! The listener ([`conn`]) closes stalled connections (`header_timeout`, `idle_timeout`;
//! the handler enforces `body_timeout`) and caps them (`max_connections`), closing idle ones
//! to make room; every refusal closes its connection. Failed authentications are throttled
//! per peer (429 after a few, [`throttle`]), behind `trusted_proxies` by the forwarded
//! client address.
//!
//! Routes follow reloads ([`Receiver::update`]); a disabled stream keeps receiving (only its
//! relay pauses). On shutdown the listener stops taking connections and finishes the POSTs
//! in flight (each either committed and answered, or not answered at all, so S-360 resends).

mod auth;
mod body;
mod conn;
mod throttle;

pub use body::parse_body;
pub use conn::Timeout;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Auth, Config, IpNet, ReceiverSettings};
use crate::metrics::METRICS;
use crate::store::{InboxBatch, InboxOutcome, Store};
use crate::streams::options::StreamKind;
use crate::streams::s360::options::S360Entity;

/// Most POSTs committed together in one transaction.
const MAX_GROUP: usize = 256;

/// One path's stream.
#[derive(Debug, Clone)]
struct Route {
    stream: String,
    entity: S360Entity,
    auth: Auth,
}

type Routes = HashMap<String, Route>;

type Job = (InboxBatch, oneshot::Sender<Result<InboxOutcome, String>>);

/// Most a POST waits for room for its body before it gets a 503.
const BODY_ROOM_WAIT: Duration = Duration::from_secs(5);

/// Bodies larger than this are parsed on the blocking pool, not on the async worker that
/// also accepts connections and answers everyone else.
const PARSE_INLINE_MAX: usize = 64 * 1024;

#[derive(Clone)]
struct Shared {
    routes: Arc<RwLock<Arc<Routes>>>,
    max_body: usize,
    body_timeout: Duration,
    /// Room for bodies (`[receiver] body_memory`), in KiB: a POST takes its declared length
    /// (else `max_body`) before a byte of its body is read and gives it back once answered.
    body_room: Arc<Semaphore>,
    writer: mpsc::Sender<Job>,
    /// Failed authentications per peer (429 after a few; logged once per interval).
    throttle: Arc<Mutex<throttle::AuthThrottle>>,
    trusted_proxies: Arc<[IpNet]>,
}

/// The running receiver: a handle to change its routes on reload.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub settings: ReceiverSettings,
    routes: Arc<RwLock<Arc<Routes>>>,
}

fn routes_of(config: &Config) -> Routes {
    let mut r = Routes::new();
    for spec in config.streams.values() {
        if let StreamKind::S360Relay { relay, .. } = &spec.kind {
            r.insert(
                relay.path.clone(),
                Route {
                    stream: spec.name.clone(),
                    entity: relay.entity,
                    auth: relay.auth.clone(),
                },
            );
        }
    }
    r
}

/// Starts the receiver when the configuration has a `[receiver]` section. The server and its
/// writer run on `tracker`, so the daemon's shutdown waits for POSTs in flight.
pub async fn start(
    config: &Config,
    store: Store,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<Option<Receiver>> {
    let Some(settings) = config.receiver.clone() else {
        return Ok(None);
    };
    let listener = conn::listen(settings.listen).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("receiver: cannot listen on {}: {e}", settings.listen),
        )
    })?;
    let addr = listener.local_addr()?;
    let routes = Arc::new(RwLock::new(Arc::new(routes_of(config))));
    let (tx, rx) = mpsc::channel::<Job>(4096);
    tracker.spawn(writer(store, rx));
    let shared = Shared {
        routes: routes.clone(),
        max_body: settings.max_body,
        body_timeout: settings.body_timeout,
        body_room: Arc::new(Semaphore::new(
            kib(settings.body_memory).min(Semaphore::MAX_PERMITS),
        )),
        writer: tx,
        throttle: Arc::new(Mutex::new(throttle::AuthThrottle::default())),
        trusted_proxies: settings.trusted_proxies.clone().into(),
    };
    tracker.spawn(report_failures(shared.throttle.clone(), shutdown.clone()));
    let app = Router::new().fallback(handle).with_state(shared);
    let limits = conn::Limits {
        header_timeout: settings.header_timeout,
        idle_timeout: settings.idle_timeout,
        max_connections: conn::effective_cap(settings.max_connections),
    };
    tracker.spawn(conn::serve(listener, app, limits, shutdown));
    tracing::info!(listen = %addr, paths = routes.read().map(|r| r.len()).unwrap_or(0), max_connections = limits.max_connections, "S-360 receiver listening");
    Ok(Some(Receiver {
        addr,
        settings,
        routes,
    }))
}

/// Logs the failed authentications of each interval, and the last ones at shutdown.
async fn report_failures(
    throttle: Arc<Mutex<throttle::AuthThrottle>>,
    shutdown: CancellationToken,
) {
    let every = throttle::REPORT_EVERY;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let report = throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report(tokio::time::Instant::now());
        throttle::log_report(&report);
        if stopping {
            return;
        }
    }
}

impl Receiver {
    /// Takes the routes of a reloaded configuration (the address needs a restart).
    pub fn update(&self, config: &Config) {
        if config.receiver.as_ref() != Some(&self.settings) {
            tracing::warn!(
                "the [receiver] settings changed; that takes a restart (still listening on {})",
                self.addr
            );
        }
        let new = Arc::new(routes_of(config));
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = new;
    }
}

/// Commits waiting POSTs together, then answers each.
async fn writer(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (batches, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
        match store.inbox_insert(batches).await {
            Ok(outcomes) => {
                for (reply, o) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(o));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "receiver: cannot store received records; answering 503");
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A refusal; it also closes the connection (a hostile client does not keep it, and S-360
/// opens a new one in a moment).
fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    let mut r = answer(
        status,
        json!({"status": "refused", "reason": reason.into()}),
    );
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// `application/json` or a `+json` type, parameters (charset) allowed.
fn is_json_type(value: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(value) else {
        return false;
    };
    let media = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// Whole KiB (rounded up), the unit of the body room.
fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// Reads the body up to `max`, into one buffer of the declared length when there is one.
/// Past `max`, the rest is read and dropped (up to a bound) so that the sender gets a clean
/// 413 rather than a reset while it is still writing.
async fn read_body(
    body: Body,
    max: usize,
    declared: Option<usize>,
) -> Result<bytes::Bytes, Option<StatusCode>> {
    use futures::StreamExt;
    let drain_cap = max.saturating_mul(16).max(64 * 1024 * 1024);
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(max));
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| None)?;
        seen += chunk.len();
        if seen <= max {
            buf.extend_from_slice(&chunk);
        } else if seen > drain_cap {
            return Err(Some(StatusCode::PAYLOAD_TOO_LARGE));
        }
    }
    if seen > max {
        return Err(Some(StatusCode::PAYLOAD_TOO_LARGE));
    }
    Ok(buf.freeze())
}

/// The client a request comes from: its TCP peer, or, when that is a trusted proxy, the
/// address the proxies' `X-Forwarded-For` names (the rightmost one that is not itself a
/// trusted proxy: what a client writes there itself is further left and not believed).
fn client_ip(peer: IpAddr, headers: &header::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        if !is_trusted(client) {
            break;
        }
        let entry = entry.trim();
        let Some(ip) = entry
            .parse::<IpAddr>()
            .ok()
            .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        else {
            break;
        };
        client = ip;
    }
    client
}

/// The per-peer throttle of failed authentications, then the credentials: Err is the 429
/// or 401 to answer.
#[allow(clippy::result_large_err)] // built once per refused request, answered at once
fn check_credentials(
    shared: &Shared,
    route: &Route,
    path: &str,
    client: Option<IpAddr>,
    req: &Request,
) -> Result<(), Response> {
    let now = tokio::time::Instant::now();
    let throttle = || shared.throttle.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ip) = client
        && let Err(wait) = throttle().check(ip, now)
    {
        METRICS
            .receiver
            .auth_throttled
            .fetch_add(1, Ordering::Relaxed);
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed authentications from this address; try again later",
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
        );
        return Err(r);
    }
    if auth::authorized(&route.auth, req.headers()) {
        if let Some(ip) = client {
            throttle().succeeded(ip, now);
        }
        return Ok(());
    }
    METRICS
        .receiver
        .auth_failures
        .fetch_add(1, Ordering::Relaxed);
    if let Some(peer) = client.and_then(|ip| throttle().failed(ip, now)) {
        tracing::warn!(
            peer = %peer,
            stream = %route.stream,
            path = %path,
            "receiver: credentials refused (more failures from this peer are summed up every {}s)",
            throttle::REPORT_EVERY.as_secs()
        );
    }
    Err(refuse(StatusCode::UNAUTHORIZED, "credentials refused"))
}

async fn handle(State(shared): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let route = {
        let routes = shared
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        routes.get(&path).cloned()
    };
    let Some(route) = route else {
        return refuse(StatusCode::NOT_FOUND, "no stream receives on this path");
    };
    if req.method() != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only POST");
    }
    if !matches!(route.auth, Auth::None) {
        let client = req
            .extensions()
            .get::<conn::Peer>()
            .map(|p| client_ip(p.0.ip(), req.headers(), &shared.trusted_proxies));
        if let Err(refused) = check_credentials(&shared, &route, &path, client, &req) {
            return refused;
        }
        if let Some(c) = req.extensions().get::<conn::ConnHandle>() {
            c.trust();
        }
    }
    // S-360 posts JSON. A body declared as something else is refused (415) whatever it
    // holds; a POST without a Content-Type is read as JSON (the contract does not promise one).
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE)
        && !is_json_type(ct.as_bytes())
    {
        tracing::warn!(stream = %route.stream, "receiver: payload refused (415): not declared as JSON");
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be declared as application/json",
        );
    }
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.max_body as u64) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {} bytes", shared.max_body),
        );
    }
    let declared = declared.map(|n| n as usize);
    // Room for the body before it is read: its declared length, else the most it may be.
    let want = kib(declared.unwrap_or(shared.max_body)).max(1) as u32;
    let room = match tokio::time::timeout(
        BODY_ROOM_WAIT,
        shared.body_room.clone().acquire_many_owned(want),
    )
    .await
    {
        Ok(Ok(permit)) => permit,
        _ => {
            METRICS.receiver.no_room.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(stream = %route.stream, "receiver: too many bodies at once; answering 503");
            let mut r = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many payloads at once; send it again",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(BODY_ROOM_WAIT.as_secs()),
            );
            return r;
        }
    };
    let read = tokio::time::timeout(
        shared.body_timeout,
        read_body(req.into_body(), shared.max_body, declared),
    );
    let bytes = match read.await {
        Err(_) => {
            METRICS.receiver.timed_out(Timeout::Body);
            tracing::debug!(stream = %route.stream, "receiver: body not received within body_timeout (408)");
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive within body_timeout",
            );
        }
        Ok(Ok(b)) => b,
        Ok(Err(Some(status))) => {
            return refuse(
                status,
                format!("the body is over {} bytes", shared.max_body),
            );
        }
        // Broken off: S-360 sees no answer and sends the payload again.
        Ok(Err(None)) => return refuse(StatusCode::BAD_REQUEST, "the body was broken off"),
    };
    let entity = route.entity;
    let parsed = if bytes.len() <= PARSE_INLINE_MAX {
        parse_body(entity, &bytes).map(|r| (r, bytes))
    } else {
        match tokio::task::spawn_blocking(move || parse_body(entity, &bytes).map(|r| (r, bytes)))
            .await
        {
            Ok(p) => p,
            Err(_) => Err("the body could not be read".to_string()),
        }
    };
    let (records, body) = match parsed {
        Ok(r) => r,
        Err(reason) => {
            tracing::warn!(stream = %route.stream, reason = %reason, "receiver: payload refused (400)");
            return refuse(StatusCode::BAD_REQUEST, reason);
        }
    };
    if records.is_empty() {
        return answer(
            StatusCode::OK,
            json!({"status": "stored", "stored": 0, "duplicates": 0}),
        );
    }
    let received = records.len();
    let (tx, rx) = oneshot::channel();
    let job = (
        InboxBatch {
            stream: route.stream.clone(),
            body,
            records,
        },
        tx,
    );
    if shared.writer.send(job).await.is_err() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let stored = tokio::time::timeout(Duration::from_secs(60), rx).await;
    drop(room);
    match stored {
        Ok(Ok(Ok(o))) => {
            tracing::debug!(stream = %route.stream, received, stored = o.stored, duplicates = o.duplicates, "receiver: payload stored");
            answer(
                StatusCode::OK,
                json!({"status": "stored", "stored": o.stored, "duplicates": o.duplicates}),
            )
        }
        _ => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the payload could not be stored; send it again",
        ),
    }
}
