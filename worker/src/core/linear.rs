//! Linear maps and task heads (PyTorch layout), shared by every family.

use crate::core::tensor::F32;
use fsmerge_common::config::TaskConfig;
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
