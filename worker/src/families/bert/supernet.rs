//! The FS-Merge SuperNet of n post-LN BERTs (method.md §5). The stream x* lives in merged
//! space; unlike the pre-LN ViT the unmerges read the stream itself and the LayerNorms sit after
//! each residual add:
//!
//! ```text
//!   x*_0  = LN_emb(Σ_i M_emb⁽ⁱ⁾ (word_i[id] + pos_i[t] + type_i[0]))
//!   attn:   q* = Σ_i M_q⁽ⁱ⁾(W_q,i U_att⁽ⁱ⁾ x* + b_q,i)   (k*, v* alike; V uses M_v), masked scores
//!           x* ← LN_att(x* + Σ_i M_o⁽ⁱ⁾(W_o,i U_o⁽ⁱ⁾ attend(q*, k*, v*) + b_o,i))
//!   MLP:    x* ← LN_out(x* + Σ_i M_2⁽ⁱ⁾(W_2,i U_1⁽ⁱ⁾ gelu(Σ_j M_1⁽ʲ⁾(W_1,j U_0⁽ʲ⁾ x* + b_1,j)) + b_2,i))
//!   pooler: y* = tanh(Σ_i M_pool⁽ⁱ⁾(D_i U_pool⁽ⁱ⁾ x*[CLS] + b_i)),  ŷ = U_final y*
//! ```
//!
//! Embedding tables fold row-wise (Tab* = Σ_i Tab_i M_emb⁽ⁱ⁾), every linear map by §3.1, so the
//! SuperNet folds exactly into one standard BERT with a pooler (`fold`).
//!
//! Local mode (architecture.md §2, step 5) trains each unit on the originals' streams f_l
//! (hidden states after each unit, [n, B, T, d]), through the shared residual merge M_res =
//! M_emb and unmerge U_res: the embeddings' problem U_res LN_emb(M_emb emb) ≈ f_0, block l's
//! U_res block(M_res f_l) ≈ f_{l+1}, the output's U_final pool(M_res f_L[CLS]) ≈ pooled.
//!
//! A SuperNet holds plan units `units` (unit 0 is the embeddings, unit 1 + l is block l; the
//! part with the last block also holds the pooler and U_final): the single-process job holds
//! them all, a pipeline stage (`stage`) its own. Every part draws the whole SuperNet's M/U
//! in one fixed order and keeps its own, so a stage starts from the single-process values.
//! M_emb (= M_res) and U_res are in every part: local mode sums their gradients over stages.

use crate::core::attention::attend;
use crate::core::encoder_block::{EncoderBlock, EncoderBlockMu, FrozenBlock, Norm};
use crate::core::layer_norm::{FrozenLn, LayerNorm, MergedLn};
use crate::core::linear::Linear;
use crate::core::merged_linear::{folded_linear, FrozenLayer};
use crate::core::mu::{MuMatrix, Role};
use crate::core::tensor::named_groups;
use crate::core::transformer::{check_mergeable, unit_blocks, MuDraw};
use crate::families::bert::model::{embed_tokens, mask_bias, Bert, BertPart, BERT_BLOCK};
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::hf::BertConfig;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use tch::{Device, Tensor};

/// Every model's embeddings: tables [n, rows, d] and LayerNorm.
struct FrozenEmbeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln: FrozenLn,
}

/// One model's share of the units, borrowed from a whole `Bert` or a `BertPart`.
struct UnitsOf<'a> {
    cfg: &'a BertConfig,
    embeddings: Option<([&'a Tensor; 3], &'a LayerNorm)>,
    blocks: &'a [EncoderBlock],
    pooler: Option<&'a Linear>,
}

/// Every original weight of the held units, stacked per model.
pub struct FrozenBert {
    pub n: usize,
    pub cfg: BertConfig,
    /// The plan units held (unit 0 is the embeddings, unit 1 + l is block l).
    pub units: Range<usize>,
    embeddings: Option<FrozenEmbeddings>,
    /// Blocks `unit_blocks(&units)` (empty until `stack_blocks` when built without them).
    blocks: Vec<FrozenBlock>,
    /// Each block's two LayerNorms stacked (the M/U draw reads them; the blocks may come later).
    block_lns: Vec<(FrozenLn, FrozenLn)>,
    /// On the part that holds the last block.
    pooler: Option<FrozenLayer>,
}

