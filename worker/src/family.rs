//! The `Family` trait: what the distributed runtime and the coordinator need of a model family,
//! and the one place that maps `model.arch` to a family. A new family is a folder under
//! `families/` that implements this trait, a config section, and one line in `family`.

use crate::core::baselines::{average, first, Encoder};
use crate::core::linear::Linear;
use crate::data::merge_set::MergeSet;
use crate::data::rows::Splits;
use crate::dist::stage::WorkerStage;
use crate::families::{bert, mlp, vit};
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::config::{Arch, Baseline, JobConfig};
use fsmerge_common::plan::{Plan, UnitCost};
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What a worker needs to build its stage of a job.
pub struct StageSpec<'a> {
    pub job: &'a JobConfig,
    /// Folder of the originals: one model per task, named after the task.
    pub models_dir: &'a Path,
    /// The plan units the stage holds.
    pub units: Range<usize>,
    /// The merge rows x [N, D] (images, or token ids stored as f32), when the stage reads them:
    /// stage 0 computing teacher features, or every stage of a family whose units need them.
    pub rows: Option<&'a Tensor>,
}

impl StageSpec<'_> {
    pub fn tasks(&self) -> Vec<String> {
        self.job.tasks.iter().map(|t| t.name.clone()).collect()
    }
}

/// One model family (MLP, ViT, BERT, …) as the rest of fsmerge sees it.
pub trait Family: Sync {
    /// Cost of each plan unit for the job's n models, from the originals' configs alone (no
    /// weights are read).
    fn unit_costs(&self, job: &JobConfig, models_dir: &Path) -> Result<Vec<UnitCost>>;
    /// Whether every stage reads the merge rows, not only stage 0 (BERT: the attention mask of
    /// its samples, which never travels between stages).
    fn every_stage_reads_rows(&self) -> bool {
        false
    }
    /// The stage `spec.units` of every task's original, with its M/U drawn as the whole
    /// SuperNet draws them in one process (the same init whatever the plan).
    fn load_stage(&self, spec: &StageSpec) -> Result<Box<dyn WorkerStage>>;
    /// The files of task `task`'s original in `models_dir`: it is missing when neither exists
    /// (a lone one is an error for the loader to name).
    fn original_files(&self, models_dir: &Path, task: &str) -> [PathBuf; 2];
    /// Train the originals of `tasks` ((index into `job.tasks`, seed) each) on their classes of
    /// `splits`, and write them into `out` in the family's layout. Returns the training log.
    fn train_originals(
        &self,
        job: &JobConfig,
        tasks: &[(usize, u64)],
        splits: &Splits,
        out: &Path,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>>;
    /// Every task's original, whole, checked against the job (a classifier with one output per
    /// class, inputs of the data's shape `input_dim`, a width that `merge.rank` fits): what the
    /// coordinator's job evaluates and derives the baselines from.
    fn open(
        &self,
        job: &JobConfig,
        models_dir: &Path,
        input_dim: usize,
    ) -> Result<Box<dyn Originals>>;
}

/// A model that gives every task's logits for data rows x [N, D].
pub trait Predictor {
    fn logits(&self, x: &Tensor) -> Vec<Tensor>;
}

/// A merged model of the original size: evaluated, and written in the family's layout.
pub trait MergedNet: Predictor {
    /// Write the model into the job's output folder `out` (staged; the job commits it).
    fn write(
        &self,
        out: &Path,
        job: &JobConfig,
        variant: &BTreeMap<String, serde_json::Value>,
    ) -> Result<()>;
}

/// The two models of a local phase.
pub struct LocalPhase {
    /// The local SuperNet as trained, read through each task's original head.
    pub chain: Box<dyn Predictor>,
    /// The standard model it folds into.
    pub folded: Box<dyn MergedNet>,
}

/// What a baseline needs besides the originals.
pub struct BaselineInputs<'a> {
    pub set: &'a MergeSet,
    pub job: &'a JobConfig,
    /// KD's training settings (FS-Merge's optimiser for all its epochs).
    pub kd: &'a TrainSettings,
    pub progress: &'a dyn Progress,
}

