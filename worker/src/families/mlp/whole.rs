//! The MLP family's originals loaded whole (the coordinator's job): checks, evaluation, the
//! baselines, and the merged model assembled from the stages' folded tensors and written as
//! `merged.safetensors` + `merged.json`.

use crate::core::linear::{take_heads, Linear};
use crate::core::tensor::{to_host, to_tch};
use crate::families::mlp::baselines;
use crate::families::mlp::merge::teacher_features;
use crate::families::mlp::model::{MergedModel, Mlp};
use crate::family::{
    ensemble_is_not_merged, BaselineInputs, LocalPhase, MergedNet, Originals, Predictor,
};
use crate::train::progress::LogRow;
use fsmerge_common::checkpoint::{
    body_bias, body_weight, check_same_architecture, head_bias, head_weight, write_json,
    write_tensors, HostTensor, MergedConfig, MergedTask, MlpCheckpoint, MERGED_FORMAT,
};
use fsmerge_common::config::{Baseline, JobConfig};
use fsmerge_common::plan::Plan;
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::{Error, Result};
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub struct MlpOriginals {
    models: Vec<Mlp>,
    /// Every model's features at every layer on the merge set (RegMean and KD read them).
    feats: OnceCell<Vec<Tensor>>,
}

/// Load the originals of every task and check they can be merged: same body architecture, input
/// size of the data, a head with one output per class of its task, and layers at least
/// `merge.rank` wide.
pub fn open(job: &JobConfig, models_dir: &Path, input_dim: usize) -> Result<MlpOriginals> {
    let mut cks = Vec::new();
    for task in &job.tasks {
        let ck = MlpCheckpoint::load(models_dir, &task.name)?;
        if ck.config.classes.len() != task.classes.len() || ck.head.0.shape[0] != task.classes.len()
        {
            return Err(Error::Tensor {
                file: ck.file.clone(),
                tensor: "head.weight".into(),
                msg: format!(
                    "head has {} outputs but task `{}` has {} classes {:?}",
                    ck.head.0.shape[0],
                    task.name,
                    task.classes.len(),
                    task.classes
                ),
            });
        }
        if ck.config.input_dim != input_dim {
            return Err(Error::Tensor {
                file: ck.file.clone(),
                tensor: "body.0.weight".into(),
                msg: format!(
                    "input size {} but the data has {input_dim} pixels",
                    ck.config.input_dim
                ),
            });
        }
        cks.push(ck);
    }
    check_same_architecture(&cks)?;
    if let Some(&w) = cks[0].config.hidden.iter().min() {
        if job.merge.rank > w {
            return Err(Error::field(
                "merge.rank",
                format!(
                    "{} is larger than the models' smallest layer width {w}",
                    job.merge.rank
                ),
            ));
        }
    }
    Ok(MlpOriginals {
        models: cks.iter().map(Mlp::from_checkpoint).collect(),
        feats: OnceCell::new(),
    })
}

impl MlpOriginals {
    fn refs(&self) -> Vec<&Mlp> {
        self.models.iter().collect()
    }
    fn feats(&self, x: &Tensor) -> &[Tensor] {
        self.feats.get_or_init(|| teacher_features(&self.refs(), x))
    }
}

impl Originals for MlpOriginals {
    fn logits(&self, t: usize, x: &Tensor) -> Tensor {
        self.models[t].logits(x)
    }

    fn baseline(
        &self,
        method: Baseline,
        inputs: &BaselineInputs,
    ) -> Result<(Box<dyn MergedNet>, Vec<LogRow>)> {
        let (refs, set, b) = (self.refs(), inputs.set, &inputs.job.baselines);
        let (merged, log) = match method {
            Baseline::First => (baselines::first(&refs), Vec::new()),
            Baseline::Average => (baselines::average(&refs), Vec::new()),
            Baseline::Regmean => (
                baselines::regmean(&refs, set, self.feats(&set.x), b.regmean_alpha)?,
                Vec::new(),
            ),
            Baseline::Kd => baselines::kd(
                &refs,
                set,
                self.feats(&set.x),
                b.kd_target_scale,
                inputs.kd,
                inputs.progress,
            )?,
            Baseline::Ensemble => return Err(ensemble_is_not_merged()),
        };
        Ok((Box::new(merged), log))
    }

    /// An MLP's local problems share no residual merge: the local fold is exact, and the job
    /// reports no separate local rows.
    fn local_phase(
        &self,
        _job: &JobConfig,
        _work: &WorkDir,
        _plan: &Plan,
    ) -> Result<Option<LocalPhase>> {
        Ok(None)
    }

    fn assemble(
        &self,
        job: &JobConfig,
        mut tensors: BTreeMap<String, HostTensor>,
    ) -> Result<Box<dyn MergedNet>> {
        let heads = take_heads(&job.tasks, &mut tensors)?;
        let get = |name: String| -> Result<Tensor> {
            tensors.get(&name).map(to_tch).ok_or_else(|| {
                Error::Protocol(format!("no worker sent the folded tensor `{name}`"))
            })
        };
        let body = (0..self.models[0].body.len())
            .map(|l| {
                Ok(Linear {
                    w: get(body_weight(l))?,
                    b: get(body_bias(l))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(MergedModel { body, heads }))
    }
}

impl Predictor for MergedModel {
    fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        MergedModel::logits(self, x)
    }
}

impl MergedNet for MergedModel {
    /// `merged.safetensors` (one body, a head per task) + `merged.json`.
    fn write(
        &self,
        out: &Path,
        job: &JobConfig,
        variant: &BTreeMap<String, serde_json::Value>,
    ) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (l, layer) in self.body.iter().enumerate() {
            tensors.insert(body_weight(l), to_host(&layer.w)?);
            tensors.insert(body_bias(l), to_host(&layer.b)?);
        }
        for (task, head) in job.tasks.iter().zip(&self.heads) {
            tensors.insert(head_weight(Some(&task.name)), to_host(&head.w)?);
            tensors.insert(head_bias(Some(&task.name)), to_host(&head.b)?);
        }
        write_tensors(&out.join("merged.safetensors"), &tensors)?;
        let config = MergedConfig {
            format: MERGED_FORMAT.into(),
            input_dim: self.body[0].w.size()[1] as usize,
            hidden: self.body.iter().map(|l| l.w.size()[0] as usize).collect(),
            tasks: job
                .tasks
                .iter()
                .map(|t| MergedTask {
                    name: t.name.clone(),
                    classes: t.classes.clone(),
                })
                .collect(),
            method: "fs-merge".into(),
            variant: serde_json::to_value(variant)
                .map_err(|e| Error::Compute(format!("variant to JSON: {e}")))?,
        };
        write_json(&out.join("merged.json"), &config)?;
        Ok(())
    }
}
