//! Merge (M) and unmerge (U) matrices in the parametrisations of method.md §3.2, in the code's
//! row-vector convention: a merge maps per-model vectors [n, R, k] to merged [R, k'] as
//! Σ_i y_i M_i, an unmerge maps merged [R, k'] to per-model [n, R, k] as x U_i. Here k' = k.
//!
//! Shapes of the trainable tensors:
//! - merge: diag [n, k]; low-rank a [n·k, r], b [r, k]; full [n·k, k]
//! - unmerge: diag [n, k]; low-rank a [k, r], b [r, n·k]; full [k, n·k]
//! - att_heads (method.md §5.6, H heads of size d_h): merge m1 [n, H, d_h, d_h], m2 [n, H, H];
//!   unmerge u1 [H, d_h, d_h] (shared by the models), u2 [n, H, H]

use crate::core::linear::Linear;
use crate::core::tensor::{f32, F32};
use fsmerge_common::config::{Init, MuType};
use fsmerge_common::{Error, Result};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Merge,
    Unmerge,
}

/// Low-rank factors' scale for the zero/random (LoRA-style) init (`LOW_RANK_FACTOR`).
const LOW_RANK_FACTOR: f64 = 0.1;

/// One M or U; which parts (diagonal, low-rank factors, full) it has follows its type.
pub struct MuMatrix {
    role: Role,
    n: usize,
    k: usize,
    rank: usize,
    diag: Option<Tensor>,
    lr: Option<(Tensor, Tensor)>,
    full: Option<Tensor>,
    /// att_heads: (per-head blocks, head-mixing scalars) and the number of heads.
    heads: Option<(Tensor, Tensor, usize)>,
}

impl MuMatrix {
    /// Create and initialise (method.md §3.3). `first` and `average` need a full-rank part, so
    /// a pure low-rank matrix only takes `random`.
    pub fn new(
        role: Role,
        mu_type: MuType,
        init: Init,
        n: usize,
        k: usize,
        rank: usize,
    ) -> Result<Self> {
        let (ni, ki, ri) = (n as i64, k as i64, rank as i64);
        let s = 1.0 / (k as f64).sqrt();
        let diag_init = |init: Init| -> Tensor {
            match (role, init) {
                (Role::Merge, Init::First) => {
                    let d = Tensor::zeros([ni, ki], F32);
                    let _ = d.get(0).fill_(1.0);
                    d
                }
                (Role::Merge, Init::Average) => Tensor::full([ni, ki], 1.0 / n as f64, F32),
                (Role::Merge, Init::Random) => {
                    Tensor::randn([ni, ki], F32) * (s / (n as f64).sqrt())
                }
                (Role::Unmerge, Init::First | Init::Average) => Tensor::ones([ni, ki], F32),
                (Role::Unmerge, Init::Random) => Tensor::randn([ni, ki], F32) * s,
            }
        };
        let lr_shapes = match role {
            Role::Merge => ([ni * ki, ri], [ri, ki]),
            Role::Unmerge => ([ki, ri], [ri, ni * ki]),
        };
        let random_factors = || {
            let scale = s / (rank as f64).sqrt();
            (
                Tensor::randn(lr_shapes.0, F32) * scale,
                Tensor::randn(lr_shapes.1, F32) * scale,
            )
        };
        let mut m = Self {
            role,
            n,
            k,
            rank,
            diag: None,
            lr: None,
            full: None,
            heads: None,
        };
        match mu_type {
            MuType::Diagonal => m.diag = Some(diag_init(init)),
            // Outside attention, att_heads falls back to diagonal + low rank (method.md §5.5).
            MuType::DiagonalAndLowRank | MuType::AttHeads => match init {
                Init::Random => {
                    m.diag = Some(Tensor::zeros([ni, ki], F32));
                    m.lr = Some(random_factors());
                }
                _ => {
                    m.diag = Some(diag_init(init));
                    let b = Tensor::randn(lr_shapes.1, F32) * (LOW_RANK_FACTOR * s / rank as f64);
                    m.lr = Some((Tensor::zeros(lr_shapes.0, F32), b));
                }
            },
            MuType::LowRank => {
                if init != Init::Random {
                    return Err(Error::field(
                        "merge.init",
                        format!("a pure low_rank M/U cannot express `{init:?}` init; use `random`")
                            .to_lowercase(),
                    ));
                }
                m.lr = Some(random_factors());
            }
            MuType::Full => {
                let eye = Tensor::eye(ki, F32);
                m.full = Some(match (role, init) {
                    (Role::Merge, Init::First) => Tensor::cat(
                        &std::iter::once(eye)
                            .chain((1..n).map(|_| Tensor::zeros([ki, ki], F32)))
                            .collect::<Vec<_>>(),
                        0,
                    ),
                    (Role::Merge, Init::Average) => {
                        Tensor::cat(&(0..n).map(|_| &eye / n as f64).collect::<Vec<_>>(), 0)
                    }
                    (Role::Merge, Init::Random) => {
                        Tensor::randn([ni * ki, ki], F32) * (s / n as f64)
                    }
                    (Role::Unmerge, Init::First | Init::Average) => {
                        Tensor::cat(&(0..n).map(|_| eye.shallow_clone()).collect::<Vec<_>>(), 1)
                    }
                    (Role::Unmerge, Init::Random) => Tensor::randn([ki, ni * ki], F32) * s,
                });
            }
        }
        for p in m.params() {
            let _ = p.set_requires_grad(true);
        }
        Ok(m)
    }

