//! The merge training settings of a job (`[merge]`) and the one optimisation entry point.

use crate::train::optim::{total_steps, Run, Schedule};
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::config::{StepForm, Targets};
use fsmerge_common::Result;
use tch::Tensor;

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
    /// KD's settings: FS-Merge's optimiser for all its epochs (the same budget).
    pub fn kd(m: &fsmerge_common::config::MergeConfig, seed: u64) -> Self {
        Self {
            epochs: m.total_epochs(),
            ..Self::of(m, seed)
        }
    }

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

/// Offset of the global phase's batch-order seed from the job seed (apart from local's).
pub const GLOBAL_SEED_OFFSET: u64 = 7919;
