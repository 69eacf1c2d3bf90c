//! A Llama-family decoder in the HF layout (`LlamaForCausalLM`, `LlamaForSequenceClassification`;
//! Mistral and Qwen2 share it): RMSNorm, rotary position embeddings (`rope_theta`), grouped-query
//! causal attention, SwiGLU MLP, optional biases. The forward follows transformers' eager path
//! (norms and softmax in fp32), so a checkpoint transformers writes gives its logits.

use crate::core::tensor::{to_tch, write_hf_weights};
use crate::dist::evaluate::Readout;
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::part::{score_linear, LlamaPart};
use fsmerge_common::checkpoint::write_json;
use fsmerge_common::hf::WeightFiles;
use fsmerge_common::hf_writer::DEFAULT_MAX_SHARD_BYTES;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// RMSNorm: x / √(mean(x²) + eps) · w, computed in fp32.
pub struct RmsNorm {
    pub w: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        &self.w * (xf * (var + self.eps).rsqrt()).to_kind(x.kind())
    }
}

/// A linear map without or with a bias (`attention_bias`, `mlp_bias`), weight [out, in].
pub struct Proj {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Proj {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, self.b.as_ref())
    }
}

/// One decoder block: pre-norm attention and SwiGLU MLP, each added to the stream.
pub struct DecoderBlock {
    pub ln_attn: RmsNorm,
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    pub ln_mlp: RmsNorm,
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
}

/// HF names of a block's linear maps under `model.layers.{l}.`.
pub const BLOCK_PROJ: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// HF names of a block's two RMSNorms (before attention, before the MLP).
pub const BLOCK_NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// Remove tensor `name` from `tensors`; a missing one is an error naming it and `file`.
pub fn take_tensor(
    tensors: &mut BTreeMap<String, Tensor>,
    name: &str,
    file: &Path,
) -> Result<Tensor> {
    tensors.remove(name).ok_or_else(|| Error::Tensor {
        file: file.to_path_buf(),
        tensor: name.to_string(),
        msg: "missing".into(),
    })
}

/// What attention needs besides the stream: the rotary tables and the additive mask.
pub struct AttentionContext {
    /// cos, sin [T, head_dim] of each position's angles.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Causal and padding mask [B, 1, T, T], 0 where a query may attend a key.
    pub bias: Tensor,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
}

impl AttentionContext {
    /// For token rows of length `t` with attention mask `mask` [B, T] (1 = token).
    pub fn new(cfg: &LlamaConfig, mask: &Tensor) -> Self {
        let (b, t) = mask.size2().unwrap_or((0, 0));
        let device = mask.device();
        let hd = cfg.head_dim() as i64;
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / hd as f64;
        let inv_freq = (exponents * cfg.rope_theta.ln()).exp().reciprocal();
        let positions = Tensor::arange(t, (Kind::Float, device));
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
        let keys = mask.to_kind(Kind::Bool).view([b, 1, 1, t]);
        let allowed = causal.view([1, 1, t, t]).logical_and(&keys);
        let bias = Tensor::zeros([b, 1, t, t], (Kind::Float, device))
            .masked_fill(&allowed.logical_not(), f64::from(f32::MIN));
        Self {
            cos: angles.cos(),
            sin: angles.sin(),
            bias,
            heads: cfg.num_attention_heads as i64,
            kv_heads: cfg.kv_heads() as i64,
            head_dim: hd,
        }
    }

    /// RoPE of x [B, heads, T, head_dim]: x·cos + rotate_half(x)·sin.
    fn rotate(&self, x: &Tensor) -> Tensor {
        let half = self.head_dim / 2;
        let rotated = Tensor::cat(&[x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)], -1);
        let kind = x.kind();
        (x * self.cos.to_kind(kind)) + rotated * self.sin.to_kind(kind)
    }
}

impl DecoderBlock {
    /// The names of block `l`'s tensors under `{prefix}layers.{l}.`, a bias where `has` says
    /// the model has it.
    pub fn names(prefix: &str, l: usize, has: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut names = Vec::new();
        for p in BLOCK_PROJ {
            names.push(format!("{prefix}layers.{l}.{p}.weight"));
            let bias = format!("{prefix}layers.{l}.{p}.bias");
            if has(&bias) {
                names.push(bias);
            }
        }
        for n in BLOCK_NORMS {
            names.push(format!("{prefix}layers.{l}.{n}.weight"));
        }
        names
    }

