//! Hugging Face BERT (`BertModel` / `BertForSequenceClassification`) on tch: word, position
//! and token-type embeddings, post-LN encoder blocks, exact GELU, a padding mask. Loaded from an
//! HF folder with the HF tensor names, with or without the `bert.` prefix.

use crate::core::encoder_block::{EncoderBlock, Layout, Part};
use crate::core::layer_norm::LayerNorm;
use crate::core::linear::Linear;
use crate::core::tensor::{to_tch, write_hf_weights};
use crate::core::transformer::{check_part_units, unit_blocks};
use fsmerge_common::checkpoint::write_json;
use fsmerge_common::hf::{BertConfig, WeightFiles};
use fsmerge_common::hf_writer::DEFAULT_MAX_SHARD_BYTES;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use tch::{Kind, Tensor};

pub struct Bert {
    pub cfg: BertConfig,
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    pub ln_emb: LayerNorm,
    pub blocks: Vec<EncoderBlock>,
    /// `pooler.dense` (tanh after it), when the checkpoint has one.
    pub pooler: Option<Linear>,
    /// `BertForSequenceClassification`'s head on the pooled output, when the checkpoint has one.
    pub classifier: Option<Linear>,
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
        let normal = |shape: &[i64]| Tensor::randn(shape, crate::core::tensor::F32) * 0.02;
        let lin = |o: i64, i: i64| Linear {
            w: normal(&[o, i]),
            b: Tensor::zeros([o], crate::core::tensor::F32),
        };
        let ln = || LayerNorm {
            w: Tensor::ones([d], crate::core::tensor::F32),
            b: Tensor::zeros([d], crate::core::tensor::F32),
            eps: cfg.layer_norm_eps,
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|_| EncoderBlock::init(d, h, cfg.layer_norm_eps, &lin))
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

    /// Load an HF BERT folder (`BertModel` or `BertForSequenceClassification`).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = BertConfig::load(dir)?;
        let units = 0..cfg.num_hidden_layers + 1;
        BertPart::load(dir, units)?.into_bert()
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
            h = b.forward_post_ln(&h, &bias, heads);
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
            blocks: self.blocks.iter().map(|b| b.map(f)).collect(),
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
        let tables = [&self.word, &self.position, &self.token_type];
        let mut named: Vec<(String, &Tensor)> = TABLE_NAMES
            .iter()
            .map(|n| n.to_string())
            .zip(tables)
            .collect();
        named.extend([
            ("embeddings.LayerNorm.weight".into(), &self.ln_emb.w),
            ("embeddings.LayerNorm.bias".into(), &self.ln_emb.b),
        ]);
        for (l, b) in self.blocks.iter().enumerate() {
            named.extend(b.named(l, &BERT_BLOCK));
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
        self.save_sharded(dir, labels, DEFAULT_MAX_SHARD_BYTES)
    }

    /// `save`, with the weights in safetensors shards of at most `max_shard_bytes`.
    pub fn save_sharded(&self, dir: &Path, labels: &[String], max_shard_bytes: u64) -> Result<()> {
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
        write_hf_weights(dir, named, max_shard_bytes)?;
        let outputs = self.classifier.as_ref().map(|c| c.w.size()[0]);
        write_json(
            &dir.join("config.json"),
            &config_json(&self.cfg, labels, outputs),
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
            .unwrap_or_else(|| Tensor::zeros([0], crate::core::tensor::F32));
        let m = mask.to_kind(Kind::Float).unsqueeze(-1);
        let mean = (last * &m).sum_dim_intlist(1, false, None)
            / m.sum_dim_intlist(1, false, None).clamp_min(1e-9);
        let norm = mean.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
        mean / norm
    }
}

/// HF names of the embeddings' tables (word, position, token type), without prefix.
pub(crate) const TABLE_NAMES: [&str; 3] = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
];

/// HF names of a BERT block's parts (`BertLayer`), in the order of its tensors.
pub const BERT_BLOCK: Layout = [
    ("attention.self.query", Part::Q),
    ("attention.self.key", Part::K),
    ("attention.self.value", Part::V),
    ("attention.output.dense", Part::Out),
    ("attention.output.LayerNorm", Part::LnAttn),
    ("intermediate.dense", Part::Fc1),
    ("output.dense", Part::Fc2),
    ("output.LayerNorm", Part::LnMlp),
];

