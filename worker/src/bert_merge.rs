//! FS-Merge of BERTs in one process: the originals (`fsmerge train` on the text tasks), the
//! teacher (every model's pooled output on the merge data), the global loss (method.md §9.1 on
//! the pooler's output) and its training phase, through the one `optim::Run` loop. Text rows
//! hold token ids as f32 (`text_data`); `[PAD]` = 0 is what the attention mask hides.

use crate::bert::Bert;
use crate::bert_supernet::BertSuperNet;
use crate::merge_data::MergeSet;
use crate::mlp::{accuracy, stacked_heads, Linear};
use crate::optim::OriginalSpec;
use crate::progress::{LogRow, Progress};
use crate::supernet::{own_mask, reconstruction_loss};
use crate::train_merge::TrainSettings;
use crate::vit_merge::{chunked, GLOBAL_SEED_OFFSET};
use fsmerge_common::config::{StepForm, Targets};
use fsmerge_common::hf::BertConfig;
use fsmerge_common::Result;
use tch::{Kind, Tensor};

/// Token ids [N, T] (i64) and their attention mask (1 = token, 0 = `[PAD]`) of text rows.
pub fn tokens(x: &Tensor) -> (Tensor, Tensor) {
    let ids = x.to_kind(Kind::Int64);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    (ids, mask)
}

/// The pooler's output of `model` on text rows [N, T] (in chunks): what a sequence classifier
/// reads and FS-Merge reconstructs. A BERT without a pooler reads `[CLS]` of the last state.
pub fn pooled(model: &Bert, x: &Tensor) -> Tensor {
    chunked(x, 0, |c| {
        let (ids, mask) = tokens(c);
        model.pooled(&ids, &mask).unwrap_or_else(|| {
            model
                .forward(&ids, &mask)
                .pop()
                .map_or_else(|| ids.zeros_like(), |h| h.select(1, 0))
        })
    })
}

/// Model t's logits on its own classifier, for text rows.
pub fn original_logits(model: &Bert, x: &Tensor) -> Tensor {
    let p = pooled(model, x);
    match &model.classifier {
        Some(c) => c.forward(&p),
        None => p,
    }
}

/// A merged BERT: one encoder with its pooler and one linear head per task (its read-out
/// folded in).
pub struct MergedBert {
    pub bert: Bert,
    pub heads: Vec<Linear>,
}

impl MergedBert {
    /// Every task's logits for text rows [N, T].
    pub fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        let p = pooled(&self.bert, x);
        self.heads.iter().map(|h| h.forward(&p)).collect()
    }

    /// One standard `BertForSequenceClassification` whose classifier is every task's head
    /// stacked (joint prediction = argmax; task t = its slice of the logits).
    pub fn joint_checkpoint(&self) -> Bert {
        let mut bert = self.bert.copy();
        bert.classifier = Some(stacked_heads(&self.heads));
        bert
    }
}

/// Decoupled weight decay of the originals' AdamW (BERT's usual 0.01).
const ORIGINAL_WEIGHT_DECAY: f64 = 0.01;

/// Train one original BERT from its own seed (transformers' init, a classifier on the pooled
/// output): AdamW + OneCycle, cross-entropy. Returns the model, its validation accuracy and the
/// training log.
pub fn train_original(
    config: BertConfig,
    spec: &OriginalSpec,
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    progress: &dyn Progress,
) -> Result<(Bert, f64, Vec<LogRow>)> {
    tch::manual_seed(spec.seed as i64);
    let d = config.hidden_size as i64;
    let mut model = Bert::init(config);
    model.classifier = Some(Linear {
        w: Tensor::randn([spec.classes as i64, d], crate::tensor::F32) * 0.02,
        b: Tensor::zeros([spec.classes as i64], crate::tensor::F32),
    });
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

/// Every model's pooled output on every merge input [n, N, d]: the reconstruction targets.
pub fn teacher(models: &[&Bert], set: &MergeSet) -> Tensor {
    tch::no_grad(|| {
        let all: Vec<Tensor> = models.iter().map(|m| pooled(m, &set.x)).collect();
        Tensor::stack(&all, 0)
    })
}

/// The global loss of a BERT SuperNet on the merge data.
pub struct BertLoss<'a> {
    pub sn: &'a BertSuperNet,
    /// The teacher's pooled outputs [n, N, d].
    pub pooled: &'a Tensor,
    pub set: &'a MergeSet,
    pub targets: Targets,
    pub form: StepForm,
}

impl BertLoss<'_> {
    /// Output reconstruction of the samples `idx` (id-sliced with `own` targets).
    pub fn global(&self, idx: &Tensor) -> Tensor {
        let (ids, mask) = tokens(&self.set.x.index_select(0, idx));
        let pred = self.sn.forward(&ids, &mask, self.form);
        let own = (self.targets == Targets::Own)
            .then(|| own_mask(&self.set.task.index_select(0, idx), self.sn.frozen.n));
        reconstruction_loss(&pred, &self.pooled.index_select(1, idx), own.as_ref())
    }
}

/// Train the whole SuperNet end to end (method.md §9.1), seeded as the ViT's global phase.
pub fn train_global(
    loss: &BertLoss,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    s.run(
        "global",
        loss.set.len(),
        s.seed.wrapping_add(GLOBAL_SEED_OFFSET),
    )
    .optimise(&loss.sn.params(), loss.set.len(), progress, |idx| {
        loss.global(idx)
    })
}
