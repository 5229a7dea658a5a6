//! The one HTTP client every connector uses, and the policy around it: timeouts, retries
//! with capped exponential backoff and jitter, `Retry-After` (seconds or HTTP date), the
//! per-connection rate budget shared by every stream that uses the connection, auth
//! (Basic, bearer, API-key header, OAuth2 client credentials with a cached token), and
//! error messages that name the connection and the call but never a secret or a query
//! string (some vendors put tokens there).
//!
//! Connectors know URLs and JSON; they never loop, sleep or count attempts themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, StatusCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, RateLimit};
use crate::secret::Secret;

mod budget;
pub use budget::{Budget, BudgetLog, SavedBudget};

/// Longest wait a `Retry-After` may impose inside one run; past it the run ends and the
/// budget keeps the connection quiet until the time has passed.
pub const MAX_RATE_WAIT: Duration = Duration::from_secs(300);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection \"{conn}\": {what}: {kind} (after {attempts} attempt(s))")]
    Transport {
        conn: String,
        what: String,
        kind: TransportKind,
        attempts: u32,
    },
    #[error(
        "connection \"{conn}\": {what}: HTTP {status} (after {attempts} attempt(s)): {snippet}"
    )]
    Status {
        conn: String,
        what: String,
        status: u16,
        snippet: String,
        attempts: u32,
    },
    #[error("connection \"{conn}\": credentials refused (HTTP 401) at {what}")]
    CredentialsRefused { conn: String, what: String },
    #[error(
        "connection \"{conn}\": {what}: rate limited, asked to wait {wait_secs}s (more than usher waits within one run)"
    )]
    RateLimited {
        conn: String,
        what: String,
        wait_secs: u64,
    },
    /// Shutdown: `what` was not sent, or (abandoned) its answer was not awaited.
    #[error("stopped by shutdown: {what} was not sent or not waited for")]
    Cancelled { what: String },
    /// The state could not record that a write was about to leave, so it was not sent:
    /// a write usher cannot account for after a crash is not made.
    #[error("connection \"{conn}\": {what}: not sent, the state cannot record it: {reason}")]
    NotRecorded {
        conn: String,
        what: String,
        reason: String,
    },
    /// Several instances: the run's lease could not be shown to outlast the call.
    #[error("connection \"{conn}\": {what}: not sent: {reason}")]
    NotHeld {
        conn: String,
        what: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Timeout,
    Connect,
    /// The process (EMFILE) or the system (ENFILE) has no descriptor left for a socket:
    /// nothing was sent, and it is not the vendor's fault.
    NoDescriptors,
    /// Reset, closed early, or a broken response.
    Broken,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Timeout => "timed out",
            TransportKind::Connect => "could not connect",
            TransportKind::NoDescriptors => {
                "too many open files: no descriptor left for a connection (raise LimitNOFILE, or see process_open_fds in /metrics)"
            }
            TransportKind::Broken => "connection reset or response broken off",
        })
    }
}

impl HttpError {
    /// True when the request may have reached the server: its effect is unknown.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            HttpError::Transport {
                kind: TransportKind::Timeout | TransportKind::Broken,
                ..
            }
        ) || matches!(self, HttpError::Status { status, .. } if *status >= 500)
    }

    /// True when the request may still reach the vendor and take effect although no answer
    /// was seen: a timeout, a broken connection, or a gateway's 502/504 (the gateway gave
    /// up; the vendor behind it may still be working). Such a write is *in doubt* until its
    /// deadline plus the settle margin (see [`Recorder`]).
    pub fn answer_unseen(&self) -> bool {
        matches!(
            self,
            HttpError::Transport {
                kind: TransportKind::Timeout | TransportKind::Broken,
                ..
            }
        ) || matches!(self, HttpError::Status { status, .. } if gateway_gave_up(*status))
    }
}

/// 502 and 504 come from a gateway in front of the vendor: the request may still be
/// carried out behind it, so they are not an answer from the vendor.
pub fn gateway_gave_up(status: u16) -> bool {
    status == 502 || status == 504
}

/// Whether a call may be repeated on 5xx, timeouts and resets within one attempt at a page,
/// and whether it writes (writes are told to the endpoint's [`Recorder`] before they leave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads: retried with backoff up to the connection's `max_retries`.
    Idempotent,
    /// Sent once; any answer (and any transport error) goes back to the caller.
    /// 429/509 are still waited for and repeated: they mean "not processed".
    Once,
    /// A write that repeats harmlessly (an update, an upsert by key): retried like a read.
    IdempotentWrite,
    /// A write that creates: sent once, like [`Retry::Once`].
    CreateOnce,
}

