//! Leases (migration 10; several instances on one PostgreSQL, issue 20). Each group of
//! streams (the streams that share a rate budget; otherwise one stream) is held by at most
//! one instance at a time: a `leases` row with its holder, an epoch that grows at every
//! change of holder, and an expiry in milliseconds of **the database's clock** (instances
//! never compare their own clocks). The holder renews it at a third of its length; a run's
//! every state write checks it in the same transaction ([`check_fence`]), so an instance
//! that lost its lease (paused, partitioned, slow) commits nothing.
//!
//! Pure SQL over [`Sql`]; the engine's lease keeper (`engine::lease`) decides when.

use super::sql::{DbError, DbErrorKind, DbResult, Dialect, Sql};

/// Milliseconds since the epoch on the database's clock.
pub fn db_now_ms(db: &mut dyn Sql) -> DbResult<i64> {
    db.query_one(&format!("SELECT {}", now_ms_expr(db)), p![], |r| r.i64(0))
}

/// The database's clock in milliseconds since the epoch, as an SQL expression.
fn now_ms_expr(db: &dyn Sql) -> &'static str {
    match db.dialect() {
        Dialect::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    }
}

/// What a lost lease's message says (the run's outcome is told by it).
pub const LOST_LEASE_TEXT: &str = "no longer holds the lease";

/// The lease a run writes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub holder: String,
    pub epoch: i64,
}

/// Inside a write transaction: the lease is still this holder's, at this epoch, and has not
/// expired; on PostgreSQL the row is locked until the transaction ends, so a takeover waits
/// for it (and then sees the commit) or this write fails. `min_left_ms`: the lease must have
/// at least that much left (a write that may land until then), else it is extended to it.
pub fn check_fence(db: &mut dyn Sql, f: &Fence, min_left_ms: i64) -> DbResult<()> {
    hold(db, f, min_left_ms).map(|_| ())
}

/// [`check_fence`], returning how long the lease lasts from now (milliseconds, on the
/// database's clock) once extended.
pub fn hold(db: &mut dyn Sql, f: &Fence, min_left_ms: i64) -> DbResult<i64> {
    let lock = match db.dialect() {
        Dialect::Postgres => " FOR UPDATE",
        Dialect::Sqlite => "",
    };
    // The clock read with the row (one round trip), once its lock is held.
    let row = db.query_opt(
        &format!(
            "SELECT expires_ms, {} FROM leases WHERE key = ?1 AND holder = ?2 AND epoch = ?3{lock}",
            now_ms_expr(db)
        ),
        p![&f.key, &f.holder, f.epoch],
        |r| Ok((r.i64(0)?, r.i64(1)?)),
    )?;
    match row {
        Some((expires, now)) if expires > now => {
            if expires < now + min_left_ms {
                db.execute(
                    "UPDATE leases SET expires_ms = ?4 WHERE key = ?1 AND holder = ?2 AND epoch = ?3",
                    p![&f.key, &f.holder, f.epoch, now + min_left_ms],
                )?;
                return Ok(min_left_ms);
            }
            Ok(expires - now)
        }
        _ => Err(DbError {
            kind: DbErrorKind::LostLease,
            message: format!(
                "this instance ({}) {LOST_LEASE_TEXT} of {:?} (epoch {}); nothing of this write was kept",
                f.holder, f.key, f.epoch
            ),
        }),
    }
}

/// Who says it is alive: a daemon, or the CLI running one stream (`usher trigger` with no
/// daemon up), which holds a lease but takes no share and no requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Daemon,
    Cli,
}

/// Says this instance is alive. `boot` is the kernel's boot id of its machine (instances of
/// one machine and one boot can tell whether each other's processes still exist).
pub fn heartbeat(
    db: &mut dyn Sql,
    id: &str,
    host: &str,
    pid: u32,
    boot: &str,
    role: Role,
) -> DbResult<i64> {
    let now = db_now_ms(db)?;
    let role = match role {
        Role::Daemon => "daemon",
        Role::Cli => "cli",
    };
    db.execute(
        "INSERT INTO instances (id, host, pid, boot, role, started_ms, seen_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (id) DO UPDATE SET seen_ms = excluded.seen_ms",
        p![id, host, pid, boot, role, now],
    )?;
    Ok(now)
}

