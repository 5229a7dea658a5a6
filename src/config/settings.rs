//! Integration settings: resellers, companies, feature flags, conflicts and enable toggles
//! (DESIGN.md "Integration settings"), plus the account fields of the two integrations of
//! the Integrations page that are connections: CM.com CDP (`cdp`) and seats.io (`seatsio`).
//!
//! The model, as TOML:
//!
//! ```toml
//! [resellers.agency]
//! flags = ["cdp", "seatsio"]                       # feature flags on the reseller
//! [resellers.agency.credentials.halo]              # platform credentials, per integration,
//! client_id = "usher"                              # written with the connection keys they
//! client_secret_file = "halo-secret"               # stand for
//!
//! [companies.venue-a]
//! reseller = "agency"
//! flags = ["cdp"]                                  # feature flags on the company
//! [companies.venue-a.integrations.cdp]             # one block per integration, with its
//! enabled = true                                   # toggle (default on) and settings
//!
//! [connections.venue-a-cdp]
//! kind = "cdp"
//! company = "venue-a"                              # the connection belongs to the company
//! credentials_from = "reseller"                    # missing credential keys come from
//!                                                  # [resellers.R.credentials.<kind>]
//! ```
//!
//! Decisions (the issue left them open):
//! - An integration's feature flag has the integration's own name (`cdp`, `seatsio`, …).
//! - The chain is checked in the order of the Integration settings page: the reseller's
//!   credentials, the reseller's flag, the company's flag, the company's settings; `validate`
//!   names the first missing link, once per refused integration.
//! - An integration block that is on but refused is a configuration error (exit 78; a reload
//!   with it is refused and the running configuration stays). A block that is off is never an
//!   error: `status` shows it as off, and says what would also refuse it when turned on.
//! - A stream belongs to the company written on it, else to the company of its connections.
//!   It is tied to the company's integration of each of its connections' kinds that is in
//!   [`INTEGRATIONS`]; it runs only when every one of them is on. Off sets the stream's
//!   `enabled` to false, so the daemon's reload (which re-arms on `enabled` changes) pauses
//!   and resumes it; nothing in the state is touched, so it resumes where it was.
//! - `credentials_from = "reseller"` fills, at load, every key of the connection that is not
//!   written on it from the reseller's `credentials.<kind>` table (keys such as
//!   `client_secret_file` keep their meaning). Keys written on the connection win.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use figment::providers::Serialized;
use figment::value::Value;
use serde::Deserialize;

use super::load::{Layers, Problem};
use super::raw::RawConnection;
use super::values::is_guid;
use super::{Auth, Connection, ConnectionKind, StreamSpec};
use crate::secret::Secret;
use crate::streams::options::RawStream;

/// One integration that a company can turn on.
#[derive(Debug)]
pub struct Integration {
    /// The block's name under `[companies.C.integrations]`, and the feature flag's name.
    pub name: &'static str,
    /// As the dashboard names it.
    pub label: &'static str,
    /// The connection kind that carries the company's settings (its account), if any.
    pub connection_kind: Option<&'static str>,
    /// Keys the reseller must provide under `[resellers.R.credentials.<name>]`.
    pub reseller_credentials: &'static [&'static str],
    /// Keys the company must set in its integration block.
    pub company_settings: &'static [&'static str],
}

const fn integration(
    name: &'static str,
    label: &'static str,
    connection_kind: Option<&'static str>,
    reseller_credentials: &'static [&'static str],
    company_settings: &'static [&'static str],
) -> Integration {
    Integration {
        name,
        label,
        connection_kind,
        reseller_credentials,
        company_settings,
    }
}

