//! BERT's uncased WordPiece tokenizer (transformers' `BertTokenizer`, `do_lower_case=True`):
//! clean, space out CJK characters, lower-case, strip accents (NFD, drop `Mn`), split on
//! whitespace and punctuation, then greedy longest-match WordPiece with `##` continuations.
//! The vocabulary is a `vocab.txt` (one piece per line, id = line number).
//!
//! Why it stays beside the `tokenizers` crate (`preprocess::text`, which reads user models'
//! `tokenizer.json`): it is the built-in `spam-names` dataset's tokenizer, and it follows the
//! *slow* `BertTokenizer`. The fast tokenizer differs on 4 of the corpus's 14,054 texts at 64
//! tokens (mails of mis-decoded Korean, where transformers' own slow and fast tokenizers
//! disagree), and that alone changes every trained model and the landed BERT results.

use fsmerge_common::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use unicode_general_category::{get_general_category, GeneralCategory as Gc};
use unicode_normalization::UnicodeNormalization;

/// Words longer than this (in chars) become `[UNK]`, as in transformers.
const MAX_WORD_CHARS: usize = 100;

pub struct WordPiece {
    vocab: HashMap<String, u32>,
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
}

impl WordPiece {
    /// Read `vocab.txt`; it must hold `[PAD]`, `[UNK]`, `[CLS]` and `[SEP]`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_first(path, None)
    }

    /// Read the first `limit` tokens of `vocab.txt` (`data.vocab_size`; None: all of it).
    pub fn load_first(path: &Path, limit: Option<usize>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let vocab: HashMap<String, u32> = text
            .lines()
            .take(limit.unwrap_or(usize::MAX))
            .enumerate()
            .map(|(i, l)| (l.trim_end_matches('\r').to_string(), i as u32))
            .collect();
        let special = |name: &str| {
            vocab.get(name).copied().ok_or_else(|| Error::Data {
                path: path.to_path_buf(),
                msg: match limit {
                    Some(n) => format!(
                        "the vocabulary's first {n} tokens (data.vocab_size) have no `{name}` token"
                    ),
                    None => format!("the vocabulary has no `{name}` token"),
                },
            })
        };
        Ok(Self {
            pad: special("[PAD]")?,
            unk: special("[UNK]")?,
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            vocab,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The word pieces' ids of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for word in basic_tokens(text) {
            self.word_pieces(&word, &mut ids);
        }
        ids
    }

    /// `[CLS] pieces… [SEP]` truncated to `len` (the `[SEP]` kept), then padded with `[PAD]`:
    /// what `tokenizer(text, max_length=len, truncation=True, padding="max_length")` gives.
    pub fn encode(&self, text: &str, len: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let pieces = self.tokenize(text);
        ids.extend(pieces.iter().take(len.saturating_sub(2)));
        ids.push(self.sep);
        ids.truncate(len);
        ids.resize(len, self.pad);
        ids
    }

    fn word_pieces(&self, word: &str, out: &mut Vec<u32>) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_WORD_CHARS {
            out.push(self.unk);
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let found = loop {
                if end == start {
                    break None;
                }
                let sub: String = chars[start..end].iter().collect();
                let key = if start > 0 { format!("##{sub}") } else { sub };
                if let Some(&id) = self.vocab.get(&key) {
                    break Some(id);
                }
                end -= 1;
            };
            match found {
                Some(id) => pieces.push(id),
                None => {
                    out.push(self.unk);
                    return;
                }
            }
            start = end;
        }
        out.extend(pieces);
    }
}

/// BertTokenizer's basic tokenization (lower-casing on): the words and punctuation marks.
fn basic_tokens(text: &str) -> Vec<String> {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    let cleaned: String = cleaned.nfc().collect();
    let mut out = Vec::new();
    for word in cleaned.split(is_whitespace).filter(|w| !w.is_empty()) {
        let lowered: String = word
            .to_lowercase()
            .nfd()
            .filter(|&c| get_general_category(c) != Gc::NonspacingMark)
            .collect();
        let mut current = String::new();
        for c in lowered.chars() {
            if is_punctuation(c) {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                out.push(c.to_string());
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() {
            out.push(current);
        }
    }
    out
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || get_general_category(c) == Gc::SpaceSeparator
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        get_general_category(c),
        Gc::Control | Gc::Format | Gc::Unassigned | Gc::PrivateUse | Gc::Surrogate
    )
}

/// ASCII symbols count as punctuation (as in BERT), and every Unicode `P*` character.
fn is_punctuation(c: char) -> bool {
    if c.is_ascii_punctuation() {
        return true;
    }
    matches!(
        get_general_category(c),
        Gc::ConnectorPunctuation
            | Gc::DashPunctuation
            | Gc::OpenPunctuation
            | Gc::ClosePunctuation
            | Gc::InitialPunctuation
            | Gc::FinalPunctuation
            | Gc::OtherPunctuation
    )
}

/// The CJK ideograph blocks BERT spaces out.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_tokens_split_and_normalize() {
        assert_eq!(
            basic_tokens("Héllo, WORLD!\tdon't\u{200b}  x"),
            ["hello", ",", "world", "!", "don", "'", "t", "x"]
        );
        assert_eq!(basic_tokens("a中b"), ["a", "中", "b"]);
    }
}
