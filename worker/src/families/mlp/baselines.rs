//! The baselines of the results table (method.md §13): `first`, weight averaging, RegMean and
//! knowledge distillation. (Originals and the ensemble need no merging; see `eval`.)

use crate::core::baselines::{distill, rescaled_heads, RegmeanSums};
use crate::core::linear::Linear;
use crate::data::merge_set::MergeSet;
use crate::families::mlp::model::{body_forward, MergedModel, Mlp};
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::Result;
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
            let mut sums = RegmeanSums::default();
            for (i, m) in models.iter().enumerate() {
                let r = set.task_range(i);
                let x = if l == 0 {
                    set.x.narrow(0, r.start as i64, r.len() as i64)
                } else {
                    feats[l - 1]
                        .get(i as i64)
                        .narrow(0, r.start as i64, r.len() as i64)
                };
                sums.add(&x, &m.body[l].w, alpha);
            }
            let merged = avg_layer.copy();
            sums.solve_into(&merged, &format!("layer {l}"))?;
            body.push(merged);
        }
        Ok(MergedModel {
            body,
            heads: avg.heads,
        })
    })
}

/// Knowledge distillation of MLPs (`distill`): a full student body initialised from model 1,
/// its last features against each input's own model's.
pub fn kd(
    models: &[&Mlp],
    set: &MergeSet,
    feats: &[Tensor],
    target_scale: f64,
    s: &TrainSettings,
    progress: &dyn Progress,
) -> Result<(MergedModel, Vec<LogRow>)> {
    let student: Vec<Linear> = models[0].body.iter().map(Linear::copy).collect();
    let params: Vec<Tensor> = student
        .iter()
        .flat_map(|l| [l.w.shallow_clone(), l.b.shallow_clone()])
        .collect();
    let (scales, log) = distill(
        set,
        &feats[feats.len() - 1],
        target_scale,
        &params,
        s,
        progress,
        |idx| body_forward(&student, &set.x.index_select(0, idx)),
    )?;
    let body = student.iter().map(Linear::copy).collect();
    let heads = rescaled_heads(models.iter().map(|m| m.head.copy()), &scales);
    Ok((MergedModel { body, heads }, log))
}
