//! One stage of the plan as a worker holds it: the frozen layers `units` of every original model
//! (and the heads, on the last stage), their M/U, and the stage's teacher features.
//!
//! Which M/U a stage trains depends on the phase. Local problem l trains (M_l, U_l). The global
//! SuperNet's layer l reads U_{l−1} (it folds into W*_l), so in the global phase and when folding
//! a stage owns M_l of its layers, U_{l−1} of its layers (`u_in` for the first) and U_L on the
//! last stage; after local training the previous stage hands its last U over
//! (`boundary_u` → `u_in`). Every U is owned by exactly one stage, so the stages' global
//! parameters together are the single-process SuperNet's.

use crate::core::linear::Linear;
use crate::core::loss::reconstruction_loss;
use crate::core::merged_linear::{
    fold_layer, layer_forward, local_layer_forward, FrozenLayer, LayerMu,
};
use crate::core::mu::MuMatrix;
use crate::core::tensor::{flatten_all, named_groups, to_host, to_tch, unflatten_like};
use crate::dist::collective::Collective;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::EvalPart;
use crate::dist::pipeline::{index, mask, reduce_many, scaled, share, zero_grads};
use crate::dist::stage::{PipelineStage, StageData, WorkerStage};
use crate::families::mlp::eval;
use crate::families::mlp::supernet::seeded_mu;
use crate::train::optim::{gradients, lockstep, Run};
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::checkpoint::{
    body_bias, body_weight, head_bias, head_weight, HostTensor, MlpPart,
};
use fsmerge_common::config::MergeConfig;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use tch::{Device, Tensor};

pub struct StageNet {
    /// Global indices of this stage's layers.
    pub units: Range<usize>,
    pub layers: Vec<FrozenLayer>,
    pub mu: Vec<LayerMu>,
    /// U of the layer before the stage (None on stage 0, whose input is shared).
    pub u_in: Option<MuMatrix>,
    /// Each task's head (last stage only).
    pub heads: Vec<Linear>,
    pub task_names: Vec<String>,
    pub n: usize,
    pub last: bool,
    /// Bytes of the original models' tensors this stage holds.
    pub weight_bytes: u64,
    /// Width of the stage's input (data dimension on stage 0).
    pub in_dim: usize,
}

impl StageNet {
    /// Read the stage's tensors of every task's model from `models_dir` and draw the job's M/U
    /// init (the same values as the single-process SuperNet).
    pub fn load(
        models_dir: &Path,
        tasks: &[String],
        units: Range<usize>,
        merge: &MergeConfig,
        seed: u64,
    ) -> Result<Self> {
        let mut parts = Vec::new();
        let mut last = false;
        for t in tasks {
            let probe = MlpPart::load(models_dir, t, units.start..units.start, false)?;
            last = units.end == probe.config.hidden.len();
            parts.push(MlpPart::load(models_dir, t, units.clone(), last)?);
        }
        let config = parts[0].config.clone();
        for p in &parts[1..] {
            if p.config.hidden != config.hidden || p.config.input_dim != config.input_dim {
                return Err(Error::Mismatch(format!(
                    "{} has layers {:?} (input {}), {} has {:?} (input {})",
                    parts[0].file.display(),
                    config.hidden,
                    config.input_dim,
                    p.file.display(),
                    p.config.hidden,
                    p.config.input_dim
                )));
            }
        }
        let weight_bytes = parts.iter().map(MlpPart::bytes).sum();
        let layers = (0..units.len())
            .map(|j| FrozenLayer {
                wt: Tensor::stack(
                    &parts
                        .iter()
                        .map(|p| to_tch(&p.body[j].0).tr())
                        .collect::<Vec<_>>(),
                    0,
                )
                .contiguous(),
                b: Tensor::stack(
                    &parts
                        .iter()
                        .map(|p| to_tch(&p.body[j].1))
                        .collect::<Vec<_>>(),
                    0,
                ),
            })
            .collect();
        let heads = parts
            .iter()
            .filter_map(|p| p.head.as_ref())
            .map(|(w, b)| Linear {
                w: to_tch(w),
                b: to_tch(b),
            })
            .collect();
        drop(parts);
        let n = tasks.len();
        let mut all = seeded_mu(
            seed,
            merge.mu_type,
            merge.init,
            n,
            &config.hidden,
            merge.rank,
        )?;
        let mu: Vec<LayerMu> = all.drain(units.clone()).collect();
        let u_in = units.start.checked_sub(1).map(|l| all.swap_remove(l).u);
        let in_dim = match units.start {
            0 => config.input_dim,
            a => config.hidden[a - 1],
        };
        Ok(Self {
            units,
            layers,
            mu,
            u_in,
            heads,
            task_names: tasks.to_vec(),
            n,
            last,
            weight_bytes,
            in_dim,
        })
    }

    /// Width of the stage's output stream.
    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(self.in_dim, FrozenLayer::out_dim)
    }

    /// Parameters of local problem j (the stage's j-th layer): its M and U.
    pub fn local_params(&self, j: usize) -> Vec<Tensor> {
        self.mu[j].params()
    }

    /// The U this stage hands to the next one after local training.
    pub fn boundary_u(&self) -> Option<&MuMatrix> {
        (!self.last).then(|| &self.mu[self.mu.len() - 1].u)
    }

    /// Local problem j's reconstruction loss: `input` [n, B, k] (or x [B, D]) → `target`.
    pub fn local_loss(
        &self,
        j: usize,
        input: &Tensor,
        target: &Tensor,
        own_mask: Option<&Tensor>,
    ) -> Tensor {
        let pred = local_layer_forward(&self.layers[j], &self.mu[j], input);
        reconstruction_loss(&pred, target, own_mask)
    }
}

