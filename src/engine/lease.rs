//! Several instances on one PostgreSQL (issue 20): which instance runs which streams.
//!
//! Streams are leased in **groups**: the streams that share a rate budget (every S-360
//! stream of one institution; streams on one rate-limited connection) form one group, so
//! that the budget is spent by one instance at a time; any other stream is a group of its
//! own. A group's lease (`store::leases`) has a holder, an epoch and an expiry on the
//! database's clock. The [`Keeper`] of each instance, every third of the lease's length:
//! says it is alive, renews what it holds (a lease it could not renew is lost: its runs
//! commit nothing more, see the fence), takes free or expired leases up to its share of
//! the groups (groups ÷ live instances, rounded up), and gives back one lease a turn while
//! it holds more than its share, between runs, so that a new instance takes streams over
//! gradually, not in a storm.
//!
//! A run is started only for a stream whose group this instance holds, on a store fenced
//! with the lease: every write of the run checks holder and epoch in its own transaction.
//! Taking over a lease that expired (its holder died, or was paused or cut off), the new
//! holder treats the old holder's writes as in doubt until the old lease's expiry plus the
//! longest timeout of the group's targets (plus the settle margin, as every write in doubt
//! is waited for): a holder never sends a write its lease does not outlive by the write's
//! deadline plus the margin (`Store::doubt_set` extends the lease in the same transaction
//! or refuses), so no write of the old holder can land after that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::config::{Config, StreamSpec};
use crate::store::leases::{self, Acquired, Fence};
use crate::store::{Store, StoreError};

/// A lease this instance holds.
#[derive(Debug, Clone)]
struct Held {
    epoch: i64,
}

/// What a turn of the keeper changed.
#[derive(Debug)]
pub enum Change {
    /// A lease taken; `streams` are the group's.
    Acquired {
        lease: Acquired,
        streams: Vec<String>,
    },
    /// A lease this instance held and could not renew: another instance may hold it now.
    Lost { key: String, streams: Vec<String> },
    /// A lease given back (more than this instance's share).
    Released { key: String },
}

pub struct Keeper {
    store: Store,
    /// This instance: host, PID and a random part (a restarted instance is a new one).
    pub me: String,
    host: String,
    pid: u32,
    length: Duration,
    /// Lease key → its streams.
    groups: BTreeMap<String, Vec<String>>,
    /// Stream → lease key.
    group_of: HashMap<String, String>,
    held: HashMap<String, Held>,
}

/// The lease groups of a configuration: streams joined by the rate-limited budgets they
/// draw from (their source's and target's), named after their first stream.
pub fn groups(config: &Config) -> BTreeMap<String, Vec<String>> {
    let budgets = |s: &StreamSpec| -> Vec<String> {
        [&s.source, &s.target]
            .into_iter()
            .filter_map(|c| config.connections.get(c))
            .filter(|c| c.rate_limit.is_some())
            .map(|c| c.budget_key())
            .collect()
    };
    // Union-find over streams, joined through budget keys.
    let names: Vec<&String> = config.streams.keys().collect();
    let mut parent: Vec<usize> = (0..names.len()).collect();
    fn find(p: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while p[r] != r {
            r = p[r];
        }
        let mut i = i;
        while p[i] != r {
            let next = p[i];
            p[i] = r;
            i = next;
        }
        r
    }
    let mut by_budget: HashMap<String, usize> = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        for b in budgets(&config.streams[*name]) {
            match by_budget.get(&b) {
                Some(&j) => {
                    let (a, c) = (find(&mut parent, i), find(&mut parent, j));
                    parent[a.max(c)] = a.min(c);
                }
                None => {
                    by_budget.insert(b, i);
                }
            }
        }
    }
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut root_name: HashMap<usize, String> = HashMap::new();
    for i in 0..names.len() {
        let r = find(&mut parent, i);
        // Names are sorted (BTreeMap keys): the root is the group's first stream.
        let key = root_name
            .entry(r)
            .or_insert_with(|| names[r].clone())
            .clone();
        out.entry(key).or_default().push(names[i].clone());
    }
    out
}

impl Keeper {
    pub fn new(store: Store, config: &Config) -> Keeper {
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let pid = std::process::id();
        let me = format!("{host}:{pid}:{:08x}", rand::random::<u32>());
        let mut k = Keeper {
            store,
            me,
            host,
            pid,
            length: config.daemon.lease,
            groups: BTreeMap::new(),
            group_of: HashMap::new(),
            held: HashMap::new(),
        };
        k.regroup(config);
        k
    }

    /// The groups of a (reloaded) configuration. Leases of groups that no longer exist
    /// are dropped from what this instance holds (they expire).
    pub fn regroup(&mut self, config: &Config) {
        self.length = config.daemon.lease;
        self.groups = groups(config);
        self.group_of = self
            .groups
            .iter()
            .flat_map(|(k, ss)| ss.iter().map(move |s| (s.clone(), k.clone())))
            .collect();
        self.held.retain(|k, _| self.groups.contains_key(k));
    }

    /// How often the keeper takes a turn: a third of the lease.
    pub fn period(&self) -> Duration {
        self.length / 3
    }

    pub fn group_of(&self, stream: &str) -> Option<&str> {
        self.group_of.get(stream).map(String::as_str)
    }

    pub fn streams_of(&self, key: &str) -> Vec<String> {
        self.groups.get(key).cloned().unwrap_or_default()
    }

