//! The encoder block the encoder families share (ViT, BERT): multi-head self-attention and a
//! GELU MLP, each sub-block with a LayerNorm — before it (pre-LN, ViT) or after its residual
//! add (post-LN, BERT) — the same block of n models, frozen, for a SuperNet, and its M/U.

use crate::core::attention::attention;
use crate::core::layer_norm::{FrozenLn, LayerNorm, MergedLn};
use crate::core::linear::Linear;
use crate::core::merged_linear::FrozenLayer;
use crate::core::mu::MuMatrix;
use fsmerge_common::{Error, Result};
use tch::{Device, Tensor};

/// One of a block's linear maps or LayerNorms (how a family's HF names map onto the block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Q,
    K,
    V,
    Out,
    LnAttn,
    Fc1,
    Fc2,
    LnMlp,
}

/// A family's HF layout of a block: each part's name under `encoder.layer.{l}.`, in the
/// family's order (the order of `named`).
pub type Layout = [(&'static str, Part); 8];

pub struct EncoderBlock {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    /// The attention sub-block's LayerNorm: before it (pre-LN) or after its residual add
    /// (post-LN).
    pub ln_attn: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    /// The MLP sub-block's LayerNorm, placed as `ln_attn`.
    pub ln_mlp: LayerNorm,
}

impl EncoderBlock {
    /// A part's (weight, bias).
    pub fn part(&self, p: Part) -> (&Tensor, &Tensor) {
        match p {
            Part::Q => (&self.q.w, &self.q.b),
            Part::K => (&self.k.w, &self.k.b),
            Part::V => (&self.v.w, &self.v.b),
            Part::Out => (&self.out.w, &self.out.b),
            Part::LnAttn => (&self.ln_attn.w, &self.ln_attn.b),
            Part::Fc1 => (&self.fc1.w, &self.fc1.b),
            Part::Fc2 => (&self.fc2.w, &self.fc2.b),
            Part::LnMlp => (&self.ln_mlp.w, &self.ln_mlp.b),
        }
    }

    /// Every tensor under its HF name as block `l` (`encoder.layer.{l}.{part}.weight|bias`), in
    /// `layout` order.
    pub fn named(&self, l: usize, layout: &Layout) -> Vec<(String, &Tensor)> {
        layout
            .iter()
            .flat_map(|&(name, p)| {
                let (w, b) = self.part(p);
                [
                    (format!("encoder.layer.{l}.{name}.weight"), w),
                    (format!("encoder.layer.{l}.{name}.bias"), b),
                ]
            })
            .collect()
    }

    /// The block from each part's (weight, bias), read in `layout` order by HF part name
    /// through `pair`.
    pub fn from_pairs(
        layout: &Layout,
        eps: f64,
        pair: &mut dyn FnMut(&str) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let mut got: [Option<(Tensor, Tensor)>; 8] = Default::default();
        for &(name, p) in layout {
            got[p as usize] = Some(pair(name)?);
        }
        let mut take = |p: Part| {
            got[p as usize]
                .take()
                .ok_or_else(|| Error::Compute(format!("block layout without {p:?}")))
        };
        let mut lin = |p: Part| take(p).map(|(w, b)| Linear { w, b });
        let (q, k, v, out, fc1, fc2) = (
            lin(Part::Q)?,
            lin(Part::K)?,
            lin(Part::V)?,
            lin(Part::Out)?,
            lin(Part::Fc1)?,
            lin(Part::Fc2)?,
        );
        let mut ln = |p: Part| take(p).map(|(w, b)| LayerNorm { w, b, eps });
        Ok(Self {
            q,
            k,
            v,
            out,
            ln_attn: ln(Part::LnAttn)?,
            fc1,
            fc2,
            ln_mlp: ln(Part::LnMlp)?,
        })
    }

    /// A freshly initialised block of width `d` and MLP width `h` (`lin(out, in)` draws a linear
    /// map; LayerNorms start at (1, 0)).
    pub fn init(d: i64, h: i64, eps: f64, lin: &dyn Fn(i64, i64) -> Linear) -> Self {
        Self {
            q: lin(d, d),
            k: lin(d, d),
            v: lin(d, d),
            out: lin(d, d),
            ln_attn: LayerNorm::init(d, eps),
            fc1: lin(h, d),
            fc2: lin(d, h),
            ln_mlp: LayerNorm::init(d, eps),
        }
    }

    /// The block with `f` applied to every tensor (a copy, a device move).
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        let lin = |l: &Linear| Linear {
            w: f(&l.w),
            b: f(&l.b),
        };
        let ln = |l: &LayerNorm| LayerNorm {
            w: f(&l.w),
            b: f(&l.b),
            eps: l.eps,
        };
        Self {
            q: lin(&self.q),
            k: lin(&self.k),
            v: lin(&self.v),
            out: lin(&self.out),
            ln_attn: ln(&self.ln_attn),
            fc1: lin(&self.fc1),
            fc2: lin(&self.fc2),
            ln_mlp: ln(&self.ln_mlp),
        }
    }

    /// Pre-LN: x ← x + out(attention(LN_attn x)); x ← x + fc2(gelu(fc1(LN_mlp x))).
    pub fn forward_pre_ln(&self, x: &Tensor, heads: i64) -> Tensor {
        let x = x + self.attention_branch(x, heads);
        &x + self.mlp_branch(&x)
    }

    /// Pre-LN: the inputs of the block's linear maps — LN_attn x (q, k, v), the attention
    /// context (out), LN_mlp x' (fc1), gelu(fc1 ·) (fc2) — and the block's output.
    pub fn linear_inputs_pre_ln(&self, x: &Tensor, heads: i64) -> ([Tensor; 4], Tensor) {
        let a = self.ln_attn.forward(x);
        let ctx = attention(&a, &self.q, &self.k, &self.v, heads, None);
        let x = x + self.out.forward(&ctx);
        let g = self.ln_mlp.forward(&x);
        let z = self.fc1.forward(&g).gelu("none");
        let y = &x + self.fc2.forward(&z);
        ([a, ctx, g, z], y)
    }

    /// Pre-LN: out(attention(LN_attn x)), what the block adds to the stream first.
    pub fn attention_branch(&self, x: &Tensor, heads: i64) -> Tensor {
        let h = self.ln_attn.forward(x);
        self.out
            .forward(&attention(&h, &self.q, &self.k, &self.v, heads, None))
    }

    /// Pre-LN: fc2(gelu(fc1(LN_mlp x))), what the block adds to the stream second.
    pub fn mlp_branch(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.fc1.forward(&self.ln_mlp.forward(x)).gelu("none"))
    }

    /// Post-LN: h ← LN_attn(h + out(attention(h))); h ← LN_mlp(h + fc2(gelu(fc1 h))), with the
    /// additive attention `bias` (the padding mask).
    pub fn forward_post_ln(&self, h: &Tensor, bias: &Tensor, heads: i64) -> Tensor {
        let ctx = attention(h, &self.q, &self.k, &self.v, heads, Some(bias));
        let h = self.ln_attn.forward(&(h + self.out.forward(&ctx)));
        let m = self.fc2.forward(&self.fc1.forward(&h).gelu("none"));
        self.ln_mlp.forward(&(h + m))
    }

    /// Post-LN: the inputs of the block's linear maps — the stream (q, k, v), the attention
    /// context (out), the post-attention stream (fc1), the activations (fc2) — and the block's
    /// output (RegMean's Gram matrices).
    pub fn linear_inputs_post_ln(
        &self,
        h: &Tensor,
        bias: &Tensor,
        heads: i64,
    ) -> ([Tensor; 4], Tensor) {
        let ctx = attention(h, &self.q, &self.k, &self.v, heads, Some(bias));
        let a = self.ln_attn.forward(&(h + self.out.forward(&ctx)));
        let z = self.fc1.forward(&a).gelu("none");
        let y = self.ln_mlp.forward(&(&a + self.fc2.forward(&z)));
        ([h.shallow_clone(), ctx, a, z], y)
    }
}

