//! MLPs of ReLU layers with a linear head per task (fsmerge's own safetensors layout).

pub mod baselines;
pub mod merge;
pub mod model;
pub mod stage;
pub mod supernet;
pub mod whole;

use crate::dist::stage::WorkerStage;
use crate::family::{Family, Originals, StageSpec};
use fsmerge_common::checkpoint::MlpPart;
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::plan::{mlp_unit_costs, UnitCost};
use fsmerge_common::Result;
use std::path::Path;

pub struct MlpFamily;

impl Family for MlpFamily {
    fn arch(&self) -> Arch {
        Arch::Mlp
    }
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
    fn open(
        &self,
        job: &JobConfig,
        models_dir: &Path,
        input_dim: usize,
    ) -> Result<Box<dyn Originals>> {
        Ok(Box::new(whole::open(job, models_dir, input_dim)?))
    }
}
