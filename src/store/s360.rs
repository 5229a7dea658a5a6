//! S-360's tables: the webhook inbox (`s360_inbox`) and the ledger reads of the offer stream.
//!
//! The receiver writes the inbox in batches ([`Store::inbox_insert`]: several POSTs in one
//! transaction, one fsync, each POST answered only after that commit). The relay reads it in
//! order of `id` after its cursor; the cursor moves with the outbox rows through
//! `commit_page`, like every other cursor.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use super::sql::{DbError, Dialect, Param};
use super::{Result, Store, now_text};

/// Records per look-up of what the inbox holds and per INSERT.
const CHUNK: usize = 500;

/// One received record, ready to store: where its bytes and its ID are in the POST's body.
/// No copy of the record is made: a 10 MB POST of tiny records takes its 10 MB plus 24
/// bytes a record until it is committed.
#[derive(Debug, Clone)]
pub struct InboxRecord {
    /// The record is `body[start..end]` of its batch, byte for byte as received.
    pub start: u32,
    pub end: u32,
    pub id: RecordId,
}

/// A record's ID as written: a string's content, or a number's digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordId {
    /// `body[start..end]` of the batch (digits, or a string without escapes).
    Span(u32, u32),
    /// A string ID that holds escapes, decoded.
    Text(Box<str>),
}

/// One POST's records, for one stream.
#[derive(Debug, Clone)]
pub struct InboxBatch {
    pub stream: String,
    /// The POST's body as received; each record and span is valid UTF-8 (the receiver
    /// parsed it).
    pub body: bytes::Bytes,
    pub records: Vec<InboxRecord>,
}

impl InboxBatch {
    /// A record's ID and bytes.
    pub fn record<'a>(
        &'a self,
        r: &'a InboxRecord,
    ) -> std::result::Result<(&'a str, &'a str), std::str::Utf8Error> {
        let text = |a: u32, b: u32| std::str::from_utf8(&self.body[a as usize..b as usize]);
        let id = match &r.id {
            RecordId::Span(a, b) => text(*a, *b)?,
            RecordId::Text(t) => t,
        };
        Ok((id, text(r.start, r.end)?))
    }
}

/// What became of one POST: records stored, records dropped as already stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxOutcome {
    pub stored: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone)]
pub struct InboxRow {
    pub id: i64,
    pub record_id: String,
    /// The record as received, byte for byte.
    pub body: String,
}

impl Store {
    /// Stores several POSTs in one transaction. A record equal (same stream, same record id,
    /// same bytes: `content_hash` is the SHA-256 of the record as received) to **any**
    /// version already stored is a resend and is not stored again: S-360 resends whole
    /// payloads, so after v0, v1 a resent v0 must not be relayed after v1 (the CRM would end
    /// with the stale version). On PostgreSQL the receivers of several instances write the
    /// same inbox: each stream's inserts are serialized by a transaction-level advisory
    /// lock, so two instances given the same resend at once store it once.
    pub async fn inbox_insert(&self, batches: Vec<InboxBatch>) -> Result<Vec<InboxOutcome>> {
        self.write(move |db| {
            if db.dialect() == Dialect::Postgres {
                let mut streams: Vec<&str> = batches.iter().map(|b| b.stream.as_str()).collect();
                streams.sort_unstable();
                streams.dedup();
                for s in streams {
                    db.execute("SELECT pg_advisory_xact_lock(hashtext(?1))", p![s])?;
                }

            }
            let mut out = Vec::with_capacity(batches.len());
            let now = now_text();
            // The look-ups read only rows committed before this transaction; the rows it
            // inserts itself are remembered here (by the first half of their hash). Left to
            // see its own inserts, PostgreSQL's planner, whose statistics do not count them,
            // scans them all for each chunk of a large payload (quadratic).
            let before: i64 = db
                .query_opt(
                    "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM s360_inbox",
                    p![],
                    |r| r.i64(0),
                )?
                .unwrap_or(0);
            let mut inserted: HashSet<u128> = HashSet::new();
            for b in &batches {
                let mut o = InboxOutcome::default();
                // A few hundred records at a time (a round trip per record is slow on a
                // database across the network; memory stays that of one chunk): what the
                // inbox holds of them, then the others in one INSERT. A record equal to one
                // stored, earlier chunks of this payload included, is stored once.
                for chunk in b.records.chunks(CHUNK) {
                    let mut records: Vec<(&str, &str, [u8; 32])> = Vec::with_capacity(chunk.len());
                    for r in chunk {
                        let (id, text) = b
                            .record(r)
                            .map_err(|e| DbError::other(format!("a received record: {e}")))?;
                        records.push((id, text, Sha256::digest(text.as_bytes()).into()));
                    }
                    let marks = (0..records.len())
                        .map(|i| format!("?{}", i + 2))
                        .collect::<Vec<_>>()
                        .join(",");
                    let mut params: Vec<Param<'_>> = vec![Param::Text(&b.stream)];
                    params.extend(records.iter().map(|(id, _, _)| Param::Text(id)));
                    params.push(Param::I64(before));
                    // The content hash covers the record's bytes, its ID among them.
                    // `+id`: the bound must not choose the index. Given `id <= ?` SQLite's
                    // planner (no statistics) took `(stream, id)`, which holds every row of
                    // the stream below the bound: each chunk read the stream's whole inbox,
                    // which is never emptied, so intake slowed as the inbox grew (5.1k
                    // records/s from 16 senders into an inbox growing from empty to 50k).
                    let mut known: HashSet<Vec<u8>> = HashSet::new();
                    db.query_each(
                        &known_versions_sql(&marks, records.len() + 2),
                        &params,
                        &mut |r| {
                            known.insert(r.blob(0)?);
                            Ok(())
                        },
                    )?;
                    let mut params: Vec<Param<'_>> = vec![Param::Text(&b.stream)];
                    let mut rows = Vec::new();
                    for (id, text, hash) in &records {
                        let half = u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"));
                        if known.contains(&hash[..]) || !inserted.insert(half) {
                            o.duplicates += 1;
                            continue;
                        }
                        let k = params.len();
                        rows.push(format!("(?1, ?{}, ?{}, ?{}, ?{})", k + 1, k + 2, k + 3, k + 4));
                        params.push(Param::Text(id));
                        params.push(Param::Blob(&hash[..]));
                        params.push(Param::Text(text));
                        params.push(Param::Text(&now));
                    }
                    if rows.is_empty() {
                        continue;
                    }
                    db.execute(
                        &format!(
                            "INSERT INTO s360_inbox (stream, record_id, content_hash, body, received_at)
                             VALUES {}",
                            rows.join(", ")
                        ),
                        &params,
                    )?;
                    o.stored += rows.len() as u64;
                }
                out.push(o);
            }
            Ok(out)
        })
        .await
    }

