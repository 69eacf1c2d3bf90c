//! MLPs of ReLU layers with a linear head per task (fsmerge's own safetensors layout).

pub mod eval;
pub mod merge;
pub mod model;
pub mod output;
pub mod stage;
pub mod supernet;

use crate::data::rows::Splits;
use crate::dist::stage::WorkerStage;
use crate::family::{Family, MergedWriter, StageSpec};
use crate::train::originals::train_each;
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::checkpoint::{model_paths, MlpPart};
use fsmerge_common::config::JobConfig;
use fsmerge_common::plan::{mlp_unit_costs, UnitCost};
use fsmerge_common::Result;
use std::path::{Path, PathBuf};

pub struct MlpFamily;

impl Family for MlpFamily {
    fn unit_costs(&self, job: &JobConfig, models_dir: &Path) -> Result<Vec<UnitCost>> {
        let first = &job.tasks[0].name;
        let config = MlpPart::load(models_dir, first, 0..0, false)?.config;
        Ok(mlp_unit_costs(
            config.input_dim,
            &config.hidden,
            job.tasks.len(),
        ))
    }
    fn load_stage(&self, spec: &StageSpec) -> Result<Box<dyn WorkerStage>> {
        let (j, tasks) = (spec.job, spec.tasks());
        let stage = stage::StageNet::load(
            spec.models_dir,
            &tasks,
            spec.units.clone(),
            &j.merge,
            j.seed,
        )?;
        Ok(Box::new(stage))
    }
    fn original_files(&self, models_dir: &Path, task: &str) -> [PathBuf; 2] {
        let (st, js) = model_paths(models_dir, task);
        [st, js]
    }
    fn train_originals(
        &self,
        job: &JobConfig,
        tasks: &[(usize, u64)],
        splits: &Splits,
        out: &Path,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>> {
        train_each(job, tasks, splits, &mut |task, spec, (train, val)| {
            let spec = model::TrainSpec {
                input_dim: splits.train.dim,
                hidden: &job.model.hidden,
                task: &task.name,
                classes: &task.classes,
                epochs: spec.epochs,
                lr: spec.lr,
                batch_size: spec.batch_size,
                seed: spec.seed,
            };
            let (ck, val_acc, rows) = model::train_original(&spec, train, val, progress)?;
            ck.save(out)?;
            Ok((val_acc, rows))
        })
    }
    fn check(&self, job: &JobConfig, models_dir: &Path) -> Result<()> {
        output::check(job, models_dir)
    }
    fn writer(
        &self,
        job: &JobConfig,
        models_dir: &Path,
        out: &Path,
    ) -> Result<Box<dyn MergedWriter>> {
        output::writer(job, models_dir, out)
    }
}
