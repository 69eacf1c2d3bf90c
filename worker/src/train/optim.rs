//! AdamW over trainable tensors only, the OneCycle schedule (PyTorch's `OneCycleLR` with
//! linear annealing and β1 cycling 0.95 → 0.85 → 0.95), as the authors' trainer uses them, and
//! the one training loop (`Run`) that the originals, the M/U matrices and KD all go through.

use crate::core::eval::accuracy;
use crate::core::tensor::assign;
use crate::train::progress::{LogRow, Progress};
use crate::train::resume;
use fsmerge_common::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use tch::Tensor;

/// Learning rate (and Adam β1) as a function of the step.
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    Constant(f64),
    OneCycle { max_lr: f64, total_steps: u64 },
}

const PCT_START: f64 = 0.3;

const DIV_FACTOR: f64 = 25.0;

const FINAL_DIV_FACTOR: f64 = 1e4;

const BETA1_MAX: f64 = 0.95;

const BETA1_BASE: f64 = 0.85;

/// β1 of plain (constant-schedule) Adam.
const BETA1: f64 = 0.9;

impl Schedule {
    /// The largest learning rate of the schedule.
    pub fn peak(&self) -> f64 {
        match *self {
            Schedule::Constant(lr) => lr,
            Schedule::OneCycle { max_lr, .. } => max_lr,
        }
    }

    /// (lr, β1) for 0-based `step`, matching torch.optim.lr_scheduler.OneCycleLR.
    pub fn at(&self, step: u64) -> (f64, f64) {
        match *self {
            Schedule::Constant(lr) => (lr, BETA1),
            Schedule::OneCycle {
                max_lr,
                total_steps,
            } => {
                let initial = max_lr / DIV_FACTOR;
                let min = initial / FINAL_DIV_FACTOR;
                let end1 = PCT_START * total_steps as f64 - 1.0;
                let end2 = total_steps as f64 - 1.0;
                let s = step as f64;
                let lin = |a: f64, b: f64, pct: f64| a + pct * (b - a);
                if s <= end1 {
                    let pct = if end1 > 0.0 { s / end1 } else { 1.0 };
                    (lin(initial, max_lr, pct), lin(BETA1_MAX, BETA1_BASE, pct))
                } else {
                    let pct = if end2 > end1 {
                        ((s - end1) / (end2 - end1)).min(1.0)
                    } else {
                        1.0
                    };
                    (lin(max_lr, min, pct), lin(BETA1_BASE, BETA1_MAX, pct))
                }
            }
        }
    }
}

/// torch.optim.AdamW (decoupled weight decay, bias correction with the current β1).
pub struct AdamW {
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i32,
    weight_decay: f64,
}

const BETA2: f64 = 0.999;

const EPS: f64 = 1e-8;

impl AdamW {
    pub fn new(params: &[Tensor], weight_decay: f64) -> Self {
        Self {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            m: params.iter().map(Tensor::zeros_like).collect(),
            v: params.iter().map(Tensor::zeros_like).collect(),
            step: 0,
            weight_decay,
        }
    }

    /// Everything a mid-phase checkpoint keeps of the optimiser: the parameters, both moments
    /// (named `param{i}`, `m{i}`, `v{i}`) and the step count.
    pub fn state(&self) -> (Vec<(String, &Tensor)>, i32) {
        let mut named = Vec::with_capacity(3 * self.params.len());
        for (what, ts) in [("param", &self.params), ("m", &self.m), ("v", &self.v)] {
            named.extend(
                ts.iter()
                    .enumerate()
                    .map(|(i, t)| (format!("{what}{i}"), t)),
            );
        }
        (named, self.step)
    }