/// The job's originals, loaded whole in one process: what the coordinator's job still evaluates
/// and derives the baselines from itself (the next step moves these to the workers, stage by
/// stage, so that the coordinator holds no model).
pub trait Originals {
    /// Task t's original on its own head, for data rows x [N, D].
    fn logits(&self, t: usize, x: &Tensor) -> Tensor;
    /// The merged model of a baseline (`first`, `average`, `regmean`, `kd`; the ensemble is
    /// the originals themselves) and its training log.
    fn baseline(
        &self,
        method: Baseline,
        inputs: &BaselineInputs,
    ) -> Result<(Box<dyn MergedNet>, Vec<LogRow>)>;
    /// After a local phase: the local SuperNet as trained (M_res/U_res round trip between
    /// units) and the model it folds into, from the stages' local checkpoints in `work`; None
    /// for a family without a shared residual merge (its local fold is exact).
    fn local_phase(
        &self,
        job: &JobConfig,
        work: &WorkDir,
        plan: &Plan,
    ) -> Result<Option<LocalPhase>>;
    /// The merged model from the stages' folded tensors.
    fn assemble(
        &self,
        job: &JobConfig,
        tensors: BTreeMap<String, HostTensor>,
    ) -> Result<Box<dyn MergedNet>>;
}

/// The family of `model.arch = arch`.
pub fn family(arch: Arch) -> &'static dyn Family {
    match arch {
        Arch::Mlp => &mlp::MlpFamily,
        Arch::Vit => &vit::VitFamily,
        Arch::Bert => &bert::BertFamily,
    }
}

/// A SuperNet's per-model outputs [n, B, d] read through each task's original head: the row of
/// a local SuperNet as trained.
pub struct HeadsReadOut {
    heads: Vec<Linear>,
    forward: Box<dyn Fn(&Tensor) -> Tensor>,
}

impl HeadsReadOut {
    pub fn new(heads: &[&Linear], forward: impl Fn(&Tensor) -> Tensor + 'static) -> Self {
        Self {
            heads: heads.iter().map(|h| h.copy()).collect(),
            forward: Box::new(forward),
        }
    }
}

impl Predictor for HeadsReadOut {
    fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        let pred = (self.forward)(x);
        self.heads
            .iter()
            .enumerate()
            .map(|(t, h)| h.forward(&pred.get(t as i64)))
            .collect()
    }
}

/// The ensemble is not a merged model: the job evaluates it from `Originals::logits`.
pub fn ensemble_is_not_merged() -> fsmerge_common::Error {
    fsmerge_common::Error::Compute("the ensemble is the originals, not a merged model".into())
}

/// A baseline of an encoder family: `first` and `average` written once (`core::baselines`),
/// RegMean and KD the family's; `wrap` makes a merged model of an encoder and the heads.
pub fn encoder_baseline<M: Encoder, R: MergedNet + 'static>(
    models: &[&M],
    method: Baseline,
    wrap: impl Fn(M, Vec<Linear>) -> R,
    regmean: impl FnOnce() -> Result<R>,
    kd: impl FnOnce() -> Result<(R, Vec<LogRow>)>,
) -> Result<(Box<dyn MergedNet>, Vec<LogRow>)> {
    let (merged, log) = match method {
        Baseline::First => {
            let (encoder, heads) = first(models);
            (wrap(encoder, heads), Vec::new())
        }
        Baseline::Average => {
            let (encoder, heads) = average(models);
            (wrap(encoder, heads), Vec::new())
        }
        Baseline::Regmean => (regmean()?, Vec::new()),
        Baseline::Kd => kd()?,
        Baseline::Ensemble => return Err(ensemble_is_not_merged()),
    };
    Ok((Box::new(merged), log))
}
