//! The Llama SuperNet (issue 16): n Llama-family decoders merged into one of the same shape.
//! The residual stream lives in merged space: M_emb merges the n token-embedding tables; each
//! block's two RMSNorms are trainable there (as the ViT SuperNet's LayerNorms); attention reads
//! the stream through one U_att per model, merges each model's q, k, v with M_q, M_k, M_v
//! (`att_heads` keeps heads heads), applies RoPE and grouped-query causal attention in merged
//! space — as the folded model does — and returns through U_o, each model's o_proj and M_o; the
//! SwiGLU MLP reads through U_0, merges gate and up with M_gate, M_up into the merged hidden
//! space (silu(g*) ⊙ u*), and returns through U_1, down_proj and M_down. The final RMSNorm is
//! trainable in merged space and U_final unmerges each model's final hidden states. Every M/U
//! sits beside a linear map, so the fold W* = Σᵢ Mᵢ Wᵢ Uᵢ is exact: the folded model is a
//! standard Llama, and task t's head (a classifier's `score`, a causal LM's `lm_head`) is its
//! own read through U_final⁽ᵗ⁾.
//!
//! What is exact and what is a choice: the fold is exact for every M/U type (tested to 1e-5);
//! RoPE and GQA commute with the merge only per head, which is why `att_heads` is the natural
//! type (with diagonal + low-rank the merged q*/k* are still rotated as the folded model
//! rotates them, so the SuperNet is the folded model, but a head's merged channels mix the
//! models' rotary pairs). Training the RMSNorms in merged space, sharing one U_att by q, k, v
//! and one U_0 by gate and up, and reconstructing the final hidden states at every real token
//! are choices, as for ViT/BERT.
//!
//! A SuperNet holds plan units `units` (unit 0: embeddings; unit 1 + l: block l; the part with
//! the last block also holds the final norm and U_final): every part draws the whole SuperNet's
//! M/U in one fixed order (M_emb; per block U_att, M_q, M_k, M_v, U_o, M_o, U_0, M_gate, M_up,
//! U_1, M_down; U_final; U_res) and keeps its own, so a pipeline stage starts from the
//! single-process values. Local mode trains each unit through the shared residual merge
//! M_res = M_emb and unmerge U_res, which every part holds, as BERT's.

use crate::core::linear::Linear;
use crate::core::merged_linear::{fold_layer, FrozenLayer};
use crate::core::mu::{MuMatrix, Role};
use crate::core::tensor::{f32, named_groups};
use crate::core::transformer::{check_mergeable, unit_blocks};
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::model::{AttentionContext, DecoderBlock, Llama, Proj, RmsNorm};
use crate::families::llama::part::{score_linear, LlamaPart};
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// The same decoder block of every model, frozen: each linear map stacked, and the models'
/// RMSNorm weights (for the teacher's views; the SuperNet trains its own in merged space).
pub struct FrozenDecoder {
    q: FrozenLayer,
    k: FrozenLayer,
    v: FrozenLayer,
    o: FrozenLayer,
    gate: FrozenLayer,
    up: FrozenLayer,
    down: FrozenLayer,
    /// Which of q, k, v, o, gate, up, down have a bias (Qwen2: q, k, v only): the fold keeps
    /// exactly those.
    bias: [bool; 7],
    /// The models' two RMSNorm weights, stacked [n, d].
    norms: [Tensor; 2],
}