    /// The fence of the stream's group when this instance holds it.
    pub fn fence(&self, stream: &str) -> Option<Fence> {
        let key = self.group_of.get(stream)?;
        let held = self.held.get(key)?;
        Some(Fence {
            key: key.clone(),
            holder: self.me.clone(),
            epoch: held.epoch,
        })
    }

    /// Lease keys held, for status.
    pub fn held_keys(&self) -> BTreeSet<String> {
        self.held.keys().cloned().collect()
    }

    /// One turn: heartbeat, renew, take this instance's share, give back one over it.
    /// `busy` says whether a group has a run going (such a lease is never given back).
    pub async fn turn(&mut self, busy: &dyn Fn(&str) -> bool) -> Result<Vec<Change>, StoreError> {
        let me = self.me.clone();
        let (host, pid) = (self.host.clone(), self.pid);
        let length_ms = self.length.as_millis() as i64;
        let keys: Vec<String> = self.groups.keys().cloned().collect();
        let held: Vec<(String, i64)> = self
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.epoch))
            .collect();
        // Alive, renewed, and who else is.
        let (renewed, live, all) = self
            .store
            .write(move |db| {
                leases::heartbeat(db, &me, &host, pid)?;
                leases::ensure(db, &keys)?;
                let renewed = leases::renew(db, &me, &held, length_ms)?;
                // An instance is live while it renews (every third of a lease): seen within
                // one lease length. One that was not is gone by the time its leases expire.
                let live = leases::live_instances(db, length_ms)?;
                leases::forget_instances(db, 24 * 3600 * 1000)?;
                let (now, all) = leases::all(db)?;
                Ok((renewed, live, (now, all)))
            })
            .await?;
        let mut changes = Vec::new();
        let renewed: HashMap<String, i64> = renewed.into_iter().collect();
        let lost: Vec<String> = self
            .held
            .keys()
            .filter(|k| !renewed.contains_key(*k))
            .cloned()
            .collect();
        for key in lost {
            self.held.remove(&key);
            changes.push(Change::Lost {
                streams: self.streams_of(&key),
                key,
            });
        }
        let (now, rows) = all;
        let total = self.groups.len();
        let share = total.div_ceil(live.len().max(1));
        // Free or expired leases of groups this configuration has, in key order.
        let takeable: Vec<String> = rows
            .iter()
            .filter(|r| self.groups.contains_key(&r.key) && !self.held.contains_key(&r.key))
            .filter(|r| r.holder.is_none() || r.expires_ms <= now)
            .map(|r| r.key.clone())
            .collect();
        for key in takeable {
            if self.held.len() >= share {
                break;
            }
            let me = self.me.clone();
            let k = key.clone();
            let got = self
                .store
                .write(move |db| leases::acquire(db, &me, &k, length_ms))
                .await?;
            if let Some(a) = got {
                self.held.insert(key.clone(), Held { epoch: a.epoch });
                changes.push(Change::Acquired {
                    streams: self.streams_of(&key),
                    lease: a,
                });
            }
        }
        // Over the share (another instance joined): give one back, between runs.
        if self.held.len() > share
            && let Some(key) = self.held.keys().filter(|k| !busy(k)).max().cloned()
        {
            let epoch = self.held[&key].epoch;
            let me = self.me.clone();
            let k = key.clone();
            self.store
                .write(move |db| leases::release(db, &me, &k, epoch))
                .await?;
            self.held.remove(&key);
            changes.push(Change::Released { key });
        }
        Ok(changes)
    }

    /// Gives back every lease (a clean stop): other instances take the streams at once.
    pub async fn release_all(&mut self) {
        let held: Vec<(String, i64)> = self.held.drain().map(|(k, h)| (k, h.epoch)).collect();
        let me = self.me.clone();
        let _ = self
            .store
            .write(move |db| {
                for (k, e) in &held {
                    leases::release(db, &me, k, *e)?;
                }
                Ok(())
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_that_share_a_rate_budget_are_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("usher.toml");
        std::fs::write(
            &file,
            r#"
[connections.s360]
kind = "s360"
institution = "myvenue"
virtual_operator = "op"
partner_name = "p"
partner_secret = "x"
[connections.crm]
kind = "crm"
base_url = "http://127.0.0.1:1/crm"
[connections.crm-limited]
kind = "crm"
base_url = "http://127.0.0.1:1/crm"
rate_limit = { calls = 10, per = "1m" }
[streams.a-contacts]
source = "crm"
entity = "contact"
target = "s360"
every = "1h"
[streams.b-offers]
source = "crm"
entity = "offer"
target = "s360"
every = "1h"
[streams.c-plain]
source = "crm"
entity = "contact"
target = "crm"
every = "1h"
[streams.c-plain.webhook]
url = "/h"
[streams.d-limited]
source = "crm-limited"
entity = "contact"
target = "crm"
every = "1h"
[streams.d-limited.webhook]
url = "/h"
[streams.e-limited]
source = "crm"
entity = "contact"
target = "crm-limited"
every = "1h"
[streams.e-limited.webhook]
url = "/h"
"#,
        )
        .unwrap();
        let cfg = crate::config::load(&crate::config::Source {
            main_file: file,
            env_overrides: false,
            state_dir_override: Some(dir.path().join("state")),
            read_secrets: true,
        })
        .expect("valid");
        let g = groups(&cfg);
        assert_eq!(g["a-contacts"], vec!["a-contacts", "b-offers"]);
        assert_eq!(g["c-plain"], vec!["c-plain"]);
        assert_eq!(g["d-limited"], vec!["d-limited", "e-limited"]);
        assert_eq!(g.len(), 3);
    }
}
