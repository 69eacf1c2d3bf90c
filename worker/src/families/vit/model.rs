//! Hugging Face ViT (`ViTModel` / `ViTForImageClassification`) on tch: pre-LN encoder blocks,
//! patch embedding by a strided convolution, [CLS] token and learned positions. Loaded from an
//! HF folder (single or sharded safetensors) with the HF tensor names, with or without the
//! `vit.` prefix of the classification model.

use crate::core::encoder_block::{EncoderBlock, Layout, Part};
use crate::core::layer_norm::LayerNorm;
use crate::core::linear::Linear;
use crate::core::tensor::{to_tch, write_hf_weights, F32};
use crate::core::transformer::{check_part_units, unit_blocks};
use fsmerge_common::checkpoint::{write_json, HostTensor};
use fsmerge_common::hf::{VitConfig, WeightFiles};
use fsmerge_common::hf_writer::DEFAULT_MAX_SHARD_BYTES;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use tch::Tensor;

pub struct Vit {
    pub cfg: VitConfig,
    pub patch_w: Tensor,
    pub patch_b: Tensor,
    pub cls: Tensor,
    pub pos: Tensor,
    pub blocks: Vec<EncoderBlock>,
    pub ln_final: LayerNorm,
    /// `ViTForImageClassification`'s head.
    pub classifier: Option<Linear>,
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

/// The tensors of one part of a ViT, as a pipeline stage holds them: plan units `units`
/// (unit 0 is the embeddings, unit 1 + l is block l). The part that ends with the last block
/// also holds the final LayerNorm and, when the model has one, the classifier.
pub struct VitPart {
    pub cfg: VitConfig,
    pub units: Range<usize>,
    /// (patch kernel [d, C, p, p], patch bias [d], [CLS] [1, 1, d], positions [1, T, d]).
    pub embeddings: Option<[Tensor; 4]>,
    /// Blocks `first_block()..`, in order.
    pub blocks: Vec<EncoderBlock>,
    pub ln_final: Option<LayerNorm>,
    pub classifier: Option<Linear>,
}

/// HF names of the embedding tensors, in `VitPart::embeddings` order.
pub const EMBEDDING_NAMES: [&str; 4] = [
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
    "embeddings.cls_token",
    "embeddings.position_embeddings",
];

/// HF names of a ViT block's parts (`ViTLayer`), in the order of its tensors.
pub const VIT_BLOCK: Layout = [
    ("layernorm_before", Part::LnAttn),
    ("attention.attention.query", Part::Q),
    ("attention.attention.key", Part::K),
    ("attention.attention.value", Part::V),
    ("attention.output.dense", Part::Out),
    ("layernorm_after", Part::LnMlp),
    ("intermediate.dense", Part::Fc1),
    ("output.dense", Part::Fc2),
];

impl VitPart {
    /// Read plan units `units` of the HF ViT folder `dir` (only their tensors are read).
    pub fn load(dir: &Path, units: Range<usize>) -> Result<Self> {
        let cfg = VitConfig::load(dir)?;
        let count = cfg.num_hidden_layers + 1;
        check_part_units(dir, &units, cfg.num_hidden_layers, "ViT")?;
        let files = WeightFiles::open(dir)?;
        let prefix = if files.contains("vit.embeddings.cls_token") {
            "vit."
        } else {
            ""
        };
        let classifier = units.end == count && files.contains("classifier.weight");
        let mut names: Vec<String> = Vec::new();
        if units.start == 0 {
            names.extend(EMBEDDING_NAMES.iter().map(|n| format!("{prefix}{n}")));
        }
        for l in unit_blocks(&units) {
            for (p, _) in VIT_BLOCK {
                for wb in ["weight", "bias"] {
                    names.push(format!("{prefix}encoder.layer.{l}.{p}.{wb}"));
                }
            }
        }
        if units.end == count {
            names.extend(["layernorm.weight", "layernorm.bias"].map(|n| format!("{prefix}{n}")));
        }
        if classifier {
            names.extend([
                "classifier.weight".to_string(),
                "classifier.bias".to_string(),
            ]);
        }
        let t = files.read(&names)?;
        Self::from_tensors(cfg, units, prefix, t)
    }