    /// An attention M/U of width k = heads·d_h: `att_heads` gets the per-head structure
    /// (`first` init: M_1[0, j] = I, M_1[i>0, j] = 0, M_2[i] = I_H; U_1[j] = I, U_2[i] = I_H);
    /// every other type is `new`.
    pub fn attention(
        role: Role,
        mu_type: MuType,
        init: Init,
        n: usize,
        k: usize,
        rank: usize,
        heads: usize,
    ) -> Result<Self> {
        if mu_type != MuType::AttHeads {
            return Self::new(role, mu_type, init, n, k, rank);
        }
        if init != Init::First || heads == 0 || !k.is_multiple_of(heads) {
            return Err(Error::field(
                "merge.init",
                format!("att_heads needs `first` init and a width ({k}) divisible by the heads ({heads})"),
            ));
        }
        let (ni, hi, dh) = (n as i64, heads as i64, (k / heads) as i64);
        let eye_h = Tensor::eye(hi, F32).expand([ni, hi, hi], false).copy();
        let eye_d = Tensor::eye(dh, F32);
        let blocks = match role {
            Role::Merge => {
                let b = Tensor::zeros([ni, hi, dh, dh], F32);
                b.get(0).copy_(&eye_d.expand([hi, dh, dh], false));
                b
            }
            Role::Unmerge => eye_d.expand([hi, dh, dh], false).copy(),
        };
        let m = Self {
            role,
            n,
            k,
            rank,
            diag: None,
            lr: None,
            full: None,
            heads: Some((blocks, eye_h, heads)),
        };
        for p in m.params() {
            let _ = p.set_requires_grad(true);
        }
        Ok(m)
    }

    /// The trainable tensors (shallow handles).
    pub fn params(&self) -> Vec<Tensor> {
        let mut v: Vec<Tensor> = Vec::new();
        if let Some(d) = &self.diag {
            v.push(d.shallow_clone());
        }
        if let Some((a, b)) = &self.lr {
            v.push(a.shallow_clone());
            v.push(b.shallow_clone());
        }
        if let Some(f) = &self.full {
            v.push(f.shallow_clone());
        }
        if let Some((b, mix, _)) = &self.heads {
            v.push(b.shallow_clone());
            v.push(mix.shallow_clone());
        }
        v
    }

    fn dims(&self) -> (i64, i64, i64) {
        (self.n as i64, self.k as i64, self.rank as i64)
    }

    /// Per-model blocks of a full matrix: merge [n, k, k'] (M_i), unmerge [n, k', k] (U_i).
    fn full_blocks(&self, f: &Tensor) -> Tensor {
        let (n, k, _) = self.dims();
        match self.role {
            Role::Merge => f.view([n, k, k]),
            Role::Unmerge => f.view([k, n, k]).permute([1, 0, 2]),
        }
    }

    /// Dense per-model blocks of an att_heads matrix, laid out as `full_blocks`:
    /// block_i[(j, a), (j', b)] = B[j, a, b] · mix_i[j, j'] (B = M_1[i] or the shared U_1).
    fn head_blocks(&self, blocks: &Tensor, mix: &Tensor, heads: usize) -> Tensor {
        let (n, k, _) = self.dims();
        let (h, dh) = (heads as i64, k / heads as i64);
        let b = match self.role {
            Role::Merge => blocks.view([n, h, dh, 1, dh]),
            Role::Unmerge => blocks.view([1, h, dh, 1, dh]),
        };
        (b * mix.view([n, h, 1, h, 1])).view([n, k, k])
    }

    /// Per-model low-rank factor blocks: merge a_i [n, k, r]; unmerge b_i [n, r, k].
    fn lr_blocks(&self, t: &Tensor) -> Tensor {
        let (n, k, r) = self.dims();
        match self.role {
            Role::Merge => t.view([n, k, r]),
            Role::Unmerge => t.view([r, n, k]).permute([1, 0, 2]),
        }
    }

