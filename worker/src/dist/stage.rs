//! What a pipeline stage is to the distributed runtime, whatever the family: the
//! `PipelineStage`/`WorkerStage` traits and the data a stage trains on.

use crate::dist::collective::Collective;
use crate::dist::evaluate::EvalPart;
use crate::train::progress::{LogRow, Progress};
use crate::train::settings::TrainSettings;
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
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
    /// What the stage stores its originals and teacher features in (`merge.precision`).
    fn precision(&self) -> fsmerge_common::precision::Precision {
        fsmerge_common::precision::Precision::Fp32
    }
    /// Per-sample shape of the stream entering the stage from the previous one (the teacher's
    /// [n, N, ..] and the merged [B, ..] alike).
    fn stream_dims(&self) -> Vec<i64>;
    /// The originals' features after each of the stage's units (and, on the last stage, what
    /// the loss reconstructs, last) from the stage input: the merge inputs x [N, D] on stage 0,
    /// else the previous stage's last features [n, N, ..]; `input` may hold some of the merge
    /// rows only, those of indices `rows` (i64; the teacher runs in chunks of rows when features
    /// go to disk, and on a batch's rows when they are recomputed).
    fn teacher(&self, input: &Tensor, rows: &Tensor) -> Vec<Tensor>;
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
    /// The segments `forward` is the composition of, for activation checkpointing (one per
    /// block, say): at least one.
    fn segments(&self) -> usize {
        1
    }
    /// Segment `k` of `forward` on its input (the stage input for segment 0, else segment
    /// k − 1's output): its output and its own loss terms. `forward` is every segment in turn,
    /// the terms summed.
    fn forward_segment(
        &self,
        k: usize,
        input: &Tensor,
        idx: &Tensor,
        data: &StageData,
        s: &TrainSettings,
    ) -> (Tensor, Option<Tensor>) {
        let _ = k;
        self.forward(input, idx, data, s)
    }
    /// The last stage's loss of its output `out` on samples `idx` (a mean over them): the
    /// reconstruction of the originals' last features, on each input's own slice or on all.
    fn loss(&self, out: &Tensor, idx: &Tensor, data: &StageData, s: &TrainSettings) -> Tensor {
        let feats = &data.feats;
        let target = crate::core::tensor::f32(&data.pick(&feats[feats.len() - 1], 1, idx));
        let m = crate::dist::pipeline::mask(self.n(), data, idx, s.targets);
        crate::core::loss::reconstruction_loss(out, &target, m.as_ref())
    }
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
    /// After local training: move what the next stage consumes there (an MLP stage's last U,
    /// which the next stage's first layer folds in; a transformer's shared residual merge is
    /// held by every stage, so it has nothing to move).
    fn hand_over(&mut self, pipe: &mut dyn Collective) -> Result<()> {
        let _ = pipe;
        Ok(())
    }
    /// Every original's units of this stage, each read through its own task's head on the last
    /// stage: the original rows and the ensemble. Valid until `prepare`.
    fn originals_part(&self) -> Box<dyn EvalPart + '_>;
    /// Every original's tensors of this stage under the merged model's names (`fold`'s), model
    /// by model, with its own task's head on the last stage: what `first`, `average` and
    /// RegMean start from. Valid until `prepare`.
    fn original_tensors(&self) -> Result<Vec<Vec<(String, Tensor)>>>;
    /// RegMean of this stage's units (method.md §13), under the merged model's names: each
    /// linear map solved from its inputs inside every model on its own task's merge rows (the
    /// teacher streams `data`), the rest averaged, each task's own head. Valid until `prepare`.
    fn regmean(&self, data: &StageData, alpha: f64) -> Result<BTreeMap<String, Tensor>>;
    /// KD's student on this stage: a trainable copy of model 1's units. Valid until `prepare`.
    fn student(&self) -> Result<Box<dyn crate::dist::distill::StudentPart>>;
    /// A standard model's part of this stage (a baseline's or the folded model's) from its
    /// tensors under the merged model's names.
    fn merged_part(&self, tensors: BTreeMap<String, Tensor>) -> Result<Box<dyn EvalPart>>;
    /// After the local phase: the local SuperNet as trained (the shared residual merge's
    /// M_res/U_res round trip between units), each task read through its original's head; None
    /// for a family without a shared residual merge (its local fold is exact).
    fn local_chain_part(&self) -> Option<Box<dyn EvalPart + '_>> {
        None
    }
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
    /// The mapped file `input` and `feats` live in when the stage keeps its features on disk
    /// (`FeaturesAt::Disk`): the tensors borrow its memory, so it lives as long as they do.
    pub backing: Option<std::sync::Arc<fsmerge_common::mapped::MappedTensors>>,
    /// `FeaturesAt::Recompute`: `feats` are not kept; `batch_view` computes a batch's.
    pub recompute: bool,
    /// A batch view's map from each merge row to its row of `input` and `feats` (-1 for rows
    /// outside the batch) [N]; None when they hold every row.
    pub local: Option<Tensor>,
}

