//! What FS-Merge of Llamas trains on: text rows (token ids as f32, `[PAD]` = 0 hidden by the
//! attention mask), the loss (each model's final hidden states reconstructed at every real
//! token, a per-text mean as BERT's token loss; local unit problems through the shared
//! residual merge) and the training of the originals (`fsmerge train`: sequence classifiers
//! reading the last real token, or causal LMs of their task's texts, each from its own seed).

use crate::core::loss::token_loss;
use crate::data::text::tokens;
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::model::{last_token, Llama};
use crate::families::llama::supernet::{LlamaSuperNet, LocalProblem};
use crate::train::optim::{Classifier, OriginalSpec};
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::config::{LlamaShape, StepForm};
use fsmerge_common::Result;
use tch::Tensor;

/// The local loss of a SuperNet part on a batch, term by term to `emit`: each held unit's
/// reconstruction of the next stream over the real tokens plus the residual drift weighted by
/// `res_consistency`, and with the output the reconstruction of the final hidden states
/// `last` [n, B, T, d]. `stream(k)`: the originals' stream after unit k of the batch.
#[allow(clippy::too_many_arguments)]
pub fn local_loss(
    sn: &LlamaSuperNet,
    ids: &Tensor,
    mask: &Tensor,
    stream: &dyn Fn(usize) -> Tensor,
    last: &Tensor,
    own: Option<&Tensor>,
    (form, res_consistency): (StepForm, f64),
    emit: &mut dyn FnMut(Tensor) -> Result<()>,
) -> Result<()> {
    sn.local_problems(ids, mask, stream, form, &mut |p| {
        emit(match p {
            LocalProblem::Unit(pred, target, drift) => {
                token_loss(&pred, &target, mask, own) + drift * res_consistency
            }
            LocalProblem::Output(pred) => token_loss(&pred, last, mask, own),
        })
    })
}

/// The HF config of the Llamas `fsmerge train` builds for `[model.llama]` on a vocabulary of
/// `vocab` tokens (`[PAD]` = 0).
pub fn config_for_text(shape: &LlamaShape, vocab: usize) -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        hidden_size: shape.width,
        intermediate_size: shape.mlp_dim,
        num_hidden_layers: shape.layers,
        num_attention_heads: shape.heads,
        num_key_value_heads: Some(shape.kv_heads),
        head_dim: None,
        vocab_size: vocab,
        rms_norm_eps: 1e-6,
        rope_theta: shape.rope_theta,
        rope_scaling: None,
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        tie_word_embeddings: false,
        pad_token_id: Some(0),
        sliding_window: None,
        use_sliding_window: None,
    }
}

/// A Llama sequence classifier as training sees it: its logits at each text's last real
/// token through `score`.
impl Classifier for Llama {
    fn params(&self) -> Vec<Tensor> {
        self.named()
            .into_iter()
            .map(|(_, t)| t.shallow_clone())
            .collect()
    }
    fn logits(&self, x: &Tensor) -> Tensor {
        let (ids, mask) = tokens(x);
        let h = self.hidden(&ids, &mask);
        let score = self
            .score
            .as_ref()
            .map_or_else(|| h.zeros_like(), Tensor::shallow_clone);
        last_token(&h, &mask).matmul(&score.tr())
    }
    fn frozen(&self) -> Self {
        tch::no_grad(|| self.map(&|t| t.detach().copy()))
    }
}

/// Decoupled weight decay of the originals' AdamW.
const ORIGINAL_WEIGHT_DECAY: f64 = 0.01;

/// Train one Llama sequence classifier from its own seed (transformers' init, no LM head, a
/// `score` of `spec.classes` rows): AdamW + OneCycle, cross-entropy at the last real token.
pub fn train_original(
    config: LlamaConfig,
    spec: &OriginalSpec,
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    progress: &dyn Progress,
) -> Result<(Llama, f64, Vec<LogRow>)> {
    let classes = spec.classes as i64;
    let init = || {
        let d = config.hidden_size as i64;
        let mut model = Llama::init(config);
        model.lm_head = None;
        model.score = Some(Tensor::randn([classes, d], crate::core::tensor::F32) * 0.02);
        model
    };
    spec.train(ORIGINAL_WEIGHT_DECAY, init, train, val, progress)
}

/// Train one causal LM of its task's texts from its own seed (transformers' init, its own
/// `lm_head`): AdamW + OneCycle on the next-token cross-entropy over the real tokens. Returns
/// it frozen, its next-token accuracy on the validation texts `val` and the training log.
pub fn train_language_model(
    config: LlamaConfig,
    spec: &OriginalSpec,
    train: &Tensor,
    val: &Tensor,
    progress: &dyn Progress,
) -> Result<(Llama, f64, Vec<LogRow>)> {
    let n = train.size()[0] as usize;
    let (frozen, log) = spec.train_by(
        ORIGINAL_WEIGHT_DECAY,
        || Llama::init(config),
        n,
        progress,
        |model, idx| {
            let (logits, target) = next_token_logits(model, &train.index_select(0, idx));
            logits.flatten(0, 1).cross_entropy_loss::<Tensor>(
                &target.flatten(0, 1),
                None,
                tch::Reduction::Mean,
                PAD_ID,
                0.0,
            )
        },
    )?;
    let val_acc = tch::no_grad(|| {
        let (logits, target) = next_token_logits(&frozen, val);
        let real = target.ne(PAD_ID);
        let right = logits
            .argmax(-1, false)
            .eq_tensor(&target)
            .logical_and(&real);
        let count = |t: Tensor| t.sum(tch::Kind::Int64).int64_value(&[]) as f64;
        count(right) / count(real).max(1.0)
    });
    Ok((frozen, val_acc, log))
}

/// `[PAD]`: the token id a causal LM never learns to predict.
const PAD_ID: i64 = 0;

/// A causal LM's logits at positions 0..T-1 of text rows `x` [B, T] [B, T-1, V], and the
/// next tokens they predict [B, T-1]. The model is `Llama::init`'s, with its own `lm_head`.
fn next_token_logits(model: &Llama, x: &Tensor) -> (Tensor, Tensor) {
    let (ids, mask) = tokens(x);
    let t = ids.size()[1];
    let head = model.lm_head.as_ref().unwrap_or(&model.embed);
    let h = model.hidden(&ids, &mask).narrow(1, 0, t - 1);
    (h.matmul(&head.tr()), ids.narrow(1, 1, t - 1))
}
