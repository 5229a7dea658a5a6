//! S-360 configuration: the `s360` connection kind (institution, virtual operator, partner
//! name and secret for the HS256 JWT, a default base URL and rate limit) and the
//! `[receiver]` section (where usher listens for S-360's webhooks), with the checks that
//! span streams (the relay streams' receiver paths, the limits of one institution). The
//! three S-360 stream kinds' own options are `streams/s360/options.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::load::{Layers, Problem};
use super::raw::RawConnection;
use super::values::{duration, secret};
use super::{Connection, ConnectionKind, RateLimit, S360Account};
use crate::streams::options::StreamKind;

/// Default body limit of the receiver (S-360 sends at most `bs` records per POST).
pub const DEFAULT_MAX_BODY: usize = 10 * 1024 * 1024;

/// The largest `max_body` (a record's place in a body is kept in 32 bits).
pub const MAX_MAX_BODY: usize = 1024 * 1024 * 1024;

/// Default budget of bodies held at once: a few POSTs of the largest size.
pub const DEFAULT_BODY_MEMORY_BODIES: usize = 4;

/// `[receiver]`: the HTTP listener for S-360's webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverSettings {
    pub listen: SocketAddr,
    pub max_body: usize,
    /// Bytes of request bodies held at once, all POSTs together (at least `max_body`): a
    /// POST waits for room before its body is read, so that many large POSTs at once cannot
    /// exhaust memory.
    pub body_memory: usize,
    /// From a connection's accept (or a later request's first byte) to the end of the
    /// request's headers; past it the connection is closed.
    pub header_timeout: Duration,
    /// From the end of the headers to the end of the body; past it, 408 and closed.
    pub body_timeout: Duration,
    /// A kept-alive connection with no new request (or not reading its answer) this long is
    /// closed.
    pub idle_timeout: Duration,
    /// Connections at once (also at most half the descriptor limit).
    pub max_connections: usize,
    /// Reverse proxies in front of the receiver: a connection from one of them is taken
    /// to be from the client its `X-Forwarded-For` names (for the per-peer throttle of
    /// failed authentications and the log).
    pub trusted_proxies: Vec<IpNet>,
}

/// An IP address or network, `10.0.0.0/8` or `2001:db8::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Option<IpNet> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
        };
        Some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let (net, ip, bits): (u128, u128, u32) = match (self.addr, ip) {
            (V4(n), V4(i)) => (u32::from(n).into(), u32::from(i).into(), 32),
            (V6(n), V6(i)) => (n.into(), i.into(), 128),
            (V4(n), V6(i)) => match i.to_ipv4_mapped() {
                Some(i) => (u32::from(n).into(), u32::from(i).into(), 32),
                None => return false,
            },
            (V6(_), V4(_)) => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (net >> shift) == (ip >> shift)
    }
}

/// `[receiver]` defaults, chosen in ARCHITECTURE ("S-360 ⇄ CRM"): S-360 sends its headers
/// at once and its POSTs back to back; a few seconds more than that serve it, and anything
/// slower is holding a connection.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReceiver {
    pub listen: Option<String>,
    pub max_body: Option<String>,
    pub body_memory: Option<String>,
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<u32>,
    pub trusted_proxies: Option<Vec<String>>,
}

