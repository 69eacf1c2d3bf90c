//! What every merge job starts with: the original models, trained where they are missing, and
//! checked against the job from their configs and headers (the coordinator reads no weights).

use crate::job::originals;
use crate::job::Job;
use anyhow::Result;
use fsmerge_worker::family::family;

/// Train the originals that are missing, then check that every original fits the job.
pub fn prepare(job: &Job) -> Result<()> {
    originals::ensure_originals(job, false)?;
    family(job.cfg.model.arch).check(&job.cfg, &job.models_dir)?;
    Ok(())
}
