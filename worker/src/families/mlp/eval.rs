//! An MLP stage's models for evaluation on the workers: every original's layers (each through
//! its own head on the last stage), and a standard MLP's layers built from merged tensors.

use crate::core::baselines::RegmeanSums;
use crate::core::linear::Linear;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{first_or_average, merged_logits, own_heads_logits, EvalPart};
use crate::dist::stage::{head_pair, own_rows, take_task_heads, StageData};
use crate::families::mlp::model::body_forward;
use crate::families::mlp::stage::StageNet;
use fsmerge_common::checkpoint::{body_bias, body_weight};
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use tch::Tensor;

/// Every original's layers of a stage; on the last stage each through its own head.
pub struct OriginalsPart<'a>(pub &'a StageNet);

impl EvalPart for OriginalsPart<'_> {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let stage = self.0;
        let mut h = input.unwrap_or(rows).shallow_clone();
        for l in &stage.layers {
            h = l.branches(&h).relu();
        }
        if stage.last {
            own_heads_logits(&stage.heads, &h)
        } else {
            h
        }
    }
}

/// A standard MLP's layers of a stage and, on the last stage, every task's head.
pub struct MergedPart {
    body: Vec<Linear>,
    heads: Vec<Linear>,
}

impl MergedPart {
    /// The layers of `stage` from tensors under the merged model's names.
    pub fn new(stage: &StageNet, mut tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        let mut take = |name: String| {
            tensors
                .remove(&name)
                .ok_or_else(|| Error::Compute(format!("the merged MLP lacks the tensor `{name}`")))
        };
        let body = (stage.units.clone())
            .map(|l| {
                Ok(Linear {
                    w: take(body_weight(l))?,
                    b: take(body_bias(l))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let heads = if stage.last {
            take_task_heads(&stage.task_names, &mut tensors)?
        } else {
            Vec::new()
        };
        Ok(Self { body, heads })
    }
}

impl EvalPart for MergedPart {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let h = body_forward(&self.body, input.unwrap_or(rows));
        if self.heads.is_empty() {
            h
        } else {
            merged_logits(&self.heads, &h)
        }
    }
}

/// Every original's layers of `stage` under the merged model's names (PyTorch layout), with
/// its own head on the last stage.
pub fn original_tensors(stage: &StageNet) -> Vec<Vec<(String, Tensor)>> {
    (0..stage.n)
        .map(|i| {
            let mut v = Vec::new();
            for (j, layer) in stage.layers.iter().enumerate() {
                let l = stage.units.start + j;
                v.push((body_weight(l), layer.wt.get(i as i64).tr().contiguous()));
                v.push((body_bias(l), layer.b.get(i as i64)));
            }
            if stage.last {
                v.extend(head_pair(&stage.task_names[i], &stage.heads[i]));
            }
            v
        })
        .collect()
}

/// RegMean of a stage's layers (method.md §13): every layer's weight solved from its inputs
/// inside each model on its own task's merge rows (the teacher streams `data`; the merge rows
/// themselves for layer 0), biases averaged; each task keeps its own head.
pub fn regmean(stage: &StageNet, data: &StageData, alpha: f64) -> Result<BTreeMap<String, Tensor>> {
    let merged = first_or_average(original_tensors(stage), true);
    tch::no_grad(|| {
        for (j, layer) in stage.layers.iter().enumerate() {
            let l = stage.units.start + j;
            let mut sums = RegmeanSums::default();
            for i in 0..stage.n {
                let x = match (j, l) {
                    (0, 0) => {
                        let rows = data.task.eq(i as i64).nonzero().squeeze_dim(1);
                        data.input.index_select(0, &rows)
                    }
                    (0, _) => own_rows(&data.input, data, i),
                    _ => own_rows(&data.feats[j - 1], data, i),
                };
                sums.add(&x, &layer.wt.get(i as i64).tr(), alpha);
            }
            let name = body_weight(l);
            let w = merged
                .get(&name)
                .ok_or_else(|| Error::Compute(format!("RegMean: the merged MLP lacks `{name}`")))?;
            let target = Linear {
                w: w.shallow_clone(),
                b: Tensor::zeros([0], (tch::Kind::Float, w.device())),
            };
            sums.solve_into(&target, &format!("layer {l}"))?;
        }
        Ok(merged)
    })
}

/// KD's student on an MLP stage: a trainable copy of model 1's layers.
pub struct Student {
    units: std::ops::Range<usize>,
    body: Vec<Linear>,
}

impl Student {
    pub fn of(stage: &StageNet) -> Self {
        let body = (stage.layers.iter())
            .map(|l| Linear {
                w: l.wt.get(0).tr().contiguous().detach().copy(),
                b: l.b.get(0).detach().copy(),
            })
            .collect();
        Self {
            units: stage.units.clone(),
            body,
        }
    }
}

impl StudentPart for Student {
    fn params(&self) -> Vec<Tensor> {
        self.named().into_iter().map(|(_, t)| t).collect()
    }
    fn forward(&self, input: &Tensor, _idx: &Tensor) -> Tensor {
        body_forward(&self.body, input)
    }
    fn named(&self) -> Vec<(String, Tensor)> {
        (self.units.clone().zip(&self.body))
            .flat_map(|(l, layer)| {
                [
                    (body_weight(l), layer.w.shallow_clone()),
                    (body_bias(l), layer.b.shallow_clone()),
                ]
            })
            .collect()
    }
}
