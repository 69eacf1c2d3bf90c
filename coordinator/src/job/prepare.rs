//! What every merge job starts with: the original models, trained where they are missing, and
//! checked against the job from their configs and headers (the coordinator reads no weights).

use crate::job::originals;
use crate::job::Job;
use anyhow::Result;
use fsmerge_worker::data::models::{survey, TaskData};
use fsmerge_worker::family::family;

/// Train the originals that are missing, then check that every original fits the job; a
/// `[[models]]` job's data is read through once, so that a bad file or label stops the job
/// before any worker starts.
pub fn prepare(job: &Job) -> Result<()> {
    originals::ensure_originals(job, false)?;
    family(job.cfg.model.arch).check(&job.cfg, &job.models_dir)?;
    if !job.cfg.models.is_empty() {
        task_data(job)?;
    }
    Ok(())
}

/// Each task's data: a `[[models]]` job's sources surveyed (as the workers will read them), a
/// built-in dataset's rows counted; a task with fewer merge inputs than `merge.n_originals` is
/// an error.
pub fn task_data(job: &Job) -> Result<Vec<TaskData>> {
    let cfg = &job.cfg;
    let data = if cfg.models.is_empty() {
        let splits = fsmerge_worker::data::load_job(cfg, false)?;
        cfg.tasks
            .iter()
            .map(|t| TaskData {
                task: t.name.clone(),
                merge_rows: splits.train.indices_of(&t.classes).len(),
                eval_rows: splits.test.indices_of(&t.classes).len(),
                labeled: true,
            })
            .collect()
    } else {
        survey(cfg)?
    };
    let need = cfg.merge.n_originals;
    if let Some(d) = data.iter().find(|d| d.merge_rows < need) {
        anyhow::bail!(
            "task {}: merge.n_originals = {need} but its merge data has {} inputs",
            d.task,
            d.merge_rows
        );
    }
    Ok(data)
}
