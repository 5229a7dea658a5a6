//! Values every configuration table shares, below the per-kind and per-vendor code that
//! uses them: secrets (`KEY`, `KEY_file`, `KEY_env`), URLs, auth blocks and durations. Each
//! reports its problems to the [`Layers`] it is given and returns what it could read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::load::{Layers, Problem};
use super::raw::RawAuth;
use crate::schedule::parse_duration;
use crate::secret::Secret;

/// How a connection authenticates (or how S-360 authenticates to the receiver), as built by
/// `build_auth` from an `auth` block or by a vendor kind from its account keys.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
    ApiKey {
        header: String,
        key: Secret,
    },
    OAuth2 {
        token_url: Url,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
}

pub(super) fn duration(
    l: &mut Layers,
    scope: &str,
    key: &str,
    value: Option<&String>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(text) => match parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                l.problem(scope, key, e.to_string());
                default
            }
        },
    }
}

/// Reads a secret from exactly one of `KEY`, `KEY_file`, `KEY_env`. A relative file name is
/// looked up in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential`), else where the unit's
/// `LoadCredential=` would take it from (see `secret_path`).
#[allow(clippy::too_many_arguments)] // one argument per way of giving a secret reads best here
pub(super) fn secret(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    name: &str,
    inline: Option<&String>,
    file: Option<&String>,
    env: Option<&String>,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<Secret> {
    let key = format!("{prefix}.{name}");
    if !l.read_secrets {
        return Some(Secret::new(String::new()));
    }
    let given = [inline.is_some(), file.is_some(), env.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given == 0 {
        l.problem(
            scope,
            &key,
            format!("missing secret: set `{name}_file` (a file holding it) or `{name}_env` (an environment variable)"),
        );
        return None;
    }
    if given > 1 {
        l.problem(
            scope,
            &key,
            format!("set only one of `{name}`, `{name}_file`, `{name}_env`"),
        );
        return None;
    }
    if let Some(v) = inline {
        warnings.push(l.make(
            scope,
            &key,
            format!("secret written inline; prefer `{name}_file` with systemd's LoadCredential"),
        ));
        if v.is_empty() {
            l.problem(scope, &key, "the secret is empty");
            return None;
        }
        return Some(Secret::new(v.clone()));
    }
    if let Some(path) = file {
        let key = format!("{key}_file");
        let p = secret_path(
            path,
            std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            config_dir,
            &unit_credentials(UNIT_PATHS),
        );
        return match std::fs::read_to_string(&p) {
            Ok(text) => {
                let text = text.trim_end_matches(['\n', '\r']).to_string();
                if text.is_empty() {
                    l.problem(scope, &key, format!("secret file {} is empty", p.display()));
                    None
                } else {
                    // A credential systemd copied is systemd's to protect (its source is not
                    // ours to see); any other file is the sysadmin's.
                    let from_systemd = std::env::var_os("CREDENTIALS_DIRECTORY")
                        .is_some_and(|d| p.starts_with(Path::new(&d)));
                    if let Some(mode) = loose_mode(&p).filter(|_| !from_systemd) {
                        // As ssh does for a private key, but a warning: the service still starts.
                        warnings.push(l.make(
                            scope,
                            &key,
                            format!(
                                "secret file {} can be read by group or others (mode {mode:04o}): `chmod 600 {}`",
                                p.display(),
                                p.display()
                            ),
                        ));
                    }
                    Some(Secret::new(text))
                }
            }
            Err(e) => {
                l.problem(
                    scope,
                    &key,
                    format!("cannot read secret file {}: {e}", p.display()),
                );
                None
            }
        };
    }
    let var = env.expect("counted above");
    let key = format!("{key}_env");
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(Secret::new(v)),
        Ok(_) => {
            l.problem(scope, &key, format!("environment variable {var} is empty"));
            None
        }
        Err(_) => {
            l.problem(
                scope,
                &key,
                format!("environment variable {var} is not set"),
            );
            None
        }
    }
}

/// Where the packaged unit's files are, in systemd's order of precedence (a drop-in last).
const UNIT_PATHS: &[&str] = &[
    "/usr/lib/systemd/system/usher.service",
    "/lib/systemd/system/usher.service",
    "/etc/systemd/system/usher.service",
    "/etc/systemd/system/usher.service.d",
    "/run/systemd/system/usher.service.d",
];

/// The unit's `LoadCredential=ID:PATH` lines: ID → PATH, the later line winning.
fn unit_credentials(paths: &[&str]) -> BTreeMap<String, PathBuf> {
    let mut texts = Vec::new();
    for p in paths {
        let p = Path::new(p);
        if p.is_dir() {
            let mut confs: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "conf"))
                .collect();
            confs.sort();
            texts.extend(confs.iter().filter_map(|f| std::fs::read_to_string(f).ok()));
        } else if let Ok(t) = std::fs::read_to_string(p) {
            texts.push(t);
        }
    }
    texts.iter().flat_map(|t| load_credentials(t)).collect()
}

