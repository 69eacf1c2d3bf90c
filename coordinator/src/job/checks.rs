//! Checks of the originals against the job before any work: width for `merge.rank`, one
//! classifier output per class.

use anyhow::{bail, Result};
use fsmerge_common::config::TaskConfig;
use fsmerge_common::Error;
use std::path::Path;

/// Check that `merge.rank` fits the transformers' width.
pub fn check_rank(rank: usize, width: usize) -> Result<()> {
    if rank > width {
        bail!(Error::field(
            "merge.rank",
            format!("{rank} is larger than the models' width {width}")
        ));
    }
    Ok(())
}

/// Check that task `task`'s original in `dir` has a classifier with one output per class.
pub fn check_classifier(dir: &Path, task: &TaskConfig, outputs: Option<usize>) -> Result<()> {
    if outputs != Some(task.classes.len()) {
        bail!(Error::Tensor {
            file: dir.to_path_buf(),
            tensor: "classifier.weight".into(),
            msg: format!(
                "task `{}` has {} classes but the model's classifier has {:?} outputs",
                task.name,
                task.classes.len(),
                outputs
            ),
        });
    }
    Ok(())
}
