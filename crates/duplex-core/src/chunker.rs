//! Sentence chunker: turns an LLM token stream into speakable chunks for TTS, as early as
//! possible without cutting a sentence in the wrong place.
//!
//! The time to first audio is what a caller notices most, so the first chunk of a stream may
//! end at a clause boundary; later chunks end at sentence ends, where TTS prosody is natural.
//!
//! # Rules
//!
//! A chunk ends:
//! - after a sentence end `.` `!` `?` `…` (a run like `?!` or `...` counts as one), optionally
//!   followed by closing quotes, brackets or markdown emphasis, once the next character is
//!   whitespace and the next non-whitespace character is not lowercase (a sentence never
//!   starts lowercase: `etc. and`, `... maybe`, `"Hi!" she said` stay together). A lone `.` never
//!   ends a chunk after an abbreviation of [`ABBREVIATIONS`] (`Dr.`, `e.g.`, `p.m.`, `U.S.`),
//!   after a single capital initial (`J. Smith`), or after a list number that starts the chunk
//!   (`1. Open`). Numbers, versions, URLs and emails (`3.14`, `v2.0`, `x@y.org`) never have
//!   whitespace right after their dots, so they are never cut;
//! - after a CJK sentence end `。` `！` `？` (plus closers): CJK text has no spaces to wait for;
//! - before a newline that starts a paragraph (`\n\n`), a list item (`- `, `* `, `+ `, `• `,
//!   `1. `, `1) `) or a markdown heading (`#`); any other newline is a space;
//! - for the first chunk of a stream only, once it is at least [`ChunkerConfig::min_chars`]
//!   long: after a clause boundary `,` `;` `:` followed by whitespace, a spaced dash ` — ` or
//!   ` – `, or a fullwidth `，` `；` `：`;
//! - for the first chunk only, when its caller finds it slow to come
//!   ([`SentenceChunker::cut_first_at_word`]): at the last whitespace so far, once at least
//!   `min_chars` long (the only rule that depends on timing, hence the caller's call);
//! - if none of the above happens within [`ChunkerConfig::max_chars`]: at the last whitespace
//!   that keeps the chunk within the limit, or exactly at the limit if there is none.
//!
//! Every decision looks at a bounded window of text and, while that window is still
//! incomplete, waits for more input. That is why the output does not depend on how the stream
//! is split into deltas, and also why a chunk is emitted one token after its sentence end.
//!
//! Chunks are cleaned for speech: `*` and `` ` `` are removed (bold, italics, bullets, code),
//! as are leading `#` of headings and leading `- ` / `+ ` / `• ` list markers; whitespace runs
//! become one space and the ends are trimmed. Numbered list markers are kept (they are words
//! when spoken). A chunk with no letter or digit left (`**`, `---`, `...`) is dropped.
//! Lengths are counted in `char`s of the raw text, markdown included.

/// Abbreviations (lowercase, without their final `.`) after which a `.` never ends a chunk,
/// because what follows is usually capitalised (`Dr. Smith`, `3 p.m. Eastern`).
/// Abbreviations usually followed by lowercase (`etc.`, `approx.`) need no entry: the
/// lowercase rule already keeps them.
pub const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "e.g", "i.e", "a.m", "p.m", "u.s",
    "u.k",
];

/// Tunables of [`SentenceChunker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkerConfig {
    /// The first chunk may end at a clause boundary once it has at least this many chars.
    pub min_chars: usize,
    /// A chunk without a natural end is split at the last whitespace within this many chars.
    /// At least 1 (a value of 0 is treated as 1).
    pub max_chars: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self {
            // About 1.5 s of speech at ~14 chars/s: enough words for TTS to find a natural
            // intonation, few enough that a long first sentence does not delay the first audio.
            min_chars: 20,
            // About 15 s of speech: two or three ordinary sentences. Only a run-on sentence
            // (or a list without punctuation) gets this long; splitting it bounds how long
            // the caller waits for the next audio and the size of one TTS request.
            max_chars: 220,
        }
    }
}

