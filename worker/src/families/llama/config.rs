//! A Llama-family `config.json` (Llama, Mistral, Qwen2 share the block): the fields the forward
//! pass needs, checked. What fsmerge does not implement — a `rope_scaling` type, an activation
//! other than SiLU, heads that do not split the width — is an error naming the file and field.

use fsmerge_common::checkpoint::parse_json;
use fsmerge_common::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The model types whose decoder block is Llama's (RMSNorm, RoPE, grouped-query attention,
/// SwiGLU).
pub const LLAMA_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: fewer key/value heads than query heads (absent: as many).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head (absent: hidden_size / num_attention_heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Mistral/Qwen2 sliding-window attention: each token sees only the last `sliding_window`
    /// tokens (Qwen2 only when `use_sliding_window`). fsmerge attends over the whole text, the
    /// same while texts are no longer than the window (`window_fits` checks).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Read and check `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::parse(&text, &file)
    }

    /// Parse and check a `config.json`'s content `text` (`file` names it in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let cfg: LlamaConfig = parse_json(text, file)?;
        let err = |msg: String| Error::Checkpoint {
            file: file.to_path_buf(),
            msg,
        };
        if !LLAMA_TYPES.contains(&cfg.model_type.as_str()) {
            return Err(err(format!(
                "model_type `{}` is not a Llama-family decoder ({})",
                cfg.model_type,
                LLAMA_TYPES.join(", ")
            )));
        }
        if cfg.hidden_act != "silu" {
            return Err(err(format!(
                "hidden_act `{}` is not supported (SwiGLU needs `silu`)",
                cfg.hidden_act
            )));
        }
        if let Some(s) = cfg.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            let kind = (s.get("rope_type").or_else(|| s.get("type")))
                .and_then(|t| t.as_str())
                .unwrap_or("?");
            if kind != "default" {
                return Err(err(format!(
                    "rope_scaling of type `{kind}` is not implemented (plain RoPE with rope_theta only)"
                )));
            }
        }
        for (v, field, max) in [
            (cfg.hidden_size, "hidden_size", 1usize << 16),
            (cfg.intermediate_size, "intermediate_size", 1 << 18),
            (cfg.num_hidden_layers, "num_hidden_layers", 1024),
            (cfg.num_attention_heads, "num_attention_heads", 1024),
            (cfg.vocab_size, "vocab_size", 1 << 22),
        ] {
            if v == 0 || v > max {
                return Err(err(format!("{field} {v} is not between 1 and {max}")));
            }
        }
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        if kv == 0 || !heads.is_multiple_of(kv) {
            return Err(err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        if cfg.head_dim.is_none() && !cfg.hidden_size.is_multiple_of(heads) {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                cfg.hidden_size
            )));
        }
        if cfg.head_dim() == 0 || !cfg.head_dim().is_multiple_of(2) {
            return Err(err(format!(
                "head_dim {} is not even (RoPE rotates pairs)",
                cfg.head_dim()
            )));
        }
        Ok(cfg)
    }

    /// The attention window in use, if any.
    pub fn window(&self) -> Option<usize> {
        let on = match self.model_type.as_str() {
            "qwen2" => self.use_sliding_window == Some(true),
            _ => self.use_sliding_window != Some(false),
        };
        self.sliding_window.filter(|_| on)
    }

    /// Texts of `tokens` tokens fit the attention window (fsmerge's full causal attention is
    /// the model's own); else an error naming `file`'s `sliding_window`.
    pub fn window_fits(&self, tokens: usize, file: &Path) -> Result<()> {
        match self.window() {
            Some(w) if tokens > w => Err(Error::Checkpoint {
                file: file.to_path_buf(),
                msg: format!(
                    "sliding_window {w} is shorter than the job's {tokens} tokens (data.max_tokens): sliding-window attention is not implemented"
                ),
            }),
            _ => Ok(()),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        (self.head_dim).unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100}"#;

    #[test]
    fn a_tiny_gqa_llama_parses_with_defaults() {
        let c = LlamaConfig::parse(TINY, Path::new("config.json")).unwrap();
        assert_eq!((c.kv_heads(), c.head_dim()), (2, 16));
        assert_eq!((c.rope_theta, c.rms_norm_eps), (10000.0, 1e-6));
    }

    #[test]
    fn a_sliding_window_shorter_than_the_texts_is_named() {
        let with = |extra: &str| {
            let text = TINY.replace("\"llama\"", extra);
            LlamaConfig::parse(&text, Path::new("m/config.json")).unwrap()
        };
        let f = Path::new("m/config.json");
        let mistral = with("\"mistral\", \"sliding_window\": 16");
        let e = mistral.window_fits(32, f).unwrap_err().to_string();
        assert!(
            e.contains("sliding_window 16") && e.contains("m/config.json"),
            "{e}"
        );
        assert!(mistral.window_fits(16, f).is_ok());
        // Qwen2 slides only when `use_sliding_window` says so.
        let qwen = with("\"qwen2\", \"sliding_window\": 16, \"use_sliding_window\": false");
        assert!(qwen.window_fits(32, f).is_ok());
        let qwen = with("\"qwen2\", \"sliding_window\": 16, \"use_sliding_window\": true");
        assert!(qwen.window_fits(32, f).is_err());
    }

    #[test]
    fn what_is_not_implemented_is_named() {
        for (patch, field) in [
            (
                r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
                "yarn",
            ),
            (r#""hidden_act": "gelu""#, "gelu"),
            (r#""num_key_value_heads": 3"#, "num_key_value_heads 3"),
            (r#""model_type": "gpt2""#, "gpt2"),
        ] {
            let v: serde_json::Value = serde_json::from_str(&format!("{{{patch}}}")).unwrap();
            let mut base: serde_json::Value = serde_json::from_str(TINY).unwrap();
            for (k, val) in v.as_object().unwrap() {
                base[k] = val.clone();
            }
            let e = LlamaConfig::parse(&base.to_string(), Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("m/config.json"), "{e}");
        }
    }
}