/// The other instances of this machine and boot whose process no longer exists (killed,
/// crashed): their leases can be taken at once, and they are not counted as live. A process that
/// exists (running, or stopped by SIGSTOP) is not dead; its leases run out as usual.
pub fn dead_local_instances(
    db: &mut dyn Sql,
    me: &str,
    boot: &str,
    alive: &dyn Fn(u32) -> bool,
) -> DbResult<Vec<String>> {
    if boot.is_empty() {
        return Ok(Vec::new());
    }
    let local: Vec<(String, i64)> = db.query(
        "SELECT id, pid FROM instances WHERE boot = ?1 AND id <> ?2",
        p![boot, me],
        |r| Ok((r.text(0)?, r.i64(1)?)),
    )?;
    // Kept (not deleted) until `forget_instances`: a lease may still name them.
    Ok(local
        .into_iter()
        .filter(|(_, pid)| !alive(*pid as u32))
        .map(|(id, _)| id)
        .collect())
}

/// The daemons seen within `within_ms`, in order of their ids.
pub fn live_instances(db: &mut dyn Sql, within_ms: i64) -> DbResult<Vec<String>> {
    let now = db_now_ms(db)?;
    db.query(
        "SELECT id FROM instances WHERE seen_ms >= ?1 AND role = 'daemon' ORDER BY id",
        p![now - within_ms],
        |r| r.text(0),
    )
}

/// Forgets instances not seen for a long time (their leases expired long ago).
pub fn forget_instances(db: &mut dyn Sql, older_than_ms: i64) -> DbResult<u64> {
    let now = db_now_ms(db)?;
    db.execute(
        "DELETE FROM instances WHERE seen_ms < ?1",
        p![now - older_than_ms],
    )
}

/// Makes sure every group has a lease row (unheld).
pub fn ensure(db: &mut dyn Sql, keys: &[String]) -> DbResult<()> {
    for k in keys {
        db.execute(
            "INSERT INTO leases (key, holder, epoch, expires_ms) VALUES (?1, NULL, 0, 0)
             ON CONFLICT (key) DO NOTHING",
            p![k],
        )?;
    }
    Ok(())
}

/// A lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub key: String,
    pub holder: Option<String>,
    pub epoch: i64,
    pub expires_ms: i64,
}

pub fn all(db: &mut dyn Sql) -> DbResult<(i64, Vec<LeaseRow>)> {
    let now = db_now_ms(db)?;
    let rows = db.query(
        "SELECT key, holder, epoch, expires_ms FROM leases ORDER BY key",
        p![],
        |r| {
            Ok(LeaseRow {
                key: r.text(0)?,
                holder: r.opt_text(1)?,
                epoch: r.i64(2)?,
                expires_ms: r.i64(3)?,
            })
        },
    )?;
    Ok((now, rows))
}

/// Renews the leases this instance holds (at their epochs) until now + `length_ms`; returns
/// the ones renewed with their new expiry. A lease not renewed is lost.
pub fn renew(
    db: &mut dyn Sql,
    holder: &str,
    held: &[(String, i64)],
    length_ms: i64,
) -> DbResult<Vec<(String, i64)>> {
    let now = db_now_ms(db)?;
    let mut out = Vec::with_capacity(held.len());
    for (key, epoch) in held {
        // A lease extended further by a write keeps its later expiry.
        let n = db.execute(
            "UPDATE leases SET expires_ms = CASE WHEN expires_ms > ?4 THEN expires_ms ELSE ?4 END
             WHERE key = ?1 AND holder = ?2 AND epoch = ?3 AND expires_ms > ?5",
            p![key, holder, *epoch, now + length_ms, now],
        )?;
        if n == 1 {
            let exp = db.query_one(
                "SELECT expires_ms FROM leases WHERE key = ?1",
                p![key],
                |r| r.i64(0),
            )?;
            out.push((key.clone(), exp));
        }
    }
    Ok(out)
}