    /// Block `l` from its tensors under `names`' names, removed from `tensors` (`file` names
    /// a missing one).
    pub fn take(
        prefix: &str,
        l: usize,
        eps: f64,
        tensors: &mut BTreeMap<String, Tensor>,
        file: &Path,
    ) -> Result<Self> {
        let mut take = |name: String| take_tensor(tensors, &name, file);
        let mut proj = |p: &str| -> Result<Proj> {
            let w = take(format!("{prefix}layers.{l}.{p}.weight"))?;
            let b = take(format!("{prefix}layers.{l}.{p}.bias")).ok();
            Ok(Proj { w, b })
        };
        let [q, k, v, o, gate, up, down] = BLOCK_PROJ.map(&mut proj);
        let [ln_attn, ln_mlp] = BLOCK_NORMS.map(|n| {
            take_tensor(tensors, &format!("{prefix}layers.{l}.{n}.weight"), file)
                .map(|w| RmsNorm { w, eps })
        });
        Ok(Self {
            ln_attn: ln_attn?,
            q: q?,
            k: k?,
            v: v?,
            o: o?,
            ln_mlp: ln_mlp?,
            gate: gate?,
            up: up?,
            down: down?,
        })
    }

    /// The block's tensors under `{prefix}layers.{l}.` (biases only where it has them).
    pub fn named(&self, prefix: &str, l: usize) -> Vec<(String, &Tensor)> {
        let mut v = Vec::new();
        for (name, p) in BLOCK_PROJ.iter().zip(self.projs()) {
            v.push((format!("{prefix}layers.{l}.{name}.weight"), &p.w));
            if let Some(bias) = &p.b {
                v.push((format!("{prefix}layers.{l}.{name}.bias"), bias));
            }
        }
        for (name, n) in BLOCK_NORMS.iter().zip([&self.ln_attn, &self.ln_mlp]) {
            v.push((format!("{prefix}layers.{l}.{name}.weight"), &n.w));
        }
        v
    }

    /// The seven linear maps, in `BLOCK_PROJ` order.
    pub fn projs(&self) -> [&Proj; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// The block with `f` applied to every tensor (device moves, precision, copies).
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        let proj = |p: &Proj| Proj {
            w: f(&p.w),
            b: p.b.as_ref().map(f),
        };
        let norm = |n: &RmsNorm| RmsNorm {
            w: f(&n.w),
            eps: n.eps,
        };
        Self {
            ln_attn: norm(&self.ln_attn),
            q: proj(&self.q),
            k: proj(&self.k),
            v: proj(&self.v),
            o: proj(&self.o),
            ln_mlp: norm(&self.ln_mlp),
            gate: proj(&self.gate),
            up: proj(&self.up),
            down: proj(&self.down),
        }
    }

    /// The inputs of the block's linear maps on its input x [B, T, d] (RegMean): q/k/v's
    /// (the attention norm of x), o's (the attention before it), gate/up's (the MLP norm of
    /// the stream after attention) and down's (silu(gate) ⊙ up), each [B, T, k].
    pub fn linear_inputs(&self, x: &Tensor, ctx: &AttentionContext) -> [Tensor; 4] {
        let h = self.ln_attn.forward(x);
        let att = self.attention(&h, ctx);
        let x = x + self.o.forward(&att);
        let h2 = self.ln_mlp.forward(&x);
        let gated = self.gate.forward(&h2).silu() * self.up.forward(&h2);
        [h, att, h2, gated]
    }

    pub fn forward(&self, x: &Tensor, ctx: &AttentionContext) -> Tensor {
        let x = x + self
            .o
            .forward(&self.attention(&self.ln_attn.forward(x), ctx));
        &x + self.mlp(&self.ln_mlp.forward(&x))
    }

    /// Causal grouped-query attention of h [B, T, d] before the output projection
    /// [B, T, heads·head_dim]: each key/value head serves heads / kv_heads query heads.
    pub fn attention(&self, h: &Tensor, ctx: &AttentionContext) -> Tensor {
        ctx.attend(&self.q.forward(h), &self.k.forward(h), &self.v.forward(h))
    }

