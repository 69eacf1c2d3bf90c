//! Training of one stage's M/U across workers, through `optim::Run` like the single-process
//! path: the same batches in the same order on every worker, split between replicas, with the
//! gradients (and the batch loss) summed over the replicas in one flat buffer per step.
//!
//! - `local`: the stage's layer problems need nothing from other stages.
//! - `global`: a pipeline over stages (GPipe schedule): each micro-batch's merged stream goes
//!   forward stage to stage; the last stage computes the loss; gradients of the stream come
//!   back, each carrying the micro-batch's loss so every stage knows the step's loss.
//!
//! Each replica scales its part's loss by its share of the batch, so the summed gradient is the
//! full batch's gradient, as in the single-process run.

use crate::collective::Collective;
use crate::optim::{gradients, lockstep, Run};
use crate::progress::{LogRow, Progress};
use crate::stage::StageNet;
use crate::supernet::{own_mask, reconstruction_loss};
use crate::tensor::{flatten_all, unflatten_like};
use crate::train_merge::TrainSettings;
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::config::Targets;
use fsmerge_common::{Error, Result};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// What the pipeline (teacher features, global phase) needs of a stage, whatever the
/// architecture.
pub trait PipelineStage {
    /// Number of models merged.
    fn n(&self) -> usize;
    fn is_last(&self) -> bool;
    /// The plan units the stage holds.
    fn units(&self) -> Range<usize>;
    /// Per-sample shape of the stream entering the stage from the previous one (the teacher's
    /// [n, N, ..] and the merged [B, ..] alike).
    fn stream_dims(&self) -> Vec<i64>;
    /// The originals' features after each of the stage's units (and, on the last stage, what
    /// the loss reconstructs, last) from the stage input: the merge inputs x [N, D] on stage 0,
    /// else the previous stage's last features [n, N, ..].
    fn teacher(&self, input: &Tensor) -> Vec<Tensor>;
    /// Parameters the stage trains in the global phase.
    fn global_params(&self) -> Vec<Tensor>;
    /// The stage's part of the global SuperNet on the merged stream of samples `idx` (their x
    /// on stage 0): the next merged stream, or on the last stage the per-model outputs
    /// [n, B, ..]; and the loss terms the stage adds itself (a transformer's inner-feature
    /// terms), as a mean over the samples.
    fn forward(
        &self,
        input: &Tensor,
        idx: &Tensor,
        data: &StageData,
        s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>);
}

/// What a worker does with its stage beyond the pipeline.
pub trait WorkerStage: PipelineStage {
    fn to_device(&mut self, device: Device);
    /// Bytes of the original models' tensors this stage holds.
    fn weight_bytes(&self) -> u64;
    /// Number of feature tensors `teacher` returns (for the feature cache).
    fn feature_count(&self) -> usize;
    /// Once the teacher features exist: derive what training needs from them, and drop what
    /// only the teacher needed.
    fn prepare(&mut self, data: &StageData) -> Result<()> {
        let _ = data;
        Ok(())
    }
    /// Seed of the global phase's batch order, from the job seed.
    fn global_seed(&self, seed: u64) -> u64 {
        seed
    }
    /// Train the stage's local problems.
    fn train_local(
        &self,
        data: &StageData,
        s: &TrainSettings,
        pipe: &mut dyn Collective,
        replicas: &mut dyn Collective,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>>;
    /// After local training: move what the next stage consumes there.
    fn hand_over(&mut self, pipe: &mut dyn Collective) -> Result<()>;
    /// Every trainable tensor, named, for checkpoints.
    fn named_params(&self) -> Vec<(String, Tensor)>;
    /// The folded stage under the merged model's tensor names.
    fn fold(&self) -> Result<Vec<(String, HostTensor)>>;
}

/// What a stage trains on.
pub struct StageData {
    /// Stage input: x [N, D] on stage 0, else every model's features before the stage [n, N, k].
    pub input: Tensor,
    /// Every model's features after each of the stage's layers: `[j]` is [n, N, k_j].
    pub feats: Vec<Tensor>,
    /// Task of each sample [N] (i64).
    pub task: Tensor,
}

impl StageData {
    pub fn len(&self) -> usize {
        self.task.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The originals' stream after plan unit k, of a transformer stage whose first unit is
    /// `first`: its input for the unit before the first, else one of its features.
    pub fn stream(&self, first: usize, k: usize) -> &Tensor {
        if k + 1 == first {
            &self.input
        } else {
            &self.feats[k - first]
        }
    }
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            input: self.input.to_device(device),
            feats: self.feats.iter().map(|f| f.to_device(device)).collect(),
            task: self.task.to_device(device),
        }
    }

