//! One stage of a distributed ViT merge: plan units `units` (unit 0 is the embeddings, unit
//! 1 + l is block l) of every original ViT, read from their HF folders, with the SuperNet's
//! M/U of those units. The stage holding the last block also holds LN_post, U_final and the
//! task heads.
//!
//! Every stage draws the whole SuperNet's M/U in the single-process order and keeps its own,
//! so a distributed job starts from the same values as `VitSuperNet`. The residual stream is
//! in merged space and every M/U sits inside a unit, so each stage owns its units' M/U outright
//! (no hand-over). The exception is local mode's shared residual merge M_res (= M_pre) and
//! unmerge U_res: every stage holds a copy and their gradients are summed over all workers
//! each step, so the copies stay equal (Adam is element-wise).
//!
//! Teacher features (`PipelineStage::teacher`) are the n models' streams after each of the
//! stage's units, [n, N, T, d], and on the last stage their pooled outputs [n, N, d] as well.

use crate::core::encoder_block::{EncoderBlock, EncoderBlockMu, FrozenBlock, Norm};
use crate::core::layer_norm::{FrozenLn, LayerNorm, MergedLn};
use crate::core::linear::Linear;
use crate::core::loss::{own_mask, reconstruction_loss};
use crate::core::mu::{with_mu_seed, MuMatrix};
use crate::core::tensor::{chunked, f32, kind_of, named_groups, to_host};
use crate::core::transformer::{check_mergeable, unit_blocks, MuDraw};
use crate::data::preprocess::image::ChannelAffine;
use crate::dist::collective::Collective;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{own_heads_logits, EvalPart, OriginalsPart, Readout};
use crate::dist::pipeline::{stacked_traces, train_local_shared, Collectives};
use crate::dist::stage::{named_heads, task_classifiers, PipelineStage, StageData, WorkerStage};
use crate::families::vit::eval;
use crate::families::vit::merge::{images, inner_term};
use crate::families::vit::model::{VitPart, VIT_BLOCK};
use crate::families::vit::supernet::{
    local_read_out, read_out, shape_of, BlockUnit, DrawnMu, FrozenEmbed,
};
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::{TrainSettings, GLOBAL_SEED_OFFSET};
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::config::{Features, MergeConfig, StepForm, Targets};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::precision::Precision;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// What only the last stage holds.
struct Output {
    ln_post: MergedLn,
    u_final: MuMatrix,
    /// Each task's classifier.
    classifiers: Vec<Linear>,
}

pub struct VitStage {
    units: Range<usize>,
    cfg: VitConfig,
    n: usize,
    task_names: Vec<String>,
    /// The originals' parts, for the teacher features (dropped by `release_originals`).
    originals: Vec<VitPart>,
    embed: Option<FrozenEmbed>,
    blocks: Vec<FrozenBlock>,
    mu: Vec<EncoderBlockMu>,
    /// M_pre; in local mode also M_res of every block (every stage holds it).
    m_pre: MuMatrix,
    u_res: MuMatrix,
    out: Option<Output>,
    res_consistency: f64,
    /// The stage's blocks among `merge.inner_layers` (global indices) and the terms' weight.
    inner_layers: Vec<usize>,
    inner_weight: f64,
    /// Per inner block: (l, each input's own model's attention-branch output [N, T, d], each
    /// model's mean |·| of it on its own task [n]); filled by `prepare`.
    inner: Vec<(usize, Tensor, Tensor)>,
    weight_bytes: u64,
    precision: Precision,
    /// `merge.features = "recompute"`: the teacher runs every step, so it outlives `prepare`.
    recompute: bool,
}

