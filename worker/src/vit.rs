//! Hugging Face ViT (`ViTModel` / `ViTForImageClassification`) on tch: pre-LN encoder blocks,
//! patch embedding by a strided convolution, [CLS] token and learned positions. Loaded from an
//! HF folder (single or sharded safetensors) with the HF tensor names, with or without the
//! `vit.` prefix of the classification model.

use crate::mlp::Linear;
use crate::tensor::{to_host, to_tch, F32};
use fsmerge_common::checkpoint::{write_json, write_tensors, HostTensor};
use fsmerge_common::hf::{VitConfig, WeightFiles};
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub struct LayerNorm {
    pub w: Tensor,
    pub b: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    fn init(d: i64, eps: f64) -> Self {
        Self {
            w: Tensor::ones([d], F32),
            b: Tensor::zeros([d], F32),
            eps,
        }
    }
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
    attend(&q.forward(h), &k.forward(h), &v.forward(h), heads, bias)
}

/// The attention core on projected q, k, v [B, T, D]: softmax(q_j k_jᵀ / √d_h + bias) v_j per
/// head j, heads concatenated back to [B, T, D].
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, bias: Option<&Tensor>) -> Tensor {
    let (b, t, d) = q.size3().unwrap_or((0, 0, 0));
    let split = |y: &Tensor| y.view([b, t, heads, d / heads]).transpose(1, 2);
    let (q, k, v) = (split(q), split(k), split(v));
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
    pub fn forward(&self, x: &Tensor, heads: i64) -> Tensor {
        let x = x + self.attention_branch(x, heads);
        &x + self.mlp_branch(&x)
    }

    /// The inputs of the block's linear maps — LN_before x (q, k, v), the attention context
    /// (out), LN_after x' (fc1), gelu(fc1 ·) (fc2) — and the block's output.
    pub fn linear_inputs(&self, x: &Tensor, heads: i64) -> ([Tensor; 4], Tensor) {
        let a = self.ln_before.forward(x);
        let ctx = attention(&a, &self.q, &self.k, &self.v, heads, None);
        let x = x + self.out.forward(&ctx);
        let g = self.ln_after.forward(&x);
        let z = self.fc1.forward(&g).gelu("none");
        let y = &x + self.fc2.forward(&z);
        ([a, ctx, g, z], y)
    }

    /// out(attention(LN_before x)): what the block adds to the stream first.
    pub fn attention_branch(&self, x: &Tensor, heads: i64) -> Tensor {
        let h = self.ln_before.forward(x);
        self.out
            .forward(&attention(&h, &self.q, &self.k, &self.v, heads, None))
    }

    /// fc2(gelu(fc1(LN_after x))): what the block adds to the stream second.
    pub fn mlp_branch(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.fc1.forward(&self.ln_after.forward(x)).gelu("none"))
    }
}

