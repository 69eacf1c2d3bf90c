//! Linear maps and task heads (PyTorch layout), shared by every family.

use crate::core::tensor::to_tch;
use crate::core::tensor::F32;
use fsmerge_common::checkpoint::{head_bias, head_weight, HostTensor};
use fsmerge_common::config::TaskConfig;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use tch::Tensor;

/// A linear layer, PyTorch layout: weight [out, in], bias [out].
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
}

impl Linear {
    /// PyTorch's default init: U(-1/√in, 1/√in) for weight and bias.
    pub fn init(input: usize, output: usize) -> Self {
        let bound = 1.0 / (input as f64).sqrt();
        let w = Tensor::rand([output as i64, input as i64], F32) * (2.0 * bound) - bound;
        let b = Tensor::rand([output as i64], F32) * (2.0 * bound) - bound;
        Self { w, b }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, Some(&self.b))
    }
    pub fn copy(&self) -> Self {
        Self {
            w: self.w.detach().copy(),
            b: self.b.detach().copy(),
        }
    }
}

/// Copies of each original's classifier, for a merged encoder that keeps every task's head (a
/// model without one gets a 1×1 placeholder; the merge jobs check heads beforehand).
pub fn own_heads<'a>(classifiers: impl IntoIterator<Item = Option<&'a Linear>>) -> Vec<Linear> {
    classifiers
        .into_iter()
        .map(|c| c.map_or_else(|| Linear::init(1, 1), Linear::copy))
        .collect()
}

/// Every task's head stacked into one classifier (detached): task t's logits are its rows.
pub fn stacked_heads(heads: &[Linear]) -> Linear {
    let w: Vec<Tensor> = heads.iter().map(|h| h.w.detach()).collect();
    let b: Vec<Tensor> = heads.iter().map(|h| h.b.detach()).collect();
    Linear {
        w: Tensor::cat(&w, 0),
        b: Tensor::cat(&b, 0),
    }
}

/// Each task's head from a stage's or the stages' folded tensors (removed from `tensors`), by
/// the merged checkpoint's head names.
pub fn take_heads(
    tasks: &[TaskConfig],
    tensors: &mut BTreeMap<String, HostTensor>,
) -> Result<Vec<Linear>> {
    let mut take = |name: String| -> Result<Tensor> {
        tensors
            .remove(&name)
            .map(|h| to_tch(&h))
            .ok_or_else(|| Error::Protocol(format!("no worker sent the folded tensor `{name}`")))
    };
    tasks
        .iter()
        .map(|t| {
            Ok(Linear {
                w: take(head_weight(Some(&t.name)))?,
                b: take(head_bias(Some(&t.name)))?,
            })
        })
        .collect()
}

/// The labels of a classifier that stacks every task's head (`task:class`, with `class_name`)
/// and, per task, its slice of the logits (`fsmerge.json` of a merged HF folder).
pub fn stacked_labels(
    tasks: &[TaskConfig],
    class_name: &dyn Fn(usize) -> String,
) -> (Vec<String>, Vec<serde_json::Value>) {
    let mut labels = Vec::new();
    let mut slices = Vec::new();
    for t in tasks {
        let start = labels.len();
        labels.extend(
            t.classes
                .iter()
                .map(|&c| format!("{}:{}", t.name, class_name(c))),
        );
        slices.push(
            serde_json::json!({"name": t.name, "classes": t.classes, "logits": [start, labels.len()]}),
        );
    }
    (labels, slices)
}
