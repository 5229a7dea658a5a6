//! The fake Halo (vendor-apis "Halo"): `authinfo`, the tenant's token endpoint, users
//! (search, paging, all-or-nothing array POST) and sites, holding users in memory.
//!
//! Validation of a POST (any failure → 400 `{"error":"element N: reason"}`, nothing saved):
//! an element must be an object; an `id` must be a known user; a create needs a known
//! `site_id`; `emailaddress` must look like an e-mail; each custom field must be known by
//! `id` or (case-insensitive) `name`; `primary_address.country` must be two capital letters;
//! `inactive` must be a boolean. An update changes only the fields sent.
//!
//! Search: a case-insensitive substring match over name, e-mail, login, other1..5 and
//! custom-field values while the fake holds at most 500 users; above that, an exact
//! (case-insensitive) match of one of those values, from an index, so that the fake stays
//! fast for benchmarks. Clients keep only exact matches, so they see the same result.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::faults::{self, Faults};

pub const DEMO_TENANT: &str = "demo";
pub const DEMO_CLIENT_ID: &str = "usher-demo";
pub const DEMO_CLIENT_SECRET: &str = "halo-demo-secret";
/// Above this many users, search matches whole values only (see the module comment).
const SCAN_MAX: usize = 500;

struct Inner {
    tenant: String,
    client_id: String,
    client_secret: String,
    token_lifetime: u64,
    tokens: HashMap<String, u64>,
    tokens_issued: u64,
    /// User `id` is its index + 1.
    users: Vec<Map<String, Value>>,
    /// Lower-cased searchable value → user indexes.
    index: HashMap<String, HashSet<u32>>,
    /// Each user's lower-cased searchable values (same order as `users`).
    values: Vec<Vec<String>>,
    custom_fields: Vec<(i64, String)>,
    sites: Vec<(i64, String, i64)>,
    /// Arrays POSTed (accepted or refused), and users in accepted ones.
    posts: u64,
    saved: u64,
}

#[derive(Clone)]
pub struct HaloFake {
    inner: Arc<Mutex<Inner>>,
    pub faults: Faults,
}

