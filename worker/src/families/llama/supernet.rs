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
//! standard Llama, and task t's LM head is its own lm_head read through U_final⁽ᵗ⁾.

use crate::core::linear::Linear;
use crate::core::merged_linear::{fold_layer, FrozenLayer};
use crate::core::mu::{MuMatrix, Role};
use crate::core::tensor::{f32, F32};
use crate::core::transformer::check_mergeable;
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::model::{AttentionContext, DecoderBlock, Llama, Proj, RmsNorm};
use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::{Error, Result};
use tch::Tensor;

/// The same decoder block of every model, frozen: each linear map stacked (the RMSNorms are
/// trained in merged space, from the models' at init).
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
}

impl FrozenDecoder {
    fn stack(blocks: &[&DecoderBlock]) -> Self {
        let lin = |f: &dyn Fn(&DecoderBlock) -> &Proj| {
            let linears: Vec<Linear> = blocks
                .iter()
                .map(|b| {
                    let p = f(b);
                    let out = p.w.size()[0];
                    Linear {
                        w: p.w.shallow_clone(),
                        b: (p.b.as_ref())
                            .map_or_else(|| Tensor::zeros([out], F32), |b| b.shallow_clone()),
                    }
                })
                .collect();
            FrozenLayer::stack(&linears.iter().collect::<Vec<_>>())
        };
        let first = blocks[0];
        let bias = [
            &first.q,
            &first.k,
            &first.v,
            &first.o,
            &first.gate,
            &first.up,
            &first.down,
        ]
        .map(|p| p.b.is_some());
        Self {
            q: lin(&|b| &b.q),
            k: lin(&|b| &b.k),
            v: lin(&|b| &b.v),
            o: lin(&|b| &b.o),
            gate: lin(&|b| &b.gate),
            up: lin(&|b| &b.up),
            down: lin(&|b| &b.down),
            bias,
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
    fn params(&self) -> Vec<Tensor> {
        let mut v = vec![self.rms_attn.shallow_clone()];
        for m in [
            &self.u_att,
            &self.m_q,
            &self.m_k,
            &self.m_v,
            &self.u_o,
            &self.m_o,
        ] {
            v.extend(m.params());
        }
        v.push(self.rms_mlp.shallow_clone());
        for m in [&self.u_0, &self.m_gate, &self.m_up, &self.u_1, &self.m_down] {
            v.extend(m.params());
        }
        v
    }
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

pub struct LlamaSuperNet {
    cfg: LlamaConfig,
    n: usize,
    /// Every model's token embeddings [n, V, d].
    embed: Tensor,
    m_emb: MuMatrix,
    blocks: Vec<FrozenDecoder>,
    mu: Vec<DecoderMu>,
    norm: Tensor,
    u_final: MuMatrix,
    /// Each model's LM head [V, d] (its embeddings when tied).
    heads: Vec<Tensor>,
}

impl LlamaSuperNet {
    /// The SuperNet of `models` (same shape and vocabulary), its M/U drawn in order: M_emb,
    /// then per block U_att, M_q, M_k, M_v, U_o, M_o, U_0, M_gate, M_up, U_1, M_down, then
    /// U_final.
    pub fn new(models: &[&Llama], mu_type: MuType, init: Init, rank: usize) -> Result<Self> {
        check_mergeable(
            models,
            |m| shape_of(&m.cfg),
            "hidden, layers, heads, kv heads, head_dim, intermediate, vocab",
        )?;
        let cfg = models[0].cfg.clone();
        let n = models.len();
        let (d, h) = (cfg.hidden_size, cfg.intermediate_size);
        let hd = cfg.head_dim();
        let (heads, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let width = |role| MuMatrix::new(role, mu_type, init, n, d, rank);
        let hidden = |role| MuMatrix::new(role, mu_type, init, n, h, (rank * h / d).max(1));
        let att = |role, k: usize, heads: usize| {
            MuMatrix::attention(role, mu_type, init, n, k, rank, heads)
        };
        let m_emb = width(Role::Merge)?;
        let mut mu = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let b = |f: &dyn Fn(&DecoderBlock) -> &RmsNorm| {
                Tensor::stack(
                    &models
                        .iter()
                        .map(|m| f(&m.blocks[l]).w.detach())
                        .collect::<Vec<_>>(),
                    0,
                )
            };
            mu.push(DecoderMu {
                rms_attn: merged_norm(&b(&|x| &x.ln_attn), init),
                u_att: att(Role::Unmerge, d, heads)?,
                m_q: att(Role::Merge, heads * hd, heads)?,
                m_k: att(Role::Merge, kv * hd, kv)?,
                m_v: att(Role::Merge, kv * hd, kv)?,
                u_o: att(Role::Unmerge, heads * hd, heads)?,
                m_o: att(Role::Merge, d, heads)?,
                rms_mlp: merged_norm(&b(&|x| &x.ln_mlp), init),
                u_0: width(Role::Unmerge)?,
                m_gate: hidden(Role::Merge)?,
                m_up: hidden(Role::Merge)?,
                u_1: hidden(Role::Unmerge)?,
                m_down: width(Role::Merge)?,
            });
        }
        let u_final = width(Role::Unmerge)?;
        let heads = models
            .iter()
            .map(|m| match (&m.lm_head, m.cfg.tie_word_embeddings) {
                (Some(h), _) => Ok(h.detach()),
                (None, true) => Ok(m.embed.detach()),
                (None, false) => Err(Error::Compute(
                    "a model has no lm_head.weight and does not tie its embeddings".into(),
                )),
            })
            .collect::<Result<_>>()?;
        let norms: Vec<Tensor> = models.iter().map(|m| m.norm.w.detach()).collect();
        Ok(Self {
            n,
            embed: Tensor::stack(
                &models.iter().map(|m| m.embed.detach()).collect::<Vec<_>>(),
                0,
            ),
            m_emb,
            blocks: (0..cfg.num_hidden_layers)
                .map(|l| {
                    FrozenDecoder::stack(&models.iter().map(|m| &m.blocks[l]).collect::<Vec<_>>())
                })
                .collect(),
            mu,
            norm: merged_norm(&Tensor::stack(&norms, 0), init),
            u_final,
            heads,
            cfg,
        })
    }

    /// Every trainable tensor: M_emb, each block's, the final norm, U_final.
    pub fn params(&self) -> Vec<Tensor> {
        let mut v = self.m_emb.params();
        for m in &self.mu {
            v.extend(m.params());
        }
        v.push(self.norm.shallow_clone());
        v.extend(self.u_final.params());
        v
    }

    fn rms(&self, w: &Tensor) -> RmsNorm {
        RmsNorm {
            w: w.shallow_clone(),
            eps: self.cfg.rms_norm_eps,
        }
    }

    /// Block j folded: a standard decoder block (its biases only where the models have them).
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

    /// Block j literally: n branches between each U and M.
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

    /// Each model's reconstruction of its final hidden states [n, B, T, d] from token ids
    /// [B, T] (i64) with attention mask [B, T], through the fold or literally.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, form: StepForm) -> Tensor {
        let (b, t) = ids.size2().unwrap_or((0, 0));
        let d = self.cfg.hidden_size as i64;
        let ctx = AttentionContext::new(&self.cfg, mask);
        let flat = ids.reshape([-1]);
        let mut x = match form {
            StepForm::Fold => self.m_emb.merge(&self.embed).index_select(0, &flat),
            StepForm::Literal => self.m_emb.merge(&self.embed.index_select(1, &flat)),
        }
        .view([b, t, d]);
        for j in 0..self.blocks.len() {
            x = match form {
                StepForm::Fold => self.fold_block(j).forward(&x, &ctx),
                StepForm::Literal => self.block_literal(j, &x, &ctx),
            };
        }
        let h = self.rms(&self.norm).forward(&x).view([-1, d]);
        self.u_final.unmerge(&h).view([self.n as i64, b, t, d])
    }

    /// The folded model (detached) and each task's LM head read through U_final⁽ᵗ⁾
    /// (`lm_head_t · U_final⁽ᵗ⁾`, [V, d]).
    pub fn merged(&self) -> Result<(Llama, Vec<Tensor>)> {
        tch::no_grad(|| {
            let detach = |p: Proj| Proj {
                w: p.w.detach().copy(),
                b: p.b.map(|b| b.detach().copy()),
            };
            let blocks = (0..self.blocks.len())
                .map(|j| {
                    let b = self.fold_block(j);
                    let norm = |n: RmsNorm| RmsNorm {
                        w: n.w.detach().copy(),
                        eps: n.eps,
                    };
                    DecoderBlock {
                        ln_attn: norm(b.ln_attn),
                        q: detach(b.q),
                        k: detach(b.k),
                        v: detach(b.v),
                        o: detach(b.o),
                        ln_mlp: norm(b.ln_mlp),
                        gate: detach(b.gate),
                        up: detach(b.up),
                        down: detach(b.down),
                    }
                })
                .collect();
            let heads = (self.heads.iter().enumerate())
                .map(|(t, h)| {
                    let linear = Linear {
                        w: h.shallow_clone(),
                        b: Tensor::zeros([h.size()[0]], (tch::Kind::Float, h.device())),
                    };
                    self.u_final.fold_into_head(t, &linear).w.detach().copy()
                })
                .collect();
            let model = Llama {
                cfg: LlamaConfig {
                    tie_word_embeddings: false,
                    ..self.cfg.clone()
                },
                embed: self.m_emb.merge(&self.embed).detach().copy(),
                blocks,
                norm: RmsNorm {
                    w: self.norm.detach().copy(),
                    eps: self.cfg.rms_norm_eps,
                },
                lm_head: None,
                score: None,
            };
            Ok((model, heads))
        })
    }
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
            let (merged, heads) = sn.merged().unwrap();
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
