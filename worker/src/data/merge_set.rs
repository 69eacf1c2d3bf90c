//! The merge data of FS-Merge: per task, N original training images (first N of a seeded
//! shuffle of the task's train split) plus N_aug augmented copies. Labels are never used; each
//! sample carries its task id.

use crate::data::augment;
use crate::data::rows::Splits;
use fsmerge_common::config::{AugmentConfig, TaskConfig};
use fsmerge_common::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::Tensor;

pub struct MergeSet {
    /// Inputs [N, D].
    pub x: Tensor,
    /// Task id of each input [N] (i64).
    pub task: Tensor,
    /// Samples per task, in task order (the set is laid out task by task).
    pub per_task: Vec<usize>,
}

impl MergeSet {
    pub fn len(&self) -> usize {
        self.per_task.iter().sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Row range of task t.
    pub fn task_range(&self, t: usize) -> std::ops::Range<usize> {
        let start: usize = self.per_task[..t].iter().sum();
        start..start + self.per_task[t]
    }
}

pub fn build(
    splits: &Splits,
    tasks: &[TaskConfig],
    n_originals: usize,
    n_augmented: usize,
    aug: &AugmentConfig,
    seed: u64,
) -> Result<MergeSet> {
    let mut rows: Vec<f32> = Vec::new();
    let mut task_ids: Vec<i64> = Vec::new();
    let mut per_task = Vec::new();
    for (t, task) in tasks.iter().enumerate() {
        let mut idx = splits.train.indices_of(&task.classes);
        if n_originals > idx.len() {
            return Err(Error::field(
                "merge.n_originals",
                format!(
                    "{n_originals} is larger than task `{}`'s training split ({} images)",
                    task.name,
                    idx.len()
                ),
            ));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed.wrapping_mul(1_000_003).wrapping_add(t as u64),
        );
        idx.shuffle(&mut rng);
        let originals: Vec<Vec<f32>> = idx[..n_originals]
            .iter()
            .map(|&i| splits.train.row(i).to_vec())
            .collect();
        let augmented = augment::augmented(&originals, splits.side, n_augmented, aug, &mut rng);
        for r in originals.iter().chain(&augmented) {
            rows.extend_from_slice(r);
        }
        task_ids.extend(std::iter::repeat_n(
            t as i64,
            originals.len() + augmented.len(),
        ));
        per_task.push(originals.len() + augmented.len());
    }
    let n = task_ids.len() as i64;
    Ok(MergeSet {
        x: Tensor::from_slice(&rows).reshape([n, splits.train.dim as i64]),
        task: Tensor::from_slice(&task_ids),
        per_task,
    })
}