impl FrozenDecoder {
    fn stack(blocks: &[&DecoderBlock]) -> Self {
        let lin = |k: usize| {
            let linears: Vec<Linear> = blocks
                .iter()
                .map(|b| {
                    let p = b.projs()[k];
                    let out = p.w.size()[0];
                    Linear {
                        w: p.w.shallow_clone(),
                        b: (p.b.as_ref()).map_or_else(
                            || Tensor::zeros([out], (Kind::Float, p.w.device())),
                            |b| b.shallow_clone(),
                        ),
                    }
                })
                .collect();
            FrozenLayer::stack(&linears.iter().collect::<Vec<_>>())
        };
        let norm = |f: &dyn Fn(&DecoderBlock) -> &RmsNorm| {
            Tensor::stack(
                &blocks.iter().map(|b| f(b).w.detach()).collect::<Vec<_>>(),
                0,
            )
        };
        Self {
            q: lin(0),
            k: lin(1),
            v: lin(2),
            o: lin(3),
            gate: lin(4),
            up: lin(5),
            down: lin(6),
            bias: blocks[0].projs().map(|p| p.b.is_some()),
            norms: [norm(&|b| &b.ln_attn), norm(&|b| &b.ln_mlp)],
        }
    }

    fn layers(&self) -> [&FrozenLayer; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// Model i's block, views of the stacked weights (biases where the models have them).
    fn model(&self, i: usize, eps: f64) -> DecoderBlock {
        let proj = |k: usize| {
            let l = self.layers()[k].model(i);
            Proj {
                w: l.w,
                b: self.bias[k].then_some(l.b),
            }
        };
        let norm = |k: usize| RmsNorm {
            w: self.norms[k].get(i as i64),
            eps,
        };
        DecoderBlock {
            ln_attn: norm(0),
            q: proj(0),
            k: proj(1),
            v: proj(2),
            o: proj(3),
            ln_mlp: norm(1),
            gate: proj(4),
            up: proj(5),
            down: proj(6),
        }
    }

    fn move_to(&mut self, device: Device) {
        for l in [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ] {
            l.to_device(device);
        }
        for n in &mut self.norms {
            *n = n.to_device(device);
        }
    }
}

/// One block's M/U and merged RMSNorm weights.
pub struct DecoderMu {
    rms_attn: Tensor,
    u_att: MuMatrix,
    m_q: MuMatrix,
    m_k: MuMatrix,
    m_v: MuMatrix,
    u_o: MuMatrix,
    m_o: MuMatrix,
    rms_mlp: Tensor,
    u_0: MuMatrix,
    m_gate: MuMatrix,
    m_up: MuMatrix,
    u_1: MuMatrix,
    m_down: MuMatrix,
}

impl DecoderMu {
    fn matrices(&self) -> [&MuMatrix; 11] {
        [
            &self.u_att,
            &self.m_q,
            &self.m_k,
            &self.m_v,
            &self.u_o,
            &self.m_o,
            &self.u_0,
            &self.m_gate,
            &self.m_up,
            &self.u_1,
            &self.m_down,
        ]
    }

    fn params(&self) -> Vec<Tensor> {
        let mut v = vec![self.rms_attn.shallow_clone(), self.rms_mlp.shallow_clone()];
        v.extend(self.matrices().iter().flat_map(|m| m.params()));
        v
    }

