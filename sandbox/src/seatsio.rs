//! The fake seats.io: each region is a path prefix (`/seatsio/eu`, `/seatsio/na`, …), so a
//! key registered in one region is refused in another, as on the real service.
//! `GET /{region}/charts` accepts a secret key (HTTP Basic, key as user name);
//! `GET /{region}/workspaces/{publicKey}` answers an admin key with the workspace
//! (`isActive` true or false) or 404 when the admin key's company has no such workspace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use usher::secret::Secret;

#[derive(Default)]
struct Inner {
    /// (region, secret key) pairs that are valid.
    secret_keys: Vec<(String, String)>,
    /// (region, admin key) → public key → active.
    workspaces: HashMap<(String, String), HashMap<String, bool>>,
    calls: Vec<String>,
}

#[derive(Clone, Default)]
pub struct SeatsioFake {
    inner: Arc<Mutex<Inner>>,
}

impl SeatsioFake {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_secret_key(&self, region: &str, key: &str) {
        self.inner
            .lock()
            .unwrap()
            .secret_keys
            .push((region.into(), key.into()));
    }

    /// A workspace `public_key` that `admin_key` (also valid as a secret key) can see.
    pub fn add_workspace(&self, region: &str, admin_key: &str, public_key: &str, active: bool) {
        let mut i = self.inner.lock().unwrap();
        i.secret_keys.push((region.into(), admin_key.into()));
        i.workspaces
            .entry((region.into(), admin_key.into()))
            .or_default()
            .insert(public_key.into(), active);
    }

    /// The paths called, in order ("eu /charts", "eu /workspaces/…").
    pub fn calls(&self) -> Vec<String> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/{region}/charts", get(charts))
            .route("/{region}/workspaces/{key}", get(workspace))
            .with_state(self.clone())
    }

    /// The key of a Basic header that matches a key valid in `region`.
    fn key_of(&self, region: &str, headers: &HeaderMap) -> Option<String> {
        let got = headers.get("authorization")?.to_str().ok()?;
        let i = self.inner.lock().unwrap();
        i.secret_keys
            .iter()
            .find(|(r, k)| {
                r == region
                    && usher::config::basic_user_only(&Secret::new(k.clone())).expose() == got
            })
            .map(|(_, k)| k.clone())
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"errors": [{"code": "UNAUTHORIZED"}]})),
    )
        .into_response()
}

async fn charts(
    State(s): State<SeatsioFake>,
    Path(region): Path<String>,
    headers: HeaderMap,
) -> Response {
    s.inner
        .lock()
        .unwrap()
        .calls
        .push(format!("{region} /charts"));
    if s.key_of(&region, &headers).is_none() {
        return unauthorized();
    }
    axum::Json(json!({"items": [], "next_page_starts_after": null})).into_response()
}

async fn workspace(
    State(s): State<SeatsioFake>,
    Path((region, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    s.inner
        .lock()
        .unwrap()
        .calls
        .push(format!("{region} /workspaces/{key}"));
    let Some(admin) = s.key_of(&region, &headers) else {
        return unauthorized();
    };
    let i = s.inner.lock().unwrap();
    match i
        .workspaces
        .get(&(region.clone(), admin))
        .and_then(|w| w.get(&key))
    {
        Some(active) => axum::Json(json!({
            "id": 1, "name": "Workspace", "key": key, "secretKey": "hidden", "isActive": active
        }))
        .into_response(),
        None => (StatusCode::NOT_FOUND, axum::Json(json!({"errors": []}))).into_response(),
    }
}
