//! The FS-Merge SuperNet of n Hugging Face ViTs (method.md §4 for pre-LN ViTs; HF's ViT has no
//! ln_pre and no output projection, so the output unit is LN_post and the read-out U_final).
//! The residual stream x* lives in merged space; every sub-block unmerges after its LayerNorm
//! and merges before the residual add:
//!
//! ```text
//!   x*_0 = Σ_i M_pre⁽ⁱ⁾ e_i                        (patches + [CLS] + positions of model i)
//!   attn:  a = LN_1 x*;  q* = Σ_i M_q⁽ⁱ⁾(W_q,i U_att⁽ⁱ⁾ a + b_q,i)   (k*, v* alike, one U_att)
//!          x* += Σ_i M_o⁽ⁱ⁾(W_o,i U_o⁽ⁱ⁾ attend(q*, k*, v*) + b_o,i)
//!   MLP:   x* += Σ_i M_2⁽ⁱ⁾(W_2,i U_1⁽ⁱ⁾ gelu(Σ_j M_1⁽ʲ⁾(W_1,j U_0⁽ʲ⁾ LN_2 x* + b_1,j)) + b_2,i)
//!   out:   ŷ = U_final LN_post(x*_L[CLS]) ≈ [pooled_1; …; pooled_n]
//! ```
//!
//! Every M/U sits between a LayerNorm/activation and a frozen linear map, so the network folds
//! exactly into one standard ViT (`fold`), and a global step can run that folded ViT
//! (`StepForm::Fold`, architecture.md §5). `local` mode trains each block as its own problem on
//! the originals' features, through a residual merge shared by every block (M_res, which is
//! M_pre: the embedding's merge is the stream's merge) and a shared unmerge U_res.

use crate::core::attention::attend;
use crate::core::encoder_block::{EncoderBlock, EncoderBlockMu, FrozenBlock, Norm};
use crate::core::layer_norm::{FrozenLn, MergedLn};
use crate::core::linear::Linear;
use crate::core::merged_linear::{fold_layer, folded_linear, FrozenLayer};
use crate::core::mu::{MuMatrix, Role};
use crate::core::tensor::f32;
use crate::core::transformer::{check_mergeable, MuDraw};
use crate::families::vit::model::{embed_tokens, Vit};
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::{Error, Result};
use tch::Tensor;

/// The embeddings of every model, frozen.
pub(crate) struct FrozenEmbed {
    /// The patch convolution as a linear map of flattened patches: wt [n, C·p·p, d].
    patch: FrozenLayer,
    cls: Tensor,
    pos: Tensor,
}

impl FrozenEmbed {
    pub(crate) fn move_to(&mut self, device: tch::Device) {
        self.patch.to_device(device);
        self.cls = self.cls.to_device(device);
        self.pos = self.pos.to_device(device);
    }

    /// Every model's (patch kernel [d, C, p, p], patch bias [d], [CLS], positions).
    pub(crate) fn stack(e: &[[&Tensor; 4]]) -> Self {
        let n = e.len() as i64;
        let d = e.first().map_or(0, |e| e[0].size()[0]);
        let patch_lin: Vec<Linear> = e
            .iter()
            .map(|[w, b, _, _]| Linear {
                w: w.view([d, -1]),
                b: b.shallow_clone(),
            })
            .collect();
        let stack =
            |i: usize| Tensor::stack(&e.iter().map(|e| e[i].detach()).collect::<Vec<_>>(), 0);
        Self {
            patch: FrozenLayer::stack(&patch_lin.iter().collect::<Vec<_>>()),
            cls: stack(2).view([n, 1, d]),
            pos: stack(3).view([n, -1, d]),
        }
    }

