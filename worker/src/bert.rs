//! Hugging Face BERT (`BertModel` / `BertForSequenceClassification`) on tch: word, position
//! and token-type embeddings, post-LN encoder blocks, exact GELU, a padding mask. Loaded from an
//! HF folder with the HF tensor names, with or without the `bert.` prefix.

use crate::mlp::Linear;
use crate::tensor::to_tch;
use crate::vit::{attention, LayerNorm};
use fsmerge_common::hf::{BertConfig, WeightFiles};
use fsmerge_common::Result;
use std::path::Path;
use tch::{Kind, Tensor};

/// One post-LN encoder block.
pub struct BertBlock {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub ln_att: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub ln_out: LayerNorm,
}

pub struct Bert {
    pub cfg: BertConfig,
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    pub ln_emb: LayerNorm,
    pub blocks: Vec<BertBlock>,
}

impl Bert {
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = BertConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        let prefix = if files.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let mut names: Vec<String> = [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        ]
        .iter()
        .map(|n| format!("{prefix}{n}"))
        .collect();
        let parts = [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ];
        for l in 0..cfg.num_hidden_layers {
            for p in parts {
                for wb in ["weight", "bias"] {
                    names.push(format!("{prefix}encoder.layer.{l}.{p}.{wb}"));
                }
            }
        }
        let mut t = files.read(&names)?;
        let mut take = |n: String| -> Tensor {
            // Every name was read above (a missing one is an error there).
            t.remove(&n)
                .map(|h| to_tch(&h))
                .unwrap_or_else(|| Tensor::zeros([0], crate::tensor::F32))
        };
        let eps = cfg.layer_norm_eps;
        let word = take(format!("{prefix}embeddings.word_embeddings.weight"));
        let position = take(format!("{prefix}embeddings.position_embeddings.weight"));
        let token_type = take(format!("{prefix}embeddings.token_type_embeddings.weight"));
        let ln_emb = LayerNorm {
            w: take(format!("{prefix}embeddings.LayerNorm.weight")),
            b: take(format!("{prefix}embeddings.LayerNorm.bias")),
            eps,
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| {
                let base = format!("{prefix}encoder.layer.{l}");
                let mut lin = |p: &str| Linear {
                    w: take(format!("{base}.{p}.weight")),
                    b: take(format!("{base}.{p}.bias")),
                };
                let (q, k, v, out) = (
                    lin("attention.self.query"),
                    lin("attention.self.key"),
                    lin("attention.self.value"),
                    lin("attention.output.dense"),
                );
                let ln_att = LayerNorm {
                    w: take(format!("{base}.attention.output.LayerNorm.weight")),
                    b: take(format!("{base}.attention.output.LayerNorm.bias")),
                    eps,
                };
                let mut lin = |p: &str| Linear {
                    w: take(format!("{base}.{p}.weight")),
                    b: take(format!("{base}.{p}.bias")),
                };
                let (fc1, fc2) = (lin("intermediate.dense"), lin("output.dense"));
                let ln_out = LayerNorm {
                    w: take(format!("{base}.output.LayerNorm.weight")),
                    b: take(format!("{base}.output.LayerNorm.bias")),
                    eps,
                };
                BertBlock {
                    q,
                    k,
                    v,
                    out,
                    ln_att,
                    fc1,
                    fc2,
                    ln_out,
                }
            })
            .collect();
        Ok(Self {
            cfg,
            word,
            position,
            token_type,
            ln_emb,
            blocks,
        })
    }

    /// Every hidden state as `transformers` reports them (embeddings, then each block's
    /// output) for token ids [B, T] and an attention mask [B, T] (1 = token, 0 = padding).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Vec<Tensor> {
        let t = ids.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let emb = self
            .word
            .index_select(0, &ids.flatten(0, -1))
            .view([ids.size()[0], t, -1])
            + self.position.index_select(0, &pos).unsqueeze(0)
            + self.token_type.get(0);
        let mut h = self.ln_emb.forward(&emb);
        // Padding gets the most negative score, as transformers does.
        let padding: Tensor = mask.to_kind(Kind::Float).neg() + 1.0;
        let bias = padding.view([mask.size()[0], 1, 1, t]) * f64::from(f32::MIN);
        let heads = self.cfg.num_attention_heads as i64;
        let mut states = vec![h.shallow_clone()];
        for b in &self.blocks {
            let ctx = attention(&h, &b.q, &b.k, &b.v, heads, Some(&bias));
            h = b.ln_att.forward(&(&h + b.out.forward(&ctx)));
            let m = b.fc2.forward(&b.fc1.forward(&h).gelu("none"));
            h = b.ln_out.forward(&(&h + m));
            states.push(h.shallow_clone());
        }
        states
    }

    /// Sentence embeddings as sentence-transformers pools them: the mask-weighted mean of the
    /// last hidden state, L2-normalised.
    pub fn sentence_embeddings(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let last = self
            .forward(ids, mask)
            .pop()
            .unwrap_or_else(|| Tensor::zeros([0], crate::tensor::F32));
        let m = mask.to_kind(Kind::Float).unsqueeze(-1);
        let mean = (last * &m).sum_dim_intlist(1, false, None)
            / m.sum_dim_intlist(1, false, None).clamp_min(1e-9);
        let norm = mean.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
        mean / norm
    }
}
