//! Which process made each call to the fakes, seen from outside usher: the kernel's socket
//! tables say which process owns the other end of a loopback connection. Off unless
//! [`record`] was called (looking a connection's owner up scans `/proc`); the tests of
//! several instances turn it on to check, from the fakes' side, that two instances are
//! never inside one stream's run at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use tokio::net::TcpListener;

static RECORDING: AtomicBool = AtomicBool::new(false);

/// Turns the recording of callers on for every fake of this process.
pub fn record() {
    RECORDING.store(true, Ordering::SeqCst);
}

/// One call, from the fake's side: the calling process, the request, when it came in and
/// when its answer was handed back.
#[derive(Debug, Clone)]
pub struct CallerCall {
    pub pid: Option<u32>,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// The answer's `Retry-After`, as sent.
    pub retry_after: Option<String>,
    pub received: Instant,
    pub answered: Instant,
}

/// The connection's peer, and the process that owns its end (when recording).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub pid: Option<u32>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        let pid = if RECORDING.load(Ordering::SeqCst) {
            let local = stream.io().local_addr().ok();
            local.and_then(|l| owner_of(*stream.remote_addr(), l))
        } else {
            None
        };
        Caller { pid }
    }
}

#[derive(Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<CallerCall>>>);

impl CallLog {
    pub fn calls(&self) -> Vec<CallerCall> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The middleware that writes the log (a no-op unless recording).
pub async fn log_call(
    State(log): State<CallLog>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    req: Request,
    next: Next,
) -> Response {
    if !RECORDING.load(Ordering::SeqCst) {
        return next.run(req).await;
    }
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let received = Instant::now();
    let resp = next.run(req).await;
    let call = CallerCall {
        pid: caller.pid,
        method,
        path,
        status: resp.status().as_u16(),
        retry_after: resp
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        received,
        answered: Instant::now(),
    };
    log.0.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    resp
}

/// The process holding the socket at `peer` connected to `local` (both on this machine).
fn owner_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let inode = socket_inode(peer, local)?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_str() == Some(target.as_str())) {
                return Some(pid);
            }
        }
    }
    None
}

/// The inode of the socket whose local end is `peer` and remote end `local`, from
/// `/proc/net/tcp` (ports in hexadecimal, addresses not compared: loopback both).
fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let table = match peer {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A closed connection's line (TIME_WAIT) has inode 0: not this one.
        (f.len() > 9 && port(f[1]) == Some(peer.port()) && port(f[2]) == Some(local.port()))
            .then(|| f[9].parse().ok())
            .flatten()
            .filter(|inode| *inode != 0)
    })
}
