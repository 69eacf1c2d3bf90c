//! FS-Merge of ViTs in one process: the originals (`fsmerge train`), the teacher features, the
//! losses (method.md §9: id-sliced or all-slice output reconstruction, optional inner attention
//! terms; local block problems) and the training phases, each through the one `optim::Run` loop.

use crate::core::eval::accuracy;
use crate::core::linear::{stacked_heads, Linear};
use crate::core::loss::{own_mask, reconstruction_loss};
use crate::core::tensor::{chunked, CHUNK};
use crate::data::merge_set::MergeSet;
use crate::families::vit::model::Vit;
use crate::families::vit::supernet::VitSuperNet;
use crate::train::optim::OriginalSpec;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{TrainSettings, GLOBAL_SEED_OFFSET};
use fsmerge_common::config::{StepForm, Targets};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::Result;
use tch::{Kind, Tensor};

/// Flat square grey images [N, s²] as the ViT's pixels [N, 1, s, s].
pub fn images(x: &Tensor) -> Tensor {
    let side = (x.size()[1] as f64).sqrt().round() as i64;
    x.view([-1, 1, side, side])
}

/// A merged ViT: one encoder and one linear head per task (its read-out folded in).
pub struct MergedVit {
    pub vit: Vit,
    pub heads: Vec<Linear>,
}

impl MergedVit {
    /// Every task's logits for flat images [N, 784].
    pub fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        let pooled = chunked(x, 0, |c| self.vit.pooled(&images(c)));
        self.heads.iter().map(|h| h.forward(&pooled)).collect()
    }

    /// One standard `ViTForImageClassification` whose classifier is every task's head stacked
    /// (joint prediction = argmax; task t = its slice of the logits).
    pub fn joint_checkpoint(&self) -> Vit {
        let mut vit = self.vit.copy();
        vit.classifier = Some(stacked_heads(&self.heads));
        vit
    }
}

/// Model t's logits on its own head, for flat images.
pub fn original_logits(model: &Vit, x: &Tensor) -> Tensor {
    chunked(x, 0, |c| {
        let pooled = model.pooled(&images(c));
        model
            .classifier
            .as_ref()
            .map_or(pooled.shallow_clone(), |h| h.forward(&pooled))
    })
}

/// Decoupled weight decay of the originals' AdamW (a common ViT setting).
const ORIGINAL_WEIGHT_DECAY: f64 = 0.05;

/// Train one original ViT from its own seed: AdamW + OneCycle, cross-entropy. Returns the
/// model, its validation accuracy and the training log.
pub fn train_original(
    config: VitConfig,
    spec: &OriginalSpec,
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    progress: &dyn Progress,
) -> Result<(Vit, f64, Vec<LogRow>)> {
    tch::manual_seed(spec.seed as i64);
    let model = Vit::init(config, spec.classes);
    let params = model.params();
    for p in &params {
        let _ = p.set_requires_grad(true);
    }
    let log = spec.fit(&params, ORIGINAL_WEIGHT_DECAY, train, progress, |x| {
        original_logits(&model, x)
    })?;
    let frozen = model.copy();
    let val_acc = tch::no_grad(|| accuracy(&original_logits(&frozen, val.0), val.1));
    Ok((frozen, val_acc, log))
}

/// One model's `Vit::trace` of a chunk: hidden states and attention-branch outputs.
type Trace = (Vec<Tensor>, Vec<Tensor>);

/// What the originals compute on the merge data.
pub struct VitTeacher {
    /// Every model's pooled output ([CLS] after the final LayerNorm) on every input [n, N, d].
    pub pooled: Tensor,
    /// Local modes: every model's stream at every block boundary [n, N, T, d] (0 = embeddings).
    pub stream: Vec<Tensor>,
    /// Inner terms: the input's own model's attention-branch output of each listed block
    /// [N, T, d], and each model's mean |·| of it on its own task's inputs [n] (the `l1` scale).
    pub inner: Vec<(Tensor, Tensor)>,
}

impl VitTeacher {
    pub fn new(models: &[&Vit], set: &MergeSet, with_stream: bool, inner: &[usize]) -> Self {
        tch::no_grad(|| {
            let x = &set.x;
            let n = models.len();
            let mut pooled = Vec::new();
            let mut stream: Vec<Vec<Tensor>> = Vec::new();
            let mut attn: Vec<Vec<Tensor>> = Vec::new();
            for m in models {
                pooled.push(chunked(x, 0, |c| m.pooled(&images(c))));
                if with_stream || !inner.is_empty() {
                    let traced: Vec<Trace> = (0..x.size()[0])
                        .step_by(CHUNK as usize)
                        .map(|s| m.trace(&images(&x.narrow(0, s, CHUNK.min(x.size()[0] - s)))))
                        .collect();
                    let cat = |pick: &dyn Fn(&Trace) -> Tensor| {
                        Tensor::cat(&traced.iter().map(pick).collect::<Vec<_>>(), 0)
                    };
                    if with_stream {
                        let depth = traced[0].0.len();
                        stream.push(
                            (0..depth)
                                .map(|l| cat(&|t| t.0[l].shallow_clone()))
                                .collect(),
                        );
                    }
                    attn.push(
                        inner
                            .iter()
                            .map(|&l| cat(&|t| t.1[l].shallow_clone()))
                            .collect(),
                    );
                }
            }
            let stack = |v: Vec<Tensor>| Tensor::stack(&v, 0);
            let stream = if with_stream {
                (0..stream[0].len())
                    .map(|l| stack(stream.iter().map(|s| s[l].shallow_clone()).collect()))
                    .collect()
            } else {
                Vec::new()
            };
            let inner = (0..inner.len())
                .map(|j| {
                    let all = stack(attn.iter().map(|a| a[j].shallow_clone()).collect());
                    let own = Tensor::cat(
                        &(0..n)
                            .map(|t| {
                                let r = set.task_range(t);
                                all.get(t as i64).narrow(0, r.start as i64, r.len() as i64)
                            })
                            .collect::<Vec<_>>(),
                        0,
                    );
                    let scale = Tensor::stack(
                        &(0..n)
                            .map(|t| {
                                let r = set.task_range(t);
                                own.narrow(0, r.start as i64, r.len() as i64)
                                    .abs()
                                    .mean(Kind::Float)
                                    .clamp_min(1e-12)
                            })
                            .collect::<Vec<_>>(),
                        0,
                    );
                    (own, scale)
                })
                .collect();
            Self {
                pooled: stack(pooled),
                stream,
                inner,
            }
        })
    }
}

