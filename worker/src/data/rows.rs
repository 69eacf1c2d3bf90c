//! Rows of a dataset split (pixels or token ids, with labels) and the three splits.

use crate::core::tensor::F32;
use tch::Tensor;

/// Images of one split: rows of `dim` normalized pixels (or, for text, token ids), with dataset
/// labels.
#[derive(Clone)]
pub struct ImageSet {
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
    pub dim: usize,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.pixels[i * self.dim..(i + 1) * self.dim]
    }
    pub(crate) fn select(&self, idx: &[usize]) -> ImageSet {
        let mut pixels = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            pixels.extend_from_slice(self.row(i));
        }
        ImageSet {
            pixels,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            dim: self.dim,
        }
    }
    /// Indices of the images whose label is one of `classes`, in split order.
    pub fn indices_of(&self, classes: &[usize]) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| classes.contains(&self.labels[i]))
            .collect()
    }
    /// The images of one task as a tensor [N, dim] and labels local to the task (position of the
    /// dataset label in `classes`).
    pub fn task_tensors(&self, classes: &[usize]) -> (Tensor, Tensor) {
        let idx = self.indices_of(classes);
        let sub = self.select(&idx);
        let local: Vec<i64> = sub
            .labels
            .iter()
            .map(|l| classes.iter().position(|c| c == l).unwrap_or(0) as i64)
            .collect();
        (sub.tensor(), Tensor::from_slice(&local))
    }
    pub fn tensor(&self) -> Tensor {
        Tensor::from_slice(&self.pixels)
            .reshape([self.len() as i64, self.dim as i64])
            .to_kind(F32.0)
    }
}

pub struct Splits {
    /// Images are `side` × `side`, one channel (0 for text).
    pub side: usize,
    pub train: ImageSet,
    pub val: ImageSet,
    pub test: ImageSet,
}
