//! The `Family` trait: what the distributed runtime and the coordinator need of a model family,
//! and the one place that maps `model.arch` to a family. A new family is a folder under
//! `families/` that implements this trait, a config section, and one line in `family`.

use crate::dist::stage::WorkerStage;
use crate::families::{bert, mlp, vit};
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::plan::UnitCost;
use fsmerge_common::Result;
use std::ops::Range;
use std::path::Path;
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
    /// The `model.arch` this family serves.
    fn arch(&self) -> Arch;
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
}

/// The family of `model.arch = arch`.
pub fn family(arch: Arch) -> &'static dyn Family {
    match arch {
        Arch::Mlp => &mlp::MlpFamily,
        Arch::Vit => &vit::VitFamily,
        Arch::Bert => &bert::BertFamily,
    }
}