    /// Free what the global phase does not read — every feature but the last stage's targets,
    /// and the input of a stage other than stage 0 (the teacher's streams: n·N·T·d floats per
    /// ViT unit) — keeping the indices. Returns the bytes freed.
    pub fn keep_global_only(&mut self, first: bool, last: bool) -> u64 {
        let mut freed = 0;
        let mut free = |t: &mut Tensor| {
            freed += 4 * t.numel() as u64;
            *t = Tensor::zeros([0], (Kind::Float, t.device()));
        };
        if !first {
            free(&mut self.input);
        }
        let keep = if last {
            self.feats.len().saturating_sub(1)
        } else {
            self.feats.len()
        };
        for f in &mut self.feats[..keep] {
            free(f);
        }
        freed
    }
}

/// Each task's classifier from the last stage's parts (`<models_dir>/<task>/`, in task order):
/// the heads the read-out U_final folds into; a model without one is an error naming it.
pub fn task_classifiers(
    models_dir: &std::path::Path,
    tasks: &[String],
    classifiers: &[Option<&crate::mlp::Linear>],
) -> Result<Vec<crate::mlp::Linear>> {
    tasks
        .iter()
        .zip(classifiers)
        .map(|(t, c)| {
            c.map(crate::mlp::Linear::copy)
                .ok_or_else(|| Error::Tensor {
                    file: models_dir.join(t),
                    tensor: "classifier.weight".into(),
                    msg: "the model has no classifier to fold its read-out into".into(),
                })
        })
        .collect()
}

/// Folded task heads under the merged model's names (`head_weight`/`head_bias` of each task).
pub fn named_heads(
    tasks: &[String],
    heads: impl IntoIterator<Item = crate::mlp::Linear>,
) -> Result<Vec<(String, HostTensor)>> {
    use fsmerge_common::checkpoint::{head_bias, head_weight};
    let mut out = Vec::new();
    for (name, head) in tasks.iter().zip(heads) {
        out.push((head_weight(Some(name)), crate::tensor::to_host(&head.w)?));
        out.push((head_bias(Some(name)), crate::tensor::to_host(&head.b)?));
    }
    Ok(out)
}

/// Member `r` of `n`'s contiguous share of a batch.
pub fn share(batch: &[i64], r: usize, n: usize) -> &[i64] {
    &batch[r * batch.len() / n..(r + 1) * batch.len() / n]
}

fn index(ids: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(ids).to_device(device)
}

fn mask(n: usize, data: &StageData, idx: &Tensor, targets: Targets) -> Option<Tensor> {
    (targets == Targets::Own).then(|| own_mask(&data.task.index_select(0, idx), n))
}

/// Sum gradients and the loss over the replicas (one buffer); identity for one replica.
fn reduce(
    replicas: &mut dyn Collective,
    grads: Vec<Tensor>,
    loss: f64,
) -> Result<(f64, Vec<Tensor>)> {
    let (grads, losses) = reduce_many(replicas, grads, &[loss])?;
    Ok((losses[0], grads))
}

/// Sum gradients and several losses over the replicas in one flat buffer.
pub fn reduce_many(
    replicas: &mut dyn Collective,
    grads: Vec<Tensor>,
    losses: &[f64],
) -> Result<(Vec<Tensor>, Vec<f64>)> {
    if replicas.size() == 1 {
        return Ok((grads, losses.to_vec()));
    }
    let device = replicas.device();
    let tail: Vec<f32> = losses.iter().map(|&l| l as f32).collect();
    let mut flat = Tensor::cat(
        &[
            flatten_all(&grads).to_device(device),
            Tensor::from_slice(&tail).to_device(device),
        ],
        0,
    );
    replicas.all_reduce_sum(&mut flat)?;
    let total = flat.numel() as i64;
    let k = losses.len() as i64;
    let summed_losses: Vec<f64> = (total - k..total)
        .map(|i| flat.double_value(&[i]))
        .collect();
    let summed = unflatten_like(&flat, &grads)
        .into_iter()
        .zip(&grads)
        .map(|(g, like)| g.to_device(like.device()))
        .collect();
    Ok((summed, summed_losses))
}

/// A part's mean loss weighted by its share of the batch (unchanged for the whole batch, so
/// one worker computes exactly what the single-process job does).
pub fn scaled(loss: Tensor, part: usize, batch: usize) -> Tensor {
    if part == batch {
        loss
    } else {
        loss * (part as f64 / batch as f64)
    }
}

