//! The `Family` trait: what the distributed runtime and the coordinator need of a model family,
//! and the one place that maps `model.arch` to a family. A new family is a folder under
//! `families/` that implements this trait (and `WorkerStage` for its stages), a config
//! section, and one line in `family`. The coordinator sees a family only through configs,
//! headers and the merged model's writer: every step that needs weights runs on the workers.

use crate::data::rows::Splits;
use crate::dist::stage::WorkerStage;
use crate::families::{bert, llama, mlp, vit};
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::plan::UnitCost;
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
    /// Every task's original folder, in task order.
    pub fn original_dirs(&self) -> Vec<PathBuf> {
        self.job.original_dirs(self.models_dir)
    }
    pub fn tasks(&self) -> Vec<String> {
        self.job.tasks.iter().map(|t| t.name.clone()).collect()
    }
    /// The job's `merge.precision` (else the first original's).
    pub fn precision(&self) -> Result<fsmerge_common::precision::Precision> {
        fsmerge_common::precision::Precision::for_job(self.job, self.models_dir)
    }
}

/// One model family (MLP, ViT, BERT, Llama) as the rest of fsmerge sees it.
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
    /// The files of task `task`'s original in its folder `dir`
    /// (`JobConfig::original_dir`) or in `models_dir` (`fsmerge train`'s layout): it is
    /// missing when neither exists (a lone one is an error for the loader to name).
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
    /// Check, from the originals' configs and safetensors headers alone (no weights), that
    /// they fit the job: a classifier with one output per class of its task, inputs of the
    /// data's shape, a width that `merge.rank` fits. The first problem is an error naming the
    /// file and tensor or field.
    fn check(&self, job: &JobConfig, models_dir: &Path) -> Result<()>;
    /// The merged model's writer into the job's output folder `out` (staged; the job commits
    /// it): the stages' folded tensors go to disk as they arrive.
    fn writer(
        &self,
        job: &JobConfig,
        models_dir: &Path,
        out: &Path,
    ) -> Result<Box<dyn MergedWriter>>;
}

/// The merged model written tensor by tensor as the stages send them.
pub trait MergedWriter {
    /// One folded tensor under the merged model's name; one the model does not have, or one
    /// sent twice, is an error naming it.
    fn add(&mut self, name: String, t: HostTensor) -> Result<()>;
    /// Every tensor arrived: write what is left (stacked heads, configs, the FS-Merge
    /// `variant`). A tensor that never came is an error naming it.
    fn finish(self: Box<Self>, variant: &BTreeMap<String, serde_json::Value>) -> Result<()>;
}

/// The family of `model.arch = arch`.
pub fn family(arch: Arch) -> &'static dyn Family {
    match arch {
        Arch::Mlp => &mlp::MlpFamily,
        Arch::Vit => &vit::VitFamily,
        Arch::Bert => &bert::BertFamily,
        Arch::Llama => &llama::LlamaFamily,
    }
}
