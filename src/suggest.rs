//! "Did you mean": the nearest of a few known words to a misspelt one, for `validate`'s
//! messages (keys, kinds, transforms, stream and connection names).

/// The known word nearest to `word`, when it is near enough to be a slip of the keyboard:
/// at most a third of the word's letters changed, or one word holding the other (`crm` and
/// `crm-main`). Ties go to the first candidate.
pub fn closest<'a, S: AsRef<str>>(word: &str, known: &'a [S]) -> Option<&'a str> {
    let word_l = word.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        let k = k.as_ref();
        if k == word {
            continue;
        }
        let k_l = k.to_ascii_lowercase();
        let d = strsim::damerau_levenshtein(&word_l, &k_l);
        let near = d <= (word_l.chars().count().max(3) / 3).max(1)
            || (word_l.len() >= 3
                && k_l.len() >= 3
                && (k_l.contains(&word_l) || word_l.contains(&k_l)));
        if near && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

/// `"; did you mean `x`?"`, or nothing.
pub fn did_you_mean<S: AsRef<str>>(word: &str, known: &[S]) -> String {
    match closest(word, known) {
        Some(k) => format!("; did you mean `{k}`?"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_are_suggested_and_strangers_are_not() {
        assert_eq!(closest("crmm", &["crm", "s360", "halo"]), Some("crm"));
        assert_eq!(
            closest("lowercse", &["trim", "lowercase", "uppercase"]),
            Some("lowercase")
        );
        assert_eq!(
            closest("batch_sise", &["batch_size", "id_field"]),
            Some("batch_size")
        );
        assert_eq!(closest("salesforce", &["crm", "s360", "halo"]), None);
        assert_eq!(closest("x", &["crm", "s360"]), None);
        assert_eq!(
            closest("contacts", &["contacts-to-crm", "orders"]),
            Some("contacts-to-crm")
        );
    }
}
