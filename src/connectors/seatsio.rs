//! seats.io (validation only): is the secret key accepted in its region, and is the
//! workspace (when an admin key and a workspace public key are given) there and active?
//!
//! `https://api-{eu|na|sa|oc}.seatsio.net` (the connection's `base_url` overrides it), HTTP
//! Basic with the key as user name and an empty password (the connection's `auth` holds the
//! ready header). `GET /charts?limit=1` checks the secret key; `GET /workspaces/{publicKey}`
//! with the admin key checks the workspace.
//!
//! Decisions where vendor-apis is silent: the admin key's request carries
//! `X-Workspace-Key: <public key>`; any status but 200/401/404 on either call, or a body
//! that is not the documented JSON, is reported with its status as "unexpected answer".

use reqwest::Method;
use tokio_util::sync::CancellationToken;

use crate::config::{Connection, SeatsioAccount};
use crate::http::{Http, HttpAuth, HttpError, Retry};

/// The result of `validate --online` for a seats.io connection (messages fixed by vendor-apis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeatsioCheck {
    Valid(String),
    KeyRefused,
    WorkspaceInactive,
    WorkspaceNotFound,
    Unreachable(String),
    Unexpected(String),
}

impl SeatsioCheck {
    pub fn message(&self) -> String {
        match self {
            SeatsioCheck::Valid(m) => m.clone(),
            SeatsioCheck::KeyRefused => "secret key refused (check the key and the region)".into(),
            SeatsioCheck::WorkspaceInactive => "workspace inactive".into(),
            SeatsioCheck::WorkspaceNotFound => "workspace not found for this key".into(),
            SeatsioCheck::Unreachable(_) => "unreachable".into(),
            SeatsioCheck::Unexpected(m) => format!("unexpected answer: {m}"),
        }
    }
}

pub async fn check(
    http: &Http,
    conn: &Connection,
    account: &SeatsioAccount,
    cancel: &CancellationToken,
) -> SeatsioCheck {
    let ep = http.endpoint(conn);
    let url = ep.url("/charts?limit=1");
    match ep
        .send(Method::GET, url, Retry::Once, cancel, |rb| rb)
        .await
    {
        Ok(r) if r.status == 401 || r.status == 403 => return SeatsioCheck::KeyRefused,
        Ok(r) if r.is_success() => {}
        Ok(r) => return SeatsioCheck::Unexpected(format!("GET /charts: HTTP {}", r.status)),
        Err(e) => return unreachable(e),
    }
    let (Some(admin), Some(public)) = (&account.admin_auth, &account.workspace_key) else {
        return SeatsioCheck::Valid(format!("secret key accepted in region {}", account.region));
    };
    let ws = http.endpoint_with(
        conn,
        HttpAuth::ApiKey {
            header: "Authorization".into(),
            key: admin.clone(),
        },
    );
    let url = ws.url(&format!("/workspaces/{public}"));
    match ws
        .send(Method::GET, url, Retry::Once, cancel, |rb| {
            rb.header("X-Workspace-Key", public.as_str())
        })
        .await
    {
        Ok(r) if r.status == 404 => SeatsioCheck::WorkspaceNotFound,
        Ok(r) if r.status == 401 || r.status == 403 => SeatsioCheck::KeyRefused,
        Ok(r) if r.is_success() => {
            match serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v.get("isActive").and_then(|a| a.as_bool()))
            {
                Some(true) => SeatsioCheck::Valid(format!(
                    "secret key accepted in region {}, workspace active",
                    account.region
                )),
                Some(false) => SeatsioCheck::WorkspaceInactive,
                None => SeatsioCheck::Unexpected(
                    "GET /workspaces/{key}: no isActive in the answer".into(),
                ),
            }
        }
        Ok(r) => SeatsioCheck::Unexpected(format!("GET /workspaces/{{key}}: HTTP {}", r.status)),
        Err(e) => unreachable(e),
    }
}

fn unreachable(e: HttpError) -> SeatsioCheck {
    SeatsioCheck::Unreachable(e.to_string())
}