impl VitStage {
    /// Read units `units` of every task's ViT (`dirs`), each adapted to read model 0's pixels
    /// where its processor rescales or normalizes otherwise (`adapters`), and draw the job's
    /// M/U.
    pub fn load(
        dirs: &[PathBuf],
        adapters: &[Option<ChannelAffine>],
        tasks: &[String],
        units: Range<usize>,
        merge: &MergeConfig,
        seed: u64,
        precision: Precision,
    ) -> Result<Self> {
        let parts = (dirs.iter().zip(adapters))
            .map(|(d, adapter)| {
                let mut part = VitPart::load(d, units.clone())?;
                if let Some(a) = adapter {
                    part.read_pixels_as(a, d)?;
                }
                part.store_in(kind_of(precision));
                Ok(part)
            })
            .collect::<Result<Vec<_>>>()?;
        check_mergeable(
            &parts.iter().collect::<Vec<_>>(),
            |p| shape_of(&p.cfg),
            "hidden, layers, heads, mlp, image, patch, channels",
        )?;
        let cfg = parts[0].cfg.clone();
        let n = parts.len();
        let embed = parts
            .iter()
            .map(|p| p.embeddings.as_ref().map(|[w, b, c, q]| [w, b, c, q]))
            .collect::<Option<Vec<_>>>()
            .map(|e| FrozenEmbed::stack(&e));
        // The blocks' LayerNorms stacked (the M/U draw reads them); the blocks themselves are
        // stacked by `prepare`, once the originals are no longer needed, so the stage never
        // holds its models' weights twice.
        let block_lns: Vec<(FrozenLn, FrozenLn)> = (0..parts[0].blocks.len())
            .map(|j| {
                let ln = |f: &dyn Fn(&EncoderBlock) -> &LayerNorm| {
                    FrozenLn::stack(&parts.iter().map(|p| f(&p.blocks[j])).collect::<Vec<_>>())
                };
                (ln(&|b| &b.ln_attn), ln(&|b| &b.ln_mlp))
            })
            .collect();
        let lns: Vec<_> = block_lns.iter().map(|(a, m)| (a, m)).collect();
        let draw = MuDraw::for_vit(&cfg, merge.mu_type, merge.init, n, merge.rank);
        let eps = cfg.layer_norm_eps;
        let keep = unit_blocks(&units);
        let depth = cfg.num_hidden_layers;
        let drawn = with_mu_seed(seed, || {
            DrawnMu::draw(&draw, depth, keep.clone(), &lns, merge.init, eps)
        })?;
        let out = match parts
            .iter()
            .map(|p| p.ln_final.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(lns) => {
                let heads: Vec<_> = parts.iter().map(|p| p.classifier.as_ref()).collect();
                let classifiers = task_classifiers(dirs, &heads)?;
                Some(Output {
                    ln_post: MergedLn::new(&FrozenLn::stack(&lns), merge.init, eps),
                    u_final: drawn.u_final,
                    classifiers,
                })
            }
            None => None,
        };
        Ok(Self {
            weight_bytes: parts.iter().map(VitPart::bytes).sum(),
            units,
            cfg,
            n,
            task_names: tasks.to_vec(),
            originals: parts,
            embed,
            blocks: Vec::new(),
            mu: drawn.blocks,
            m_pre: drawn.m_pre,
            u_res: drawn.u_res,
            inner_layers: merge
                .inner_layers
                .iter()
                .copied()
                .filter(|l| keep.contains(l))
                .collect(),
            inner_weight: merge.inner_weight,
            inner: Vec::new(),
            out,
            res_consistency: merge.res_consistency,
            precision,
            recompute: merge.features == Features::Recompute,
        })
    }

