//! FS-Merge of BERTs in one process: the originals (`fsmerge train` on the text tasks), the
//! teacher (every model's pooled output on the merge data, and in local modes its stream after
//! every unit), the losses (method.md §9.1 on the pooler's output; local unit problems) and the
//! training phases, through the one `optim::Run` loop. Text rows
//! hold token ids as f32 (`data::text`); `[PAD]` = 0 is what the attention mask hides.

use crate::core::linear::Linear;
use crate::core::loss::{reconstruction_loss, token_loss};
use crate::core::tensor::{chunked, F32};
use crate::data::text::tokens;
use crate::families::bert::model::Bert;
use crate::families::bert::supernet::{BertSuperNet, LocalProblem};
use crate::train::optim::{Classifier, OriginalSpec};
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::config::StepForm;
use fsmerge_common::hf::BertConfig;
use fsmerge_common::Result;
use tch::Tensor;

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

/// Decoupled weight decay of the originals' AdamW (BERT's usual 0.01).
const ORIGINAL_WEIGHT_DECAY: f64 = 0.01;

/// The local loss of a SuperNet part on a batch, term by term to `emit`: each held unit's
/// reconstruction of the next stream over the real tokens plus the residual round-trip drift
/// weighted by `res_consistency`, and with the output the reconstruction of the pooled outputs
/// `pooled` [n, B, d]. `stream(k)`: the originals' stream after unit k of the batch.
#[allow(clippy::too_many_arguments)]
pub fn local_loss(
    sn: &BertSuperNet,
    ids: &Tensor,
    mask: &Tensor,
    stream: &dyn Fn(usize) -> Tensor,
    pooled: &Tensor,
    own: Option<&Tensor>,
    (form, res_consistency): (StepForm, f64),
    emit: &mut dyn FnMut(Tensor) -> Result<()>,
) -> Result<()> {
    sn.local_problems(ids, mask, stream, form, &mut |p| {
        emit(match p {
            LocalProblem::Unit(pred, target, drift) => {
                token_loss(&pred, &target, mask, own) + drift * res_consistency
            }
            LocalProblem::Output(pred) => reconstruction_loss(&pred, pooled, own),
        })
    })
}

impl Classifier for Bert {
    fn params(&self) -> Vec<Tensor> {
        Bert::params(self)
    }
    fn logits(&self, x: &Tensor) -> Tensor {
        original_logits(self, x)
    }
    fn frozen(&self) -> Self {
        self.copy()
    }
}

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
    let classes = spec.classes as i64;
    let init = || {
        let d = config.hidden_size as i64;
        let mut model = Bert::init(config);
        model.classifier = Some(Linear {
            w: Tensor::randn([classes, d], F32) * 0.02,
            b: Tensor::zeros([classes], F32),
        });
        model
    };
    spec.train(ORIGINAL_WEIGHT_DECAY, init, train, val, progress)
}