    /// Build the part from its tensors under their HF names (with `prefix` before every name
    /// but the classifier's); a missing tensor is an error naming it.
    pub fn from_tensors(
        cfg: VitConfig,
        units: Range<usize>,
        prefix: &str,
        mut t: BTreeMap<String, HostTensor>,
    ) -> Result<Self> {
        let has_classifier = t.contains_key("classifier.weight");
        let mut take = |n: &str| -> Result<Tensor> {
            t.remove(n)
                .map(|h| to_tch(&h))
                .ok_or_else(|| Error::Compute(format!("the ViT's tensor `{n}` is missing")))
        };
        let eps = cfg.layer_norm_eps;
        let count = cfg.num_hidden_layers + 1;
        let embeddings = if units.start == 0 {
            let [w, b, cls, pos] = EMBEDDING_NAMES;
            Some([
                take(&format!("{prefix}{w}"))?,
                take(&format!("{prefix}{b}"))?,
                take(&format!("{prefix}{cls}"))?,
                take(&format!("{prefix}{pos}"))?,
            ])
        } else {
            None
        };
        let mut blocks = Vec::new();
        for l in unit_blocks(&units) {
            let base = format!("{prefix}encoder.layer.{l}");
            let mut pair = |p: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    take(&format!("{base}.{p}.weight"))?,
                    take(&format!("{base}.{p}.bias"))?,
                ))
            };
            blocks.push(EncoderBlock::from_pairs(&VIT_BLOCK, eps, &mut pair)?);
        }
        let ln_final = if units.end == count {
            Some(LayerNorm {
                w: take(&format!("{prefix}layernorm.weight"))?,
                b: take(&format!("{prefix}layernorm.bias"))?,
                eps,
            })
        } else {
            None
        };
        let classifier = if units.end == count && has_classifier {
            Some(Linear {
                w: take("classifier.weight")?,
                b: take("classifier.bias")?,
            })
        } else {
            None
        };
        Ok(Self {
            cfg,
            units,
            embeddings,
            blocks,
            ln_final,
            classifier,
        })
    }

    /// Make the part read another processor's pixels x, its own being a_c·x + b_c per channel
    /// c (`adapter`, from `ImageProcessor::from_reference`): exact, because the patch
    /// embedding is a convolution without padding, so W·(a·x + b) + bias = (W·a)·x + (bias +
    /// Σ W·b). Computed in f64. A part without the embeddings has nothing to adapt.
    pub fn read_pixels_as(&mut self, adapter: &[(f64, f64)], dir: &Path) -> Result<()> {
        let Some([w, bias, ..]) = &mut self.embeddings else {
            return Ok(());
        };
        let c = w.size()[1];
        if adapter.len() as i64 != c {
            return Err(Error::Data {
                path: dir.join("preprocessor_config.json"),
                msg: format!("normalizes {} channels; the model reads {c}", adapter.len()),
            });
        }
        let per_channel = |v: Vec<f64>| {
            Tensor::from_slice(&v)
                .to_device(w.device())
                .view([1, c, 1, 1])
        };
        let a = per_channel(adapter.iter().map(|&(a, _)| a).collect());
        let b = per_channel(adapter.iter().map(|&(_, b)| b).collect());
        let w64 = w.to_kind(tch::Kind::Double);
        let shift = (&w64 * b).sum_dim_intlist([1i64, 2, 3].as_slice(), false, tch::Kind::Double);
        *bias = (bias.to_kind(tch::Kind::Double) + shift).to_kind(w.kind());
        *w = (w64 * a).to_kind(w.kind());
        Ok(())
    }

    /// Move every tensor to `device`.
    pub fn to_device(&mut self, device: tch::Device) {
        self.map_body(&|t| t.to_device(device));
        if let Some(c) = &mut self.classifier {
            for t in [&mut c.w, &mut c.b] {
                *t = t.to_device(device);
            }
        }
    }

    /// Store the body (all but the classifier, which the read-out folds into in fp32) in
    /// `kind` (`merge.precision`); `trace` then runs in it.
    pub fn store_in(&mut self, kind: tch::Kind) {
        self.map_body(&|t| t.to_kind(kind));
    }

    /// The kind the body is stored in.
    fn kind(&self) -> tch::Kind {
        let first = (self.embeddings.as_ref().map(|e| &e[0]))
            .or(self.blocks.first().map(|b| &b.q.w))
            .or(self.ln_final.as_ref().map(|n| &n.w));
        first.map_or(tch::Kind::Float, Tensor::kind)
    }

    fn map_body(&mut self, f: &dyn Fn(&Tensor) -> Tensor) {
        let mut ts: Vec<&mut Tensor> = self.embeddings.iter_mut().flatten().collect();
        if let Some(n) = &mut self.ln_final {
            ts.extend([&mut n.w, &mut n.b]);
        }
        for t in ts {
            *t = f(t);
        }
        for b in &mut self.blocks {
            *b = b.map(f);
        }
    }

    /// Global index of the part's first block.
    pub fn first_block(&self) -> usize {
        unit_blocks(&self.units).start
    }

    /// Bytes of the part's tensors.
    pub fn bytes(&self) -> u64 {
        let mut ts: Vec<&Tensor> = self.embeddings.iter().flatten().collect();
        for b in &self.blocks {
            ts.extend(b.named(0, &VIT_BLOCK).into_iter().map(|(_, t)| t));
        }
        if let Some(n) = &self.ln_final {
            ts.extend([&n.w, &n.b]);
        }
        if let Some(c) = &self.classifier {
            ts.extend([&c.w, &c.b]);
        }
        ts.iter().map(|t| crate::core::tensor::bytes_of(t)).sum()
    }

    /// The part's units on one model's input: images [B, C, H, W] when it holds the
    /// embeddings, else the stream [B, T, d]. Returns every unit's output stream, then the
    /// pooled output ([CLS] after the final LayerNorm) when it holds that LayerNorm.
    pub fn trace(&self, input: &Tensor) -> Vec<Tensor> {
        let heads = self.cfg.num_attention_heads as i64;
        let input = &input.to_kind(self.kind());
        let mut out = Vec::new();
        let mut h = match &self.embeddings {
            Some([w, b, cls, pos]) => {
                let e = embed_tokens(input, w, b, cls, pos, self.cfg.patch_size as i64);
                out.push(e.shallow_clone());
                e
            }
            None => input.shallow_clone(),
        };
        for b in &self.blocks {
            h = b.forward_pre_ln(&h, heads);
            out.push(h.shallow_clone());
        }
        if let Some(ln) = &self.ln_final {
            out.push(ln.forward(&h).select(1, 0));
        }
        out
    }

    /// The whole model, when this part holds every unit.
    pub fn into_vit(self) -> Result<Vit> {
        let whole = self.cfg.num_hidden_layers + 1;
        match (self.embeddings, self.ln_final) {
            (Some([patch_w, patch_b, cls, pos]), Some(ln_final)) if self.units == (0..whole) => {
                Ok(Vit {
                    cfg: self.cfg,
                    patch_w,
                    patch_b,
                    cls,
                    pos,
                    blocks: self.blocks,
                    ln_final,
                    classifier: self.classifier,
                })
            }
            _ => Err(Error::Compute(format!(
                "units {:?} are part of a ViT, not all of its {whole}",
                self.units
            ))),
        }
    }
}