/// The same block of every model, frozen: each linear map stacked, each LayerNorm stacked.
pub struct FrozenBlock {
    pub q: FrozenLayer,
    pub k: FrozenLayer,
    pub v: FrozenLayer,
    pub o: FrozenLayer,
    pub ln_attn: FrozenLn,
    pub fc1: FrozenLayer,
    pub fc2: FrozenLayer,
    pub ln_mlp: FrozenLn,
}

impl FrozenBlock {
    /// The same block of every model.
    pub fn stack(b: &[&EncoderBlock]) -> Self {
        let lin = |f: &dyn Fn(&EncoderBlock) -> &Linear| {
            FrozenLayer::stack(&b.iter().map(|b| f(b)).collect::<Vec<_>>())
        };
        let ln = |f: &dyn Fn(&EncoderBlock) -> &LayerNorm| {
            FrozenLn::stack(&b.iter().map(|b| f(b)).collect::<Vec<_>>())
        };
        Self {
            q: lin(&|b| &b.q),
            k: lin(&|b| &b.k),
            v: lin(&|b| &b.v),
            o: lin(&|b| &b.out),
            ln_attn: ln(&|b| &b.ln_attn),
            fc1: lin(&|b| &b.fc1),
            fc2: lin(&|b| &b.fc2),
            ln_mlp: ln(&|b| &b.ln_mlp),
        }
    }