/// Splits a stream of text deltas into speakable chunks. One stream per assistant turn:
/// [`push`](Self::push) the deltas, then [`finish`](Self::finish), which also makes the
/// chunker ready for the next stream.
#[derive(Debug, Clone)]
pub struct SentenceChunker {
    cfg: ChunkerConfig,
    /// Text received and not yet emitted; leading whitespace is dropped before each scan.
    buf: String,
    /// No chunk of this stream has been emitted yet (clause boundaries are allowed).
    first: bool,
}

/// What a scan of the buffer decided.
enum Scan {
    /// Emit the first `n` chars as a chunk.
    Cut(usize),
    /// No chunk can be decided before more text arrives.
    Wait,
}

/// What a candidate boundary starting at one char decided.
enum Decision {
    /// A chunk ends after this many chars.
    Cut(usize),
    /// Not a boundary.
    No,
    /// Depends on text that has not arrived yet.
    Unknown,
}

impl SentenceChunker {
    pub fn new(mut cfg: ChunkerConfig) -> Self {
        // A zero limit would cut empty chunks forever.
        cfg.max_chars = cfg.max_chars.max(1);
        Self {
            cfg,
            buf: String::new(),
            first: true,
        }
    }

    /// Appends `delta` and pushes every chunk that is now complete onto `out`.
    pub fn push(&mut self, delta: &str, out: &mut Vec<String>) {
        self.buf.push_str(delta);
        loop {
            let leading = self.buf.len() - self.buf.trim_start().len();
            self.buf.drain(..leading);
            let chars: Vec<char> = self.buf.chars().collect();
            match self.scan(&chars) {
                Scan::Wait => return,
                Scan::Cut(n) => {
                    let bytes: usize = chars[..n].iter().map(|c| c.len_utf8()).sum();
                    let chunk: String = self.buf.drain(..bytes).collect();
                    self.emit(&chunk, out);
                }
            }
        }
    }

    /// Ends the first chunk early, at the last word boundary of the text received so far:
    /// if no chunk of this stream was emitted yet and the text up to its last whitespace has
    /// at least [`ChunkerConfig::min_chars`] chars, pushes it onto `out` (the word still being
    /// written stays for the next chunk) and returns true.
    ///
    /// For a caller that knows the first chunk is slow to come (the conversation core calls it
    /// once the first text is [`first_chunk_wait`](crate::conversation::ConversationConfig::first_chunk_wait)
    /// old): an LLM writing a long first sentence slowly keeps the user waiting for audio, and
    /// a sentence spoken in two pieces is better than silence. Later chunks still end at
    /// sentence ends.
    pub fn cut_first_at_word(&mut self, out: &mut Vec<String>) -> bool {
        if !self.first {
            return false;
        }
        // Word boundaries after `min_chars`, the last one preferred unless the chunk would
        // end on a word that leans on the next one (`... dish is the` / `Margarita.`).
        let cuts: Vec<usize> = self
            .buf
            .char_indices()
            .enumerate()
            .filter(|&(chars, (_, ch))| ch.is_whitespace() && chars >= self.cfg.min_chars)
            .map(|(_, (byte, _))| byte)
            .collect();
        let Some(&last) = cuts.last() else {
            return false;
        };
        let cut = cuts
            .iter()
            .rev()
            .copied()
            .find(|&at| !ends_on_a_leaning_word(&self.buf[..at]))
            .unwrap_or(last);
        let chunk: String = self.buf.drain(..cut).collect();
        let before = out.len();
        self.emit(&chunk, out);
        out.len() > before
    }

