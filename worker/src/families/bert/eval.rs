//! A BERT stage's models for evaluation on the workers: every original's units (each through
//! its own head on the last stage), and a standard BERT's units built from merged tensors.
//! Every stage reads the attention mask from the evaluation rows it holds.

use crate::core::baselines::{regmean_block, RegmeanSums};
use crate::core::linear::Linear;
use crate::data::text::tokens;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{first_or_average, MergedPart, ModelPart, Readout};
use crate::dist::stage::{head_pair, own_rows, take_task_heads, StageData};
use crate::families::bert::model::{mask_bias, BertPart, BERT_BLOCK, TABLE_NAMES};
use fsmerge_common::hf::BertConfig;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use tch::Tensor;

impl ModelPart for BertPart {
    /// On text rows `rows` (their token ids on the stage with the embeddings, else the
    /// stream), with their attention mask: the last unit's stream, or on the last stage the
    /// pooled output (`[CLS]` of the last state without a pooler).
    fn output(&self, rows: &Tensor, stream: Option<Tensor>) -> Tensor {
        let (ids, mask) = tokens(rows);
        let input = match (&self.embeddings, stream) {
            (None, Some(s)) => s,
            _ => ids,
        };
        run_part(self, input, &mask)
    }
}

/// The part on its input (token ids, or the stream) with the attention mask `mask`.
fn run_part(part: &BertPart, input: Tensor, mask: &Tensor) -> Tensor {
    let last = part.units.end == part.cfg.num_hidden_layers + 1;
    let out = part.trace(&input, mask).pop().unwrap_or(input);
    if last && part.pooler.is_none() {
        out.select(1, 0)
    } else {
        out
    }
}

/// A standard BERT's units `units` from tensors under the merged model's names, with every
/// task's head on the last stage.
pub fn merged_part(
    cfg: BertConfig,
    units: Range<usize>,
    tasks: &[String],
    mut tensors: BTreeMap<String, Tensor>,
) -> Result<MergedPart<BertPart>> {
    let last = units.end == cfg.num_hidden_layers + 1;
    let heads = if last {
        take_task_heads(tasks, &mut tensors)?
    } else {
        Vec::new()
    };
    let part = BertPart::from_tensors(cfg, units, "", tensors)?;
    Ok(MergedPart {
        part,
        heads,
        readout: Readout::Classes,
    })
}

/// One original's tensors of its part under the merged model's names, with `classifier` as
/// task `task`'s head on the last stage.
pub fn named(part: &BertPart, task: &str, classifier: Option<&Linear>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = Vec::new();
    if let Some((tables, ln)) = &part.embeddings {
        v.extend(
            TABLE_NAMES
                .iter()
                .map(|n| n.to_string())
                .zip(tables.iter().map(Tensor::shallow_clone)),
        );
        v.push(("embeddings.LayerNorm.weight".into(), ln.w.shallow_clone()));
        v.push(("embeddings.LayerNorm.bias".into(), ln.b.shallow_clone()));
    }
    let first = crate::core::transformer::unit_blocks(&part.units).start;
    for (j, b) in part.blocks.iter().enumerate() {
        v.extend(
            b.named(first + j, &BERT_BLOCK)
                .into_iter()
                .map(|(n, t)| (n, t.shallow_clone())),
        );
    }
    if let Some(p) = &part.pooler {
        v.push(("pooler.dense.weight".into(), p.w.shallow_clone()));
        v.push(("pooler.dense.bias".into(), p.b.shallow_clone()));
    }
    if let Some(c) = classifier {
        v.extend(head_pair(task, c));
    }
    v
}

/// RegMean of a stage's units (method.md §13): every linear map of every block, and the
/// pooler, solved from its inputs inside each model on its own task's merge rows (the teacher
/// streams `data`; real tokens only, the pooler reads `[CLS]`), everything else averaged; each
/// task keeps its own head. `mask` is the merge rows' attention mask [N, T].
pub fn regmean(
    parts: &[BertPart],
    tensors: Vec<Vec<(String, Tensor)>>,
    data: &StageData,
    mask: &Tensor,
    alpha: f64,
) -> Result<BTreeMap<String, Tensor>> {
    let merged = first_or_average(tensors, true);
    let Some(p0) = parts.first() else {
        return Ok(merged);
    };
    let heads = p0.cfg.num_attention_heads as i64;
    let start = p0.units.start;
    let first = crate::core::transformer::unit_blocks(&p0.units).start;
    tch::no_grad(|| {
        // Each model's own task: the bias of its mask and the rows of its real tokens.
        let own: Vec<(Tensor, Tensor)> = (0..parts.len())
            .map(|i| {
                let rows = data.task.eq(i as i64).nonzero().squeeze_dim(1);
                let m = mask.index_select(0, &rows);
                let real = m.flatten(0, -1).nonzero().squeeze_dim(1);
                (mask_bias(&m), real)
            })
            .collect();
        let real_rows =
            |x: &Tensor, real: &Tensor| x.reshape([-1, x.size()[2]]).index_select(0, real);
        for j in 0..p0.blocks.len() {
            let l = first + j;
            let models: Vec<_> = (parts.iter().enumerate())
                .map(|(i, p)| {
                    let x = own_rows(data.stream(start, l), data, i);
                    let (bias, real) = &own[i];
                    let (inputs, _) = p.blocks[j].linear_inputs_post_ln(&x, bias, heads);
                    (&p.blocks[j], inputs.map(|t| real_rows(&t, real)))
                })
                .collect();
            regmean_block(&merged, l, &BERT_BLOCK, &models, alpha)?;
        }
        if let Some(w) = merged.get("pooler.dense.weight") {
            let last = p0.units.end - 1;
            let mut sums = RegmeanSums::default();
            for (i, p) in parts.iter().enumerate() {
                if let Some(pooler) = &p.pooler {
                    let cls = own_rows(data.stream(start, last), data, i).select(1, 0);
                    sums.add(&cls, &pooler.w, alpha);
                }
            }
            let target = Linear {
                w: w.shallow_clone(),
                b: Tensor::zeros([0], (tch::Kind::Float, w.device())),
            };
            sums.solve_into(&target, "pooler")?;
        }
        Ok(merged)
    })
}

/// KD's student on a BERT stage: a trainable copy of model 1's part (no classifier), with the
/// merge rows' attention mask [N, T].
pub struct Student {
    part: BertPart,
    mask: Tensor,
}

impl Student {
    pub fn of(model1: &BertPart, mask: &Tensor) -> Result<Self> {
        // Trained in fp32 whatever the originals' precision.
        let tensors = (named(model1, "", None).into_iter())
            .map(|(n, t)| (n, crate::core::tensor::f32(&t.detach()).copy()))
            .collect();
        let part = BertPart::from_tensors(model1.cfg.clone(), model1.units.clone(), "", tensors)?;
        Ok(Self {
            part,
            mask: mask.shallow_clone(),
        })
    }
}

impl StudentPart for Student {
    fn params(&self) -> Vec<Tensor> {
        self.named().into_iter().map(|(_, t)| t).collect()
    }
    fn forward(&self, input: &Tensor, idx: &Tensor) -> Tensor {
        let x = match &self.part.embeddings {
            Some(_) => tokens(input).0,
            None => input.shallow_clone(),
        };
        run_part(&self.part, x, &self.mask.index_select(0, idx))
    }
    fn named(&self) -> Vec<(String, Tensor)> {
        named(&self.part, "", None)
    }
}