    fn move_to(&mut self, device: Device) {
        for m in [
            &mut self.u_att,
            &mut self.m_q,
            &mut self.m_k,
            &mut self.m_v,
            &mut self.u_o,
            &mut self.m_o,
            &mut self.u_0,
            &mut self.m_gate,
            &mut self.m_up,
            &mut self.u_1,
            &mut self.m_down,
        ] {
            m.to_device(device);
        }
        for n in [&mut self.rms_attn, &mut self.rms_mlp] {
            *n = leaf_on(n, device);
        }
    }
}

/// A trainable tensor moved to `device`, still a leaf that requires grad.
fn leaf_on(t: &Tensor, device: Device) -> Tensor {
    t.detach().to_device(device).set_requires_grad(true)
}

/// A trainable RMSNorm weight of the merged network from the models' stacked ones [n, d]:
/// `first` copies model 1's, `average` takes the mean, `random` starts at 1.
fn merged_norm(stacked: &Tensor, init: Init) -> Tensor {
    let w = f32(stacked);
    let w = match init {
        Init::First => w.get(0).copy(),
        Init::Average => w.mean_dim(0, false, None),
        Init::Random => w.get(0).ones_like(),
    };
    w.set_requires_grad(true)
}

/// The shape fields two Llamas must agree on to be merged.
fn shape_of(c: &LlamaConfig) -> [usize; 7] {
    [
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size,
    ]
}

/// The read-out: the final RMSNorm in merged space and U_final.
struct OutputMu {
    norm: Tensor,
    u_final: MuMatrix,
}

pub struct LlamaSuperNet {
    pub cfg: LlamaConfig,
    pub n: usize,
    units: Range<usize>,
    /// Every model's token embeddings [n, V, d] (with unit 0).
    embed: Option<Tensor>,
    /// M_emb; in local mode also the residual merge M_res (every part holds it).
    m_emb: MuMatrix,
    /// The held blocks (empty until `stack_blocks` when built without them).
    blocks: Vec<FrozenDecoder>,
    mu: Vec<DecoderMu>,
    /// With the last block.
    output: Option<OutputMu>,
    /// Local mode's residual unmerge (every part holds it).
    u_res: MuMatrix,
}

impl LlamaSuperNet {
    /// The SuperNet of whole models (every unit).
    pub fn new(models: &[&Llama], mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let parts: Vec<LlamaPart> = models.iter().map(|m| m.part()).collect();
        Self::from_parts(
            &parts.iter().collect::<Vec<_>>(),
            (mu_type, init, rank),
            true,
        )
    }

    /// The SuperNet's part over the units `parts` hold (every part holds the same ones); the
    /// frozen blocks only `with_blocks` (else `stack_blocks` takes them from the originals
    /// later, so a stage never holds both copies).
    pub fn from_parts(
        parts: &[&LlamaPart],
        (mu_type, init, rank): (MuType, Init, usize),
        with_blocks: bool,
    ) -> Result<Self> {
        check_mergeable(
            parts,
            |p| shape_of(&p.cfg),
            "hidden, layers, heads, kv heads, head_dim, intermediate, vocab",
        )?;
        let (p0, n) = (parts[0], parts.len());
        let cfg = p0.cfg.clone();
        let units = p0.units.clone();
        let (d, h) = (cfg.hidden_size, cfg.intermediate_size);
        let hd = cfg.head_dim();
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let width = |role| MuMatrix::new(role, mu_type, init, n, d, rank);
        let hidden = |role| MuMatrix::new(role, mu_type, init, n, h, (rank * h / d).max(1));
        let att = |role, k: usize, heads: usize| {
            MuMatrix::attention(role, mu_type, init, n, k, rank, heads)
        };
        let stack = |f: &dyn Fn(&LlamaPart) -> Option<Tensor>| -> Option<Tensor> {
            let ts: Option<Vec<Tensor>> = parts.iter().map(|p| f(p)).collect();
            ts.map(|ts| Tensor::stack(&ts, 0))
        };
        let m_emb = width(Role::Merge)?;
        let held = unit_blocks(&units);
        let mut mu = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let [u_att, m_q, m_k, m_v, u_o, m_o] = [
                att(Role::Unmerge, d, heads)?,
                att(Role::Merge, heads * hd, heads)?,
                att(Role::Merge, kv * hd, kv)?,
                att(Role::Merge, kv * hd, kv)?,
                att(Role::Unmerge, heads * hd, heads)?,
                att(Role::Merge, d, heads)?,
            ];
            let [u_0, m_gate, m_up, u_1, m_down] = [
                width(Role::Unmerge)?,
                hidden(Role::Merge)?,
                hidden(Role::Merge)?,
                hidden(Role::Unmerge)?,
                width(Role::Merge)?,
            ];
            let Some(j) = l.checked_sub(held.start).filter(|_| held.contains(&l)) else {
                continue;
            };
            let norm = |f: &dyn Fn(&DecoderBlock) -> &RmsNorm| {
                let b = stack(&|p| p.blocks.get(j).map(|b| f(b).w.detach()));
                b.ok_or_else(|| Error::Compute(format!("units {units:?}: a part lacks block {l}")))
            };
            mu.push(DecoderMu {
                rms_attn: merged_norm(&norm(&|b| &b.ln_attn)?, init),
                u_att,
                m_q,
                m_k,
                m_v,
                u_o,
                m_o,
                rms_mlp: merged_norm(&norm(&|b| &b.ln_mlp)?, init),
                u_0,
                m_gate,
                m_up,
                u_1,
                m_down,
            });
        }
        let u_final = width(Role::Unmerge)?;
        let output = stack(&|p| p.norm.as_ref().map(|n| n.w.detach())).map(|norms| OutputMu {
            norm: merged_norm(&norms, init),
            u_final,
        });
        let mut sn = Self {
            n,
            embed: stack(&|p| p.embed.as_ref().map(Tensor::detach)),
            m_emb,
            blocks: Vec::new(),
            mu,
            output,
            // Drawn last, so the global mode's M/U keep their values.
            u_res: width(Role::Unmerge)?,
            units,
            cfg,
        };
        if with_blocks {
            sn.blocks = (0..held.len())
                .map(|j| {
                    FrozenDecoder::stack(&parts.iter().map(|p| &p.blocks[j]).collect::<Vec<_>>())
                })
                .collect();
        }
        Ok(sn)
    }