    /// Continue from a `state` (tensors by the same names, each of its tensor's shape).
    pub fn restore(&mut self, tensors: &BTreeMap<String, Tensor>, step: i32) -> Result<()> {
        for (what, ts) in [("param", &self.params), ("m", &self.m), ("v", &self.v)] {
            let values = (0..ts.len())
                .map(|i| {
                    tensors
                        .get(&format!("{what}{i}"))
                        .map(|t| t.to_device(ts[i].device()))
                        .ok_or_else(|| Error::Compute(format!("no `{what}{i}` in the checkpoint")))
                })
                .collect::<Result<Vec<_>>>()?;
            assign(ts, &values)?;
        }
        self.step = step;
        Ok(())
    }

    /// Backpropagate `loss` into the parameters and apply one update.
    pub fn step(&mut self, loss: &Tensor, lr: f64, beta1: f64) -> Result<()> {
        let grads = gradients(loss, &self.params)?;
        self.apply(&grads, lr, beta1);
        Ok(())
    }

    /// Apply one update with given gradients (one per parameter).
    pub fn apply(&mut self, grads: &[Tensor], lr: f64, beta1: f64) {
        self.step += 1;
        let bc1 = 1.0 - beta1.powi(self.step);
        let bc2_sqrt = (1.0 - BETA2.powi(self.step)).sqrt();
        tch::no_grad(|| {
            for (((p, m), v), g) in self
                .params
                .iter_mut()
                .zip(&mut self.m)
                .zip(&mut self.v)
                .zip(grads)
            {
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.g_mul_scalar_(beta1);
                let _ = m.g_add_(&(g * (1.0 - beta1)));
                let _ = v.g_mul_scalar_(BETA2);
                let _ = v.addcmul_(&(g * (1.0 - BETA2)), g);
                let denom = v.sqrt() / bc2_sqrt + EPS;
                let _ = p.addcdiv_(&(m.shallow_clone() * (-lr / bc1)), &denom);
            }
        });
    }
}

/// One training run over `n` samples: epochs of shuffled batches, one AdamW step each.
pub struct Run<'a> {
    pub phase: &'a str,
    pub epochs: usize,
    pub batch_size: usize,
    /// Seeds the batch order.
    pub seed: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// The config field that sets the learning rate, named when training diverges.
    pub lr_field: &'a str,
}

/// How one original transformer classifier is trained (`fsmerge train`), each from its seed.
pub struct OriginalSpec<'a> {
    pub task: &'a str,
    pub classes: usize,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl OriginalSpec<'_> {
    /// AdamW (decoupled `weight_decay`) + OneCycle on `loss_of` of each batch of the `n`
    /// training samples' indices. Returns the log rows.
    fn fit(
        &self,
        params: &[Tensor],
        weight_decay: f64,
        n: usize,
        progress: &dyn Progress,
        loss_of: impl FnMut(&Tensor) -> Tensor,
    ) -> Result<Vec<LogRow>> {
        let run = Run {
            phase: &format!("train {}", self.task),
            epochs: self.epochs,
            batch_size: self.batch_size,
            seed: self.seed ^ 0xabcd,
            schedule: Schedule::OneCycle {
                max_lr: self.lr,
                total_steps: total_steps(n, self.batch_size, self.epochs).max(1),
            },
            weight_decay,
            lr_field: "train.lr",
        };
        run.optimise(params, n, progress, loss_of)
    }
}

/// A classifier trained from scratch by `fsmerge train` (a ViT, a BERT).
pub trait Classifier: Sized {
    /// Every tensor the training updates.
    fn params(&self) -> Vec<Tensor>;
    /// Class logits of data rows x [N, D].
    fn logits(&self, x: &Tensor) -> Tensor;
    /// A detached copy: the trained model, outside autograd.
    fn frozen(&self) -> Self;
}