fn shape_of(c: &BertConfig) -> [usize; 6] {
    [
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings,
    ]
}

impl FrozenBert {
    /// Every unit of whole models.
    pub fn from_models(models: &[&Bert]) -> Result<Self> {
        let units = models.first().map_or(0, |m| m.blocks.len() + 1);
        let of = models
            .iter()
            .map(|m| UnitsOf {
                cfg: &m.cfg,
                embeddings: Some(([&m.word, &m.position, &m.token_type], &m.ln_emb)),
                blocks: &m.blocks,
                pooler: m.pooler.as_ref(),
            })
            .collect::<Vec<_>>();
        Self::stack(&of, 0..units, true)
    }

    /// The units `parts` hold (every part holds the same ones); the blocks only `with_blocks`
    /// (else `stack_blocks` adds them).
    pub fn from_parts(parts: &[&BertPart], with_blocks: bool) -> Result<Self> {
        let units = parts.first().map_or(0..0, |p| p.units.clone());
        let of = parts
            .iter()
            .map(|p| UnitsOf {
                cfg: &p.cfg,
                embeddings: p
                    .embeddings
                    .as_ref()
                    .map(|([w, po, t], ln)| ([w, po, t], ln)),
                blocks: &p.blocks,
                pooler: p.pooler.as_ref(),
            })
            .collect::<Vec<_>>();
        Self::stack(&of, units, with_blocks)
    }