/// One block's inner-feature term (method.md §9.2) on a batch: the SuperNet's attention
/// branches `r` [n, B·T, d] against each input's own model's `g` [B, T, d], the input's own
/// slice only, scaled by its model's mean |g| (`scale` [n]) and by `weight`:
/// `weight · mean_b[mean_{T,d}(G − Ĝ)² / s_t]`.
pub fn inner_term(
    r: &Tensor,
    g: &Tensor,
    scale: &Tensor,
    task: &Tensor,
    n: i64,
    weight: f64,
) -> Tensor {
    let b = g.size()[0];
    let per = (r.view([n, b, -1]) - g.view([1, b, -1]))
        .square()
        .mean_dim(2, false, Kind::Float);
    let own = (per * own_mask(task, n as usize)).sum_dim_intlist(0, false, Kind::Float);
    (own / scale.index_select(0, task)).mean(Kind::Float) * weight
}

/// The losses of a ViT SuperNet on the merge data.
pub struct VitLoss<'a> {
    pub sn: &'a VitSuperNet,
    pub teacher: &'a VitTeacher,
    pub set: &'a MergeSet,
    pub targets: Targets,
    pub form: StepForm,
    pub inner_layers: &'a [usize],
    pub inner_weight: f64,
    pub res_consistency: f64,
}

impl VitLoss<'_> {
    fn mask(&self, idx: &Tensor) -> Option<Tensor> {
        (self.targets == Targets::Own)
            .then(|| own_mask(&self.set.task.index_select(0, idx), self.sn.n()))
    }

    /// Global loss of the samples `idx`: output reconstruction (method.md §9.1) plus
    /// Σ_l w · mean_b[mean_{T,d}(G_{l,t} − Ĝ_{l,t})² / s_{l,t}] over `inner_layers` (§9.2).
    pub fn global(&self, idx: &Tensor) -> Tensor {
        let x = images(&self.set.x.index_select(0, idx));
        let (pred, branches) = self.sn.forward(&x, self.form, self.inner_layers);
        let mut loss = reconstruction_loss(
            &pred,
            &self.teacher.pooled.index_select(1, idx),
            self.mask(idx).as_ref(),
        );
        let task = self.set.task.index_select(0, idx);
        let n = self.sn.n() as i64;
        for (r, (g, scale)) in branches.iter().zip(&self.teacher.inner) {
            loss += inner_term(
                r,
                &g.index_select(0, idx),
                scale,
                &task,
                n,
                self.inner_weight,
            );
        }
        loss
    }

    /// Local loss of the samples `idx`: every block's problem (its reconstruction of the next
    /// boundary through U_res, plus the residual round-trip drift weighted by
    /// `res_consistency`) and the output's problem, summed: each problem's own M/U get their
    /// own gradient, the shared M_res/U_res the sum over problems.
    pub fn local(&self, idx: &Tensor) -> Tensor {
        let mask = self.mask(idx);
        let stream = &self.teacher.stream;
        // `train_local` checks there are ≥ 2 boundaries.
        let depth = stream.len().saturating_sub(1);
        let n = self.sn.n() as i64;
        let b = idx.size()[0];
        let mut loss = Tensor::zeros([], (Kind::Float, idx.device()));
        for l in 0..depth {
            let (pred, drift) = self
                .sn
                .local_block(l, &stream[l].index_select(1, idx), self.form);
            let target = stream[l + 1].index_select(1, idx).view([n, b, -1]);
            loss = loss
                + reconstruction_loss(&pred.view([n, b, -1]), &target, mask.as_ref())
                + drift * self.res_consistency;
        }
        let cls = stream[depth].index_select(1, idx).select(2, 0);
        loss + reconstruction_loss(
            &self.sn.local_output(&cls),
            &self.teacher.pooled.index_select(1, idx),
            mask.as_ref(),
        )
    }
}

/// Train the SuperNet's local problems together (one step of every problem per batch).
pub fn train_local(
    loss: &VitLoss,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    if loss.teacher.stream.len() < 2 {
        return Err(fsmerge_common::Error::Compute(
            "local training needs the originals' streams: build the teacher with streams".into(),
        ));
    }
    s.run("local", loss.set.len(), s.seed).optimise(
        &loss.sn.local_params(),
        loss.set.len(),
        progress,
        |idx| loss.local(idx),
    )
}

/// Train the whole SuperNet end to end (method.md §9.1).
pub fn train_global(
    loss: &VitLoss,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    s.run(
        "global",
        loss.set.len(),
        s.seed.wrapping_add(GLOBAL_SEED_OFFSET),
    )
    .optimise(&loss.sn.global_params(), loss.set.len(), progress, |idx| {
        loss.global(idx)
    })
}