fn zero_grads(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(Tensor::zeros_like).collect()
}

/// Train every local problem of the stage. Each layer is its own `Run` (seeded by its global
/// layer index, as in the single-process job); they advance in lockstep so that one all-reduce
/// per step carries the gradients of all the stage's layers.
pub fn train_local(
    stage: &StageNet,
    data: &StageData,
    s: &TrainSettings,
    replicas: &mut dyn Collective,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    let device = data.task.device();
    let layers = stage.mu.len();
    let phases: Vec<String> = stage
        .units
        .clone()
        .map(|l| format!("local layer{l}"))
        .collect();
    let runs: Vec<Run> = stage
        .units
        .clone()
        .zip(&phases)
        .map(|(l, phase)| s.run(phase, data.len(), s.seed.wrapping_add(1 + l as u64)))
        .collect();
    let params: Vec<Vec<Tensor>> = (0..layers).map(|j| stage.local_params(j)).collect();
    let label = format!("local layers {}..{}", stage.units.start, stage.units.end);
    let logs = lockstep(&runs, &params, data.len(), &label, progress, |batches| {
        let mut losses = Vec::with_capacity(layers);
        let mut grads = Vec::with_capacity(layers);
        for (j, batch) in batches.iter().enumerate() {
            let part = share(batch, replicas.rank(), replicas.size());
            if part.is_empty() {
                losses.push(0.0);
                grads.push(zero_grads(&params[j]));
                continue;
            }
            let idx = index(part, device);
            let input = match j {
                0 if stage.units.start == 0 => data.input.index_select(0, &idx),
                0 => data.input.index_select(1, &idx),
                _ => data.feats[j - 1].index_select(1, &idx),
            };
            let target = data.feats[j].index_select(1, &idx);
            let m = mask(stage.n(), data, &idx, s.targets);
            let loss = stage.local_loss(j, &input, &target, m.as_ref());
            let loss = scaled(loss, part.len(), batch.len());
            losses.push(loss.double_value(&[]));
            grads.push(gradients(&loss, &params[j])?);
        }
        // One buffer for the whole round: every layer's gradients, then every layer's loss.
        let counts: Vec<usize> = grads.iter().map(Vec::len).collect();
        let flat: Vec<Tensor> = grads.into_iter().flatten().collect();
        let (summed, losses) = reduce_many(replicas, flat, &losses)?;
        let mut it = summed.into_iter();
        Ok(counts
            .iter()
            .zip(losses)
            .map(|(&c, loss)| (loss, it.by_ref().take(c).collect()))
            .collect())
    })?;
    Ok(logs.into_iter().flatten().collect())
}

/// The two groups a stage's worker belongs to: its pipeline (every stage, same replica
/// index) and its replicas (same stage).
pub struct Collectives<'a> {
    pub pipe: &'a mut dyn Collective,
    pub replicas: &'a mut dyn Collective,
}

/// A transformer stage's local phase: its units' problems (and the output's on the last
/// stage) in one run seeded like the single-process one; `loss(idx)` is the stage's part of
/// the local loss of samples idx. Each step sums the gradients over the replicas, then the
/// `shared` ones (M_res/U_res, held by every stage) and the loss over the stages: every copy of
/// the shared parameters gets the single-process gradient, and every stage logs the total loss.
pub fn train_local_shared(
    data: &StageData,
    s: &TrainSettings,
    groups: Collectives,
    own: &[Tensor],
    shared: &[Tensor],
    progress: &dyn Progress,
    loss: &dyn Fn(&Tensor) -> Tensor,
) -> Result<Vec<LogRow>> {
    let Collectives { pipe, replicas } = groups;
    let device = data.task.device();
    let params: Vec<Tensor> = own
        .iter()
        .chain(shared)
        .map(Tensor::shallow_clone)
        .collect();
    s.run("local", data.len(), s.seed)
        .optimise_with(&params, data.len(), progress, |batch| {
            let part = share(batch, replicas.rank(), replicas.size());
            let (value, grads) = if part.is_empty() {
                (0.0, zero_grads(&params))
            } else {
                let idx = index(part, device);
                let l = scaled(loss(&idx), part.len(), batch.len());
                // A stage of embeddings alone may have no local problem of its own: it only
                // keeps its copy of M_res/U_res in step with the others.
                let grads = if l.requires_grad() {
                    gradients(&l, &params)?
                } else {
                    zero_grads(&params)
                };
                (l.double_value(&[]), grads)
            };
            let (mut grads, losses) = reduce_many(replicas, grads, &[value])?;
            let shared_grads = grads.split_off(own.len());
            let (shared_grads, losses) = reduce_many(pipe, shared_grads, &losses)?;
            grads.extend(shared_grads);
            Ok((losses[0], grads))
        })
}

