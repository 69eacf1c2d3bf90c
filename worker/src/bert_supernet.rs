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

use crate::bert::{embed_tokens, mask_bias, Bert, BertBlock};
use crate::mlp::Linear;
use crate::mu::{MuMatrix, Role};
use crate::supernet::FrozenLayer;
use crate::vit::attend;
use crate::vit_supernet::{check_mergeable, folded_linear, FrozenLn, MergedLn, MuDraw};
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::hf::BertConfig;
use fsmerge_common::{Error, Result};
use tch::Tensor;

struct FrozenBlock {
    q: FrozenLayer,
    k: FrozenLayer,
    v: FrozenLayer,
    o: FrozenLayer,
    ln_att: FrozenLn,
    fc1: FrozenLayer,
    fc2: FrozenLayer,
    ln_out: FrozenLn,
}

/// Every original weight, stacked per model.
pub struct FrozenBert {
    pub n: usize,
    pub cfg: BertConfig,
    /// Tables [n, rows, d].
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln_emb: FrozenLn,
    blocks: Vec<FrozenBlock>,
    pooler: FrozenLayer,
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
    pub fn from_models(models: &[&Bert]) -> Result<Self> {
        check_mergeable(
            models,
            |m| shape_of(&m.cfg),
            "hidden, layers, heads, intermediate, vocab, positions",
        )?;
        let n = models.len();
        let first = models[0];
        let poolers: Option<Vec<&Linear>> = models.iter().map(|m| m.pooler.as_ref()).collect();
        let Some(poolers) = poolers else {
            return Err(Error::Compute(
                "every BERT needs its pooler (pooler.dense): FS-Merge reconstructs pooled outputs"
                    .into(),
            ));
        };
        let stack = |f: &dyn Fn(&Bert) -> &Tensor| {
            Tensor::stack(&models.iter().map(|m| f(m).detach()).collect::<Vec<_>>(), 0)
        };
        let blocks = (0..first.blocks.len())
            .map(|l| {
                let b: Vec<&BertBlock> = models.iter().map(|m| &m.blocks[l]).collect();
                let lin = |f: &dyn Fn(&BertBlock) -> &Linear| {
                    FrozenLayer::stack(&b.iter().map(|b| f(b)).collect::<Vec<_>>())
                };
                FrozenBlock {
                    q: lin(&|b| &b.q),
                    k: lin(&|b| &b.k),
                    v: lin(&|b| &b.v),
                    o: lin(&|b| &b.out),
                    ln_att: FrozenLn::stack(&b.iter().map(|b| &b.ln_att).collect::<Vec<_>>()),
                    fc1: lin(&|b| &b.fc1),
                    fc2: lin(&|b| &b.fc2),
                    ln_out: FrozenLn::stack(&b.iter().map(|b| &b.ln_out).collect::<Vec<_>>()),
                }
            })
            .collect();
        Ok(Self {
            n,
            cfg: first.cfg.clone(),
            word: stack(&|m| &m.word),
            position: stack(&|m| &m.position),
            token_type: stack(&|m| &m.token_type),
            ln_emb: FrozenLn::stack(&models.iter().map(|m| &m.ln_emb).collect::<Vec<_>>()),
            blocks,
            pooler: FrozenLayer::stack(&poolers),
        })
    }
}

/// The trainable M/U and LayerNorms of one block.
pub struct BertBlockMu {
    pub u_att: MuMatrix,
    pub m_q: MuMatrix,
    pub m_k: MuMatrix,
    pub m_v: MuMatrix,
    pub u_o: MuMatrix,
    pub m_o: MuMatrix,
    pub ln_att: MergedLn,
    pub u_0: MuMatrix,
    pub m_1: MuMatrix,
    pub u_1: MuMatrix,
    pub m_2: MuMatrix,
    pub ln_out: MergedLn,
}

