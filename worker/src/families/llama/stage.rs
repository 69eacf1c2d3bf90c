//! One stage of a distributed Llama merge: plan units `units` (unit 0 is the token
//! embeddings, unit 1 + l is block l) of every original, read from their HF folders, as a part
//! of the SuperNet (`LlamaSuperNet::from_parts` without blocks: the single-process M/U values;
//! its frozen blocks are stacked from the originals by `prepare`, when the originals go). The
//! stage holding the last block also holds the final norm, U_final and the task heads.
//!
//! Every unit needs the attention mask of its samples, a function of the merge rows (token
//! ids, `[PAD]` = 0) that every worker rebuilds as stage 0 does, so no stage sends it.
//!
//! Teacher features (`PipelineStage::teacher`) are the n models' streams after each of the
//! stage's units, [n, N, T, d], and on the last stage their final hidden states (after the
//! final norm) [n, N, T, d], which the loss reconstructs at every real token.

use crate::core::linear::Linear;
use crate::core::loss::{own_mask, token_loss};
use crate::core::mu::with_mu_seed;
use crate::core::tensor::{f32, to_host};
use crate::data::text::tokens;
use crate::dist::collective::Collective;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{next_token_stats, own_heads_logits, EvalPart, OriginalsPart, Readout};
use crate::dist::pipeline::{stacked_traces, train_local_shared, Collectives};
use crate::dist::stage::{named_heads, PipelineStage, StageData, WorkerStage};
use crate::families::llama::eval::{self, read_out};
use crate::families::llama::merge::local_loss;
use crate::families::llama::part::{head_name, LlamaPart};
use crate::families::llama::supernet::LlamaSuperNet;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{TrainSettings, GLOBAL_SEED_OFFSET};
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::config::{Features, MergeConfig, Targets};
use fsmerge_common::precision::Precision;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

pub struct LlamaStage {
    sn: LlamaSuperNet,
    task_names: Vec<String>,
    /// The originals' parts, for the teacher features (their blocks go to the SuperNet in
    /// `prepare`).
    originals: Vec<LlamaPart>,
    /// On the last stage, each task's `score` or `lm_head` (a linear map with a zero bias).
    heads: Vec<Linear>,
    /// What the heads read: the last real token (classifiers) or every token (causal LMs).
    readout: Readout,
    /// Attention mask of every merge row [N, T] (1 = token, 0 = `[PAD]`).
    mask: Tensor,
    res_consistency: f64,
    weight_bytes: u64,
    precision: Precision,
    /// `merge.features = "recompute"`: the teacher runs every step, so it outlives `prepare`.
    recompute: bool,
}

