//! The baselines every family shares: `first` and `average` of encoders, RegMean's Gram sums
//! and solve, and knowledge distillation onto rescaled heads.

use crate::core::eval::mean_abs;
use crate::core::linear::{own_heads, Linear};
use crate::core::tensor::set_to_mean;
use crate::data::merge_set::MergeSet;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{optimise, TrainSettings};
use fsmerge_common::{Error, Result};
use tch::Tensor;

/// RegMean's sums for one linear map over the models: Σ_i G_i and Σ_i G_i W_iᵀ, with
/// G_i = α XᵢᵀXᵢ + (1−α) diag(XᵢᵀXᵢ) from the map's inputs Xᵢ [rows, in] inside model i.
#[derive(Default)]
pub struct RegmeanSums(Option<(Tensor, Tensor)>);

impl RegmeanSums {
    pub fn add(&mut self, x: &Tensor, w: &Tensor, alpha: f64) {
        let g = x.tr().matmul(x);
        let g = &g * alpha + g.diagonal(0, 0, 1).diag_embed(0, -2, -1) * (1.0 - alpha);
        let rhs = g.matmul(&w.tr());
        self.0 = Some(match self.0.take() {
            Some((gs, rs)) => (gs + g, rs + rhs),
            None => (g, rhs),
        });
    }

    /// Overwrite `target`'s weight in place with W* (`regmean_solve`); nothing added, nothing
    /// changed. `what` names the map in an error.
    pub fn solve_into(self, target: &Linear, what: &str) -> Result<()> {
        let Some((gram, rhs)) = self.0 else {
            return Ok(());
        };
        let wt = regmean_solve(gram, &rhs, what)?;
        tch::no_grad(|| target.w.shallow_clone().copy_(&wt.tr()));
        Ok(())
    }
}

/// Solve RegMean's normal equations (Σ G_i) W*ᵀ = Σ G_i W_iᵀ. A ridge of 1e-6 · mean(diag)
/// keeps the system solvable when an input feature is dead in every model (its rows then do not
/// matter). `what` names the map in the error.
pub fn regmean_solve(gram: Tensor, rhs: &Tensor, what: &str) -> Result<Tensor> {
    let dim = gram.size()[0];
    let ridge = gram
        .diagonal(0, 0, 1)
        .mean(None)
        .double_value(&[])
        .max(1e-12)
        * 1e-6;
    let gram = gram + Tensor::eye(dim, crate::core::tensor::F32) * ridge;
    Tensor::f_linalg_solve(&gram, rhs, true)
        .map_err(|e| Error::Compute(format!("RegMean {what}: {e}")))
}

/// Knowledge distillation, for every architecture: the student's `params` (initialised from
/// model 1) are trained with MSE of `student(idx)` (its output on the merge inputs `idx`) to
/// each input's own model's output in `outputs` [n, N, k], rescaled to mean |·| = `target_scale`
/// per task. Returns the scales s_t (task t reads student(x)/s_t: see `rescaled_heads`) and the
/// log.
pub fn distill(
    set: &MergeSet,
    outputs: &Tensor,
    target_scale: f64,
    params: &[Tensor],
    s: &TrainSettings,
    progress: &dyn Progress,
    student: impl Fn(&Tensor) -> Tensor,
) -> Result<(Vec<f64>, Vec<LogRow>)> {
    let mut scales = Vec::new();
    let mut targets = Vec::new();
    for t in 0..set.per_task.len() {
        let r = set.task_range(t);
        let f = outputs
            .get(t as i64)
            .narrow(0, r.start as i64, r.len() as i64);
        let scale = target_scale / mean_abs(&f).max(1e-12);
        targets.push(f * scale);
        scales.push(scale);
    }
    let targets = Tensor::cat(&targets, 0);
    for p in params {
        let _ = p.set_requires_grad(true);
    }
    let log = optimise("kd", params, set.len(), s, progress, |idx| {
        (student(idx) - targets.index_select(0, idx))
            .square()
            .mean(None)
    })?;
    Ok((scales, log))
}

/// The tasks' heads reading a distilled student: W_t / s_t (biases unchanged).
pub fn rescaled_heads(heads: impl IntoIterator<Item = Linear>, scales: &[f64]) -> Vec<Linear> {
    heads
        .into_iter()
        .zip(scales)
        .map(|(h, &sc)| Linear {
            w: h.w.detach() / sc,
            b: h.b.detach().copy(),
        })
        .collect()
}

/// An encoder model (ViT, BERT) as the generic baselines see it.
pub trait Encoder: Sized {
    /// The model's own classification head.
    fn classifier(&self) -> Option<&Linear>;
    /// A detached copy of the encoder, without the classifier.
    fn encoder_copy(&self) -> Self;
    /// The encoder's tensors (no classifier), in the same order for models of one shape.
    fn encoder_tensors(&self) -> Vec<(String, &Tensor)>;
}

/// Copies of each model's own head: a merged encoder keeps every task's.
pub fn heads_of<M: Encoder>(models: &[&M]) -> Vec<Linear> {
    own_heads(models.iter().map(|m| m.classifier()))
}

/// `first`: model 1's encoder for every task.
pub fn first<M: Encoder>(models: &[&M]) -> (M, Vec<Linear>) {
    (models[0].encoder_copy(), heads_of(models))
}

/// `average`: the element-wise mean of every encoder tensor.
pub fn average<M: Encoder>(models: &[&M]) -> (M, Vec<Linear>) {
    let merged = models[0].encoder_copy();
    let all: Vec<Vec<(String, &Tensor)>> = models.iter().map(|m| m.encoder_tensors()).collect();
    set_to_mean(&merged.encoder_tensors(), &all);
    (merged, heads_of(models))
}

/// RegMean of one encoder block `l`'s six linear maps (q, k, v, out, fc1, fc2), solved into the
/// weights of `merged` (a stage's tensors under the merged model's names, `layout` naming the
/// block's parts). `models` holds each model's block and the inputs of its maps as rows
/// [R_i, k]: q/k/v's, out's, fc1's and fc2's (`EncoderBlock::linear_inputs_*`).
pub fn regmean_block(
    merged: &std::collections::BTreeMap<String, Tensor>,
    l: usize,
    layout: &crate::core::encoder_block::Layout,
    models: &[(&crate::core::encoder_block::EncoderBlock, [Tensor; 4])],
    alpha: f64,
) -> Result<()> {
    use crate::core::encoder_block::Part;
    let maps = [
        (Part::Q, 0),
        (Part::K, 0),
        (Part::V, 0),
        (Part::Out, 1),
        (Part::Fc1, 2),
        (Part::Fc2, 3),
    ];
    for (k, (part, input)) in maps.into_iter().enumerate() {
        let mut sums = RegmeanSums::default();
        for (block, inputs) in models {
            sums.add(&inputs[input], block.part(part).0, alpha);
        }
        let name = layout
            .iter()
            .find(|(_, p)| *p == part)
            .map(|(n, _)| format!("encoder.layer.{l}.{n}.weight"))
            .unwrap_or_default();
        let w = merged
            .get(&name)
            .ok_or_else(|| Error::Compute(format!("RegMean: the merged block lacks `{name}`")))?;
        let target = Linear {
            w: w.shallow_clone(),
            b: Tensor::zeros([0], (tch::Kind::Float, w.device())),
        };
        sums.solve_into(&target, &format!("block {l}, linear map {k}"))?;
    }
    Ok(())
}
