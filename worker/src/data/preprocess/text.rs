//! Texts through the model's own `tokenizer.json`, with Hugging Face's `tokenizers` crate (the
//! Rust library under `transformers`' fast tokenizers): special tokens added, truncated and
//! padded to `max_tokens`, as `tokenizer(texts, padding="max_length", truncation=True,
//! max_length=max_tokens)` does. The pad token is the one `tokenizer.json` pads with, else
//! `tokenizer_config.json`'s `pad_token`.

use fsmerge_common::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// A model's tokenizer, set to pad and truncate to a fixed length.
pub struct TextProcessor {
    tokenizer: Tokenizer,
    file: PathBuf,
    max_tokens: usize,
    pad_id: u32,
}

/// Token rows of a batch of texts, each `max_tokens` long, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub type_ids: Vec<i64>,
    pub max_tokens: usize,
}

impl TextProcessor {
    /// The tokenizer of the model folder `model_dir` (`tokenizer.json`).
    pub fn load(model_dir: &Path, max_tokens: usize) -> Result<Self> {
        let file = model_dir.join("tokenizer.json");
        let bad = |msg: String| Error::Data {
            path: file.clone(),
            msg,
        };
        if !file.is_file() {
            return Err(bad(
                "missing: the model needs a fast tokenizer (`tokenizer.json`, as \
                 `save_pretrained` writes it)"
                    .into(),
            ));
        }
        let mut tokenizer =
            Tokenizer::from_file(&file).map_err(|e| bad(format!("not a tokenizer ({e})")))?;
        let (pad_id, pad_token) = pad_token(&tokenizer, model_dir).ok_or_else(|| {
            bad("no pad token (neither its padding nor tokenizer_config.json's pad_token)".into())
        })?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_tokens),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| bad(format!("cannot truncate to {max_tokens} tokens ({e})")))?;
        Ok(TextProcessor {
            tokenizer,
            file,
            max_tokens,
            pad_id,
        })
    }

    /// Tokenize `texts` (special tokens added, padded and truncated to `max_tokens`).
    pub fn encode(&self, texts: &[&str]) -> Result<Tokens> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Data {
                path: self.file.clone(),
                msg: format!("tokenizing failed: {e}"),
            })?;
        let t = self.max_tokens;
        let mut out = Tokens {
            ids: Vec::with_capacity(texts.len() * t),
            attention_mask: Vec::with_capacity(texts.len() * t),
            type_ids: Vec::with_capacity(texts.len() * t),
            max_tokens: t,
        };
        for e in &encodings {
            let wide = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
            out.ids.extend(wide(e.get_ids()));
            out.attention_mask.extend(wide(e.get_attention_mask()));
            out.type_ids.extend(wide(e.get_type_ids()));
        }
        Ok(out)
    }

    /// The id padding fills with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Whether `other` maps every token to the same id (the merged model has one embedding
    /// table).
    pub fn same_vocabulary(&self, other: &TextProcessor) -> bool {
        self.tokenizer.get_vocab(true) == other.tokenizer.get_vocab(true)
    }

    /// Tokens per text.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// (id, token) the tokenizer pads with.
fn pad_token(tokenizer: &Tokenizer, model_dir: &Path) -> Option<(u32, String)> {
    if let Some(p) = tokenizer.get_padding() {
        return Some((p.pad_id, p.pad_token.clone()));
    }
    let config = std::fs::read_to_string(model_dir.join("tokenizer_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&config).ok()?;
    let token = match &config["pad_token"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
        _ => return None,
    };
    Some((tokenizer.token_to_id(&token)?, token))
}
