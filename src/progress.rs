//! A run's [`Counts`], and the live progress of the runs in this process, for a command that runs a stream while
//! someone watches (`usher trigger` with no daemon): each page committed, with the run's
//! counts so far, and each wait longer than a second (a vendor's `Retry-After`, a rate
//! budget's window, a write in doubt settling), so that a 90 s `Retry-After` reads as a
//! wait and not as a hang. Nothing listens in the daemon: until a command subscribes,
//! every call returns at once.

use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

/// Counts of one run. `queued` counts records put into the outbox for delivery;
/// `created` and `updated` count records the target accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pulled: u64,
    pub created: u64,
    pub updated: u64,
    pub skipped: u64,
    pub failed: u64,
    pub queued: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.pulled += o.pulled;
        self.created += o.created;
        self.updated += o.updated;
        self.skipped += o.skipped;
        self.failed += o.failed;
        self.queued += o.queued;
    }
}

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

/// A page of `stream`'s run was committed.
pub fn page(stream: &str, counts: &Counts) {
    if let Some(tx) = SINK.get() {
        let _ = tx.send(Event::Page {
            stream: stream.to_string(),
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
