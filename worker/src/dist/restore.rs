//! A whole SuperNet's M/U from what the stages checkpointed after a phase, for the rows that
//! evaluate the local phase in one piece.

use crate::core::tensor::{assign, to_tch};
use fsmerge_common::checkpoint::{read_tensors, tensor_names};
use fsmerge_common::plan::Plan;
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use tch::Tensor;

/// Set `params` (a whole SuperNet's named parameters) to what the stages of `plan` checkpointed
/// after `phase`: each name from the first stage whose checkpoint holds it (the shared
/// M_res/U_res are in every stage's, equal). A name in no checkpoint is an error.
pub fn restore_phase(
    work: &WorkDir,
    plan: &Plan,
    phase: &str,
    params: Vec<(String, Tensor)>,
) -> Result<()> {
    let mut left: BTreeMap<String, Tensor> = params.into_iter().collect();
    for st in &plan.stages {
        let (file, _) = work.checkpoint(st.index, phase);
        let held = tensor_names(&file)?;
        let names: Vec<String> = held.into_iter().filter(|n| left.contains_key(n)).collect();
        for (name, value) in read_tensors(&file, &names)? {
            if let Some(p) = left.remove(&name) {
                assign(&[p], &[to_tch(&value)])?;
            }
        }
    }
    if let Some(name) = left.keys().next() {
        return Err(Error::Checkpoint {
            file: work.checkpoint(0, phase).0,
            msg: format!("no stage's {phase} checkpoint holds the SuperNet tensor `{name}`"),
        });
    }
    Ok(())
}