/// `LoadCredential=ID:PATH` lines of a unit file's text (not `LoadCredentialEncrypted=`,
/// which only systemd can read).
fn load_credentials(text: &str) -> Vec<(String, PathBuf)> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("LoadCredential="))
        .filter_map(|v| v.trim().split_once(':'))
        .filter(|(id, path)| !id.is_empty() && path.starts_with('/'))
        .map(|(id, path)| (id.to_string(), PathBuf::from(path.trim())))
        .collect()
}

/// The file a `*_file` secret names. Absolute: itself. Relative, under systemd: in
/// `$CREDENTIALS_DIRECTORY` (what `LoadCredential=` put there). Relative, from a shell (`sudo
/// usher validate`): what the service would get, that is the source of the unit's
/// `LoadCredential=NAME:…` line, else `credentials/NAME` beside the main file (the package's
/// `/etc/usher/credentials/`), else `NAME` beside the main file (a checkout, the demo).
fn secret_path(
    name: &str,
    credentials_directory: Option<PathBuf>,
    config_dir: &Path,
    unit: &BTreeMap<String, PathBuf>,
) -> PathBuf {
    let p = PathBuf::from(name);
    if p.is_absolute() {
        return p;
    }
    if let Some(creds) = credentials_directory {
        return creds.join(p);
    }
    if let Some(source) = unit.get(name) {
        return source.clone();
    }
    let folder = config_dir.join("credentials");
    let in_folder = folder.join(&p);
    let beside = config_dir.join(&p);
    match in_folder.try_exists() {
        Ok(true) => in_folder,
        // A file beside the main file is still read where there is one (as before the
        // credentials folder was looked at; a service without `LoadCredential=` reads it).
        _ if beside.exists() => beside,
        // Not readable by this user (root's 0700 folder): name it, so that the message says
        // "permission denied" there rather than "not found" elsewhere.
        Err(_) => in_folder,
        Ok(false) if folder.is_dir() => in_folder,
        Ok(false) => beside,
    }
}

/// The file's permission bits when group or others may read or write it.
fn loose_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

/// A GUID as the CDP writes them: 8-4-4-4-12 hexadecimal digits.
pub fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

pub(super) fn url(l: &mut Layers, scope: &str, key: &str, text: &str) -> Option<Url> {
    match Url::parse(text) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {
            if u.host_str().is_none_or(str::is_empty) {
                l.problem(scope, key, format!("{text:?} has no host"));
                return None;
            }
            Some(u)
        }
        Ok(_) => {
            l.problem(scope, key, format!("{text:?} is not an http(s) URL"));
            None
        }
        Err(e) => {
            l.problem(scope, key, format!("{text:?} is not a URL: {e}"));
            None
        }
    }
}