    /// The frozen blocks of a SuperNet built without them, taken out of the originals' parts
    /// (whose blocks are left empty).
    pub fn stack_blocks(&mut self, parts: &mut [LlamaPart]) -> Result<()> {
        let per_model: Vec<Vec<DecoderBlock>> = parts
            .iter_mut()
            .map(|p| std::mem::take(&mut p.blocks))
            .collect();
        let held = unit_blocks(&self.units).len();
        if per_model.iter().any(|b| b.len() != held) {
            return Err(Error::Compute(format!(
                "units {:?}: an original lacks some of the {held} blocks",
                self.units
            )));
        }
        self.blocks = (0..held)
            .map(|j| FrozenDecoder::stack(&per_model.iter().map(|b| &b[j]).collect::<Vec<_>>()))
            .collect();
        Ok(())
    }

    /// Model i's blocks, views of the stacked ones (the teacher of a stage that recomputes).
    pub fn model_blocks(&self, i: usize) -> Vec<DecoderBlock> {
        let eps = self.cfg.rms_norm_eps;
        self.blocks.iter().map(|b| b.model(i, eps)).collect()
    }

    /// Model i's token embeddings, a view of the stacked ones (with the embeddings).
    pub fn model_embed(&self, i: usize) -> Option<Tensor> {
        self.embed.as_ref().map(|e| e.get(i as i64))
    }

    pub fn units(&self) -> Range<usize> {
        self.units.clone()
    }
    fn first_block(&self) -> usize {
        unit_blocks(&self.units).start
    }
    /// Whether the part holds the final norm and U_final.
    pub fn has_output(&self) -> bool {
        self.output.is_some()
    }
    /// Whether the part holds the embeddings (its input is token ids, not a stream).
    pub fn has_embeddings(&self) -> bool {
        self.embed.is_some()
    }

    /// What the global phase trains: M_emb with the embeddings, the held blocks' M/U and
    /// RMSNorms, the final norm and U_final.
    pub fn params(&self) -> Vec<Tensor> {
        let mut v = Vec::new();
        if self.embed.is_some() {
            v.extend(self.m_emb.params());
        }
        v.extend(self.own_params());
        v
    }

    fn own_params(&self) -> Vec<Tensor> {
        let mut v: Vec<Tensor> = self.mu.iter().flat_map(DecoderMu::params).collect();
        if let Some(o) = &self.output {
            v.push(o.norm.shallow_clone());
            v.extend(o.u_final.params());
        }
        v
    }