    /// Inbox records of a stream after `after` (an inbox id), oldest first.
    pub async fn inbox_after(&self, stream: &str, after: i64, limit: u32) -> Result<Vec<InboxRow>> {
        let stream = stream.to_string();
        self.read(move |db| {
            db.query(
                "SELECT id, record_id, body FROM s360_inbox
                 WHERE stream = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                p![&stream, after, limit],
                |r| {
                    Ok(InboxRow {
                        id: r.i64(0)?,
                        record_id: r.text(1)?,
                        body: r.text(2)?,
                    })
                },
            )
        })
        .await
    }

    /// Records of a stream in the inbox (for tests and status).
    pub async fn inbox_count(&self, stream: &str) -> Result<u64> {
        let stream = stream.to_string();
        self.read(move |db| {
            db.count(
                "SELECT COUNT(*) FROM s360_inbox WHERE stream = ?1",
                p![&stream],
            )
        })
        .await
    }

    /// A ledger row's (status, target ids), if any.
    pub async fn ledger_entry(
        &self,
        stream: &str,
        key: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        let (stream, key) = (stream.to_string(), key.to_string());
        self.read(move |db| {
            db.query_opt(
                "SELECT status, target_ids FROM ledger WHERE stream = ?1 AND key = ?2",
                p![&stream, &key],
                |r| Ok((r.opt_text(0)?, r.opt_text(1)?)),
            )
        })
        .await
    }
}

/// The stored versions of some records of a stream, below a bound. `+id`: the bound must
/// not choose the index (see `inbox_insert`).
fn known_versions_sql(marks: &str, bound: usize) -> String {
    format!(
        "SELECT content_hash FROM s360_inbox
         WHERE stream = ?1 AND record_id IN ({marks}) AND +id <= ?{bound}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A POST's look-up reads the records it names, not the stream's whole inbox.
    #[test]
    fn the_intake_lookup_goes_by_record_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let plan = store
            .read_sync(|db| {
                let mut plan = String::new();
                db.query_each(
                    &format!("EXPLAIN QUERY PLAN {}", known_versions_sql("?2,?3", 4)),
                    p!["contacts", "a", "b", 10_i64],
                    &mut |r| {
                        plan.push_str(&r.text(3)?);
                        Ok(())
                    },
                )?;
                Ok(plan)
            })
            .unwrap();
        assert!(plan.contains("s360_inbox_version"), "{plan}");
    }

    #[test]
    fn a_received_record_takes_24_bytes() {
        assert_eq!(std::mem::size_of::<InboxRecord>(), 24);
    }
}