/// Patch embedding (a stride-p convolution), [CLS] in front, positions added: [B, 1 + P, D].
pub fn embed_tokens(
    pixels: &Tensor,
    patch_w: &Tensor,
    patch_b: &Tensor,
    cls: &Tensor,
    pos: &Tensor,
    p: i64,
) -> Tensor {
    let x = pixels
        .conv2d(patch_w, Some(patch_b), [p, p], [0, 0], [1, 1], 1)
        .flatten(2, -1)
        .transpose(1, 2);
    let b = x.size()[0];
    let cls = cls.expand([b, 1, -1], false);
    Tensor::cat(&[cls, x], 1) + pos
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

    /// A randomly initialised `ViTForImageClassification` as transformers initialises one:
    /// weights N(0, 0.02), biases 0, LayerNorms (1, 0), [CLS] and positions N(0, 0.02).
    pub fn init(cfg: VitConfig, classes: usize) -> Self {
        let (d, h) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let normal = |shape: &[i64]| Tensor::randn(shape, F32) * 0.02;
        let lin = |o: i64, i: i64| Linear {
            w: normal(&[o, i]),
            b: Tensor::zeros([o], F32),
        };
        let eps = cfg.layer_norm_eps;
        let (p, c) = (cfg.patch_size as i64, cfg.num_channels as i64);
        let tokens = (cfg.image_size as i64 / p).pow(2) + 1;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|_| Block {
                ln_before: LayerNorm::init(d, eps),
                q: lin(d, d),
                k: lin(d, d),
                v: lin(d, d),
                out: lin(d, d),
                ln_after: LayerNorm::init(d, eps),
                fc1: lin(h, d),
                fc2: lin(d, h),
            })
            .collect();
        Self {
            patch_w: normal(&[d, c, p, p]),
            patch_b: Tensor::zeros([d], F32),
            cls: normal(&[1, 1, d]),
            pos: normal(&[1, tokens, d]),
            blocks,
            ln_final: LayerNorm::init(d, eps),
            classifier: Some(lin(classes as i64, d)),
            cfg,
        }
    }

    /// Every tensor under its HF name (`vit.` prefix and `classifier` when it has a head).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let prefix = if self.classifier.is_some() {
            "vit."
        } else {
            ""
        };
        let mut v: Vec<(String, &Tensor)> = vec![
            ("embeddings.cls_token".into(), &self.cls),
            ("embeddings.position_embeddings".into(), &self.pos),
            (
                "embeddings.patch_embeddings.projection.weight".into(),
                &self.patch_w,
            ),
            (
                "embeddings.patch_embeddings.projection.bias".into(),
                &self.patch_b,
            ),
            ("layernorm.weight".into(), &self.ln_final.w),
            ("layernorm.bias".into(), &self.ln_final.b),
        ];
        for (l, b) in self.blocks.iter().enumerate() {
            let base = format!("encoder.layer.{l}");
            for (part, w, bias) in [
                ("layernorm_before", &b.ln_before.w, &b.ln_before.b),
                ("attention.attention.query", &b.q.w, &b.q.b),
                ("attention.attention.key", &b.k.w, &b.k.b),
                ("attention.attention.value", &b.v.w, &b.v.b),
                ("attention.output.dense", &b.out.w, &b.out.b),
                ("layernorm_after", &b.ln_after.w, &b.ln_after.b),
                ("intermediate.dense", &b.fc1.w, &b.fc1.b),
                ("output.dense", &b.fc2.w, &b.fc2.b),
            ] {
                v.push((format!("{base}.{part}.weight"), w));
                v.push((format!("{base}.{part}.bias"), bias));
            }
        }
        let mut v: Vec<(String, &Tensor)> = v
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t))
            .collect();
        if let Some(c) = &self.classifier {
            v.push(("classifier.weight".into(), &c.w));
            v.push(("classifier.bias".into(), &c.b));
        }
        v
    }

    /// The trainable tensors (every one of `named_tensors`).
    pub fn params(&self) -> Vec<Tensor> {
        self.named_tensors()
            .into_iter()
            .map(|(_, t)| t.shallow_clone())
            .collect()
    }

    /// A detached copy (for a student or a baseline built from this model).
    pub fn copy(&self) -> Self {
        let c = |t: &Tensor| t.detach().copy();
        let ln = |l: &LayerNorm| LayerNorm {
            w: c(&l.w),
            b: c(&l.b),
            eps: l.eps,
        };
        Self {
            cfg: self.cfg.clone(),
            patch_w: c(&self.patch_w),
            patch_b: c(&self.patch_b),
            cls: c(&self.cls),
            pos: c(&self.pos),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    ln_before: ln(&b.ln_before),
                    q: b.q.copy(),
                    k: b.k.copy(),
                    v: b.v.copy(),
                    out: b.out.copy(),
                    ln_after: ln(&b.ln_after),
                    fc1: b.fc1.copy(),
                    fc2: b.fc2.copy(),
                })
                .collect(),
            ln_final: ln(&self.ln_final),
            classifier: self.classifier.as_ref().map(Linear::copy),
        }
    }

    /// Write an HF folder: `config.json` (with `labels` as id2label) and `model.safetensors`,
    /// loadable by `ViTForImageClassification.from_pretrained` (or `ViTModel` without a head).
    pub fn save(&self, dir: &Path, labels: &[String]) -> Result<()> {
        let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
        for (name, t) in self.named_tensors() {
            tensors.insert(name, to_host(t)?);
        }
        write_tensors(&dir.join("model.safetensors"), &tensors)?;
        write_json(&dir.join("config.json"), &self.config_json(labels))
    }

    fn config_json(&self, labels: &[String]) -> serde_json::Value {
        let c = &self.cfg;
        let id2label: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone().into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        let arch = if self.classifier.is_some() {
            "ViTForImageClassification"
        } else {
            "ViTModel"
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": "vit",
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "layer_norm_eps": c.layer_norm_eps,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "num_channels": c.num_channels,
            "qkv_bias": c.qkv_bias,
            "encoder_stride": c.patch_size,
            "id2label": id2label,
            "label2id": label2id,
            "torch_dtype": "float32",
        })
    }

    /// The [CLS] token after the final LayerNorm [B, D]: what the classifier reads and what
    /// FS-Merge reconstructs.
    pub fn pooled(&self, pixels: &Tensor) -> Tensor {
        self.forward(pixels).1.select(1, 0)
    }

    /// Patch embeddings + [CLS] + positions: [B, 1 + P, D] from images [B, C, H, W].
    pub fn embed(&self, pixels: &Tensor) -> Tensor {
        embed_tokens(
            pixels,
            &self.patch_w,
            &self.patch_b,
            &self.cls,
            &self.pos,
            self.cfg.patch_size as i64,
        )
    }

    /// Each block's attention-branch output (after the output projection, before the residual
    /// add) [B, T, D], beside every hidden state: the inner features of method.md §9.2.
    pub fn trace(&self, pixels: &Tensor) -> (Vec<Tensor>, Vec<Tensor>) {
        let heads = self.cfg.num_attention_heads as i64;
        let mut h = self.embed(pixels);
        let (mut states, mut attn) = (vec![h.shallow_clone()], Vec::new());
        for b in &self.blocks {
            let a = b.attention_branch(&h, heads);
            let x = &h + &a;
            h = &x + b.mlp_branch(&x);
            attn.push(a);
            states.push(h.shallow_clone());
        }
        (states, attn)
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
