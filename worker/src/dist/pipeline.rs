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

use crate::core::loss::own_mask;
use crate::core::tensor::CHUNK;
use crate::core::tensor::{flatten_all, unflatten_like};
use crate::dist::collective::Collective;
use crate::dist::feature_cache;
use crate::dist::stage::{batch_view, sum_terms, PipelineStage, StageData};
use crate::train::optim::gradients;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::config::Targets;
use fsmerge_common::precision::Precision;
use fsmerge_common::{Error, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Member `r` of `n`'s contiguous share of a batch.
pub fn share(batch: &[i64], r: usize, n: usize) -> &[i64] {
    &batch[r * batch.len() / n..(r + 1) * batch.len() / n]
}

pub(crate) fn index(ids: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(ids).to_device(device)
}

pub(crate) fn mask(n: usize, data: &StageData, idx: &Tensor, targets: Targets) -> Option<Tensor> {
    (targets == Targets::Own).then(|| own_mask(&data.task.index_select(0, idx), n))
}

/// Sum gradients and the loss over the replicas (one buffer); identity for one replica.
pub(crate) fn reduce(
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

pub(crate) fn zero_grads(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(Tensor::zeros_like).collect()
}

/// The two groups a stage's worker belongs to: its pipeline (every stage, same replica
/// index) and its replicas (same stage).
pub struct Collectives<'a> {
    pub pipe: &'a mut dyn Collective,
    pub replicas: &'a mut dyn Collective,
}

/// The terms of a stage's local loss of samples `idx`, read from `data` (the stage's, or a
/// batch view of recomputed features), handed to `emit` one at a time.
pub type LocalTerms<'a> =
    dyn Fn(&StageData, &Tensor, &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> + 'a;

/// A transformer stage's local phase: its units' problems (and the output's on the last
/// stage) in one run seeded like the single-process one; `terms(idx, emit)` emits the stage's
/// local loss of samples idx term by term (a block's problem each), and each term is
/// backpropagated as it comes, so one block's activations are alive at a time, not the stage's.
/// Each step sums the gradients over the replicas, then the `shared` ones (M_res/U_res, held
/// by every stage) and the loss over the stages: every copy of the shared parameters gets the
/// single-process gradient, and every stage logs the total loss.
pub fn train_local_shared<S: PipelineStage + ?Sized>(
    stage: &S,
    data: &StageData,
    s: &TrainSettings,
    groups: Collectives,
    (own, shared): (&[Tensor], &[Tensor]),
    progress: &dyn Progress,
    terms: &LocalTerms,
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
            let mut value = 0.0;
            if !part.is_empty() {
                let idx = index(part, device);
                let view = batch_view(stage, data, &idx);
                terms(view.as_ref().unwrap_or(data), &idx, &mut |term| {
                    let term = scaled(term, part.len(), batch.len());
                    value += term.double_value(&[]);
                    // A stage of embeddings alone may have no local problem of its own: it
                    // only keeps its copy of M_res/U_res in step with the others.
                    if term.requires_grad() {
                        term.f_backward()
                            .map_err(|e| Error::Compute(format!("backward: {e}")))?;
                    }
                    Ok(())
                })?;
            }
            let grads = take_grads(&params);
            let (mut grads, losses) = reduce_many(replicas, grads, &[value])?;
            let shared_grads = grads.split_off(own.len());
            let (shared_grads, losses) = reduce_many(pipe, shared_grads, &losses)?;
            grads.extend(shared_grads);
            Ok((losses[0], grads))
        })
}

/// The gradients `backward` accumulated in `params` (zero where none reached), which are reset.
fn take_grads(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| {
            let g = p.grad();
            if g.defined() {
                let taken = g.detach().copy();
                p.shallow_clone().zero_grad();
                taken
            } else {
                p.zeros_like()
            }
        })
        .collect()
}

/// Train the global SuperNet's parameters of this stage in the pipeline `pipe` (member s is
/// stage s of this replica index) with `micro_batches` micro-batches per replica share.
pub fn train_global<S: PipelineStage + ?Sized>(
    stage: &S,
    data: &StageData,
    s: &TrainSettings,
    pipe: &mut dyn Collective,
    replicas: &mut dyn Collective,
    schedule: Schedule,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    train_pipelined(
        "global",
        stage,
        data,
        s,
        Collectives { pipe, replicas },
        schedule,
        progress,
    )
}

