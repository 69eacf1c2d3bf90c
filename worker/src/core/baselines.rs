//! RegMean's Gram sums and solve, for every family (method.md §13); `first`, `average` and KD
//! run on the workers (`dist::evaluate`, `dist::distill`).

use crate::core::linear::Linear;
use fsmerge_common::{Error, Result};
use tch::Tensor;

/// RegMean's sums for one linear map over the models: Σ_i G_i and Σ_i G_i W_iᵀ, with
/// G_i = α XᵢᵀXᵢ + (1−α) diag(XᵢᵀXᵢ) from the map's inputs Xᵢ [rows, in] inside model i.
#[derive(Default)]
pub struct RegmeanSums(Option<(Tensor, Tensor)>);

impl RegmeanSums {
    pub fn add(&mut self, x: &Tensor, w: &Tensor, alpha: f64) {
        // In fp32 whatever the originals' precision.
        let (x, w) = (&crate::core::tensor::f32(x), &crate::core::tensor::f32(w));
        let g = x.tr().matmul(x);
        let g = &g * alpha + g.diagonal(0, 0, 1).diag_embed(0, -2, -1) * (1.0 - alpha);
        let rhs = g.matmul(&w.tr());
        self.0 = Some(match self.0.take() {
            Some((gs, rs)) => (gs + g, rs + rhs),
            None => (g, rhs),
        });
    }

    /// Overwrite `target`'s weight in place with W* (`regmean_solve`); nothing added, nothing
    /// changed. `what` names the map in an error.
    pub fn solve_into(self, target: &Linear, what: &str) -> Result<()> {
        let Some((gram, rhs)) = self.0 else {
            return Ok(());
        };
        let wt = regmean_solve(gram, &rhs, what)?;
        tch::no_grad(|| target.w.shallow_clone().copy_(&wt.tr()));
        Ok(())
    }
}

/// Solve RegMean's normal equations (Σ G_i) W*ᵀ = Σ G_i W_iᵀ. A ridge of 1e-6 · mean(diag)
/// keeps the system solvable when an input feature is dead in every model (its rows then do not
/// matter). `what` names the map in the error.
pub fn regmean_solve(gram: Tensor, rhs: &Tensor, what: &str) -> Result<Tensor> {
    let dim = gram.size()[0];
    let ridge = gram
        .diagonal(0, 0, 1)
        .mean(None)
        .double_value(&[])
        .max(1e-12)
        * 1e-6;
    let gram = gram + Tensor::eye(dim, crate::core::tensor::F32) * ridge;
    Tensor::f_linalg_solve(&gram, rhs, true)
        .map_err(|e| Error::Compute(format!("RegMean {what}: {e}")))
}

/// RegMean of one encoder block `l`'s six linear maps (q, k, v, out, fc1, fc2), solved into the
/// weights of `merged` (a stage's tensors under the merged model's names, `layout` naming the
/// block's parts). `models` holds each model's block and the inputs of its maps as rows
/// [R_i, k]: q/k/v's, out's, fc1's and fc2's (`EncoderBlock::linear_inputs_*`).
pub fn regmean_block(
    merged: &std::collections::BTreeMap<String, Tensor>,
    l: usize,
    layout: &crate::core::encoder_block::Layout,
    models: &[(&crate::core::encoder_block::EncoderBlock, [Tensor; 4])],
    alpha: f64,
) -> Result<()> {
    use crate::core::encoder_block::Part;
    let maps = [
        (Part::Q, 0),
        (Part::K, 0),
        (Part::V, 0),
        (Part::Out, 1),
        (Part::Fc1, 2),
        (Part::Fc2, 3),
    ];
    for (k, (part, input)) in maps.into_iter().enumerate() {
        let mut sums = RegmeanSums::default();
        for (block, inputs) in models {
            sums.add(&inputs[input], block.part(part).0, alpha);
        }
        let name = layout
            .iter()
            .find(|(_, p)| *p == part)
            .map(|(n, _)| format!("encoder.layer.{l}.{n}.weight"))
            .unwrap_or_default();
        let w = merged
            .get(&name)
            .ok_or_else(|| Error::Compute(format!("RegMean: the merged block lacks `{name}`")))?;
        let target = Linear {
            w: w.shallow_clone(),
            b: Tensor::zeros([0], (tch::Kind::Float, w.device())),
        };
        sums.solve_into(&target, &format!("block {l}, linear map {k}"))?;
    }
    Ok(())
}
