//! The baselines of the results table (method.md §13): `first`, weight averaging, RegMean and
//! knowledge distillation. (Originals and the ensemble need no merging; see `eval`.)

use crate::eval::{mean_abs, MergedModel};
use crate::merge_data::MergeSet;
use crate::mlp::{body_forward, Linear, Mlp};
use crate::progress::LogRow;
use crate::progress::Progress;
use crate::train_merge::{optimise, TrainSettings};
use fsmerge_common::{Error, Result};
use tch::Tensor;

fn heads_of(models: &[&Mlp]) -> Vec<Linear> {
    models.iter().map(|m| m.head.copy()).collect()
}

/// Model 1's body for every task; each task keeps its own head.
pub fn first(models: &[&Mlp]) -> MergedModel {
    MergedModel {
        body: models[0].body.iter().map(Linear::copy).collect(),
        heads: heads_of(models),
    }
}

/// Element-wise mean of one tensor across the models.
fn mean_over(models: &[&Mlp], pick: impl Fn(&Mlp) -> &Tensor) -> Tensor {
    let stacked = Tensor::stack(
        &models.iter().map(|m| pick(m).detach()).collect::<Vec<_>>(),
        0,
    );
    stacked.mean_dim(0, false, None)
}

/// Uniform average of the bodies' weights and biases.
pub fn average(models: &[&Mlp]) -> MergedModel {
    let body = (0..models[0].body.len())
        .map(|l| Linear {
            w: mean_over(models, |m| &m.body[l].w),
            b: mean_over(models, |m| &m.body[l].b),
        })
        .collect();
    MergedModel {
        body,
        heads: heads_of(models),
    }
}

/// RegMean: every linear map becomes W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ with
/// G_i = α XᵢᵀXᵢ + (1−α) diag(XᵢᵀXᵢ), Xᵢ = the layer's inputs inside model i on its own task's
/// merge data; biases are averaged. A ridge of 1e-6 · mean(diag) keeps the system solvable when
/// a ReLU unit is dead in every model (its rows then do not matter).
pub fn regmean(
    models: &[&Mlp],
    set: &MergeSet,
    feats: &[Tensor],
    alpha: f64,
) -> Result<MergedModel> {
    let avg = average(models);
    tch::no_grad(|| {
        let mut body = Vec::new();
        for (l, avg_layer) in avg.body.iter().enumerate() {
            let mut gram_sum: Option<Tensor> = None;
            let mut rhs_sum: Option<Tensor> = None;
            for (i, m) in models.iter().enumerate() {
                let r = set.task_range(i);
                let x = if l == 0 {
                    set.x.narrow(0, r.start as i64, r.len() as i64)
                } else {
                    feats[l - 1]
                        .get(i as i64)
                        .narrow(0, r.start as i64, r.len() as i64)
                };
                let g = x.tr().matmul(&x);
                let g = &g * alpha + g.diagonal(0, 0, 1).diag_embed(0, -2, -1) * (1.0 - alpha);
                let rhs = g.matmul(&m.body[l].w.tr());
                gram_sum = Some(match gram_sum {
                    Some(s) => s + &g,
                    None => g,
                });
                rhs_sum = Some(match rhs_sum {
                    Some(s) => s + rhs,
                    None => rhs,
                });
            }
            let (gram, rhs) = (
                gram_sum.unwrap_or_else(|| Tensor::zeros([1], crate::tensor::F32)),
                rhs_sum.unwrap_or_else(|| Tensor::zeros([1], crate::tensor::F32)),
            );
            let wt = regmean_solve(gram, &rhs, &format!("layer {l}"))?;
            body.push(Linear {
                w: wt.tr().contiguous(),
                b: avg_layer.b.shallow_clone(),
            });
        }
        Ok(MergedModel {
            body,
            heads: avg.heads,
        })
    })
}

/// Solve RegMean's normal equations (Σ G_i) W*ᵀ = Σ G_i W_iᵀ. A ridge of 1e-6 · mean(diag)
/// keeps the system solvable when an input feature is dead in every model (its rows then do not
/// matter). `what` names the map in the error.
pub fn regmean_solve(gram: Tensor, rhs: &Tensor, what: &str) -> Result<Tensor> {
    let dim = gram.size()[0];
    let ridge = gram
        .diagonal(0, 0, 1)
        .mean(None)
        .double_value(&[])
        .max(1e-12)
        * 1e-6;
    let gram = gram + Tensor::eye(dim, crate::tensor::F32) * ridge;
    Tensor::f_linalg_solve(&gram, rhs, true)
        .map_err(|e| Error::Compute(format!("RegMean {what}: {e}")))
}

/// Knowledge distillation: a full student body initialised from model 1, trained with MSE to
/// each input's own model's features, rescaled to mean |·| = `target_scale` per task; at
/// evaluation task t reads student(x)/s_t, folded into its head.
pub fn kd(
    models: &[&Mlp],
    set: &MergeSet,
    feats: &[Tensor],
    target_scale: f64,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<(MergedModel, Vec<LogRow>)> {
    let last = &feats[feats.len() - 1];
    let mut scales = Vec::new();
    let mut targets = Vec::new();
    for t in 0..models.len() {
        let r = set.task_range(t);
        let f = last.get(t as i64).narrow(0, r.start as i64, r.len() as i64);
        let scale = target_scale / mean_abs(&f).max(1e-12);
        targets.push(f * scale);
        scales.push(scale);
    }
    let targets = Tensor::cat(&targets, 0);
    let student: Vec<Linear> = models[0]
        .body
        .iter()
        .map(|l| Linear {
            w: l.w.detach().copy().set_requires_grad(true),
            b: l.b.detach().copy().set_requires_grad(true),
        })
        .collect();
    let params: Vec<Tensor> = student
        .iter()
        .flat_map(|l| [l.w.shallow_clone(), l.b.shallow_clone()])
        .collect();
    let log = optimise("kd", &params, set.len(), s, progress, |idx| {
        let pred = body_forward(&student, &set.x.index_select(0, idx));
        (pred - targets.index_select(0, idx)).square().mean(None)
    })?;
    let body = student.iter().map(Linear::copy).collect();
    let heads = models
        .iter()
        .zip(&scales)
        .map(|(m, &sc)| Linear {
            w: m.head.w.detach() / sc,
            b: m.head.b.detach().copy(),
        })
        .collect();
    Ok((MergedModel { body, heads }, log))
}