impl Vit {
    /// Load an HF ViT folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = VitConfig::load(dir)?;
        VitPart::load(dir, 0..cfg.num_hidden_layers + 1)?.into_vit()
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
            .map(|_| EncoderBlock::init(d, h, eps, &lin))
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
            v.extend(b.named(l, &VIT_BLOCK));
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
            blocks: self.blocks.iter().map(|b| b.map(&c)).collect(),
            ln_final: ln(&self.ln_final),
            classifier: self.classifier.as_ref().map(Linear::copy),
        }
    }

    /// Write an HF folder: `config.json` (with `labels` as id2label) and `model.safetensors`,
    /// loadable by `ViTForImageClassification.from_pretrained` (or `ViTModel` without a head).
    pub fn save(&self, dir: &Path, labels: &[String]) -> Result<()> {
        self.save_sharded(dir, labels, DEFAULT_MAX_SHARD_BYTES)
    }

    /// `save`, with the weights in safetensors shards of at most `max_shard_bytes`.
    pub fn save_sharded(&self, dir: &Path, labels: &[String], max_shard_bytes: u64) -> Result<()> {
        write_hf_weights(dir, self.named_tensors(), max_shard_bytes)?;
        write_json(
            &dir.join("config.json"),
            &config_json(&self.cfg, labels, self.classifier.is_some()),
        )
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
            h = b.forward_pre_ln(&h, heads);
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

/// An HF ViT `config.json` for `cfg`, with `labels` as the classifier's (`classifier`: a
/// `ViTForImageClassification`, else a `ViTModel`).
pub fn config_json(c: &VitConfig, labels: &[String], classifier: bool) -> serde_json::Value {
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
    let arch = if classifier {
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