    /// Ends the stream: pushes what remains (cleaned, if anything is left to speak) onto `out`
    /// and resets the chunker for the next stream.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        let rest = std::mem::take(&mut self.buf);
        self.emit(&rest, out);
        self.first = true;
    }

    fn emit(&mut self, raw: &str, out: &mut Vec<String>) {
        let chunk = clean(raw);
        if chunk.chars().any(char::is_alphanumeric) {
            out.push(chunk);
            self.first = false;
        }
    }

    /// Finds where the chunk at the start of `c` ends. `c[0]` is not whitespace.
    ///
    /// The answer depends only on text that is present: a `Cut` found on a prefix of the
    /// stream is the `Cut` found on any longer prefix.
    fn scan(&self, c: &[char]) -> Scan {
        let max = self.cfg.max_chars;
        let mut i = 0;
        while i < c.len() {
            if i > max {
                // Every candidate that could end within `max` chars was rejected.
                return Scan::Cut(forced_cut(c, max));
            }
            let (decision, next) = self.candidate(c, i);
            match decision {
                Decision::Cut(end) if end <= max => return Scan::Cut(end),
                Decision::Cut(_) => return Scan::Cut(forced_cut(c, max)),
                Decision::Unknown => return Scan::Wait,
                Decision::No => i = next,
            }
        }
        if c.len() > max {
            Scan::Cut(forced_cut(c, max))
        } else {
            Scan::Wait
        }
    }

    /// Decides whether a chunk boundary starts at `c[i]`; also returns where to look next
    /// (past a run of sentence-end characters, which is judged as a whole).
    fn candidate(&self, c: &[char], i: usize) -> (Decision, usize) {
        match c[i] {
            '\n' => (newline(c, i), i + 1),
            ch if is_sentence_end(ch) => sentence_end(c, i),
            ',' | ';' | ':' if self.first => (self.clause(c, i), i + 1),
            '—' | '–' if self.first && i > 0 && c[i - 1].is_whitespace() => {
                (self.clause(c, i), i + 1)
            }
            '，' | '；' | '：' if self.first && i + 1 >= self.cfg.min_chars => {
                (Decision::Cut(i + 1), i + 1)
            }
            _ => (Decision::No, i + 1),
        }
    }

    /// A clause boundary of the first chunk at `c[i]`: needs `min_chars` and a following space.
    fn clause(&self, c: &[char], i: usize) -> Decision {
        let end = i + 1;
        if end < self.cfg.min_chars {
            Decision::No
        } else if end == c.len() {
            Decision::Unknown
        } else if c[end].is_whitespace() {
            Decision::Cut(end)
        } else {
            Decision::No
        }
    }
}

fn is_sentence_end(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…') || is_cjk_sentence_end(c)
}

fn is_cjk_sentence_end(c: char) -> bool {
    matches!(c, '。' | '！' | '？')
}

/// Characters that may follow a sentence end and still belong to its sentence.
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '”' | '’' | ')' | ']' | '}' | '»' | '」' | '』' | '）' | '】' | '*' | '`'
    )
}

/// A run of sentence-end characters starting at `c[i]`.
fn sentence_end(c: &[char], i: usize) -> (Decision, usize) {
    let len = c.len();
    let mut run_end = i;
    while run_end < len && is_sentence_end(c[run_end]) {
        run_end += 1;
    }
    let mut j = run_end;
    while j < len && is_closer(c[j]) {
        j += 1;
    }
    if j == len {
        // More dots, closers or the deciding character may still come.
        return (Decision::Unknown, j);
    }
    let run = &c[i..run_end];
    if run.iter().any(|&ch| is_cjk_sentence_end(ch)) {
        return (Decision::Cut(j), j);
    }
    if !c[j].is_whitespace() {
        // `3.14`, `v2.0`, `example.com/x`, `x@y.org`, `e.g.` (the first dot), `?!x`.
        return (Decision::No, j);
    }
    let Some(k) = (j..len).find(|&k| !c[k].is_whitespace()) else {
        return (Decision::Unknown, j);
    };
    if c[k].is_lowercase() || (run == ['.'] && is_abbreviation(c, i)) {
        return (Decision::No, j);
    }
    (Decision::Cut(j), j)
}

/// Whether the lone `.` at `c[dot]` ends an abbreviation, an initial or a leading list number.
fn is_abbreviation(c: &[char], dot: usize) -> bool {
    let word_start = (0..dot)
        .rev()
        .find(|&k| c[k].is_whitespace())
        .map_or(0, |k| k + 1);
    let word = &c[word_start..dot];
    let word = match word
        .iter()
        .position(|&ch| !matches!(ch, '(' | '[' | '"' | '\'' | '“' | '‘' | '«' | '*'))
    {
        Some(p) => &word[p..],
        None => return false,
    };
    if let [initial] = word
        && initial.is_uppercase()
    {
        // `J. Smith`, `U. S.`
        return true;
    }
    if word_start == 0 && word.iter().all(char::is_ascii_digit) {
        // `1. Open the app`: the chunk so far is only the list number.
        return true;
    }
    let lower: String = word.iter().flat_map(|ch| ch.to_lowercase()).collect();
    ABBREVIATIONS.contains(&lower.as_str())
}

