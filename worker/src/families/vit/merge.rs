//! FS-Merge of ViTs in one process: the originals (`fsmerge train`), the teacher features, the
//! losses (method.md §9: id-sliced or all-slice output reconstruction, optional inner attention
//! terms; local block problems) and the training phases, each through the one `optim::Run` loop.

use crate::core::loss::own_mask;
use crate::core::tensor::chunked;
use crate::families::vit::model::Vit;
use crate::train::optim::{Classifier, OriginalSpec};
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::Result;
use tch::{Kind, Tensor};

/// Flat square images [N, c·s²] (channels first, as the processors write them) as the ViT's
/// pixels [N, c, s, s].
pub fn images(x: &Tensor, channels: usize) -> Tensor {
    let c = channels.max(1) as i64;
    let side = ((x.size()[1] / c) as f64).sqrt().round() as i64;
    x.view([-1, c, side, side])
}

/// Model t's logits on its own head, for flat images.
pub fn original_logits(model: &Vit, x: &Tensor) -> Tensor {
    chunked(x, 0, |c| {
        let pooled = model.pooled(&images(c, model.cfg.num_channels));
        model
            .classifier
            .as_ref()
            .map_or(pooled.shallow_clone(), |h| h.forward(&pooled))
    })
}

/// Decoupled weight decay of the originals' AdamW (a common ViT setting).
pub const ORIGINAL_WEIGHT_DECAY: f64 = 0.05;

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

impl Classifier for Vit {
    fn params(&self) -> Vec<Tensor> {
        Vit::params(self)
    }
    fn logits(&self, x: &Tensor) -> Tensor {
        original_logits(self, x)
    }
    fn frozen(&self) -> Self {
        self.copy()
    }
}

/// Train one original ViT from its own seed: AdamW + OneCycle, cross-entropy. Returns the
/// model, its validation accuracy and the training log.
pub fn train_original(
    config: VitConfig,
    spec: &OriginalSpec,
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    progress: &dyn Progress,
) -> Result<(Vit, f64, Vec<LogRow>)> {
    let classes = spec.classes;
    spec.train(
        ORIGINAL_WEIGHT_DECAY,
        || Vit::init(config, classes),
        train,
        val,
        progress,
    )
}