/// How the global step runs its micro-batches: how many per replica share, and whether
/// their activations are checkpointed (`merge.checkpoint_activations`).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub micro_batches: usize,
    pub checkpoint: bool,
}

/// Train `stage.global_params()` as a pipeline over the stages (GPipe), the last stage's
/// `PipelineStage::loss` the objective, logged as phase `phase`: the global phase, and KD.
pub fn train_pipelined<S: PipelineStage + ?Sized>(
    phase: &str,
    stage: &S,
    data: &StageData,
    s: &TrainSettings,
    groups: Collectives,
    schedule: Schedule,
    progress: &dyn Progress,
) -> Result<Vec<LogRow>> {
    let Collectives { pipe, replicas } = groups;
    let params = stage.global_params();
    let me = pipe.rank();
    if stage.is_last() != (me + 1 == pipe.size()) {
        return Err(Error::Plan(format!(
            "stage {me} of {} disagrees with its units {:?} about being last",
            pipe.size(),
            stage.units()
        )));
    }
    let step = GlobalStep {
        stage,
        data,
        s,
        me,
        first: me == 0,
        last: stage.is_last(),
        dims: stage.stream_dims(),
        device: data.task.device(),
        checkpoint: schedule.checkpoint,
    };
    let micro_batches = schedule.micro_batches;
    s.run(phase, data.len(), s.seed)
        .optimise_with(&params, data.len(), progress, |batch| {
            let part = share(batch, replicas.rank(), replicas.size());
            let mbs: Vec<&[i64]> = (0..micro_batches)
                .map(|k| share(part, k, micro_batches))
                .filter(|mb| !mb.is_empty())
                .collect();
            let whole = mbs.len() == 1 && part.len() == batch.len();
            let saved = mbs
                .iter()
                .map(|mb| step.forward(mb, batch.len(), whole, pipe))
                .collect::<Result<Vec<_>>>()?;
            let (grads, loss) = step.backward(&params, saved, pipe)?;
            reduce(replicas, grads, loss)
        })
}

/// One stage's part of a global step (GPipe): every micro-batch forward, then every one
/// backward, last first.
struct GlobalStep<'a, S: ?Sized> {
    stage: &'a S,
    data: &'a StageData,
    s: &'a TrainSettings,
    me: usize,
    first: bool,
    last: bool,
    /// Per-sample shape of the merged stream entering the stage.
    dims: Vec<i64>,
    device: Device,
    /// Keep each segment's input only, and recompute the segments in the backward.
    checkpoint: bool,
}

/// What a micro-batch's backward needs from its forward: the stage input (a leaf that requires
/// grad, except on stage 0), the stage output (on the last stage: the loss), the stage's own
/// loss terms, and (last stage) the loss value; with checkpointing, instead of the graph, each
/// segment's input and what recomputing needs.
struct Saved {
    input: Tensor,
    out: Tensor,
    own: Option<Tensor>,
    value: f64,
    checkpoint: Option<Checkpoint>,
}

/// A checkpointed micro-batch: each segment's input (detached), its samples, the batch view
/// its targets were recomputed in (recomputed features), and its share of the batch.
struct Checkpoint {
    inputs: Vec<Tensor>,
    idx: Tensor,
    view: Option<StageData>,
    share: Option<(usize, usize)>,
}

/// A loss term weighted by its micro-batch's share (`part` of `batch` samples), if any.
fn weighted(loss: Tensor, share: Option<(usize, usize)>) -> Tensor {
    match share {
        Some((part, batch)) => scaled(loss, part, batch),
        None => loss,
    }
}

