//! The baselines of the results table for BERTs (method.md §13): `first`, weight averaging,
//! RegMean on every linear map, and knowledge distillation into a copy of model 1. Each task
//! keeps its own classifier.

use crate::core::baselines::{average, distill, heads_of, rescaled_heads, Encoder, RegmeanSums};
use crate::data::merge_set::MergeSet;
use crate::families::bert::merge::{pooled, tokens, MergedBert};
use crate::families::bert::model::{mask_bias, Bert};
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::Result;
use tch::Tensor;

/// RegMean (method.md §13): every linear map of every block, and the pooler, becomes
/// W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ with G_i from the map's inputs inside model i on its own
/// task's merge data (real tokens only; the pooler reads [CLS]); embeddings, LayerNorms and
/// biases are averaged.
pub fn regmean(models: &[&Bert], set: &MergeSet, alpha: f64) -> Result<MergedBert> {
    let (encoder, heads) = average(models);
    let merged = MergedBert {
        bert: encoder,
        heads,
    };
    let heads = models[0].cfg.num_attention_heads as i64;
    tch::no_grad(|| {
        // Each model's own task: its token ids, the rows of real tokens, the stream.
        let mut own: Vec<(Tensor, Tensor, Tensor)> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let r = set.task_range(i);
                let (ids, mask) = tokens(&set.x.narrow(0, r.start as i64, r.len() as i64));
                let real = mask.flatten(0, -1).nonzero().squeeze_dim(1);
                (mask_bias(&mask), real, m.embed(&ids))
            })
            .collect();
        let real_rows =
            |x: &Tensor, real: &Tensor| x.reshape([-1, x.size()[2]]).index_select(0, real);
        for (l, block) in merged.bert.blocks.iter().enumerate() {
            let mut sums: Vec<RegmeanSums> = (0..6).map(|_| RegmeanSums::default()).collect();
            for (i, m) in models.iter().enumerate() {
                let b = &m.blocks[l];
                let (bias, real, stream) = &mut own[i];
                let (inputs, out) = b.linear_inputs_post_ln(stream, bias, heads);
                *stream = out;
                let maps = [
                    (&inputs[0], &b.q),
                    (&inputs[0], &b.k),
                    (&inputs[0], &b.v),
                    (&inputs[1], &b.out),
                    (&inputs[2], &b.fc1),
                    (&inputs[3], &b.fc2),
                ];
                for (sum, (x, lin)) in sums.iter_mut().zip(maps) {
                    sum.add(&real_rows(x, real), &lin.w, alpha);
                }
            }
            let targets = [
                &block.q, &block.k, &block.v, &block.out, &block.fc1, &block.fc2,
            ];
            for (k, (sum, lin)) in sums.into_iter().zip(targets).enumerate() {
                sum.solve_into(lin, &format!("block {l}, linear map {k}"))?;
            }
        }
        let mut pooler = RegmeanSums::default();
        for (m, (_, _, stream)) in models.iter().zip(&own) {
            if let Some(p) = &m.pooler {
                pooler.add(&stream.select(1, 0), &p.w, alpha);
            }
        }
        if let Some(p) = &merged.bert.pooler {
            pooler.solve_into(p, "pooler")?;
        }
        Ok(merged)
    })
}

/// Knowledge distillation (`distill`): model 1's encoder and pooler, every tensor trained with
/// MSE to each input's own model's pooled output, rescaled per task.
pub fn kd(
    models: &[&Bert],
    set: &MergeSet,
    pooled_targets: &Tensor,
    target_scale: f64,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<(MergedBert, Vec<LogRow>)> {
    let student = models[0].encoder_copy();
    let (scales, log) = distill(
        set,
        pooled_targets,
        target_scale,
        &student.params(),
        s,
        progress,
        |idx| pooled(&student, &set.x.index_select(0, idx)),
    )?;
    Ok((
        MergedBert {
            bert: student.copy(),
            heads: rescaled_heads(heads_of(models), &scales),
        },
        log,
    ))
}
