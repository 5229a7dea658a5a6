//! Failed authentications, per peer: guessing is slowed, and logged once per interval
//! instead of once per attempt. Pure: the clock is an argument.
//!
//! Each peer has a bucket of [`ALLOWED_FAILURES`] failures that refills one every
//! [`REFILL`] (5 a minute). While the bucket is empty the peer's POSTs get 429 with
//! `Retry-After` **without a look at their credentials**, so guessing goes at 5 a minute
//! whatever the attempts' rate; a success empties the peer's record. A peer is an IPv4
//! address or an IPv6 /64 (what one host usually holds). At most [`MAX_PEERS`] are tracked;
//! past that, new peers share one bucket, so a guesser with very many addresses is slowed
//! as a crowd.
//!
//! Logging: a peer's first failure in an interval is logged at once (a misconfigured S-360
//! shows up without waiting); what follows it is summed and logged once per
//! [`REPORT_EVERY`] (and at shutdown), with the peer and the counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Failures a peer may make in a row before it is refused.
pub const ALLOWED_FAILURES: u32 = 5;
/// One more failure allowed per this much time.
pub const REFILL: Duration = Duration::from_secs(12);
/// How often the failures are summed up in the log.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Peers tracked one by one.
pub const MAX_PEERS: usize = 10_000;
/// Peers named one by one in a report; the others are summed on one line.
pub const MAX_REPORT_LINES: usize = 20;

/// Who is guessing: an IPv4 address or an IPv6 /64; `Others` when too many are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Ip(IpAddr),
    Others,
}

impl PeerKey {
    fn of(ip: IpAddr) -> PeerKey {
        match ip {
            IpAddr::V4(_) => PeerKey::Ip(ip),
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[8..].fill(0);
                PeerKey::Ip(IpAddr::V6(o.into()))
            }
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Ip(ip @ IpAddr::V4(_)) => write!(f, "{ip}"),
            PeerKey::Ip(ip) => write!(f, "{ip}/64"),
            PeerKey::Others => f.write_str("other peers"),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// Failures the peer may still make (refills over time).
    allowance: f64,
    at: Instant,
    /// Since the last report: failures (401), refusals without a look (429), and whether
    /// the first failure was logged already.
    failures: u64,
    refused: u64,
    announced: bool,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            allowance: ALLOWED_FAILURES as f64,
            at: now,
            failures: 0,
            refused: 0,
            announced: false,
        }
    }

    fn refill(&mut self, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        self.allowance = (self.allowance + gained).min(ALLOWED_FAILURES as f64);
        self.at = now;
    }

    fn quiet(&self) -> bool {
        self.failures == 0 && self.refused == 0 && self.allowance >= ALLOWED_FAILURES as f64
    }
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub peer: PeerKey,
    pub failures: u64,
    pub refused: u64,
}

/// Peers that authenticated within this long keep their own bucket even when too many
/// peers are tracked: a crowd of guessers cannot lock S-360 out.
pub const GOOD_FOR: Duration = Duration::from_secs(24 * 3600);
/// Such peers remembered.
const MAX_GOOD: usize = 1024;

#[derive(Default)]
pub struct AuthThrottle {
    peers: HashMap<PeerKey, Entry>,
    /// Peers that authenticated, and when last.
    good: HashMap<PeerKey, Instant>,
    last_purge: Option<Instant>,
}