    /// Flattened patches [B·P, C·p·p], in the order of the patch convolution's output.
    fn patches(pixels: &Tensor, p: i64) -> Tensor {
        let (b, c, hh, ww) = pixels.size4().unwrap_or((0, 0, 0, 0));
        pixels
            .view([b, c, hh / p, p, ww / p, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([-1, c * p * p])
    }

    /// x*_0 [B, T, d]: the n embeddings merged by `m_pre` (literally, or through the fold).
    pub(crate) fn merged(
        &self,
        m_pre: &MuMatrix,
        pixels: &Tensor,
        form: StepForm,
        cfg: &VitConfig,
    ) -> Tensor {
        let p = cfg.patch_size as i64;
        match form {
            StepForm::Literal => {
                let (n, d) = (self.cls.size()[0], cfg.hidden_size as i64);
                let b = pixels.size()[0];
                let e = self
                    .patch
                    .branches(&Self::patches(pixels, p))
                    .view([n, b, -1, d]);
                let cls = f32(&self.cls).unsqueeze(1).expand([n, b, 1, d], false);
                let e = Tensor::cat(&[cls, e], 2) + f32(&self.pos).unsqueeze(1);
                let t = e.size()[2];
                m_pre.merge(&e.view([n, b * t, d])).view([b, t, d])
            }
            StepForm::Fold => {
                let [w, bias, cls, pos] = self.fold(m_pre, cfg);
                embed_tokens(pixels, &w, &bias, &cls, &pos, p)
            }
        }
    }

    /// Folded embedding: patch kernel [d, C, p, p], bias [d], [CLS] [1, 1, d], positions [1, T, d].
    pub(crate) fn fold(&self, m_pre: &MuMatrix, cfg: &VitConfig) -> [Tensor; 4] {
        let (d, c, p) = (
            cfg.hidden_size as i64,
            cfg.num_channels as i64,
            cfg.patch_size as i64,
        );
        let (wt, b) = fold_layer(&self.patch, m_pre, None);
        let w = wt.tr().contiguous().view([d, c, p, p]);
        let cls = m_pre.merge(&self.cls).view([1, 1, d]);
        let pos = m_pre.merge(&self.pos).unsqueeze(0);
        [w, b, cls, pos]
    }
}

/// One block of the SuperNet: the models' frozen block with its M/U and LayerNorms.
pub(crate) struct BlockUnit<'a> {
    pub(crate) frozen: &'a FrozenBlock,
    pub(crate) mu: &'a EncoderBlockMu,
    pub(crate) heads: i64,
}

impl BlockUnit<'_> {
    /// Folded into a plain pre-LN block (differentiable in M/U/LN).
    pub(crate) fn fold(&self) -> EncoderBlock {
        let (fb, mu) = (self.frozen, self.mu);
        EncoderBlock {
            ln_attn: mu.ln_attn.layer_norm(),
            q: folded_linear(&fb.q, &mu.m_q, &mu.u_att),
            k: folded_linear(&fb.k, &mu.m_k, &mu.u_att),
            v: folded_linear(&fb.v, &mu.m_v, &mu.u_att),
            out: folded_linear(&fb.o, &mu.m_o, &mu.u_o),
            ln_mlp: mu.ln_mlp.layer_norm(),
            fc1: folded_linear(&fb.fc1, &mu.m_1, &mu.u_0),
            fc2: folded_linear(&fb.fc2, &mu.m_2, &mu.u_1),
        }
    }

    /// Literally, n branches between each U and M; also returns the attention branches'
    /// outputs W_o,i U_o⁽ⁱ⁾ o* + b_o,i [n, B·T, d] (the inner features' Ĝ).
    pub(crate) fn literal(&self, x: &Tensor) -> (Tensor, Tensor) {
        let (fb, mu) = (self.frozen, self.mu);
        let (b, t, d) = x.size3().unwrap_or((0, 0, 0));
        let a = mu.ln_attn.forward(x).view([-1, d]);
        let ua = mu.u_att.unmerge(&a);
        let proj = |m: &MuMatrix, f: &FrozenLayer| m.merge(&f.branches(&ua)).view([b, t, d]);
        let ctx = attend(
            &proj(&mu.m_q, &fb.q),
            &proj(&mu.m_k, &fb.k),
            &proj(&mu.m_v, &fb.v),
            self.heads,
            None,
        )
        .view([-1, d]);
        let r = fb.o.branches(&mu.u_o.unmerge(&ctx));
        let x = x + mu.m_o.merge(&r).view([b, t, d]);
        let g = mu.ln_mlp.forward(&x).view([-1, d]);
        let z = mu
            .m_1
            .merge(&fb.fc1.branches(&mu.u_0.unmerge(&g)))
            .gelu("none");
        let m = mu.m_2.merge(&fb.fc2.branches(&mu.u_1.unmerge(&z)));
        (x + m.view([b, t, d]), r)
    }