impl<S: PipelineStage + ?Sized> GlobalStep<'_, S> {
    /// The micro-batch `mb` of a batch of `batch` samples forward through this stage: stage 0
    /// reads its inputs, every other stage receives the merged stream and the value of the
    /// stages' own loss terms so far; the last stage computes the loss, the others send on.
    fn forward(
        &self,
        mb: &[i64],
        batch: usize,
        whole: bool,
        pipe: &mut dyn Collective,
    ) -> Result<Saved> {
        let (me, f32_on) = (self.me, (Kind::Float, self.device));
        let idx = index(mb, self.device);
        let share = (!whole).then_some((mb.len(), batch));
        // The last stage's targets, recomputed when the stage does not keep them.
        let view = if self.last {
            batch_view(self.stage, self.data, &idx)
        } else {
            None
        };
        let data = view.as_ref().unwrap_or(self.data);
        let (input, acc_in) = if self.first {
            (data.pick(&data.input, 0, &idx), 0.0)
        } else {
            let numel = mb.len() as i64 * self.dims.iter().product::<i64>();
            let mut t = Tensor::zeros([numel + 1], f32_on);
            pipe.recv(&mut t, me - 1)?;
            let shape: Vec<i64> = [mb.len() as i64]
                .iter()
                .chain(&self.dims)
                .copied()
                .collect();
            let stream = t.narrow(0, 0, numel).view(shape.as_slice());
            (
                stream.detach().set_requires_grad(true),
                t.double_value(&[numel]),
            )
        };
        let (out, own, inputs) = if self.checkpoint {
            // Each segment's input kept; no graph.
            tch::no_grad(|| {
                let (mut x, mut own, mut inputs) = (input.detach(), None, Vec::new());
                for k in 0..self.stage.segments() {
                    let (y, o) = self.stage.forward_segment(k, &x, &idx, data, self.s);
                    inputs.push(x);
                    own = sum_terms(own, o);
                    x = y;
                }
                (x, own, Some(inputs))
            })
        } else {
            let (out, own) = self.stage.forward(&input, &idx, data, self.s);
            (out, own, None)
        };
        let own = own.map(|o| weighted(o, share));
        let acc = acc_in + own.as_ref().map_or(0.0, |o| o.double_value(&[]));
        let checkpoint = inputs.map(|inputs| Checkpoint {
            inputs,
            idx: idx.shallow_clone(),
            view: None,
            share,
        });
        if self.last {
            let recon = weighted(self.stage.loss(&out, &idx, data, self.s), share);
            let value = recon.double_value(&[]) + acc;
            let loss = match own {
                Some(o) => recon + o,
                None => recon,
            };
            Ok(Saved {
                input,
                out: loss,
                own: None,
                value,
                checkpoint: checkpoint.map(|c| Checkpoint { view, ..c }),
            })
        } else {
            let acc_t = Tensor::from_slice(&[acc as f32]).to_device(self.device);
            pipe.send(
                &Tensor::cat(&[out.detach().reshape([-1]), acc_t], 0),
                me + 1,
            )?;
            Ok(Saved {
                input,
                out,
                own,
                value: 0.0,
                checkpoint,
            })
        }
    }

    /// Every micro-batch backward, last first: the last stage from its loss, the others from
    /// the stream's gradient the next stage sends back (with the micro-batch's loss); each
    /// stage but the first sends its input's gradient back. Returns the summed gradients of
    /// `params` and the batch's loss.
    fn backward(
        &self,
        params: &[Tensor],
        saved: Vec<Saved>,
        pipe: &mut dyn Collective,
    ) -> Result<(Vec<Tensor>, f64)> {
        let (me, f32_on) = (self.me, (Kind::Float, self.device));
        let mut grads = zero_grads(params);
        let mut loss_sum = 0.0;
        for m in saved.into_iter().rev() {
            // The gradient of the stage output and the micro-batch's loss.
            let (g_out, loss) = if self.last {
                (None, m.value)
            } else {
                let numel = m.out.numel() as i64;
                let mut back = Tensor::zeros([numel + 1], f32_on);
                pipe.recv(&mut back, me + 1)?;
                let g_out = back.narrow(0, 0, numel).view(m.out.size().as_slice());
                (Some(g_out), back.double_value(&[numel]))
            };
            loss_sum += loss;
            let (g, g_in) = match &m.checkpoint {
                Some(c) => self.recompute(params, c, g_out)?,
                None => {
                    let mut wrt: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
                    if !self.first {
                        wrt.push(m.input.shallow_clone());
                    }
                    let objective = match &g_out {
                        None => m.out.shallow_clone(),
                        Some(g_out) => {
                            let surrogate = (&m.out * g_out).sum(Kind::Float);
                            match m.own {
                                Some(o) => surrogate + o,
                                None => surrogate,
                            }
                        }
                    };
                    let mut g = gradients(&objective, &wrt)?;
                    let g_in = (!self.first).then(|| g.pop()).flatten();
                    (g, g_in)
                }
            };
            if !self.first {
                let g_in = g_in.unwrap_or_else(|| Tensor::zeros([0], f32_on));
                let loss_t = Tensor::from_slice(&[loss as f32]).to_device(self.device);
                pipe.send(&Tensor::cat(&[g_in.reshape([-1]), loss_t], 0), me - 1)?;
            }
            add_defined(&mut grads, g);
        }
        Ok((grads, loss_sum))
    }

    /// A checkpointed micro-batch's backward: each segment recomputed from its saved input,
    /// last first, and backpropagated at once (one segment's graph alive at a time), from the
    /// loss on the last stage, else from the output's gradient `g_out`. Returns the gradients
    /// of `params` (undefined where a segment does not reach one) and of the stage input.
    fn recompute(
        &self,
        params: &[Tensor],
        c: &Checkpoint,
        g_out: Option<Tensor>,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let data = c.view.as_ref().unwrap_or(self.data);
        let mut grads = zero_grads(params);
        let mut g = g_out;
        let segments = c.inputs.len();
        for k in (0..segments).rev() {
            let needs_in = k > 0 || !self.first;
            let x = c.inputs[k].detach();
            let x = if needs_in {
                x.set_requires_grad(true)
            } else {
                x
            };
            let (y, own) = self.stage.forward_segment(k, &x, &c.idx, data, self.s);
            let own = own.map(|o| weighted(o, c.share));
            let objective = match &g {
                Some(g) => (&y * g).sum(Kind::Float),
                None => weighted(self.stage.loss(&y, &c.idx, data, self.s), c.share),
            };
            let objective = match own {
                Some(o) => objective + o,
                None => objective,
            };
            let mut wrt: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
            if needs_in {
                wrt.push(x.shallow_clone());
            }
            let mut gs = gradients(&objective, &wrt)?;
            g = if needs_in { gs.pop() } else { None };
            add_defined(&mut grads, gs);
        }
        Ok((grads, g))
    }
}

