//! Frozen linear layers of n models, stacked, and their merged forms: the fold
//! W* = Σ_i M⁽ⁱ⁾ W_i U⁽ⁱ⁾ (method.md §3.1), the literal n-branch form and the local problem of
//! one layer.

use crate::core::linear::Linear;
use crate::core::mu::{MuMatrix, Role};
use crate::core::tensor::f32;
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::Result;
use tch::Tensor;

/// Layer l of every model: W_iᵀ stacked [n, in, out] and biases [n, out].
pub struct FrozenLayer {
    pub wt: Tensor,
    pub b: Tensor,
}

impl FrozenLayer {
    /// One linear map of every model, stacked.
    pub fn stack(layers: &[&Linear]) -> Self {
        let wt: Vec<Tensor> = layers.iter().map(|l| l.w.detach().tr()).collect();
        let b: Vec<Tensor> = layers.iter().map(|l| l.b.detach()).collect();
        Self {
            wt: Tensor::stack(&wt, 0).contiguous(),
            b: Tensor::stack(&b, 0),
        }
    }
    /// Model i's layer, a view of the stacked tensors (no copy).
    pub fn model(&self, i: usize) -> Linear {
        Linear {
            w: self.wt.get(i as i64).tr(),
            b: self.b.get(i as i64),
        }
    }
    pub fn out_dim(&self) -> usize {
        self.wt.size()[2] as usize
    }
    pub fn to_device(&mut self, device: tch::Device) {
        self.wt = self.wt.to_device(device);
        self.b = self.b.to_device(device);
    }
    /// Branch outputs W_i v_i + b_i for v [n, B, in], or for a shared input [B, in], in fp32.
    pub fn branches(&self, v: &Tensor) -> Tensor {
        let (v, wt) = (f32(v), f32(&self.wt));
        let y = if v.dim() == 2 {
            v.matmul(&wt)
        } else {
            v.bmm(&wt)
        };
        y + f32(&self.b).unsqueeze(1)
    }
}

/// The merge and unmerge of one layer (one local problem).
pub struct LayerMu {
    pub m: MuMatrix,
    pub u: MuMatrix,
}

impl LayerMu {
    pub fn new(mu_type: MuType, init: Init, n: usize, width: usize, rank: usize) -> Result<Self> {
        Ok(Self {
            m: MuMatrix::new(Role::Merge, mu_type, init, n, width, rank)?,
            u: MuMatrix::new(Role::Unmerge, mu_type, init, n, width, rank)?,
        })
    }
    pub fn params(&self) -> Vec<Tensor> {
        self.m.params().into_iter().chain(self.u.params()).collect()
    }
}

/// Layer l with its merge and its input unmerge pushed into the frozen weights, as parts
/// `(left, Q)`: W*ᵀ = Σ_parts left·Q (left None = identity), each Q = Σ_i P_i M_i. `u_prev` is
/// None for layer 0, whose input is shared. Also returns the folded bias b* = Σ_i b_i M_i.
fn folded_parts(
    layer: &FrozenLayer,
    m: &MuMatrix,
    u_prev: Option<&MuMatrix>,
) -> (Vec<(Option<Tensor>, Tensor)>, Tensor) {
    let parts = match u_prev {
        None => vec![(None, layer.wt.shallow_clone())],
        Some(u) => u.push_into(&layer.wt),
    };
    let parts = parts
        .into_iter()
        .map(|(left, p)| (left, m.merge(&p)))
        .collect();
    let b = m.merge(&layer.b.unsqueeze(1)).squeeze_dim(0);
    (parts, b)
}

/// Folded layer, row convention: h*_l = relu(h*_{l-1} · wt + b) with
/// wt = W*ᵀ = Σ_i U_{l-1}⁽ⁱ⁾ W_iᵀ M_l⁽ⁱ⁾ and b = Σ_i b_i M_l⁽ⁱ⁾.
pub fn fold_layer(
    layer: &FrozenLayer,
    m: &MuMatrix,
    u_prev: Option<&MuMatrix>,
) -> (Tensor, Tensor) {
    let (parts, b) = folded_parts(layer, m, u_prev);
    let wt = parts
        .into_iter()
        .map(|(left, q)| left.map_or(q.shallow_clone(), |a| a.matmul(&q)))
        .reduce(|acc, t| acc + t)
        .unwrap_or_else(|| Tensor::zeros([0], crate::core::tensor::F32));
    (wt, b)
}

/// One layer of the merged stream: h*_l = relu(Σ_i M_l⁽ⁱ⁾ (W_i U_{l-1}⁽ⁱ⁾ h*_{l-1} + b_i)), as
/// n branches (`Literal`) or through the fold (`Fold`); `u_prev` None means a shared input.
/// Layers whose M/U are `full` always run their branches: their fold costs n·k³.
pub fn layer_forward(
    layer: &FrozenLayer,
    m: &MuMatrix,
    u_prev: Option<&MuMatrix>,
    h: &Tensor,
    form: StepForm,
) -> Tensor {
    let branchwise =
        form == StepForm::Literal || m.is_full() || u_prev.is_some_and(MuMatrix::is_full);
    let z = if branchwise {
        let v = u_prev.map_or(h.shallow_clone(), |u| u.unmerge(h));
        m.merge(&layer.branches(&v))
    } else {
        let (parts, b) = folded_parts(layer, m, u_prev);
        parts
            .iter()
            .map(|(left, q)| {
                left.as_ref()
                    .map_or(h.shallow_clone(), |a| h.matmul(a))
                    .matmul(q)
            })
            .fold(b.shallow_clone(), |acc, t| acc + t)
    };
    z.relu()
}

/// A local problem: per-model inputs [n, B, in] (or a shared [B, in]) → the reconstruction of
/// the layer's per-model outputs [n, B, out] through its own M and U.
pub fn local_layer_forward(layer: &FrozenLayer, mu: &LayerMu, input: &Tensor) -> Tensor {
    let h = mu.m.merge(&layer.branches(input)).relu();
    mu.u.unmerge(&h)
}

/// Each layer of the folded ViT, as (transposed weight, bias) → a `Linear`.
pub(crate) fn folded_linear(layer: &FrozenLayer, m: &MuMatrix, u: &MuMatrix) -> Linear {
    let (wt, b) = fold_layer(layer, m, Some(u));
    Linear { w: wt.tr(), b }
}
