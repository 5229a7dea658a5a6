//! The loopback HTTP server for `/metrics` (Prometheus text) and `/healthz`.
//!
//! `/healthz` answers 200 when the daemon's main loop turned within the last 10 s, the state
//! database can be written (its last write went through) and every enabled stream's last
//! run ended well or has failed fewer than `daemon.health_failures` times in a row;
//! otherwise 503 with the reasons as JSON (`"unhealthy"`). A `refused` run
//! (a payload or a record still waiting) counts as failed; runs stopped at a safe point or
//! interrupted are passed over (they neither end nor break a streak). While the S-360
//! receiver is at its connection cap or cannot accept connections (within the last 10 s)
//! it is also 503, `"degraded"` when that is the only reason: the daemon works, but a
//! sender may not get through.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::Http;
use crate::metrics::METRICS;
use crate::store::Store;

#[derive(Clone)]
pub struct HealthState {
    pub store: Store,
    pub http: Http,
    pub config: Arc<RwLock<Arc<Config>>>,
}

impl HealthState {
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub async fn serve(
    addr: SocketAddr,
    state: HealthState,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(bound)
}

async fn metrics(State(st): State<HealthState>) -> Response {
    let config = st.config();
    let streams: Vec<String> = config.streams.keys().cloned().collect();
    let gauges = st.store.gauges().await.unwrap_or_default();
    let body = METRICS.render(&streams, &gauges, &st.http.budgets_remaining());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// The reasons the daemon is unhealthy; empty when it is healthy.
pub async fn reasons(st: &HealthState) -> Vec<String> {
    let config = st.config();
    let mut reasons = Vec::new();
    let age = METRICS.since_beat().as_secs();
    if age > 10 {
        reasons.push(format!("the scheduler loop has not turned for {age}s"));
    }
    if let Some(e) = METRICS.state.error() {
        reasons.push(format!(
            "state cannot be written: {} (since {}, last at {}); runs do not start until it can",
            e.error,
            crate::store::ts(e.since),
            crate::store::ts(e.last)
        ));
    }
    let n = config.daemon.health_failures;
    match st.store.recent_outcomes(n).await {
        Err(e) => reasons.push(format!("state database: {e}")),
        Ok(outcomes) => {
            for spec in config.streams.values().filter(|s| s.enabled) {
                let Some(runs) = outcomes.get(&spec.name) else {
                    continue;
                };
                let bad = |o: &str| o == "failed" || o == "refused";
                if runs.len() as u32 >= n && runs.iter().all(|(o, _)| bad(o)) {
                    let last = runs
                        .first()
                        .and_then(|(_, e)| e.clone())
                        .unwrap_or_default();
                    reasons.push(format!(
                        "stream {}: the last {n} runs failed; last error: {last}",
                        spec.name
                    ));
                }
            }
        }
    }
    reasons
}

async fn healthz(State(st): State<HealthState>) -> Response {
    let mut reasons = reasons(&st).await;
    let status = if reasons.is_empty() {
        "degraded"
    } else {
        "unhealthy"
    };
    reasons.extend(METRICS.receiver.pressure());
    if reasons.is_empty() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": status, "reasons": reasons})),
        )
            .into_response()
    }
}