pub struct BertMu {
    pub m_emb: MuMatrix,
    pub ln_emb: MergedLn,
    pub blocks: Vec<BertBlockMu>,
    pub u_pool: MuMatrix,
    pub m_pool: MuMatrix,
    pub u_final: MuMatrix,
    /// Local mode: the residual unmerge shared by every unit (M_res is `m_emb`).
    pub u_res: MuMatrix,
}

impl BertMu {
    /// Every M/U, drawn by `MuDraw` (`att_heads` structures the attention M/U with the model's
    /// heads, method.md §5.5; the rest fall back to diagonal + low rank).
    fn new(f: &FrozenBert, mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let c = &f.cfg;
        let shape = [c.hidden_size, c.intermediate_size, c.num_attention_heads];
        let draw = MuDraw::new(mu_type, init, f.n, shape, rank);
        let eps = c.layer_norm_eps;
        let m_emb = draw.width(Role::Merge)?;
        let mut blocks = Vec::new();
        for fb in &f.blocks {
            blocks.push(BertBlockMu {
                u_att: draw.attention(Role::Unmerge)?,
                m_q: draw.attention(Role::Merge)?,
                m_k: draw.attention(Role::Merge)?,
                m_v: draw.attention(Role::Merge)?,
                u_o: draw.attention(Role::Unmerge)?,
                m_o: draw.attention(Role::Merge)?,
                ln_att: MergedLn::new(&fb.ln_att, init, eps),
                u_0: draw.width(Role::Unmerge)?,
                m_1: draw.hidden(Role::Merge)?,
                u_1: draw.hidden(Role::Unmerge)?,
                m_2: draw.width(Role::Merge)?,
                ln_out: MergedLn::new(&fb.ln_out, init, eps),
            });
        }
        Ok(Self {
            m_emb,
            ln_emb: MergedLn::new(&f.ln_emb, init, eps),
            blocks,
            u_pool: draw.width(Role::Unmerge)?,
            m_pool: draw.width(Role::Merge)?,
            u_final: draw.width(Role::Unmerge)?,
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
    pub fn new(models: &[&Bert], mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        let frozen = FrozenBert::from_models(models)?;
        let mu = BertMu::new(&frozen, mu_type, init, rank)?;
        Ok(Self { frozen, mu })
    }

    pub fn params(&self) -> Vec<Tensor> {
        let mu = &self.mu;
        let mut v = mu.m_emb.params();
        v.extend(mu.ln_emb.params());
        for b in &mu.blocks {
            for m in [&b.u_att, &b.m_q, &b.m_k, &b.m_v, &b.u_o, &b.m_o] {
                v.extend(m.params());
            }
            v.extend(b.ln_att.params());
            for m in [&b.u_0, &b.m_1, &b.u_1, &b.m_2] {
                v.extend(m.params());
            }
            v.extend(b.ln_out.params());
        }
        for m in [&mu.u_pool, &mu.m_pool, &mu.u_final] {
            v.extend(m.params());
        }
        v
    }

    /// What local training moves: the global parameters and the shared residual unmerge.
    pub fn local_params(&self) -> Vec<Tensor> {
        let mut v = self.params();
        v.extend(self.mu.u_res.params());
        v
    }

    fn heads(&self) -> i64 {
        self.frozen.cfg.num_attention_heads as i64
    }

    /// Folded tables: word, position and token type, each Σ_i Tab_i M_emb⁽ⁱ⁾.
    fn fold_tables(&self) -> [Tensor; 3] {
        let f = &self.frozen;
        [&f.word, &f.position, &f.token_type].map(|t| self.mu.m_emb.merge(t))
    }

    /// Block l folded into a plain post-LN block (differentiable in M/U/LN).
    fn fold_block(&self, l: usize) -> BertBlock {
        let (fb, mu) = (&self.frozen.blocks[l], &self.mu.blocks[l]);
        BertBlock {
            q: folded_linear(&fb.q, &mu.m_q, &mu.u_att),
            k: folded_linear(&fb.k, &mu.m_k, &mu.u_att),
            v: folded_linear(&fb.v, &mu.m_v, &mu.u_att),
            out: folded_linear(&fb.o, &mu.m_o, &mu.u_o),
            ln_att: mu.ln_att.layer_norm(),
            fc1: folded_linear(&fb.fc1, &mu.m_1, &mu.u_0),
            fc2: folded_linear(&fb.fc2, &mu.m_2, &mu.u_1),
            ln_out: mu.ln_out.layer_norm(),
        }
    }

    /// Block l literally: n branches between each U and its M.
    fn block_literal(&self, l: usize, x: &Tensor, bias: &Tensor) -> Tensor {
        let (fb, mu) = (&self.frozen.blocks[l], &self.mu.blocks[l]);
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
        let x = mu.ln_att.forward(&(flat + att));
        let z = mu
            .m_1
            .merge(&fb.fc1.branches(&mu.u_0.unmerge(&x)))
            .gelu("none");
        let m = mu.m_2.merge(&fb.fc2.branches(&mu.u_1.unmerge(&z)));
        mu.ln_out.forward(&(x + m)).view([b, t, d])
    }

    /// x*_0 [B, T, d]: the n embeddings (before their LayerNorm) merged by M_emb, literally or
    /// through the folded tables; then the merged LN_emb.
    fn embed(&self, ids: &Tensor, form: StepForm) -> Tensor {
        let f = &self.frozen;
        let (n, d) = (f.n as i64, f.cfg.hidden_size as i64);
        let (b, t) = ids.size2().unwrap_or((0, 0));
        let emb = match form {
            StepForm::Literal => {
                let per_model: Vec<Tensor> = (0..n)
                    .map(|i| {
                        embed_tokens(
                            &f.word.get(i),
                            &f.position.get(i),
                            &f.token_type.get(i),
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
                let [w, p, ty] = self.fold_tables();
                embed_tokens(&w, &p, &ty, ids)
            }
        };
        self.mu.ln_emb.forward(&emb)
    }

    /// Block l in `form` (same function either way).
    fn block(&self, l: usize, x: &Tensor, bias: &Tensor, form: StepForm) -> Tensor {
        match form {
            StepForm::Literal => self.block_literal(l, x, bias),
            StepForm::Fold => self.fold_block(l).forward(x, bias, self.heads()),
        }
    }

    /// ŷ [n, B, d] for token ids [B, T] with attention mask [B, T], in `form`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, form: StepForm) -> Tensor {
        let bias = mask_bias(mask);
        let mut x = self.embed(ids, form);
        for l in 0..self.frozen.blocks.len() {
            x = self.block(l, &x, &bias, form);
        }
        self.output(&x.select(1, 0), form)
    }

    /// ŷ [n, B, d] from the merged [CLS] state [B, d]: U_final tanh(pooler*(x)).
    fn output(&self, cls: &Tensor, form: StepForm) -> Tensor {
        let f = &self.frozen;
        let y = match form {
            StepForm::Literal => self
                .mu
                .m_pool
                .merge(&f.pooler.branches(&self.mu.u_pool.unmerge(cls))),
            StepForm::Fold => {
                folded_linear(&f.pooler, &self.mu.m_pool, &self.mu.u_pool).forward(cls)
            }
        };
        self.mu.u_final.unmerge(&y.tanh())
    }

    /// U_res y [n, B, T, d] of a merged stream y [B, T, d], and the residual basis' drift: the
    /// mean square of M_res U_res y − y.
    fn unmerge_res(&self, y: &Tensor) -> (Tensor, Tensor) {
        let (b, t, d) = y.size3().unwrap_or((0, 0, 0));
        let flat = y.view([-1, d]);
        let pred = self.mu.u_res.unmerge(&flat);
        let drift = (self.mu.m_emb.merge(&pred) - &flat).square().mean(None);
        (pred.view([-1, b, t, d]), drift)
    }

    /// M_res f [B, T, d] of the originals' streams f [n, B, T, d].
    fn merge_res(&self, f: &Tensor) -> Tensor {
        let (n, b, t, d) = f.size4().unwrap_or((0, 0, 0, 0));
        self.mu.m_emb.merge(&f.view([n, b * t, d])).view([b, t, d])
    }

    /// The embeddings' local problem: the reconstruction U_res LN_emb(M_emb emb) of f_0
    /// [n, B, T, d], and the drift.
    pub fn local_embeddings(&self, ids: &Tensor, form: StepForm) -> (Tensor, Tensor) {
        self.unmerge_res(&self.embed(ids, form))
    }

    /// Block l's local problem: U_res block(M_res f_l) for f_l [n, B, T, d] (the reconstruction
    /// of f_{l+1}), and the drift.
    pub fn local_block(
        &self,
        l: usize,
        f_in: &Tensor,
        mask: &Tensor,
        form: StepForm,
    ) -> (Tensor, Tensor) {
        let y = self.block(l, &self.merge_res(f_in), &mask_bias(mask), form);
        self.unmerge_res(&y)
    }

    /// The output's local problem: the originals' last [CLS] states [n, B, d] merged by M_res,
    /// then the pooler and U_final → ŷ [n, B, d].
    pub fn local_output(&self, f_cls: &Tensor, form: StepForm) -> Tensor {
        self.output(&self.mu.m_emb.merge(f_cls), form)
    }

    /// The local SuperNet as trained: after every unit the stream goes through U_res and back
    /// through M_res. The folded model skips that round trip; the accuracy gap between the two
    /// is what local mode's shared residual basis costs.
    pub fn forward_local_chain(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let bias = mask_bias(mask);
        let round_trip = |y: &Tensor| self.merge_res(&self.unmerge_res(y).0);
        let mut x = round_trip(&self.embed(ids, StepForm::Fold));
        for l in 0..self.frozen.blocks.len() {
            x = round_trip(&self.block(l, &x, &bias, StepForm::Fold));
        }
        self.output(&x.select(1, 0), StepForm::Fold)
    }

    /// The folded BERT and each task's classifier with its read-out folded in: W_t U_final⁽ᵗ⁾.
    pub fn merged(&self, classifiers: &[&Linear]) -> (Bert, Vec<Linear>) {
        let heads = classifiers
            .iter()
            .enumerate()
            .map(|(t, c)| self.mu.u_final.fold_into_head(t, c))
            .collect();
        (self.fold(), heads)
    }

    /// The folded BERT with its pooler (detached); task t reads U_final⁽ᵗ⁾ of its pooled output
    /// (fold it into the task's classifier as W_t U_final⁽ᵗ⁾).
    pub fn fold(&self) -> Bert {
        tch::no_grad(|| {
            let [word, position, token_type] = self.fold_tables().map(|t| t.detach().copy());
            let c = |t: &Tensor| t.detach().copy();
            let lin = |l: Linear| Linear {
                w: c(&l.w),
                b: c(&l.b),
            };
            let ln = |l: crate::vit::LayerNorm| crate::vit::LayerNorm {
                w: c(&l.w),
                b: c(&l.b),
                eps: l.eps,
            };
            let blocks = (0..self.frozen.blocks.len())
                .map(|l| {
                    let b = self.fold_block(l);
                    BertBlock {
                        q: lin(b.q),
                        k: lin(b.k),
                        v: lin(b.v),
                        out: lin(b.out),
                        ln_att: ln(b.ln_att),
                        fc1: lin(b.fc1),
                        fc2: lin(b.fc2),
                        ln_out: ln(b.ln_out),
                    }
                })
                .collect();
            Bert {
                cfg: self.frozen.cfg.clone(),
                word,
                position,
                token_type,
                ln_emb: ln(self.mu.ln_emb.layer_norm()),
                blocks,
                pooler: Some(lin(folded_linear(
                    &self.frozen.pooler,
                    &self.mu.m_pool,
                    &self.mu.u_pool,
                ))),
                classifier: None,
            }
        })
    }
}
