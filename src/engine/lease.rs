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
    /// The kernel's boot id: instances of one machine and boot tell each other's death.
    boot: String,
    role: leases::Role,
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
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_string())
            .unwrap_or_default();
        let mut k = Keeper {
            store,
            me,
            host,
            pid,
            boot,
            role: leases::Role::Daemon,
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
        let (host, pid, boot, role) = (self.host.clone(), self.pid, self.boot.clone(), self.role);
        let length_ms = self.length.as_millis() as i64;
        let keys: Vec<String> = self.groups.keys().cloned().collect();
        let held: Vec<(String, i64)> = self
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.epoch))
            .collect();
        // Alive, renewed, and who else is.
        let (renewed, live, all, dead) = self
            .store
            .write(move |db| {
                leases::heartbeat(db, &me, &host, pid, &boot, role)?;
                leases::ensure(db, &keys)?;
                let renewed = leases::renew(db, &me, &held, length_ms)?;
                // Killed instances of this machine: their leases are over now.
                let dead = leases::dead_local_instances(db, &me, &boot, &process_exists)?;
                // An instance is live while it renews (every third of a lease): seen within
                // one lease length. One that was not is gone by the time its leases expire.
                let mut live = leases::live_instances(db, length_ms)?;
                live.retain(|id| !dead.contains(id));
                leases::forget_instances(db, 24 * 3600 * 1000)?;
                let (now, all) = leases::all(db)?;
                Ok((renewed, live, (now, all), dead))
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
            .filter(|r| {
                r.holder.is_none()
                    || r.expires_ms <= now
                    || r.holder.as_ref().is_some_and(|h| dead.contains(h))
            })
            .map(|r| r.key.clone())
            .collect();
        for key in takeable {
            if self.held.len() >= share {
                break;
            }
            let me = self.me.clone();
            let k = key.clone();
            let dead = dead.clone();
            let got = self
                .store
                .write(move |db| leases::acquire(db, &me, &k, length_ms, &dead))
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

/// Whether a process of this machine exists (running, or stopped: a stopped process may
/// wake up and its lease must then run out as usual).
/// A zombie (dead, not yet reaped) counts as gone.
fn process_exists(pid: u32) -> bool {
    !matches!(
        super::lock::process_state(pid),
        None | Some('Z') | Some('X')
    )
}

/// A lease just taken from another holder. When that holder let it expire (it died, or
/// was paused or cut off) while writing to a stream (its `in_doubt` row is there), its
/// writes may still land until its lease's expiry plus the timeout of the stream's
/// target: the row is moved to then (a run waits for it, plus the settle margin). A
/// stream it was not writing to has nothing in doubt. Its runs left open are closed as
/// `lost lease`; returns how many (their streams should run now).
pub async fn inherit(
    store: &Store,
    config: &Config,
    me: &str,
    lease: &Acquired,
    streams: &[String],
) -> Result<usize, StoreError> {
    let Some(previous) = lease.previous_holder.clone() else {
        return Ok(0);
    };
    if let Some(expiry_ms) = lease.previous_expiry_ms {
        for s in streams {
            let Some(spec) = config.streams.get(s) else {
                continue;
            };
            // Writes go to the target: its timeout bounds when one can still land.
            let longest = config
                .connections
                .get(&spec.target)
                .map(|c| c.timeout)
                .unwrap_or_default();
            // The old lease's expiry is on the database's clock: what was left of it when
            // this instance took it over, counted from this instance's own now.
            let left = Duration::from_millis((expiry_ms - lease.now_ms).max(0) as u64);
            let until = chrono::Utc::now()
                + chrono::TimeDelta::from_std(left + longest).unwrap_or_default();
            // Only a stream the old holder was writing to (its run left a row in
            // `in_doubt`: a run that saw every answer clears it) has writes in doubt.
            let later = match store.doubt(s).await {
                Ok(Some(d)) => d.until < until,
                Ok(None) => false,
                Err(_) => true,
            };
            if later
                && until > chrono::Utc::now()
                && let Err(e) = store
                    .doubt_set(
                        s,
                        until,
                        crate::store::DoubtState::Unanswered,
                        &format!("writes of instance {previous}, whose lease ran out"),
                    )
                    .await
            {
                tracing::error!(stream = %s, error = %e, "cannot record the previous holder's writes as in doubt");
            }
        }
    }
    let (outcome, why) = if lease.holder_gone {
        (
            "interrupted",
            format!(
                "instance {previous} was killed or crashed before the run finished; nothing after its last commit was kept"
            ),
        )
    } else {
        (
            "lost lease",
            format!(
                "instance {previous} lost the lease of this stream's group before the run finished; nothing after its last commit was kept"
            ),
        )
    };
    store
        .close_runs_of(streams.to_vec(), me, outcome, why)
        .await
}

impl Keeper {
    /// A keeper for the CLI's own run of one stream: it says it is alive as the CLI, so
    /// that it is not taken for a daemon that carries out requests.
    pub fn for_cli(mut self) -> Keeper {
        self.role = leases::Role::Cli;
        self
    }

    /// The daemons alive on the state (within a lease length), after forgetting the ones
    /// of this machine whose process is gone.
    pub async fn live_daemons(&self) -> Result<Vec<String>, StoreError> {
        let (me, boot) = (self.me.clone(), self.boot.clone());
        let length_ms = self.length.as_millis() as i64;
        self.store
            .write(move |db| {
                let dead = leases::dead_local_instances(db, &me, &boot, &process_exists)?;
                let mut live = leases::live_instances(db, length_ms)?;
                live.retain(|id| !dead.contains(id));
                Ok(live)
            })
            .await
    }

    /// The CLI's own run (`usher trigger` when no instance is running): takes the lease of
    /// `stream`'s group for this process, if it is free or expired.
    pub async fn take_group_of(&mut self, stream: &str) -> Result<Option<Acquired>, StoreError> {
        let Some(key) = self.group_of.get(stream).cloned() else {
            return Ok(None);
        };
        let (me, host, pid) = (self.me.clone(), self.host.clone(), self.pid);
        let (boot, role) = (self.boot.clone(), self.role);
        let length_ms = self.length.as_millis() as i64;
        let keys: Vec<String> = self.groups.keys().cloned().collect();
        let k = key.clone();
        let got = self
            .store
            .write(move |db| {
                leases::heartbeat(db, &me, &host, pid, &boot, role)?;
                leases::ensure(db, &keys)?;
                let dead = leases::dead_local_instances(db, &me, &boot, &process_exists)?;
                leases::acquire(db, &me, &k, length_ms, &dead)
            })
            .await?;
        if let Some(a) = &got {
            self.held.insert(key, Held { epoch: a.epoch });
        }
        Ok(got)
    }

    /// Renews what this process holds (the CLI's run: no share taken, none given back);
    /// false when a lease was lost.
    pub async fn renew_held(&mut self) -> Result<bool, StoreError> {
        let (me, host, pid) = (self.me.clone(), self.host.clone(), self.pid);
        let (boot, role) = (self.boot.clone(), self.role);
        let length_ms = self.length.as_millis() as i64;
        let held: Vec<(String, i64)> = self
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.epoch))
            .collect();
        let n = held.len();
        let renewed = self
            .store
            .write(move |db| {
                leases::heartbeat(db, &me, &host, pid, &boot, role)?;
                leases::renew(db, &me, &held, length_ms)
            })
            .await?;
        Ok(renewed.len() == n)
    }
}

/// Time since boot, counting suspended time too (`CLOCK_BOOTTIME`): a machine suspended or
/// a process stopped past its lease sees the time that passed.
fn since_boot() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The [`crate::http::Gate`] of a run under a lease: a call leaves only while the lease is
/// known to last a while longer (a third of its length, one renewal period, or the call's
/// timeout if shorter). Known locally: a check of the lease in the database (extending it
/// to that if needed) says how long it lasts; counted from before the check was sent, on
/// this machine's boot clock, that lower bound holds without asking again. Past it, the
/// lease is checked again, or the call is not sent. So a holder that was paused, suspended
/// or cut off past its lease wakes up to no call at all, and a call sent in time has at
/// least a renewal period to finish in before another instance may take the stream (a read
/// slower than that may still be answered after the takeover: it changes nothing; a write
/// is covered to its deadline by the in-doubt rule, `Store::doubt_set`).
pub struct LeaseGate {
    store: Store,
    /// How long the lease must last past a call's start at least.
    min_left: Duration,
    /// Boot-clock time until which the lease is known to be this instance's.
    until: std::sync::Mutex<Duration>,
}

impl LeaseGate {
    pub fn new(store: Store, lease: Duration) -> LeaseGate {
        LeaseGate {
            store,
            min_left: lease / 3,
            until: std::sync::Mutex::new(Duration::ZERO),
        }
    }
}

impl crate::http::Gate for LeaseGate {
    fn may_call(&self, within: Duration) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let need = within.min(self.min_left);
            let asked = since_boot();
            if *self.until.lock().unwrap_or_else(|p| p.into_inner()) >= asked + need {
                return Ok(());
            }
            match self.store.hold_lease(need).await {
                Ok(Some(left)) => {
                    let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
                    *until = (*until).max(asked + left);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// The client a run uses: on a store fenced by a lease, every call asks the [`LeaseGate`].
pub fn http_for(http: &crate::http::Http, store: &Store, config: &Config) -> crate::http::Http {
    match store.fence() {
        Some(_) => http.gated(std::sync::Arc::new(LeaseGate::new(
            store.clone(),
            config.daemon.lease,
        ))),
        None => http.clone(),
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