impl PipelineStage for StageNet {
    fn n(&self) -> usize {
        self.n
    }
    fn is_last(&self) -> bool {
        self.last
    }
    fn units(&self) -> Range<usize> {
        self.units.clone()
    }
    fn stream_dims(&self) -> Vec<i64> {
        vec![self.in_dim as i64]
    }
    /// Teacher features of the stage's layers: every model's activation after each layer,
    /// `[j]` is [n, N, k], from the stage input (x [N, D] on stage 0, else [n, N, k_in]).
    fn teacher(&self, input: &Tensor, _rows: &Tensor) -> Vec<Tensor> {
        tch::no_grad(|| {
            let mut h = input.shallow_clone();
            self.layers
                .iter()
                .map(|l| {
                    h = l.branches(&h).relu();
                    h.shallow_clone()
                })
                .collect()
        })
    }

    /// Parameters the stage trains in the global phase (see the module doc).
    fn global_params(&self) -> Vec<Tensor> {
        let mut p: Vec<Tensor> = self.u_in.iter().flat_map(MuMatrix::params).collect();
        let depth = self.mu.len();
        for (j, mu) in self.mu.iter().enumerate() {
            p.extend(mu.m.params());
            if j + 1 < depth || self.last {
                p.extend(mu.u.params());
            }
        }
        p
    }

    /// On the merged stream h [B, k_in] (x on stage 0): the next merged stream, or on the last
    /// stage the per-model outputs [n, B, k_L]. An MLP stage adds no loss terms of its own.
    fn forward(
        &self,
        h: &Tensor,
        _idx: &Tensor,
        _data: &StageData,
        s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>) {
        let form = s.form;
        let mut h = h.shallow_clone();
        for (j, layer) in self.layers.iter().enumerate() {
            let u_prev = if j == 0 {
                self.u_in.as_ref()
            } else {
                Some(&self.mu[j - 1].u)
            };
            h = layer_forward(layer, &self.mu[j].m, u_prev, &h, form);
        }
        let out = if self.last {
            self.mu[self.mu.len() - 1].u.unmerge(&h)
        } else {
            h
        };
        (out, None)
    }
}

impl WorkerStage for StageNet {
    /// Move everything to `device` (tensors of a CUDA worker).
    fn to_device(&mut self, device: Device) {
        for l in &mut self.layers {
            l.wt = l.wt.to_device(device);
            l.b = l.b.to_device(device);
        }
        for m in &mut self.mu {
            m.m.to_device(device);
            m.u.to_device(device);
        }
        if let Some(u) = &mut self.u_in {
            u.to_device(device);
        }
        for h in &mut self.heads {
            h.w = h.w.to_device(device);
            h.b = h.b.to_device(device);
        }
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
    fn feature_count(&self) -> usize {
        self.units.len()
    }
    fn train_local(
        &self,
        data: &StageData,
        s: &TrainSettings,
        _pipe: &mut dyn Collective,
        replicas: &mut dyn Collective,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>> {
        train_local(self, data, s, replicas, progress)
    }
    fn hand_over(&mut self, pipe: &mut dyn Collective) -> Result<()> {
        hand_over_boundary(self, pipe)
    }
    fn originals_part(&self) -> Box<dyn EvalPart + '_> {
        Box::new(eval::OriginalsPart(self))
    }
    fn original_tensors(&self) -> Result<Vec<Vec<(String, Tensor)>>> {
        Ok(eval::original_tensors(self))
    }
    fn student(&self) -> Result<Box<dyn StudentPart>> {
        Ok(Box::new(eval::Student::of(self)))
    }
    fn regmean(&self, data: &StageData, alpha: f64) -> Result<BTreeMap<String, Tensor>> {
        eval::regmean(self, data, alpha)
    }
    fn merged_part(&self, tensors: BTreeMap<String, Tensor>) -> Result<Box<dyn EvalPart>> {
        Ok(Box::new(eval::MergedPart::new(self, tensors)?))
    }
    /// Every M/U the stage holds, named, for checkpoints.
    fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut groups = Vec::new();
        if let Some(u) = &self.u_in {
            groups.push((format!("layer{}.u", self.units.start - 1), u.params()));
        }
        for (j, mu) in self.mu.iter().enumerate() {
            let l = self.units.start + j;
            groups.push((format!("layer{l}.m"), mu.m.params()));
            groups.push((format!("layer{l}.u"), mu.u.params()));
        }
        named_groups(groups)
    }

    /// The folded stage: W*_l, b*_l of its layers (PyTorch layout) and, on the last stage, each
    /// task's head with its read-out U_L⁽ᵗ⁾ folded in; named as in the merged checkpoint.
    fn fold(&self) -> Result<Vec<(String, HostTensor)>> {
        tch::no_grad(|| {
            let mut out = Vec::new();
            for (j, layer) in self.layers.iter().enumerate() {
                let l = self.units.start + j;
                let u_prev = if j == 0 {
                    self.u_in.as_ref()
                } else {
                    Some(&self.mu[j - 1].u)
                };
                let (wt, b) = fold_layer(layer, &self.mu[j].m, u_prev);
                out.push((body_weight(l), to_host(&wt.tr())?));
                out.push((body_bias(l), to_host(&b)?));
            }
            if self.last {
                let u_last = &self.mu[self.mu.len() - 1].u;
                for (t, (name, h)) in self.task_names.iter().zip(&self.heads).enumerate() {
                    let w = h.w.matmul(&u_last.block(t).tr());
                    out.push((head_weight(Some(name)), to_host(&w)?));
                    out.push((head_bias(Some(name)), to_host(&h.b)?));
                }
            }
            Ok(out)
        })
    }
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
        crate::core::tensor::assign(&params, &unflatten_like(&flat, &params))?;
    }
    Ok(())
}
