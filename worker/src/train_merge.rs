//! Training of the M/U matrices: teacher features, the local layer problems and the global
//! end-to-end phase, each run by `optim::Run` with AdamW + OneCycle over shuffled, task-mixed
//! batches.

use crate::merge_data::MergeSet;
use crate::mlp::Mlp;
use crate::optim::{total_steps, Run, Schedule};
use crate::progress::{LogRow, Progress};
use crate::supernet::{own_mask, reconstruction_loss, SuperNet};
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

#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub targets: Targets,
    pub form: StepForm,
    pub seed: u64,
}

impl TrainSettings {
    /// The main phase's settings of a job's `[merge]` section.
    pub fn of(m: &fsmerge_common::config::MergeConfig, seed: u64) -> Self {
        Self {
            epochs: m.epochs,
            lr: m.lr,
            weight_decay: m.weight_decay,
            batch_size: m.batch_size,
            targets: m.targets,
            form: m.step_form,
            seed,
        }
    }

    /// The global phase's settings: `merge.global_epochs` after a local phase, else
    /// `merge.epochs`.
    pub fn global_phase(&self, m: &fsmerge_common::config::MergeConfig) -> Self {
        use fsmerge_common::config::Mode;
        Self {
            epochs: match m.mode {
                Mode::LocalThenGlobal => m.global_epochs,
                _ => m.epochs,
            },
            ..self.clone()
        }
    }

    /// A training run with these settings over `n` samples: AdamW + OneCycle, batches seeded
    /// by `seed` (each local problem has its own).
    pub fn run<'a>(&self, phase: &'a str, n: usize, seed: u64) -> Run<'a> {
        Run {
            phase,
            epochs: self.epochs,
            batch_size: self.batch_size,
            seed,
            schedule: Schedule::OneCycle {
                max_lr: self.lr,
                total_steps: total_steps(n, self.batch_size, self.epochs).max(1),
            },
            weight_decay: self.weight_decay,
            lr_field: "merge.lr",
        }
    }
}

/// Optimise `params` with AdamW + OneCycle (the merge settings `s`) over `n` samples in
/// shuffled batches; `loss_of` computes the loss of a batch of sample indices.
pub fn optimise(
    phase: &str,
    params: &[Tensor],
    n: usize,
    s: &TrainSettings,
    progress: &dyn Progress,
    loss_of: impl FnMut(&Tensor) -> Tensor,
) -> Result<Vec<LogRow>> {
    s.run(phase, n, s.seed)
        .optimise(params, n, progress, loss_of)
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
