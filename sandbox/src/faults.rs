//! Fault injection for the fakes, switchable per test: a queue of faults per route, taken
//! one per request, and a log of every call with its time (so tests can check that usher
//! waited for a `Retry-After` and stayed within a budget).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// No fault: the request is handled as usual (to space faults out in a queue, e.g.
    /// four of these and a `Status(500)` for a 20 % error rate).
    Pass,
    /// Answer with this status and a short JSON error.
    Status(u16),
    /// 429 or 509 with `Retry-After` in seconds.
    RateLimited { status: u16, retry_after_secs: u64 },
    /// 429 or 509 with `Retry-After` as an HTTP date this many seconds ahead.
    RateLimitedUntil { status: u16, secs_ahead: u64 },
    /// 429 without `Retry-After`.
    RateLimitedBare { status: u16 },
    /// Wait this long before handling (past the client's timeout, to test it). A client
    /// that hangs up first cancels the handling: nothing is done.
    Slow(Duration),
    /// The vendor holds the request and carries it out this long after it arrived, whether
    /// or not the client is still there (a slow save behind a load balancer): the case of a
    /// write whose answer usher never sees but which still lands.
    Late(Duration),
    /// Headers go out, then the connection is broken off mid-body.
    Reset,
    /// The real answer, cut in half.
    Truncated,
    /// 200 with an HTML page instead of JSON.
    Html,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub route: String,
    pub at: SystemTime,
    /// The status answered; 0 when the client hung up first.
    pub status: u16,
    /// The fault injected into this call, if any.
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<String, VecDeque<Fault>>,
    calls: Vec<Call>,
}

/// Shared by a fake and the test that drives it.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<Inner>>);

impl Faults {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` requests to `route` get `fault`. A route may be narrowed to one method
    /// by its last path segment: `"s360.api:saveIndividualContactData"`.
    pub fn push(&self, route: &str, fault: Fault, n: usize) {
        let mut i = self.0.lock().unwrap();
        let q = i.queues.entry(route.to_string()).or_default();
        for _ in 0..n {
            q.push_back(fault.clone());
        }
    }

    /// One fault ahead of the queued ones: the route's next call gets it.
    pub fn push_front(&self, route: &str, fault: Fault) {
        let mut i = self.0.lock().unwrap();
        i.queues
            .entry(route.to_string())
            .or_default()
            .push_front(fault);
    }

    pub fn clear(&self) {
        self.0.lock().unwrap().queues.clear();
    }

    fn take(&self, route: &str) -> Option<Fault> {
        self.0.lock().unwrap().queues.get_mut(route)?.pop_front()
    }

    /// Logs a call on arrival (status 0 until answered: a call whose client hung up before
    /// the answer, e.g. past its timeout on a slow answer, still counts); returns its index.
    fn log(&self, route: &str, at: SystemTime, fault: Option<Fault>) -> usize {
        let mut i = self.0.lock().unwrap();
        i.calls.push(Call {
            route: route.to_string(),
            at,
            status: 0,
            fault,
        });
        i.calls.len() - 1
    }

    fn answered(&self, index: usize, status: u16) {
        if let Some(c) = self.0.lock().unwrap().calls.get_mut(index) {
            c.status = status;
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    pub fn calls_to(&self, route: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.route == route)
            .collect()
    }
}

fn json_error(status: u16, msg: &str) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        serde_json::json!({ "error": msg }).to_string(),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The middleware: `route` names the queue this router's requests take faults from.
pub async fn layer(
    State((faults, route)): State<(Faults, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    // Calls are timestamped on arrival, which is what a rate limit counts.
    let arrived = SystemTime::now();
    let method = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let fault = faults
        .take(route)
        .or_else(|| faults.take(&format!("{route}:{method}")));
    let index = faults.log(route, arrived, fault.clone());
    let resp = match fault {
        None | Some(Fault::Pass) => next.run(req).await,
        Some(Fault::Status(s)) => json_error(s, "injected failure"),
        Some(Fault::RateLimited {
            status,
            retry_after_secs,
        }) => {
            let mut r = json_error(status, "rate limited");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            r
        }
        Some(Fault::RateLimitedUntil { status, secs_ahead }) => {
            let mut r = json_error(status, "rate limited");
            let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs_ahead));
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&at).expect("dates are ASCII"),
            );
            r
        }
        Some(Fault::RateLimitedBare { status }) => json_error(status, "rate limited"),
        Some(Fault::Slow(d)) => {
            tokio::time::sleep(d).await;
            next.run(req).await
        }
        Some(Fault::Late(d)) => {
            // Detached: dropping this handler (the client hung up) does not stop it.
            let task = tokio::spawn(async move {
                tokio::time::sleep(d).await;
                next.run(req).await
            });
            task.await
                .unwrap_or_else(|_| json_error(500, "the late handling failed"))
        }
        Some(Fault::Reset) => {
            let stream = futures::stream::once(async {
                Err::<bytes::Bytes, std::io::Error>(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected reset",
                ))
            });
            Response::builder()
                .status(200)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .expect("static response")
        }
        Some(Fault::Truncated) => {
            let real = next.run(req).await;
            let (parts, body) = real.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let cut = bytes.slice(..bytes.len() / 2);
            let mut r = Response::from_parts(parts, Body::from(cut));
            r.headers_mut().remove(header::CONTENT_LENGTH);
            r
        }
        Some(Fault::Html) => {
            let mut r = (
                StatusCode::OK,
                "<html><body><h1>Service temporarily unavailable</h1></body></html>",
            )
                .into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            r
        }
    };
    faults.answered(index, resp.status().as_u16());
    resp
}