    /// SwiGLU: down(silu(gate h) ⊙ up h).
    pub fn mlp(&self, h: &Tensor) -> Tensor {
        self.down
            .forward(&(self.gate.forward(h).silu() * self.up.forward(h)))
    }
}

impl AttentionContext {
    /// The attention core on projected q [B, T, heads·head_dim] and k, v [B, T,
    /// kv_heads·head_dim]: RoPE on q and k, each key/value head shared by heads / kv_heads
    /// query heads, causal softmax (fp32); [B, T, heads·head_dim].
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, t, _) = q.size3().unwrap_or((0, 0, 0));
        let (hd, heads, kv) = (self.head_dim, self.heads, self.kv_heads);
        let split = |y: &Tensor, n: i64| y.view([b, t, n, hd]).transpose(1, 2);
        let q = self.rotate(&split(q, heads));
        let k = self.rotate(&split(k, kv));
        let v = split(v, kv);
        let repeat = |y: Tensor| {
            y.unsqueeze(2)
                .expand([b, kv, heads / kv, t, hd], false)
                .reshape([b, heads, t, hd])
        };
        let (k, v) = (repeat(k), repeat(v));
        let scores = q.matmul(&k.transpose(-2, -1)) / (hd as f64).sqrt() + &self.bias;
        scores
            .softmax(-1, Kind::Float)
            .to_kind(v.kind())
            .matmul(&v)
            .transpose(1, 2)
            .contiguous()
            .view([b, t, heads * hd])
    }
}

/// Each row's state at its last real token (the last position whose mask is 1, as
/// transformers' sequence classifiers read it): h [.., B, T, d] → [.., B, d].
pub fn last_token(h: &Tensor, mask: &Tensor) -> Tensor {
    let (b, t) = mask.size2().unwrap_or((0, 0));
    let positions = Tensor::arange(t, (Kind::Int64, mask.device())).unsqueeze(0);
    let last = (positions * mask.to_kind(Kind::Int64)).argmax(-1, false);
    let mut shape = h.size();
    let k = shape.len();
    shape[k - 2] = 1;
    let index = last.view([b, 1, 1]).expand(shape.as_slice(), false);
    h.gather(-2, &index, false).squeeze_dim(-2)
}

/// A whole Llama-family model: the token embeddings, the blocks, the final norm, and the heads
/// its folder has (an LM head, tied to the embeddings or its own; a sequence classifier's
/// `score`).
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Tensor,
    pub blocks: Vec<DecoderBlock>,
    pub norm: RmsNorm,
    /// `lm_head.weight` [V, d]; None when tied to the embeddings or absent.
    pub lm_head: Option<Tensor>,
    /// `score.weight` [labels, d] of a sequence classifier.
    pub score: Option<Tensor>,
}