pub(super) fn build_receiver(l: &mut Layers) -> Option<ReceiverSettings> {
    let raw: RawReceiver = l.table("receiver", "receiver")?;
    let listen = match raw.listen.as_deref() {
        None => {
            l.problem(
                "receiver",
                "receiver.listen",
                "missing key `listen` (e.g. \"127.0.0.1:8360\")",
            );
            None
        }
        Some(a) => match a.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                l.problem(
                    "receiver",
                    "receiver.listen",
                    format!("{a:?} is not an address and port (e.g. \"127.0.0.1:8360\")"),
                );
                None
            }
        },
    };
    let max_body = match raw.max_body.as_deref() {
        None => DEFAULT_MAX_BODY,
        Some(s) => match parse_size(s) {
            Some(n) if (1024..=MAX_MAX_BODY).contains(&n) => n,
            _ => {
                l.problem(
                    "receiver",
                    "receiver.max_body",
                    format!("{s:?} is not a size from 1KB to 1024MB (e.g. \"10MB\", \"512KB\")"),
                );
                DEFAULT_MAX_BODY
            }
        },
    };
    let default_memory = max_body.saturating_mul(DEFAULT_BODY_MEMORY_BODIES);
    let body_memory = match raw.body_memory.as_deref() {
        None => default_memory,
        Some(s) => match parse_size(s) {
            Some(n) if n >= max_body => n,
            _ => {
                l.problem(
                    "receiver",
                    "receiver.body_memory",
                    format!(
                        "{s:?} is not a size of at least `max_body` ({max_body} bytes), e.g. \"40MB\""
                    ),
                );
                default_memory
            }
        },
    };
    let mut timeout = |key: &str, value: Option<&String>, default: Duration, most: Duration| {
        let scoped = format!("receiver.{key}");
        let d = duration(l, "receiver", &scoped, value, default);
        if d < Duration::from_secs(1) || d > most {
            l.problem(
                "receiver",
                &scoped,
                format!(
                    "{} is out of range (1s to {})",
                    humantime::format_duration(d),
                    humantime::format_duration(most)
                ),
            );
            return default;
        }
        d
    };
    let header_timeout = timeout(
        "header_timeout",
        raw.header_timeout.as_ref(),
        DEFAULT_HEADER_TIMEOUT,
        Duration::from_secs(600),
    );
    let body_timeout = timeout(
        "body_timeout",
        raw.body_timeout.as_ref(),
        DEFAULT_BODY_TIMEOUT,
        Duration::from_secs(3600),
    );
    let idle_timeout = timeout(
        "idle_timeout",
        raw.idle_timeout.as_ref(),
        DEFAULT_IDLE_TIMEOUT,
        Duration::from_secs(600),
    );
    let max_connections = match raw.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if (1..=100_000).contains(&n) => n as usize,
        Some(n) => {
            l.problem(
                "receiver",
                "receiver.max_connections",
                format!("{n} is out of range (1 to 100000)"),
            );
            DEFAULT_MAX_CONNECTIONS
        }
    };
    let mut trusted_proxies = Vec::new();
    for p in raw.trusted_proxies.iter().flatten() {
        match IpNet::parse(p) {
            Some(n) => trusted_proxies.push(n),
            None => l.problem(
                "receiver",
                "receiver.trusted_proxies",
                format!("{p:?} is not an IP address or network (e.g. \"10.0.0.0/8\", \"::1\")"),
            ),
        }
    }
    Some(ReceiverSettings {
        listen: listen?,
        max_body,
        body_memory,
        header_timeout,
        body_timeout,
        idle_timeout,
        max_connections,
        trusted_proxies,
    })
}

/// "10MB", "512KB", "1048576".
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("MB") {
        (n, 1024 * 1024)
    } else if let Some(n) = s.strip_suffix("KB") {
        (n, 1024)
    } else if let Some(n) = s.strip_suffix('B') {
        (n, 1)
    } else {
        (s, 1)
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mult)
}

