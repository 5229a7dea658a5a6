//! HS256 JSON Web Tokens, as S-360 wants them: claims `sub`, `aud`, `iss`, and `iat`/`exp`
//! in **epoch milliseconds**, lifetime at most 30 s. Pure: the clock is an argument, so a
//! test sets "now". Signing uses `hmac` + `sha2` (no OpenSSL); verifying is here too, for
//! the S-360 fake.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::Secret;

/// S-360's ceiling on a token's lifetime.
pub const MAX_LIFETIME_MS: i64 = 30_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: String,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

/// What mints a fresh token per call for one S-360 account.
#[derive(Debug, Clone)]
pub struct Hs256 {
    pub sub: String,
    pub aud: String,
    pub iss: String,
    pub secret: Secret,
    /// Lifetime in ms (≤ 30 000); usher mints per call, so a short one is plenty.
    pub lifetime_ms: i64,
}

impl Hs256 {
    pub fn mint(&self, now_ms: i64) -> String {
        let claims = Claims {
            sub: self.sub.clone(),
            aud: self.aud.clone(),
            iss: self.iss.clone(),
            iat: now_ms,
            exp: now_ms + self.lifetime_ms.min(MAX_LIFETIME_MS),
        };
        sign(&claims, self.secret.expose())
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn sign(claims: &Claims, key: &str) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let input = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(input.as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    format!("{input}.{sig}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT")]
    Malformed,
    #[error("not signed with HS256")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("issued in the future")]
    Future,
    #[error("lifetime over 30 s")]
    TooLong,
}

/// Checks signature, algorithm and times (with `skew_ms` of tolerance); returns the claims.
pub fn verify(token: &str, key: &str, now_ms: i64, skew_ms: i64) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: serde_json::Value = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    if header["alg"] != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{h}.{p}").as_bytes());
    mac.verify_slice(&sig).map_err(|_| JwtError::Signature)?;
    let claims: Claims = B64
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    if claims.iat > now_ms + skew_ms {
        return Err(JwtError::Future);
    }
    if claims.exp + skew_ms < now_ms {
        return Err(JwtError::Expired);
    }
    if claims.exp - claims.iat > MAX_LIFETIME_MS {
        return Err(JwtError::TooLong);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minter() -> Hs256 {
        Hs256 {
            sub: "myvenue".into(),
            aud: "VO1".into(),
            iss: "usher".into(),
            secret: Secret::new("s3cret"),
            lifetime_ms: 20_000,
        }
    }

    #[test]
    fn claims_are_in_milliseconds_and_verify() {
        let now = 1_780_000_000_000;
        let t = minter().mint(now);
        let c = verify(&t, "s3cret", now, 2000).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.aud.as_str(), c.iss.as_str()),
            ("myvenue", "VO1", "usher")
        );
        assert_eq!(c.iat, now);
        assert_eq!(c.exp, now + 20_000);
    }

    #[test]
    fn wrong_key_expired_and_future_tokens_are_refused() {
        let now = 1_780_000_000_000;
        let t = minter().mint(now);
        assert_eq!(verify(&t, "other", now, 2000), Err(JwtError::Signature));
        assert_eq!(
            verify(&t, "s3cret", now + 23_000, 2000),
            Err(JwtError::Expired)
        );
        assert!(
            verify(&t, "s3cret", now + 21_500, 2000).is_ok(),
            "skew tolerated"
        );
        assert_eq!(
            verify(&t, "s3cret", now - 3000, 2000),
            Err(JwtError::Future)
        );
        assert!(verify(&t, "s3cret", now - 1500, 2000).is_ok());
    }

    #[test]
    fn a_known_vector_matches() {
        // HMAC-SHA256 over the exact signing input; checked against an independent
        // implementation (python: hmac.new(b"k", msg, sha256)).
        let c = Claims {
            sub: "a".into(),
            aud: "b".into(),
            iss: "c".into(),
            iat: 1,
            exp: 2,
        };
        assert_eq!(
            sign(&c, "k"),
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhIiwiYXVkIjoiYiIsImlzcyI6ImMiLCJpYXQiOjEsImV4cCI6Mn0.IrNs_HB6PONdevgeX9qeSmg2lZH8yuLPVdyrTYmErlM"
        );
    }
}