    /// What local training moves: the part's own, and the shared M_res = M_emb and U_res,
    /// whose gradients every part sums.
    pub fn local_params(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let mut shared = self.m_emb.params();
        shared.extend(self.u_res.params());
        (self.own_params(), shared)
    }

    /// Every trainable tensor, named by group (checkpoints): `m_emb`, `u_res`, `block{l}`
    /// (global l), `output`.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut groups = vec![
            ("m_emb".to_string(), self.m_emb.params()),
            ("u_res".to_string(), self.u_res.params()),
        ];
        for (j, m) in self.mu.iter().enumerate() {
            groups.push((format!("block{}", self.first_block() + j), m.params()));
        }
        if let Some(o) = &self.output {
            let mut v = vec![o.norm.shallow_clone()];
            v.extend(o.u_final.params());
            groups.push(("output".into(), v));
        }
        named_groups(groups)
    }

    /// Move every tensor to `device` (the trainable ones stay leaves that require grad).
    pub fn move_to(&mut self, device: Device) {
        self.embed = self.embed.as_ref().map(|e| e.to_device(device));
        self.m_emb.to_device(device);
        self.u_res.to_device(device);
        for b in &mut self.blocks {
            b.move_to(device);
        }
        for m in &mut self.mu {
            m.move_to(device);
        }
        if let Some(o) = &mut self.output {
            o.norm = leaf_on(&o.norm, device);
            o.u_final.to_device(device);
        }
    }

    fn rms(&self, w: &Tensor) -> RmsNorm {
        RmsNorm {
            w: w.shallow_clone(),
            eps: self.cfg.rms_norm_eps,
        }
    }

    /// Held block j folded: a standard decoder block (its biases only where the models have
    /// them), differentiable in M/U and the norms.
    fn fold_block(&self, j: usize) -> DecoderBlock {
        let (fb, mu) = (&self.blocks[j], &self.mu[j]);
        let proj = |layer: &FrozenLayer, m: &MuMatrix, u: &MuMatrix, bias: bool| {
            let (wt, b) = fold_layer(layer, m, Some(u));
            Proj {
                w: wt.tr(),
                b: bias.then_some(b),
            }
        };
        let [qb, kb, vb, ob, gb, ub, db] = fb.bias;
        DecoderBlock {
            ln_attn: self.rms(&mu.rms_attn),
            q: proj(&fb.q, &mu.m_q, &mu.u_att, qb),
            k: proj(&fb.k, &mu.m_k, &mu.u_att, kb),
            v: proj(&fb.v, &mu.m_v, &mu.u_att, vb),
            o: proj(&fb.o, &mu.m_o, &mu.u_o, ob),
            ln_mlp: self.rms(&mu.rms_mlp),
            gate: proj(&fb.gate, &mu.m_gate, &mu.u_0, gb),
            up: proj(&fb.up, &mu.m_up, &mu.u_0, ub),
            down: proj(&fb.down, &mu.m_down, &mu.u_1, db),
        }
    }

    /// Held block j literally: n branches between each U and M.
    fn block_literal(&self, j: usize, x: &Tensor, ctx: &AttentionContext) -> Tensor {
        let (fb, mu) = (&self.blocks[j], &self.mu[j]);
        let (b, t, d) = x.size3().unwrap_or((0, 0, 0));
        let h = self.rms(&mu.rms_attn).forward(x).view([-1, d]);
        let ua = mu.u_att.unmerge(&h);
        let proj = |m: &MuMatrix, f: &FrozenLayer| m.merge(&f.branches(&ua)).view([b, t, -1]);
        let a = ctx.attend(
            &proj(&mu.m_q, &fb.q),
            &proj(&mu.m_k, &fb.k),
            &proj(&mu.m_v, &fb.v),
        );
        let a = a.view([b * t, -1]);
        let o = mu.m_o.merge(&fb.o.branches(&mu.u_o.unmerge(&a)));
        let x = x + o.view([b, t, d]);
        let h = self.rms(&mu.rms_mlp).forward(&x).view([-1, d]);
        let u0 = mu.u_0.unmerge(&h);
        let gated =
            mu.m_gate.merge(&fb.gate.branches(&u0)).silu() * mu.m_up.merge(&fb.up.branches(&u0));
        let m = mu.m_down.merge(&fb.down.branches(&mu.u_1.unmerge(&gated)));
        &x + m.view([b, t, d])
    }

    fn block(&self, j: usize, x: &Tensor, ctx: &AttentionContext, form: StepForm) -> Tensor {
        match form {
            StepForm::Fold => self.fold_block(j).forward(x, ctx),
            StepForm::Literal => self.block_literal(j, x, ctx),
        }
    }

    /// x*_0 [B, T, d] of token ids [B, T]: the n embeddings merged by M_emb, literally or
    /// through the folded table. None without the embeddings.
    fn embed(&self, ids: &Tensor, form: StepForm) -> Option<Tensor> {
        let e = self.embed.as_ref()?;
        let (b, t) = ids.size2().unwrap_or((0, 0));
        let flat = ids.reshape([-1]);
        let x = match form {
            StepForm::Fold => self.m_emb.merge(e).index_select(0, &flat),
            StepForm::Literal => self.m_emb.merge(&e.index_select(1, &flat)),
        };
        Some(x.view([b, t, -1]))
    }

    /// ŷ [n, B, T, d]: U_final of the final norm of the merged stream [B, T, d]; None without
    /// the output.
    fn output(&self, x: &Tensor) -> Option<Tensor> {
        let o = self.output.as_ref()?;
        let (b, t, d) = x.size3().unwrap_or((0, 0, 0));
        let h = self.rms(&o.norm).forward(x).view([-1, d]);
        Some(o.u_final.unmerge(&h).view([self.n as i64, b, t, d]))
    }

    /// The held units on their input — token ids [B, T] with the embeddings, else the merged
    /// stream [B, T, d] — with attention mask [B, T], in `form`: the merged stream after the
    /// last held block, or with the output each model's reconstruction of its final hidden
    /// states [n, B, T, d].
    pub fn forward(&self, input: &Tensor, mask: &Tensor, form: StepForm) -> Tensor {
        let mut x = input.shallow_clone();
        for k in 0..self.segments() {
            x = self.forward_segment(k, &x, mask, form);
        }
        x
    }

    /// The segments of `forward` for activation checkpointing: one per held block (the
    /// embeddings with the first, the output with the last), at least one.
    pub fn segments(&self) -> usize {
        self.blocks.len().max(1)
    }

    /// Segment `k` of `forward` on its input.
    pub fn forward_segment(
        &self,
        k: usize,
        input: &Tensor,
        mask: &Tensor,
        form: StepForm,
    ) -> Tensor {
        let embedded = if k == 0 {
            self.embed(input, form)
        } else {
            None
        };
        let mut x = embedded.unwrap_or_else(|| input.shallow_clone());
        if k < self.blocks.len() {
            let ctx = AttentionContext::new(&self.cfg, mask);
            x = self.block(k, &x, &ctx, form);
        }
        if k + 1 < self.segments() {
            return x;
        }
        self.output(&x).unwrap_or(x)
    }

    /// U_res y [n, B, T, d] of a merged stream y [B, T, d] and the residual drift.
    fn unmerge_res(&self, y: &Tensor) -> (Tensor, Tensor) {
        crate::core::transformer::unmerge_res(&self.m_emb, &self.u_res, y)
    }

    /// M_res f [B, T, d] of the originals' streams f [n, B, T, d].
    fn merge_res(&self, f: &Tensor) -> Tensor {
        crate::core::transformer::merge_res(&self.m_emb, f)
    }

    /// The local problems of the held units on a batch, one at a time to `each`: the
    /// embeddings' U_res M_emb emb(ids) of f_0, block l's U_res block(M_res f_l) of f_{l+1}
    /// (`stream(k)`: the originals' stream after unit k, [n, B, T, d]), each with the residual
    /// drift; with the output, U_final norm*(M_res f_L), whose target is the final hidden
    /// states.
    pub fn local_problems(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        stream: &dyn Fn(usize) -> Tensor,
        form: StepForm,
        each: &mut dyn FnMut(LocalProblem) -> Result<()>,
    ) -> Result<()> {
        if let Some(e) = self.embed(ids, form) {
            let (pred, drift) = self.unmerge_res(&e);
            each(LocalProblem::Unit(pred, stream(0), drift))?;
        }
        let ctx = AttentionContext::new(&self.cfg, mask);
        for j in 0..self.blocks.len() {
            let l = self.first_block() + j;
            let y = self.block(j, &self.merge_res(&stream(l)), &ctx, form);
            let (pred, drift) = self.unmerge_res(&y);
            each(LocalProblem::Unit(pred, stream(l + 1), drift))?;
        }
        if self.output.is_some() {
            let last = self.merge_res(&stream(self.units.end - 1));
            if let Some(pred) = self.output(&last) {
                each(LocalProblem::Output(pred))?;
            }
        }
        Ok(())
    }

    /// The local SuperNet as trained: after every unit the stream goes through U_res and back
    /// through M_res (the folded model skips that round trip).
    pub fn forward_local_chain(&self, input: &Tensor, mask: &Tensor) -> Tensor {
        let round_trip = |y: &Tensor| self.merge_res(&self.unmerge_res(y).0);
        let mut x = self
            .embed(input, StepForm::Fold)
            .map_or_else(|| input.shallow_clone(), |e| round_trip(&e));
        let ctx = AttentionContext::new(&self.cfg, mask);
        for j in 0..self.blocks.len() {
            x = round_trip(&self.block(j, &x, &ctx, StepForm::Fold));
        }
        self.output(&x).unwrap_or(x)
    }

    /// Each task's head with its read-out folded in, W_t U_final⁽ᵗ⁾ (with the output).
    pub fn folded_heads(&self, heads: &[&Linear]) -> Option<Vec<Linear>> {
        let o = self.output.as_ref()?;
        Some(
            (heads.iter().enumerate())
                .map(|(t, h)| o.u_final.fold_into_head(t, h))
                .collect(),
        )
    }

    /// The held units folded under the merged names (detached copies): the table
    /// Σ_i E_i M_emb⁽ⁱ⁾, the blocks, the final norm.
    pub fn fold_named(&self) -> BTreeMap<String, Tensor> {
        tch::no_grad(|| {
            let mut out = BTreeMap::new();
            if let Some(e) = &self.embed {
                out.insert(
                    "embed_tokens.weight".into(),
                    self.m_emb.merge(e).detach().copy(),
                );
            }
            for j in 0..self.blocks.len() {
                let b = self.fold_block(j);
                for (name, t) in b.named("", self.first_block() + j) {
                    out.insert(name, t.detach().copy());
                }
            }
            if let Some(o) = &self.output {
                out.insert("norm.weight".into(), o.norm.detach().copy());
            }
            out
        })
    }

    /// The folded model (every unit held) and each task's LM head read through U_final⁽ᵗ⁾
    /// (`lm_head_t · U_final⁽ᵗ⁾`, [V, d]) from the models' heads `lm_heads` [V, d].
    pub fn merged(&self, lm_heads: &[&Tensor]) -> Result<(Llama, Vec<Tensor>)> {
        let part = LlamaPart::from_tensors(
            self.cfg.clone(),
            self.units(),
            self.fold_named(),
            std::path::Path::new("the folded SuperNet"),
        )?;
        // An LM head has no bias either: the same zero-bias linear map as a `score`.
        let linears: Vec<Linear> = lm_heads.iter().map(|h| score_linear(h)).collect();
        let heads = self
            .folded_heads(&linears.iter().collect::<Vec<_>>())
            .ok_or_else(|| Error::Compute("the SuperNet part has no output".into()))?;
        let heads = tch::no_grad(|| heads.into_iter().map(|h| h.w.detach().copy()).collect());
        Ok((Llama::from_part(part)?, heads))
    }
}