    /// The originals' blocks stacked per block for the SuperNet (`FrozenBlock`), each
    /// model's copy dropped as its block is stacked.
    fn stack_blocks(&mut self) -> Result<()> {
        let mut per_model: Vec<std::vec::IntoIter<EncoderBlock>> = (self.originals.iter_mut())
            .map(|p| std::mem::take(&mut p.blocks).into_iter())
            .collect();
        let depth = unit_blocks(&self.units).len();
        self.blocks = (0..depth)
            .map(|j| {
                let block_j: Vec<EncoderBlock> = per_model
                    .iter_mut()
                    .map(|m| {
                        m.next().ok_or_else(|| {
                            fsmerge_common::Error::Compute(format!(
                                "stage {:?}: an original lacks its block {j}",
                                self.units
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(FrozenBlock::stack(&block_j.iter().collect::<Vec<_>>()))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn first_block(&self) -> usize {
        unit_blocks(&self.units).start
    }

    fn unit(&self, j: usize) -> BlockUnit<'_> {
        BlockUnit {
            frozen: &self.blocks[j],
            mu: &self.mu[j],
            heads: self.cfg.num_attention_heads as i64,
        }
    }

    /// The originals' streams at boundary k (after unit k) [n, N, T, d]: the stage input for
    /// the boundary before its first unit, else one of its features.
    fn stream<'d>(&self, data: &'d StageData, k: usize) -> &'d Tensor {
        data.stream(self.units.start, k)
    }

    /// `stream` of samples `idx`.
    fn boundary(&self, data: &StageData, k: usize, idx: &Tensor) -> Tensor {
        f32(&data.pick(self.stream(data, k), 1, idx))
    }

    /// The stage's part of the local loss of samples `idx`, term by term to `emit`: each of
    /// its blocks' problems (with the residual drift) and, on the last stage, the output's.
    fn local_loss(
        &self,
        data: &StageData,
        idx: &Tensor,
        (targets, form): (Targets, StepForm),
        emit: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let mask =
            (targets == Targets::Own).then(|| own_mask(&data.task.index_select(0, idx), self.n));
        let n = self.n as i64;
        let b = idx.size()[0];
        for j in 0..self.blocks.len() {
            let l = self.first_block() + j;
            let f_in = self.boundary(data, l, idx);
            let (pred, drift) = self.unit(j).local(&self.m_pre, &self.u_res, &f_in, form);
            let target = self.boundary(data, l + 1, idx).view([n, b, -1]);
            emit(
                reconstruction_loss(&pred.view([n, b, -1]), &target, mask.as_ref())
                    + drift * self.res_consistency,
            )?;
        }
        if let Some(o) = &self.out {
            let cls = self.boundary(data, self.units.end - 1, idx).select(2, 0);
            let pred = local_read_out(&self.m_pre, &o.ln_post, &o.u_final, &cls);
            let pooled = &data.feats[data.feats.len() - 1];
            emit(reconstruction_loss(
                &pred,
                &f32(&data.pick(pooled, 1, idx)),
                mask.as_ref(),
            ))?;
        }
        Ok(())
    }

    /// The stage's own local parameters (its blocks; LN_post and U_final on the last stage)
    /// and the shared M_res, U_res.
    fn local_params(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let mut own: Vec<Tensor> = self.mu.iter().flat_map(|b| b.params(Norm::Pre)).collect();
        if let Some(o) = &self.out {
            own.extend(o.ln_post.params());
            own.extend(o.u_final.params());
        }
        let mut shared = self.m_pre.params();
        shared.extend(self.u_res.params());
        (own, shared)
    }
}

impl PipelineStage for VitStage {
    fn n(&self) -> usize {
        self.n
    }
    fn is_last(&self) -> bool {
        self.out.is_some()
    }
    fn units(&self) -> Range<usize> {
        self.units.clone()
    }
    fn precision(&self) -> Precision {
        self.precision
    }
    fn stream_dims(&self) -> Vec<i64> {
        let tokens = (self.cfg.image_size / self.cfg.patch_size).pow(2) + 1;
        vec![tokens as i64, self.cfg.hidden_size as i64]
    }

    fn teacher(&self, input: &Tensor, _rows: &Tensor) -> Vec<Tensor> {
        let first = self.units.start == 0;
        let rows = input.size()[if first { 0 } else { 1 }];
        tch::no_grad(|| {
            stacked_traces(self.n, rows, &|i, start, len| {
                if first {
                    self.originals[i]
                        .trace(&images(&input.narrow(0, start, len), self.cfg.num_channels))
                } else {
                    self.originals[i].trace(&input.get(i as i64).narrow(0, start, len))
                }
            })
        })
    }

    fn global_params(&self) -> Vec<Tensor> {
        let mut v = if self.embed.is_some() {
            self.m_pre.params()
        } else {
            Vec::new()
        };
        v.extend(self.mu.iter().flat_map(|b| b.params(Norm::Pre)));
        if let Some(o) = &self.out {
            v.extend(o.ln_post.params());
            v.extend(o.u_final.params());
        }
        v
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

    /// One segment per block (the embeddings with the first, the read-out with the last).
    fn segments(&self) -> usize {
        self.blocks.len().max(1)
    }

    /// Block `k` (after the embeddings on stage 0, before the read-out on the last stage); a
    /// block with an inner-feature term runs literally (its term reads the branches), the
    /// others in `s.form`.
    fn forward_segment(
        &self,
        k: usize,
        input: &Tensor,
        idx: &Tensor,
        data: &StageData,
        s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>) {
        let mut x = match &self.embed {
            Some(e) if k == 0 => e.merged(
                &self.m_pre,
                &images(input, self.cfg.num_channels),
                s.form,
                &self.cfg,
            ),
            _ => input.shallow_clone(),
        };
        let mut own = None;
        if k < self.blocks.len() {
            let l = self.first_block() + k;
            x = match self.inner.iter().find(|(i, _, _)| *i == l) {
                Some((_, g, scale)) => {
                    let (y, r) = self.unit(k).literal(&x);
                    let task = data.task.index_select(0, idx);
                    let (n, weight) = (self.n as i64, self.inner_weight);
                    let g = g.index_select(0, idx);
                    own = Some(inner_term(&r, &g, scale, &task, n, weight));
                    y
                }
                None => self.unit(k).forward(&x, s.form),
            };
        }
        let out = match &self.out {
            Some(o) if k + 1 == self.segments() => read_out(&o.ln_post, &o.u_final, &x),
            _ => x,
        };
        (out, own)
    }
}

impl WorkerStage for VitStage {
    fn to_device(&mut self, device: Device) {
        for p in &mut self.originals {
            p.to_device(device);
        }
        if let Some(e) = &mut self.embed {
            e.move_to(device);
        }
        for b in &mut self.blocks {
            b.move_to(device);
        }
        for mu in &mut self.mu {
            mu.move_to(device);
        }
        self.m_pre.to_device(device);
        self.u_res.to_device(device);
        if let Some(o) = &mut self.out {
            o.ln_post.move_to(device);
            o.u_final.to_device(device);
            for c in &mut o.classifiers {
                c.w = c.w.to_device(device);
                c.b = c.b.to_device(device);
            }
        }
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn feature_count(&self) -> usize {
        self.units.len() + usize::from(self.is_last())
    }

    /// The inner-feature targets of the stage's inner blocks, computed from the originals'
    /// streams as the single-process teacher does (same row chunks); then the originals go.
    fn prepare(&mut self, data: &StageData) -> Result<()> {
        let heads = self.cfg.num_attention_heads as i64;
        let first = self.first_block();
        let inner = tch::no_grad(|| {
            self.inner_layers
                .iter()
                .map(|&l| {
                    let f = self.stream(data, l);
                    let all = Tensor::stack(
                        &self
                            .originals
                            .iter()
                            .enumerate()
                            .map(|(i, p)| {
                                chunked(&f.get(i as i64), 0, |c| {
                                    p.blocks[l - first].attention_branch(c, heads)
                                })
                            })
                            .collect::<Vec<_>>(),
                        0,
                    );
                    let mut own = all.get(0).zeros_like();
                    let mut scales = Vec::with_capacity(self.n);
                    for t in 0..self.n as i64 {
                        let rows = data.task.eq(t).nonzero().squeeze_dim(1);
                        let mine = all.get(t).index_select(0, &rows);
                        scales.push(mine.abs().mean(Kind::Float).clamp_min(1e-12));
                        own = own.index_copy(0, &rows, &mine);
                    }
                    (l, own, Tensor::stack(&scales, 0))
                })
                .collect()
        });
        self.inner = inner;
        self.stack_blocks()?;
        if self.recompute {
            // The teacher stays, its blocks views of the stacked ones.
            let eps = self.cfg.layer_norm_eps;
            for (i, p) in self.originals.iter_mut().enumerate() {
                p.blocks = self.blocks.iter().map(|b| b.model(i, eps)).collect();
            }
        } else {
            self.originals.clear();
        }
        Ok(())
    }

    fn global_seed(&self, seed: u64) -> u64 {
        seed.wrapping_add(GLOBAL_SEED_OFFSET)
    }

    /// The blocks' problems (and the output's on the last stage), M_res/U_res shared.
    fn train_local(
        &self,
        data: &StageData,
        s: &TrainSettings,
        pipe: &mut dyn Collective,
        replicas: &mut dyn Collective,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>> {
        let (own, shared) = self.local_params();
        let groups = Collectives { pipe, replicas };
        let terms = |data: &StageData, idx: &Tensor, emit: &mut dyn FnMut(Tensor) -> Result<()>| {
            self.local_loss(data, idx, (s.targets, s.form), emit)
        };
        train_local_shared(self, data, s, groups, (&own, &shared), progress, &terms)
    }

    fn originals_part(&self) -> Box<dyn EvalPart + '_> {
        Box::new(OriginalsPart {
            parts: &self.originals,
            classifiers: self.out.as_ref().map_or(&[], |o| &o.classifiers),
            readout: Readout::Classes,
        })
    }

    fn original_tensors(&self) -> Result<Vec<Vec<(String, Tensor)>>> {
        let classifiers = self.out.as_ref().map(|o| &o.classifiers);
        Ok((self.originals.iter().enumerate())
            .map(|(i, p)| {
                let c = classifiers.map(|c| &c[i]);
                eval::named(p, &self.task_names[i], c)
            })
            .collect())
    }

    fn local_chain_part(&self) -> Option<Box<dyn EvalPart + '_>> {
        Some(Box::new(LocalChain(self)))
    }

    fn student(&self) -> Result<Box<dyn StudentPart>> {
        let model1 = self.originals.first().ok_or_else(|| {
            fsmerge_common::Error::Compute("KD's student: the stage has no originals".into())
        })?;
        Ok(Box::new(eval::Student::of(model1)?))
    }

    fn regmean(&self, data: &StageData, alpha: f64) -> Result<BTreeMap<String, Tensor>> {
        eval::regmean(&self.originals, self.original_tensors()?, data, alpha)
    }

    fn merged_part(&self, tensors: BTreeMap<String, Tensor>) -> Result<Box<dyn EvalPart>> {
        let part = eval::merged_part(
            self.cfg.clone(),
            self.units.clone(),
            &self.task_names,
            tensors,
        )?;
        Ok(Box::new(part))
    }

    fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut groups = vec![
            ("m_pre".to_string(), self.m_pre.params()),
            ("u_res".to_string(), self.u_res.params()),
        ];
        for (j, mu) in self.mu.iter().enumerate() {
            groups.push((
                format!("block{}", self.first_block() + j),
                mu.params(Norm::Pre),
            ));
        }
        if let Some(o) = &self.out {
            groups.push(("ln_post".into(), o.ln_post.params().into()));
            groups.push(("u_final".into(), o.u_final.params()));
        }
        named_groups(groups)
    }

    /// The folded units under their HF names (no `vit.` prefix); on the last stage the final
    /// LayerNorm and each task's head with its read-out U_final⁽ᵗ⁾ folded in.
    fn fold(&self) -> Result<Vec<(String, HostTensor)>> {
        tch::no_grad(|| {
            let mut out = Vec::new();
            if let Some(e) = &self.embed {
                let folded = e.fold(&self.m_pre, &self.cfg);
                for (name, t) in crate::families::vit::model::EMBEDDING_NAMES
                    .iter()
                    .zip(&folded)
                {
                    out.push((name.to_string(), to_host(t)?));
                }
            }
            for j in 0..self.blocks.len() {
                let block = self.unit(j).fold();
                for (name, t) in block.named(self.first_block() + j, &VIT_BLOCK) {
                    out.push((name, to_host(t)?));
                }
            }
            if let Some(o) = &self.out {
                out.push(("layernorm.weight".into(), to_host(&o.ln_post.w)?));
                out.push(("layernorm.bias".into(), to_host(&o.ln_post.b)?));
                let heads =
                    (o.classifiers.iter().enumerate()).map(|(t, c)| o.u_final.fold_into_head(t, c));
                out.extend(named_heads(&self.task_names, heads)?);
            }
            Ok(out)
        })
    }
}

/// The stage's units of the local SuperNet as trained: after every block the merged stream
/// goes through U_res and back through M_res (`VitSuperNet::forward_local_chain`).
struct LocalChain<'a>(&'a VitStage);

impl EvalPart for LocalChain<'_> {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let st = self.0;
        let mut x = match (&st.embed, input) {
            (Some(e), _) => e.merged(
                &st.m_pre,
                &images(rows, st.cfg.num_channels),
                StepForm::Fold,
                &st.cfg,
            ),
            (None, Some(s)) => s.shallow_clone(),
            (None, None) => rows.shallow_clone(),
        };
        for j in 0..st.blocks.len() {
            let y = st.unit(j).forward(&x, StepForm::Fold);
            let (b, t, d) = y.size3().unwrap_or((0, 0, 0));
            x = st
                .m_pre
                .merge(&st.u_res.unmerge(&y.view([-1, d])))
                .view([b, t, d]);
        }
        match &st.out {
            Some(o) => own_heads_logits(&o.classifiers, &read_out(&o.ln_post, &o.u_final, &x)),
            None => x,
        }
    }
}
