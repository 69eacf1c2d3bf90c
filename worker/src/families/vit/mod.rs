//! Hugging Face ViTs (`ViTForImageClassification`): pre-LN encoder blocks on patches.

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
use fsmerge_common::config::JobConfig;
use fsmerge_common::hf::VitConfig;
use fsmerge_common::plan::{UnitCost, MU_COST_PER_FEATURE};
use fsmerge_common::Result;
use std::path::{Path, PathBuf};

pub struct VitFamily;

impl Family for VitFamily {
    fn unit_costs(&self, job: &JobConfig, models_dir: &Path) -> Result<Vec<UnitCost>> {
        let cfg = VitConfig::load(&job.original_dir(models_dir, 0))?;
        Ok(vit_unit_costs(&cfg, job.tasks.len()))
    }
    fn load_stage(&self, spec: &StageSpec) -> Result<Box<dyn WorkerStage>> {
        let (j, tasks) = (spec.job, spec.tasks());
        let adapters = crate::data::models::input_adapters(j)?;
        for (t, _) in adapters.iter().enumerate().filter(|(_, a)| a.is_some()) {
            tracing::info!(
                "task {}: its processor rescales or normalizes otherwise than the first model's; \
                 its patch embedding is adapted to read the first model's pixels",
                tasks[t]
            );
        }
        let stage = stage::VitStage::load(
            &spec.original_dirs(),
            &adapters,
            &tasks,
            spec.units.clone(),
            &j.merge,
            j.seed,
            spec.precision()?,
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
        let config = VitConfig::for_images(&job.model.vit, job.data.image_side());
        train_each(job, tasks, splits, &mut |task, spec, (train, val)| {
            let (vit, val_acc, rows) =
                merge::train_original(config.clone(), spec, train, val, progress)?;
            let labels: Vec<String> = task.classes.iter().map(|c| format!("class {c}")).collect();
            vit.save_sharded(&out.join(&task.name), &labels, job.output.max_shard_bytes())?;
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

/// ViT units (embedding, each block): per image, T tokens through the n frozen branches —
/// patch projection P·C·p²·d, block T·(4d² + 2dh) — plus the M/U work of every merged feature
/// (`MU_COST_PER_FEATURE` per token and merge); bytes of the n models' tensors of the unit.
fn vit_unit_costs(cfg: &VitConfig, n_models: usize) -> Vec<UnitCost> {
    let (d, h, p, c) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.patch_size,
        cfg.num_channels,
    );
    let patches = (cfg.image_size / p).pow(2);
    let tokens = patches + 1;
    let embed_params = c * p * p * d + d + d + tokens * d;
    let block_params = 4 * (d * d + d) + 2 * d * h + h + d + 4 * d;
    let mut units = vec![UnitCost {
        name: "embeddings".into(),
        flops: (n_models * (patches * c * p * p * d + tokens * d * MU_COST_PER_FEATURE)) as u64,
        bytes: (n_models * embed_params * 4) as u64,
        stream: (tokens * d) as u64,
    }];
    for l in 0..cfg.num_hidden_layers {
        // Six d-wide merges and one h-wide merge per token.
        let mu = (6 * d + h) * MU_COST_PER_FEATURE;
        units.push(UnitCost {
            name: format!("block{l}"),
            flops: (n_models * tokens * (4 * d * d + 2 * d * h + mu)) as u64,
            bytes: (n_models * block_params * 4) as u64,
            stream: (tokens * d) as u64,
        });
    }
    units
}