/// One local problem of a SuperNet part on a batch (`LlamaSuperNet::local_problems`).
pub enum LocalProblem {
    /// A held unit: its reconstruction [n, B, T, d], its target, the residual drift.
    Unit(Tensor, Tensor, Tensor),
    /// The output: each model's final hidden states [n, B, T, d].
    Output(Tensor),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tensor::rel_err;
    use std::path::Path;

    fn config(extra: &str) -> LlamaConfig {
        let text = format!(
            r#"{{"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 50{extra}}}"#
        );
        LlamaConfig::parse(&text, Path::new("config.json")).unwrap()
    }

    /// The SuperNet through the fold equals the literal n-branch form, and the folded model
    /// with task t's head U_final-folded gives the SuperNet's task-t logits: with GQA, padding,
    /// both RoPE settings, with and without biases, for diagonal+low-rank and att_heads M/U.
    #[test]
    fn folding_is_exact_and_forms_agree() {
        tch::manual_seed(0);
        let ids = Tensor::randint_low(1, 50, [3, 6], (tch::Kind::Int64, tch::Device::Cpu));
        let mask = Tensor::from_slice2(&[[1i64; 6], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]);
        for (extra, mu_type, init) in [
            ("", MuType::DiagonalAndLowRank, Init::Random),
            (
                r#", "rope_theta": 500000.0, "attention_bias": true, "mlp_bias": true"#,
                MuType::DiagonalAndLowRank,
                Init::Average,
            ),
            ("", MuType::AttHeads, Init::First),
        ] {
            let cfg = config(extra);
            let models: Vec<Llama> = (0..3).map(|_| Llama::init(cfg.clone())).collect();
            let refs: Vec<&Llama> = models.iter().collect();
            let sn = LlamaSuperNet::new(&refs, mu_type, init, 4).unwrap();
            // Move every M/U away from its init, so no identity hides an error.
            tch::no_grad(|| {
                for p in sn.params() {
                    let mut p = p;
                    let _ = p.g_add_(&(p.randn_like() * 0.05));
                }
            });
            let fold = tch::no_grad(|| sn.forward(&ids, &mask, StepForm::Fold));
            let literal = tch::no_grad(|| sn.forward(&ids, &mask, StepForm::Literal));
            let keep = mask.reshape([-1]).nonzero().squeeze_dim(1);
            let at_tokens = |t: &Tensor| t.reshape([-1, 32]).index_select(0, &keep);
            for i in 0..3 {
                let e = rel_err(&at_tokens(&literal.get(i)), &at_tokens(&fold.get(i)));
                println!("{mu_type:?}{extra}: model {i}: literal vs fold {e:.1e}");
                assert!(e < 1e-5, "{extra} {mu_type:?}: literal vs fold {e:e}");
            }
            let lm_heads: Vec<&Tensor> = refs.iter().map(|m| m.lm_head.as_ref().unwrap()).collect();
            let (merged, heads) = sn.merged(&lm_heads).unwrap();
            let h = tch::no_grad(|| merged.hidden(&ids, &mask));
            for (t, head) in heads.iter().enumerate() {
                let want = fold
                    .get(t as i64)
                    .matmul(&refs[t].lm_head.as_ref().unwrap().tr());
                let got = h.matmul(&head.tr());
                let e = rel_err(
                    &got.reshape([-1, 50]).index_select(0, &keep),
                    &want.reshape([-1, 50]).index_select(0, &keep),
                );
                println!("{mu_type:?}{extra}: task {t}: folded vs SuperNet {e:.1e}");
                assert!(e < 1e-5, "{extra} {mu_type:?}: task {t}: folded {e:e}");
            }
        }
    }
}
