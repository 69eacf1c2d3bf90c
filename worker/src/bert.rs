//! Hugging Face BERT (`BertModel` / `BertForSequenceClassification`) on tch: word, position
//! and token-type embeddings, post-LN encoder blocks, exact GELU, a padding mask. Loaded from an
//! HF folder with the HF tensor names, with or without the `bert.` prefix.

use crate::mlp::Linear;
use crate::tensor::{to_host, to_tch};
use crate::vit::{attention, LayerNorm};
use fsmerge_common::checkpoint::{write_json, write_tensors, HostTensor};
use fsmerge_common::hf::{BertConfig, WeightFiles};
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
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
    /// `pooler.dense` (tanh after it), when the checkpoint has one.
    pub pooler: Option<Linear>,
    /// `BertForSequenceClassification`'s head on the pooled output, when the checkpoint has one.
    pub classifier: Option<Linear>,
}

impl BertBlock {
    /// Post-LN block: x ← LN_att(x + out(attention(x))); x ← LN_out(x + fc2(gelu(fc1 x))).
    pub fn forward(&self, h: &Tensor, bias: &Tensor, heads: i64) -> Tensor {
        let ctx = attention(h, &self.q, &self.k, &self.v, heads, Some(bias));
        let h = self.ln_att.forward(&(h + self.out.forward(&ctx)));
        let m = self.fc2.forward(&self.fc1.forward(&h).gelu("none"));
        self.ln_out.forward(&(h + m))
    }

    /// The inputs of the block's linear maps — the stream (Q, K, V), the attention context
    /// (output projection), the post-attention stream (fc1), the activations (fc2) — and the
    /// block's output (RegMean's Gram matrices).
    pub fn linear_inputs(&self, h: &Tensor, bias: &Tensor, heads: i64) -> ([Tensor; 4], Tensor) {
        let ctx = attention(h, &self.q, &self.k, &self.v, heads, Some(bias));
        let a = self.ln_att.forward(&(h + self.out.forward(&ctx)));
        let z = self.fc1.forward(&a).gelu("none");
        let y = self.ln_out.forward(&(&a + self.fc2.forward(&z)));
        ([h.shallow_clone(), ctx, a, z], y)
    }
}

/// The additive attention mask of transformers: 0 where `mask` is 1, the float minimum where 0;
/// [B, 1, 1, T].
pub fn mask_bias(mask: &Tensor) -> Tensor {
    let (b, t) = mask.size2().unwrap_or((0, 0));
    let padding: Tensor = mask.to_kind(Kind::Float).neg() + 1.0;
    padding.view([b, 1, 1, t]) * f64::from(f32::MIN)
}

/// Word + position + token-type (type 0) embeddings of ids [B, T], before the LayerNorm.
pub fn embed_tokens(word: &Tensor, position: &Tensor, token_type: &Tensor, ids: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
    word.index_select(0, &ids.flatten(0, -1))
        .view([ids.size()[0], t, -1])
        + position.index_select(0, &pos).unsqueeze(0)
        + token_type.get(0)
}