/// Add each defined gradient of `g` to `acc` (a segment leaves the others' undefined).
fn add_defined(acc: &mut [Tensor], g: Vec<Tensor>) {
    for (a, g) in acc.iter_mut().zip(g) {
        if g.defined() {
            *a = &*a + g;
        }
    }
}

/// The teacher features of a stage: `trace(i, start, len)` runs model i's units on rows
/// start..start + len of the stage input and returns every feature of those rows; chunks of
/// `CHUNK` rows are copied into each feature's [n, N, ..] as they come (no second copy of a
/// whole stream to concatenate or stack).
pub fn stacked_traces(
    n: usize,
    rows: i64,
    trace: &dyn Fn(usize, i64, i64) -> Vec<Tensor>,
) -> Vec<Tensor> {
    let mut out: Vec<Tensor> = Vec::new();
    for i in 0..n {
        for (s, len) in chunks_of(rows, CHUNK) {
            let feats = trace(i, s, len);
            if out.is_empty() {
                out = feats
                    .iter()
                    .map(|f| {
                        let mut shape = f.size();
                        shape[0] = rows;
                        shape.insert(0, n as i64);
                        Tensor::zeros(shape.as_slice(), (f.kind(), f.device()))
                    })
                    .collect();
            }
            for (to, f) in out.iter().zip(&feats) {
                let mut rows_of = to.get(i as i64).narrow(0, s, len);
                tch::no_grad(|| rows_of.copy_(f));
            }
        }
    }
    out
}

/// Where `flow_features` keeps a stage's teacher features.
pub enum FeatureSink<'a> {
    Memory,
    /// A mapped file at `path` (`scratch`: without a name, private to this worker), filled
    /// chunk by chunk of rows and named when complete.
    Disk {
        path: &'a Path,
        scratch: bool,
    },
    /// Nowhere: the stage keeps its input alone and recomputes a batch's features when it
    /// needs them (`stage::batch_view`).
    Recompute,
}