    /// In `form` (same function either way).
    pub(crate) fn forward(&self, x: &Tensor, form: StepForm) -> Tensor {
        match form {
            StepForm::Literal => self.literal(x).0,
            StepForm::Fold => self.fold().forward_pre_ln(x, self.heads),
        }
    }

    /// The block's local problem: the originals' streams at its input f_l [n, B, T, d],
    /// merged by `m_res`, through the block, unmerged by `u_res`: the reconstruction of f_{l+1}
    /// [n, B, T, d]; and the mean square of M_res U_res y* − y* (the residual basis' drift).
    pub(crate) fn local(
        &self,
        m_res: &MuMatrix,
        u_res: &MuMatrix,
        f_in: &Tensor,
        form: StepForm,
    ) -> (Tensor, Tensor) {
        let (n, b, t, d) = f_in.size4().unwrap_or((0, 0, 0, 0));
        let x = m_res.merge(&f_in.view([n, b * t, d])).view([b, t, d]);
        let y = self.forward(&x, form).view([-1, d]);
        let pred = u_res.unmerge(&y);
        let drift = (m_res.merge(&pred) - &y).square().mean(None);
        (pred.view([n, b, t, d]), drift)
    }
}

/// ŷ [n, B, d] from the last stream [B, T, d]: U_final LN_post(x*[CLS]).
pub(crate) fn read_out(ln_post: &MergedLn, u_final: &MuMatrix, x: &Tensor) -> Tensor {
    u_final.unmerge(&ln_post.forward(&x.select(1, 0)))
}

/// The output's local problem: the originals' final [CLS] streams [n, B, d] merged by M_res,
/// then LN_post and U_final → ŷ [n, B, d].
pub(crate) fn local_read_out(
    m_res: &MuMatrix,
    ln_post: &MergedLn,
    u_final: &MuMatrix,
    f_cls: &Tensor,
) -> Tensor {
    u_final.unmerge(&ln_post.forward(&m_res.merge(f_cls)))
}

/// Every original weight, stacked per model.
pub struct FrozenVit {
    pub n: usize,
    pub cfg: VitConfig,
    embed: FrozenEmbed,
    blocks: Vec<FrozenBlock>,
    ln_final: FrozenLn,
}

/// The shape fields two ViTs must agree on to be merged.
pub(crate) fn shape_of(c: &VitConfig) -> [usize; 7] {
    [
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.image_size,
        c.patch_size,
        c.num_channels,
    ]
}

impl FrozenVit {
    pub fn from_models(models: &[&Vit]) -> Result<Self> {
        check_mergeable(
            models,
            |m| shape_of(&m.cfg),
            "hidden, layers, heads, mlp, image, patch, channels",
        )?;
        let n = models.len();
        let embeds: Vec<[&Tensor; 4]> = models
            .iter()
            .map(|m| [&m.patch_w, &m.patch_b, &m.cls, &m.pos])
            .collect();
        let blocks = (0..models[0].blocks.len())
            .map(|l| FrozenBlock::stack(&models.iter().map(|m| &m.blocks[l]).collect::<Vec<_>>()))
            .collect();
        Ok(Self {
            n,
            cfg: models[0].cfg.clone(),
            embed: FrozenEmbed::stack(&embeds),
            blocks,
            ln_final: FrozenLn::stack(&models.iter().map(|m| &m.ln_final).collect::<Vec<_>>()),
        })
    }

    fn heads(&self) -> i64 {
        self.cfg.num_attention_heads as i64
    }
}

/// Every trainable part of the SuperNet.
pub struct VitMu {
    /// The embedding's merge; in local mode also the residual merge M_res of every block.
    pub m_pre: MuMatrix,
    /// Local mode: the residual unmerge shared by every block.
    pub u_res: MuMatrix,
    pub blocks: Vec<EncoderBlockMu>,
    pub ln_post: MergedLn,
    pub u_final: MuMatrix,
}

/// The M/U of the whole SuperNet, drawn in one fixed order, of which a caller keeps the
/// blocks `keep`: a pipeline stage draws every matrix (so its share has the values the
/// single-process SuperNet has) and keeps its own. LayerNorms draw nothing.
pub(crate) struct DrawnMu {
    pub(crate) m_pre: MuMatrix,
    pub(crate) u_res: MuMatrix,
    pub(crate) blocks: Vec<EncoderBlockMu>,
    pub(crate) u_final: MuMatrix,
}

