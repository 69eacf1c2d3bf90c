//! FS-Merge of BERTs in one process: the originals (`fsmerge train` on the text tasks), the
//! teacher (every model's pooled output on the merge data, and in local modes its stream after
//! every unit), the losses (method.md §9.1 on the pooler's output; local unit problems) and the
//! training phases, through the one `optim::Run` loop. Text rows
//! hold token ids as f32 (`data::text`); `[PAD]` = 0 is what the attention mask hides.

use crate::core::eval::accuracy;
use crate::core::linear::{stacked_heads, Linear};
use crate::core::loss::{own_mask, reconstruction_loss};
use crate::core::tensor::{chunked, CHUNK};
use crate::data::merge_set::MergeSet;
use crate::families::bert::model::Bert;
use crate::families::bert::supernet::BertSuperNet;
use crate::train::optim::OriginalSpec;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{TrainSettings, GLOBAL_SEED_OFFSET};
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
        let last = model.forward(&ids, &mask).pop();
        last.map_or_else(|| ids.zeros_like(), |h| pool_last(model, &h))
    })
}

/// The pooled output from the last hidden state [N, T, d]: tanh(pooler(h[CLS])), or h[CLS]
/// without a pooler.
fn pool_last(model: &Bert, last: &Tensor) -> Tensor {
    let cls = last.select(1, 0);
    match &model.pooler {
        Some(p) => p.forward(&cls).tanh(),
        None => cls,
    }
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
        w: Tensor::randn([spec.classes as i64, d], crate::core::tensor::F32) * 0.02,
        b: Tensor::zeros([spec.classes as i64], crate::core::tensor::F32),
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

/// What the originals compute on the merge data.
pub struct BertTeacher {
    /// Every model's pooled output on every input [n, N, d]: the reconstruction targets.
    pub pooled: Tensor,
    /// Local modes: every model's hidden state after each unit [n, N, T, d] (0 = embeddings).
    pub stream: Vec<Tensor>,
}

impl BertTeacher {
    pub fn new(models: &[&Bert], set: &MergeSet, with_stream: bool) -> Self {
        tch::no_grad(|| {
            let stream: Vec<Tensor> = if with_stream {
                // Per model, every chunk's hidden states; then per unit, all rows of all models.
                let n_rows = set.x.size()[0];
                let states: Vec<Vec<Vec<Tensor>>> = models
                    .iter()
                    .map(|m| {
                        (0..n_rows)
                            .step_by(CHUNK as usize)
                            .map(|s| {
                                let (ids, mask) =
                                    tokens(&set.x.narrow(0, s, CHUNK.min(n_rows - s)));
                                m.forward(&ids, &mask)
                            })
                            .collect()
                    })
                    .collect();
                (0..models[0].blocks.len() + 1)
                    .map(|l| {
                        let per_model: Vec<Tensor> = states
                            .iter()
                            .map(|chunks| {
                                Tensor::cat(
                                    &chunks
                                        .iter()
                                        .map(|c| c[l].shallow_clone())
                                        .collect::<Vec<_>>(),
                                    0,
                                )
                            })
                            .collect();
                        Tensor::stack(&per_model, 0)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            // With streams, the pooled outputs come from their last state (no second pass).
            let pooled: Vec<Tensor> = models
                .iter()
                .enumerate()
                .map(|(i, m)| match stream.last() {
                    Some(last) => pool_last(m, &last.get(i as i64)),
                    None => pooled(m, &set.x),
                })
                .collect();
            Self {
                pooled: Tensor::stack(&pooled, 0),
                stream,
            }
        })
    }
}

/// Reconstruction of token states [n, B, T, d] over the real tokens only (`tokens` [B, T], 1 =
/// token): each text's mean over its real tokens, then the mean over texts, so every text weighs
/// the same whatever its length, and a batch's loss is the mean of its samples' (replicas that
/// split a batch by rows sum to it exactly). `all` averages every model's slice, `own` (one-hot
/// [n, B]) takes each input's own model's.
fn token_loss(pred: &Tensor, target: &Tensor, tokens: &Tensor, own: Option<&Tensor>) -> Tensor {
    let (n, b, _, d) = pred.size4().unwrap_or((0, 0, 0, 0));
    let weight = tokens.to_kind(Kind::Float);
    let per_text = weight.sum_dim_intlist(1, false, None).clamp_min(1.0) * d as f64;
    // Σ over tokens and features, per model and text: [n, B].
    let sq = ((pred - target).square() * weight.unsqueeze(0).unsqueeze(-1)).sum_dim_intlist(
        [2, 3].as_slice(),
        false,
        None,
    ) / per_text.unsqueeze(0);
    match own {
        None => sq.sum(Kind::Float) / (b * n) as f64,
        Some(m) => (sq * m).sum(Kind::Float) / b as f64,
    }
}

/// The losses of a BERT SuperNet on the merge data.
pub struct BertLoss<'a> {
    pub sn: &'a BertSuperNet,
    pub teacher: &'a BertTeacher,
    pub set: &'a MergeSet,
    pub targets: Targets,
    pub form: StepForm,
    pub res_consistency: f64,
}

impl BertLoss<'_> {
    fn own(&self, idx: &Tensor) -> Option<Tensor> {
        (self.targets == Targets::Own)
            .then(|| own_mask(&self.set.task.index_select(0, idx), self.sn.frozen.n))
    }

    /// Output reconstruction of the samples `idx` (id-sliced with `own` targets).
    pub fn global(&self, idx: &Tensor) -> Tensor {
        let (ids, mask) = tokens(&self.set.x.index_select(0, idx));
        let pred = self.sn.forward(&ids, &mask, self.form);
        let own = self.own(idx);
        reconstruction_loss(
            &pred,
            &self.teacher.pooled.index_select(1, idx),
            own.as_ref(),
        )
    }

    /// Local loss of the samples `idx`: every unit's problem and the output's
    /// (`local_loss`); each problem's own M/U get their own gradient, the shared M_res/U_res
    /// the sum.
    pub fn local(&self, idx: &Tensor) -> Tensor {
        let (ids, mask) = tokens(&self.set.x.index_select(0, idx));
        let stream = |k: usize| self.teacher.stream[k].index_select(1, idx);
        local_loss(
            self.sn,
            &ids,
            &mask,
            &stream,
            &self.teacher.pooled.index_select(1, idx),
            self.own(idx).as_ref(),
            self.form,
            self.res_consistency,
        )
    }
}

/// The local loss of a SuperNet part on a batch: each held unit's reconstruction of the next
/// stream over the real tokens plus the residual round-trip drift weighted by
/// `res_consistency`, and with the output the reconstruction of the pooled outputs `pooled`
/// [n, B, d]; summed. `stream(k)`: the originals' stream after unit k of the batch.
#[allow(clippy::too_many_arguments)]
pub fn local_loss(
    sn: &BertSuperNet,
    ids: &Tensor,
    mask: &Tensor,
    stream: &dyn Fn(usize) -> Tensor,
    pooled: &Tensor,
    own: Option<&Tensor>,
    form: StepForm,
    res_consistency: f64,
) -> Tensor {
    let p = sn.local_problems(ids, mask, stream, form);
    let mut loss = Tensor::zeros([], (Kind::Float, mask.device()));
    for (pred, target, drift) in &p.units {
        loss = loss + token_loss(pred, target, mask, own) + drift * res_consistency;
    }
    match &p.output {
        Some(pred) => loss + reconstruction_loss(pred, pooled, own),
        None => loss,
    }
}

/// Train the SuperNet's local problems together (one step of every problem per batch).
pub fn train_local(
    loss: &BertLoss,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    if loss.teacher.stream.len() < 2 {
        return Err(fsmerge_common::Error::Compute(
            "local training needs the originals' streams: build the teacher with streams".into(),
        ));
    }
    let (mut params, shared) = loss.sn.local_params();
    params.extend(shared);
    s.run("local", loss.set.len(), s.seed)
        .optimise(&params, loss.set.len(), progress, |idx| loss.local(idx))
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