/// The integrations usher knows. Vendor kinds from other streams add a line here.
pub const INTEGRATIONS: &[Integration] = &[
    integration(
        "cdp",
        "CM.com Customer Data Platform",
        Some("cdp"),
        &[],
        &[],
    ),
    integration("seatsio", "seats.io", Some("seatsio"), &[], &[]),
    integration("seatgeek", "SeatGeek", Some("seatgeek"), &[], &[]),
    integration("halo", "Halo", Some("halo"), &[], &[]),
    integration("s360", "S-360", Some("s360"), &[], &[]),
    integration("ticketco", "Ticket Co", Some("ticketco"), &[], &[]),
    integration("airship", "Airship", Some("airship"), &[], &[]),
    integration(
        "refund_protect_group",
        "Refund Protect Group",
        None,
        &["client_id", "client_secret", "api_key", "vendor_code"],
        &["tax_band", "deadline_hours"],
    ),
    integration(
        "manual_refund_protection",
        "Manual Refund Protection",
        None,
        &[],
        &[],
    ),
    integration("szamlazz", "Szamlazz", None, &[], &[]),
    integration(
        "conditional_tax_bands",
        "Conditional tax bands",
        None,
        &[],
        &[],
    ),
    integration(
        "dtcm",
        "Dubai Tourism and Commerce Marketing",
        None,
        &[],
        &[
            "api_key",
            "token_api_key",
            "client_id",
            "client_secret",
            "seller_code",
        ],
    ),
    integration("google_maps", "Google Maps", None, &["api_key"], &[]),
];

/// Integrations that exclude each other on one company (each pair once; the rule is symmetric).
pub const CONFLICTS: &[(&str, &str)] = &[
    ("refund_protect_group", "manual_refund_protection"),
    ("szamlazz", "conditional_tax_bands"),
];

pub fn find(name: &str) -> Option<&'static Integration> {
    INTEGRATIONS.iter().find(|i| i.name == name)
}

