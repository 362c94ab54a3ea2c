//! Word error rate: how far a recognizer's transcript is from the reference text.
//!
//! Words are compared lower-cased, with punctuation dropped (an apostrophe stays part of its
//! word), so "Paris." and "paris" are the same word; "Mr." and "mister" are not.

/// The words of `s` as the comparison sees them.
pub fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// Word-level edit distance (substitutions, insertions, deletions) between the two texts.
pub fn word_errors(reference: &str, hypothesis: &str) -> usize {
    let (r, h) = (words(reference), words(hypothesis));
    let mut row: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, hw) in h.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(rw != hw)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[h.len()]
}

/// Word error rate: word errors over the reference's word count (0 for two empty texts).
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    word_errors(reference, hypothesis) as f64 / words(reference).len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_substitutions_insertions_and_deletions() {
        assert_eq!(wer("the cat sat", "The cat sat."), 0.0);
        assert_eq!(word_errors("the cat sat", "the bat sat"), 1);
        assert_eq!(word_errors("the cat sat", "the cat sat down"), 1);
        assert_eq!(word_errors("the cat sat", "cat sat"), 1);
        assert_eq!(word_errors("the cat sat", ""), 3);
        assert_eq!(wer("a b c d", "a x c"), 0.5);
        assert_eq!(
            words("Don't stop, Mr. Smith!"),
            ["don't", "stop", "mr", "smith"]
        );
    }
}