impl Bert {
    /// A randomly initialised BERT with a pooler, as transformers initialises one (weights
    /// N(0, 0.02), biases 0, LayerNorms (1, 0)).
    pub fn init(cfg: BertConfig) -> Self {
        let (d, h) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let normal = |shape: &[i64]| Tensor::randn(shape, crate::tensor::F32) * 0.02;
        let lin = |o: i64, i: i64| Linear {
            w: normal(&[o, i]),
            b: Tensor::zeros([o], crate::tensor::F32),
        };
        let ln = || LayerNorm {
            w: Tensor::ones([d], crate::tensor::F32),
            b: Tensor::zeros([d], crate::tensor::F32),
            eps: cfg.layer_norm_eps,
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|_| BertBlock {
                q: lin(d, d),
                k: lin(d, d),
                v: lin(d, d),
                out: lin(d, d),
                ln_att: ln(),
                fc1: lin(h, d),
                fc2: lin(d, h),
                ln_out: ln(),
            })
            .collect();
        Self {
            word: normal(&[cfg.vocab_size as i64, d]),
            position: normal(&[cfg.max_position_embeddings as i64, d]),
            token_type: normal(&[cfg.type_vocab_size as i64, d]),
            ln_emb: ln(),
            blocks,
            pooler: Some(lin(d, d)),
            classifier: None,
            cfg,
        }
    }

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
        let pooler = files.contains(&format!("{prefix}pooler.dense.weight"));
        if pooler {
            names.push(format!("{prefix}pooler.dense.weight"));
            names.push(format!("{prefix}pooler.dense.bias"));
        }
        let classifier = files.contains("classifier.weight");
        if classifier {
            names.push("classifier.weight".into());
            names.push("classifier.bias".into());
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
        let pooler = pooler.then(|| Linear {
            w: take(format!("{prefix}pooler.dense.weight")),
            b: take(format!("{prefix}pooler.dense.bias")),
        });
        let classifier = classifier.then(|| Linear {
            w: take("classifier.weight".into()),
            b: take("classifier.bias".into()),
        });
        if classifier.is_some() && pooler.is_none() {
            return Err(Error::Tensor {
                file: dir.to_path_buf(),
                tensor: format!("{prefix}pooler.dense.weight"),
                msg: "a sequence classifier reads the pooler, which the weights lack".into(),
            });
        }
        Ok(Self {
            cfg,
            word,
            position,
            token_type,
            ln_emb,
            blocks,
            pooler,
            classifier,
        })
    }

