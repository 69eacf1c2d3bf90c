//! Knowledge distillation (method.md §13) on the workers: the student is model 1's units,
//! one trainable copy per stage, trained as a pipeline over the stages exactly as the global
//! FS-Merge phase is (`train_pipelined`), against each input's own model's output (the last
//! stage's teacher features) rescaled to mean |·| = `target_scale` per task. Task t then reads
//! student(x)/s_t, folded into its head.

use crate::core::eval::mean_abs;
use crate::dist::pipeline::{train_pipelined, Collectives};
use crate::dist::stage::{PipelineStage, StageData, WorkerStage};
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::checkpoint::head_weight;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use tch::Tensor;

/// A stage's units of the KD student: a trainable copy of model 1's.
pub trait StudentPart {
    /// Every tensor the student trains.
    fn params(&self) -> Vec<Tensor>;
    /// The units on the student's stream of samples `idx` (their merge rows on stage 0): the
    /// next stream, or on the last stage the output the originals' is reconstructed.
    fn forward(&self, input: &Tensor, idx: &Tensor) -> Tensor;
    /// The tensors under the merged model's names (no heads).
    fn named(&self) -> Vec<(String, Tensor)>;
}

/// The KD student of a stage as the pipeline sees it.
struct KdStage<'a> {
    stage: &'a dyn WorkerStage,
    student: &'a dyn StudentPart,
    /// On the last stage: each sample's target, its own model's output scaled [N, k].
    targets: Option<Tensor>,
}

impl PipelineStage for KdStage<'_> {
    fn n(&self) -> usize {
        self.stage.n()
    }
    fn is_last(&self) -> bool {
        self.stage.is_last()
    }
    fn units(&self) -> Range<usize> {
        self.stage.units()
    }
    fn stream_dims(&self) -> Vec<i64> {
        self.stage.stream_dims()
    }
    fn teacher(&self, _input: &Tensor, _rows: &Tensor) -> Vec<Tensor> {
        Vec::new()
    }
    fn global_params(&self) -> Vec<Tensor> {
        self.student.params()
    }
    fn forward(
        &self,
        input: &Tensor,
        idx: &Tensor,
        _data: &StageData,
        _s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>) {
        (self.student.forward(input, idx), None)
    }
    fn loss(&self, out: &Tensor, idx: &Tensor, _data: &StageData, _s: &TrainSettings) -> Tensor {
        match &self.targets {
            Some(t) => (out - t.index_select(0, idx)).square().mean(None),
            None => out.zeros_like().sum(None),
        }
    }
}

/// Each task's scale s_t and each sample's target (its own model's output × s_t) from the
/// last stage's teacher features: the originals' outputs [n, N, k] on the merge rows.
fn scaled_targets(data: &StageData, target_scale: f64) -> (Vec<f64>, Tensor) {
    let outputs = &data.feats[data.feats.len() - 1];
    let n = outputs.size()[0];
    let mut scales = Vec::new();
    let mut targets = crate::core::tensor::f32(&outputs.get(0)).zeros_like();
    for t in 0..n {
        let rows = data.task.eq(t).nonzero().squeeze_dim(1);
        let f = crate::core::tensor::f32(&outputs.get(t).index_select(0, &rows));
        let scale = target_scale / mean_abs(&f).max(1e-12);
        targets = targets.index_copy(0, &rows, &(f * scale));
        scales.push(scale);
    }
    (scales, targets)
}

/// The trained student's stage and, on the last stage, each task's scale s_t.
pub struct Distilled {
    pub student: Box<dyn StudentPart>,
    pub scales: Vec<f64>,
    pub log: Vec<LogRow>,
}

/// Distill the originals into model 1's units over the pipeline (and the replicas), with KD's
/// settings `s` (FS-Merge's optimiser for all its epochs).
pub fn distill(
    stage: &dyn WorkerStage,
    data: &StageData,
    (s, target_scale): (&TrainSettings, f64),
    groups: Collectives,
    micro_batches: usize,
    progress: &dyn Progress,
) -> Result<Distilled> {
    let student = stage.student()?;
    for p in student.params() {
        let _ = p.set_requires_grad(true);
    }
    let (scales, targets) = if stage.is_last() {
        let (s, t) = tch::no_grad(|| scaled_targets(data, target_scale));
        (s, Some(t))
    } else {
        (Vec::new(), None)
    };
    let kd = KdStage {
        stage,
        student: student.as_ref(),
        targets,
    };
    let schedule = crate::dist::pipeline::Schedule {
        micro_batches,
        checkpoint: false,
    };
    let log = train_pipelined("kd", &kd, data, s, groups, schedule, progress)?;
    Ok(Distilled {
        student,
        scales,
        log,
    })
}

/// The distilled model's tensors of a stage under the merged model's names: the student's,
/// and on the last stage each task's own head reading student(x)/s_t (W_t/s_t, b_t), from
/// the originals' tensors `originals` (`WorkerStage::original_tensors`).
pub fn kd_tensors(
    d: &Distilled,
    originals: Vec<Vec<(String, Tensor)>>,
    tasks: &[String],
) -> BTreeMap<String, Tensor> {
    let mut out: BTreeMap<String, Tensor> = (d.student.named().into_iter())
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    for ((model, task), scale) in originals.into_iter().zip(tasks).zip(&d.scales) {
        let heads = model.into_iter().filter(|(n, _)| n.starts_with("heads."));
        for (name, t) in heads {
            let t = if name == head_weight(Some(task)) {
                t.detach() / *scale
            } else {
                t.detach().copy()
            };
            out.insert(name, t);
        }
    }
    out
}
