//! Integration settings: at start and at each reload the daemon checks its seats.io and CDP
//! connections online, as `validate --online` does, and records the result in the state so
//! that `usher status` (which reads the database only) can say "valid" or why not. With
//! several instances, an instance checks only the connections of the streams it holds,
//! when it takes their lease: a vendor sees calls for a stream from its holder alone.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConnectionKind};
use crate::connectors::{Verdict, check_online_in};
use crate::http::Http;
use crate::store::Store;

pub fn spawn(
    tracker: &TaskTracker,
    store: Store,
    http: Http,
    config: Arc<Config>,
    cancel: CancellationToken,
    only: Option<std::collections::HashSet<String>>,
) {
    tracker.spawn(async move {
        for conn in config.connections.values() {
            if !matches!(conn.kind, ConnectionKind::Seatsio | ConnectionKind::Cdp) {
                continue;
            }
            if only.as_ref().is_some_and(|o| !o.contains(&conn.name)) {
                continue;
            }
            if cancel.is_cancelled() {
                return;
            }
            let verdict = check_online_in(&http, conn, &config, &cancel).await;
            let message = match &verdict {
                Verdict::Valid(m) => m.clone(),
                other => other.to_string(),
            };
            if verdict.is_valid() {
                tracing::info!(connection = %conn.name, kind = conn.kind.as_str(), result = %message, "online check");
            } else {
                tracing::warn!(connection = %conn.name, kind = conn.kind.as_str(), result = %message, "online check failed");
            }
            if let Err(e) = store
                .record_online_check(&conn.name, conn.kind.as_str(), verdict.is_valid(), &message)
                .await
            {
                tracing::warn!(connection = %conn.name, error = %e, "cannot record the online check");
            }
        }
    });
}
