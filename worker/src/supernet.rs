//! The FS-Merge SuperNet of n MLPs (method.md §6). Layer l holds the n frozen linear maps
//! (W_i, b_i), a merge M_l of their outputs and an unmerge U_l of its merged, ReLU'd output:
//!
//!   h*_l = relu( Σ_i M_l⁽ⁱ⁾ (W_i U_{l-1}⁽ⁱ⁾ h*_{l-1} + b_i) ),  h*_0 = x (shared input, no U)
//!   ŷ = U_L h*_L ≈ [f_L¹(x); …; f_Lⁿ(x)]
//!
//! Folding W*_l = Σ_i M_l⁽ⁱ⁾ W_i U_{l-1}⁽ⁱ⁾, b*_l = Σ_i M_l⁽ⁱ⁾ b_i is exact, so a global step can
//! run the plain folded network instead of the n branches (`forward_fold`, architecture.md §5).
//! In local mode, layer l is its own problem: original features in, original features out.

use crate::mlp::{Linear, Mlp};
use crate::mu::{MuMatrix, Role};
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::{Error, Result};
use tch::Tensor;

/// Layer l of every model: W_iᵀ stacked [n, in, out] and biases [n, out].
pub struct FrozenLayer {
    pub wt: Tensor,
    pub b: Tensor,
}

impl FrozenLayer {
    pub fn from_models(models: &[&Mlp], l: usize) -> Self {
        let wt: Vec<Tensor> = models.iter().map(|m| m.body[l].w.detach().tr()).collect();
        let b: Vec<Tensor> = models.iter().map(|m| m.body[l].b.detach()).collect();
        Self {
            wt: Tensor::stack(&wt, 0).contiguous(),
            b: Tensor::stack(&b, 0),
        }
    }
    /// One linear map of every model, stacked.
    pub fn stack(layers: &[&Linear]) -> Self {
        let wt: Vec<Tensor> = layers.iter().map(|l| l.w.detach().tr()).collect();
        let b: Vec<Tensor> = layers.iter().map(|l| l.b.detach()).collect();
        Self {
            wt: Tensor::stack(&wt, 0).contiguous(),
            b: Tensor::stack(&b, 0),
        }
    }
    pub fn out_dim(&self) -> usize {
        self.wt.size()[2] as usize
    }
    pub fn to_device(&mut self, device: tch::Device) {
        self.wt = self.wt.to_device(device);
        self.b = self.b.to_device(device);
    }
    /// Branch outputs W_i v_i + b_i for v [n, B, in], or for a shared input [B, in].
    pub fn branches(&self, v: &Tensor) -> Tensor {
        let y = if v.dim() == 2 {
            v.matmul(&self.wt)
        } else {
            v.bmm(&self.wt)
        };
        y + self.b.unsqueeze(1)
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
        .unwrap_or_else(|| Tensor::zeros([0], crate::tensor::F32));
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

/// Run `draw` with libtorch's global generator seeded for the job's M/U init, holding a lock
/// so that workers sharing a process (the embedded default) cannot interleave their draws.
pub fn with_mu_seed<T>(seed: u64, draw: impl FnOnce() -> T) -> T {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed.wrapping_add(MU_SEED_OFFSET) as i64);
    draw()
}

/// Offset of the M/U init's seed from the job seed (keeps it apart from the originals' seeds).
pub const MU_SEED_OFFSET: u64 = 0x4d55;

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
            .map(|l| FrozenLayer::from_models(models, l))
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