fn for_kind(kind: &str) -> Option<&'static Integration> {
    INTEGRATIONS
        .iter()
        .find(|i| i.connection_kind == Some(kind))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReseller {
    pub flags: Option<Vec<String>>,
    pub credentials: Option<BTreeMap<String, BTreeMap<String, toml::Value>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompany {
    pub reseller: Option<String>,
    pub flags: Option<Vec<String>>,
    pub integrations: Option<BTreeMap<String, BTreeMap<String, toml::Value>>>,
}

/// What settings decided, for the engine (`paused`), for `status` and for the connectors.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Every integration block of every company, with its state and the reason.
    pub integrations: Vec<IntegrationState>,
    /// Streams paused by an integration that is off: stream → why.
    pub paused: BTreeMap<String, String>,
    /// The CDP account of each `cdp` connection (the product token is its `auth`).
    pub cdp: BTreeMap<String, CdpAccount>,
    /// The seats.io account of each `seatsio` connection (the secret key is its `auth`).
    pub seatsio: BTreeMap<String, SeatsioAccount>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct IntegrationState {
    pub company: String,
    pub reseller: String,
    pub integration: String,
    /// "enabled" or "off".
    pub state: &'static str,
    /// Why: "enabled", "off (toggle)", or "off (toggle); when on: <missing link>".
    pub why: String,
    pub connections: Vec<String>,
    pub streams: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CdpAccount {
    pub tenant_guid: String,
}

#[derive(Debug, Clone)]
pub struct SeatsioAccount {
    pub region: String,
    /// `Basic base64(admin key + ":")`, used with `X-Workspace-Key` to check the workspace.
    pub admin_auth: Option<Secret>,
    pub workspace_key: Option<String>,
}

pub const CDP_DEFAULT_BASE: &str = "https://api.cdp.cm.com";
pub const SEATSIO_REGIONS: &[&str] = &["eu", "na", "sa", "oc"];

fn dict_keys(v: Option<Value>) -> Vec<String> {
    v.and_then(|v| v.into_dict())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

/// Before anything is read: fills connections that say `credentials_from = "reseller"` from
/// their reseller, and gives `cdp` and `seatsio` connections their default base URL.
pub(super) fn prepare(l: &mut Layers) {
    // One merge of the layers for all connections (figment merges on every lookup).
    let Ok(root) = l.figment.extract::<figment::value::Dict>() else {
        return;
    };
    let get = |path: &str| -> Option<&Value> {
        let mut parts = path.split('.');
        let mut cur = root.get(parts.next()?)?;
        for p in parts {
            cur = cur.as_dict()?.get(p)?;
        }
        Some(cur)
    };
    let text = |path: &str| get(path).and_then(|v| v.as_str()).map(str::to_string);
    let Some(conns) = get("connections").and_then(|v| v.as_dict()) else {
        return;
    };
    let mut fills = figment::value::Dict::new();
    for (name, conn) in conns {
        let Some(conn) = conn.as_dict() else {
            continue;
        };
        let at = format!("connections.{name}");
        let kind = text(&format!("{at}.kind")).unwrap_or_default();
        let mut fill = figment::value::Dict::new();
        if !conn.contains_key("base_url") {
            if kind == "cdp" {
                fill.insert("base_url".into(), CDP_DEFAULT_BASE.into());
            } else if kind == "seatsio" {
                // A missing or unknown region is reported by `apply` (under `region`, not
                // as a missing `base_url`); the URL then never serves.
                let region = text(&format!("{at}.region"))
                    .filter(|r| SEATSIO_REGIONS.contains(&r.as_str()))
                    .unwrap_or_else(|| "eu".into());
                fill.insert(
                    "base_url".into(),
                    format!("https://api-{region}.seatsio.net").into(),
                );
            }
        }
        if text(&format!("{at}.credentials_from")).as_deref() == Some("reseller")
            && let Some(company) = text(&format!("{at}.company"))
            && let Some(reseller) = text(&format!("companies.{company}.reseller"))
            && let Some(creds) =
                get(&format!("resellers.{reseller}.credentials.{kind}")).and_then(|v| v.as_dict())
        {
            for (k, v) in creds {
                if !conn.contains_key(k) {
                    fill.insert(k.clone(), v.clone());
                    // Its problems are reported where the sysadmin wrote it.
                    l.aliases.insert(
                        format!("{at}.{k}"),
                        (
                            format!("resellers.{reseller}.credentials.{kind}.{k}"),
                            format!("credentials of reseller {reseller:?}"),
                        ),
                    );
                }
            }
        }
        if !fill.is_empty() {
            fills.insert(name.clone(), fill.into());
        }
    }
    if !fills.is_empty() {
        l.figment = l
            .figment
            .clone()
            .join(Serialized::default("connections", fills));
    }
}

/// `Authorization: Basic base64(key + ":")` as a secret (seats.io: key as user, no password).
pub fn basic_user_only(key: &Secret) -> Secret {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{}:", key.expose());
    let bytes = input.as_bytes();
    let mut out = String::from("Basic ");
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    Secret::new(out)
}

struct Company {
    reseller: Option<String>,
    flags: BTreeSet<String>,
    blocks: BTreeMap<String, (bool, BTreeMap<String, toml::Value>)>,
}

struct Reseller {
    flags: BTreeSet<String>,
    credentials: BTreeMap<String, BTreeMap<String, toml::Value>>,
}

fn check_flags(l: &mut Layers, scope: &str, key: &str, flags: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in flags {
        if find(f).is_none() {
            l.problem(
                scope,
                key,
                format!(
                    "unknown feature flag {f:?} (known: {})",
                    INTEGRATIONS
                        .iter()
                        .map(|i| i.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        } else {
            out.insert(f.clone());
        }
    }
    out
}

/// After connections and streams are built: resellers, companies, the enablement chain,
/// conflicts, the CDP and seats.io accounts, and which streams an integration that is off
/// pauses.
pub(super) fn apply(
    l: &mut Layers,
    connections: &mut BTreeMap<String, Arc<Connection>>,
    streams: &mut BTreeMap<String, Arc<StreamSpec>>,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Settings {
    let mut settings = Settings::default();

    let mut resellers = BTreeMap::new();
    for name in dict_keys(l.value("resellers")) {
        let scope = format!("reseller \"{name}\"");
        let prefix = format!("resellers.{name}");
        let raw: RawReseller = l.table(&scope, &prefix).unwrap_or_default();
        let flags = check_flags(
            l,
            &scope,
            &format!("{prefix}.flags"),
            raw.flags.as_deref().unwrap_or_default(),
        );
        let credentials = raw.credentials.unwrap_or_default();
        for k in credentials.keys() {
            if find(k).is_none() && ConnectionKind::parse(k).is_none() {
                l.problem(
                    &scope,
                    &format!("{prefix}.credentials.{k}"),
                    format!("unknown integration {k:?}"),
                );
            }
        }
        resellers.insert(name, Reseller { flags, credentials });
    }

    let mut companies = BTreeMap::new();
    for name in dict_keys(l.value("companies")) {
        let scope = format!("company \"{name}\"");
        let prefix = format!("companies.{name}");
        let raw: RawCompany = l.table(&scope, &prefix).unwrap_or_default();
        let reseller = match raw.reseller {
            None => {
                l.problem(
                    &scope,
                    &format!("{prefix}.reseller"),
                    "missing key `reseller` (the reseller this company belongs to)",
                );
                None
            }
            Some(r) if !resellers.contains_key(&r) => {
                l.problem(
                    &scope,
                    &format!("{prefix}.reseller"),
                    format!("unknown reseller {r:?}"),
                );
                None
            }
            Some(r) => Some(r),
        };
        let flags = check_flags(
            l,
            &scope,
            &format!("{prefix}.flags"),
            raw.flags.as_deref().unwrap_or_default(),
        );
        let mut blocks = BTreeMap::new();
        for (iname, mut block) in raw.integrations.unwrap_or_default() {
            let key = format!("{prefix}.integrations.{iname}");
            if find(&iname).is_none() {
                l.problem(
                    &scope,
                    &key,
                    format!(
                        "unknown integration {iname:?} (known: {})",
                        INTEGRATIONS
                            .iter()
                            .map(|i| i.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            }
            let enabled = match block.remove("enabled") {
                None => true,
                Some(toml::Value::Boolean(b)) => b,
                Some(_) => {
                    l.problem(
                        &scope,
                        &format!("{key}.enabled"),
                        "`enabled` must be true or false",
                    );
                    true
                }
            };
            blocks.insert(iname, (enabled, block));
        }
        companies.insert(
            name,
            Company {
                reseller,
                flags,
                blocks,
            },
        );
    }

    // Connections: company, credentials_from, and the CDP and seats.io account fields.
    let mut conn_company: BTreeMap<String, String> = BTreeMap::new();
    let names: Vec<String> = connections.keys().cloned().collect();
    for name in names {
        let scope = format!("connection \"{name}\"");
        let prefix = format!("connections.{name}");
        let Some(raw) = l.table::<RawConnection>(&scope, &prefix) else {
            continue;
        };
        let kind = connections[&name].kind;
        if let Some(c) = &raw.company {
            if companies.contains_key(c) {
                conn_company.insert(name.clone(), c.clone());
            } else {
                l.problem(
                    &scope,
                    &format!("{prefix}.company"),
                    format!("unknown company {c:?}"),
                );
            }
        }
        match raw.credentials_from.as_deref() {
            None => {}
            Some("reseller") => {
                let reseller = raw
                    .company
                    .as_ref()
                    .and_then(|c| companies.get(c))
                    .and_then(|c| c.reseller.clone());
                match reseller {
                    None if raw.company.is_none() => l.problem(
                        &scope,
                        &format!("{prefix}.credentials_from"),
                        "`credentials_from = \"reseller\"` needs `company` (whose reseller provides them)",
                    ),
                    Some(r) if !resellers[&r].credentials.contains_key(kind.as_str()) => {
                        {
                            l.problem(
                                &scope,
                                &format!("{prefix}.credentials_from"),
                                format!(
                                    "reseller {r:?} has not provided credentials for {} (add [resellers.{r}.credentials.{}])",
                                    kind.as_str(),
                                    kind.as_str()
                                ),
                            );
                        }
                    }
                    _ => {}
                }
            }
            Some(other) => l.problem(
                &scope,
                &format!("{prefix}.credentials_from"),
                format!("{other:?}: the only source of shared credentials is \"reseller\""),
            ),
        }
        let vendor_keys = [
            ("product_token", raw.product_token.is_some(), "cdp"),
            (
                "product_token_file",
                raw.product_token_file.is_some(),
                "cdp",
            ),
            ("product_token_env", raw.product_token_env.is_some(), "cdp"),
            ("tenant_guid", raw.tenant_guid.is_some(), "cdp"),
            ("region", raw.region.is_some(), "seatsio"),
            ("secret_key", raw.secret_key.is_some(), "seatsio"),
            ("secret_key_file", raw.secret_key_file.is_some(), "seatsio"),
            ("secret_key_env", raw.secret_key_env.is_some(), "seatsio"),
            ("admin_key", raw.admin_key.is_some(), "seatsio"),
            ("admin_key_file", raw.admin_key_file.is_some(), "seatsio"),
            ("admin_key_env", raw.admin_key_env.is_some(), "seatsio"),
            ("workspace_key", raw.workspace_key.is_some(), "seatsio"),
        ];
        for (key, set, for_kind) in vendor_keys {
            if set && kind.as_str() != for_kind {
                l.problem(
                    &scope,
                    &format!("{prefix}.{key}"),
                    format!(
                        "`{key}` does not apply to a connection of kind {} (only {for_kind})",
                        kind.as_str()
                    ),
                );
            }
        }
        match kind {
            ConnectionKind::Cdp => {
                if raw.auth.is_some() {
                    l.problem(&scope, &format!("{prefix}.auth"), "a cdp connection authenticates with `product_token_file` (or `product_token_env`), not `auth`");
                }
                let token = super::values::secret(
                    l,
                    &scope,
                    &prefix,
                    "product_token",
                    raw.product_token.as_ref(),
                    raw.product_token_file.as_ref(),
                    raw.product_token_env.as_ref(),
                    config_dir,
                    warnings,
                );
                let tenant = match &raw.tenant_guid {
                    None => {
                        l.problem(
                            &scope,
                            &format!("{prefix}.tenant_guid"),
                            "missing key `tenant_guid` (the CDP tenant, a GUID)",
                        );
                        None
                    }
                    Some(t) if !is_guid(t) => {
                        l.problem(
                            &scope,
                            &format!("{prefix}.tenant_guid"),
                            format!("{t:?} is not a GUID (8-4-4-4-12 hexadecimal digits)"),
                        );
                        None
                    }
                    Some(t) => Some(t.clone()),
                };
                if let (Some(token), Some(tenant)) = (token, tenant) {
                    let c = Arc::make_mut(connections.get_mut(&name).expect("listed above"));
                    c.auth = Auth::ApiKey {
                        header: "X-CM-PRODUCTTOKEN".into(),
                        key: token,
                    };
                    settings.cdp.insert(
                        name.clone(),
                        CdpAccount {
                            tenant_guid: tenant,
                        },
                    );
                }
            }
            ConnectionKind::Seatsio => {
                if raw.auth.is_some() {
                    l.problem(&scope, &format!("{prefix}.auth"), "a seatsio connection authenticates with `secret_key_file` (or `secret_key_env`), not `auth`");
                }
                let region = match raw.region.as_deref() {
                    None => {
                        l.problem(
                            &scope,
                            &format!("{prefix}.region"),
                            "missing key `region` (eu, na, sa or oc)",
                        );
                        None
                    }
                    Some(r) if !SEATSIO_REGIONS.contains(&r) => {
                        l.problem(
                            &scope,
                            &format!("{prefix}.region"),
                            format!("unknown region {r:?} (eu, na, sa or oc)"),
                        );
                        None
                    }
                    Some(r) => Some(r.to_string()),
                };
                let secret = super::values::secret(
                    l,
                    &scope,
                    &prefix,
                    "secret_key",
                    raw.secret_key.as_ref(),
                    raw.secret_key_file.as_ref(),
                    raw.secret_key_env.as_ref(),
                    config_dir,
                    warnings,
                );
                let has_admin = raw.admin_key.is_some()
                    || raw.admin_key_file.is_some()
                    || raw.admin_key_env.is_some();
                let admin = if has_admin {
                    super::values::secret(
                        l,
                        &scope,
                        &prefix,
                        "admin_key",
                        raw.admin_key.as_ref(),
                        raw.admin_key_file.as_ref(),
                        raw.admin_key_env.as_ref(),
                        config_dir,
                        warnings,
                    )
                } else {
                    None
                };
                if has_admin != raw.workspace_key.is_some() {
                    l.problem(
                        &scope,
                        &format!("{prefix}.workspace_key"),
                        "`admin_key_file` and `workspace_key` (the workspace's public key) go together",
                    );
                }
                if let (Some(region), Some(secret)) = (region, secret) {
                    let c = Arc::make_mut(connections.get_mut(&name).expect("listed above"));
                    c.auth = Auth::ApiKey {
                        header: "Authorization".into(),
                        key: basic_user_only(&secret),
                    };
                    settings.seatsio.insert(
                        name.clone(),
                        SeatsioAccount {
                            region,
                            admin_auth: admin.as_ref().map(basic_user_only),
                            workspace_key: raw.workspace_key.clone(),
                        },
                    );
                }
            }
            _ => {}
        }
        // A company's connection of an integration's kind needs the company's block.
        if let Some(c) = conn_company.get(&name)
            && let Some(i) = for_kind(kind.as_str())
            && !companies[c].blocks.contains_key(i.name)
        {
            l.problem(
                &scope,
                &format!("{prefix}.company"),
                format!(
                    "company {c:?} has no `{}` integration block (add [companies.{c}.integrations.{}] with `enabled = true`)",
                    i.name, i.name
                ),
            );
        }
    }

    // Streams: their company, and the integrations they are tied to.
    let mut tied: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (name, spec) in streams.iter() {
        let scope = format!("stream \"{name}\"");
        let key = format!("streams.{name}.company");
        let written = l
            .table::<RawStream>(&scope, &format!("streams.{name}"))
            .and_then(|r| r.company);
        if let Some(c) = &written
            && !companies.contains_key(c)
        {
            l.problem(&scope, &key, format!("unknown company {c:?}"));
            continue;
        }
        let mut company = written.clone();
        for conn in [&spec.source, &spec.target] {
            if let Some(cc) = conn_company.get(conn) {
                match &company {
                    None => company = Some(cc.clone()),
                    Some(c) if c != cc => {
                        l.problem(
                            &scope,
                            &key,
                            format!(
                                "connection {conn:?} belongs to company {cc:?}, not {c:?}; a stream belongs to one company"
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
        let Some(company) = company else { continue };
        for conn in [&spec.source, &spec.target] {
            if let Some(c) = connections.get(conn)
                && let Some(i) = for_kind(c.kind.as_str())
            {
                let list = tied
                    .entry((company.clone(), i.name.to_string()))
                    .or_default();
                if !list.contains(name) {
                    list.push(name.clone());
                }
            }
        }
    }

    // The chain, the conflicts and the toggles, company by company.
    for (cname, company) in &companies {
        let scope = format!("company \"{cname}\"");
        let Some(rname) = &company.reseller else {
            continue;
        };
        let reseller = &resellers[rname];
        let mut on = Vec::new();
        for (iname, (enabled, block)) in &company.blocks {
            let i = find(iname).expect("checked above");
            let key = format!("companies.{cname}.integrations.{iname}");
            let conns: Vec<String> = conn_company
                .iter()
                .filter(|(n, c)| {
                    *c == cname
                        && i.connection_kind
                            .is_some_and(|k| connections[*n].kind.as_str() == k)
                })
                .map(|(n, _)| n.clone())
                .collect();
            let missing = missing_link(i, cname, rname, reseller, company, block, &conns);
            let streams_tied = tied
                .get(&(cname.clone(), iname.clone()))
                .cloned()
                .unwrap_or_default();
            let why = match (&missing, *enabled) {
                (Some(m), true) => {
                    l.problem(&scope, &key, format!("refused: {m}"));
                    m.clone()
                }
                (None, true) => {
                    on.push(i);
                    "enabled".to_string()
                }
                (None, false) => "off (toggle)".to_string(),
                (Some(m), false) => format!("off (toggle); when on: {m}"),
            };
            if !*enabled {
                for s in &streams_tied {
                    settings.paused.insert(
                        s.clone(),
                        format!("integration {iname} of company {cname} is off"),
                    );
                }
            }
            settings.integrations.push(IntegrationState {
                company: cname.clone(),
                reseller: rname.clone(),
                integration: iname.clone(),
                state: if *enabled { "enabled" } else { "off" },
                why,
                connections: conns,
                streams: streams_tied,
            });
        }
        for (a, b) in CONFLICTS {
            if on.iter().any(|i| i.name == *a) && on.iter().any(|i| i.name == *b) {
                let (ia, ib) = (find(a).expect("known"), find(b).expect("known"));
                l.problem(
                    &scope,
                    &format!("companies.{cname}.integrations"),
                    format!(
                        "integrations {a} ({}) and {b} ({}) exclude each other on one company; turn one of them off",
                        ia.label, ib.label
                    ),
                );
            }
        }
    }
    // A stream tied to a company's integration that has no block: refused (no silent run).
    for ((company, iname), list) in &tied {
        if !companies
            .get(company)
            .is_some_and(|c| c.blocks.contains_key(iname))
        {
            for s in list {
                l.problem(
                    &format!("stream \"{s}\""),
                    &format!("streams.{s}.company"),
                    format!("company {company:?} has no `{iname}` integration block (add [companies.{company}.integrations.{iname}] with `enabled = true`)"),
                );
            }
        }
    }
    for (stream, _) in settings.paused.iter() {
        if let Some(spec) = streams.get_mut(stream) {
            Arc::make_mut(spec).enabled = false;
        }
    }
    settings
}

/// The first missing link of the enablement chain, or None when the integration may be on.
fn missing_link(
    i: &Integration,
    cname: &str,
    rname: &str,
    reseller: &Reseller,
    company: &Company,
    block: &BTreeMap<String, toml::Value>,
    conns: &[String],
) -> Option<String> {
    let given = |table: Option<&BTreeMap<String, toml::Value>>, k: &str| {
        table.is_some_and(|t| {
            t.contains_key(k)
                || t.contains_key(&format!("{k}_file"))
                || t.contains_key(&format!("{k}_env"))
        })
    };
    let creds = reseller.credentials.get(i.name);
    let missing: Vec<String> = i
        .reseller_credentials
        .iter()
        .filter(|k| !given(creds, k))
        .map(|k| format!("`{k}`"))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "reseller \"{rname}\" has not provided the credentials {} needs (missing {} in [resellers.{rname}.credentials.{}])",
            i.name,
            missing.join(", "),
            i.name
        ));
    }
    if !reseller.flags.contains(i.name) {
        return Some(format!(
            "feature flag \"{}\" is off for reseller \"{rname}\" (add it to resellers.{rname}.flags)",
            i.name
        ));
    }
    if !company.flags.contains(i.name) {
        return Some(format!(
            "feature flag \"{}\" is off for company \"{cname}\" (add it to companies.{cname}.flags)",
            i.name
        ));
    }
    let missing: Vec<String> = i
        .company_settings
        .iter()
        .filter(|k| !given(Some(block), k))
        .map(|k| format!("`{k}`"))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "company settings incomplete: missing {} in [companies.{cname}.integrations.{}]",
            missing.join(", "),
            i.name
        ));
    }
    if let Some(kind) = i.connection_kind
        && conns.is_empty()
    {
        return Some(format!(
            "company settings incomplete: no connection of kind {kind} belongs to company \"{cname}\""
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_is_base64_of_key_and_colon() {
        assert_eq!(basic_user_only(&Secret::new("sk")).expose(), "Basic c2s6");
        assert_eq!(
            basic_user_only(&Secret::new("abc")).expose(),
            "Basic YWJjOg=="
        );
    }

    #[test]
    fn every_conflict_names_known_integrations() {
        for (a, b) in CONFLICTS {
            assert!(find(a).is_some() && find(b).is_some(), "{a} / {b}");
        }
    }
}