    /// Model i's block, views of the stacked tensors (no copy): what a stage that recomputes
    /// its teacher features runs once the originals' own copies are gone.
    pub fn model(&self, i: usize, eps: f64) -> EncoderBlock {
        EncoderBlock {
            q: self.q.model(i),
            k: self.k.model(i),
            v: self.v.model(i),
            out: self.o.model(i),
            ln_attn: self.ln_attn.model(i, eps),
            fc1: self.fc1.model(i),
            fc2: self.fc2.model(i),
            ln_mlp: self.ln_mlp.model(i, eps),
        }
    }

    pub fn move_to(&mut self, device: Device) {
        for l in [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.fc1,
            &mut self.fc2,
        ] {
            l.to_device(device);
        }
        self.ln_attn.move_to(device);
        self.ln_mlp.move_to(device);
    }
}

/// Where a block's LayerNorms sit: before their sub-block (pre-LN) or after its residual add
/// (post-LN). It orders the block's trainable tensors (and so their checkpoint names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    Pre,
    Post,
}

/// The M/U of one encoder block of a SuperNet (method.md §4, §5): U_att shared by Q, K and V,
/// the merges M_q, M_k, M_v, the output's U_o/M_o, the MLP's U_0, M_1, U_1 (hidden width), M_2,
/// and the block's two LayerNorms in merged space.
pub struct EncoderBlockMu {
    pub ln_attn: MergedLn,
    pub u_att: MuMatrix,
    pub m_q: MuMatrix,
    pub m_k: MuMatrix,
    pub m_v: MuMatrix,
    pub u_o: MuMatrix,
    pub m_o: MuMatrix,
    pub ln_mlp: MergedLn,
    pub u_0: MuMatrix,
    pub m_1: MuMatrix,
    pub u_1: MuMatrix,
    pub m_2: MuMatrix,
}

impl EncoderBlockMu {
    /// The block from its ten matrices in draw order (U_att, M_q, M_k, M_v, U_o, M_o, U_0, M_1,
    /// U_1, M_2) and its merged LayerNorms.
    pub fn new(mats: [MuMatrix; 10], ln_attn: MergedLn, ln_mlp: MergedLn) -> Self {
        let [u_att, m_q, m_k, m_v, u_o, m_o, u_0, m_1, u_1, m_2] = mats;
        Self {
            ln_attn,
            u_att,
            m_q,
            m_k,
            m_v,
            u_o,
            m_o,
            ln_mlp,
            u_0,
            m_1,
            u_1,
            m_2,
        }
    }

    fn mus(&self) -> [&MuMatrix; 10] {
        [
            &self.u_att,
            &self.m_q,
            &self.m_k,
            &self.m_v,
            &self.u_o,
            &self.m_o,
            &self.u_0,
            &self.m_1,
            &self.u_1,
            &self.m_2,
        ]
    }

    /// Every trainable tensor: each sub-block's matrices with its LayerNorm before them
    /// (pre-LN) or after them (post-LN).
    pub fn params(&self, norm: Norm) -> Vec<Tensor> {
        let mus = self.mus();
        let mut v = Vec::new();
        for (ln, mats) in [(&self.ln_attn, &mus[..6]), (&self.ln_mlp, &mus[6..])] {
            if norm == Norm::Pre {
                v.extend(ln.params());
            }
            v.extend(mats.iter().flat_map(|m| m.params()));
            if norm == Norm::Post {
                v.extend(ln.params());
            }
        }
        v
    }

    pub fn move_to(&mut self, device: Device) {
        self.ln_attn.move_to(device);
        self.ln_mlp.move_to(device);
        for m in [
            &mut self.u_att,
            &mut self.m_q,
            &mut self.m_k,
            &mut self.m_v,
            &mut self.u_o,
            &mut self.m_o,
            &mut self.u_0,
            &mut self.m_1,
            &mut self.u_1,
            &mut self.m_2,
        ] {
            m.to_device(device);
        }
    }
}
