//! The FS-Merge SuperNet of n MLPs (method.md §6). Layer l holds the n frozen linear maps
//! (W_i, b_i), a merge M_l of their outputs and an unmerge U_l of its merged, ReLU'd output:
//!
//!   h*_l = relu( Σ_i M_l⁽ⁱ⁾ (W_i U_{l-1}⁽ⁱ⁾ h*_{l-1} + b_i) ),  h*_0 = x (shared input, no U)
//!   ŷ = U_L h*_L ≈ [f_L¹(x); …; f_Lⁿ(x)]
//!
//! Folding W*_l = Σ_i M_l⁽ⁱ⁾ W_i U_{l-1}⁽ⁱ⁾, b*_l = Σ_i M_l⁽ⁱ⁾ b_i is exact, so a global step can
//! run the plain folded network instead of the n branches (`forward_fold`, architecture.md §5).
//! In local mode, layer l is its own problem: original features in, original features out.

use crate::core::linear::Linear;
use crate::core::merged_linear::{
    fold_layer, layer_forward, local_layer_forward, FrozenLayer, LayerMu,
};
use crate::core::mu::with_mu_seed;
use crate::families::mlp::model::Mlp;
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::{Error, Result};
use tch::Tensor;

/// The M/U of every layer (widths `widths`), drawn from libtorch's global generator in layer
/// order.
pub fn new_mu(
    mu_type: MuType,
    init: Init,
    n: usize,
    widths: &[usize],
    rank: usize,
) -> Result<Vec<LayerMu>> {
    widths
        .iter()
        .map(|&w| LayerMu::new(mu_type, init, n, w, rank))
        .collect()
}

/// The job's M/U init, the same values in every process: seeds libtorch's global generator from
/// the job seed and draws every layer's M/U, holding a lock so that workers sharing a process
/// (the embedded default) cannot interleave their draws.
pub fn seeded_mu(
    seed: u64,
    mu_type: MuType,
    init: Init,
    n: usize,
    widths: &[usize],
    rank: usize,
) -> Result<Vec<LayerMu>> {
    with_mu_seed(seed, || new_mu(mu_type, init, n, widths, rank))
}

pub struct SuperNet {
    pub layers: Vec<FrozenLayer>,
    pub mu: Vec<LayerMu>,
    pub n: usize,
}

impl SuperNet {
    pub fn new(models: &[&Mlp], mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let n = models.len();
        let depth = models.first().map_or(0, |m| m.body.len());
        if n < 2 || depth == 0 {
            return Err(Error::Compute(format!(
                "a SuperNet needs ≥ 2 models with ≥ 1 layer, got {n} × {depth}"
            )));
        }
        let layers: Vec<FrozenLayer> = (0..depth)
            .map(|l| FrozenLayer::stack(&models.iter().map(|m| &m.body[l]).collect::<Vec<_>>()))
            .collect();
        let widths: Vec<usize> = layers.iter().map(FrozenLayer::out_dim).collect();
        let mu = new_mu(mu_type, init, n, &widths, rank)?;
        Ok(Self { layers, mu, n })
    }

    pub fn params(&self) -> Vec<Tensor> {
        self.mu.iter().flat_map(LayerMu::params).collect()
    }

    /// The literal n-branch SuperNet: returns ŷ [n, B, k_L].
    pub fn forward_literal(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let u_prev = (l > 0).then(|| &self.mu[l - 1].u);
            h = layer_forward(layer, &self.mu[l].m, u_prev, &h, StepForm::Literal);
        }
        self.mu[self.layers.len() - 1].u.unmerge(&h)
    }

    /// Folded weights of every layer, differentiable in M/U.
    pub fn folded(&self) -> Vec<(Tensor, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, layer)| fold_layer(layer, &self.mu[l].m, (l > 0).then(|| &self.mu[l - 1].u)))
            .collect()
    }

    /// Same function and gradients as `forward_literal`, through the fold: each layer is one
    /// plain matmul with W* (its low-rank parts kept factored, so no k×k low-rank product is
    /// formed). Layers whose M/U are `full` run their branches instead: their fold costs n·k³.
    pub fn forward_fold(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let u_prev = (l > 0).then(|| &self.mu[l - 1].u);
            h = layer_forward(layer, &self.mu[l].m, u_prev, &h, StepForm::Fold);
        }
        self.mu[self.layers.len() - 1].u.unmerge(&h)
    }

    /// Local problem l: original per-model inputs f_{l-1} [n, B, in] (or the shared x [B, in]
    /// for l = 0) → reconstruction of f_l [n, B, out]. Reads only layer l's M/U.
    pub fn local_forward(&self, l: usize, input: &Tensor) -> Tensor {
        local_layer_forward(&self.layers[l], &self.mu[l], input)
    }

    /// The folded plain MLP body, and each task's head with its read-out U_L⁽ᵗ⁾ folded in
    /// (logits_t = W_t U_L⁽ᵗ⁾ h* + b_t).
    pub fn fold_to_mlp(&self, heads: &[&Linear]) -> (Vec<Linear>, Vec<Linear>) {
        tch::no_grad(|| {
            let body = self
                .folded()
                .into_iter()
                .map(|(wt, b)| Linear {
                    w: wt.tr().contiguous(),
                    b,
                })
                .collect();
            let u_last = &self.mu[self.layers.len() - 1].u;
            let heads = heads
                .iter()
                .enumerate()
                .map(|(t, h)| Linear {
                    w: h.w.matmul(&u_last.block(t).tr()),
                    b: h.b.detach().copy(),
                })
                .collect();
            (body, heads)
        })
    }
}
