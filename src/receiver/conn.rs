//! The receiver's listener, which faces the internet: it accepts TCP connections itself and
//! serves HTTP/1.1 on each with hyper, so that no client can hold the daemon's connections
//! or descriptors.
//!
//! - **Every connection has a deadline unless a request is being handled**: `header_timeout`
//!   from the accept (or from a later request's first byte) to the end of the headers,
//!   `idle_timeout` for a kept-alive connection to start its next request or to read its
//!   answer. The body has `body_timeout`, enforced by the handler. Past a deadline the
//!   connection is closed without an answer.
//! - **At most `max_connections` at once**, and never more than half the descriptor limit,
//!   so that the state database and the streams' outbound calls always have descriptors.
//!   At the cap a new connection is still accepted, and the **oldest connection with no
//!   request in progress** is closed to make room, preferring connections that never
//!   authenticated: an unauthenticated flood then only ever displaces itself, and S-360's
//!   kept-alive connection goes last. Only when every connection is handling a request does
//!   the listener stop accepting until one ends (the kernel's backlog holds the newcomers;
//!   closing them at once would refuse S-360 too). Leaving the flood in the backlog instead
//!   was not enough: S-360's connection waited behind thousands of idle ones.
//! - Accept errors (EMFILE, ENFILE, ENOBUFS) do not spin: the listener closes one idle
//!   connection to free a descriptor, backs off (10 ms doubling to 1 s), counts them and
//!   logs at most one line per 10 s.
//!
//! A connection's progress is seen from two sides: its socket (the first byte of a request,
//! the flush of an answer: [`Watched`]) and its service (a request handed to the router and
//! answered: [`ConnService`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::METRICS;

/// The connection limits of `[receiver]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Largest request head (request line and headers) read; hyper answers 431 past it.
const MAX_HEAD: usize = 64 * 1024;

/// At the cap, how many connections may be accepted ahead of the ones closed to make room
/// for them (their tasks close them a moment later): the bound on descriptors is
/// `max_connections` plus this.
const CLOSING_AHEAD: usize = 32;

/// Longest pause after an accept error.
const MAX_BACKOFF: Duration = Duration::from_millis(1000);

/// One line at most per this much time for the listener's own troubles.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The peer of a request, put in its extensions for the handler.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The request's connection, put in its extensions: the handler marks it trusted once a
/// request on it authenticated, and closes it after a refusal.
#[derive(Clone)]
pub struct ConnHandle(Arc<Slot>);

impl ConnHandle {
    /// A request on this connection carried the stream's credentials.
    pub fn trust(&self) {
        self.0.lock().trusted = true;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of a request yet (just accepted, or kept alive after an answer).
    Waiting,
    /// Part of a request's head has come.
    Head,
    /// The router has the request (reading its body, storing it).
    Busy,
    /// Answered; the answer is being written.
    Responding,
}

#[derive(Debug, Clone, Copy)]
struct SlotState {
    phase: Phase,
    /// When the current phase's deadline started.
    since: Instant,
    /// Requests answered on this connection.
    served: u32,
    /// A request on it authenticated: closed last to make room.
    trusted: bool,
}

/// One accepted connection as the listener sees it.
struct Slot {
    state: Mutex<SlotState>,
    /// Wakes the connection's task: its phase changed, or it is to close.
    wake: Notify,
    /// Chosen to close to make room.
    evict: AtomicBool,
    /// No byte of a request has come since the last answer (the socket's fast path).
    waiting: AtomicBool,
}

impl Slot {
    fn new(now: Instant) -> Slot {
        Slot {
            state: Mutex::new(SlotState {
                phase: Phase::Waiting,
                since: now,
                served: 0,
                trusted: false,
            }),
            wake: Notify::new(),
            evict: AtomicBool::new(false),
            waiting: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Bytes of a request came on a waiting connection.
    fn first_byte(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        let mut s = self.lock();
        if s.phase == Phase::Waiting {
            s.phase = Phase::Head;
            // The first request's head is timed from the accept; a later one from its
            // first byte (the wait before it is the idle timeout's).
            if s.served > 0 {
                s.since = Instant::now();
            }
        }
        drop(s);
        self.wake.notify_one();
    }

    fn set(&self, phase: Phase) {
        {
            let mut s = self.lock();
            s.phase = phase;
            s.since = Instant::now();
        }
        self.wake.notify_one();
    }

    /// The answer went out: back to waiting. Whether the phase changed.
    fn flushed(&self) -> bool {
        let mut s = self.lock();
        if s.phase != Phase::Responding {
            return false;
        }
        s.phase = Phase::Waiting;
        s.since = Instant::now();
        s.served += 1;
        drop(s);
        self.waiting.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        true
    }

    /// When the connection is to be closed, and which timeout that is; None while a
    /// request is being handled.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Timeout)> {
        let s = *self.lock();
        match (s.phase, s.served) {
            (Phase::Waiting | Phase::Head, 0) | (Phase::Head, _) => {
                Some((s.since + limits.header_timeout, Timeout::Header))
            }
            (Phase::Waiting | Phase::Responding, _) => {
                Some((s.since + limits.idle_timeout, Timeout::Idle))
            }
            (Phase::Busy, _) => None,
        }
    }
}

// Which deadline closed a connection: counted by `metrics`, which sits below the receiver.
pub use crate::metrics::Timeout;

/// The open connections.
#[derive(Default)]
struct Slots {
    open: Mutex<HashMap<u64, Arc<Slot>>>,
    next: AtomicU64,
    /// Woken when a connection closes or finishes a request (room may be made).
    changed: Notify,
}

impl Slots {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.map().len()
    }

