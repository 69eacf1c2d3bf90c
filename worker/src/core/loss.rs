//! The feature-reconstruction loss of FS-Merge and the `own` targets mask.

use tch::Tensor;

/// Reconstruction loss of per-model predictions [n, B, k] against targets [n, B, k].
/// `own`: only the slice of each input's own task (mean over B·k); `all`: every slice (mean).
pub fn reconstruction_loss(pred: &Tensor, target: &Tensor, own_mask: Option<&Tensor>) -> Tensor {
    let sq = (pred - target).square();
    match own_mask {
        None => sq.mean(None),
        Some(mask) => {
            let size = pred.size();
            (sq * mask.unsqueeze(2)).sum(None) / (size[1] * size[2]) as f64
        }
    }
}

/// One-hot mask [n, B] of each input's task.
pub fn own_mask(task: &Tensor, n: usize) -> Tensor {
    task.one_hot(n as i64).to_kind(tch::Kind::Float).tr()
}