impl LlamaStage {
    /// Read units `units` of every task's Llama (`dirs`, in task order) and draw the job's
    /// M/U; `rows` are the merge rows (token ids as f32 [N, T]), for the attention mask. The
    /// heads are read out as `readout` (the job's objective).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        dirs: &[PathBuf],
        tasks: &[String],
        units: Range<usize>,
        merge: &MergeConfig,
        seed: u64,
        rows: &Tensor,
        precision: Precision,
        readout: Readout,
    ) -> Result<Self> {
        let mut parts = dirs
            .iter()
            .map(|d| {
                let mut part = LlamaPart::load(d, units.clone())?;
                part.store_in(crate::core::tensor::kind_of(precision));
                Ok(part)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&LlamaPart> = parts.iter().collect();
        let sn = with_mu_seed(seed, || {
            LlamaSuperNet::from_parts(&refs, (merge.mu_type, merge.init, merge.rank), false)
        })?;
        // The originals' tables become views of the SuperNet's stacked copy (one copy held).
        for (i, p) in parts.iter_mut().enumerate() {
            if let Some(e) = sn.model_embed(i) {
                p.embed = Some(e);
            }
        }
        let heads = if sn.has_output() {
            (dirs.iter().zip(&parts))
                .map(|(dir, p)| match &p.head {
                    Some(h) if p.readout == readout => Ok(h.copy()),
                    _ => Err(Error::Tensor {
                        file: dir.clone(),
                        tensor: head_name(readout).into(),
                        msg: "the model has no such head to fold its read-out into (the job's model.llama.objective says which)"
                            .into(),
                    }),
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            sn,
            task_names: tasks.to_vec(),
            weight_bytes: parts.iter().map(LlamaPart::bytes).sum(),
            originals: parts,
            heads,
            readout,
            mask: tokens(rows).1,
            res_consistency: merge.res_consistency,
            precision,
            recompute: merge.features == Features::Recompute,
        })
    }

    /// The originals' streams after unit k of samples `idx` [n, B, T, d].
    fn stream(&self, data: &StageData, k: usize, idx: &Tensor) -> Tensor {
        f32(&data.pick(data.stream(self.sn.units().start, k), 1, idx))
    }

    /// The stage's part of the local loss of samples `idx`.
    fn local_loss(
        &self,
        data: &StageData,
        idx: &Tensor,
        s: &TrainSettings,
        emit: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let own = (s.targets == Targets::Own)
            .then(|| own_mask(&data.task.index_select(0, idx), self.n()));
        let ids = if self.sn.has_embeddings() {
            tokens(&data.pick(&data.input, 0, idx)).0
        } else {
            Tensor::zeros([0], (Kind::Int64, idx.device()))
        };
        let last = if self.is_last() {
            f32(&data.pick(&data.feats[data.feats.len() - 1], 1, idx))
        } else {
            Tensor::zeros([0], (Kind::Float, idx.device()))
        };
        local_loss(
            &self.sn,
            &ids,
            &self.mask.index_select(0, idx),
            &|k| self.stream(data, k, idx),
            &last,
            own.as_ref(),
            (s.form, self.res_consistency),
            emit,
        )
    }
}

impl PipelineStage for LlamaStage {
    fn n(&self) -> usize {
        self.sn.n
    }
    fn precision(&self) -> Precision {
        self.precision
    }
    fn is_last(&self) -> bool {
        self.sn.has_output()
    }
    fn units(&self) -> Range<usize> {
        self.sn.units()
    }
    fn stream_dims(&self) -> Vec<i64> {
        vec![self.mask.size()[1], self.sn.cfg.hidden_size as i64]
    }

    fn teacher(&self, input: &Tensor, rows: &Tensor) -> Vec<Tensor> {
        let first = self.sn.has_embeddings();
        let count = input.size()[if first { 0 } else { 1 }];
        tch::no_grad(|| {
            stacked_traces(self.n(), count, &|i, start, len| {
                let mask = self.mask.index_select(0, &rows.narrow(0, start, len));
                let x = if first {
                    tokens(&input.narrow(0, start, len)).0
                } else {
                    input.get(i as i64).narrow(0, start, len)
                };
                self.originals[i].trace(&x, &mask)
            })
        })
    }

    fn global_params(&self) -> Vec<Tensor> {
        self.sn.params()
    }

    fn forward(
        &self,
        input: &Tensor,
        idx: &Tensor,
        data: &StageData,
        s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>) {
        crate::dist::stage::by_segments(self, input, idx, data, s)
    }

    fn segments(&self) -> usize {
        self.sn.segments()
    }

    fn forward_segment(
        &self,
        k: usize,
        input: &Tensor,
        idx: &Tensor,
        _data: &StageData,
        s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>) {
        let input = if k == 0 && self.sn.has_embeddings() {
            tokens(input).0
        } else {
            input.shallow_clone()
        };
        let mask = self.mask.index_select(0, idx);
        (self.sn.forward_segment(k, &input, &mask, s.form), None)
    }

    /// The final hidden states reconstructed at every real token (a per-text mean).
    fn loss(&self, out: &Tensor, idx: &Tensor, data: &StageData, s: &TrainSettings) -> Tensor {
        let feats = &data.feats;
        let target = f32(&data.pick(&feats[feats.len() - 1], 1, idx));
        let own = crate::dist::pipeline::mask(self.n(), data, idx, s.targets);
        token_loss(out, &target, &self.mask.index_select(0, idx), own.as_ref())
    }
}

impl WorkerStage for LlamaStage {
    fn to_device(&mut self, device: Device) {
        for p in &mut self.originals {
            p.to_device(device);
        }
        self.sn.move_to(device);
        for h in &mut self.heads {
            h.w = h.w.to_device(device);
            h.b = h.b.to_device(device);
        }
        self.mask = self.mask.to_device(device);
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn feature_count(&self) -> usize {
        self.units().len() + usize::from(self.is_last())
    }

    /// The SuperNet's frozen blocks, stacked from the originals, which go (with recompute
    /// they stay, their blocks views of the stacked ones).
    fn prepare(&mut self, _data: &StageData) -> Result<()> {
        self.sn.stack_blocks(&mut self.originals)?;
        if self.recompute {
            for (i, p) in self.originals.iter_mut().enumerate() {
                p.blocks = self.sn.model_blocks(i);
            }
        } else {
            self.originals.clear();
        }
        Ok(())
    }

    fn global_seed(&self, seed: u64) -> u64 {
        seed.wrapping_add(GLOBAL_SEED_OFFSET)
    }

    /// The units' problems (and the output's on the last stage), M_res/U_res shared.
    fn train_local(
        &self,
        data: &StageData,
        s: &TrainSettings,
        pipe: &mut dyn Collective,
        replicas: &mut dyn Collective,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>> {
        let (own, shared) = self.sn.local_params();
        let groups = Collectives { pipe, replicas };
        let terms = |data: &StageData, idx: &Tensor, emit: &mut dyn FnMut(Tensor) -> Result<()>| {
            self.local_loss(data, idx, s, emit)
        };
        train_local_shared(self, data, s, groups, (&own, &shared), progress, &terms)
    }

    fn originals_part(&self) -> Box<dyn EvalPart + '_> {
        Box::new(OriginalsPart {
            parts: &self.originals,
            classifiers: &self.heads,
            readout: self.readout,
        })
    }

    fn original_tensors(&self) -> Result<Vec<Vec<(String, Tensor)>>> {
        Ok((self.originals.iter().enumerate())
            .map(|(i, p)| eval::named(p, &self.task_names[i], self.heads.get(i)))
            .collect())
    }

    fn local_chain_part(&self) -> Option<Box<dyn EvalPart + '_>> {
        Some(Box::new(LocalChain(self)))
    }

    fn student(&self) -> Result<Box<dyn StudentPart>> {
        let model1 = self
            .originals
            .first()
            .ok_or_else(|| Error::Compute("KD's student: the stage has no originals".into()))?;
        Ok(Box::new(eval::Student::of(model1, &self.mask)?))
    }

    fn regmean(&self, data: &StageData, alpha: f64) -> Result<BTreeMap<String, Tensor>> {
        let tensors = self.original_tensors()?;
        eval::regmean(&self.originals, tensors, data, &self.mask, alpha)
    }

    fn merged_part(&self, tensors: BTreeMap<String, Tensor>) -> Result<Box<dyn EvalPart>> {
        let cfg = self.sn.cfg.clone();
        let part = eval::merged_part(cfg, self.units(), &self.task_names, tensors, self.readout)?;
        Ok(Box::new(part))
    }

    fn named_params(&self) -> Vec<(String, Tensor)> {
        self.sn.named_params()
    }

    /// The folded units under the merged names; on the last stage each task's `score` with
    /// its read-out U_final⁽ᵗ⁾ folded in.
    fn fold(&self) -> Result<Vec<(String, HostTensor)>> {
        let mut out = Vec::new();
        for (name, t) in self.sn.fold_named() {
            out.push((name, to_host(&t)?));
        }
        if let Some(heads) = self.sn.folded_heads(&self.heads.iter().collect::<Vec<_>>()) {
            out.extend(named_heads(&self.task_names, heads)?);
        }
        Ok(out)
    }
}

/// The stage's units of the local SuperNet as trained (`forward_local_chain`), each task read
/// at its last real token through its original's head on the last stage.
struct LocalChain<'a>(&'a LlamaStage);

impl EvalPart for LocalChain<'_> {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let st = self.0;
        let (ids, mask) = tokens(rows);
        let x = match input {
            Some(s) if !st.sn.has_embeddings() => s.shallow_clone(),
            _ => ids,
        };
        let out = st.sn.forward_local_chain(&x, &mask);
        if !st.is_last() {
            return out;
        }
        match st.readout {
            Readout::Classes => own_heads_logits(&st.heads, &read_out(true, out, &mask)),
            Readout::NextToken => {
                let per_model: Vec<Tensor> = (0..st.n()).map(|i| out.get(i as i64)).collect();
                next_token_stats(&st.heads, &|t| &per_model[t], rows)
            }
        }
    }
}