impl Llama {
    /// Read an HF Llama-family folder (`model.safetensors` or shards).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = LlamaConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        let mut names = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".to_string(),
        ];
        for l in 0..cfg.num_hidden_layers {
            names.extend(DecoderBlock::names("model.", l, &|n| files.contains(n)));
        }
        for head in ["lm_head.weight", "score.weight"] {
            if files.contains(head) {
                names.push(head.to_string());
            }
        }
        let mut t: BTreeMap<String, Tensor> = (files.read(&names)?.into_iter())
            .map(|(n, h)| (n, to_tch(&h)))
            .collect();
        let eps = cfg.rms_norm_eps;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| DecoderBlock::take("model.", l, eps, &mut t, dir))
            .collect::<Result<Vec<_>>>()?;
        let mut take = |name: &str| take_tensor(&mut t, name, dir);
        Ok(Self {
            embed: take("model.embed_tokens.weight")?,
            norm: RmsNorm {
                w: take("model.norm.weight")?,
                eps,
            },
            lm_head: take("lm_head.weight").ok(),
            score: take("score.weight").ok(),
            blocks,
            cfg,
        })
    }

    /// A randomly initialised causal LM as transformers initialises one (weights N(0, 0.02),
    /// biases 0 when `attention_bias`/`mlp_bias`), its norms perturbed around 1 so they matter.
    pub fn init(cfg: LlamaConfig) -> Self {
        let normal = |shape: &[i64]| Tensor::randn(shape, crate::core::tensor::F32) * 0.02;
        let (d, i) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let hd = cfg.head_dim() as i64;
        let (q, kv) = (
            cfg.num_attention_heads as i64 * hd,
            cfg.kv_heads() as i64 * hd,
        );
        let proj = |out: i64, inp: i64, bias: bool| Proj {
            w: normal(&[out, inp]),
            b: bias.then(|| Tensor::zeros([out], crate::core::tensor::F32)),
        };
        let norm = || RmsNorm {
            w: Tensor::randn([d], crate::core::tensor::F32) * 0.1 + 1.0,
            eps: cfg.rms_norm_eps,
        };
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        let blocks = (0..cfg.num_hidden_layers)
            .map(|_| DecoderBlock {
                ln_attn: norm(),
                q: proj(q, d, ab),
                k: proj(kv, d, ab),
                v: proj(kv, d, ab),
                o: proj(d, q, ab),
                ln_mlp: norm(),
                gate: proj(i, d, mb),
                up: proj(i, d, mb),
                down: proj(d, i, mb),
            })
            .collect();
        Self {
            embed: normal(&[cfg.vocab_size as i64, d]),
            norm: norm(),
            lm_head: Some(normal(&[cfg.vocab_size as i64, d])),
            score: None,
            blocks,
            cfg,
        }
    }

    /// The model's units as a part holding all of them (views; a classifier's `score` too).
    pub fn part(&self) -> LlamaPart {
        let units = 0..self.cfg.num_hidden_layers + 1;
        let blocks = self
            .blocks
            .iter()
            .map(|b| b.map(&Tensor::shallow_clone))
            .collect();
        LlamaPart {
            cfg: self.cfg.clone(),
            embed: Some(self.embed.shallow_clone()),
            blocks,
            norm: Some(RmsNorm {
                w: self.norm.w.shallow_clone(),
                eps: self.norm.eps,
            }),
            head: (self.score.as_ref().map(score_linear))
                .or_else(|| self.lm_head.as_ref().map(score_linear)),
            readout: if self.score.is_some() {
                Readout::Classes
            } else {
                Readout::NextToken
            },
            units,
        }
    }

    /// The whole model from a part holding every unit, with its head as `score` or `lm_head`
    /// (none: tied embeddings until one is set).
    pub fn from_part(part: LlamaPart) -> Result<Self> {
        let head = part.head.map(|h| h.w);
        let (lm_head, score) = match part.readout {
            Readout::NextToken => (head, None),
            Readout::Classes => (None, head),
        };
        let (Some(embed), Some(norm)) = (part.embed, part.norm) else {
            return Err(Error::Compute(format!(
                "units {:?} are not the whole Llama",
                part.units
            )));
        };
        Ok(Self {
            cfg: LlamaConfig {
                tie_word_embeddings: false,
                ..part.cfg
            },
            embed,
            blocks: part.blocks,
            norm,
            lm_head,
            score,
        })
    }

    /// The model with `f` applied to every tensor (a detached copy, a device move).
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self {
            cfg: self.cfg.clone(),
            embed: f(&self.embed),
            blocks: self.blocks.iter().map(|b| b.map(f)).collect(),
            norm: RmsNorm {
                w: f(&self.norm.w),
                eps: self.norm.eps,
            },
            lm_head: self.lm_head.as_ref().map(f),
            score: self.score.as_ref().map(f),
        }
    }

    /// The final hidden states [B, T, d] (after the final norm) of token ids [B, T] (i64) with
    /// attention mask [B, T].
    pub fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let ctx = AttentionContext::new(&self.cfg, mask);
        let mut x = self
            .embed
            .index_select(0, &ids.reshape([-1]))
            .view([ids.size()[0], ids.size()[1], -1].as_slice());
        for b in &self.blocks {
            x = b.forward(&x, &ctx);
        }
        self.norm.forward(&x)
    }

    /// Next-token logits [B, T, V]: the LM head, or the embeddings when tied.
    pub fn lm_logits(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let head = match (&self.lm_head, self.cfg.tie_word_embeddings) {
            (Some(h), _) => h,
            (None, true) => &self.embed,
            (None, false) => {
                return Err(Error::Compute(
                    "the model has no lm_head.weight and does not tie its embeddings".into(),
                ))
            }
        };
        Ok(self.hidden(ids, mask).matmul(&head.tr()))
    }

    /// A sequence classifier's logits [B, labels]: `score` at each row's last token, as
    /// transformers reads it (the last position whose mask is 1).
    pub fn sequence_logits(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let score = self.score.as_ref().ok_or_else(|| {
            Error::Compute("the model has no score.weight (not a sequence classifier)".into())
        })?;
        Ok(last_token(&self.hidden(ids, mask), mask).matmul(&score.tr()))
    }

    /// Every tensor under its HF name: the body under `model.`, then `lm_head.weight` and
    /// `score.weight` when the model has them.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (l, b) in self.blocks.iter().enumerate() {
            v.extend(b.named("model.", l));
        }
        v.push(("model.norm.weight".to_string(), &self.norm.w));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h));
        }
        if let Some(s) = &self.score {
            v.push(("score.weight".to_string(), s));
        }
        v
    }

    /// Save as an HF folder transformers loads: a `…ForSequenceClassification` when the model
    /// has `score` (its labels `labels`, else `LABEL_i`), else a `…ForCausalLM` (its own
    /// `lm_head`, or tied embeddings); shards of at most `max_shard_bytes`.
    pub fn save_labeled(&self, dir: &Path, labels: &[String], max_shard_bytes: u64) -> Result<()> {
        write_hf_weights(dir, self.named(), max_shard_bytes)?;
        write_json(&dir.join("config.json"), &self.config_json(labels))
    }

    /// `save_labeled` with `LABEL_i` labels in one shard of the default size.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_labeled(dir, &[], DEFAULT_MAX_SHARD_BYTES)
    }

    /// The HF `config.json` of the model as `save_labeled` writes it.
    pub fn config_json(&self, labels: &[String]) -> serde_json::Value {
        let head = match &self.score {
            Some(s) => {
                let names: Vec<String> = (0..s.size()[0] as usize)
                    .map(|i| labels.get(i).cloned().unwrap_or(format!("LABEL_{i}")))
                    .collect();
                Head::Classifier(names)
            }
            None => Head::CausalLm {
                tied: self.lm_head.is_none(),
            },
        };
        config_json(&self.cfg, &head)
    }
}

