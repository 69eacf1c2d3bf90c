//! Hugging Face ViTs (`ViTForImageClassification`): pre-LN encoder blocks on patches.

pub mod baselines;
pub mod merge;
pub mod model;
pub mod stage;
pub mod supernet;
pub mod whole;

use crate::data::rows::Splits;
use crate::dist::stage::WorkerStage;
use crate::family::{Family, Originals, StageSpec};
use crate::train::originals::train_each;
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::plan::{vit_unit_costs, UnitCost};
use fsmerge_common::Result;
use std::path::{Path, PathBuf};

pub struct VitFamily;

impl Family for VitFamily {
    fn arch(&self) -> Arch {
        Arch::Vit
    }
    fn unit_costs(&self, job: &JobConfig, models_dir: &Path) -> Result<Vec<UnitCost>> {
        let cfg = VitConfig::load(&models_dir.join(&job.tasks[0].name))?;
        Ok(vit_unit_costs(&cfg, job.tasks.len()))
    }
    fn load_stage(&self, spec: &StageSpec) -> Result<Box<dyn WorkerStage>> {
        let (j, tasks) = (spec.job, spec.tasks());
        let stage = stage::VitStage::load(
            spec.models_dir,
            &tasks,
            spec.units.clone(),
            &j.merge,
            j.seed,
        )?;
        Ok(Box::new(stage))
    }
    fn original_files(&self, models_dir: &Path, task: &str) -> [PathBuf; 2] {
        let dir = models_dir.join(task);
        [dir.join("model.safetensors"), dir.join("config.json")]
    }
    fn train_originals(
        &self,
        job: &JobConfig,
        tasks: &[(usize, u64)],
        splits: &Splits,
        out: &Path,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>> {
        let config = VitConfig::for_images(&job.model.vit, job.data.dataset.image_side());
        train_each(job, tasks, splits, &mut |task, spec, (train, val)| {
            let (vit, val_acc, rows) =
                merge::train_original(config.clone(), spec, train, val, progress)?;
            let labels: Vec<String> = task.classes.iter().map(|c| format!("class {c}")).collect();
            vit.save_sharded(&out.join(&task.name), &labels, job.output.max_shard_bytes())?;
            Ok((val_acc, rows))
        })
    }
    fn open(&self, job: &JobConfig, models_dir: &Path, _: usize) -> Result<Box<dyn Originals>> {
        Ok(Box::new(whole::open(job, models_dir)?))
    }
}
