//! What every merge job starts with (data, merge set, originals) and what it takes back from
//! the workers (heads, a local phase's checkpoints).

use crate::job::originals;
use crate::job::Job;
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::{head_bias, head_weight, read_tensors, tensor_names, HostTensor};
use fsmerge_common::plan::Plan;
use fsmerge_common::workdir::WorkDir;
use fsmerge_worker::core::linear::Linear;
use fsmerge_worker::core::tensor::{assign, to_tch};
use fsmerge_worker::data;
use fsmerge_worker::data::merge_set;
use std::collections::BTreeMap;
use tch::Tensor;

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

/// Each task's head from the stages' folded tensors (removed from `tensors`).
pub fn take_heads(job: &Job, tensors: &mut BTreeMap<String, HostTensor>) -> Result<Vec<Linear>> {
    let mut take = |name: String| -> Result<Tensor> {
        tensors
            .remove(&name)
            .map(|h| to_tch(&h))
            .with_context(|| format!("no worker sent the folded tensor `{name}`"))
    };
    job.cfg
        .tasks
        .iter()
        .map(|t| {
            Ok(Linear {
                w: take(head_weight(Some(&t.name)))?,
                b: take(head_bias(Some(&t.name)))?,
            })
        })
        .collect()
}

/// Set `params` (a whole SuperNet's named parameters) to what the stages checkpointed after
/// their local phase: each name from the first stage whose checkpoint holds it (the shared
/// M_res/U_res are in every stage's, equal). A name in no checkpoint is an error.
pub fn restore_local_phase(job: &Job, plan: &Plan, params: Vec<(String, Tensor)>) -> Result<()> {
    let work = WorkDir::of_output(&job.out);
    let mut left: BTreeMap<String, Tensor> = params.into_iter().collect();
    for st in &plan.stages {
        let (file, _) = work.checkpoint(st.index, "local");
        let held = tensor_names(&file)?;
        let names: Vec<String> = held.into_iter().filter(|n| left.contains_key(n)).collect();
        for (name, value) in read_tensors(&file, &names)? {
            if let Some(p) = left.remove(&name) {
                assign(&[p], &[to_tch(&value)])?;
            }
        }
    }
    if let Some(name) = left.keys().next() {
        bail!("no stage's local checkpoint holds the SuperNet tensor `{name}`");
    }
    Ok(())
}