pub(crate) fn build_auth(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    a: &RawAuth,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<Auth> {
    let kind = a.kind.as_deref().unwrap_or("none");
    let allowed: &[&str] = match kind {
        "none" => &[],
        "basic" => &["username", "password"],
        "bearer" => &["token"],
        "api_key" => &["header", "key"],
        "oauth2" => &["token_url", "client_id", "client_secret", "scope"],
        other => {
            l.problem(
                scope,
                &format!("{prefix}.type"),
                format!(
                    "unknown auth type {other:?}{} (none, basic, bearer, api_key or oauth2)",
                    crate::suggest::did_you_mean(
                        other,
                        &["none", "basic", "bearer", "api_key", "oauth2"]
                    )
                ),
            );
            return None;
        }
    };
    let present = [
        ("username", a.username.is_some()),
        (
            "password",
            a.password.is_some() || a.password_file.is_some() || a.password_env.is_some(),
        ),
        (
            "token",
            a.token.is_some() || a.token_file.is_some() || a.token_env.is_some(),
        ),
        ("header", a.header.is_some()),
        (
            "key",
            a.key.is_some() || a.key_file.is_some() || a.key_env.is_some(),
        ),
        ("token_url", a.token_url.is_some()),
        ("client_id", a.client_id.is_some()),
        (
            "client_secret",
            a.client_secret.is_some()
                || a.client_secret_file.is_some()
                || a.client_secret_env.is_some(),
        ),
        ("scope", a.scope.is_some()),
    ];
    for (key, set) in present {
        if set && !allowed.contains(&key) {
            l.problem(
                scope,
                &format!("{prefix}.{key}"),
                format!("`{key}` does not apply to auth type {kind:?}"),
            );
        }
    }
    let required = |l: &mut Layers, key: &str, v: &Option<String>| -> Option<String> {
        if v.is_none() {
            l.problem(
                scope,
                &format!("{prefix}.{key}"),
                format!("auth type {kind:?} needs `{key}`"),
            );
        }
        v.clone()
    };
    Some(match kind {
        "none" => Auth::None,
        "basic" => {
            let username = required(l, "username", &a.username);
            let password = secret(
                l,
                scope,
                prefix,
                "password",
                a.password.as_ref(),
                a.password_file.as_ref(),
                a.password_env.as_ref(),
                config_dir,
                warnings,
            );
            Auth::Basic {
                username: username?,
                password: password?,
            }
        }
        "bearer" => Auth::Bearer {
            token: secret(
                l,
                scope,
                prefix,
                "token",
                a.token.as_ref(),
                a.token_file.as_ref(),
                a.token_env.as_ref(),
                config_dir,
                warnings,
            )?,
        },
        "api_key" => {
            let header = required(l, "header", &a.header);
            let key = secret(
                l,
                scope,
                prefix,
                "key",
                a.key.as_ref(),
                a.key_file.as_ref(),
                a.key_env.as_ref(),
                config_dir,
                warnings,
            );
            let header = header?;
            if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                l.problem(
                    scope,
                    &format!("{prefix}.header"),
                    format!("{header:?} is not a valid header name"),
                );
                return None;
            }
            Auth::ApiKey { header, key: key? }
        }
        _ => {
            let token_url = required(l, "token_url", &a.token_url);
            let client_id = required(l, "client_id", &a.client_id);
            let client_secret = secret(
                l,
                scope,
                prefix,
                "client_secret",
                a.client_secret.as_ref(),
                a.client_secret_file.as_ref(),
                a.client_secret_env.as_ref(),
                config_dir,
                warnings,
            );
            let token_url = url(l, scope, &format!("{prefix}.token_url"), &token_url?)?;
            Auth::OAuth2 {
                token_url,
                client_id: client_id?,
                client_secret: client_secret?,
                scope: a.scope.clone(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids() {
        assert!(is_guid("0d1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"));
        assert!(!is_guid("0d1b2c3d-4e5f-6a7b-8c9d"));
        assert!(!is_guid("zz1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"));
    }

    #[test]
    fn the_units_load_credential_lines_are_read() {
        let text = "[Service]\n#LoadCredential=old:/etc/x\nLoadCredential=crm-token:/etc/usher/credentials/crm\nLoadCredentialEncrypted=h:/etc/usher/credentials/h.cred\nLoadCredential=bad\n";
        assert_eq!(
            load_credentials(text),
            vec![(
                "crm-token".to_string(),
                PathBuf::from("/etc/usher/credentials/crm")
            )]
        );
    }

    #[test]
    fn a_shell_sees_the_secret_the_service_would_see() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path();
        let none = BTreeMap::new();
        // A checkout: beside the main file.
        assert_eq!(secret_path("t", None, etc, &none), etc.join("t"));
        // The package's folder, once it exists, even before the file is written.
        std::fs::create_dir(etc.join("credentials")).unwrap();
        assert_eq!(
            secret_path("t", None, etc, &none),
            etc.join("credentials/t")
        );
        // A file beside the main file is read where the folder has none.
        std::fs::write(etc.join("t"), "x").unwrap();
        assert_eq!(secret_path("t", None, etc, &none), etc.join("t"));
        std::fs::write(etc.join("credentials/t"), "x").unwrap();
        assert_eq!(
            secret_path("t", None, etc, &none),
            etc.join("credentials/t")
        );
        // The unit's own line wins; under systemd, the credentials directory.
        let mut unit = BTreeMap::new();
        unit.insert("t".to_string(), PathBuf::from("/srv/secrets/t"));
        assert_eq!(
            secret_path("t", None, etc, &unit),
            PathBuf::from("/srv/secrets/t")
        );
        assert_eq!(
            secret_path("t", Some(PathBuf::from("/run/creds/usher")), etc, &unit),
            PathBuf::from("/run/creds/usher/t")
        );
        assert_eq!(
            secret_path("/abs/t", None, etc, &unit),
            PathBuf::from("/abs/t")
        );
    }
}