    fn insert(&self, slot: Arc<Slot>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(id, slot);
        METRICS.receiver.open.fetch_add(1, Ordering::Relaxed);
        id
    }

    fn remove(&self, id: u64) {
        if self.map().remove(&id).is_some() {
            METRICS.receiver.open.fetch_sub(1, Ordering::Relaxed);
        }
        self.changed.notify_one();
    }

    /// The connection to close to make room: no request in progress, never authenticated
    /// before authenticated, then the oldest.
    fn victim(&self) -> Option<Arc<Slot>> {
        self.map()
            .values()
            .filter(|s| !s.evict.load(Ordering::Relaxed))
            .filter_map(|s| {
                let st = *s.lock();
                matches!(st.phase, Phase::Waiting | Phase::Head)
                    .then(|| ((st.trusted, st.since), s.clone()))
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, s)| s)
    }

    /// Closes the connection that matters least; false when every one is handling a
    /// request.
    fn evict_one(&self) -> bool {
        match self.victim() {
            Some(s) => {
                s.evict.store(true, Ordering::Relaxed);
                s.wake.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A TCP stream that tells its slot when a request's first byte comes and when an answer
/// has been flushed.
struct Watched {
    inner: TcpStream,
    slot: Arc<Slot>,
    slots: Arc<Slots>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && this.slot.waiting.load(Ordering::Relaxed)
        {
            this.slot.first_byte();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        // hyper flushes once the answer is written out: the connection is idle again.
        if matches!(r, Poll::Ready(Ok(()))) && this.slot.flushed() {
            this.slots.changed.notify_one();
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The router, seen from one connection: marks the slot busy while a request is handled
/// and gives the handler the peer and the connection.
struct ConnService {
    router: TowerToHyperService<Router>,
    slot: Arc<Slot>,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.slot.set(Phase::Busy);
        req.extensions_mut().insert(Peer(self.peer));
        req.extensions_mut().insert(ConnHandle(self.slot.clone()));
        let answer = self.router.call(req);
        let slot = self.slot.clone();
        Box::pin(async move {
            let r = answer.await;
            slot.set(Phase::Responding);
            r
        })
    }
}

/// Rate-limited lines about the listener: the first at once, then one per [`LOG_EVERY`]
/// with what happened since.
#[derive(Default)]
struct Troubles {
    last_line: Option<Instant>,
    accept_errors: u64,
    last_error: String,
    cause: &'static str,
    evicted: u64,
    refused: u64,
}

impl Troubles {
    fn due(&self, now: Instant) -> bool {
        self.last_line.is_none_or(|t| now >= t + LOG_EVERY)
    }

    /// When the troubles not logged yet are due, if there are any.
    fn pending_until(&self) -> Option<Instant> {
        (self.accept_errors + self.evicted + self.refused > 0)
            .then(|| self.last_line.map_or_else(Instant::now, |t| t + LOG_EVERY))
    }

    fn report(&mut self, cap: usize) {
        let now = Instant::now();
        if !self.due(now) {
            return;
        }
        if self.accept_errors > 0 {
            tracing::error!(
                errors = self.accept_errors,
                error = %self.last_error,
                "receiver: cannot accept connections ({}); closing idle connections to free descriptors",
                self.cause
            );
        }
        if self.evicted + self.refused > 0 {
            tracing::warn!(
                cap,
                closed_idle = self.evicted,
                refused = self.refused,
                "receiver: at its cap of connections (max_connections); closing the oldest idle connections to make room"
            );
        }
        if self.accept_errors + self.evicted + self.refused > 0 {
            self.last_line = Some(now);
        }
        self.accept_errors = 0;
        self.evicted = 0;
        self.refused = 0;
    }
}

/// Errors of one connection that did not wait to be accepted: skip them.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What an accept error means, in words an operator searches for.
fn cause(e: &io::Error) -> &'static str {
    use rustix::io::Errno;
    match e.raw_os_error() {
        Some(n) if n == Errno::MFILE.raw_os_error() => {
            "too many open files: the process's descriptor limit"
        }
        Some(n) if n == Errno::NFILE.raw_os_error() => "too many open files in the system",
        _ => "out of resources",
    }
}

/// The connection cap for this process: `max_connections`, but at most half the limit of
/// open descriptors, so that the state and the outbound calls keep the other half.
pub fn effective_cap(max_connections: usize) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let half = usize::try_from(limit / 2).unwrap_or(usize::MAX).max(1);
    if max_connections > half {
        tracing::warn!(
            max_connections,
            descriptor_limit = limit,
            cap = half,
            "receiver: max_connections is over half the descriptor limit (LimitNOFILE); capping it"
        );
        half
    } else {
        max_connections
    }
}

/// The kernel's queue of connections waiting to be accepted (capped by
/// `net.core.somaxconn`, 4096 on current kernels). tokio's default is 1024: a burst of a few
/// thousand connections then overflowed it, and Linux drops the handshake's last ACK of
/// those, so their clients believe they are connected while the daemon cannot see them
/// for up to a minute of SYN-ACK retries.
const BACKLOG: u32 = 4096;

/// Binds the receiver's address with a deep accept queue ([`BACKLOG`]).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts and serves connections until `shutdown`; then stops accepting, lets each request
/// in progress be answered, closes the rest, and returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Slots::default());
    let conns = TaskTracker::new();
    let cap = limits.max_connections.max(1);
    METRICS.receiver.cap.store(cap as u64, Ordering::Relaxed);
    let mut troubles = Troubles::default();
    let mut backoff = Duration::from_millis(10);
    loop {
        troubles.report(cap);
        // Wait for a connection to close when every one is handling a request, or when
        // those chosen to close have not closed yet (their descriptors still count).
        let open = slots.len();
        if open >= cap + CLOSING_AHEAD || (open >= cap && slots.victim().is_none()) {
            METRICS.receiver.cap_hit();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = slots.changed.notified() => continue,
            }
        }
        let pending = troubles.pending_until();
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
            // The last troubles of a quiet spell are logged too, on time.
            _ = tokio::time::sleep_until(pending.unwrap_or_else(Instant::now)), if pending.is_some() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                METRICS.receiver.accept_error();
                troubles.accept_errors += 1;
                troubles.last_error = e.to_string();
                troubles.cause = cause(&e);
                troubles.report(cap);
                // A descriptor frees when the connection that matters least goes.
                slots.evict_one();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        METRICS.receiver.accepted.fetch_add(1, Ordering::Relaxed);
        if slots.len() >= cap {
            METRICS.receiver.cap_hit();
            if slots.evict_one() {
                METRICS.receiver.evicted.fetch_add(1, Ordering::Relaxed);
                troubles.evicted += 1;
            } else {
                METRICS.receiver.refused.fetch_add(1, Ordering::Relaxed);
                troubles.refused += 1;
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let slot = Arc::new(Slot::new(Instant::now()));
        let id = slots.insert(slot.clone());
        let slots = slots.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            serve_connection(stream, peer, slot, &slots, router, limits, shutdown).await;
            slots.remove(id);
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Arc<Slot>,
    slots: &Arc<Slots>,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let io = TokioIo::new(Watched {
        inner: stream,
        slot: slot.clone(),
        slots: slots.clone(),
    });
    let service = ConnService {
        router: TowerToHyperService::new(router),
        slot: slot.clone(),
        peer: unmapped(peer),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .max_buf_size(MAX_HEAD)
        // The deadlines are this module's (hyper's would also end a kept-alive wait).
        .header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service));
    // Stopping: the request in progress is answered, then the connection closes.
    let mut closing = false;
    loop {
        let deadline = slot.deadline(&limits);
        let expiry = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(peer = %peer, error = %e, "receiver: connection ended");
                }
                return;
            }
            _ = expiry => {
                // The deadline may have moved while this slept.
                if let Some((at, kind)) = slot.deadline(&limits)
                    && at <= Instant::now()
                {
                    METRICS.receiver.timed_out(kind);
                    tracing::debug!(peer = %peer, timeout = kind.as_str(), "receiver: connection closed at its deadline");
                    return;
                }
            }
            _ = slot.wake.notified() => {}
            _ = shutdown.cancelled(), if !closing => closing = true,
        }
        let phase = slot.phase();
        let in_progress = matches!(phase, Phase::Busy | Phase::Responding);
        if slot.evict.load(Ordering::Relaxed) || closing {
            if !in_progress {
                return;
            }
            conn.as_mut().graceful_shutdown();
            closing = true;
        }
    }
}

/// An IPv4 peer on a dual-stack socket shows as `::ffff:a.b.c.d`: name it `a.b.c.d`.
fn unmapped(peer: SocketAddr) -> SocketAddr {
    match peer.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), peer.port()),
            None => peer,
        },
        IpAddr::V4(_) => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(20),
            max_connections: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_phases() {
        let l = limits();
        let t0 = Instant::now();
        let s = Slot::new(t0);
        assert_eq!(
            s.deadline(&l),
            Some((t0 + l.header_timeout, Timeout::Header))
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        // The first request's head is timed from the accept.
        s.first_byte();
        assert_eq!(
            s.deadline(&l),
            Some((t0 + l.header_timeout, Timeout::Header))
        );
        s.set(Phase::Busy);
        assert_eq!(s.deadline(&l), None);
        s.set(Phase::Responding);
        let t1 = Instant::now();
        assert_eq!(s.deadline(&l), Some((t1 + l.idle_timeout, Timeout::Idle)));
        assert!(s.flushed());
        assert_eq!(s.deadline(&l), Some((t1 + l.idle_timeout, Timeout::Idle)));
        tokio::time::advance(Duration::from_secs(5)).await;
        // A later request's head is timed from its first byte.
        s.first_byte();
        let t2 = Instant::now();
        assert_eq!(
            s.deadline(&l),
            Some((t2 + l.header_timeout, Timeout::Header))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_made_by_closing_the_oldest_unauthenticated_idle_connection() {
        let slots = Slots::default();
        let mk = |phase: Phase, trusted: bool| {
            let s = Arc::new(Slot::new(Instant::now()));
            {
                let mut st = s.lock();
                st.phase = phase;
                st.trusted = trusted;
            }
            slots.insert(s.clone());
            s
        };
        let trusted_old = mk(Phase::Waiting, true);
        tokio::time::advance(Duration::from_secs(1)).await;
        let busy = mk(Phase::Busy, false);
        let idle_old = mk(Phase::Waiting, false);
        tokio::time::advance(Duration::from_secs(1)).await;
        let head_new = mk(Phase::Head, false);
        let order: Vec<bool> = (0..4).map(|_| slots.evict_one()).collect();
        assert_eq!(order, [true, true, true, false]);
        assert!(idle_old.evict.load(Ordering::Relaxed));
        assert!(head_new.evict.load(Ordering::Relaxed));
        assert!(trusted_old.evict.load(Ordering::Relaxed));
        assert!(
            !busy.evict.load(Ordering::Relaxed),
            "a request in progress is never cut"
        );
    }
}