impl StageData {
    /// Features and input of every row, as they come from the teacher.
    pub fn new(input: Tensor, feats: Vec<Tensor>, task: Tensor) -> Self {
        Self {
            input,
            feats,
            task,
            backing: None,
            recompute: false,
            local: None,
        }
    }

    pub fn len(&self) -> usize {
        self.task.size()[0] as usize
    }

    /// Merge rows `idx` of `t` — the stage input or one of the features — along `dim`
    /// (the row dimension), whether this holds every row or a batch view.
    pub fn pick(&self, t: &Tensor, dim: i64, idx: &Tensor) -> Tensor {
        match &self.local {
            Some(local) => t.index_select(dim, &local.index_select(0, idx)),
            None => t.index_select(dim, idx),
        }
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
            backing: self.backing.clone(),
            recompute: self.recompute,
            local: self.local.as_ref().map(|l| l.to_device(device)),
        }
    }

    /// Free what the global phase does not read — every feature but the last stage's targets,
    /// and the input of a stage other than stage 0 (the teacher's streams: n·N·T·d floats per
    /// ViT unit) — keeping the indices. Returns the bytes freed.
    pub fn keep_global_only(&mut self, first: bool, last: bool) -> u64 {
        let mut freed = 0;
        let mut free = |t: &mut Tensor| {
            freed += crate::core::tensor::bytes_of(t);
            *t = Tensor::zeros([0], (Kind::Float, t.device()));
        };
        // Recomputed features start from the input: the last stage's targets need it.
        if !(first || self.recompute && last) {
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

/// `PipelineStage::forward` as its segments in turn, their own loss terms summed.
pub fn by_segments<S: PipelineStage + ?Sized>(
    stage: &S,
    input: &Tensor,
    idx: &Tensor,
    data: &StageData,
    s: &TrainSettings,
) -> (Tensor, Option<Tensor>) {
    let (mut x, mut own) = (input.shallow_clone(), None);
    for k in 0..stage.segments() {
        let (y, term) = stage.forward_segment(k, &x, idx, data, s);
        own = sum_terms(own, term);
        x = y;
    }
    (x, own)
}

/// Two optional loss terms added.
pub fn sum_terms(a: Option<Tensor>, b: Option<Tensor>) -> Option<Tensor> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// With recomputed features (`StageData::recompute`): the features of merge rows `idx`,
/// computed now by the stage's frozen originals from its input, as a batch view (`pick` reads
/// it by merge row). None when the features are kept: read them from `data` itself.
pub fn batch_view<S: PipelineStage + ?Sized>(
    stage: &S,
    data: &StageData,
    idx: &Tensor,
) -> Option<StageData> {
    if !data.recompute {
        return None;
    }
    let row_dim = i64::from(stage.units().start != 0);
    let input = data.input.index_select(row_dim, idx);
    let feats = tch::no_grad(|| stage.teacher(&input, idx));
    let rows = data.task.size()[0];
    let batch = idx.size()[0];
    let on = (Kind::Int64, idx.device());
    let local = Tensor::full([rows], -1, on).index_copy(0, idx, &Tensor::arange(batch, on));
    Some(StageData {
        local: Some(local),
        ..StageData::new(input, feats, data.task.shallow_clone())
    })
}

/// Every row's features in memory, computed from the input of recomputed `data` (RegMean, KD
/// and inner-feature targets read whole streams before training); None when `data` keeps
/// them: read `data` itself.
pub fn materialized<S: PipelineStage + ?Sized>(stage: &S, data: &StageData) -> Option<StageData> {
    if !data.recompute {
        return None;
    }
    let every = Tensor::arange(data.len() as i64, (Kind::Int64, data.task.device()));
    let feats = tch::no_grad(|| stage.teacher(&data.input, &every));
    let input = data.input.shallow_clone();
    Some(StageData::new(input, feats, data.task.shallow_clone()))
}

/// Each task's classifier from the last stage's parts (the originals' folders `dirs`, in task
/// order): the heads the read-out U_final folds into; a model without one is an error naming it.
pub fn task_classifiers(
    dirs: &[std::path::PathBuf],
    classifiers: &[Option<&crate::core::linear::Linear>],
) -> Result<Vec<crate::core::linear::Linear>> {
    dirs.iter()
        .zip(classifiers)
        .map(|(dir, c)| {
            c.map(crate::core::linear::Linear::copy)
                .ok_or_else(|| Error::Tensor {
                    file: dir.clone(),
                    tensor: "classifier.weight".into(),
                    msg: "the model has no classifier to fold its read-out into".into(),
                })
        })
        .collect()
}

/// Folded task heads under the merged model's names (`head_weight`/`head_bias` of each task).
pub fn named_heads(
    tasks: &[String],
    heads: impl IntoIterator<Item = crate::core::linear::Linear>,
) -> Result<Vec<(String, HostTensor)>> {
    use fsmerge_common::checkpoint::{head_bias, head_weight};
    let mut out = Vec::new();
    for (name, head) in tasks.iter().zip(heads) {
        out.push((
            head_weight(Some(name)),
            crate::core::tensor::to_host(&head.w)?,
        ));
        out.push((
            head_bias(Some(name)),
            crate::core::tensor::to_host(&head.b)?,
        ));
    }
    Ok(out)
}

/// Each task's head (`heads.<task>.weight|bias`) taken out of a stage's named tensors.
pub fn take_task_heads(
    tasks: &[String],
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<Vec<crate::core::linear::Linear>> {
    use fsmerge_common::checkpoint::{head_bias, head_weight};
    let mut take = |name: String| {
        tensors
            .remove(&name)
            .ok_or_else(|| Error::Compute(format!("the merged model lacks the tensor `{name}`")))
    };
    tasks
        .iter()
        .map(|t| {
            Ok(crate::core::linear::Linear {
                w: take(head_weight(Some(t)))?,
                b: take(head_bias(Some(t)))?,
            })
        })
        .collect()
}

/// A task's head under the merged model's names.
pub fn head_pair(task: &str, head: &crate::core::linear::Linear) -> [(String, Tensor); 2] {
    use fsmerge_common::checkpoint::{head_bias, head_weight};
    [
        (head_weight(Some(task)), head.w.shallow_clone()),
        (head_bias(Some(task)), head.b.shallow_clone()),
    ]
}

/// Model i's stream `stream` [n, N, ..] on its own task's merge rows [N_i, ..].
pub fn own_rows(stream: &Tensor, data: &StageData, i: usize) -> Tensor {
    let rows = data.task.eq(i as i64).nonzero().squeeze_dim(1);
    stream.get(i as i64).index_select(0, &rows)
}