    /// The embeddings' output (after their LayerNorm) [B, T, d] for token ids [B, T].
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let emb = embed_tokens(&self.word, &self.position, &self.token_type, ids);
        self.ln_emb.forward(&emb)
    }

    /// Every hidden state as `transformers` reports them (embeddings, then each block's
    /// output) for token ids [B, T] and an attention mask [B, T] (1 = token, 0 = padding).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Vec<Tensor> {
        let mut h = self.embed(ids);
        let bias = mask_bias(mask);
        let heads = self.cfg.num_attention_heads as i64;
        let mut states = vec![h.shallow_clone()];
        for b in &self.blocks {
            h = b.forward(&h, &bias, heads);
            states.push(h.shallow_clone());
        }
        states
    }

    /// The same BERT with every tensor passed through `f` (e.g. a detached copy).
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        let lin = |l: &Linear| Linear {
            w: f(&l.w),
            b: f(&l.b),
        };
        let ln = |l: &LayerNorm| LayerNorm {
            w: f(&l.w),
            b: f(&l.b),
            eps: l.eps,
        };
        Self {
            cfg: self.cfg.clone(),
            word: f(&self.word),
            position: f(&self.position),
            token_type: f(&self.token_type),
            ln_emb: ln(&self.ln_emb),
            blocks: self
                .blocks
                .iter()
                .map(|b| BertBlock {
                    q: lin(&b.q),
                    k: lin(&b.k),
                    v: lin(&b.v),
                    out: lin(&b.out),
                    ln_att: ln(&b.ln_att),
                    fc1: lin(&b.fc1),
                    fc2: lin(&b.fc2),
                    ln_out: ln(&b.ln_out),
                })
                .collect(),
            pooler: self.pooler.as_ref().map(lin),
            classifier: self.classifier.as_ref().map(lin),
        }
    }

    /// A detached copy.
    pub fn copy(&self) -> Self {
        self.map(&|t| t.detach().copy())
    }

    /// Every tensor (classifier last), for training the whole model.
    pub fn params(&self) -> Vec<Tensor> {
        let mut v: Vec<Tensor> = self
            .encoder_tensors()
            .into_iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        if let Some(c) = &self.classifier {
            v.push(c.w.shallow_clone());
            v.push(c.b.shallow_clone());
        }
        v
    }

    /// The encoder's and pooler's tensors with their HF names (`BertModel`, no prefix).
    pub fn encoder_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut named: Vec<(String, &Tensor)> = vec![
            ("embeddings.word_embeddings.weight".into(), &self.word),
            (
                "embeddings.position_embeddings.weight".into(),
                &self.position,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                &self.token_type,
            ),
            ("embeddings.LayerNorm.weight".into(), &self.ln_emb.w),
            ("embeddings.LayerNorm.bias".into(), &self.ln_emb.b),
        ];
        for (l, b) in self.blocks.iter().enumerate() {
            let base = format!("encoder.layer.{l}");
            for (part, w, bias) in [
                ("attention.self.query", &b.q.w, &b.q.b),
                ("attention.self.key", &b.k.w, &b.k.b),
                ("attention.self.value", &b.v.w, &b.v.b),
                ("attention.output.dense", &b.out.w, &b.out.b),
                ("attention.output.LayerNorm", &b.ln_att.w, &b.ln_att.b),
                ("intermediate.dense", &b.fc1.w, &b.fc1.b),
                ("output.dense", &b.fc2.w, &b.fc2.b),
                ("output.LayerNorm", &b.ln_out.w, &b.ln_out.b),
            ] {
                named.push((format!("{base}.{part}.weight"), w));
                named.push((format!("{base}.{part}.bias"), bias));
            }
        }
        if let Some(p) = &self.pooler {
            named.push(("pooler.dense.weight".into(), &p.w));
            named.push(("pooler.dense.bias".into(), &p.b));
        }
        named
    }

    /// Write an HF `BertModel` folder (`config.json` + `model.safetensors`, no prefix), loadable
    /// by `BertModel.from_pretrained`; with a classifier, a `BertForSequenceClassification`
    /// folder (encoder under `bert.`) whose labels are `labels` (or `LABEL_i` when empty).
    pub fn save(&self, dir: &Path, labels: &[String]) -> Result<()> {
        let named = self.encoder_tensors();
        // A sequence classifier is saved as transformers does: the encoder under `bert.`.
        let prefix = if self.classifier.is_some() {
            "bert."
        } else {
            ""
        };
        let mut named: Vec<(String, &Tensor)> = named
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t))
            .collect();
        if let Some(c) = &self.classifier {
            named.push(("classifier.weight".into(), &c.w));
            named.push(("classifier.bias".into(), &c.b));
        }
        let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
        for (name, t) in named {
            tensors.insert(name, to_host(t)?);
        }
        let (arch, outputs) = match &self.classifier {
            Some(c) => ("BertForSequenceClassification", c.w.size()[0]),
            None => ("BertModel", 2),
        };
        let id2label: serde_json::Map<String, serde_json::Value> = (0..outputs)
            .map(|i| {
                let name = labels
                    .get(i as usize)
                    .cloned()
                    .unwrap_or(format!("LABEL_{i}"));
                (i.to_string(), name.into())
            })
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = id2label
            .iter()
            .map(|(i, name)| {
                (
                    name.as_str().unwrap_or(i).to_string(),
                    i.parse::<i64>().unwrap_or(0).into(),
                )
            })
            .collect();
        write_tensors(&dir.join("model.safetensors"), &tensors)?;
        let c = &self.cfg;
        write_json(
            &dir.join("config.json"),
            &serde_json::json!({
                "architectures": [arch],
                "model_type": "bert",
                "id2label": id2label,
                "label2id": label2id,
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "hidden_act": c.hidden_act,
                "layer_norm_eps": c.layer_norm_eps,
                "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_position_embeddings,
                "type_vocab_size": c.type_vocab_size,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "initializer_range": 0.02,
                "pad_token_id": 0,
                "position_embedding_type": "absolute",
                "torch_dtype": "float32",
            }),
        )
    }

    /// The pooler's output tanh(dense(h[CLS])) [B, d] (what a sequence classifier reads and
    /// what FS-Merge reconstructs for BERT), if the checkpoint has a pooler.
    pub fn pooled(&self, ids: &Tensor, mask: &Tensor) -> Option<Tensor> {
        let last = self.forward(ids, mask).pop()?;
        self.pooler
            .as_ref()
            .map(|p| p.forward(&last.select(1, 0)).tanh())
    }

    /// `BertForSequenceClassification`'s logits (its classifier on the pooled output), if the
    /// checkpoint has that head.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor) -> Option<Tensor> {
        let c = self.classifier.as_ref()?;
        self.pooled(ids, mask).map(|p| c.forward(&p))
    }

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
