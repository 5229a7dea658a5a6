//! Live progress of the runs in this process, for a command that runs a stream while
//! someone watches (`usher trigger` with no daemon): each page committed, with the run's
//! counts so far, and each wait longer than a second (a vendor's `Retry-After`, a rate
//! budget's window, a write in doubt settling), so that a 90 s `Retry-After` reads as a
//! wait and not as a hang. Nothing listens in the daemon: until a command subscribes,
//! every call returns at once.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::Counts;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A page was committed; the run's counts so far.
    Page { stream: String, counts: Counts },
    /// Something waits `wait` before going on; `what` says for what, in words.
    Waiting { what: String, wait: Duration },
}

static SINK: OnceLock<mpsc::UnboundedSender<Event>> = OnceLock::new();

/// Starts listening (once per process; `None` if something already listens).
pub fn subscribe() -> Option<mpsc::UnboundedReceiver<Event>> {
    let (tx, rx) = mpsc::unbounded_channel();
    SINK.set(tx).ok().map(|()| rx)
}

/// A page of `ctx`'s run was committed.
pub fn page(ctx: &super::RunCtx, counts: &Counts) {
    if let Some(tx) = SINK.get() {
        let _ = tx.send(Event::Page {
            stream: ctx.spec.name.clone(),
            counts: *counts,
        });
    }
}

/// Something waits `wait`; waits under a second are not worth a line.
pub fn waiting(wait: Duration, what: impl FnOnce() -> String) {
    if wait < Duration::from_secs(1) {
        return;
    }
    if let Some(tx) = SINK.get() {
        let _ = tx.send(Event::Waiting { what: what(), wait });
    }
}
