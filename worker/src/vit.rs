//! Hugging Face ViT (`ViTModel` / `ViTForImageClassification`) on tch: pre-LN encoder blocks,
//! patch embedding by a strided convolution, [CLS] token and learned positions. Loaded from an
//! HF folder (single or sharded safetensors) with the HF tensor names, with or without the
//! `vit.` prefix of the classification model.

use crate::mlp::Linear;
use crate::tensor::to_tch;
use fsmerge_common::hf::{VitConfig, WeightFiles};
use fsmerge_common::Result;
use std::path::Path;
use tch::Tensor;

pub struct LayerNorm {
    pub w: Tensor,
    pub b: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().unwrap_or(&0);
        x.layer_norm([d], Some(&self.w), Some(&self.b), self.eps, false)
    }
}

/// One pre-LN encoder block.
pub struct Block {
    pub ln_before: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub ln_after: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

pub struct Vit {
    pub cfg: VitConfig,
    pub patch_w: Tensor,
    pub patch_b: Tensor,
    pub cls: Tensor,
    pub pos: Tensor,
    pub blocks: Vec<Block>,
    pub ln_final: LayerNorm,
    /// `ViTForImageClassification`'s head.
    pub classifier: Option<Linear>,
}

/// Multi-head scaled dot-product attention of h [B, T, D] (before the output projection);
/// `bias` [B, 1, 1, T] is added to the scores (a padding mask), if given.
pub fn attention(
    h: &Tensor,
    q: &Linear,
    k: &Linear,
    v: &Linear,
    heads: i64,
    bias: Option<&Tensor>,
) -> Tensor {
    let (b, t, d) = h.size3().unwrap_or((0, 0, 0));
    let split = |y: Tensor| y.view([b, t, heads, d / heads]).transpose(1, 2);
    let (q, k, v) = (
        split(q.forward(h)),
        split(k.forward(h)),
        split(v.forward(h)),
    );
    let scores = q.matmul(&k.transpose(-2, -1)) / ((d / heads) as f64).sqrt();
    let scores = match bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    scores
        .softmax(-1, tch::Kind::Float)
        .matmul(&v)
        .transpose(1, 2)
        .contiguous()
        .view([b, t, d])
}

impl Block {
    fn forward(&self, x: &Tensor, heads: i64) -> Tensor {
        let h = self.ln_before.forward(x);
        let ctx = attention(&h, &self.q, &self.k, &self.v, heads, None);
        let x = x + self.out.forward(&ctx);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.ln_after.forward(&x)).gelu("none"));
        x + m
    }
}

impl Vit {
    /// Load an HF ViT folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = VitConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        let prefix = if files.contains("vit.embeddings.cls_token") {
            "vit."
        } else {
            ""
        };
        let mut names: Vec<String> = [
            "embeddings.cls_token",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight",
            "layernorm.bias",
        ]
        .iter()
        .map(|n| format!("{prefix}{n}"))
        .collect();
        let block_parts = [
            "layernorm_before",
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "layernorm_after",
            "intermediate.dense",
            "output.dense",
        ];
        for l in 0..cfg.num_hidden_layers {
            for p in block_parts {
                for wb in ["weight", "bias"] {
                    names.push(format!("{prefix}encoder.layer.{l}.{p}.{wb}"));
                }
            }
        }
        let classifier = files.contains("classifier.weight");
        if classifier {
            names.push("classifier.weight".into());
            names.push("classifier.bias".into());
        }
        let mut t = files.read(&names)?;
        let mut take = |n: &str| -> Tensor {
            // Every name was read above (a missing one is an error there).
            t.remove(n)
                .map(|h| to_tch(&h))
                .unwrap_or_else(|| Tensor::zeros([0], crate::tensor::F32))
        };
        let eps = cfg.layer_norm_eps;
        let mut ln = |p: String| LayerNorm {
            w: take(&format!("{p}.weight")),
            b: take(&format!("{p}.bias")),
            eps,
        };
        let ln_final = ln(format!("{prefix}layernorm"));
        let mut blocks = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let base = format!("{prefix}encoder.layer.{l}");
            let mut lin = |p: &str| Linear {
                w: take(&format!("{base}.{p}.weight")),
                b: take(&format!("{base}.{p}.bias")),
            };
            let (q, k, v, out, fc1, fc2) = (
                lin("attention.attention.query"),
                lin("attention.attention.key"),
                lin("attention.attention.value"),
                lin("attention.output.dense"),
                lin("intermediate.dense"),
                lin("output.dense"),
            );
            let mut ln2 = |p: &str| LayerNorm {
                w: take(&format!("{base}.{p}.weight")),
                b: take(&format!("{base}.{p}.bias")),
                eps,
            };
            let (ln_before, ln_after) = (ln2("layernorm_before"), ln2("layernorm_after"));
            blocks.push(Block {
                ln_before,
                q,
                k,
                v,
                out,
                ln_after,
                fc1,
                fc2,
            });
        }
        Ok(Self {
            patch_w: take(&format!(
                "{prefix}embeddings.patch_embeddings.projection.weight"
            )),
            patch_b: take(&format!(
                "{prefix}embeddings.patch_embeddings.projection.bias"
            )),
            cls: take(&format!("{prefix}embeddings.cls_token")),
            pos: take(&format!("{prefix}embeddings.position_embeddings")),
            classifier: classifier.then(|| Linear {
                w: take("classifier.weight"),
                b: take("classifier.bias"),
            }),
            blocks,
            ln_final,
            cfg,
        })
    }

    /// Patch embeddings + [CLS] + positions: [B, 1 + P, D] from images [B, C, H, W].
    pub fn embed(&self, pixels: &Tensor) -> Tensor {
        let p = self.cfg.patch_size as i64;
        let x = pixels
            .conv2d(
                &self.patch_w,
                Some(&self.patch_b),
                [p, p],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let b = x.size()[0];
        let cls = self.cls.expand([b, 1, -1], false);
        Tensor::cat(&[cls, x], 1) + &self.pos
    }

    /// Every hidden state as `transformers` reports them: the embeddings, then each block's
    /// output; and the final layer-normed sequence.
    pub fn forward(&self, pixels: &Tensor) -> (Vec<Tensor>, Tensor) {
        let heads = self.cfg.num_attention_heads as i64;
        let mut h = self.embed(pixels);
        let mut states = vec![h.shallow_clone()];
        for b in &self.blocks {
            h = b.forward(&h, heads);
            states.push(h.shallow_clone());
        }
        let last = self.ln_final.forward(&h);
        (states, last)
    }

    /// Class logits of `ViTForImageClassification` (from the [CLS] token).
    pub fn logits(&self, pixels: &Tensor) -> Option<Tensor> {
        let (_, last) = self.forward(pixels);
        self.classifier
            .as_ref()
            .map(|c| c.forward(&last.select(1, 0)))
    }
}