/// The tensors of one part of a BERT, as a pipeline stage holds them: plan units `units`
/// (unit 0 is the embeddings, unit 1 + l is block l). The part that ends with the last block
/// also holds the pooler and the classifier, when the model has them.
pub struct BertPart {
    pub cfg: BertConfig,
    pub units: Range<usize>,
    /// The (word, position, token type) tables and the embeddings' LayerNorm.
    pub embeddings: Option<([Tensor; 3], LayerNorm)>,
    /// Blocks `unit_blocks(&units)`, in order.
    pub blocks: Vec<EncoderBlock>,
    pub pooler: Option<Linear>,
    pub classifier: Option<Linear>,
}

impl BertPart {
    /// Read plan units `units` of the HF BERT folder `dir` (only their tensors are read; the
    /// encoder's names with or without the `bert.` prefix).
    pub fn load(dir: &Path, units: Range<usize>) -> Result<Self> {
        let cfg = BertConfig::load(dir)?;
        let count = cfg.num_hidden_layers + 1;
        check_part_units(dir, &units, cfg.num_hidden_layers, "BERT")?;
        let files = WeightFiles::open(dir)?;
        let prefix = if files.contains(&format!("bert.{}", TABLE_NAMES[0])) {
            "bert."
        } else {
            ""
        };
        let last = units.end == count;
        let pooler = last && files.contains(&format!("{prefix}pooler.dense.weight"));
        let classifier = last && files.contains("classifier.weight");
        if classifier && !pooler {
            return Err(Error::Tensor {
                file: dir.to_path_buf(),
                tensor: format!("{prefix}pooler.dense.weight"),
                msg: "a sequence classifier reads the pooler, which the weights lack".into(),
            });
        }
        let mut names: Vec<String> = Vec::new();
        if units.start == 0 {
            names.extend(TABLE_NAMES.iter().map(|n| format!("{prefix}{n}")));
            names.extend(
                ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
                    .map(|n| format!("{prefix}{n}")),
            );
        }
        for l in unit_blocks(&units) {
            for (p, _) in BERT_BLOCK {
                for wb in ["weight", "bias"] {
                    names.push(format!("{prefix}encoder.layer.{l}.{p}.{wb}"));
                }
            }
        }
        if pooler {
            names.extend(
                ["pooler.dense.weight", "pooler.dense.bias"].map(|n| format!("{prefix}{n}")),
            );
        }
        if classifier {
            names.extend([
                "classifier.weight".to_string(),
                "classifier.bias".to_string(),
            ]);
        }
        let tensors = files
            .read(&names)?
            .into_iter()
            .map(|(n, h)| (n, to_tch(&h)))
            .collect();
        Self::from_tensors(cfg, units, prefix, tensors).map_err(|e| match e {
            Error::Compute(msg) => Error::Checkpoint {
                file: dir.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    /// Build the part from its tensors under their HF names (`prefix` before every name but the
    /// classifier's). The embeddings and blocks of `units` must be there; on the last part the
    /// pooler and classifier are taken when present.
    pub fn from_tensors(
        cfg: BertConfig,
        units: Range<usize>,
        prefix: &str,
        mut t: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let last = units.end == cfg.num_hidden_layers + 1;
        let has_pooler = last && t.contains_key(&format!("{prefix}pooler.dense.weight"));
        let has_classifier = last && t.contains_key("classifier.weight");
        let mut take = |n: &str| -> Result<Tensor> {
            t.remove(n)
                .ok_or_else(|| Error::Compute(format!("the BERT's tensor `{n}` is missing")))
        };
        let eps = cfg.layer_norm_eps;
        let embeddings = if units.start == 0 {
            let [w, p, ty] = TABLE_NAMES.map(|n| format!("{prefix}{n}"));
            let tables = [take(&w)?, take(&p)?, take(&ty)?];
            let ln = LayerNorm {
                w: take(&format!("{prefix}embeddings.LayerNorm.weight"))?,
                b: take(&format!("{prefix}embeddings.LayerNorm.bias"))?,
                eps,
            };
            Some((tables, ln))
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
            blocks.push(EncoderBlock::from_pairs(&BERT_BLOCK, eps, &mut pair)?);
        }
        let pooler = if has_pooler {
            Some(Linear {
                w: take(&format!("{prefix}pooler.dense.weight"))?,
                b: take(&format!("{prefix}pooler.dense.bias"))?,
            })
        } else {
            None
        };
        let classifier = if has_classifier {
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
            pooler,
            classifier,
        })
    }

    /// The whole model, when this part holds every unit.
    pub fn into_bert(self) -> Result<Bert> {
        let whole = 0..self.cfg.num_hidden_layers + 1;
        match self.embeddings {
            Some(([word, position, token_type], ln_emb)) if self.units == whole => Ok(Bert {
                cfg: self.cfg,
                word,
                position,
                token_type,
                ln_emb,
                blocks: self.blocks,
                pooler: self.pooler,
                classifier: self.classifier,
            }),
            _ => Err(Error::Compute(format!(
                "units {:?} are part of a BERT, not all of its {}",
                self.units, whole.end
            ))),
        }
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

    /// Bytes of the part's tensors, in the precision they are stored in.
    pub fn bytes(&self) -> u64 {
        let mut ts = self.body();
        if let Some(c) = &self.classifier {
            ts.extend([&c.w, &c.b]);
        }
        ts.iter().map(|t| crate::core::tensor::bytes_of(t)).sum()
    }

    /// The kind the body is stored in.
    fn kind(&self) -> tch::Kind {
        self.body().first().map_or(tch::Kind::Float, |t| t.kind())
    }

    /// Every tensor but the classifier.
    fn body(&self) -> Vec<&Tensor> {
        let mut ts: Vec<&Tensor> = Vec::new();
        if let Some((tables, ln)) = &self.embeddings {
            ts.extend(tables.iter());
            ts.extend([&ln.w, &ln.b]);
        }
        for b in &self.blocks {
            ts.extend(b.named(0, &BERT_BLOCK).into_iter().map(|(_, t)| t));
        }
        if let Some(l) = &self.pooler {
            ts.extend([&l.w, &l.b]);
        }
        ts
    }

    fn map_body(&mut self, f: &dyn Fn(&Tensor) -> Tensor) {
        let mut ts: Vec<&mut Tensor> = Vec::new();
        if let Some((tables, ln)) = &mut self.embeddings {
            ts.extend(tables.iter_mut());
            ts.extend([&mut ln.w, &mut ln.b]);
        }
        for b in &mut self.blocks {
            for l in [
                &mut b.q, &mut b.k, &mut b.v, &mut b.out, &mut b.fc1, &mut b.fc2,
            ] {
                ts.extend([&mut l.w, &mut l.b]);
            }
            for n in [&mut b.ln_attn, &mut b.ln_mlp] {
                ts.extend([&mut n.w, &mut n.b]);
            }
        }
        for l in self.pooler.iter_mut() {
            ts.extend([&mut l.w, &mut l.b]);
        }
        for t in ts {
            *t = f(t);
        }
    }

    /// The part's units on one model's input: token ids [B, T] when it holds the embeddings,
    /// else the stream [B, T, d], with the attention mask [B, T]. Returns every unit's output
    /// stream, then the pooled output tanh(pooler(h[CLS])) when it holds the pooler.
    pub fn trace(&self, input: &Tensor, mask: &Tensor) -> Vec<Tensor> {
        let heads = self.cfg.num_attention_heads as i64;
        let bias = mask_bias(mask);
        let mut out = Vec::new();
        let mut h = match &self.embeddings {
            Some(([word, position, token_type], ln)) => {
                let e = ln.forward(&embed_tokens(word, position, token_type, input));
                out.push(e.shallow_clone());
                e
            }
            None => input.to_kind(self.kind()),
        };
        for b in &self.blocks {
            h = b.forward_post_ln(&h, &bias, heads);
            out.push(h.shallow_clone());
        }
        if let Some(p) = &self.pooler {
            out.push(p.forward(&h.select(1, 0)).tanh());
        }
        out
    }
}

/// An HF BERT `config.json` for `c`: a `BertForSequenceClassification` with `outputs` labels
/// named by `labels` (`LABEL_i` past them), or a `BertModel` without outputs.
pub fn config_json(c: &BertConfig, labels: &[String], outputs: Option<i64>) -> serde_json::Value {
    let (arch, outputs) = match outputs {
        Some(k) => ("BertForSequenceClassification", k),
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
    serde_json::json!({
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
    })
}
