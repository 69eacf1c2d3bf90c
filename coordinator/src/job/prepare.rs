//! What every merge job starts with (data, merge set, originals) and what it takes back from
//! the workers (heads, a local phase's checkpoints).

use crate::job::originals;
use crate::job::Job;
use anyhow::Result;
use fsmerge_worker::data;
use fsmerge_worker::data::merge_set;

/// What every merge job starts with: the data splits and the merge set (originals + augmented
/// copies per task), and the original models trained where they are missing.
pub fn prepare(job: &Job) -> Result<(fsmerge_worker::data::rows::Splits, merge_set::MergeSet)> {
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let splits = data::load(&cfg.data)?;
    let set = merge_set::build(
        &splits,
        &cfg.tasks,
        m.n_originals,
        m.n_augmented,
        &m.augment,
        cfg.seed,
    )?;
    tracing::info!(
        "merge data: {} inputs ({} per task)",
        set.len(),
        set.per_task[0]
    );
    originals::ensure_originals(job, &splits, false)?;
    Ok((splits, set))
}