/// A newline at `c[i]` ends the chunk before it if it starts a paragraph, list item or heading.
fn newline(c: &[char], i: usize) -> Decision {
    let len = c.len();
    let Some(j) = (i + 1..len).find(|&j| !matches!(c[j], ' ' | '\t' | '\r')) else {
        return Decision::Unknown;
    };
    let followed_by_space = |k: usize| match c.get(k) {
        None => Decision::Unknown,
        Some(' ') => Decision::Cut(i),
        Some(_) => Decision::No,
    };
    match c[j] {
        '\n' | '#' => Decision::Cut(i),
        '-' | '*' | '+' | '•' => followed_by_space(j + 1),
        d if d.is_ascii_digit() => {
            let Some(k) = (j..len).find(|&k| !c[k].is_ascii_digit()) else {
                return Decision::Unknown;
            };
            if matches!(c[k], '.' | ')') {
                followed_by_space(k + 1)
            } else {
                Decision::No
            }
        }
        _ => Decision::No,
    }
}

/// English words that lean on the word after them (articles, prepositions, conjunctions,
/// auxiliaries, possessives): a first chunk cut early does not end on one of them if an
/// earlier word boundary will do.
const LEANING_WORDS: &[&str] = &[
    "a", "an", "the", "of", "to", "in", "on", "at", "for", "with", "from", "by", "about", "as",
    "into", "and", "or", "but", "nor", "so", "if", "than", "that", "is", "are", "was", "were",
    "be", "been", "am", "will", "would", "can", "could", "should", "may", "might", "must", "has",
    "have", "had", "do", "does", "did", "my", "your", "his", "her", "its", "our", "their", "this",
    "these", "those", "some", "very", "not", "i", "you", "we", "they", "he", "she", "it",
];

/// Whether `text` ends on one of [`LEANING_WORDS`] (any case).
fn ends_on_a_leaning_word(text: &str) -> bool {
    let word = text.split_whitespace().last().unwrap_or("");
    let word = word.trim_matches(|c: char| !c.is_alphanumeric());
    let lower = word.to_lowercase();
    !word.is_empty() && LEANING_WORDS.contains(&lower.as_str())
}

/// Where to cut a chunk that found no natural end within `max` chars; `c.len() > max`.
fn forced_cut(c: &[char], max: usize) -> usize {
    // `c[0]` is not whitespace, so a whitespace found here leaves a non-empty chunk.
    (1..=max)
        .rev()
        .find(|&w| c[w].is_whitespace())
        .unwrap_or(max)
}