impl Retry {
    fn repeats(self) -> bool {
        matches!(self, Retry::Idempotent | Retry::IdempotentWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Retry::IdempotentWrite | Retry::CreateOnce)
    }
}

/// Told about every attempt of a write on an endpoint (see [`Endpoint::with_recorder`]), so
/// that a write whose answer usher does not see is known to be *in doubt* until it can no
/// longer land, by the same run and, through the state, by a process started after a crash.
pub trait Recorder: Send + Sync {
    /// The attempt is about to leave and may take effect at the vendor until `deadline`
    /// (now plus the connection's timeout, which bounds the request end to end). An error
    /// means the fact could not be recorded: the attempt is not sent.
    fn sending<'a>(
        &'a self,
        what: &'a str,
        deadline: chrono::DateTime<chrono::Utc>,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;

    /// The attempt got no answer from the vendor (timeout, broken connection, 502/504): it
    /// may still take effect until `deadline`.
    fn unanswered(&self, deadline: chrono::DateTime<chrono::Utc>);
}

/// Asked before every call (reads too) of a run under a lease (several instances): may the
/// call leave and be over, answer and all, within `within`? An error is why not (the
/// lease is another instance's now): the call is not sent. So an instance that was paused
/// or cut off past its lease never calls a vendor again for the stream, not even to read.
pub trait Gate: Send + Sync {
    fn may_call(&self, within: Duration) -> futures::future::BoxFuture<'_, Result<(), String>>;
}

/// An answer, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    pub attempts: u32,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The start of the body as text, for error messages.
    pub fn snippet(&self) -> String {
        snippet(&self.body)
    }
}

pub fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
    s.replace(['\n', '\r'], " ")
}

/// Parses `Retry-After`: delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// How a request proves who it is.
#[derive(Debug, Clone)]
pub enum HttpAuth {
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer(Secret),
    ApiKey {
        header: String,
        key: Secret,
    },
    /// A token sent as a query parameter (Ticket Co: `?token=T`). It is added to the request
    /// only when it is built, never to the `Url` a caller holds, so no message can show it
    /// (`describe` drops the query anyway, and reqwest's own errors are never formatted).
    Query {
        param: String,
        token: Secret,
    },
    /// OAuth2 client credentials; the token is fetched once and reused until shortly before
    /// it expires. `form` holds extra fields for the token request (e.g. Halo's scope).
    OAuth2 {
        token_url: url::Url,
        client_id: String,
        client_secret: Secret,
        form: Vec<(String, String)>,
    },
    // S-360
    /// A fresh HS256 JWT minted for every call (S-360: lifetime ≤ 30 s, claims in ms).
    Jwt(crate::jwt::Hs256),
}

impl From<&config::Auth> for HttpAuth {
    fn from(a: &config::Auth) -> Self {
        match a {
            config::Auth::None => HttpAuth::None,
            config::Auth::Basic { username, password } => HttpAuth::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            config::Auth::Bearer { token } => HttpAuth::Bearer(token.clone()),
            config::Auth::ApiKey { header, key } => HttpAuth::ApiKey {
                header: header.clone(),
                key: key.clone(),
            },
            config::Auth::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
            } => HttpAuth::OAuth2 {
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                form: scope
                    .iter()
                    .map(|s| ("scope".to_string(), s.clone()))
                    .collect(),
            },
        }
    }
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

/// Reuse a token until 60 s before it expires, or half its lifetime if that is shorter.
pub fn token_refresh_after(expires_in: Duration) -> Duration {
    let margin = Duration::from_secs(60).min(expires_in / 2);
    expires_in - margin
}

/// Process-wide HTTP state: one reqwest client (connection pool) and the rate budgets,
/// which outlive config reloads so that a reload cannot reset a vendor's limit.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    budgets: Arc<Mutex<HashMap<String, Arc<Budget>>>>,
    /// Where budgets are kept between processes (the state), and what it held at start:
    /// a budget starts from its saved calls and `Retry-After` (see `budget.rs`).
    budget_log: Option<Arc<dyn BudgetLog>>,
    saved_budgets: Arc<Mutex<HashMap<String, SavedBudget>>>,
    /// OAuth2 tokens per (connection, token URL, client ID), so that a token is reused
    /// across runs until shortly before it expires, not fetched once per run.
    tokens: Arc<Mutex<TokenSlots>>,
    /// Asked before every call of a run under a lease (several instances): see [`Gate`].
    gate: Option<Arc<dyn Gate>>,
}

