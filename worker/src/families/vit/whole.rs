//! The ViT family's originals loaded whole (the coordinator's job): checks, evaluation, the
//! baselines, the local phase's rows, and the merged model assembled from the stages' folded
//! tensors and written as one `ViTForImageClassification` whose classifier stacks every task's
//! head.

use crate::core::checks::{check_classifier, check_rank};
use crate::core::linear::{stacked_labels, take_heads, Linear};
use crate::core::mu::with_mu_seed;
use crate::core::tensor::chunked;
use crate::dist::restore::restore_phase;
use crate::families::vit::baselines;
use crate::families::vit::merge::{images, original_logits, teacher_pooled, MergedVit};
use crate::families::vit::model::{Vit, VitPart};
use crate::families::vit::supernet::VitSuperNet;
use crate::family::{
    encoder_baseline, BaselineInputs, HeadsReadOut, LocalPhase, MergedNet, Originals, Predictor,
};
use crate::train::progress::LogRow;
use fsmerge_common::checkpoint::{write_json, HostTensor};
use fsmerge_common::config::{Baseline, JobConfig};
use fsmerge_common::plan::Plan;
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub struct VitOriginals {
    models: Vec<Vit>,
}

/// Load every task's original ViT and check it can be merged: a classifier with one output per
/// class of its task, single-channel input of the data's image size, width ≥ `merge.rank`.
pub fn open(job: &JobConfig, models_dir: &Path) -> Result<VitOriginals> {
    let side = job.data.dataset.image_side();
    let mut models = Vec::new();
    for task in &job.tasks {
        let dir = models_dir.join(&task.name);
        let vit = Vit::load(&dir)?;
        check_classifier(
            &dir,
            task,
            vit.classifier.as_ref().map(|c| c.w.size()[0] as usize),
        )?;
        if vit.cfg.image_size != side || vit.cfg.num_channels != 1 {
            return Err(Error::Checkpoint {
                file: dir.join("config.json"),
                msg: format!(
                    "image_size {} with {} channels; the data has {side}×{side} grey images",
                    vit.cfg.image_size, vit.cfg.num_channels
                ),
            });
        }
        models.push(vit);
    }
    check_rank(job.merge.rank, models[0].cfg.hidden_size)?;
    Ok(VitOriginals { models })
}

impl VitOriginals {
    fn refs(&self) -> Vec<&Vit> {
        self.models.iter().collect()
    }
    fn heads(&self) -> Vec<&Linear> {
        self.models
            .iter()
            .filter_map(|m| m.classifier.as_ref())
            .collect()
    }
}

impl Originals for VitOriginals {
    fn logits(&self, t: usize, x: &Tensor) -> Tensor {
        original_logits(&self.models[t], x)
    }

    fn baseline(
        &self,
        method: Baseline,
        inputs: &BaselineInputs,
    ) -> Result<(Box<dyn MergedNet>, Vec<LogRow>)> {
        let (refs, set, b) = (self.refs(), inputs.set, &inputs.job.baselines);
        encoder_baseline(
            &refs,
            method,
            |vit, heads| MergedVit { vit, heads },
            || baselines::regmean(&refs, set, b.regmean_alpha),
            || {
                baselines::kd(
                    &refs,
                    set,
                    &teacher_pooled(&refs, &set.x),
                    b.kd_target_scale,
                    inputs.kd,
                    inputs.progress,
                )
            },
        )
    }

    fn local_phase(
        &self,
        job: &JobConfig,
        work: &WorkDir,
        plan: &Plan,
    ) -> Result<Option<LocalPhase>> {
        let m = &job.merge;
        let sn = with_mu_seed(job.seed, || {
            VitSuperNet::new(&self.refs(), m.mu_type, m.init, m.rank)
        })?;
        restore_phase(work, plan, "local", sn.named_params())?;
        let heads = self.heads();
        let (vit, merged_heads) = sn.merged(&heads);
        let folded = MergedVit {
            vit,
            heads: merged_heads,
        };
        let chain = HeadsReadOut::new(&heads, move |x: &Tensor| {
            chunked(x, 1, |c| sn.forward_local_chain(&images(c)))
        });
        Ok(Some(LocalPhase {
            chain: Box::new(chain),
            folded: Box::new(folded),
        }))
    }

    fn assemble(
        &self,
        job: &JobConfig,
        mut tensors: BTreeMap<String, HostTensor>,
    ) -> Result<Box<dyn MergedNet>> {
        let heads = take_heads(&job.tasks, &mut tensors)?;
        let cfg = self.models[0].cfg.clone();
        let units = 0..cfg.num_hidden_layers + 1;
        let vit = VitPart::from_tensors(cfg, units, "", tensors)?.into_vit()?;
        Ok(Box::new(MergedVit { vit, heads }))
    }
}

impl Predictor for MergedVit {
    fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        MergedVit::logits(self, x)
    }
}

impl MergedNet for MergedVit {
    /// `merged/`: config.json + model.safetensors (one classifier of every task's classes) and
    /// `merged/fsmerge.json` (each task's slice of the logits).
    fn write(
        &self,
        out: &Path,
        job: &JobConfig,
        variant: &BTreeMap<String, serde_json::Value>,
    ) -> Result<()> {
        let (labels, tasks) = stacked_labels(&job.tasks, &|c| format!("class {c}"));
        let dir = out.join("merged");
        self.joint_checkpoint()
            .save_sharded(&dir, &labels, job.output.max_shard_bytes())?;
        write_json(
            &dir.join("fsmerge.json"),
            &serde_json::json!({"method": "fs-merge", "variant": variant, "tasks": tasks, "input": "square grey images, normalised as fsmerge's data loader does"}),
        )
    }
}
