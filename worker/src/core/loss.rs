//! The feature-reconstruction loss of FS-Merge and the `own` targets mask.

use tch::{Kind, Tensor};

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

/// Reconstruction of token states [n, B, T, d] over the real tokens only (`tokens` [B, T], 1 =
/// token): each text's mean over its real tokens, then the mean over texts, so every text weighs
/// the same whatever its length, and a batch's loss is the mean of its samples' (replicas that
/// split a batch by rows sum to it exactly). `all` averages every model's slice, `own` (one-hot
/// [n, B]) takes each input's own model's.
pub fn token_loss(pred: &Tensor, target: &Tensor, tokens: &Tensor, own: Option<&Tensor>) -> Tensor {
    let (n, b, _, d) = pred.size4().unwrap_or((0, 0, 0, 0));
    let weight = tokens.to_kind(Kind::Float);
    let per_text = weight.sum_dim_intlist(1, false, None).clamp_min(1.0) * d as f64;
    // Σ over tokens and features, per model and text: [n, B].
    let sq = ((pred - target).square() * weight.unsqueeze(0).unsqueeze(-1)).sum_dim_intlist(
        [2, 3].as_slice(),
        false,
        None,
    ) / per_text.unsqueeze(0);
    match own {
        None => sq.sum(Kind::Float) / (b * n) as f64,
        Some(m) => (sq * m).sum(Kind::Float) / b as f64,
    }
}