/// The S-360 account fields of a connection; refuses them on other kinds.
pub(super) fn connection_fields(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    kind: Option<ConnectionKind>,
    raw: &RawConnection,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> Option<S360Account> {
    if kind != Some(ConnectionKind::S360) {
        for (key, set) in [
            ("institution", raw.institution.is_some()),
            ("virtual_operator", raw.virtual_operator.is_some()),
            ("partner_name", raw.partner_name.is_some()),
            ("partner_secret", raw.partner_secret.is_some()),
            ("partner_secret_file", raw.partner_secret_file.is_some()),
            ("partner_secret_env", raw.partner_secret_env.is_some()),
        ] {
            if set {
                l.problem(
                    scope,
                    &format!("{prefix}.{key}"),
                    format!("`{key}` applies only to a connection of kind s360"),
                );
            }
        }
        return None;
    }
    for (key, set) in [
        ("tenant", raw.tenant.is_some()),
        ("client_id", raw.client_id.is_some()),
        ("client_secret", raw.client_secret.is_some()),
        ("client_secret_file", raw.client_secret_file.is_some()),
        ("client_secret_env", raw.client_secret_env.is_some()),
        ("auth", raw.auth.is_some()),
    ] {
        if set {
            l.problem(
                scope,
                &format!("{prefix}.{key}"),
                format!("`{key}` does not apply to a connection of kind s360 (it signs a JWT with `partner_secret`)"),
            );
        }
    }
    let required = |l: &mut Layers, key: &str, v: &Option<String>| -> Option<String> {
        match v {
            Some(s) if !s.trim().is_empty() => Some(s.clone()),
            _ => {
                l.problem(
                    scope,
                    &format!("{prefix}.{key}"),
                    format!("missing key `{key}`"),
                );
                None
            }
        }
    };
    let institution = required(l, "institution", &raw.institution);
    let virtual_operator = required(l, "virtual_operator", &raw.virtual_operator);
    let partner_name = required(l, "partner_name", &raw.partner_name);
    if let Some(i) = &institution
        && !i
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        l.problem(
            scope,
            &format!("{prefix}.institution"),
            format!("{i:?} is not an institution code (letters, digits, `-`, `_`)"),
        );
    }
    let partner_secret = secret(
        l,
        scope,
        prefix,
        "partner_secret",
        raw.partner_secret.as_ref(),
        raw.partner_secret_file.as_ref(),
        raw.partner_secret_env.as_ref(),
        config_dir,
        warnings,
    );
    Some(S360Account {
        institution: institution?,
        virtual_operator: virtual_operator?,
        partner_name: partner_name?,
        partner_secret: partner_secret?,
    })
}

/// `https://{institution}.ws.secutix.com`, S-360's documented host.
pub fn default_base_url(institution: &str) -> Option<Url> {
    Url::parse(&format!("https://{institution}.ws.secutix.com")).ok()
}

/// Every relay stream needs the receiver, two streams cannot share a path, and the S-360
/// connections of one institution (which share one rate budget) must agree on its limit.
pub(super) fn check_receiver(
    l: &mut Layers,
    receiver: Option<&ReceiverSettings>,
    connections: &std::collections::BTreeMap<String, Arc<Connection>>,
    streams: &std::collections::BTreeMap<String, Arc<super::StreamSpec>>,
) {
    let mut limits: std::collections::BTreeMap<&str, (&str, Option<RateLimit>)> =
        Default::default();
    for (name, c) in connections {
        let Some(a) = &c.s360 else { continue };
        match limits.get(a.institution.as_str()) {
            Some((other, limit)) if *limit != c.rate_limit => l.problem(
                &format!("connection \"{name}\""),
                &format!("connections.{name}.rate_limit"),
                format!(
                    "connection {other:?} reaches institution {:?} too and both share one budget: set the same `rate_limit` on both",
                    a.institution
                ),
            ),
            Some(_) => {}
            None => {
                limits.insert(&a.institution, (name, c.rate_limit));
            }
        }
    }
    let mut paths: std::collections::BTreeMap<String, String> = Default::default();
    for (name, spec) in streams {
        let StreamKind::S360Relay { relay, .. } = &spec.kind else {
            continue;
        };
        let scope = format!("stream \"{name}\"");
        if receiver.is_none() {
            l.problem(
                &scope,
                &format!("streams.{name}.source"),
                "an S-360 webhook stream needs the `[receiver]` section (`listen = \"127.0.0.1:8360\"`)",
            );
        }
        if let Some(other) = paths.insert(relay.path.clone(), name.clone()) {
            l.problem(
                &scope,
                &format!("streams.{name}.s360.path"),
                format!(
                    "receiver path {:?} is also used by stream {other:?}",
                    relay.path
                ),
            );
        }
    }
}

#[cfg(test)]
mod ipnet_tests {
    use super::IpNet;

    #[test]
    fn networks_contain_their_addresses() {
        let n = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.255.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        let v6 = IpNet::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "proxy.example", "::/129", "10.0.0.0/x", ""] {
            assert_eq!(IpNet::parse(bad), None, "{bad}");
        }
    }
}
