//! One configuration problem seen as many refused records. When the target refuses every
//! write of one kind in a page (every create, or every update), at least [`MIN_SAME`] of
//! them, all for the same reason, the cause is the stream's configuration (a default site, a
//! custom field, a unit the target does not have), not that many bad records: the run
//! stops before the page's commit with that reason and the cursor stays where it was,
//! instead of setting the history aside record by record (issue 19, item 5). One accepted
//! write of the kind, or two different reasons, and the refusals are the records' own.
//!
//! Pure: the streams report what the target said; this decides.

use std::collections::BTreeMap;

/// The fewest refusals of one kind, with one reason and no acceptance, taken for a
/// configuration problem. Fewer are treated as the records' own problems (a page of three
/// users with the same bad e-mail domain is possible; five with none accepted is not a
/// coincidence worth setting aside).
pub const MIN_SAME: u64 = 5;

/// What a stream with a cursor says it did with the records.
pub const KEPT_BEFORE_CURSOR: &str = "nothing was set aside and the cursor stays before this page";

#[derive(Debug, Default)]
pub struct Refusals {
    /// Per write kind ("create", "update", …): accepted count, and refusals per reason.
    kinds: BTreeMap<&'static str, (u64, BTreeMap<String, u64>)>,
}

/// A reason without what differs from record to record in the vendor's wording: Halo's
/// "element N: " (wherever it stands).
pub fn normalize(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason.trim();
    while let Some(at) = rest.find("element ") {
        let after = &rest[at + "element ".len()..];
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(':') {
            out.push_str(&rest[..at]);
            rest = after[digits + 1..].trim_start();
        } else {
            out.push_str(&rest[..at + "element ".len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

impl Refusals {
    pub fn accepted(&mut self, kind: &'static str) {
        self.kinds.entry(kind).or_default().0 += 1;
    }

    pub fn refused(&mut self, kind: &'static str, reason: &str) {
        *self
            .kinds
            .entry(kind)
            .or_default()
            .1
            .entry(normalize(reason))
            .or_default() += 1;
    }

    /// The kind, the reason and how many, when one kind's writes were all refused for one
    /// reason, at least [`MIN_SAME`] times.
    pub fn one_cause(&self) -> Option<(&'static str, String, u64)> {
        self.kinds.iter().find_map(|(kind, (accepted, reasons))| {
            if *accepted > 0 || reasons.len() != 1 {
                return None;
            }
            let (reason, n) = reasons.iter().next()?;
            (*n >= MIN_SAME).then(|| (*kind, reason.clone(), *n))
        })
    }

    /// The message a run fails with when [`Refusals::one_cause`] says so; `kept` says what
    /// became of the records (e.g. "nothing was set aside and the cursor stays before this
    /// page").
    pub fn message(&self, target: &str, what: &str, kept: &str) -> Option<String> {
        let (kind, reason, n) = self.one_cause()?;
        Some(format!(
            "{target} refused every {kind} of this page ({n} {what}) for the same reason: {reason}. \
             That is the stream's configuration (a site, field, unit or mapping the target does not \
             have), not {n} bad records: {kept}; fix the configuration (`usher validate --online` \
             checks it) and the next run goes on"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_create_refused_for_one_reason_is_a_configuration_problem() {
        let mut r = Refusals::default();
        for i in 0..6 {
            r.refused("create", &format!("element {i}: unknown site_id 99"));
        }
        r.accepted("update");
        assert_eq!(
            r.one_cause(),
            Some(("create", "unknown site_id 99".to_string(), 6))
        );
        assert_eq!(
            normalize("Halo refused the user: element 12: unknown custom field X"),
            "Halo refused the user: unknown custom field X"
        );
        assert_eq!(normalize("element x: y"), "element x: y");
        assert!(
            r.message("Halo", "users", "kept")
                .unwrap()
                .contains("unknown site_id 99")
        );
    }

    #[test]
    fn one_accepted_write_or_two_reasons_or_few_refusals_are_the_records_own() {
        let mut r = Refusals::default();
        for _ in 0..6 {
            r.refused("create", "bad e-mail");
        }
        r.accepted("create");
        assert_eq!(r.one_cause(), None);
        let mut r = Refusals::default();
        for _ in 0..6 {
            r.refused("create", "bad e-mail");
        }
        r.refused("create", "name too long");
        assert_eq!(r.one_cause(), None);
        let mut r = Refusals::default();
        for _ in 0..4 {
            r.refused("update", "bad e-mail");
        }
        assert_eq!(r.one_cause(), None);
    }
}
