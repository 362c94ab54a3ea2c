//! GPT-2 style byte-level BPE, shared by Whisper (decoding only) and Qwen/SmolLM (both ways).
//!
//! Byte-level vocabularies spell every byte as a printable character (`Ġ` is a space), so a
//! token's text is a string over that alphabet; this module maps between the two and runs the
//! merge loop. Written here rather than pulling in `tokenizers`, whose build costs more than
//! the few dozen lines it would save.

use std::collections::HashMap;

use fancy_regex::Regex;

/// The 256 printable characters GPT-2 uses for the bytes 0..=255.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("byte range is valid unicode")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("256..512 is valid unicode")
        };
    }
    table
}

/// Turns token strings back into bytes and bytes into token strings.
#[derive(Debug, Clone)]
pub struct ByteLevel {
    to_char: [char; 256],
    to_byte: HashMap<char, u8>,
}

impl Default for ByteLevel {
    fn default() -> Self {
        let to_char = byte_to_char_table();
        let to_byte = to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        ByteLevel { to_char, to_byte }
    }
}

impl ByteLevel {
    /// Appends the bytes a token string stands for (characters outside the alphabet, as in
    /// special tokens, are kept as their UTF-8).
    pub fn decode_into(&self, token: &str, out: &mut Vec<u8>) {
        for c in token.chars() {
            match self.to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }

    pub fn encode(&self, text: &str) -> String {
        text.bytes().map(|b| self.to_char[b as usize]).collect()
    }
}

/// The pre-tokenizer split of Qwen2 (and, near enough, of every GPT-4-style vocabulary):
/// contractions, letter runs with one leading non-letter, single digits, punctuation runs,
/// newlines, spaces.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE encoder/decoder over a vocabulary and its merge list.
#[derive(Debug)]
pub struct Bpe {
    bytes: ByteLevel,
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    split: Regex,
    /// Special tokens matched literally in text before BPE (`<|im_start|>` ...).
    specials: Vec<(String, u32)>,
}

impl Bpe {
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        pattern: &str,
        specials: &[&str],
    ) -> Result<Bpe, String> {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let ranks = merges
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let (a, b) = m.split_once(' ')?;
                Some(((a.to_string(), b.to_string()), i as u32))
            })
            .collect();
        let specials = specials
            .iter()
            .filter_map(|s| ids.get(*s).map(|&id| (s.to_string(), id)))
            .collect();
        let split = Regex::new(pattern).map_err(|e| format!("bad pre-tokenizer pattern: {e}"))?;
        Ok(Bpe {
            bytes: ByteLevel::default(),
            tokens,
            ids,
            ranks,
            split,
            specials,
        })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Encodes text, matching special tokens literally.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|pos| (pos, s.len(), *id)))
                .min_by_key(|&(pos, _, _)| pos);
            match next {
                Some((pos, len, id)) => {
                    self.encode_ordinary(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    self.encode_ordinary(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.split.find_iter(text).flatten() {
            let mapped = self.bytes.encode(piece.as_str());
            if let Some(&id) = self.ids.get(&mapped) {
                out.push(id);
                continue;
            }
            self.merge(&mapped, out);
        }
    }

    /// The classic merge loop: repeatedly join the adjacent pair with the lowest rank.
    fn merge(&self, word: &str, out: &mut Vec<u32>) {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let joined = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = joined;
            parts.remove(i + 1);
        }
        for p in parts {
            match self.ids.get(&p) {
                Some(&id) => out.push(id),
                // Every single byte character is in a byte-level vocabulary; a gap would be
                // a broken model file, and skipping the character is the mildest outcome.
                None => tracing::warn!(piece = %p, "BPE piece missing from the vocabulary"),
            }
        }
    }

    /// Appends the bytes of a token (an incomplete UTF-8 sequence may end a token: callers
    /// keep the bytes and decode complete characters only).
    pub fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        if let Some(t) = self.tokens.get(id as usize) {
            self.bytes.decode_into(t, out);
        }
    }
}

/// Collects token bytes and hands out text only up to the last complete UTF-8 character.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            Err(e) if e.error_len().is_none() => {
                // Incomplete sequence at the end: emit the valid prefix, keep the tail.
                let valid = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                s
            }
            Err(_) => {
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }
}