impl Default for HaloFake {
    fn default() -> Self {
        Self::new()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn searchable(u: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for k in [
        "name",
        "emailaddress",
        "login",
        "other1",
        "other2",
        "other3",
        "other4",
        "other5",
    ] {
        if let Some(Value::String(s)) = u.get(k) {
            out.push(s.trim().to_lowercase());
        }
    }
    if let Some(Value::Array(cfs)) = u.get("customfields") {
        for cf in cfs {
            match cf.get("value") {
                Some(Value::String(s)) => out.push(s.trim().to_lowercase()),
                Some(Value::Number(n)) => out.push(n.to_string()),
                _ => {}
            }
        }
    }
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    out
}

impl Inner {
    /// Brings the search index up to date for one user: only values that changed move.
    fn reindex(&mut self, idx: u32) {
        let vals = searchable(&self.users[idx as usize]);
        let old = std::mem::take(&mut self.values[idx as usize]);
        for v in old.iter().filter(|v| !vals.contains(v)) {
            if let Some(list) = self.index.get_mut(v) {
                list.remove(&idx);
                if list.is_empty() {
                    self.index.remove(v);
                }
            }
        }
        for v in vals.iter().filter(|v| !old.contains(v)) {
            self.index.entry(v.clone()).or_default().insert(idx);
        }
        self.values[idx as usize] = vals;
    }

    fn custom(&self, cf: &Value) -> Option<(i64, String)> {
        if let Some(id) = cf.get("id").and_then(Value::as_i64) {
            return self.custom_fields.iter().find(|(i, _)| *i == id).cloned();
        }
        let name = cf.get("name")?.as_str()?;
        self.custom_fields
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .cloned()
    }

    /// Checks one element; the reason is Halo's message.
    fn check(&self, e: &Value) -> Result<(), String> {
        let Value::Object(m) = e else {
            return Err("not an object".into());
        };
        match m.get("id") {
            Some(id) => {
                let known = id
                    .as_u64()
                    .is_some_and(|n| n >= 1 && (n as usize) <= self.users.len());
                if !known {
                    return Err(format!("unknown user id {id}"));
                }
            }
            None => match m.get("site_id").and_then(Value::as_i64) {
                None => return Err("site_id is required to create a user".into()),
                Some(s) if !self.sites.iter().any(|x| x.0 == s) => {
                    return Err(format!("unknown site_id {s}"));
                }
                _ => {}
            },
        }
        match m.get("emailaddress") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                let s = s.trim();
                let ok = s.is_empty()
                    || (s.split('@').count() == 2
                        && !s.starts_with('@')
                        && !s.ends_with('@')
                        && !s.contains(char::is_whitespace));
                if !ok {
                    return Err(format!("emailaddress {s:?} is not a valid e-mail address"));
                }
            }
            Some(_) => return Err("emailaddress must be text".into()),
        }
        if let Some(v) = m.get("inactive")
            && !v.is_boolean()
        {
            return Err("inactive must be true or false".into());
        }
        if let Some(cfs) = m.get("customfields") {
            let Some(cfs) = cfs.as_array() else {
                return Err("customfields must be an array".into());
            };
            for cf in cfs {
                if self.custom(cf).is_none() {
                    return Err(format!(
                        "unknown custom field {}",
                        cf.get("name").or(cf.get("id")).unwrap_or(&Value::Null)
                    ));
                }
            }
        }
        if let Some(a) = m.get("primary_address") {
            let Some(a) = a.as_object() else {
                return Err("primary_address must be an object".into());
            };
            if let Some(c) = a.get("country")
                && !c.is_null()
            {
                let ok = c
                    .as_str()
                    .is_some_and(|c| c.len() == 2 && c.chars().all(|x| x.is_ascii_uppercase()));
                if !ok {
                    return Err(format!(
                        "primary_address.country {c} is not an ISO 3166 alpha-2 code"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies a checked element; returns the saved user's index.
    fn apply(&mut self, e: Value) -> u32 {
        let Value::Object(mut m) = e else {
            unreachable!("checked")
        };
        let idx = match m.get("id").and_then(Value::as_u64) {
            Some(id) => id as u32 - 1,
            None => {
                let id = self.users.len() as u64 + 1;
                let mut u = Map::new();
                u.insert("id".into(), json!(id));
                u.insert("inactive".into(), json!(false));
                self.users.push(u);
                self.values.push(Vec::new());
                id as u32 - 1
            }
        };
        let cfs = m.remove("customfields");
        let addr = m.remove("primary_address");
        m.remove("id");
        let resolved: Vec<(i64, String, Value)> = cfs
            .as_ref()
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|cf| {
                let (id, name) = self.custom(cf)?;
                Some((id, name, cf.get("value").cloned().unwrap_or(Value::Null)))
            })
            .collect();
        let user = &mut self.users[idx as usize];
        for (k, v) in m {
            user.insert(k, v);
        }
        if !resolved.is_empty() {
            let list = user
                .entry("customfields")
                .or_insert_with(|| Value::Array(vec![]));
            let list = list.as_array_mut().expect("an array");
            for (id, name, value) in resolved {
                match list
                    .iter_mut()
                    .find(|c| c.get("id").and_then(Value::as_i64) == Some(id))
                {
                    Some(c) => c["value"] = value,
                    None => list.push(json!({"id": id, "name": name, "value": value})),
                }
            }
        }
        if let Some(Value::Object(a)) = addr {
            let cur = user
                .entry("primary_address")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(c) = cur {
                for (k, v) in a {
                    c.insert(k, v);
                }
            }
        }
        let part = |k: &str| {
            user.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let name = format!("{} {}", part("firstname"), part("surname"))
            .trim()
            .to_string();
        if !name.is_empty() {
            user.insert("name".into(), json!(name));
        }
        self.reindex(idx);
        idx
    }
}

impl HaloFake {
    pub fn new() -> Self {
        HaloFake {
            inner: Arc::new(Mutex::new(Inner {
                tenant: DEMO_TENANT.into(),
                client_id: DEMO_CLIENT_ID.into(),
                client_secret: DEMO_CLIENT_SECRET.into(),
                token_lifetime: 3600,
                tokens: HashMap::new(),
                tokens_issued: 0,
                users: Vec::new(),
                index: HashMap::new(),
                values: Vec::new(),
                custom_fields: vec![
                    (145, "CFSeatGeekId".into()),
                    (146, "CFMarketingOptIn".into()),
                    (147, "CFSeatGeekTier".into()),
                ],
                sites: vec![(1, "Main".into(), 1), (18, "SeatGeek imports".into(), 12)],
                posts: 0,
                saved: 0,
            })),
            faults: Faults::new(),
        }
    }

    pub fn set_credentials(&self, tenant: &str, client_id: &str, client_secret: &str) {
        let mut i = self.inner.lock().unwrap();
        i.tenant = tenant.into();
        i.client_id = client_id.into();
        i.client_secret = client_secret.into();
    }

    pub fn tokens_issued(&self) -> u64 {
        self.inner.lock().unwrap().tokens_issued
    }

    pub fn expire_tokens(&self) {
        self.inner.lock().unwrap().tokens.clear();
    }

    /// Adds a user as given (as if created in Halo by hand); returns its ID.
    pub fn seed_user(&self, mut u: Value) -> u64 {
        let mut i = self.inner.lock().unwrap();
        if let Value::Object(m) = &mut u {
            m.remove("id");
            m.entry("site_id").or_insert(json!(1));
        }
        i.check(&u).expect("a valid seeded user");
        i.apply(u) as u64 + 1
    }

    /// Every user, in ID order.
    pub fn users(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .users
            .iter()
            .map(|u| Value::Object(u.clone()))
            .collect()
    }

    pub fn user(&self, id: u64) -> Option<Value> {
        let i = self.inner.lock().unwrap();
        i.users
            .get((id as usize).checked_sub(1)?)
            .map(|u| Value::Object(u.clone()))
    }

    pub fn user_count(&self) -> usize {
        self.inner.lock().unwrap().users.len()
    }

    /// (arrays POSTed, users saved).
    pub fn post_stats(&self) -> (u64, u64) {
        let i = self.inner.lock().unwrap();
        (i.posts, i.saved)
    }

    pub fn router(&self) -> Router {
        let layer = |route: &'static str| {
            axum::middleware::from_fn_with_state((self.faults.clone(), route), faults::layer)
        };
        let users: MethodRouter<HaloFake> = MethodRouter::new()
            .get(list_users)
            .layer(layer("halo.users.get"))
            .merge(
                MethodRouter::new()
                    .post(save_users)
                    .layer(layer("halo.users.post")),
            );
        Router::new()
            .route("/api/authinfo", get(authinfo).layer(layer("halo.authinfo")))
            .route("/auth/token", post(token).layer(layer("halo.token")))
            .route("/api/users", users)
            .route("/api/site", get(sites).layer(layer("halo.site")))
            .route(
                "/api/FieldInfo",
                get(field_info).layer(layer("halo.fieldinfo")),
            )
            .with_state(self.clone())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let i = self.inner.lock().unwrap();
        bearer
            .and_then(|b| i.tokens.get(b))
            .is_some_and(|exp| *exp > now_secs())
    }
}

fn error(status: StatusCode, e: &str) -> Response {
    (status, axum::Json(json!({ "error": e }))).into_response()
}

async fn authinfo(State(f): State<HaloFake>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let tenant = f.inner.lock().unwrap().tenant.clone();
    axum::Json(json!({"auth_url": format!("http://{host}/halo/auth"), "tenant_id": tenant}))
        .into_response()
}

#[derive(Deserialize)]
struct TokenQuery {
    tenant: Option<String>,
}

async fn token(State(f): State<HaloFake>, Query(q): Query<TokenQuery>, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let mut i = f.inner.lock().unwrap();
    let Some(tenant) = q.tenant else {
        return error(StatusCode::BAD_REQUEST, "tenant is required");
    };
    if tenant != i.tenant {
        return error(StatusCode::UNAUTHORIZED, "unknown tenant");
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if form.get("scope").map(String::as_str) != Some("all") {
        return error(StatusCode::BAD_REQUEST, "invalid_scope");
    }
    if form.get("client_id") != Some(&i.client_id)
        || form.get("client_secret") != Some(&i.client_secret)
    {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    i.tokens_issued += 1;
    let tok = format!("halo-{}-{}", i.tokens_issued, rand::random::<u64>());
    let life = i.token_lifetime;
    i.tokens.insert(tok.clone(), now_secs() + life);
    axum::Json(json!({"access_token": tok, "token_type": "Bearer", "expires_in": life}))
        .into_response()
}

#[derive(Deserialize)]
struct UsersQuery {
    page_size: Option<usize>,
    page_no: Option<usize>,
    search: Option<String>,
    site_id: Option<i64>,
    includeinactive: Option<bool>,
}

async fn list_users(
    State(f): State<HaloFake>,
    headers: HeaderMap,
    Query(q): Query<UsersQuery>,
) -> Response {
    if !f.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    let i = f.inner.lock().unwrap();
    let keep = |u: &Map<String, Value>| {
        (q.includeinactive == Some(true) || u.get("inactive") != Some(&Value::Bool(true)))
            && q.site_id
                .is_none_or(|s| u.get("site_id").and_then(Value::as_i64) == Some(s))
    };
    let hits: Vec<u32> = match q.search.as_deref().map(|s| s.trim().to_lowercase()) {
        Some(s) if !s.is_empty() => {
            if i.users.len() <= SCAN_MAX {
                (0..i.users.len() as u32)
                    .filter(|x| i.values[*x as usize].iter().any(|v| v.contains(&s)))
                    .collect()
            } else {
                let mut v: Vec<u32> = i.index.get(&s).into_iter().flatten().copied().collect();
                v.sort_unstable();
                v
            }
        }
        _ => (0..i.users.len() as u32).collect(),
    };
    let hits: Vec<u32> = hits
        .into_iter()
        .filter(|x| keep(&i.users[*x as usize]))
        .collect();
    let size = q.page_size.unwrap_or(50).clamp(1, 1000);
    let page = q.page_no.unwrap_or(1).max(1);
    let users: Vec<&Map<String, Value>> = hits
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|x| &i.users[*x as usize])
        .collect();
    let body = serde_json::to_vec(&json!({"record_count": hits.len(), "users": users}))
        .expect("serializes");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn save_users(State(f): State<HaloFake>, headers: HeaderMap, body: Bytes) -> Response {
    if !f.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON array of users",
        );
    };
    let mut i = f.inner.lock().unwrap();
    i.posts += 1;
    for (n, e) in items.iter().enumerate() {
        if let Err(reason) = i.check(e) {
            return error(StatusCode::BAD_REQUEST, &format!("element {n}: {reason}"));
        }
    }
    i.saved += items.len() as u64;
    let saved: Vec<u32> = items.into_iter().map(|e| i.apply(e)).collect();
    let saved: Vec<&Map<String, Value>> = saved.iter().map(|x| &i.users[*x as usize]).collect();
    let body = serde_json::to_vec(&saved).expect("serializes");
    drop(i);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The custom fields, as Halo's `FieldInfo` lists them.
async fn field_info(State(f): State<HaloFake>, headers: HeaderMap) -> Response {
    if !f.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    let i = f.inner.lock().unwrap();
    let fields: Vec<Value> = i
        .custom_fields
        .iter()
        .map(|(id, name)| json!({"id": id, "name": name, "usage": 1}))
        .collect();
    axum::Json(fields).into_response()
}

async fn sites(State(f): State<HaloFake>, headers: HeaderMap) -> Response {
    if !f.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    let i = f.inner.lock().unwrap();
    let sites: Vec<Value> = i
        .sites
        .iter()
        .map(|(id, name, client)| json!({"id": id, "name": name, "client_id": client}))
        .collect();
    axum::Json(json!({"record_count": sites.len(), "sites": sites})).into_response()
}
