//! Training of the M/U matrices: teacher features, the local layer problems and the global
//! end-to-end phase, each run by `optim::Run` with AdamW + OneCycle over shuffled, task-mixed
//! batches.

use crate::core::loss::{own_mask, reconstruction_loss};
use crate::data::merge_set::MergeSet;
use crate::families::mlp::model::Mlp;
use crate::families::mlp::supernet::SuperNet;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{optimise, TrainSettings};
use fsmerge_common::config::{StepForm, Targets};
use fsmerge_common::Result;
use tch::Tensor;

/// Every model's features at every layer boundary on every merge input: `[l]` is [n, N, k_l].
/// Cross features (model i on task j's inputs) are included; `own` targets simply ignore them.
pub fn teacher_features(models: &[&Mlp], x: &Tensor) -> Vec<Tensor> {
    tch::no_grad(|| {
        let per_model: Vec<Vec<Tensor>> = models.iter().map(|m| m.features(x)).collect();
        (0..per_model[0].len())
            .map(|l| {
                Tensor::stack(
                    &per_model
                        .iter()
                        .map(|f| f[l].shallow_clone())
                        .collect::<Vec<_>>(),
                    0,
                )
            })
            .collect()
    })
}

fn mask_for(set: &MergeSet, idx: &Tensor, n: usize, targets: Targets) -> Option<Tensor> {
    (targets == Targets::Own).then(|| own_mask(&set.task.index_select(0, idx), n))
}

/// Reconstruction loss of local problem l on the samples `idx`.
pub fn local_loss(
    sn: &SuperNet,
    l: usize,
    set: &MergeSet,
    feats: &[Tensor],
    idx: &Tensor,
    targets: Targets,
) -> Tensor {
    let input = if l == 0 {
        set.x.index_select(0, idx)
    } else {
        feats[l - 1].index_select(1, idx)
    };
    let pred = sn.local_forward(l, &input);
    reconstruction_loss(
        &pred,
        &feats[l].index_select(1, idx),
        mask_for(set, idx, sn.n, targets).as_ref(),
    )
}

/// Reconstruction loss of the whole SuperNet's output on the samples `idx`.
pub fn global_loss(
    sn: &SuperNet,
    set: &MergeSet,
    feats: &[Tensor],
    idx: &Tensor,
    targets: Targets,
    form: StepForm,
) -> Tensor {
    let x = set.x.index_select(0, idx);
    let pred = match form {
        StepForm::Fold => sn.forward_fold(&x),
        StepForm::Literal => sn.forward_literal(&x),
    };
    let last = feats.len() - 1;
    reconstruction_loss(
        &pred,
        &feats[last].index_select(1, idx),
        mask_for(set, idx, sn.n, targets).as_ref(),
    )
}

fn all_indices(set: &MergeSet) -> Tensor {
    Tensor::arange(set.len() as i64, (tch::Kind::Int64, tch::Device::Cpu))
}

/// Loss of local problem l on the whole merge set (no gradient).
pub fn local_loss_full(
    sn: &SuperNet,
    l: usize,
    set: &MergeSet,
    feats: &[Tensor],
    targets: Targets,
) -> f64 {
    tch::no_grad(|| local_loss(sn, l, set, feats, &all_indices(set), targets).double_value(&[]))
}

/// Global loss on the whole merge set (no gradient).
pub fn global_loss_full(sn: &SuperNet, set: &MergeSet, feats: &[Tensor], targets: Targets) -> f64 {
    tch::no_grad(|| {
        global_loss(sn, set, feats, &all_indices(set), targets, StepForm::Fold).double_value(&[])
    })
}

/// Train local problem l alone: only layer l's M/U, original features in and out. Problems
/// share nothing, so they can run in any order or in parallel.
pub fn train_local_layer(
    sn: &SuperNet,
    l: usize,
    set: &MergeSet,
    feats: &[Tensor],
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    let settings = TrainSettings {
        seed: s.seed.wrapping_add(1 + l as u64),
        ..s.clone()
    };
    optimise(
        &format!("local layer{l}"),
        &sn.mu[l].params(),
        set.len(),
        &settings,
        progress,
        |idx| local_loss(sn, l, set, feats, idx, s.targets),
    )
}

/// Train the whole SuperNet end to end on the last layer's features.
pub fn train_global(
    sn: &SuperNet,
    set: &MergeSet,
    feats: &[Tensor],
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    optimise("global", &sn.params(), set.len(), s, progress, |idx| {
        global_loss(sn, set, feats, idx, s.targets, s.form)
    })
}