impl OriginalSpec<'_> {
    /// Train the model `init` draws (after seeding libtorch with `seed`) with `fit` on
    /// `loss_of(model, batch)` over the `n` training samples (a batch: their indices); returns
    /// it frozen and the training log.
    pub fn train_by<M: Classifier>(
        &self,
        weight_decay: f64,
        init: impl FnOnce() -> M,
        n: usize,
        progress: &dyn Progress,
        loss_of: impl Fn(&M, &Tensor) -> Tensor,
    ) -> Result<(M, Vec<LogRow>)> {
        tch::manual_seed(self.seed as i64);
        let model = init();
        let params = model.params();
        for p in &params {
            let _ = p.set_requires_grad(true);
        }
        let log = self.fit(&params, weight_decay, n, progress, |idx| {
            loss_of(&model, idx)
        })?;
        Ok((model.frozen(), log))
    }

    /// Train the classifier `init` draws on the cross-entropy of its logits of each batch of
    /// `train` (inputs, labels) with `train_by`; returns it frozen, its validation accuracy
    /// and the training log.
    pub fn train<M: Classifier>(
        &self,
        weight_decay: f64,
        init: impl FnOnce() -> M,
        train: (&Tensor, &Tensor),
        val: (&Tensor, &Tensor),
        progress: &dyn Progress,
    ) -> Result<(M, f64, Vec<LogRow>)> {
        let n = train.0.size()[0] as usize;
        let (frozen, log) = self.train_by(weight_decay, init, n, progress, |model, idx| {
            model
                .logits(&train.0.index_select(0, idx))
                .cross_entropy_for_logits(&train.1.index_select(0, idx))
        })?;
        let val_acc = tch::no_grad(|| accuracy(&frozen.logits(val.0), val.1));
        Ok((frozen, val_acc, log))
    }
}

/// Optimiser steps of `epochs` over `n` samples in batches of `batch_size`.
pub fn total_steps(n: usize, batch_size: usize, epochs: usize) -> u64 {
    (n.div_ceil(batch_size) * epochs) as u64
}

impl Run<'_> {
    /// Optimise `params`; `loss_of` computes the loss of a batch of sample indices. A non-finite
    /// loss is an error naming the learning-rate field. Returns the log rows.
    pub fn optimise(
        &self,
        params: &[Tensor],
        n: usize,
        progress: &dyn Progress,
        mut loss_of: impl FnMut(&Tensor) -> Tensor,
    ) -> Result<Vec<LogRow>> {
        self.optimise_with(params, n, progress, |chunk| {
            let loss = loss_of(&Tensor::from_slice(chunk));
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Ok((value, Vec::new()));
            }
            Ok((value, gradients(&loss, params)?))
        })
    }

    /// The loop itself: `step_of(batch)` returns the batch's loss and the gradient of every
    /// parameter (a distributed stage computes them across workers). Every worker running the
    /// same `Run` sees the same batches in the same order.
    pub fn optimise_with(
        &self,
        params: &[Tensor],
        n: usize,
        progress: &dyn Progress,
        mut step_of: impl FnMut(&[i64]) -> Result<(f64, Vec<Tensor>)>,
    ) -> Result<Vec<LogRow>> {
        let params = [params.iter().map(Tensor::shallow_clone).collect()];
        let mut logs = lockstep(
            std::slice::from_ref(self),
            &params,
            n,
            self.phase,
            progress,
            |batches| Ok(vec![step_of(batches[0])?]),
        )?;
        Ok(logs.pop().unwrap_or_default())
    }

    /// Every batch of the run, in order: `epochs` seeded shuffles of 0..n, cut into batches.
    pub fn batches(&self, n: usize) -> Vec<Vec<i64>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut out = Vec::with_capacity(total_steps(n, self.batch_size, self.epochs) as usize);
        for _ in 0..self.epochs {
            let mut order: Vec<i64> = (0..n as i64).collect();
            order.shuffle(&mut rng);
            out.extend(order.chunks(self.batch_size).map(<[i64]>::to_vec));
        }
        out
    }
}

