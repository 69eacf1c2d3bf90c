//! Plan units of one Llama, as a pipeline stage and evaluation hold them: unit 0 is the token
//! embeddings, unit 1 + l is block l; the part with the last block also holds the final RMSNorm
//! and its head: a sequence classifier's `score`, or a causal LM's own `lm_head` (a tied one
//! is refused by `fsmerge check`). Tensors go by the merged model's names:
//! the HF names without the `model.` prefix (`embed_tokens.weight`, `layers.0.…`,
//! `norm.weight`).

use crate::core::linear::Linear;
use crate::core::tensor::{bytes_of, to_tch};
use crate::core::transformer::{check_part_units, unit_blocks};
use crate::dist::evaluate::Readout;
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::model::{take_tensor, AttentionContext, DecoderBlock, RmsNorm};
use fsmerge_common::hf::WeightFiles;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The HF prefix of the body's tensors in `…ForCausalLM` and `…ForSequenceClassification`.
pub const BODY_PREFIX: &str = "model.";

/// A sequence classifier's `score` [labels, d] as a linear map with a zero bias (the heads
/// every family folds U_final into).
pub fn score_linear(score: &Tensor) -> Linear {
    Linear {
        w: score.shallow_clone(),
        b: Tensor::zeros([score.size()[0]], (Kind::Float, score.device())),
    }
}

pub struct LlamaPart {
    pub cfg: LlamaConfig,
    pub units: Range<usize>,
    /// Token embeddings [V, d] (unit 0).
    pub embed: Option<Tensor>,
    pub blocks: Vec<DecoderBlock>,
    /// The final RMSNorm (with the last block).
    pub norm: Option<RmsNorm>,
    /// The head, with the last block when the folder has one, as a linear map with a zero
    /// bias: a sequence classifier's `score` [labels, d] or a causal LM's `lm_head` [V, d].
    pub head: Option<Linear>,
    /// What the head reads: the last real token (`score`) or every token (`lm_head`).
    pub readout: Readout,
}

/// The HF name of a head read out as `readout`.
pub fn head_name(readout: Readout) -> &'static str {
    match readout {
        Readout::Classes => "score.weight",
        Readout::NextToken => "lm_head.weight",
    }
}

impl LlamaPart {
    /// Whether the part holds the last block (and so the final norm).
    pub fn is_last(&self) -> bool {
        self.units.end == self.cfg.num_hidden_layers + 1
    }

    /// The merged names of the units' tensors of a model of `cfg` (a bias where `has`, given
    /// the HF name, says the model has it).
    pub fn names(
        cfg: &LlamaConfig,
        units: &Range<usize>,
        has: &dyn Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut names = Vec::new();
        if units.start == 0 {
            names.push("embed_tokens.weight".to_string());
        }
        for l in unit_blocks(units) {
            let hf = |n: &str| has(&format!("{BODY_PREFIX}{n}"));
            names.extend(DecoderBlock::names("", l, &hf));
        }
        if units.end == cfg.num_hidden_layers + 1 {
            names.push("norm.weight".to_string());
        }
        names
    }

    /// Read units `units` of the HF Llama folder `dir` (only their tensors; `score.weight`, or
    /// else `lm_head.weight`, too on the last part when the folder has it).
    pub fn load(dir: &Path, units: Range<usize>) -> Result<Self> {
        let cfg = LlamaConfig::load(dir)?;
        check_part_units(dir, &units, cfg.num_hidden_layers, "Llama")?;
        let files = WeightFiles::open(dir)?;
        let mut hf: Vec<String> = Self::names(&cfg, &units, &|n| files.contains(n))
            .into_iter()
            .map(|n| format!("{BODY_PREFIX}{n}"))
            .collect();
        let last = units.end == cfg.num_hidden_layers + 1;
        let head = ["score.weight", "lm_head.weight"]
            .into_iter()
            .find(|h| files.contains(h));
        if let (true, Some(h)) = (last, head) {
            hf.push(h.into());
        }
        let tensors = (files.read(&hf)?.into_iter())
            .map(|(n, h)| {
                let name = n
                    .strip_prefix(BODY_PREFIX)
                    .map_or(n.clone(), str::to_string);
                (name, to_tch(&h))
            })
            .collect();
        Self::from_tensors(cfg, units, tensors, dir)
    }

