//! How a POST proves it comes from S-360: the stream's Basic credentials, static bearer
//! token or API-key header. Pure: headers in, yes or no out.
//!
//! The scheme of an `Authorization` header is compared without regard to case (RFC 9110
//! §11.1: `basic`, `BEARER` are valid); the credentials themselves exactly, in constant time.

use axum::http::HeaderMap;
use base64::Engine;

use crate::config::Auth;

/// Constant-time comparison, so that a wrong credential's timing says nothing.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials after `scheme` in an `Authorization` value, or None when the value is
/// for another scheme. `auth-scheme 1*SP token68`: the scheme is case-insensitive.
fn credentials<'a>(value: &'a [u8], scheme: &str) -> Option<&'a [u8]> {
    let value = value.trim_ascii();
    let space = value.iter().position(|b| *b == b' ' || *b == b'\t')?;
    let (name, rest) = value.split_at(space);
    name.eq_ignore_ascii_case(scheme.as_bytes())
        .then(|| rest.trim_ascii())
}

/// Whether the request's headers carry the stream's credentials.
pub fn authorized(auth: &Auth, headers: &HeaderMap) -> bool {
    let get = |h: &str| headers.get(h).map(|v| v.as_bytes()).unwrap_or_default();
    match auth {
        Auth::None => true,
        Auth::Basic { username, password } => {
            let Some(encoded) = credentials(get("authorization"), "basic") else {
                return false;
            };
            // Padding is optional on the way in (some clients leave it out).
            let Ok(decoded) =
                base64::engine::general_purpose::STANDARD_NO_PAD_INDIFFERENT.decode(encoded)
            else {
                return false;
            };
            let expected = format!("{username}:{}", password.expose());
            same(&decoded, expected.as_bytes())
        }
        Auth::Bearer { token } => credentials(get("authorization"), "bearer")
            .is_some_and(|t| same(t, token.expose().as_bytes())),
        Auth::ApiKey { header, key } => same(get(header.as_str()), key.expose().as_bytes()),
        Auth::OAuth2 { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", value.parse().unwrap());
        h
    }

    #[test]
    fn schemes_are_case_insensitive_and_credentials_exact() {
        let bearer = Auth::Bearer {
            token: Secret::new("tok"),
        };
        for ok in ["Bearer tok", "bearer tok", "BEARER tok", "BeArEr   tok "] {
            assert!(authorized(&bearer, &headers(ok)), "{ok}");
        }
        for bad in [
            "Bearer TOK",
            "Bearertok",
            "Basic tok",
            "tok",
            "Bearer tok2",
            "",
        ] {
            assert!(!authorized(&bearer, &headers(bad)), "{bad}");
        }
        let basic = Auth::Basic {
            username: "s360".into(),
            password: Secret::new("pw"),
        };
        // base64("s360:pw") = czM2MDpwdw==
        for ok in [
            "Basic czM2MDpwdw==",
            "basic czM2MDpwdw==",
            "BASIC czM2MDpwdw",
        ] {
            assert!(authorized(&basic, &headers(ok)), "{ok}");
        }
        for bad in [
            "Basic czM2MDpwdA==",
            "Bearer czM2MDpwdw==",
            "Basic !!!",
            "Basic",
        ] {
            assert!(!authorized(&basic, &headers(bad)), "{bad}");
        }
    }
}
