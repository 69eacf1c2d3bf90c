//! Checks of the originals against the job, made before any work: a classifier with one output
//! per class of its task, and a width that `merge.rank` fits.

use fsmerge_common::config::TaskConfig;
use fsmerge_common::{Error, Result};
use std::path::Path;

/// Check that `merge.rank` fits the models' (smallest) width.
pub fn check_rank(rank: usize, width: usize) -> Result<()> {
    if rank > width {
        return Err(Error::field(
            "merge.rank",
            format!("{rank} is larger than the models' width {width}"),
        ));
    }
    Ok(())
}

/// Check that task `task`'s original in `dir` has a classifier with one output per class.
pub fn check_classifier(dir: &Path, task: &TaskConfig, outputs: Option<usize>) -> Result<()> {
    if outputs != Some(task.classes.len()) {
        return Err(Error::Tensor {
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
