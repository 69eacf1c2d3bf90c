//! One stage of a distributed BERT merge: plan units `units` (unit 0 is the embeddings, unit
//! 1 + l is block l) of every original BERT, read from their HF folders, as a part of the
//! SuperNet (`BertSuperNet::from_parts_without_blocks`: the single-process M/U values; its
//! frozen blocks are stacked from the originals by `prepare`, when the originals go, so the
//! stage never holds two copies of its weights). The stage holding the last block also holds
//! the pooler, U_final and the task heads.
//!
//! Every unit needs the attention mask of its samples. The mask is a function of the merge
//! rows (token ids, `[PAD]` = 0), which every worker rebuilds from the config and the data as
//! stage 0 does (`feature_cache::merge_inputs`), so no stage sends it to another.
//!
//! Teacher features (`PipelineStage::teacher`) are the n models' streams after each of the
//! stage's units, [n, N, T, d], and on the last stage their pooled outputs [n, N, d] as well.

use crate::core::linear::Linear;
use crate::core::loss::own_mask;
use crate::core::mu::with_mu_seed;
use crate::core::tensor::{f32, to_host};
use crate::data::text::tokens;
use crate::dist::collective::Collective;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{own_heads_logits, EvalPart, OriginalsPart, Readout};
use crate::dist::pipeline::{stacked_traces, train_local_shared, Collectives};
use crate::dist::stage::{named_heads, task_classifiers, PipelineStage, StageData, WorkerStage};
use crate::families::bert::eval;
use crate::families::bert::merge::local_loss;
use crate::families::bert::model::BertPart;
use crate::families::bert::supernet::BertSuperNet;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{TrainSettings, GLOBAL_SEED_OFFSET};
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::config::{Features, MergeConfig, Targets};
use fsmerge_common::precision::Precision;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

pub struct BertStage {
    sn: BertSuperNet,
    task_names: Vec<String>,
    /// The originals' parts, for the teacher features (dropped by `prepare`).
    originals: Vec<BertPart>,
    /// On the last stage, each task's classifier.
    classifiers: Vec<Linear>,
    /// Attention mask of every merge row [N, T] (1 = token, 0 = `[PAD]`).
    mask: Tensor,
    res_consistency: f64,
    weight_bytes: u64,
    precision: Precision,
    /// `merge.features = "recompute"`: the teacher runs every step, so it outlives `prepare`.
    recompute: bool,
}

impl BertStage {
    /// Read units `units` of every task's BERT (`dirs`, in task order) and draw the job's M/U;
    /// `rows` are the merge rows (token ids as f32 [N, T]), for the attention mask.
    pub fn load(
        dirs: &[PathBuf],
        tasks: &[String],
        units: Range<usize>,
        merge: &MergeConfig,
        seed: u64,
        rows: &Tensor,
        precision: Precision,
    ) -> Result<Self> {
        let mut parts = dirs
            .iter()
            .map(|d| {
                let mut part = BertPart::load(d, units.clone())?;
                part.store_in(crate::core::tensor::kind_of(precision));
                Ok(part)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&BertPart> = parts.iter().collect();
        let sn = with_mu_seed(seed, || {
            BertSuperNet::from_parts_without_blocks(&refs, merge.mu_type, merge.init, merge.rank)
        })?;
        // The originals' tables become views of the SuperNet's stacked copy (one copy held).
        for (i, p) in parts.iter_mut().enumerate() {
            if let Some(e) = sn.model_embeddings(i) {
                p.embeddings = Some(e);
            }
        }
        let classifiers = if sn.has_output() {
            let heads: Vec<_> = parts.iter().map(|p| p.classifier.as_ref()).collect();
            task_classifiers(dirs, &heads)?
        } else {
            Vec::new()
        };
        Ok(Self {
            sn,
            task_names: tasks.to_vec(),
            weight_bytes: parts.iter().map(BertPart::bytes).sum(),
            originals: parts,
            classifiers,
            mask: tokens(rows).1,
            res_consistency: merge.res_consistency,
            precision,
            recompute: merge.features == Features::Recompute,
        })
    }

    /// The originals' streams after unit k of samples `idx` [n, B, T, d]: the stage input for
    /// the unit before its first, else one of its features.
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
        let pooled = if self.is_last() {
            f32(&data.pick(&data.feats[data.feats.len() - 1], 1, idx))
        } else {
            Tensor::zeros([0], (Kind::Float, idx.device()))
        };
        local_loss(
            &self.sn,
            &ids,
            &self.mask.index_select(0, idx),
            &|k| self.stream(data, k, idx),
            &pooled,
            own.as_ref(),
            (s.form, self.res_consistency),
            emit,
        )
    }
}

impl PipelineStage for BertStage {
    fn n(&self) -> usize {
        self.sn.frozen.n
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
        vec![self.mask.size()[1], self.sn.frozen.cfg.hidden_size as i64]
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
}

impl WorkerStage for BertStage {
    fn to_device(&mut self, device: Device) {
        for p in &mut self.originals {
            p.to_device(device);
        }
        self.sn.move_to(device);
        for c in &mut self.classifiers {
            c.w = c.w.to_device(device);
            c.b = c.b.to_device(device);
        }
        self.mask = self.mask.to_device(device);
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn feature_count(&self) -> usize {
        self.units().len() + usize::from(self.is_last())
    }

    /// The teacher is done: the originals go.
    /// The SuperNet's frozen blocks, stacked from the originals, which go.
    fn prepare(&mut self, _data: &StageData) -> Result<()> {
        self.sn.stack_blocks(&mut self.originals)?;
        if self.recompute {
            // The teacher stays, its blocks views of the stacked ones.
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
            classifiers: &self.classifiers,
            readout: Readout::Classes,
        })
    }