/// Train the global SuperNet's parameters of this stage in the pipeline `pipe` (member s is
/// stage s of this replica index) with `micro_batches` micro-batches per replica share.
pub fn train_global<S: PipelineStage + ?Sized>(
    stage: &S,
    data: &StageData,
    s: &TrainSettings,
    pipe: &mut dyn Collective,
    replicas: &mut dyn Collective,
    micro_batches: usize,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    let device = data.task.device();
    let params = stage.global_params();
    let me = pipe.rank();
    let first = me == 0;
    let last = stage.is_last();
    if last != (me + 1 == pipe.size()) {
        return Err(Error::Plan(format!(
            "stage {me} of {} disagrees with its units {:?} about being last",
            pipe.size(),
            stage.units()
        )));
    }
    let dims = stage.stream_dims();
    let f32_on = (Kind::Float, device);
    s.run("global", data.len(), s.seed)
        .optimise_with(&params, data.len(), progress, |batch| {
            let part = share(batch, replicas.rank(), replicas.size());
            let mbs: Vec<&[i64]> = (0..micro_batches)
                .map(|k| share(part, k, micro_batches))
                .filter(|mb| !mb.is_empty())
                .collect();
            let whole = mbs.len() == 1 && part.len() == batch.len();
            // Forward: keep each micro-batch's input, output (or loss on the last stage), the
            // stage's own loss terms, and the loss value, for its backward.
            let mut saved = Vec::with_capacity(mbs.len());
            for mb in &mbs {
                let idx = index(mb, device);
                let weight = |loss: Tensor| {
                    if whole {
                        loss
                    } else {
                        scaled(loss, mb.len(), batch.len())
                    }
                };
                // Stage 0 reads the inputs; every other stage receives the merged stream and
                // the value of the stages' own loss terms so far.
                let (input, acc_in) = if first {
                    (data.input.index_select(0, &idx), 0.0)
                } else {
                    let numel = mb.len() as i64 * dims.iter().product::<i64>();
                    let mut t = Tensor::zeros([numel + 1], f32_on);
                    pipe.recv(&mut t, me - 1)?;
                    let shape: Vec<i64> = [mb.len() as i64].iter().chain(&dims).copied().collect();
                    let stream = t.narrow(0, 0, numel).view(shape.as_slice());
                    (
                        stream.detach().set_requires_grad(true),
                        t.double_value(&[numel]),
                    )
                };
                let (out, own) = stage.forward(&input, &idx, data, s);
                let own = own.map(weight);
                let acc = acc_in + own.as_ref().map_or(0.0, |o| o.double_value(&[]));
                if last {
                    let target = data.feats[data.feats.len() - 1].index_select(1, &idx);
                    let m = mask(stage.n(), data, &idx, s.targets);
                    let recon = weight(reconstruction_loss(&out, &target, m.as_ref()));
                    let value = recon.double_value(&[]) + acc;
                    let loss = match own {
                        Some(o) => recon + o,
                        None => recon,
                    };
                    saved.push((input, loss, None, value));
                } else {
                    let acc_t = Tensor::from_slice(&[acc as f32]).to_device(device);
                    pipe.send(
                        &Tensor::cat(&[out.detach().reshape([-1]), acc_t], 0),
                        me + 1,
                    )?;
                    saved.push((input, out, own, 0.0));
                }
            }
            // Backward, last micro-batch first.
            let mut grads = zero_grads(&params);
            let mut loss_sum = 0.0;
            for (input, out, own, value) in saved.into_iter().rev() {
                let mut wrt: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
                if !first {
                    wrt.push(input.shallow_clone());
                }
                let (mut g, loss) = if last {
                    (gradients(&out, &wrt)?, value)
                } else {
                    let numel = out.numel() as i64;
                    let mut back = Tensor::zeros([numel + 1], f32_on);
                    pipe.recv(&mut back, me + 1)?;
                    let g_out = back.narrow(0, 0, numel).view(out.size().as_slice());
                    let value = back.double_value(&[numel]);
                    let surrogate = (&out * &g_out).sum(Kind::Float);
                    let surrogate = match own {
                        Some(o) => surrogate + o,
                        None => surrogate,
                    };
                    (gradients(&surrogate, &wrt)?, value)
                };
                loss_sum += loss;
                if !first {
                    let g_in = g.pop().unwrap_or_else(|| Tensor::zeros([0], f32_on));
                    let loss_t = Tensor::from_slice(&[loss as f32]).to_device(device);
                    pipe.send(&Tensor::cat(&[g_in.reshape([-1]), loss_t], 0), me - 1)?;
                }
                grads = if whole {
                    g
                } else {
                    grads.iter().zip(&g).map(|(a, b)| a + b).collect()
                };
            }
            reduce(replicas, grads, loss_sum)
        })
}

