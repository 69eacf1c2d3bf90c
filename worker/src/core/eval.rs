//! Evaluation: per-task accuracy (each task through its own head) and joint accuracy (argmax
//! over all heads' concatenated logits, labels offset by the class counts of earlier tasks).

use crate::data::rows::ImageSet;
use fsmerge_common::config::TaskConfig;
use tch::{Kind, Tensor};

/// One split, cut into tasks: (inputs [N_t, D], task-local labels [N_t]).
pub struct EvalSet {
    pub tasks: Vec<(Tensor, Tensor)>,
}

impl EvalSet {
    pub fn new(set: &ImageSet, tasks: &[TaskConfig]) -> Self {
        Self {
            tasks: tasks.iter().map(|t| set.task_tensors(&t.classes)).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scores {
    pub per_task: Vec<f64>,
    pub joint: f64,
}

impl Scores {
    pub fn mean(&self) -> f64 {
        self.per_task.iter().sum::<f64>() / self.per_task.len().max(1) as f64
    }
}

/// Score a predictor that maps inputs to the logits of every task's head.
pub fn evaluate(eval: &EvalSet, predict: &dyn Fn(&Tensor) -> Vec<Tensor>) -> Scores {
    tch::no_grad(|| {
        let mut per_task = Vec::new();
        let mut joint = Vec::new();
        for (t, (x, y)) in eval.tasks.iter().enumerate() {
            let logits = predict(x);
            per_task.push(accuracy(&logits[t], y));
            let offset: i64 = logits[..t].iter().map(|l| l.size()[1]).sum();
            let all = Tensor::cat(&logits, 1);
            joint.push(accuracy(&all, &(y + offset)));
        }
        let joint = joint.iter().sum::<f64>() / joint.len().max(1) as f64;
        Scores { per_task, joint }
    })
}

/// Mean |value| of a tensor (for KD target scaling).
pub fn mean_abs(t: &Tensor) -> f64 {
    t.abs().mean(Kind::Float).double_value(&[])
}

/// Share of rows where argmax(logits) equals the label (counted exactly, as the workers'
/// pipelined evaluation counts them).
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    let n = labels.size()[0];
    if n == 0 {
        return 0.0;
    }
    let correct = logits
        .argmax(1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Int64)
        .sum(Kind::Int64)
        .int64_value(&[]);
    correct as f64 / n as f64
}