/// A lease just taken: its new epoch and expiry, and whose it was (for the writes that
/// instance may have left in doubt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub key: String,
    pub epoch: i64,
    pub expires_ms: i64,
    pub previous_holder: Option<String>,
    /// Until when the previous holder's lease ran (its writes were bound to end by then).
    pub previous_expiry_ms: Option<i64>,
    /// The previous holder's process is gone (killed or crashed on this machine), rather
    /// than having let the lease run out.
    pub holder_gone: bool,
    pub now_ms: i64,
}

/// Takes a lease that nobody holds, or whose holder let it expire, or whose holder is one of
/// `dead` (a process of this machine that no longer exists: its lease is over now).
pub fn acquire(
    db: &mut dyn Sql,
    holder: &str,
    key: &str,
    length_ms: i64,
    dead: &[String],
) -> DbResult<Option<Acquired>> {
    let now = db_now_ms(db)?;
    let before = db.query_opt(
        "SELECT holder, expires_ms FROM leases WHERE key = ?1",
        p![key],
        |r| Ok((r.opt_text(0)?, r.i64(1)?)),
    )?;
    let Some((old_holder, mut old_expiry)) = before else {
        return Ok(None);
    };
    let from_dead = old_holder.as_ref().is_some_and(|h| dead.contains(h));
    if old_holder.is_some() && old_expiry > now && !from_dead {
        return Ok(None);
    }
    let n = db.execute(
        "UPDATE leases SET holder = ?2, epoch = epoch + 1, expires_ms = ?3,
                previous_holder = holder, previous_expiry = expires_ms
         WHERE key = ?1 AND (holder IS NULL OR expires_ms <= ?4 OR ?7 = 1)
           AND holder IS NOT DISTINCT FROM ?5 AND expires_ms = ?6",
        p![
            key,
            holder,
            now + length_ms,
            now,
            old_holder.as_deref(),
            old_expiry,
            from_dead
        ],
    )?;
    if from_dead {
        // Its writes were bound to end when it died (before now), not at its lease's end.
        old_expiry = old_expiry.min(now);
    }
    if n != 1 {
        return Ok(None); // someone else was quicker
    }
    let epoch = db.query_one("SELECT epoch FROM leases WHERE key = ?1", p![key], |r| {
        r.i64(0)
    })?;
    // A lease that expired (its holder died or stalled): that holder's writes are bound
    // by its expiry. A lease given back between runs (holder NULL): nothing to wait for.
    let previous_expiry_ms = match &old_holder {
        Some(h) if h != holder => Some(old_expiry).filter(|e| *e > 0),
        _ => None,
    };
    Ok(Some(Acquired {
        key: key.to_string(),
        epoch,
        expires_ms: now + length_ms,
        previous_holder: old_holder.filter(|h| h != holder),
        previous_expiry_ms,
        holder_gone: from_dead,
        now_ms: now,
    }))
}

