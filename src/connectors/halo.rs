//! Halo PSA users (vendor-apis "Halo"): URLs and JSON.
//!
//! - `GET {base}/api/authinfo` gives the auth server; the token is
//!   `POST {auth_url}/token?tenant=T` with `grant_type=client_credentials`, `client_id`,
//!   `client_secret`, `scope=all`, through `http` (cached, one refresh on a 401). The
//!   authinfo answer is asked once per client (per run).
//! - `GET {base}/api/users?pageinate=true&page_size=N&page_no=P&includeinactive=true[&search=S]`
//!   (`pageinate` is Halo's own spelling). Matching always sends `includeinactive=true`, so a
//!   deactivated user is found, not duplicated.
//! - `POST {base}/api/users` with a JSON array; the answer is the saved users in order.
//!   A 400 means nothing was saved; its `error` text is Halo's reason ([`Saved::Refused`]).
//!
//! - `GET {base}/api/site` lists the sites and `GET {base}/api/FieldInfo` the custom fields
//!   (`[{"id","name",…}]`, Halo's own endpoint, as its public API modules use it; not in the
//!   contract): `validate --online` checks the stream's `default_site`, `id_field` and
//!   `custom_fields` against them. A Halo that answers 404 for `FieldInfo` gets its custom
//!   fields "not checked" rather than a false problem.
//!
//! Decisions where the contract is silent: user IDs are kept as the JSON text Halo sent
//! (`40213` or `"40213"`) and sent back unchanged; a saved answer whose length differs from
//! the request is treated as malformed (the page is not committed and the next run matches
//! by SeatGeek ID, so nothing is created twice); a 400 without an `error` field is reported
//! with the start of its body.

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Connection;
use crate::http::{Endpoint, Http, HttpAuth, HttpError, Retry, describe};

/// The client of one `halo` connection.
pub struct HaloClient {
    pub endpoint: Endpoint,
}

/// What a POST of users came to.
#[derive(Debug)]
pub enum Saved {
    /// Every element saved; the IDs (as JSON text) in request order.
    Ok(Vec<String>),
    /// Halo refused the whole array (nothing saved), with its reason.
    Refused(String),
}