/// What a saved Llama's head is, for its `config.json`.
pub enum Head {
    /// `…ForCausalLM`, its LM head tied to the embeddings or its own.
    CausalLm { tied: bool },
    /// `…ForSequenceClassification` with these labels.
    Classifier(Vec<String>),
}

/// The HF `config.json` of a Llama-family model of `c` with head `head` (fp32; a writer in
/// another precision overrides `torch_dtype`).
pub fn config_json(c: &LlamaConfig, head: &Head) -> serde_json::Value {
    let family = match c.model_type.as_str() {
        "qwen2" => "Qwen2",
        "mistral" => "Mistral",
        _ => "Llama",
    };
    let (class, tied) = match head {
        Head::Classifier(_) => ("ForSequenceClassification", false),
        Head::CausalLm { tied } => ("ForCausalLM", *tied),
    };
    let mut v = serde_json::json!({
        "architectures": [format!("{family}{class}")],
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": c.hidden_act,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "tie_word_embeddings": tied,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": "float32",
    });
    // The originals' window as they had it (Mistral's config defaults one when absent).
    if let Some(w) = c.sliding_window {
        v["sliding_window"] = w.into();
    }
    if let Some(u) = c.use_sliding_window {
        v["use_sliding_window"] = u.into();
    }
    if let Head::Classifier(labels) = head {
        let id2label: serde_json::Map<String, serde_json::Value> = (labels.iter().enumerate())
            .map(|(i, l)| (i.to_string(), l.clone().into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = (labels.iter().enumerate())
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        v["id2label"] = id2label.into();
        v["label2id"] = label2id.into();
    }
    v
}