type TokenSlots = HashMap<String, Arc<tokio::sync::Mutex<Option<CachedToken>>>>;

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("usher/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("the HTTP client builds with static settings");
        Http {
            client,
            budgets: Arc::new(Mutex::new(HashMap::new())),
            budget_log: None,
            saved_budgets: Arc::new(Mutex::new(HashMap::new())),
            tokens: Arc::new(Mutex::new(HashMap::new())),
            gate: None,
        }
    }

    /// The same client (budgets, tokens and connections shared), every call of its
    /// endpoints asked of `gate` first: a run under a lease.
    pub fn gated(&self, gate: Arc<dyn Gate>) -> Http {
        Http {
            gate: Some(gate),
            ..self.clone()
        }
    }

    /// The same client, with rate budgets that start from `saved` and are saved to `log`.
    pub fn with_budget_log(mut self, log: Arc<dyn BudgetLog>, saved: Vec<SavedBudget>) -> Self {
        self.budget_log = Some(log);
        self.saved_budgets = Arc::new(Mutex::new(
            saved.into_iter().map(|b| (b.key.clone(), b)).collect(),
        ));
        self
    }

    /// Takes in budgets as the state holds them now (several instances: a group of streams
    /// this instance just took over was spending them elsewhere).
    pub fn restore_budgets(&self, saved: Vec<SavedBudget>) {
        let budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let mut later = self.saved_budgets.lock().unwrap_or_else(|p| p.into_inner());
        for s in saved {
            match budgets.get(&s.key) {
                Some(b) => b.restore(&s),
                None => {
                    later.insert(s.key.clone(), s);
                }
            }
        }
    }

    /// Calls left in each connection's rate window (None: no limit).
    pub fn budgets_remaining(&self) -> std::collections::BTreeMap<String, Option<u32>> {
        let b = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        b.iter().map(|(k, v)| (k.clone(), v.remaining())).collect()
    }

    fn budget(&self, conn: &str, limit: Option<RateLimit>) -> Arc<Budget> {
        let mut b = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let budget = b
            .entry(conn.to_string())
            .or_insert_with(|| {
                Arc::new(Budget::restored(
                    conn.to_string(),
                    limit,
                    self.budget_log.clone(),
                    self.saved_budgets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(conn),
                ))
            })
            .clone();
        budget.set_limit(limit);
        budget
    }

    fn token_slot(
        &self,
        conn: &str,
        auth: &HttpAuth,
    ) -> Arc<tokio::sync::Mutex<Option<CachedToken>>> {
        let HttpAuth::OAuth2 {
            token_url,
            client_id,
            ..
        } = auth
        else {
            return Arc::new(tokio::sync::Mutex::new(None));
        };
        let key = format!("{conn}\n{token_url}\n{client_id}");
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// A client for one configured connection.
    pub fn endpoint(&self, conn: &config::Connection) -> Endpoint {
        // S-360: its account signs a JWT per call instead of a configured `auth`.
        if let Some(a) = &conn.s360 {
            return self.endpoint_with(
                conn,
                HttpAuth::Jwt(crate::jwt::Hs256 {
                    sub: a.institution.clone(),
                    aud: a.virtual_operator.clone(),
                    iss: a.partner_name.clone(),
                    secret: a.partner_secret.clone(),
                    lifetime_ms: 20_000,
                }),
            );
        }
        self.endpoint_with(conn, HttpAuth::from(&conn.auth))
    }

    /// A client for one connection with auth decided by its connector (vendor kinds).
    pub fn endpoint_with(&self, conn: &config::Connection, auth: HttpAuth) -> Endpoint {
        Endpoint {
            name: conn.name.clone(),
            base: conn.base_url.clone(),
            timeout: conn.timeout,
            connect_timeout: conn.connect_timeout,
            max_retries: conn.max_retries,
            client: self.client.clone(),
            budget: self.budget(&conn.budget_key(), conn.rate_limit),
            rate_window: conn.rate_window(),
            token: self.token_slot(&conn.name, &auth),
            auth,
            recorder: None,
            gate: self.gate.clone(),
        }
    }
}