#[derive(Deserialize)]
struct UsersPage {
    record_count: Option<u64>,
    users: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct SavedId {
    id: Value,
}

fn malformed(conn: &str, what: String, status: u16, why: &str) -> HttpError {
    HttpError::Status {
        conn: conn.to_string(),
        what,
        status,
        snippet: format!("the answer is not the expected JSON: {why}"),
        attempts: 1,
    }
}

/// The tenant's token URL from `GET {base}/api/authinfo`, and the tenant ID it names.
async fn token_url(
    http: &Http,
    conn: &Connection,
    cancel: &CancellationToken,
) -> Result<(url::Url, Option<String>), HttpError> {
    let plain = http.endpoint_with(conn, HttpAuth::None);
    let url = plain.url("api/authinfo");
    let what = describe(&Method::GET, &url);
    let reply = plain
        .send_ok(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
        .await?;
    #[derive(Deserialize)]
    struct AuthInfo {
        auth_url: String,
        tenant_id: Option<String>,
    }
    let info: AuthInfo = serde_json::from_slice(&reply.body)
        .map_err(|e| malformed(&conn.name, what.clone(), reply.status, &e.to_string()))?;
    let mut token_url = url::Url::parse(&info.auth_url)
        .or_else(|_| conn.base_url.join(&info.auth_url))
        .map_err(|e| malformed(&conn.name, what.clone(), reply.status, &e.to_string()))?;
    if !token_url.path().ends_with('/') {
        let p = format!("{}/", token_url.path());
        token_url.set_path(&p);
    }
    let mut token_url = token_url
        .join("token")
        .map_err(|e| malformed(&conn.name, what.clone(), reply.status, &e.to_string()))?;
    token_url
        .query_pairs_mut()
        .append_pair("tenant", conn.tenant.as_deref().unwrap_or(""));
    Ok((token_url, info.tenant_id))
}

impl HaloClient {
    /// Asks `authinfo` for the auth server and returns a client that fetches its token there.
    pub async fn connect(
        http: &Http,
        conn: &Connection,
        cancel: &CancellationToken,
    ) -> Result<HaloClient, HttpError> {
        let (token_url, _) = token_url(http, conn, cancel).await?;
        let auth = match &conn.auth {
            crate::config::Auth::OAuth2 {
                client_id,
                client_secret,
                ..
            } => HttpAuth::OAuth2 {
                token_url,
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                form: vec![("scope".into(), "all".into())],
            },
            other => HttpAuth::from(other),
        };
        Ok(HaloClient {
            endpoint: http.endpoint_with(conn, auth),
        })
    }

    /// One page of users (inactive ones included), optionally filtered by `search`.
    /// Returns Halo's `record_count` and the users.
    pub async fn users(
        &self,
        search: Option<&str>,
        page_no: u64,
        page_size: u32,
        cancel: &CancellationToken,
    ) -> Result<(u64, Vec<Value>), HttpError> {
        let mut url = self.endpoint.url("api/users");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("pageinate", "true");
            q.append_pair("page_size", &page_size.to_string());
            q.append_pair("page_no", &page_no.to_string());
            q.append_pair("includeinactive", "true");
            if let Some(s) = search {
                q.append_pair("search", s);
            }
        }
        let what = describe(&Method::GET, &url);
        let reply = self
            .endpoint
            .send_ok(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
            .await?;
        let page: UsersPage = serde_json::from_slice(&reply.body).map_err(|e| {
            malformed(
                &self.endpoint.name,
                what.clone(),
                reply.status,
                &e.to_string(),
            )
        })?;
        let users = page.users.ok_or_else(|| {
            malformed(&self.endpoint.name, what, reply.status, "no `users` array")
        })?;
        Ok((page.record_count.unwrap_or(users.len() as u64), users))
    }

    /// Saves users (an element with `id` updates, one without creates). `body` is the JSON
    /// array of `n` users. Updates only (`idempotent`) are retried on 5xx and timeouts;
    /// an array that creates is sent once (its effect is unknown after a failure).
    pub async fn save(
        &self,
        body: Vec<u8>,
        n: usize,
        idempotent: bool,
        cancel: &CancellationToken,
    ) -> Result<Saved, HttpError> {
        let url = self.endpoint.url("api/users");
        let what = describe(&Method::POST, &url);
        let body = bytes::Bytes::from(body);
        let retry = if idempotent {
            Retry::IdempotentWrite
        } else {
            Retry::CreateOnce
        };
        let reply = self
            .endpoint
            .send(Method::POST, url, retry, cancel, |rb| {
                rb.header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        if reply.status == 400 {
            let reason = serde_json::from_slice::<Value>(&reply.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str().map(str::to_string)))
                .unwrap_or_else(|| reply.snippet());
            return Ok(Saved::Refused(reason));
        }
        if !reply.is_success() {
            return Err(HttpError::Status {
                conn: self.endpoint.name.clone(),
                what,
                status: reply.status,
                snippet: reply.snippet(),
                attempts: reply.attempts,
            });
        }
        let saved: Vec<SavedId> = serde_json::from_slice(&reply.body).map_err(|e| {
            malformed(
                &self.endpoint.name,
                what.clone(),
                reply.status,
                &e.to_string(),
            )
        })?;
        if saved.len() != n {
            return Err(malformed(
                &self.endpoint.name,
                what,
                reply.status,
                &format!("{} users saved for {n} sent", saved.len()),
            ));
        }
        Ok(Saved::Ok(
            saved.into_iter().map(|s| s.id.to_string()).collect(),
        ))
    }

    /// `GET /api/site`: every site as (ID, name).
    pub async fn sites(&self, cancel: &CancellationToken) -> Result<Vec<(i64, String)>, HttpError> {
        let url = self.endpoint.url("api/site");
        let reply = self
            .endpoint
            .send_ok(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
            .await?;
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        Ok(v.get("sites")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        Some((
                            s.get("id")?.as_i64()?,
                            s.get("name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `GET /api/FieldInfo`: the custom fields as (ID, name); None when this Halo has no
    /// such endpoint (404).
    pub async fn custom_fields(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<(i64, String)>>, HttpError> {
        let url = self.endpoint.url("api/FieldInfo");
        let what = describe(&Method::GET, &url);
        let reply = self
            .endpoint
            .send(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
            .await?;
        if reply.status == 404 {
            return Ok(None);
        }
        if !reply.is_success() {
            return Err(HttpError::Status {
                conn: self.endpoint.name.clone(),
                what,
                status: reply.status,
                snippet: reply.snippet(),
                attempts: reply.attempts,
            });
        }
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        // An array, or an object holding one (`{"fields": [...]}`), as Halo versions differ.
        let list = v.as_array().or_else(|| {
            v.as_object()
                .and_then(|o| o.values().find_map(Value::as_array))
        });
        Ok(Some(
            list.map(|a| {
                a.iter()
                    .filter_map(|f| {
                        Some((
                            f.get("id")?.as_i64()?,
                            f.get("name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ))
    }

    /// `GET /api/site`: the number of sites (for `validate --online`).
    pub async fn site_count(&self, cancel: &CancellationToken) -> Result<u64, HttpError> {
        let url = self.endpoint.url("api/site");
        let reply = self
            .endpoint
            .send_ok(Method::GET, url, Retry::Idempotent, cancel, |rb| rb)
            .await?;
        Ok(serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v.get("record_count").and_then(Value::as_u64))
            .unwrap_or(0))
    }
}

/// Which of tenant, client or secret Halo refused, as far as its token answer tells
/// (vendor-apis "Halo": a wrong tenant is a 401, a missing one a 400; a wrong client ID or
/// secret is OAuth's `invalid_client`, which does not say which of the two).
fn token_refused(
    conn: &Connection,
    status: u16,
    body: &[u8],
    tenant_id: Option<&str>,
) -> super::Verdict {
    use super::Verdict;
    let error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_default();
    let tenant = conn.tenant.as_deref().unwrap_or("");
    let client = match &conn.auth {
        crate::config::Auth::OAuth2 { client_id, .. } => client_id.as_str(),
        _ => "",
    };
    if error.contains("tenant") {
        let hint = match tenant_id {
            Some(t) if t != tenant => format!(" (its authinfo names tenant {t:?})"),
            _ => String::new(),
        };
        return Verdict::WrongCredentials(format!(
            "Halo refused the tenant {tenant:?}: HTTP {status} {error:?}{hint}; check `tenant`"
        ));
    }
    if error == "invalid_client" {
        return Verdict::WrongCredentials(format!(
            "Halo took the tenant {tenant:?} but refused the client: the client ID {client:?} or its secret is wrong (HTTP {status} \"invalid_client\", which does not say which); check `client_id` and `client_secret_file`"
        ));
    }
    Verdict::WrongCredentials(format!(
        "Halo refused the token request: HTTP {status} {error:?}"
    ))
}

/// `validate --online`: authinfo, a token, and the list of sites (nothing is changed).
pub async fn check(http: &Http, conn: &Connection, cancel: &CancellationToken) -> super::Verdict {
    use super::Verdict;
    // The token call first, by hand: Halo's answer tells a wrong tenant from a wrong client,
    // which the shared client's "credentials refused" does not keep.
    let (url, tenant_id) = match token_url(http, conn, cancel).await {
        Ok(t) => t,
        Err(e) => return Verdict::Unreachable(e.to_string()),
    };
    if let crate::config::Auth::OAuth2 {
        client_id,
        client_secret,
        ..
    } = &conn.auth
    {
        let plain = http.endpoint_with(conn, HttpAuth::None);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.expose()),
            ("scope", "all"),
        ];
        match plain
            .send(Method::POST, url, Retry::Once, cancel, |rb| rb.form(&form))
            .await
        {
            Ok(r) if r.is_success() => {}
            Ok(r) => return token_refused(conn, r.status, &r.body, tenant_id.as_deref()),
            Err(e) => return Verdict::Unreachable(e.to_string()),
        }
    }
    let client = match HaloClient::connect(http, conn, cancel).await {
        Ok(c) => c,
        Err(e) => return Verdict::Unreachable(e.to_string()),
    };
    match client.site_count(cancel).await {
        Ok(n) => Verdict::Valid(format!("token issued, {n} site(s) visible")),
        Err(HttpError::CredentialsRefused { what, .. }) => {
            Verdict::WrongCredentials(format!("refused at {what}"))
        }
        Err(e) => Verdict::Unreachable(e.to_string()),
    }
}