/// The teacher features of a stage: `trace(i, start, len)` runs model i's units on rows
/// start..start + len of the stage input and returns every feature of those rows; the chunks
/// of `CHUNK` rows are concatenated per feature and the models stacked: [n, N, ..] each.
pub fn stacked_traces(
    n: usize,
    rows: i64,
    trace: &dyn Fn(usize, i64, i64) -> Vec<Tensor>,
) -> Vec<Tensor> {
    let chunk = crate::vit_merge::CHUNK;
    let per_model: Vec<Vec<Tensor>> = (0..n)
        .map(|i| {
            let chunks: Vec<Vec<Tensor>> = (0..rows)
                .step_by(chunk as usize)
                .map(|s| trace(i, s, chunk.min(rows - s)))
                .collect();
            let features = chunks.first().map_or(0, Vec::len);
            (0..features)
                .map(|k| {
                    Tensor::cat(
                        &chunks
                            .iter()
                            .map(|c| c[k].shallow_clone())
                            .collect::<Vec<_>>(),
                        0,
                    )
                })
                .collect()
        })
        .collect();
    let features = per_model.first().map_or(0, Vec::len);
    (0..features)
        .map(|k| {
            Tensor::stack(
                &per_model
                    .iter()
                    .map(|m| m[k].shallow_clone())
                    .collect::<Vec<_>>(),
                0,
            )
        })
        .collect()
}

/// Move teacher features down the pipeline: stage 0 starts from the merge inputs, every later
/// stage receives the previous stage's last features; each computes its own and forwards its
/// last layer's. `start` is (x, task) on stage 0.
pub fn flow_features<S: PipelineStage + ?Sized>(
    stage: &S,
    pipe: &mut dyn Collective,
    start: Option<(Tensor, Tensor)>,
) -> Result<StageData> {
    let me = pipe.rank();
    let device = pipe.device();
    let (input, task) = match start {
        Some(s) => s,
        None => {
            let mut header = Tensor::zeros([1], (Kind::Float, device));
            pipe.recv(&mut header, me - 1)?;
            let len = header.double_value(&[0]) as i64;
            let shape: Vec<i64> = [stage.n() as i64, len]
                .iter()
                .chain(&stage.stream_dims())
                .copied()
                .collect();
            let mut input = Tensor::zeros(shape, (Kind::Float, device));
            pipe.recv(&mut input, me - 1)?;
            let mut task = Tensor::zeros([len], (Kind::Float, device));
            pipe.recv(&mut task, me - 1)?;
            (input, task.to_kind(Kind::Int64))
        }
    };
    let feats = stage.teacher(&input);
    if !stage.is_last() {
        let out = &feats[feats.len() - 1];
        let len = task.size()[0];
        pipe.send(&Tensor::from_slice(&[len as f32]).to_device(device), me + 1)?;
        pipe.send(&out.contiguous(), me + 1)?;
        pipe.send(&task.to_kind(Kind::Float), me + 1)?;
    }
    Ok(StageData { input, feats, task })
}

/// After local training: stage s hands its last U to stage s+1 (as `u_in`), through the
/// pipeline group, so the global phase and the fold see every U where it is consumed.
pub fn hand_over_boundary(stage: &mut StageNet, pipe: &mut dyn Collective) -> Result<()> {
    let me = pipe.rank();
    if let Some(u) = stage.boundary_u() {
        pipe.send(&flatten_all(&u.params()).detach(), me + 1)?;
    }
    if let Some(u) = &stage.u_in {
        let params = u.params();
        let mut flat = flatten_all(&params).detach().zeros_like();
        pipe.recv(&mut flat, me - 1)?;
        crate::tensor::assign(&params, &unflatten_like(&flat, &params))?;
    }
    Ok(())
}