impl DrawnMu {
    /// Draw from libtorch's global generator (seed it first for a reproducible init); `lns`
    /// are the kept blocks' frozen LayerNorms (LN_1, LN_2), which init their merged ones.
    pub(crate) fn draw(
        draw: &MuDraw,
        depth: usize,
        keep: std::ops::Range<usize>,
        lns: &[(&FrozenLn, &FrozenLn)],
        init: Init,
        eps: f64,
    ) -> Result<Self> {
        let m_pre = draw.width(Role::Merge)?;
        let u_res = draw.width(Role::Unmerge)?;
        let mut blocks = Vec::new();
        for l in 0..depth {
            let mats = draw.block()?;
            if !keep.contains(&l) {
                continue;
            }
            let (ln1, ln2) = lns.get(l - keep.start).ok_or_else(|| {
                Error::Compute(format!("no LayerNorms given for block {l} of {keep:?}"))
            })?;
            blocks.push(EncoderBlockMu::new(
                mats,
                MergedLn::new(ln1, init, eps),
                MergedLn::new(ln2, init, eps),
            ));
        }
        Ok(Self {
            m_pre,
            u_res,
            blocks,
            u_final: draw.width(Role::Unmerge)?,
        })
    }
}

impl VitMu {
    /// Draw every M/U (see `DrawnMu::draw`). d-sized M/U get rank r, the MLP's hidden M_1/U_1
    /// get ⌊r·h/d⌋ (method.md §3.2); the attention M/U take the `att_heads` structure when asked.
    fn new(f: &FrozenVit, mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let c = &f.cfg;
        let draw = MuDraw::for_vit(c, mu_type, init, f.n, rank);
        let eps = c.layer_norm_eps;
        let lns: Vec<_> = f.blocks.iter().map(|b| (&b.ln_attn, &b.ln_mlp)).collect();
        let depth = f.blocks.len();
        let d = DrawnMu::draw(&draw, depth, 0..depth, &lns, init, eps)?;
        Ok(Self {
            m_pre: d.m_pre,
            u_res: d.u_res,
            blocks: d.blocks,
            ln_post: MergedLn::new(&f.ln_final, init, eps),
            u_final: d.u_final,
        })
    }
}

pub struct VitSuperNet {
    pub frozen: FrozenVit,
    pub mu: VitMu,
}

impl VitSuperNet {
    pub fn new(models: &[&Vit], mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let frozen = FrozenVit::from_models(models)?;
        let mu = VitMu::new(&frozen, mu_type, init, rank)?;
        Ok(Self { frozen, mu })
    }

    pub fn n(&self) -> usize {
        self.frozen.n
    }

    /// What global training moves: M_pre, every block's M/U/LN, LN_post and U_final.
    pub fn global_params(&self) -> Vec<Tensor> {
        let mut v = self.mu.m_pre.params();
        for b in &self.mu.blocks {
            v.extend(b.params(Norm::Pre));
        }
        v.extend(self.mu.ln_post.params());
        v.extend(self.mu.u_final.params());
        v
    }