/// Move teacher features down the pipeline: stage 0 starts from the merge inputs, every later
/// stage receives the previous stage's last features; each computes its own and forwards its
/// last layer's. `start` is (x, task) on stage 0. The stream goes over the wire in chunks of
/// `CHUNK` rows, model by model, so neither side needs it whole in one buffer.
pub fn flow_features<S: PipelineStage + ?Sized>(
    stage: &S,
    pipe: &mut dyn Collective,
    start: Option<(Tensor, Tensor)>,
    sink: FeatureSink,
) -> Result<StageData> {
    let me = pipe.rank();
    let device = pipe.device();
    let n = stage.n() as i64;
    let (x, task) = match start {
        Some((x, task)) => (Some(x), task),
        None => {
            let mut header = Tensor::zeros([1], (Kind::Float, device));
            pipe.recv(&mut header, me - 1)?;
            let len = header.double_value(&[0]) as i64;
            let mut task = Tensor::zeros([len], (Kind::Float, device));
            pipe.recv(&mut task, me - 1)?;
            (None, task.to_kind(Kind::Int64))
        }
    };
    let len = task.size()[0];
    let row_dim = usize::from(x.is_none());
    let stored = crate::core::tensor::kind_of(stage.precision());
    let rows_of = |s: i64, l: i64| Tensor::arange_start(s, s + l, (Kind::Int64, device));
    let input_shape: Vec<i64> = match &x {
        Some(x) => x.size(),
        None => [n, len]
            .iter()
            .chain(&stage.stream_dims())
            .copied()
            .collect(),
    };
    let send_on = !stage.is_last();
    if send_on {
        pipe.send(&Tensor::from_slice(&[len as f32]).to_device(device), me + 1)?;
        pipe.send(&task.to_kind(Kind::Float), me + 1)?;
    }
    // The wire's chunks: rows of one model's stream up to `WIRE_BYTES`, a function of the
    // stream's shape, which both ends know.
    let stream_floats = |dims: &[i64]| dims.iter().product::<i64>().max(1);
    let wire = |floats: i64| chunks_of(len, WIRE_BYTES / (4 * floats));
    let in_wire = wire(stream_floats(&stage.stream_dims()));
    let receive = |pipe: &mut dyn Collective, x: Option<Tensor>| -> Result<Tensor> {
        match x {
            Some(x) => Ok(x),
            None => {
                let input = Tensor::zeros(input_shape.as_slice(), (stored, device));
                recv_rows(pipe, &input, &in_wire, n)?;
                Ok(input)
            }
        }
    };
    let disk = match sink {
        FeatureSink::Disk { path, scratch } if len > 0 => Some((path, scratch)),
        FeatureSink::Memory | FeatureSink::Disk { .. } => {
            let input = receive(pipe, x)?;
            let feats = tch::no_grad(|| stage.teacher(&input, &rows_of(0, len)));
            if send_on {
                let last = &feats[feats.len() - 1];
                for &(s, l) in &wire(stream_floats(&last.size()[2..])) {
                    send_rows(pipe, &last.narrow(1, s, l), n)?;
                }
            }
            return Ok(StageData::new(input, feats, task));
        }
        FeatureSink::Recompute => None,
    };
    // The features' shapes, from one row through the stage.
    let probe = match &x {
        Some(x) => x.narrow(0, 0, 1),
        None => {
            let mut one_row = input_shape.clone();
            one_row[1] = 1;
            Tensor::zeros(one_row.as_slice(), (stored, device))
        }
    };
    let shapes: Vec<Vec<i64>> = tch::no_grad(|| stage.teacher(&probe, &rows_of(0, 1)))
        .iter()
        .map(|f| {
            let mut s = f.size();
            s[1] = len;
            s
        })
        .collect();
    let (mut data, mut file) = match disk {
        Some((path, scratch)) => {
            // Stage 0's input (the merge rows: pixels, token ids) stays fp32.
            let input_precision = match x {
                Some(_) => Precision::Fp32,
                None => stage.precision(),
            };
            let (mut data, file) = feature_cache::create_mapped(
                path,
                (&input_shape, input_precision),
                &shapes,
                stage.precision(),
                &task.to_device(Device::Cpu),
                scratch,
            )?;
            data.task = task;
            match &x {
                Some(x) => tch::no_grad(|| data.input.copy_(x)),
                None => recv_rows(pipe, &data.input, &in_wire, n)?,
            }
            (data, Some(file))
        }
        None => {
            let mut data = StageData::new(receive(pipe, x)?, Vec::new(), task);
            data.recompute = true;
            (data, None)
        }
    };
    // The teacher runs on chunks whose features (every model's, at every boundary) stay
    // under `COMPUTE_BYTES`: the file takes them chunk by chunk, and the last features go
    // on in the wire's chunks as those complete.
    let row_floats: i64 = shapes.iter().map(|f| f[0] * stream_floats(&f[2..])).sum();
    let out_wire = wire(stream_floats(&shapes[shapes.len() - 1][2..]));
    let mut sent = 0;
    // The last features computed but not yet sent: (first row, [n, rows, ..]).
    let mut pending: Option<(i64, Tensor)> = None;
    for (s, l) in chunks_of(len, COMPUTE_BYTES / (4 * row_floats.max(1))) {
        let rows = data.input.narrow(row_dim as i64, s, l).to_device(device);
        let feats = tch::no_grad(|| stage.teacher(&rows, &rows_of(s, l)));
        for (to, f) in data.feats.iter().zip(&feats) {
            let mut rows = to.narrow(1, s, l);
            tch::no_grad(|| rows.copy_(f));
        }
        if !send_on {
            continue;
        }
        let last = &feats[feats.len() - 1];
        let (first, buf) = match pending.take() {
            Some((p, b)) => (p, Tensor::cat(&[b, last.shallow_clone()], 1)),
            None => (s, last.shallow_clone()),
        };
        while sent < out_wire.len() && out_wire[sent].0 + out_wire[sent].1 <= s + l {
            let (ws, wl) = out_wire[sent];
            send_rows(pipe, &buf.narrow(1, ws - first, wl), n)?;
            sent += 1;
        }
        let done = out_wire.get(sent).map_or(s + l, |w| w.0);
        if done < s + l {
            pending = Some((done, buf.narrow(1, done - first, s + l - done)));
        }
    }
    if let Some(mut file) = file.take() {
        file.commit()?;
        data.backing = Some(std::sync::Arc::new(file));
    }
    Ok(data)
}

