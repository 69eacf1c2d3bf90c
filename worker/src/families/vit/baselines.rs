//! The baselines of the results table for ViTs (method.md §13): `first`, weight averaging,
//! RegMean on every linear map of every block, and knowledge distillation into a copy of
//! model 1. Each task keeps its own classifier.

use crate::core::baselines::{average, distill, heads_of, rescaled_heads, Encoder, RegmeanSums};
use crate::data::merge_set::MergeSet;
use crate::families::vit::merge::{images, MergedVit};
use crate::families::vit::model::Vit;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::Result;
use tch::Tensor;

/// RegMean: every linear map of every block becomes W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ with
/// G_i = α XᵢᵀXᵢ + (1−α) diag(XᵢᵀXᵢ), Xᵢ = the map's inputs (all tokens) inside model i on its
/// own task's merge data; everything else (embeddings, LayerNorms, biases) is averaged.
pub fn regmean(models: &[&Vit], set: &MergeSet, alpha: f64) -> Result<MergedVit> {
    let (encoder, heads) = average(models);
    let merged = MergedVit {
        vit: encoder,
        heads,
    };
    let heads = models[0].cfg.num_attention_heads as i64;
    tch::no_grad(|| {
        // Each model's stream on its own task's inputs, advanced block by block.
        let mut streams: Vec<Tensor> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let r = set.task_range(i);
                m.embed(&images(&set.x.narrow(0, r.start as i64, r.len() as i64)))
            })
            .collect();
        for (l, block) in merged.vit.blocks.iter().enumerate() {
            let mut sums: Vec<RegmeanSums> = (0..6).map(|_| RegmeanSums::default()).collect();
            for (i, m) in models.iter().enumerate() {
                let b = &m.blocks[l];
                let (inputs, out) = b.linear_inputs_pre_ln(&streams[i], heads);
                streams[i] = out;
                let maps = [
                    (&inputs[0], &b.q),
                    (&inputs[0], &b.k),
                    (&inputs[0], &b.v),
                    (&inputs[1], &b.out),
                    (&inputs[2], &b.fc1),
                    (&inputs[3], &b.fc2),
                ];
                for (sum, (x, lin)) in sums.iter_mut().zip(maps) {
                    sum.add(&x.reshape([-1, x.size()[2]]), &lin.w, alpha);
                }
            }
            let targets = [
                &block.q, &block.k, &block.v, &block.out, &block.fc1, &block.fc2,
            ];
            for (k, (sum, lin)) in sums.into_iter().zip(targets).enumerate() {
                sum.solve_into(lin, &format!("block {l}, linear map {k}"))?;
            }
        }
        Ok(merged)
    })
}

/// Knowledge distillation: model 1's encoder, every tensor trained with MSE to each input's own
/// model's pooled output, rescaled to mean |·| = `target_scale` per task; task t then reads
/// student(x)/s_t, folded into its head.
pub fn kd(
    models: &[&Vit],
    set: &MergeSet,
    pooled: &Tensor,
    target_scale: f64,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<(MergedVit, Vec<LogRow>)> {
    let student = models[0].encoder_copy();
    let (scales, log) = distill(
        set,
        pooled,
        target_scale,
        &student.params(),
        s,
        progress,
        |idx| student.pooled(&images(&set.x.index_select(0, idx))),
    )?;
    Ok((
        MergedVit {
            vit: student.copy(),
            heads: rescaled_heads(heads_of(models), &scales),
        },
        log,
    ))
}