    fn original_tensors(&self) -> Result<Vec<Vec<(String, Tensor)>>> {
        Ok((self.originals.iter().enumerate())
            .map(|(i, p)| eval::named(p, &self.task_names[i], self.classifiers.get(i)))
            .collect())
    }

    fn local_chain_part(&self) -> Option<Box<dyn EvalPart + '_>> {
        Some(Box::new(LocalChain(self)))
    }

    fn student(&self) -> Result<Box<dyn StudentPart>> {
        let model1 = self.originals.first().ok_or_else(|| {
            fsmerge_common::Error::Compute("KD's student: the stage has no originals".into())
        })?;
        Ok(Box::new(eval::Student::of(model1, &self.mask)?))
    }

    fn regmean(&self, data: &StageData, alpha: f64) -> Result<BTreeMap<String, Tensor>> {
        let tensors = self.original_tensors()?;
        eval::regmean(&self.originals, tensors, data, &self.mask, alpha)
    }

    fn merged_part(&self, tensors: BTreeMap<String, Tensor>) -> Result<Box<dyn EvalPart>> {
        let cfg = self.sn.frozen.cfg.clone();
        let part = eval::merged_part(cfg, self.units(), &self.task_names, tensors)?;
        Ok(Box::new(part))
    }

    fn named_params(&self) -> Vec<(String, Tensor)> {
        self.sn.named_params()
    }

    /// The folded units under their HF `BertModel` names; on the last stage each task's head
    /// with its read-out U_final⁽ᵗ⁾ folded in.
    fn fold(&self) -> Result<Vec<(String, HostTensor)>> {
        let mut out = Vec::new();
        for (name, t) in self.sn.fold_named() {
            out.push((name, to_host(&t)?));
        }
        let classifiers: Vec<&Linear> = self.classifiers.iter().collect();
        if let Some(heads) = self.sn.folded_heads(&classifiers) {
            out.extend(named_heads(&self.task_names, heads)?);
        }
        Ok(out)
    }
}

/// The stage's units of the local SuperNet as trained (`BertSuperNet::forward_local_chain`),
/// each task read through its original's classifier on the last stage.
struct LocalChain<'a>(&'a BertStage);

impl EvalPart for LocalChain<'_> {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let st = self.0;
        let (ids, mask) = tokens(rows);
        let x = match input {
            Some(s) if !st.sn.has_embeddings() => s.shallow_clone(),
            _ => ids,
        };
        let out = st.sn.forward_local_chain(&x, &mask);
        if st.is_last() {
            own_heads_logits(&st.classifiers, &out)
        } else {
            out
        }
    }
}
