//! `fsmerge train`: the original models, one per task, each from its own seed, trained by the
//! job's model family and committed atomically into the models directory.

use crate::job::Job;
use crate::report::progress::Reporter;
use anyhow::Result;
use fsmerge_common::fsio::Staging;
use fsmerge_worker::family::family;

/// Seed of task t's original model: distinct per task and per job seed.
pub fn model_seed(job_seed: u64, t: usize) -> u64 {
    job_seed.wrapping_mul(1000).wrapping_add(t as u64 + 1)
}

/// The tasks of a built-in job whose original is missing from the models directory (only a
/// model with neither file is missing; a lone file is an error for the loader). A `[[models]]`
/// job lists existing models: none is missing here.
pub fn missing(job: &Job) -> Vec<usize> {
    let cfg = &job.cfg;
    if !cfg.models.is_empty() {
        return Vec::new();
    }
    let family = family(cfg.model.arch);
    (0..cfg.tasks.len())
        .filter(|&t| {
            let files = family.original_files(&job.models_dir, &cfg.tasks[t].name);
            files.iter().all(|f| !f.exists())
        })
        .collect()
}

/// Train the originals that are missing (all of them with `force`), written atomically into the
/// models directory. The data is read only when a model is to be trained.
pub fn ensure_originals(job: &Job, force: bool) -> Result<()> {
    let cfg = &job.cfg;
    if !cfg.models.is_empty() {
        // The models are the user's; a missing one is named when its config is read.
        anyhow::ensure!(
            !force,
            "`fsmerge train` builds originals for the built-in datasets; a job with `[[models]]` merges existing checkpoints"
        );
        return Ok(());
    }
    let family = family(cfg.model.arch);
    let to_train = if force {
        (0..cfg.tasks.len()).collect()
    } else {
        missing(job)
    };
    let seeded: Vec<(usize, u64)> = to_train
        .into_iter()
        .map(|t| (t, model_seed(cfg.seed, t)))
        .collect();
    if seeded.is_empty() {
        tracing::info!("originals present in {}", job.models_dir.display());
        return Ok(());
    }
    let splits = fsmerge_worker::data::load(&cfg.data)?;
    let staging = Staging::new(&job.models_dir)?;
    let log = family.train_originals(cfg, &seeded, &splits, &staging.path(""), &Reporter::new())?;
    crate::report::write_jsonl(&staging.path("train_log.jsonl"), &log)?;
    let dir = staging.commit()?;
    tracing::info!("originals written to {}", dir.display());
    Ok(())
}
