//! The loop of `fsmerge train` over the tasks whose originals are missing: each task's splits,
//! its training settings and seed, the family's training of one model, and its log line.

use crate::data::rows::Splits;
use crate::train::optim::OriginalSpec;
use crate::train::progress::LogRow;
use fsmerge_common::config::{JobConfig, Objective, TaskConfig};
use fsmerge_common::Result;
use tch::Tensor;

/// The data of one original's training: (inputs, labels) of its task's train and validation
/// rows.
pub type TaskData<'a> = ((&'a Tensor, &'a Tensor), (&'a Tensor, &'a Tensor));

/// Trains and writes one original; returns its validation accuracy and log.
pub type TrainOne<'a> =
    dyn FnMut(&TaskConfig, &OriginalSpec, TaskData) -> Result<(f64, Vec<LogRow>)> + 'a;

/// Train the originals of `tasks` ((index into `job.tasks`, seed) each) with `train_one`, which
/// trains and writes one model and returns its validation accuracy and log.
pub fn train_each(
    job: &JobConfig,
    tasks: &[(usize, u64)],
    splits: &Splits,
    train_one: &mut TrainOne,
) -> Result<Vec<LogRow>> {
    let mut log = Vec::new();
    for &(t, seed) in tasks {
        let task = &job.tasks[t];
        let train = splits.train.task_tensors(&task.classes);
        let val = splits.val.task_tensors(&task.classes);
        let spec = OriginalSpec {
            task: &task.name,
            classes: task.classes.len(),
            epochs: job.train.epochs,
            lr: job.train.lr,
            batch_size: job.train.batch_size,
            seed,
        };
        let data = ((&train.0, &train.1), (&val.0, &val.1));
        let (val_acc, rows) = train_one(task, &spec, data)?;
        let measure = match job.objective() {
            Objective::Classify => "validation accuracy",
            Objective::Lm => "validation next-token accuracy",
        };
        tracing::info!(
            "original {:?} `{}` (seed {seed}): {measure} {:.2}%",
            job.model.arch,
            task.name,
            100.0 * val_acc
        );
        log.extend(rows);
    }
    Ok(log)
}