    /// Sum of the parts' contributions: `diag(d)`, `low_rank(a, b)` and `dense(blocks)` for the
    /// parts this matrix has (the constructor guarantees at least one); `blocks` are the
    /// per-model dense blocks of a `full` or `att_heads` part (merge [n, k, k'], unmerge [n, k', k]).
    fn combine(
        &self,
        diag: impl Fn(&Tensor) -> Tensor,
        low_rank: impl Fn(&Tensor, &Tensor) -> Tensor,
        dense: impl Fn(&Tensor) -> Tensor,
    ) -> Tensor {
        [
            self.diag.as_ref().map(diag),
            self.lr.as_ref().map(|(a, b)| low_rank(a, b)),
            self.full.as_ref().map(|f| dense(&self.full_blocks(f))),
            self.heads
                .as_ref()
                .map(|(b, mix, h)| dense(&self.head_blocks(b, mix, *h))),
        ]
        .into_iter()
        .flatten()
        .reduce(|acc, t| acc + t)
        .unwrap_or_else(|| Tensor::zeros([0], F32))
    }

    /// Merge: Σ_i y_i M_i for y [n, R, k] → [R, k'].
    pub fn merge(&self, y: &Tensor) -> Tensor {
        debug_assert_eq!(self.role, Role::Merge);
        let y = &f32(y);
        let sum0 = |t: Tensor| t.sum_dim_intlist(0, false, None);
        self.combine(
            |d| sum0(y * d.unsqueeze(1)),
            |a, b| sum0(y.bmm(&self.lr_blocks(a))).matmul(b),
            |f| sum0(y.bmm(f)),
        )
    }

    /// Unmerge: x U_i for x [R, k'] → [n, R, k].
    pub fn unmerge(&self, x: &Tensor) -> Tensor {
        debug_assert_eq!(self.role, Role::Unmerge);
        let x = &f32(x);
        self.combine(
            |d| x.unsqueeze(0) * d.unsqueeze(1),
            |a, b| x.matmul(a).unsqueeze(0).matmul(&self.lr_blocks(b)),
            |f| x.unsqueeze(0).matmul(f),
        )
    }

    /// The unmerge pushed into per-model weights wt [n, k, C] (W_iᵀ), as a sum of parts
    /// `(left, P)` with x U_i wt_i = Σ_parts (x·left) P_i, `left` None meaning identity:
    /// diagonal → (I, u_i ⊙ wt_i); low-rank → (A, B_i wt_i); full → (I, U_i wt_i).
    /// Folding never forms the k×k products A·B_i, so a low-rank unmerge costs n·r·k·C.
    pub fn push_into(&self, wt: &Tensor) -> Vec<(Option<Tensor>, Tensor)> {
        debug_assert_eq!(self.role, Role::Unmerge);
        let wt = &f32(wt);
        let mut parts = Vec::new();
        if let Some(d) = &self.diag {
            parts.push((None, wt * d.unsqueeze(2)));
        }
        if let Some((a, b)) = &self.lr {
            parts.push((Some(a.shallow_clone()), self.lr_blocks(b).bmm(wt)));
        }
        if let Some(f) = &self.full {
            parts.push((None, self.full_blocks(f).bmm(wt)));
        }
        if let Some((b, mix, h)) = &self.heads {
            parts.push((None, self.head_blocks(b, mix, *h).bmm(wt)));
        }
        parts
    }

    /// Move the trainable tensors to `device` (they stay leaves that require grad).
    pub fn to_device(&mut self, device: tch::Device) {
        let mv = |t: &mut Tensor| *t = t.detach().to_device(device).set_requires_grad(true);
        if let Some(d) = &mut self.diag {
            mv(d);
        }
        if let Some((a, b)) = &mut self.lr {
            mv(a);
            mv(b);
        }
        if let Some(f) = &mut self.full {
            mv(f);
        }
        if let Some((b, mix, _)) = &mut self.heads {
            mv(b);
            mv(mix);
        }
    }

    /// Whether this matrix has a dense (full or att_heads) part, whose fold costs n·k³.
    pub fn is_full(&self) -> bool {
        self.full.is_some() || self.heads.is_some()
    }

    /// Task t's classifier reading this read-out U_final's block t: W_t U_final⁽ᵗ⁾ (detached),
    /// the bias unchanged. What a task's head becomes when the SuperNet folds.
    pub fn fold_into_head(&self, t: usize, classifier: &Linear) -> Linear {
        tch::no_grad(|| Linear {
            w: classifier.w.matmul(&self.block(t).tr()),
            b: classifier.b.detach().copy(),
        })
    }

    /// Dense block of model i: merge M_i [k, k'], unmerge U_i [k', k].
    pub fn block(&self, i: usize) -> Tensor {
        let i = i as i64;
        self.combine(
            |d| d.get(i).diag_embed(0, -2, -1),
            |a, b| match self.role {
                Role::Merge => self.lr_blocks(a).get(i).matmul(b),
                Role::Unmerge => a.matmul(&self.lr_blocks(b).get(i)),
            },
            |f| f.get(i),
        )
    }

    /// The whole matrix in code layout: merge [n·k, k'], unmerge [k', n·k].
    pub fn dense(&self) -> Tensor {
        let blocks: Vec<Tensor> = (0..self.n).map(|i| self.block(i)).collect();
        match self.role {
            Role::Merge => Tensor::cat(&blocks, 0),
            Role::Unmerge => Tensor::cat(&blocks, 1),
        }
    }
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
