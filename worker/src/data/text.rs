//! The text data of the BERT and Llama merges (`dataset = "spam-names"`), two different tasks on real text:
//! the SpamAssassin public mail corpus (class 0 ham, 1 spam) and English first names (class 2
//! female, 3 male; names on both lists are dropped). Each text becomes one row of `max_tokens`
//! WordPiece ids (`[CLS] … [SEP]`, `[PAD]` = 0), stored as f32 (exact: ids < 2²⁴) so text rows
//! travel through the same sets, splits and merge data as images.

use crate::data::rows::ImageSet;
use crate::data::wordpiece::WordPiece;
use fsmerge_common::{Error, Result};
use std::collections::HashSet;
use std::path::Path;
use tch::{Kind, Tensor};

/// The dataset's class names, by class id.
pub const CLASSES: [&str; 4] = ["ham", "spam", "female", "male"];

/// Mail folders of the corpus and their class.
const MAIL_GROUPS: [(&str, usize); 5] = [
    ("easy-ham-1", 0),
    ("easy-ham-2", 0),
    ("hard-ham-1", 0),
    ("spam-1", 1),
    ("spam-2", 1),
];

/// Characters of a mail body kept before tokenizing (far more than `max_tokens` pieces).
const BODY_CHARS: usize = 2000;

/// Every text of `dir` (holding `spam-assassin/` and `names/`) as token rows, in a fixed order.
pub fn load(dir: &Path, vocab: &WordPiece, max_tokens: usize) -> Result<ImageSet> {
    let texts = texts(dir)?;
    let mut pixels = Vec::with_capacity(texts.len() * max_tokens);
    let mut labels = Vec::with_capacity(texts.len());
    for (text, class) in texts {
        pixels.extend(
            vocab
                .encode(&text, max_tokens)
                .into_iter()
                .map(|id| id as f32),
        );
        labels.push(class);
    }
    Ok(ImageSet {
        pixels,
        labels,
        dim: max_tokens,
    })
}

/// Every text of `dir` with its class, in a fixed order: the mails (subject and start of the
/// body) folder by folder, then the names.
pub fn texts(dir: &Path) -> Result<Vec<(String, usize)>> {
    let mut texts: Vec<(String, usize)> = Vec::new();
    for (group, class) in MAIL_GROUPS {
        let folder = dir.join("spam-assassin").join(group);
        let mut files: Vec<_> = std::fs::read_dir(&folder)
            .map_err(|e| Error::io(&folder, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Data {
                path: folder,
                msg: "no mails (*.json); run deploy/setup.sh".into(),
            });
        }
        for f in files {
            texts.push((mail_text(&f)?, class));
        }
    }
    let names = |file: &str| -> Result<Vec<String>> {
        let path = dir.join("names").join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    };
    let (female, male) = (names("female.txt")?, names("male.txt")?);
    let lower = |v: &[String]| -> HashSet<String> { v.iter().map(|s| s.to_lowercase()).collect() };
    let both: HashSet<String> = lower(&female)
        .intersection(&lower(&male))
        .cloned()
        .collect();
    for (list, class) in [(female, 2), (male, 3)] {
        for name in list {
            if !both.contains(&name.to_lowercase()) {
                texts.push((name, class));
            }
        }
    }
    Ok(texts)
}

/// A mail's subject and the start of its body, HTML tags removed.
fn mail_text(file: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let json: serde_json::Value = serde_json::from_str(&raw).map_err(|e| Error::Data {
        path: file.to_path_buf(),
        msg: format!("not JSON: {e}"),
    })?;
    let mail = json["text"].as_str().ok_or_else(|| Error::Data {
        path: file.to_path_buf(),
        msg: "no `text` field".into(),
    })?;
    let mail = mail.replace("\r\n", "\n");
    let (headers, body) = mail.split_once("\n\n").unwrap_or((mail.as_str(), ""));
    let subject = headers
        .lines()
        .find_map(|l| l.strip_prefix("Subject:"))
        .unwrap_or("")
        .trim();
    let body: String = strip_tags(body).chars().take(BODY_CHARS).collect();
    Ok(format!("{subject}\n{body}"))
}

/// Text outside `<…>` tags.
fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// Token ids [N, T] (i64) and their attention mask (1 = token, 0 = `[PAD]`) of text rows.
pub fn tokens(x: &Tensor) -> (Tensor, Tensor) {
    let ids = x.to_kind(Kind::Int64);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    (ids, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_stripped() {
        assert_eq!(strip_tags("<p>Buy <b>now</b></p>!"), " Buy  now  !");
    }
}