/// One connection's client: base URL, auth, budget, timeouts and retry policy.
#[derive(Clone)]
pub struct Endpoint {
    pub name: String,
    pub base: url::Url,
    timeout: Duration,
    #[allow(dead_code)] // kept for a per-endpoint client if a vendor ever needs one
    connect_timeout: Duration,
    max_retries: u32,
    client: reqwest::Client,
    pub budget: Arc<Budget>,
    /// The vendor's documented wait after a 429/509 without `Retry-After` (S-360: 20 s).
    rate_window: Option<Duration>,
    auth: HttpAuth,
    token: Arc<tokio::sync::Mutex<Option<CachedToken>>>,
    /// Told about every write before it leaves (the run's in-doubt bookkeeping); None for
    /// endpoints that only read, and for `validate --online`.
    recorder: Option<Arc<dyn Recorder>>,
    gate: Option<Arc<dyn Gate>>,
}

/// "GET /api/changes": what a message may say about a call (never the query string).
pub fn describe(method: &Method, url: &url::Url) -> String {
    format!("{method} {}", url.path())
}

fn classify(e: &reqwest::Error) -> TransportKind {
    if out_of_descriptors(e) {
        TransportKind::NoDescriptors
    } else if e.is_timeout() {
        TransportKind::Timeout
    } else if e.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Broken
    }
}

/// Whether an error, or one of its sources, is EMFILE or ENFILE.
fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
            && (n == rustix::io::Errno::MFILE.raw_os_error()
                || n == rustix::io::Errno::NFILE.raw_os_error())
        {
            return true;
        }
        next = err.source();
    }
    false
}

fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let cap = exp.min(BACKOFF_CAP);
    // "Equal jitter": half fixed, half random, so retries never bunch up nor collapse to zero.
    let half = cap / 2;
    half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
}

impl Endpoint {
    /// `base` joined with a path (which may carry a query string).
    pub fn url(&self, path: &str) -> url::Url {
        if (path.starts_with("http://") || path.starts_with("https://"))
            && let Ok(u) = url::Url::parse(path)
        {
            return u;
        }
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        base.join(path.trim_start_matches('/')).unwrap_or(base)
    }

    pub fn budget_remaining(&self) -> Option<u32> {
        self.budget.remaining()
    }

