//! Records a stream owes its target (`owed` table, migration 9): a record the target
//! refused, or that the source could not give whole (a malformed page), stays owed until
//! the target accepts it or it is set aside in dead letters with its reason. A stream kind
//! that cannot keep such a record in its source behind its cursor (an outbox, a page not
//! committed) keeps it here, and every run tries it again, whatever its window.
//!
//! [`OwedBook`] is a run's view of them: the keys owed when it started, what it learnt
//! since, and the changes that go into its next `commit_page`, in the same transaction as
//! the ledger rows and dead letters of the batch that learnt them.

use std::collections::HashSet;

use crate::store::{Owed, OwedRow, PageCommit};

#[derive(Debug, Default)]
pub struct OwedBook {
    /// Keys owed now: stored when the run started, or learnt by it.
    owed: HashSet<String>,
    /// To add or update at the next commit.
    add: Vec<Owed>,
    /// To remove at the next commit.
    settle: Vec<String>,
}

impl OwedBook {
    pub fn new(rows: &[OwedRow]) -> OwedBook {
        OwedBook {
            owed: rows.iter().map(|r| r.key.clone()).collect(),
            ..Default::default()
        }
    }

    /// The record is (still) owed, for this reason.
    pub fn owe(&mut self, o: Owed) {
        self.settle.retain(|k| *k != o.key);
        self.add.retain(|a| a.key != o.key);
        self.owed.insert(o.key.clone());
        self.add.push(o);
    }

    /// The record is settled (accepted, dead-lettered, or gone from the source); nothing
    /// happens when it was not owed, so a run may say this of every record it settles.
    pub fn settle(&mut self, key: &str) {
        if self.owed.remove(key) {
            self.add.retain(|a| a.key != key);
            self.settle.push(key.to_string());
        }
    }

    pub fn is_owed(&self, key: &str) -> bool {
        self.owed.contains(key)
    }

    /// How many records are owed now (once the pending changes are committed).
    pub fn len(&self) -> usize {
        self.owed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// Whether a commit has something of this book to write.
    pub fn has_changes(&self) -> bool {
        !self.add.is_empty() || !self.settle.is_empty()
    }

    /// Moves the pending changes into a page's commit.
    pub fn commit_into(&mut self, commit: &mut PageCommit) {
        commit.owed.append(&mut self.add);
        commit.settled.append(&mut self.settle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owed(key: &str, reason: &str) -> Owed {
        Owed {
            key: key.into(),
            scope: None,
            record: "{}".into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn settling_what_was_never_owed_writes_nothing() {
        let row = OwedRow {
            key: "booking:A".into(),
            scope: None,
            record: "{}".into(),
            reason: "r".into(),
            since: "t".into(),
            attempts: 1,
            updated_at: "t".into(),
        };
        let mut b = OwedBook::new(&[row]);
        b.settle("booking:B");
        assert!(!b.has_changes());
        b.settle("booking:A");
        assert!(b.is_empty());
        b.owe(owed("booking:C", "once"));
        b.owe(owed("booking:C", "twice"));
        b.owe(owed("booking:D", "x"));
        b.settle("booking:D");
        let mut c = PageCommit::default();
        b.commit_into(&mut c);
        assert_eq!(c.settled, vec!["booking:A", "booking:D"]);
        assert_eq!(c.owed, vec![owed("booking:C", "twice")]);
        assert_eq!(b.len(), 1);
        assert!(!b.has_changes());
    }
}
