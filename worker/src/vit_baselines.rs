//! The baselines of the results table for ViTs (method.md §13): `first`, weight averaging,
//! RegMean on every linear map of every block, and knowledge distillation into a copy of
//! model 1. Each task keeps its own classifier.

use crate::baselines::regmean_solve;
use crate::eval::mean_abs;
use crate::merge_data::MergeSet;
use crate::mlp::{own_heads, Linear};
use crate::progress::{LogRow, Progress};
use crate::tensor::set_to_mean;
use crate::train_merge::TrainSettings;
use crate::vit::Vit;
use crate::vit_merge::{images, MergedVit};
use fsmerge_common::Result;
use tch::Tensor;

fn heads_of(models: &[&Vit]) -> Vec<Linear> {
    own_heads(models.iter().map(|m| m.classifier.as_ref()))
}

/// A copy of `model` without its classifier.
fn encoder_of(model: &Vit) -> Vit {
    let mut v = model.copy();
    v.classifier = None;
    v
}

/// Model 1's encoder for every task.
pub fn first(models: &[&Vit]) -> MergedVit {
    MergedVit {
        vit: encoder_of(models[0]),
        heads: heads_of(models),
    }
}

/// Element-wise mean of every encoder tensor.
pub fn average(models: &[&Vit]) -> MergedVit {
    let vit = encoder_of(models[0]);
    let all: Vec<Vec<(String, &Tensor)>> = models.iter().map(|m| m.named_tensors()).collect();
    set_to_mean(&vit.named_tensors(), &all);
    MergedVit {
        vit,
        heads: heads_of(models),
    }
}

/// RegMean: every linear map of every block becomes W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ with
/// G_i = α XᵢᵀXᵢ + (1−α) diag(XᵢᵀXᵢ), Xᵢ = the map's inputs (all tokens) inside model i on its
/// own task's merge data; everything else (embeddings, LayerNorms, biases) is averaged.
pub fn regmean(models: &[&Vit], set: &MergeSet, alpha: f64) -> Result<MergedVit> {
    let merged = average(models);
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
            let mut grams: Vec<Option<(Tensor, Tensor)>> = (0..6).map(|_| None).collect();
            for (i, m) in models.iter().enumerate() {
                let b = &m.blocks[l];
                let (inputs, out) = b.linear_inputs(&streams[i], heads);
                streams[i] = out;
                let maps = [
                    (&inputs[0], &b.q),
                    (&inputs[0], &b.k),
                    (&inputs[0], &b.v),
                    (&inputs[1], &b.out),
                    (&inputs[2], &b.fc1),
                    (&inputs[3], &b.fc2),
                ];
                for (slot, (x, lin)) in grams.iter_mut().zip(maps) {
                    let x = x.reshape([-1, x.size()[2]]);
                    let g = x.tr().matmul(&x);
                    let g = &g * alpha + g.diagonal(0, 0, 1).diag_embed(0, -2, -1) * (1.0 - alpha);
                    let rhs = g.matmul(&lin.w.tr());
                    *slot = Some(match slot.take() {
                        Some((gs, rs)) => (gs + g, rs + rhs),
                        None => (g, rhs),
                    });
                }
            }
            let targets = [
                &block.q, &block.k, &block.v, &block.out, &block.fc1, &block.fc2,
            ];
            for (k, (slot, lin)) in grams.into_iter().zip(targets).enumerate() {
                let Some((gram, rhs)) = slot else { continue };
                let wt = regmean_solve(gram, &rhs, &format!("block {l}, linear map {k}"))?;
                lin.w.shallow_clone().copy_(&wt.tr());
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
    let mut scales = Vec::new();
    let mut targets = Vec::new();
    for t in 0..models.len() {
        let r = set.task_range(t);
        let f = pooled
            .get(t as i64)
            .narrow(0, r.start as i64, r.len() as i64);
        let scale = target_scale / mean_abs(&f).max(1e-12);
        targets.push(f * scale);
        scales.push(scale);
    }
    let targets = Tensor::cat(&targets, 0);
    let student = encoder_of(models[0]);
    let params = student.params();
    for p in &params {
        let _ = p.set_requires_grad(true);
    }
    let log = s
        .run("kd", set.len(), s.seed)
        .optimise(&params, set.len(), progress, |idx| {
            let pred = student.pooled(&images(&set.x.index_select(0, idx)));
            (pred - targets.index_select(0, idx)).square().mean(None)
        })?;
    let heads = heads_of(models)
        .into_iter()
        .zip(&scales)
        .map(|(h, &sc)| Linear {
            w: h.w / sc,
            b: h.b,
        })
        .collect();
    Ok((
        MergedVit {
            vit: student.copy(),
            heads,
        },
        log,
    ))
}