    /// The same endpoint, telling `recorder` about every write before it leaves.
    pub fn with_recorder(mut self, recorder: Arc<dyn Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// The end-to-end bound of one request (connect, send, answer): its timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Attempts after the first that the connection allows for a failing call.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// Sends a request built by `build` (called again for each attempt), applying the
    /// policy described at the top of this module.
    pub async fn send<F>(
        &self,
        method: Method,
        url: url::Url,
        retry: Retry,
        cancel: &CancellationToken,
        build: F,
    ) -> Result<Reply, HttpError>
    where
        F: Fn(RequestBuilder) -> RequestBuilder,
    {
        self.exchange(method, url, retry, cancel, build, true).await
    }

    /// [`Endpoint::send`], with or without the endpoint's auth: the token request of an
    /// OAuth2 endpoint goes through here unauthorized, so that it gets the same budget,
    /// `Retry-After` waits and retries as every other call.
    async fn exchange<F>(
        &self,
        method: Method,
        url: url::Url,
        retry: Retry,
        cancel: &CancellationToken,
        build: F,
        authorized: bool,
    ) -> Result<Reply, HttpError>
    where
        F: Fn(RequestBuilder) -> RequestBuilder,
    {
        let what = describe(&method, &url);
        let mut attempts = 0u32;
        let mut failures = 0u32;
        let mut refreshed = false;
        let mut rate_waited = Duration::ZERO;
        loop {
            match self.budget.acquire(cancel).await {
                Ok(()) => {}
                Err(budget::Refused::Cancelled) => return Err(HttpError::Cancelled { what }),
                Err(budget::Refused::NotSaved(reason)) => {
                    return Err(HttpError::NotRecorded {
                        conn: self.name.clone(),
                        what,
                        reason,
                    });
                }
            }
            attempts += 1;
            let rb = self
                .client
                .request(method.clone(), url.clone())
                .timeout(self.timeout);
            let rb = if authorized {
                self.authorize(build(rb), cancel, &what).await?
            } else {
                build(rb)
            };
            // reqwest's per-request timeout runs from connecting to the end of the body, so
            // the write cannot take effect through usher after `deadline` (what the vendor
            // does with a request it already holds is the settle margin's business).
            if let Some(g) = &self.gate
                && let Err(reason) = g.may_call(self.timeout).await
            {
                return Err(HttpError::NotHeld {
                    conn: self.name.clone(),
                    what,
                    reason,
                });
            }
            let deadline = chrono::Utc::now()
                + chrono::TimeDelta::from_std(self.timeout).unwrap_or(chrono::TimeDelta::MAX);
            let recorder = self.recorder.as_ref().filter(|_| retry.writes());
            if let Some(r) = recorder
                && let Err(reason) = r.sending(&what, deadline).await
            {
                return Err(HttpError::NotRecorded {
                    conn: self.name.clone(),
                    what,
                    reason,
                });
            }
            let exchange = async {
                match rb.send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        let headers = resp.headers().clone();
                        match resp.bytes().await {
                            Ok(body) => Ok((status, headers, body)),
                            Err(e) => Err(classify(&e)),
                        }
                    }
                    Err(e) => Err(classify(&e)),
                }
            };
            // `cancel` is the run's abandon (a second SIGTERM, `shutdown_timeout`): the
            // request is dropped where it is; a write's answer is then unseen (in doubt).
            let result = tokio::select! {
                r = exchange => r,
                _ = cancel.cancelled() => {
                    if let Some(r) = recorder {
                        r.unanswered(deadline);
                    }
                    return Err(HttpError::Cancelled { what });
                }
            };
            if let Some(r) = recorder {
                let unseen = match &result {
                    Ok((status, _, _)) => gateway_gave_up(status.as_u16()),
                    Err(kind) => {
                        !matches!(kind, TransportKind::Connect | TransportKind::NoDescriptors)
                    }
                };
                if unseen {
                    r.unanswered(deadline);
                }
            }
            crate::metrics::METRICS.request(
                &self.name,
                result.as_ref().ok().map(|(status, _, _)| status.as_u16()),
            );
            match result {
                Ok((status, headers, body)) => {
                    let code = status.as_u16();
                    if status == StatusCode::UNAUTHORIZED && authorized && self.has_token_auth() {
                        if !refreshed {
                            tracing::debug!(connection = %self.name, call = %what, "401 with a cached token; fetching a new one");
                            *self.token.lock().await = None;
                            refreshed = true;
                            continue;
                        }
                        return Err(HttpError::CredentialsRefused {
                            conn: self.name.clone(),
                            what,
                        });
                    }
                    if code == 429 || code == 509 {
                        let wait = retry_after(&headers, std::time::SystemTime::now())
                            .or(self.rate_window)
                            .unwrap_or_else(|| {
                                backoff(failures.min(6)).max(Duration::from_secs(1))
                            });
                        if rate_waited + wait > MAX_RATE_WAIT {
                            self.note_retry_after(wait, &what).await;
                            return Err(HttpError::RateLimited {
                                conn: self.name.clone(),
                                what,
                                wait_secs: wait.as_secs(),
                            });
                        }
                        tracing::info!(connection = %self.name, call = %what, status = code, wait_ms = wait.as_millis() as u64, "rate limited; waiting as asked");
                        rate_waited += wait;
                        failures += 1;
                        crate::metrics::METRICS.retried(&self.name);
                        self.note_retry_after(wait, &what).await;
                        continue;
                    }
                    if status.is_server_error() && retry.repeats() && failures < self.max_retries {
                        let wait = backoff(failures);
                        tracing::warn!(connection = %self.name, call = %what, status = code, attempt = attempts, wait_ms = wait.as_millis() as u64, "server error; retrying");
                        failures += 1;
                        crate::metrics::METRICS.retried(&self.name);
                        if self.pause(wait, cancel).await.is_err() {
                            return Err(HttpError::Cancelled { what });
                        }
                        continue;
                    }
                    return Ok(Reply {
                        status: code,
                        headers,
                        body,
                        attempts,
                    });
                }
                Err(kind) => {
                    if retry.repeats() && failures < self.max_retries {
                        let wait = backoff(failures);
                        tracing::warn!(connection = %self.name, call = %what, error = %kind, attempt = attempts, wait_ms = wait.as_millis() as u64, "transport error; retrying");
                        failures += 1;
                        crate::metrics::METRICS.retried(&self.name);
                        if self.pause(wait, cancel).await.is_err() {
                            return Err(HttpError::Cancelled { what });
                        }
                        continue;
                    }
                    return Err(HttpError::Transport {
                        conn: self.name.clone(),
                        what,
                        kind,
                        attempts,
                    });
                }
            }
        }
    }

    /// Like [`Endpoint::send`], and any status other than 2xx is an error.
    pub async fn send_ok<F>(
        &self,
        method: Method,
        url: url::Url,
        retry: Retry,
        cancel: &CancellationToken,
        build: F,
    ) -> Result<Reply, HttpError>
    where
        F: Fn(RequestBuilder) -> RequestBuilder,
    {
        let what = describe(&method, &url);
        let reply = self.send(method, url, retry, cancel, build).await?;
        if reply.is_success() {
            Ok(reply)
        } else {
            Err(HttpError::Status {
                conn: self.name.clone(),
                what,
                status: reply.status,
                snippet: reply.snippet(),
                attempts: reply.attempts,
            })
        }
    }

    /// Keeps the connection quiet for `wait` (a `Retry-After`), in this process and, when the
    /// budget is kept in the state, for the next process too.
    async fn note_retry_after(&self, wait: Duration, what: &str) {
        if let Err(e) = self.budget.block_for(wait).await {
            tracing::warn!(connection = %self.name, call = %what, error = %e,
                "cannot save the Retry-After in the state; this process still waits for it");
        }
    }

    async fn pause(&self, d: Duration, cancel: &CancellationToken) -> Result<(), ()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = cancel.cancelled() => Err(()),
        }
    }

    fn has_token_auth(&self) -> bool {
        matches!(self.auth, HttpAuth::OAuth2 { .. } | HttpAuth::Jwt(_))
    }

    async fn authorize(
        &self,
        rb: RequestBuilder,
        cancel: &CancellationToken,
        what: &str,
    ) -> Result<RequestBuilder, HttpError> {
        Ok(match &self.auth {
            HttpAuth::None => rb,
            HttpAuth::Basic { username, password } => {
                rb.basic_auth(username, Some(password.expose()))
            }
            HttpAuth::Bearer(t) => rb.bearer_auth(t.expose()),
            HttpAuth::ApiKey { header, key } => rb.header(header.as_str(), key.expose()),
            HttpAuth::Query { param, token } => rb.query(&[(param.as_str(), token.expose())]),
            HttpAuth::OAuth2 { .. } => {
                let token = self.token(cancel, what).await?;
                rb.bearer_auth(token.expose())
            }
            HttpAuth::Jwt(minter) => rb.bearer_auth(minter.mint(crate::jwt::now_ms())),
        })
    }

    /// The cached OAuth2 token, fetched when missing or near expiry.
    async fn token(&self, cancel: &CancellationToken, what: &str) -> Result<Secret, HttpError> {
        let HttpAuth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            form,
        } = &self.auth
        else {
            unreachable!("only called for OAuth2");
        };
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
        let token_what = describe(&Method::POST, token_url);
        let mut fields: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", client_secret.expose()),
        ];
        fields.extend(form.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // The token endpoint is a call like any other: budget, 429/509 with Retry-After,
        // retries on 5xx and broken connections (asking for a token changes nothing).
        let reply = Box::pin(self.exchange(
            Method::POST,
            token_url.clone(),
            Retry::Idempotent,
            cancel,
            |rb| rb.form(&fields),
            false,
        ))
        .await
        .map_err(|e| match e {
            HttpError::Cancelled { .. } => HttpError::Cancelled {
                what: what.to_string(),
            },
            other => other,
        })?;
        let (status, body, attempts) = (reply.status, reply.body, reply.attempts);
        if status == 400 || status == 401 || status == 403 {
            return Err(HttpError::CredentialsRefused {
                conn: self.name.clone(),
                what: token_what,
            });
        }
        if !(200..300).contains(&status) {
            return Err(HttpError::Status {
                conn: self.name.clone(),
                what: token_what,
                status,
                snippet: snippet(&body),
                attempts,
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            access_token: String,
            expires_in: Option<u64>,
        }
        let parsed: TokenReply = match serde_json::from_slice(&body) {
            Ok(t) => t,
            Err(_) => {
                return Err(HttpError::Status {
                    conn: self.name.clone(),
                    what: token_what,
                    status,
                    snippet: "the token answer is not the expected JSON".into(),
                    attempts,
                });
            }
        };
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600));
        let token = Secret::new(parsed.access_token);
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at: Instant::now() + token_refresh_after(lifetime),
        });
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            retry_after(&h, std::time::SystemTime::now()),
            Some(Duration::from_secs(7))
        );
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(12));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(12)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn tokens_are_refreshed_before_expiry() {
        assert_eq!(
            token_refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(
            token_refresh_after(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn backoff_is_capped() {
        for a in 0..40 {
            assert!(backoff(a) <= BACKOFF_CAP);
        }
        assert!(backoff(0) >= BACKOFF_BASE / 2);
    }
}