impl AuthThrottle {
    /// The peer's own key, or `Others` when too many peers are tracked and this one has not
    /// authenticated lately.
    fn key(&mut self, ip: IpAddr, now: Instant) -> PeerKey {
        let key = PeerKey::of(ip);
        if self.peers.contains_key(&key)
            || self.peers.len() < MAX_PEERS
            || self.good.contains_key(&key)
        {
            return key;
        }
        // Forget quiet peers, at most once a second (a scan of them all).
        if self
            .last_purge
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.last_purge = Some(now);
            self.peers.retain(|_, e| {
                e.refill(now);
                !e.quiet()
            });
        }
        if self.peers.len() < MAX_PEERS {
            key
        } else {
            PeerKey::Others
        }
    }

    fn entry(&mut self, ip: IpAddr, now: Instant) -> (PeerKey, &mut Entry) {
        let key = self.key(ip, now);
        let e = self.peers.entry(key).or_insert_with(|| Entry::new(now));
        e.refill(now);
        (key, e)
    }

    /// Whether the peer may present credentials now; else how long until it may (it is
    /// then counted as refused).
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = self.key(ip, now);
        let Some(e) = self.peers.get_mut(&key) else {
            return Ok(());
        };
        e.refill(now);
        if e.allowance >= 1.0 {
            return Ok(());
        }
        e.refused += 1;
        let wait = (1.0 - e.allowance) * REFILL.as_secs_f64();
        Err(Duration::from_secs_f64(wait))
    }

    /// A failed authentication. Returns the peer when this is its first failure since the
    /// last report (to be logged at once).
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Option<PeerKey> {
        let (key, e) = self.entry(ip, now);
        e.allowance = (e.allowance - 1.0).max(0.0);
        e.failures += 1;
        if e.announced {
            None
        } else {
            e.announced = true;
            Some(key)
        }
    }

    /// A successful authentication: the peer starts afresh (its counts stay for the report)
    /// and keeps its own bucket for [`GOOD_FOR`].
    pub fn succeeded(&mut self, ip: IpAddr, now: Instant) {
        let key = PeerKey::of(ip);
        if let Some(e) = self.peers.get_mut(&key) {
            e.allowance = ALLOWED_FAILURES as f64;
        }
        if self.good.len() >= MAX_GOOD && !self.good.contains_key(&key) {
            let oldest = self.good.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.good.remove(&k);
            }
        }
        self.good.insert(key, now);
    }

    /// What happened since the last report, most failures first: peers whose only failure
    /// was already logged at once are left out. Forgets quiet peers.
    pub fn report(&mut self, now: Instant) -> Vec<Summary> {
        let mut out: Vec<Summary> = self
            .peers
            .iter()
            .filter(|(_, e)| e.failures > 1 || e.refused > 0)
            .map(|(k, e)| Summary {
                peer: *k,
                failures: e.failures,
                refused: e.refused,
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.failures + s.refused));
        for e in self.peers.values_mut() {
            e.failures = 0;
            e.refused = 0;
            e.announced = false;
        }
        self.peers.retain(|_, e| {
            e.refill(now);
            !e.quiet()
        });
        self.good
            .retain(|_, t| now.saturating_duration_since(*t) < GOOD_FOR);
        out
    }
}

/// Logs a report: one line per peer, up to [`MAX_REPORT_LINES`], then one for the rest.
pub fn log_report(summaries: &[Summary]) {
    for s in summaries.iter().take(MAX_REPORT_LINES) {
        tracing::warn!(
            peer = %s.peer,
            failures = s.failures,
            refused_429 = s.refused,
            "receiver: credentials refused (failed authentications since the last report; after {ALLOWED_FAILURES} a peer gets 429)"
        );
    }
    if summaries.len() > MAX_REPORT_LINES {
        let rest = &summaries[MAX_REPORT_LINES..];
        tracing::warn!(
            peers = rest.len(),
            failures = rest.iter().map(|s| s.failures).sum::<u64>(),
            refused_429 = rest.iter().map(|s| s.refused).sum::<u64>(),
            "receiver: credentials refused by more peers"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_guesser_is_refused_after_five_failures_and_let_in_again_slowly() {
        let mut t = AuthThrottle::default();
        let (a, b) = (ip("203.0.113.7"), ip("198.51.100.9"));
        let now = Instant::now();
        assert_eq!(
            t.failed(a, now),
            Some(PeerKey::Ip(a)),
            "the first is logged at once"
        );
        for _ in 1..ALLOWED_FAILURES {
            assert_eq!(t.check(a, now), Ok(()));
            assert_eq!(t.failed(a, now), None);
        }
        let wait = t.check(a, now).unwrap_err();
        assert_eq!(wait, REFILL);
        assert_eq!(t.check(b, now), Ok(()), "another peer is not affected");
        // One more try after REFILL, not two.
        let later = now + REFILL;
        assert_eq!(t.check(a, later), Ok(()));
        t.failed(a, later);
        assert!(t.check(a, later).is_err());
        let report = t.report(later);
        assert_eq!(
            report,
            [Summary {
                peer: PeerKey::Ip(a),
                failures: ALLOWED_FAILURES as u64 + 1,
                refused: 2
            }]
        );
        // A success starts the peer afresh.
        t.succeeded(a, later);
        assert_eq!(t.check(a, later), Ok(()));
        assert!(t.report(later).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ipv6_host_is_its_64_and_too_many_peers_share_a_bucket() {
        let mut t = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..ALLOWED_FAILURES {
            t.failed(ip(&format!("2001:db8:1:2::{i:x}")), now);
        }
        assert!(t.check(ip("2001:db8:1:2:ffff::1"), now).is_err());
        assert!(t.check(ip("2001:db8:1:3::1"), now).is_ok());
        let s360 = ip("192.0.2.99");
        t.succeeded(s360, now);
        for i in 0..MAX_PEERS as u32 {
            t.failed(IpAddr::V4((0x0a00_0000 + i).into()), now);
        }
        for _ in 0..ALLOWED_FAILURES {
            t.failed(ip("192.0.2.1"), now);
        }
        assert!(
            t.check(ip("192.0.2.200"), now).is_err(),
            "past MAX_PEERS, newcomers share one bucket"
        );
        assert_eq!(t.peers.len(), MAX_PEERS + 1);
        assert!(
            t.check(s360, now).is_ok(),
            "a peer that authenticated keeps its own bucket"
        );
    }
}