    /// Stack the blocks of every model (`per_model[i]` model i's blocks, in order), dropping
    /// each model's copy of a block once it is stacked.
    fn stack_blocks(&mut self, per_model: Vec<Vec<EncoderBlock>>) -> Result<()> {
        let mut per_model: Vec<_> = per_model.into_iter().map(Vec::into_iter).collect();
        self.blocks = (0..unit_blocks(&self.units).len())
            .map(|j| {
                let block_j = (per_model.iter_mut())
                    .map(|m| {
                        m.next().ok_or_else(|| {
                            Error::Compute(format!(
                                "units {:?}: an original lacks its block {j}",
                                self.units
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(FrozenBlock::stack(&block_j.iter().collect::<Vec<_>>()))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn stack(models: &[UnitsOf], units: Range<usize>, with_blocks: bool) -> Result<Self> {
        check_mergeable(
            &models.iter().collect::<Vec<_>>(),
            |m: &UnitsOf| shape_of(m.cfg),
            "hidden, layers, heads, intermediate, vocab, positions",
        )?;
        let n = models.len();
        let cfg = models[0].cfg.clone();
        let stack =
            |ts: Vec<&Tensor>| Tensor::stack(&ts.iter().map(|t| t.detach()).collect::<Vec<_>>(), 0);
        let embeddings = if units.start == 0 {
            let e: Option<Vec<_>> = models.iter().map(|m| m.embeddings).collect();
            let e =
                e.ok_or_else(|| Error::Compute("a part of unit 0 lacks the embeddings".into()))?;
            let table = |k: usize| stack(e.iter().map(|(t, _)| t[k]).collect());
            Some(FrozenEmbeddings {
                word: table(0),
                position: table(1),
                token_type: table(2),
                ln: FrozenLn::stack(&e.iter().map(|(_, ln)| *ln).collect::<Vec<_>>()),
            })
        } else {
            None
        };
        let held = if with_blocks {
            unit_blocks(&units).len()
        } else {
            0
        };
        let blocks = (0..held)
            .map(|j| FrozenBlock::stack(&models.iter().map(|m| &m.blocks[j]).collect::<Vec<_>>()))
            .collect();
        let block_lns = (0..unit_blocks(&units).len())
            .map(|j| {
                let ln = |f: &dyn Fn(&EncoderBlock) -> &LayerNorm| {
                    FrozenLn::stack(&models.iter().map(|m| f(&m.blocks[j])).collect::<Vec<_>>())
                };
                (ln(&|b| &b.ln_attn), ln(&|b| &b.ln_mlp))
            })
            .collect();
        let pooler = if units.end == cfg.num_hidden_layers + 1 {
            let poolers: Option<Vec<&Linear>> = models.iter().map(|m| m.pooler).collect();
            let Some(poolers) = poolers else {
                return Err(Error::Compute(
                    "every BERT needs its pooler (pooler.dense): FS-Merge reconstructs pooled outputs"
                        .into(),
                ));
            };
            Some(FrozenLayer::stack(&poolers))
        } else {
            None
        };
        Ok(Self {
            n,
            cfg,
            units,
            embeddings,
            blocks,
            block_lns,
            pooler,
        })
    }

    fn move_to(&mut self, device: Device) {
        if let Some(e) = &mut self.embeddings {
            for t in [&mut e.word, &mut e.position, &mut e.token_type] {
                *t = t.to_device(device);
            }
            e.ln.move_to(device);
        }
        for b in &mut self.blocks {
            b.move_to(device);
        }
        if let Some(p) = &mut self.pooler {
            p.to_device(device);
        }
    }
}

/// The pooler's merge and unmerge and the read-out U_final.
pub struct OutputMu {
    pub u_pool: MuMatrix,
    pub m_pool: MuMatrix,
    pub u_final: MuMatrix,
}

impl OutputMu {
    fn params(&self) -> Vec<Tensor> {
        [&self.u_pool, &self.m_pool, &self.u_final]
            .iter()
            .flat_map(|m| m.params())
            .collect()
    }
}

pub struct BertMu {
    /// M_emb; in local mode also the residual merge M_res of every unit (every part holds it).
    pub m_emb: MuMatrix,
    /// With the embeddings.
    pub ln_emb: Option<MergedLn>,
    pub blocks: Vec<EncoderBlockMu>,
    /// With the pooler.
    pub output: Option<OutputMu>,
    /// Local mode: the residual unmerge shared by every unit (every part holds it).
    pub u_res: MuMatrix,
}

impl BertMu {
    /// Every M/U of the whole SuperNet, drawn by `MuDraw` in one fixed order, of which the
    /// part keeps its own (`att_heads` structures the attention M/U with the model's heads,
    /// method.md §5.5; the rest fall back to diagonal + low rank). LayerNorms draw nothing.
    fn new(f: &FrozenBert, mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let c = &f.cfg;
        let shape = [c.hidden_size, c.intermediate_size, c.num_attention_heads];
        let draw = MuDraw::new(mu_type, init, f.n, shape, rank);
        let eps = c.layer_norm_eps;
        let m_emb = draw.width(Role::Merge)?;
        let keep = unit_blocks(&f.units);
        let mut blocks = Vec::new();
        for l in 0..c.num_hidden_layers {
            let mats = draw.block()?;
            let Some((ln_attn, ln_mlp)) =
                l.checked_sub(keep.start).and_then(|j| f.block_lns.get(j))
            else {
                continue;
            };
            blocks.push(EncoderBlockMu::new(
                mats,
                MergedLn::new(ln_attn, init, eps),
                MergedLn::new(ln_mlp, init, eps),
            ));
        }
        let [u_pool, m_pool, u_final] = [
            draw.width(Role::Unmerge)?,
            draw.width(Role::Merge)?,
            draw.width(Role::Unmerge)?,
        ];
        Ok(Self {
            m_emb,
            ln_emb: f
                .embeddings
                .as_ref()
                .map(|e| MergedLn::new(&e.ln, init, eps)),
            blocks,
            output: f.pooler.as_ref().map(|_| OutputMu {
                u_pool,
                m_pool,
                u_final,
            }),
            // Drawn last, so the global mode's M/U keep their values.
            u_res: draw.width(Role::Unmerge)?,
        })
    }
}

pub struct BertSuperNet {
    pub frozen: FrozenBert,
    pub mu: BertMu,
}

impl BertSuperNet {
    /// The SuperNet of whole models (every unit).
    pub fn new(models: &[&Bert], mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let frozen = FrozenBert::from_models(models)?;
        let mu = BertMu::new(&frozen, mu_type, init, rank)?;
        Ok(Self { frozen, mu })
    }

    /// The SuperNet's part over the units `parts` hold (a pipeline stage).
    pub fn from_parts(
        parts: &[&BertPart],
        mu_type: MuType,
        init: Init,
        rank: usize,
    ) -> Result<Self> {
        Self::over_parts(parts, (mu_type, init, rank), true)
    }

    /// `from_parts` whose frozen blocks come later, from `stack_blocks`: a pipeline stage keeps
    /// its originals until then, and never both copies of their weights.
    pub fn from_parts_without_blocks(
        parts: &[&BertPart],
        mu_type: MuType,
        init: Init,
        rank: usize,
    ) -> Result<Self> {
        Self::over_parts(parts, (mu_type, init, rank), false)
    }

    fn over_parts(
        parts: &[&BertPart],
        (mu_type, init, rank): (MuType, Init, usize),
        with_blocks: bool,
    ) -> Result<Self> {
        let frozen = FrozenBert::from_parts(parts, with_blocks)?;
        let mu = BertMu::new(&frozen, mu_type, init, rank)?;
        Ok(Self { frozen, mu })
    }

    /// The frozen blocks of a SuperNet built `from_parts_without_blocks`, taken out of the
    /// originals' parts (whose blocks are left empty), on their device.
    pub fn stack_blocks(&mut self, parts: &mut [BertPart]) -> Result<()> {
        let per_model = (parts.iter_mut())
            .map(|p| std::mem::take(&mut p.blocks))
            .collect();
        self.frozen.stack_blocks(per_model)
    }

    /// Model i's blocks, views of the stacked ones (a stage that recomputes its teacher runs
    /// them once the originals' copies are gone).
    pub fn model_blocks(&self, i: usize) -> Vec<EncoderBlock> {
        let eps = self.frozen.cfg.layer_norm_eps;
        (self.frozen.blocks.iter())
            .map(|b| b.model(i, eps))
            .collect()
    }

    /// Model i's embedding tables and LayerNorm, views of the stacked ones (with the
    /// embeddings): a stage that recomputes its teacher keeps these, not a second copy.
    pub fn model_embeddings(&self, i: usize) -> Option<([Tensor; 3], LayerNorm)> {
        let e = self.frozen.embeddings.as_ref()?;
        let i64 = i as i64;
        let tables = [e.word.get(i64), e.position.get(i64), e.token_type.get(i64)];
        Some((tables, e.ln.model(i, self.frozen.cfg.layer_norm_eps)))
    }

    /// The held units.
    pub fn units(&self) -> Range<usize> {
        self.frozen.units.clone()
    }

    /// Global index of the first held block.
    fn first_block(&self) -> usize {
        unit_blocks(&self.frozen.units).start
    }

    /// Whether the part holds the pooler and U_final (the SuperNet's output).
    pub fn has_output(&self) -> bool {
        self.mu.output.is_some()
    }

    /// Whether the part holds the embeddings (its input is token ids, not a stream).
    pub fn has_embeddings(&self) -> bool {
        self.frozen.embeddings.is_some()
    }

    /// The parameters the global phase trains: M_emb and LN_emb with the embeddings, the held
    /// blocks' M/U and LayerNorms, the output's M/U.
    pub fn params(&self) -> Vec<Tensor> {
        let mu = &self.mu;
        let mut v = Vec::new();
        if let Some(ln) = &mu.ln_emb {
            v.extend(mu.m_emb.params());
            v.extend(ln.params());
        }
        v.extend(mu.blocks.iter().flat_map(|b| b.params(Norm::Post)));
        if let Some(o) = &mu.output {
            v.extend(o.params());
        }
        v
    }

    /// What local training moves: the part's own (LN_emb, the blocks, the output) and the
    /// shared residual merge and unmerge M_res = M_emb, U_res, whose gradients every part sums.
    pub fn local_params(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let mu = &self.mu;
        let mut own: Vec<Tensor> = mu.ln_emb.iter().flat_map(MergedLn::params).collect();
        own.extend(mu.blocks.iter().flat_map(|b| b.params(Norm::Post)));
        if let Some(o) = &mu.output {
            own.extend(o.params());
        }
        let mut shared = mu.m_emb.params();
        shared.extend(mu.u_res.params());
        (own, shared)
    }

    /// Every trainable tensor, named by group (checkpoints): `m_emb`, `u_res`, `ln_emb`,
    /// `block{l}` (global l), `output`.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mu = &self.mu;
        let mut groups = vec![
            ("m_emb".to_string(), mu.m_emb.params()),
            ("u_res".to_string(), mu.u_res.params()),
        ];
        if let Some(ln) = &mu.ln_emb {
            groups.push(("ln_emb".into(), ln.params().into()));
        }
        for (j, b) in mu.blocks.iter().enumerate() {
            groups.push((
                format!("block{}", self.first_block() + j),
                b.params(Norm::Post),
            ));
        }
        if let Some(o) = &mu.output {
            groups.push(("output".into(), o.params()));
        }
        named_groups(groups)
    }

    /// Move every tensor to `device` (the trainable ones stay leaves that require grad).
    pub fn move_to(&mut self, device: Device) {
        self.frozen.move_to(device);
        let mu = &mut self.mu;
        mu.m_emb.to_device(device);
        mu.u_res.to_device(device);
        if let Some(ln) = &mut mu.ln_emb {
            ln.move_to(device);
        }
        for b in &mut mu.blocks {
            b.move_to(device);
        }
        if let Some(o) = &mut mu.output {
            for m in [&mut o.u_pool, &mut o.m_pool, &mut o.u_final] {
                m.to_device(device);
            }
        }
    }

    fn heads(&self) -> i64 {
        self.frozen.cfg.num_attention_heads as i64
    }

    /// Block j of the part (global index first_block + j) folded into a plain post-LN block
    /// (differentiable in M/U/LN).
    fn fold_block(&self, j: usize, fb: &FrozenBlock) -> Option<EncoderBlock> {
        let mu = self.mu.blocks.get(j)?;
        Some(EncoderBlock {
            q: folded_linear(&fb.q, &mu.m_q, &mu.u_att),
            k: folded_linear(&fb.k, &mu.m_k, &mu.u_att),
            v: folded_linear(&fb.v, &mu.m_v, &mu.u_att),
            out: folded_linear(&fb.o, &mu.m_o, &mu.u_o),
            ln_attn: mu.ln_attn.layer_norm(),
            fc1: folded_linear(&fb.fc1, &mu.m_1, &mu.u_0),
            fc2: folded_linear(&fb.fc2, &mu.m_2, &mu.u_1),
            ln_mlp: mu.ln_mlp.layer_norm(),
        })
    }

    /// Block j literally: n branches between each U and its M.
    fn block_literal(
        &self,
        fb: &FrozenBlock,
        mu: &EncoderBlockMu,
        x: &Tensor,
        bias: &Tensor,
    ) -> Tensor {
        let (b, t, d) = x.size3().unwrap_or((0, 0, 0));
        let flat = x.view([-1, d]);
        let ua = mu.u_att.unmerge(&flat);
        let proj = |m: &MuMatrix, f: &FrozenLayer| m.merge(&f.branches(&ua)).view([b, t, d]);
        let ctx = attend(
            &proj(&mu.m_q, &fb.q),
            &proj(&mu.m_k, &fb.k),
            &proj(&mu.m_v, &fb.v),
            self.heads(),
            Some(bias),
        )
        .view([-1, d]);
        let att = mu.m_o.merge(&fb.o.branches(&mu.u_o.unmerge(&ctx)));
        let x = mu.ln_attn.forward(&(flat + att));
        let z = mu
            .m_1
            .merge(&fb.fc1.branches(&mu.u_0.unmerge(&x)))
            .gelu("none");
        let m = mu.m_2.merge(&fb.fc2.branches(&mu.u_1.unmerge(&z)));
        mu.ln_mlp.forward(&(x + m)).view([b, t, d])
    }

    /// x*_0 [B, T, d] of token ids [B, T]: the n embeddings (before their LayerNorm) merged by
    /// M_emb, literally or through the folded tables; then the merged LN_emb. None without the
    /// embeddings.
    fn embed(&self, ids: &Tensor, form: StepForm) -> Option<Tensor> {
        let (e, ln) = (self.frozen.embeddings.as_ref()?, self.mu.ln_emb.as_ref()?);
        let (n, d) = (self.frozen.n as i64, self.frozen.cfg.hidden_size as i64);
        let (b, t) = ids.size2().unwrap_or((0, 0));
        let emb = match form {
            StepForm::Literal => {
                let per_model: Vec<Tensor> = (0..n)
                    .map(|i| {
                        embed_tokens(
                            &e.word.get(i),
                            &e.position.get(i),
                            &e.token_type.get(i),
                            ids,
                        )
                        .view([1, b * t, d])
                    })
                    .collect();
                self.mu
                    .m_emb
                    .merge(&Tensor::cat(&per_model, 0))
                    .view([b, t, d])
            }
            StepForm::Fold => {
                let [w, p, ty] =
                    [&e.word, &e.position, &e.token_type].map(|t| self.mu.m_emb.merge(t));
                embed_tokens(&w, &p, &ty, ids)
            }
        };
        Some(ln.forward(&emb))
    }

    /// Held block j (global first_block + j) in `form` (same function either way).
    fn block(&self, j: usize, x: &Tensor, bias: &Tensor, form: StepForm) -> Tensor {
        let (Some(fb), Some(mu)) = (self.frozen.blocks.get(j), self.mu.blocks.get(j)) else {
            return x.shallow_clone();
        };
        match form {
            StepForm::Literal => self.block_literal(fb, mu, x, bias),
            StepForm::Fold => match self.fold_block(j, fb) {
                Some(folded) => folded.forward_post_ln(x, bias, self.heads()),
                None => x.shallow_clone(),
            },
        }
    }

    /// The held units on their input — token ids [B, T] with the embeddings, else the merged
    /// stream [B, T, d] — with the attention mask [B, T], in `form`: the merged stream after
    /// the last held block, or with the output ŷ [n, B, d]. For the whole SuperNet, ŷ of ids.
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
        self.frozen.blocks.len().max(1)
    }

    /// Segment `k` of `forward` on its input (`forward`'s for segment 0, else segment
    /// k − 1's output).
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
        if k < self.frozen.blocks.len() {
            x = self.block(k, &x, &mask_bias(mask), form);
        }
        if k + 1 < self.segments() {
            return x;
        }
        self.output(&x.select(1, 0), form).unwrap_or(x)
    }

    /// ŷ [n, B, d] from the merged [CLS] state [B, d]: U_final tanh(pooler*(x)); None without
    /// the output.
    fn output(&self, cls: &Tensor, form: StepForm) -> Option<Tensor> {
        let (pooler, o) = (self.frozen.pooler.as_ref()?, self.mu.output.as_ref()?);
        let y = match form {
            StepForm::Literal => o.m_pool.merge(&pooler.branches(&o.u_pool.unmerge(cls))),
            StepForm::Fold => folded_linear(pooler, &o.m_pool, &o.u_pool).forward(cls),
        };
        Some(o.u_final.unmerge(&y.tanh()))
    }

    /// U_res y [n, B, T, d] of a merged stream y [B, T, d] and the residual drift.
    fn unmerge_res(&self, y: &Tensor) -> (Tensor, Tensor) {
        crate::core::transformer::unmerge_res(&self.mu.m_emb, &self.mu.u_res, y)
    }

    /// M_res f [B, T, d] of the originals' streams f [n, B, T, d].
    fn merge_res(&self, f: &Tensor) -> Tensor {
        crate::core::transformer::merge_res(&self.mu.m_emb, f)
    }

    /// The local problems of the held units on a batch, one at a time to `each` (so a caller
    /// may backpropagate each before the next is built), each unit's reconstruction with the
    /// residual drift: the embeddings' U_res LN_emb(M_emb emb(ids)) of f_0, then block l's
    /// U_res block(M_res f_l) of f_{l+1} (`stream(k)` gives f_k [n, B, T, d], the originals'
    /// stream after unit k), and with the output its ŷ [n, B, d] from M_res f_L[CLS].
    pub fn local_problems(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        stream: &dyn Fn(usize) -> Tensor,
        form: StepForm,
        each: &mut dyn FnMut(LocalProblem) -> Result<()>,
    ) -> Result<()> {
        let bias = mask_bias(mask);
        if let Some(e) = self.embed(ids, form) {
            let (pred, drift) = self.unmerge_res(&e);
            each(LocalProblem::Unit(pred, stream(0), drift))?;
        }
        for j in 0..self.frozen.blocks.len() {
            let l = self.first_block() + j;
            let y = self.block(j, &self.merge_res(&stream(l)), &bias, form);
            let (pred, drift) = self.unmerge_res(&y);
            each(LocalProblem::Unit(pred, stream(l + 1), drift))?;
        }
        let output = self.frozen.pooler.as_ref().and_then(|_| {
            let last = stream(self.frozen.units.end - 1).select(2, 0);
            self.output(&self.mu.m_emb.merge(&last), form)
        });
        match output {
            Some(pred) => each(LocalProblem::Output(pred)),
            None => Ok(()),
        }
    }

    /// The local SuperNet as trained: after every unit the stream goes through U_res and back
    /// through M_res. The folded model skips that round trip; the accuracy gap between the two
    /// is what local mode's shared residual basis costs.
    pub fn forward_local_chain(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let bias = mask_bias(mask);
        let round_trip = |y: &Tensor| self.merge_res(&self.unmerge_res(y).0);
        let mut x = self
            .embed(ids, StepForm::Fold)
            .map_or_else(|| ids.shallow_clone(), |e| round_trip(&e));
        for j in 0..self.frozen.blocks.len() {
            x = round_trip(&self.block(j, &x, &bias, StepForm::Fold));
        }
        self.output(&x.select(1, 0), StepForm::Fold).unwrap_or(x)
    }

    /// Each task's classifier with its read-out folded in, W_t U_final⁽ᵗ⁾ (with the output).
    pub fn folded_heads(&self, classifiers: &[&Linear]) -> Option<Vec<Linear>> {
        let o = self.mu.output.as_ref()?;
        Some(
            classifiers
                .iter()
                .enumerate()
                .map(|(t, c)| o.u_final.fold_into_head(t, c))
                .collect(),
        )
    }

    /// The held units folded, under their HF `BertModel` names (detached copies): the tables
    /// Σ_i Tab_i M_emb⁽ⁱ⁾ and LN_emb, the blocks, the pooler.
    pub fn fold_named(&self) -> BTreeMap<String, Tensor> {
        tch::no_grad(|| {
            let c = |t: &Tensor| t.detach().copy();
            let mut out = BTreeMap::new();
            let mut put = |name: String, t: &Tensor| {
                out.insert(name, c(t));
            };
            if let (Some(e), Some(ln)) = (&self.frozen.embeddings, &self.mu.ln_emb) {
                let tables = [&e.word, &e.position, &e.token_type];
                for (name, t) in crate::families::bert::model::TABLE_NAMES.iter().zip(tables) {
                    put(name.to_string(), &self.mu.m_emb.merge(t));
                }
                put("embeddings.LayerNorm.weight".into(), &ln.w);
                put("embeddings.LayerNorm.bias".into(), &ln.b);
            }
            for (j, fb) in self.frozen.blocks.iter().enumerate() {
                if let Some(b) = self.fold_block(j, fb) {
                    for (name, t) in b.named(self.first_block() + j, &BERT_BLOCK) {
                        put(name, t);
                    }
                }
            }
            if let (Some(p), Some(o)) = (&self.frozen.pooler, &self.mu.output) {
                let folded = folded_linear(p, &o.m_pool, &o.u_pool);
                put("pooler.dense.weight".into(), &folded.w);
                put("pooler.dense.bias".into(), &folded.b);
            }
            out
        })
    }

    /// The folded BERT with its pooler (detached), when the SuperNet holds every unit; task t
    /// reads U_final⁽ᵗ⁾ of its pooled output (fold it into the task's classifier as W_t U_final⁽ᵗ⁾).
    pub fn fold(&self) -> Result<Bert> {
        BertPart::from_tensors(self.frozen.cfg.clone(), self.units(), "", self.fold_named())?
            .into_bert()
    }

    /// The folded BERT and each task's classifier with its read-out folded in.
    pub fn merged(&self, classifiers: &[&Linear]) -> Result<(Bert, Vec<Linear>)> {
        let heads = self.folded_heads(classifiers).ok_or_else(|| {
            Error::Compute("the SuperNet part has no output to fold the heads into".into())
        })?;
        Ok((self.fold()?, heads))
    }
}

/// One local problem of a SuperNet part on a batch (`BertSuperNet::local_problems`).
pub enum LocalProblem {
    /// A held unit: its reconstruction [n, B, T, d], its target, the residual drift.
    Unit(Tensor, Tensor, Tensor),
    /// The output: ŷ [n, B, d] (its target is the pooled outputs).
    Output(Tensor),
}