/// Independent runs advanced together, one step of each per round: `step_of` gets every run's
/// batch of the round and returns every run's (loss, gradients). Each run keeps its own batches,
/// schedule and optimizer, so the result equals running them one after another; a distributed
/// stage uses it to sum a round's gradients of all its layer problems in one all-reduce.
/// `label` names the whole for progress reports. Returns each run's log.
pub fn lockstep(
    runs: &[Run],
    params: &[Vec<Tensor>],
    n: usize,
    label: &str,
    progress: &dyn Progress,
    mut step_of: impl FnMut(&[&[i64]]) -> Result<Vec<(f64, Vec<Tensor>)>>,
) -> Result<Vec<Vec<LogRow>>> {
    let batches: Vec<Vec<Vec<i64>>> = runs.iter().map(|r| r.batches(n)).collect();
    let total = batches.first().map_or(0, Vec::len);
    if batches.iter().any(|b| b.len() != total) || params.len() != runs.len() {
        return Err(Error::Compute(format!(
            "{label}: runs in lockstep need the same number of steps and one parameter list each"
        )));
    }
    let mut opts: Vec<AdamW> = runs
        .iter()
        .zip(params)
        .map(|(r, p)| AdamW::new(p, r.weight_decay))
        .collect();
    let mut logs: Vec<Vec<LogRow>> = runs.iter().map(|_| Vec::with_capacity(total)).collect();
    // Inside a phase that `--resume` continues, from its mid-phase checkpoint.
    let start = resume::restore(label, total as u64, &mut opts, &mut logs)? as usize;
    progress.start(label, total as u64);
    for step in start..total {
        let round: Vec<&[i64]> = batches.iter().map(|b| b[step].as_slice()).collect();
        let results = step_of(&round)?;
        for (((run, opt), log), (value, grads)) in
            runs.iter().zip(&mut opts).zip(&mut logs).zip(results)
        {
            if !value.is_finite() {
                return Err(Error::Compute(format!(
                    "{}: training diverged at step {step} (loss {value}); lower the learning rate (`{}` = {})",
                    run.phase,
                    run.lr_field,
                    run.schedule.peak()
                )));
            }
            let (lr, beta1) = run.schedule.at(step as u64);
            opt.apply(&grads, lr, beta1);
            log.push(LogRow {
                phase: run.phase.to_string(),
                step: step as u64 + 1,
                loss: value,
                lr,
            });
        }
        resume::save_if_due(label, step as u64 + 1, total as u64, &opts, &logs)?;
        let last = logs.first().and_then(|l| l.last());
        progress.step(
            label,
            step as u64 + 1,
            last.map_or(0.0, |r| r.loss),
            last.map_or(0.0, |r| r.lr),
        );
    }
    progress.finish(label);
    Ok(logs)
}

/// Gradients of `loss` with respect to `params` (one per parameter).
pub fn gradients(loss: &Tensor, params: &[Tensor]) -> Result<Vec<Tensor>> {
    Tensor::f_run_backward(&[loss], params, false, false)
        .map_err(|e| Error::Compute(format!("backward: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_matches_pytorch_shape() {
        let s = Schedule::OneCycle {
            max_lr: 1.0,
            total_steps: 100,
        };
        let (lr0, b0) = s.at(0);
        assert!((lr0 - 0.04).abs() < 1e-12 && (b0 - 0.95).abs() < 1e-12);
        let (lr_peak, b_peak) = s.at(29);
        assert!((lr_peak - 1.0).abs() < 1e-12 && (b_peak - 0.85).abs() < 1e-12);
        let (lr_end, b_end) = s.at(99);
        assert!((lr_end - 0.04 / 1e4).abs() < 1e-12 && (b_end - 0.95).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimizes_a_quadratic() {
        let p = Tensor::from_slice(&[3.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(&[p.shallow_clone()], 0.0);
        for _ in 0..500 {
            let loss = (&p * &p).sum(tch::Kind::Float);
            opt.step(&loss, 0.05, 0.9).unwrap();
        }
        assert!(p.abs().max().double_value(&[]) < 0.05);
    }
}
