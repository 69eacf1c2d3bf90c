//! Mid-phase checkpoints. Inside a training phase of a worker's stage (`scoped`), the training
//! loop saves its optimisers (parameters, Adam moments and step counts) and logs every
//! `cluster.checkpoint_every_steps` steps, and a phase that `--resume` continues starts from the
//! step the coordinator chose. Every batch of a run is fixed by its seed and step, so the
//! continued run computes exactly what the uninterrupted one would have.
//!
//! The scope is per thread: each worker (an embedded thread or a process) trains on its own.

use crate::core::tensor::{to_host, to_tch};
use crate::train::optim::AdamW;
use crate::train::progress::LogRow;
use fsmerge_common::checkpoint::{read_tensors, tensor_names, write_json, write_tensors};
use fsmerge_common::workdir::{PartialRecord, PartialStep, WorkDir};
use fsmerge_common::{Error, Result};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Checkpoints kept per (stage, phase): two, so that stages stopped between two checkpoints
/// still share a step to continue from.
const KEEP: usize = 2;

/// Where and how often the phase in progress checkpoints.
pub struct Scope {
    pub work: WorkDir,
    pub stage: usize,
    pub phase: String,
    /// Steps between checkpoints; 0: none.
    pub every: u64,
    /// Replica 0 writes; the other replicas hold the same state.
    pub writer: bool,
    /// Continue from this step's checkpoint (0: from the start).
    pub from_step: u64,
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Clears the scope when the phase ends, however it ends.
struct Clear;

impl Drop for Clear {
    fn drop(&mut self) {
        SCOPE.with(|s| *s.borrow_mut() = None);
    }
}

/// Run `train` (one phase's training) with mid-phase checkpoints in `scope`.
pub fn scoped<T>(scope: Scope, train: impl FnOnce() -> T) -> T {
    SCOPE.with(|s| *s.borrow_mut() = Some(scope));
    let _clear = Clear;
    train()
}

/// Put the optimisers and logs of the loop `label` back to the scope's checkpoint, if the
/// phase continues from one; returns the step to continue from (0: the start). Only the
/// phase's first loop continues.
pub fn restore(
    label: &str,
    total: u64,
    opts: &mut [AdamW],
    logs: &mut Vec<Vec<LogRow>>,
) -> Result<u64> {
    SCOPE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(scope) = s.as_mut() else {
            return Ok(0);
        };
        let step = std::mem::take(&mut scope.from_step);
        if step == 0 {
            return Ok(0);
        }
        let (stage, phase) = (scope.stage, scope.phase.as_str());
        let json = scope.work.partial(stage, phase);
        let bad = |msg: String| Error::Checkpoint {
            file: json.clone(),
            msg,
        };
        let record = scope
            .work
            .read_partial(stage, phase)?
            .ok_or_else(|| bad("missing; the coordinator chose to continue from it".into()))?;
        if record.label != label {
            return Err(bad(format!(
                "checkpoints of `{}`, not of `{label}`",
                record.label
            )));
        }
        let saved = record
            .steps
            .iter()
            .find(|p| p.step == step)
            .ok_or_else(|| bad(format!("no checkpoint at step {step}")))?;
        if step >= total || saved.adam_steps.len() != opts.len() || saved.logs.len() != opts.len() {
            return Err(bad(format!(
                "step {step} of {} run(s) does not fit a loop of {total} steps and {} run(s)",
                saved.adam_steps.len(),
                opts.len()
            )));
        }
        let file = scope.work.partial_tensors(stage, phase, step);
        let tensors = read_tensors(&file, &tensor_names(&file)?)?;
        for (r, opt) in opts.iter_mut().enumerate() {
            let prefix = format!("run{r}.");
            let mine: BTreeMap<String, tch::Tensor> = tensors
                .iter()
                .filter_map(|(n, v)| n.strip_prefix(&prefix).map(|k| (k.to_string(), to_tch(v))))
                .collect();
            opt.restore(&mine, saved.adam_steps[r])
                .map_err(|e| Error::Checkpoint {
                    file: file.clone(),
                    msg: e.to_string(),
                })?;
        }
        *logs = saved.logs.clone();
        tracing::info!(
            "stage {stage}: phase `{phase}` continues from its checkpoint at step {step} of {total}"
        );
        Ok(step)
    })
}

/// After `done` of `total` steps of the loop `label`: checkpoint if the scope asks for it now.
pub fn save_if_due(
    label: &str,
    done: u64,
    total: u64,
    opts: &[AdamW],
    logs: &[Vec<LogRow>],
) -> Result<()> {
    SCOPE.with(|s| {
        let s = s.borrow();
        let Some(scope) = s.as_ref() else {
            return Ok(());
        };
        if !scope.writer || scope.every == 0 || !done.is_multiple_of(scope.every) || done >= total {
            return Ok(());
        }
        let (stage, phase) = (scope.stage, scope.phase.as_str());
        let mut tensors = BTreeMap::new();
        let mut adam_steps = Vec::with_capacity(opts.len());
        for (r, opt) in opts.iter().enumerate() {
            let (named, step) = opt.state();
            for (name, t) in named {
                tensors.insert(format!("run{r}.{name}"), to_host(t)?);
            }
            adam_steps.push(step);
        }
        let file = scope.work.partial_tensors(stage, phase, done);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_tensors(&file, &tensors)?;
        let mut record = match scope.work.read_partial(stage, phase)? {
            Some(r) if r.label == label => r,
            _ => PartialRecord {
                label: label.to_string(),
                steps: Vec::new(),
            },
        };
        record.steps.retain(|p| p.step < done);
        record.steps.push(PartialStep {
            step: done,
            adam_steps,
            logs: logs.to_vec(),
        });
        let dropped = record.steps.len().saturating_sub(KEEP);
        let old: Vec<u64> = record.steps.drain(..dropped).map(|p| p.step).collect();
        write_json(&scope.work.partial(stage, phase), &record)?;
        for step in old {
            let _ = std::fs::remove_file(scope.work.partial_tensors(stage, phase, step));
        }
        Ok(())
    })
}

/// Remove the mid-phase checkpoints of (stage, phase) once the phase's own checkpoint is
/// written: a finished phase is restored whole, never continued.
pub fn discard(work: &WorkDir, stage: usize, phase: &str) -> Result<()> {
    let Some(record) = work.read_partial(stage, phase)? else {
        return Ok(());
    };
    for p in &record.steps {
        let _ = std::fs::remove_file(work.partial_tensors(stage, phase, p.step));
    }
    let json = work.partial(stage, phase);
    std::fs::remove_file(&json).map_err(|e| Error::io(&json, e))
}
