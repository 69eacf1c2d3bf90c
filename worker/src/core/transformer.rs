//! What the transformer SuperNets share: plan units (embeddings, blocks), the mergeability
//! check, and the draw of their M/U.

use crate::core::mu::{MuMatrix, Role};
use fsmerge_common::config::{Init, MuType};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::{Error, Result};
use std::ops::Range;
use std::path::Path;

/// The blocks among plan units `units` (unit 0 is the embeddings, unit 1 + l is block l).
/// Local mode's residual unmerge of a merged stream y [B, T, d]: U_res y [n, B, T, d], and the
/// residual basis' drift, the mean square of M_res U_res y − y.
pub fn unmerge_res(
    m_res: &MuMatrix,
    u_res: &MuMatrix,
    y: &tch::Tensor,
) -> (tch::Tensor, tch::Tensor) {
    let (b, t, d) = y.size3().unwrap_or((0, 0, 0));
    let flat = y.view([-1, d]);
    let pred = u_res.unmerge(&flat);
    let drift = (m_res.merge(&pred) - &flat).square().mean(None);
    (pred.view([-1, b, t, d]), drift)
}

/// Local mode's residual merge M_res f [B, T, d] of the originals' streams f [n, B, T, d].
pub fn merge_res(m_res: &MuMatrix, f: &tch::Tensor) -> tch::Tensor {
    let (n, b, t, d) = f.size4().unwrap_or((0, 0, 0, 0));
    m_res.merge(&f.view([n, b * t, d])).view([b, t, d])
}

pub fn unit_blocks(units: &Range<usize>) -> Range<usize> {
    units.start.max(1) - 1..units.end.saturating_sub(1)
}

/// A transformer part's plan units must be some of its model's (embeddings + `layers` blocks).
pub(crate) fn check_part_units(
    dir: &Path,
    units: &Range<usize>,
    layers: usize,
    model: &str,
) -> Result<()> {
    if units.is_empty() || units.end > layers + 1 {
        return Err(Error::Plan(format!(
            "units {units:?} of {}: the {model} has {} (embeddings + {layers} blocks)",
            dir.display(),
            layers + 1
        )));
    }
    Ok(())
}

/// Refuse fewer than 2 models or models whose `shape` (the fields named by `fields`) differs
/// from model 0's.
pub(crate) fn check_mergeable<M, S: PartialEq + std::fmt::Debug>(
    models: &[&M],
    shape: impl Fn(&M) -> S,
    fields: &str,
) -> Result<()> {
    let n = models.len();
    if n < 2 {
        return Err(Error::Compute(format!(
            "a SuperNet needs ≥ 2 models, got {n}"
        )));
    }
    let want = shape(models[0]);
    match models.iter().position(|m| shape(m) != want) {
        Some(i) => Err(Error::Compute(format!(
            "model {i} has shape {:?} ({fields}) but model 0 has {want:?}",
            shape(models[i])
        ))),
        None => Ok(()),
    }
}

/// How a transformer SuperNet draws its M/U (shared by ViT and BERT): rank r for d-wide
/// matrices, ⌊r·h/d⌋ for the MLP's hidden M_1/U_1 (method.md §3.2), and the attention ones with
/// the `att_heads` structure when asked. Each call draws from libtorch's global generator, so
/// the call order is the init order.
pub(crate) struct MuDraw {
    mu_type: MuType,
    init: Init,
    n: usize,
    d: usize,
    h: usize,
    heads: usize,
    rank: usize,
}

impl MuDraw {
    pub(crate) fn new(
        mu_type: MuType,
        init: Init,
        n: usize,
        shape: [usize; 3],
        rank: usize,
    ) -> Self {
        let [d, h, heads] = shape;
        Self {
            mu_type,
            init,
            n,
            d,
            h,
            heads,
            rank,
        }
    }
    /// A d-wide M or U (embeddings, residual, MLP input/output, pooler, read-out).
    pub(crate) fn width(&self, role: Role) -> Result<MuMatrix> {
        MuMatrix::new(role, self.mu_type, self.init, self.n, self.d, self.rank)
    }
    /// The draw of a ViT of config `c`.
    pub(crate) fn for_vit(
        c: &VitConfig,
        mu_type: MuType,
        init: Init,
        n: usize,
        rank: usize,
    ) -> Self {
        let shape = [c.hidden_size, c.intermediate_size, c.num_attention_heads];
        Self::new(mu_type, init, n, shape, rank)
    }
    /// An h-wide M or U of the MLP's hidden layer.
    pub(crate) fn hidden(&self, role: Role) -> Result<MuMatrix> {
        let rank_h = (self.rank * self.h / self.d).max(1);
        MuMatrix::new(role, self.mu_type, self.init, self.n, self.h, rank_h)
    }
    /// An attention M or U (U_att, M_q, M_k, M_v, U_o, M_o).
    pub(crate) fn attention(&self, role: Role) -> Result<MuMatrix> {
        let (t, i) = (self.mu_type, self.init);
        MuMatrix::attention(role, t, i, self.n, self.d, self.rank, self.heads)
    }
    /// One encoder block's ten matrices, in draw order: U_att, M_q, M_k, M_v, U_o, M_o, then
    /// U_0, M_1, U_1, M_2 (`EncoderBlockMu::new`'s order).
    pub(crate) fn block(&self) -> Result<[MuMatrix; 10]> {
        Ok([
            self.attention(Role::Unmerge)?,
            self.attention(Role::Merge)?,
            self.attention(Role::Merge)?,
            self.attention(Role::Merge)?,
            self.attention(Role::Unmerge)?,
            self.attention(Role::Merge)?,
            self.width(Role::Unmerge)?,
            self.hidden(Role::Merge)?,
            self.hidden(Role::Unmerge)?,
            self.width(Role::Merge)?,
        ])
    }
}
