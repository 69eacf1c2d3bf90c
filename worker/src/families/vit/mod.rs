//! Hugging Face ViTs (`ViTForImageClassification`): pre-LN encoder blocks on patches.

pub mod baselines;
pub mod merge;
pub mod model;
pub mod stage;
pub mod supernet;
pub mod whole;

use crate::dist::stage::WorkerStage;
use crate::family::{Family, Originals, StageSpec};
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::plan::{vit_unit_costs, UnitCost};
use fsmerge_common::Result;
use std::path::Path;

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
    fn open(&self, job: &JobConfig, models_dir: &Path, _: usize) -> Result<Box<dyn Originals>> {
        Ok(Box::new(whole::open(job, models_dir)?))
    }
}