/// Most bytes of one model's stream rows in one message between stages.
const WIRE_BYTES: i64 = 64 << 20;

/// Most bytes of teacher features (every model's, every boundary) computed at once when they
/// go to disk.
const COMPUTE_BYTES: i64 = 256 << 20;

/// `len` rows in chunks of `rows` (at least 1, at most `CHUNK`): (start, length) each.
fn chunks_of(len: i64, rows: i64) -> Vec<(i64, i64)> {
    let rows = rows.clamp(1, CHUNK);
    (0..len)
        .step_by(rows as usize)
        .map(|s| (s, rows.min(len - s)))
        .collect()
}

/// Send a chunk of rows [n, l, ..] of every model's stream to the next stage, model by model.
fn send_rows(pipe: &mut dyn Collective, rows: &Tensor, n: i64) -> Result<()> {
    let next = pipe.rank() + 1;
    for i in 0..n {
        // The wire carries f32.
        pipe.send(&rows.get(i).to_kind(Kind::Float).contiguous(), next)?;
    }
    Ok(())
}

/// Receive the previous stage's stream into `into` [n, N, ..] (any device), in the chunks of
/// rows and the order `send_rows` sends them.
fn recv_rows(
    pipe: &mut dyn Collective,
    into: &Tensor,
    chunks: &[(i64, i64)],
    n: i64,
) -> Result<()> {
    let prev = pipe.rank() - 1;
    let device = pipe.device();
    for &(s, l) in chunks {
        for i in 0..n {
            let mut to = into.get(i).narrow(0, s, l);
            let mut buf = Tensor::zeros(to.size().as_slice(), (Kind::Float, device));
            pipe.recv(&mut buf, prev)?;
            tch::no_grad(|| to.copy_(&buf));
        }
    }
    Ok(())
}