/// Removes markdown that would otherwise be spoken and normalises whitespace.
fn clean(raw: &str) -> String {
    let mut words = String::new();
    for line in raw.lines() {
        let line = line.trim_start().trim_start_matches('#').trim_start();
        let line = ["- ", "+ ", "• ", "* "]
            .iter()
            .find_map(|marker| line.strip_prefix(marker))
            .unwrap_or(line);
        words.extend(line.chars().filter(|&ch| ch != '*' && ch != '`'));
        words.push(' ');
    }
    words.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    /// Runs `input` through a chunker fed whole, char by char and in pseudo-random pieces,
    /// asserts that all feeds agree, and prints one chunk per line; chunks that only came out
    /// of `finish` are marked.
    fn run(cfg: &ChunkerConfig, input: &str) -> String {
        let whole = feed(cfg, &[input]);
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let by_char = feed(cfg, &chars.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(by_char, whole, "char by char differs for {input:?}");
        for seed in 0..20 {
            let pieces = random_pieces(input, seed);
            let split = feed(cfg, &pieces);
            assert_eq!(split, whole, "pieces {pieces:?} differ for {input:?}");
        }
        whole
    }

    fn feed(cfg: &ChunkerConfig, deltas: &[&str]) -> String {
        let mut chunker = SentenceChunker::new(cfg.clone());
        let mut pushed = Vec::new();
        for delta in deltas {
            chunker.push(delta, &mut pushed);
        }
        let mut finished = Vec::new();
        chunker.finish(&mut finished);
        let mut printed = String::new();
        for chunk in &pushed {
            assert!(
                !chunk.is_empty() && chunk.trim() == chunk,
                "untrimmed {chunk:?}"
            );
            printed += &format!("[{chunk}]\n");
        }
        for chunk in &finished {
            printed += &format!("[{chunk}] (finish)\n");
        }
        printed
    }

    /// Splits `s` at char boundaries into pieces of 1..=8 chars chosen by an LCG.
    fn random_pieces(s: &str, seed: u64) -> Vec<&str> {
        // Knuth's MMIX LCG constants: a full-period generator, good enough to pick sizes.
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        let mut pieces = Vec::new();
        let mut at = 0; // index into `bounds`
        while at + 1 < bounds.len() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let size = 1 + (state >> 33) as usize % 8;
            let next = (at + size).min(bounds.len() - 1);
            pieces.push(&s[bounds[at]..bounds[next]]);
            at = next;
        }
        pieces
    }

    fn check(input: &str, expect: Expect) {
        expect.assert_eq(&run(&ChunkerConfig::default(), input));
    }

    fn check_with(min_chars: usize, max_chars: usize, input: &str, expect: Expect) {
        let cfg = ChunkerConfig {
            min_chars,
            max_chars,
        };
        expect.assert_eq(&run(&cfg, input));
    }

    #[test]
    fn sentences() {
        check(
            "Hello there. How are you? I'm fine! Thanks.",
            expect![[r#"
                [Hello there.]
                [How are you?]
                [I'm fine!]
                [Thanks.] (finish)
            "#]],
        );
        // Runs of sentence ends count as one; `?!` is not cut in the middle.
        check(
            "Really?! No way!!! Okay.",
            expect![[r#"
            [Really?!]
            [No way!!!]
            [Okay.] (finish)
        "#]],
        );
    }

    #[test]
    fn abbreviations() {
        check(
            "Dr. Smith met Mr. and Mrs. Jones on Main St. Yesterday they argued, vs. today.",
            expect![[r#"
                [Dr. Smith met Mr. and Mrs. Jones on Main St. Yesterday they argued,]
                [vs. today.] (finish)
            "#]],
        );
        check(
            "Bring fruit, e.g. apples, i.e. something sweet. Ms. Lee agrees. J. R. R. Tolkien wrote it. I agree.",
            expect![[r#"
                [Bring fruit, e.g. apples,]
                [i.e. something sweet.]
                [Ms. Lee agrees.]
                [J. R. R. Tolkien wrote it.]
                [I agree.] (finish)
            "#]],
        );
        // `etc.` ends a sentence only when a capital follows.
        check(
            "We packed tents, stoves, etc. and left. We packed tents, stoves, etc. Then we left.",
            expect![[r#"
                [We packed tents, stoves,]
                [etc. and left.]
                [We packed tents, stoves, etc.]
                [Then we left.] (finish)
            "#]],
        );
        check(
            "She moved to the U.S. Army base. Then to the U.K. Navy. Done.",
            expect![[r#"
                [She moved to the U.S. Army base.]
                [Then to the U.K. Navy.]
                [Done.] (finish)
            "#]],
        );
    }

    #[test]
    fn numbers() {
        check(
            "Pi is 3.14159 roughly. It costs $3.50. That is 1,000 times more. I have 3. Okay.",
            expect![[r#"
                [Pi is 3.14159 roughly.]
                [It costs $3.50.]
                [That is 1,000 times more.]
                [I have 3.]
                [Okay.] (finish)
            "#]],
        );
        check(
            "Update to v2.0.1 now. Version 10.4 is out. The score was 3.5.",
            expect![[r#"
                [Update to v2.0.1 now.]
                [Version 10.4 is out.]
                [The score was 3.5.] (finish)
            "#]],
        );
        // A number split across deltas: `3.` must wait for the next char.
        check(
            "It is 3.5 now. Really",
            expect![[r#"
            [It is 3.5 now.]
            [Really] (finish)
        "#]],
        );
    }

    #[test]
    fn times() {
        check(
            "The store opens at 9 a.m. and closes at 5 p.m. on weekdays. We meet at 3 p.m. Bring snacks.",
            expect![[r#"
                [The store opens at 9 a.m. and closes at 5 p.m. on weekdays.]
                [We meet at 3 p.m. Bring snacks.] (finish)
            "#]],
        );
    }

    #[test]
    fn urls_and_emails() {
        check(
            "Go to example.com/path?q=1 for details. Mail x@y.org today. Visit example.com. Then call.",
            expect![[r#"
                [Go to example.com/path?q=1 for details.]
                [Mail x@y.org today.]
                [Visit example.com.]
                [Then call.] (finish)
            "#]],
        );
        check(
            "See https://docs.rs/tokio/1.0/tokio. It helps.",
            expect![[r#"
                [See https://docs.rs/tokio/1.0/tokio.]
                [It helps.] (finish)
            "#]],
        );
    }

    #[test]
    fn ellipsis() {
        check(
            "Well... maybe not. Wait... What was that? Hmm… okay. Fine… Go.",
            expect![[r#"
                [Well... maybe not.]
                [Wait...]
                [What was that?]
                [Hmm… okay.]
                [Fine…]
                [Go.] (finish)
            "#]],
        );
    }

    #[test]
    fn quotes_and_brackets_after_a_sentence_end() {
        check(
            r#"He said "hi." Then he left. (It was late.) She asked "why?" and "Really?" she said. 'Fine.' Done."#,
            expect![[r#"
                [He said "hi."]
                [Then he left.]
                [(It was late.)]
                [She asked "why?" and "Really?" she said.]
                ['Fine.']
                [Done.] (finish)
            "#]],
        );
        check(
            "“Hello.” ‘Bye.’ «Ciao.» End.",
            expect![[r#"
            [“Hello.”]
            [‘Bye.’]
            [«Ciao.»]
            [End.] (finish)
        "#]],
        );
    }

    #[test]
    fn a_slow_first_chunk_is_cut_at_its_last_word_boundary() {
        let mut chunker = SentenceChunker::new(ChunkerConfig::default());
        let mut out = Vec::new();
        // Too short: nothing to cut (`min_chars` is 20).
        chunker.push("The Moon is", &mut out);
        assert!(!chunker.cut_first_at_word(&mut out));
        // The word being written (`384,4`) stays; the cut needs 20 chars before it.
        chunker.push(" approximately 384,4", &mut out);
        assert!(out.is_empty());
        assert!(chunker.cut_first_at_word(&mut out));
        assert_eq!(out, ["The Moon is approximately"]);
        // Only the first chunk is cut early; the rest ends at its sentence end.
        chunker.push("00 kilometers away, on average, from", &mut out);
        assert!(!chunker.cut_first_at_word(&mut out));
        chunker.push(" Earth. It", &mut out);
        chunker.finish(&mut out);
        assert_eq!(
            out,
            [
                "The Moon is approximately",
                "384,400 kilometers away, on average, from Earth.",
                "It"
            ]
        );
        // A new stream may be cut again; markdown is cleaned as in any chunk. The cut does
        // not end on a word leaning on the next one (`of`, `the`) when an earlier one will do.
        chunker.push("**Paris** is the capital of", &mut out);
        assert!(chunker.cut_first_at_word(&mut out));
        assert_eq!(out.last().unwrap(), "Paris is the capital");
        chunker.finish(&mut out);
        chunker.push(
            "A simple recipe for a classic French dish is the Marg",
            &mut out,
        );
        assert!(chunker.cut_first_at_word(&mut out));
        assert_eq!(
            out.last().unwrap(),
            "A simple recipe for a classic French dish"
        );
        chunker.finish(&mut out);
        // ... but when every boundary ends on one, the last one is taken.
        chunker.push("Ask your doctor about the wor", &mut out);
        assert!(chunker.cut_first_at_word(&mut out));
        assert_eq!(out.last().unwrap(), "Ask your doctor about the");
        // A first chunk that already ended leaves nothing to cut.
        let mut chunker = SentenceChunker::new(ChunkerConfig::default());
        let mut out = Vec::new();
        chunker.push("Sure! Here is a recipe you could try", &mut out);
        assert_eq!(out, ["Sure!"]);
        assert!(!chunker.cut_first_at_word(&mut out));
    }

    #[test]
    fn first_chunk_may_end_at_a_clause() {
        // The first clause reaching `min_chars` (20) ends the first chunk; later ones do not.
        check(
            "Well, I looked into it carefully, and the answer is yes, mostly, with caveats: see below. Also, later.",
            expect![[r#"
                [Well, I looked into it carefully,]
                [and the answer is yes, mostly, with caveats: see below.]
                [Also, later.] (finish)
            "#]],
        );
        check(
            "The answer is simple; we wait. Then: nothing.",
            expect![[r#"
                [The answer is simple;]
                [we wait.]
                [Then: nothing.] (finish)
            "#]],
        );
        check(
            "I thought about it for a while — and then I decided. Good.",
            expect![[r#"
                [I thought about it for a while —]
                [and then I decided.]
                [Good.] (finish)
            "#]],
        );
        // Clause marks inside numbers and times are not boundaries.
        check(
            "The population is 1,000,000 at 10:30 today, roughly. Yes.",
            expect![[r#"
                [The population is 1,000,000 at 10:30 today,]
                [roughly.]
                [Yes.] (finish)
            "#]],
        );
        // Too short: no clause split.
        check(
            "Yes, sure, of course. Done.",
            expect![[r#"
            [Yes, sure, of course.]
            [Done.] (finish)
        "#]],
        );
        // A new stream after `finish` may split at a clause again: see `finish_resets_for_the_next_stream`.
    }

    #[test]
    fn max_chars_fallback() {
        check_with(
            20,
            40,
            "this is a long run-on sentence without any punctuation that goes on and on and on because the model forgot to stop",
            expect![[r#"
                [this is a long run-on sentence without]
                [any punctuation that goes on and on and]
                [on because the model forgot to stop] (finish)
            "#]],
        );
        // No whitespace at all: hard split at the limit.
        check_with(
            5,
            10,
            "abcdefghijklmnopqrstuvwxyz",
            expect![[r#"
            [abcdefghij]
            [klmnopqrst]
            [uvwxyz] (finish)
        "#]],
        );
        // A sentence end exactly at the limit is still a natural end.
        check_with(
            5,
            10,
            "Short one. Another.",
            expect![[r#"
            [Short one.]
            [Another.] (finish)
        "#]],
        );
        check_with(
            5,
            9,
            "Short one. Another.",
            expect![[r#"
            [Short]
            [one.]
            [Another.] (finish)
        "#]],
        );
    }

    #[test]
    fn lists_and_paragraphs() {
        check(
            "Here are the steps:\n1. Open the app.\n2. Tap save\n3) Done\n\nAnything else",
            expect![[r#"
                [Here are the steps:]
                [1. Open the app.]
                [2. Tap save]
                [3) Done]
                [Anything else] (finish)
            "#]],
        );
        check(
            "You will need\n- flour\n- two eggs\n* milk\n+ salt\n• sugar\nthat is all",
            expect![[r#"
                [You will need]
                [flour]
                [two eggs]
                [milk]
                [salt]
                [sugar that is all] (finish)
            "#]],
        );
        // A newline that starts no list item or paragraph is a space.
        check(
            "This line wraps\nin the middle of a sentence. Next.",
            expect![[r#"
                [This line wraps in the middle of a sentence.]
                [Next.] (finish)
            "#]],
        );
        check(
            "First paragraph\n\nSecond paragraph",
            expect![[r#"
            [First paragraph]
            [Second paragraph] (finish)
        "#]],
        );
        check(
            "Windows line ends\r\n\r\nwork too",
            expect![[r#"
            [Windows line ends]
            [work too] (finish)
        "#]],
        );
    }

    #[test]
    fn markdown_is_stripped() {
        check(
            "# Title\n\nThis is **very** important and *subtle*. Run `cargo test` now.\n## Next\n- **Bold item.** More text.",
            expect![[r#"
                [Title]
                [This is very important and subtle.]
                [Run cargo test now.]
                [Next]
                [Bold item.]
                [More text.] (finish)
            "#]],
        );
        // Nothing speakable left: dropped.
        check("**\n\n---\n\n...", expect![[r#""#]]);
        // `#` inside a word and numbers stay.
        check(
            "I like C# a lot. Item #5 is sold.",
            expect![[r#"
            [I like C# a lot.]
            [Item #5 is sold.] (finish)
        "#]],
        );
    }

    #[test]
    fn non_english() {
        check(
            "你好。今天天气很好！你呢？好的",
            expect![[r#"
            [你好。]
            [今天天气很好！]
            [你呢？]
            [好的] (finish)
        "#]],
        );
        check(
            "「こんにちは。」と言った。それで終わり",
            expect![[r#"
                [「こんにちは。」]
                [と言った。]
                [それで終わり] (finish)
            "#]],
        );
        check(
            "我们今天讨论了很多问题，包括天气、交通和工作，还有别的。好",
            expect![[r#"
                [我们今天讨论了很多问题，包括天气、交通和工作，]
                [还有别的。]
                [好] (finish)
            "#]],
        );
        check(
            "¿Cómo estás? Muy bien. Ça va? Très bien. Ünter uns.",
            expect![[r#"
                [¿Cómo estás?]
                [Muy bien.]
                [Ça va?]
                [Très bien.]
                [Ünter uns.] (finish)
            "#]],
        );
    }

    #[test]
    fn empty_and_whitespace() {
        check("", expect![[r#""#]]);
        check("   \n\n \t ", expect![[r#""#]]);
        check(
            "  Hi.  ",
            expect![[r#"
            [Hi.] (finish)
        "#]],
        );
    }

    #[test]
    fn finish_resets_for_the_next_stream() {
        let mut chunker = SentenceChunker::new(ChunkerConfig::default());
        let mut out = Vec::new();
        // The clause split of the first chunk must happen in both streams.
        let text = "After a lot of thought, the plan works. Later, we go.";
        chunker.push(text, &mut out);
        chunker.finish(&mut out);
        chunker.push(text, &mut out);
        chunker.finish(&mut out);
        expect![[r#"
            [
                "After a lot of thought,",
                "the plan works.",
                "Later, we go.",
                "After a lot of thought,",
                "the plan works.",
                "Later, we go.",
            ]
        "#]]
        .assert_debug_eq(&out);
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: any text, split into any deltas, gives speakable chunks (each with a
    //! letter or digit) that together say every letter and digit of the text, in order
    //! (markup, spacing and unspeakable pieces may go), and never a panic.

    use super::*;
    use proptest::prelude::*;

    fn speakable(s: &str) -> String {
        s.chars().filter(|c| c.is_alphanumeric()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn chunks_keep_every_word(
            text in "([A-Za-z0-9]{1,8}|[ .,;:!?\n'\"()/-]|https?://[a-z.]{1,12}|[0-9]\\.[0-9]|Dr\\.|e\\.g\\.|\\PC){0,80}",
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            early in prop::option::of(0usize..13),
        ) {
            // Cut at character boundaries only: deltas are strings.
            let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let mut at: Vec<usize> = cuts
                .iter()
                .filter(|_| !bounds.is_empty())
                .map(|c| bounds[c.index(bounds.len())])
                .collect();
            at.sort_unstable();
            at.dedup();
            let mut chunker = SentenceChunker::new(ChunkerConfig::default());
            let mut out = Vec::new();
            let mut from = 0;
            for (k, &cut) in at.iter().chain(std::iter::once(&text.len())).enumerate() {
                chunker.push(&text[from..cut], &mut out);
                if early == Some(k) {
                    chunker.cut_first_at_word(&mut out);
                }
                from = cut;
            }
            chunker.finish(&mut out);
            for c in &out {
                prop_assert!(c.chars().any(char::is_alphanumeric), "unspeakable chunk in {out:?}");
            }
            let said: String = out.iter().map(|c| speakable(c)).collect();
            prop_assert_eq!(said, speakable(&text));
        }
    }
}