    /// The part from its tensors under the merged names (`score.weight`, else
    /// `lm_head.weight`, taken when there); `file` names a missing one.
    pub fn from_tensors(
        cfg: LlamaConfig,
        units: Range<usize>,
        mut tensors: BTreeMap<String, Tensor>,
        file: &Path,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let embed = if units.start == 0 {
            Some(take_tensor(&mut tensors, "embed_tokens.weight", file)?)
        } else {
            None
        };
        let blocks = unit_blocks(&units)
            .map(|l| DecoderBlock::take("", l, eps, &mut tensors, file))
            .collect::<Result<Vec<_>>>()?;
        let last = units.end == cfg.num_hidden_layers + 1;
        let norm = if last {
            Some(RmsNorm {
                w: take_tensor(&mut tensors, "norm.weight", file)?,
                eps,
            })
        } else {
            None
        };
        let (head, readout) = match tensors.remove("score.weight") {
            Some(s) => (Some(score_linear(&s)), Readout::Classes),
            None => (
                tensors.remove("lm_head.weight").as_ref().map(score_linear),
                Readout::NextToken,
            ),
        };
        // A part without a head (not the last) reads nothing out.
        let readout = if head.is_some() {
            readout
        } else {
            Readout::Classes
        };
        Ok(Self {
            cfg,
            units,
            embed,
            blocks,
            norm,
            head,
            readout,
        })
    }

    /// The units' tensors under the merged names (views; no head).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if let Some(e) = &self.embed {
            v.push(("embed_tokens.weight".to_string(), e.shallow_clone()));
        }
        let first = unit_blocks(&self.units).start;
        for (j, b) in self.blocks.iter().enumerate() {
            v.extend((b.named("", first + j).into_iter()).map(|(n, t)| (n, t.shallow_clone())));
        }
        if let Some(n) = &self.norm {
            v.push(("norm.weight".to_string(), n.w.shallow_clone()));
        }
        v
    }

    /// The part with `f` applied to every tensor but the head (device moves, precision).
    fn map_body(&mut self, f: &dyn Fn(&Tensor) -> Tensor) {
        self.embed = self.embed.as_ref().map(f);
        self.blocks = self.blocks.iter().map(|b| b.map(f)).collect();
        if let Some(n) = &mut self.norm {
            n.w = f(&n.w);
        }
    }

    /// Store the body's tensors in `kind` (`merge.precision`); the head stays fp32.
    pub fn store_in(&mut self, kind: Kind) {
        self.map_body(&|t| t.to_kind(kind));
    }

    pub fn to_device(&mut self, device: Device) {
        self.map_body(&|t| t.to_device(device));
        if let Some(s) = &mut self.head {
            s.w = s.w.to_device(device);
            s.b = s.b.to_device(device);
        }
    }

    /// The kind the body is stored in (`merge.precision`).
    fn kind(&self) -> Kind {
        let first = self.blocks.first().map(|b| &b.ln_attn.w);
        first
            .or(self.norm.as_ref().map(|n| &n.w))
            .map_or(Kind::Float, Tensor::kind)
    }

    /// Bytes of the body's tensors.
    pub fn bytes(&self) -> u64 {
        self.named().iter().map(|(_, t)| bytes_of(t)).sum()
    }

    /// The streams after each unit from the part's input — token ids [B, T] with the
    /// embeddings, else the stream [B, T, d] — with attention mask [B, T]; on the last part
    /// the final hidden states (after the final norm) last.
    pub fn trace(&self, input: &Tensor, mask: &Tensor) -> Vec<Tensor> {
        let ctx = AttentionContext::new(&self.cfg, mask);
        let mut out = Vec::new();
        let mut x = match &self.embed {
            Some(e) => {
                let (b, t) = input.size2().unwrap_or((0, 0));
                let x = e.index_select(0, &input.reshape([-1])).view([b, t, -1]);
                out.push(x.shallow_clone());
                x
            }
            // A stream in another precision (evaluation sends fp32) runs in the part's.
            None => input.to_kind(self.kind()),
        };
        for b in &self.blocks {
            x = b.forward(&x, &ctx);
            out.push(x.shallow_clone());
        }
        if let Some(n) = &self.norm {
            out.push(n.forward(&x));
        }
        out
    }
}