    /// Every trainable tensor under its checkpoint name (`named_groups`).
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut groups = vec![
            ("m_pre".to_string(), self.mu.m_pre.params()),
            ("u_res".to_string(), self.mu.u_res.params()),
        ];
        for (l, b) in self.mu.blocks.iter().enumerate() {
            groups.push((format!("block{l}"), b.params(Norm::Pre)));
        }
        groups.push(("ln_post".into(), self.mu.ln_post.params().into()));
        groups.push(("u_final".into(), self.mu.u_final.params()));
        crate::core::tensor::named_groups(groups)
    }

    /// What local training moves: the global parameters and the shared residual unmerge.
    pub fn local_params(&self) -> Vec<Tensor> {
        let mut v = self.global_params();
        v.extend(self.mu.u_res.params());
        v
    }

    /// x*_0 [B, T, d]: the n embeddings merged by M_pre (literally, or through the fold).
    pub fn embed(&self, pixels: &Tensor, form: StepForm) -> Tensor {
        self.frozen
            .embed
            .merged(&self.mu.m_pre, pixels, form, &self.frozen.cfg)
    }

    /// Block l with its M/U.
    pub(crate) fn unit(&self, l: usize) -> BlockUnit<'_> {
        BlockUnit {
            frozen: &self.frozen.blocks[l],
            mu: &self.mu.blocks[l],
            heads: self.frozen.heads(),
        }
    }

    /// Block l folded into a plain pre-LN block (differentiable in M/U/LN).
    pub fn fold_block(&self, l: usize) -> EncoderBlock {
        self.unit(l).fold()
    }

    /// Block l literally; also the attention branches' outputs [n, B·T, d] (`BlockUnit::literal`).
    pub fn block_literal(&self, l: usize, x: &Tensor) -> (Tensor, Tensor) {
        self.unit(l).literal(x)
    }

    /// Block l in `form` (same function either way).
    pub fn block(&self, l: usize, x: &Tensor, form: StepForm) -> Tensor {
        self.unit(l).forward(x, form)
    }

    /// ŷ [n, B, d] from the last stream [B, T, d]: U_final LN_post(x*[CLS]).
    pub fn output(&self, x: &Tensor) -> Tensor {
        read_out(&self.mu.ln_post, &self.mu.u_final, x)
    }

    /// The whole SuperNet: ŷ [n, B, d], and for each block in `inner` (run literally, as its
    /// loss reads branch outputs) its attention branches' outputs [n, B·T, d].
    pub fn forward(
        &self,
        pixels: &Tensor,
        form: StepForm,
        inner: &[usize],
    ) -> (Tensor, Vec<Tensor>) {
        let mut x = self.embed(pixels, form);
        let mut branches = Vec::new();
        for l in 0..self.frozen.blocks.len() {
            x = if inner.contains(&l) {
                let (y, r) = self.block_literal(l, &x);
                branches.push(r);
                y
            } else {
                self.block(l, &x, form)
            };
        }
        (self.output(&x), branches)
    }

    /// Local problem of block l (`BlockUnit::local`, through M_res = M_pre and U_res).
    pub fn local_block(&self, l: usize, f_in: &Tensor, form: StepForm) -> (Tensor, Tensor) {
        self.unit(l)
            .local(&self.mu.m_pre, &self.mu.u_res, f_in, form)
    }

    /// Local problem of the output: the originals' final [CLS] streams [n, B, d] merged by
    /// M_res → ŷ [n, B, d].
    pub fn local_output(&self, f_cls: &Tensor) -> Tensor {
        local_read_out(&self.mu.m_pre, &self.mu.ln_post, &self.mu.u_final, f_cls)
    }

    /// The local SuperNet as trained: after every block the stream goes through U_res and back
    /// through M_res. The folded model skips that round trip; the accuracy gap between the
    /// two is what local mode's shared residual basis costs.
    pub fn forward_local_chain(&self, pixels: &Tensor) -> Tensor {
        let mut x = self.embed(pixels, StepForm::Fold);
        for l in 0..self.frozen.blocks.len() {
            let y = self.block(l, &x, StepForm::Fold);
            let (b, t, d) = y.size3().unwrap_or((0, 0, 0));
            x = self
                .mu
                .m_pre
                .merge(&self.mu.u_res.unmerge(&y.view([-1, d])))
                .view([b, t, d]);
        }
        self.output(&x)
    }

    /// The folded ViT (no classifier), differentiable in M/U/LN.
    pub fn fold(&self) -> Vit {
        let [patch_w, patch_b, cls, pos] = self.frozen.embed.fold(&self.mu.m_pre, &self.frozen.cfg);
        Vit {
            cfg: self.frozen.cfg.clone(),
            patch_w,
            patch_b,
            cls,
            pos,
            blocks: (0..self.frozen.blocks.len())
                .map(|l| self.fold_block(l))
                .collect(),
            ln_final: self.mu.ln_post.layer_norm(),
            classifier: None,
        }
    }

    /// The merged model: the folded ViT (detached) and each task's classifier with its
    /// read-out U_final⁽ᵗ⁾ folded in (logits_t = W_t U_final⁽ᵗ⁾ y* + b_t).
    pub fn merged(&self, classifiers: &[&Linear]) -> (Vit, Vec<Linear>) {
        tch::no_grad(|| {
            let vit = self.fold().copy();
            let heads = classifiers
                .iter()
                .enumerate()
                .map(|(t, c)| self.mu.u_final.fold_into_head(t, c))
                .collect();
            (vit, heads)
        })
    }
}
