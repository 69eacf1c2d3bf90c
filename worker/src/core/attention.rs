//! Multi-head scaled dot-product attention (HF layout), shared by the encoder families.

use crate::core::linear::Linear;
use tch::Tensor;

/// Multi-head scaled dot-product attention of h [B, T, D] (before the output projection);
/// `bias` [B, 1, 1, T] is added to the scores (a padding mask), if given.
pub fn attention(
    h: &Tensor,
    q: &Linear,
    k: &Linear,
    v: &Linear,
    heads: i64,
    bias: Option<&Tensor>,
) -> Tensor {
    attend(&q.forward(h), &k.forward(h), &v.forward(h), heads, bias)
}

/// The attention core on projected q, k, v [B, T, D]: softmax(q_j k_jᵀ / √d_h + bias) v_j per
/// head j, heads concatenated back to [B, T, D].
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, bias: Option<&Tensor>) -> Tensor {
    let (b, t, d) = q.size3().unwrap_or((0, 0, 0));
    let split = |y: &Tensor| y.view([b, t, heads, d / heads]).transpose(1, 2);
    let (q, k, v) = (split(q), split(k), split(v));
    let scores = q.matmul(&k.transpose(-2, -1)) / ((d / heads) as f64).sqrt();
    let scores = match bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    // The softmax in fp32 whatever the weights' precision, its weights back in v's.
    scores
        .softmax(-1, tch::Kind::Float)
        .to_kind(v.kind())
        .matmul(&v)
        .transpose(1, 2)
        .contiguous()
        .view([b, t, d])
}