/// Gives a lease back for another instance to take at once. Only between runs: what the
/// holder's writes left in doubt is in `in_doubt` already, so the next holder does not
/// wait out this lease (its previous expiry is not kept).
pub fn release(db: &mut dyn Sql, holder: &str, key: &str, epoch: i64) -> DbResult<bool> {
    let now = db_now_ms(db)?;
    db.execute(
        "UPDATE leases SET holder = NULL, expires_ms = ?4, previous_holder = holder,
                previous_expiry = NULL
         WHERE key = ?1 AND holder = ?2 AND epoch = ?3",
        p![key, holder, epoch, now],
    )
    .map(|n| n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::Lite;

    fn db() -> rusqlite::Connection {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for m in crate::store::MIGRATIONS {
            c.execute_batch(m).unwrap();
        }
        c
    }

    #[test]
    fn one_holder_at_a_time_and_a_lost_lease_commits_nothing() {
        let c = db();
        let mut l = Lite(&c);
        let db: &mut dyn Sql = &mut l;
        ensure(db, &["g".into()]).unwrap();
        let a = acquire(db, "A", "g", 60_000, &[]).unwrap().expect("free");
        assert_eq!(a.epoch, 1);
        assert_eq!(a.previous_holder, None);
        assert!(
            acquire(db, "B", "g", 60_000, &[]).unwrap().is_none(),
            "held by A"
        );
        let fence_a = Fence {
            key: "g".into(),
            holder: "A".into(),
            epoch: a.epoch,
        };
        check_fence(db, &fence_a, 0).unwrap();
        // A's lease runs out (as if it were paused): B takes it, A can no longer write.
        db.execute("UPDATE leases SET expires_ms = 1 WHERE key = 'g'", p![])
            .unwrap();
        let b = acquire(db, "B", "g", 60_000, &[])
            .unwrap()
            .expect("expired");
        assert_eq!(b.epoch, 2);
        assert_eq!(b.previous_holder.as_deref(), Some("A"));
        assert_eq!(b.previous_expiry_ms, Some(1));
        let e = check_fence(db, &fence_a, 0).unwrap_err();
        assert_eq!(e.kind, DbErrorKind::LostLease);
        assert!(
            renew(db, "A", &[("g".into(), 1)], 60_000)
                .unwrap()
                .is_empty()
        );
        assert_eq!(renew(db, "B", &[("g".into(), 2)], 60_000).unwrap().len(), 1);
        // A write that may land far ahead extends the lease to cover it.
        let fence_b = Fence {
            key: "g".into(),
            holder: "B".into(),
            epoch: 2,
        };
        check_fence(db, &fence_b, 120_000).unwrap();
        let (now, rows) = all(db).unwrap();
        assert!(rows[0].expires_ms >= now + 119_000);
        // Given back between runs: the next holder has nothing to wait for.
        assert!(release(db, "B", "g", 2).unwrap());
        let c2 = acquire(db, "C", "g", 60_000, &[])
            .unwrap()
            .expect("released");
        assert_eq!(c2.previous_expiry_ms, None);
    }

    #[test]
    fn a_dead_local_holder_s_lease_is_taken_at_once_and_a_live_one_s_is_not() {
        let c = db();
        let mut l = Lite(&c);
        let db: &mut dyn Sql = &mut l;
        ensure(db, &["g".into(), "h".into()]).unwrap();
        heartbeat(db, "host:1:a", "host", 1, "boot-1", Role::Daemon).unwrap();
        heartbeat(db, "host:2:b", "host", 2, "boot-1", Role::Daemon).unwrap();
        heartbeat(db, "other:1:c", "other", 1, "boot-2", Role::Daemon).unwrap();
        acquire(db, "host:1:a", "g", 60_000, &[]).unwrap().unwrap();
        acquire(db, "other:1:c", "h", 60_000, &[]).unwrap().unwrap();
        // Seen from host:3:d on boot-1: pid 1 is gone, pid 2 is alive; "other" is another
        // machine, never judged from here.
        heartbeat(db, "host:3:d", "host", 3, "boot-1", Role::Cli).unwrap();
        let dead = dead_local_instances(db, "host:3:d", "boot-1", &|pid| pid != 1).unwrap();
        assert_eq!(dead, vec!["host:1:a".to_string()]);
        let a = acquire(db, "host:3:d", "g", 60_000, &dead)
            .unwrap()
            .expect("its holder is dead");
        assert_eq!(a.previous_holder.as_deref(), Some("host:1:a"));
        assert!(
            a.previous_expiry_ms.unwrap() <= a.now_ms,
            "its writes ended by now"
        );
        assert!(
            acquire(db, "host:3:d", "h", 60_000, &dead)
                .unwrap()
                .is_none()
        );
        // An unknown boot judges nothing.
        assert!(
            dead_local_instances(db, "x", "", &|_| false)
                .unwrap()
                .is_empty()
        );
    }
}
