//! What the coordinator needs of the MLP family without its weights: the originals checked
//! from their configs and safetensors headers, and the merged model written as the stages send
//! it (`merged.safetensors`: one body, a head per task, and `merged.json`).

use crate::family::MergedWriter;
use fsmerge_common::checkpoint::{
    body_bias, body_weight, head_bias, head_weight, model_paths, tensor_shapes, write_json,
    HostTensor, MergedConfig, MergedTask, MlpPart, MERGED_FORMAT,
};
use fsmerge_common::config::JobConfig;
use fsmerge_common::hf_writer::ShardedWriter;
use fsmerge_common::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The input width of the job's data: pixels of its images, or token ids of its texts.
fn data_width(job: &JobConfig) -> usize {
    match job.data.image_side() {
        0 => job.data.max_tokens,
        side => side * side,
    }
}

/// Every original has the same body, the data's input width and a head with one output per
/// class of its task; `merge.rank` fits the narrowest layer. Shapes come from the headers.
pub fn check(job: &JobConfig, models_dir: &Path) -> Result<()> {
    use fsmerge_common::precision::Precision;
    if job.merge.features == fsmerge_common::config::Features::Recompute {
        return Err(fsmerge_common::Error::field(
            "merge.features",
            "`recompute` is for the transformer families; an MLP's features are small: use `memory` or `disk`",
        ));
    }
    if let Some(p @ (Precision::Bf16 | Precision::Fp16)) = job.merge.precision {
        return Err(fsmerge_common::Error::field(
            "merge.precision",
            format!(
                "`{}` is for the transformer families; fsmerge's MLPs are fp32 and merge in fp32",
                p.torch_dtype()
            ),
        ));
    }
    let mut first: Option<(PathBuf, BTreeMap<String, Vec<usize>>)> = None;
    for task in &job.tasks {
        let config = MlpPart::load(models_dir, &task.name, 0..0, false)?.config;
        let (file, _) = model_paths(models_dir, &task.name);
        let shapes = tensor_shapes(&file)?;
        let shape_of = |name: &str| shapes.get(name).cloned().unwrap_or_default();
        let head = shape_of(&head_weight(None));
        if head.first() != Some(&task.classes.len()) || config.classes.len() != task.classes.len() {
            return Err(Error::Tensor {
                file: file.clone(),
                tensor: head_weight(None),
                msg: format!(
                    "head has {:?} outputs but task `{}` has {} classes {:?}",
                    head.first(),
                    task.name,
                    task.classes.len(),
                    task.classes
                ),
            });
        }
        if config.input_dim != data_width(job) {
            return Err(Error::Tensor {
                file: file.clone(),
                tensor: body_weight(0),
                msg: format!(
                    "input size {} but the data has {} values per row",
                    config.input_dim,
                    data_width(job)
                ),
            });
        }
        let body: BTreeMap<String, Vec<usize>> = (0..config.hidden.len())
            .map(|l| (body_weight(l), shape_of(&body_weight(l))))
            .collect();
        match &first {
            None => {
                if let Some(&w) = config.hidden.iter().min() {
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
                first = Some((file, body));
            }
            Some((file0, body0)) => same_body(file0, body0, &file, &body)?,
        }
    }
    Ok(())
}

/// The first body tensor whose shape differs between two models, named with both files.
fn same_body(
    file0: &Path,
    body0: &BTreeMap<String, Vec<usize>>,
    file: &Path,
    body: &BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    if body.len() != body0.len() {
        return Err(Error::Mismatch(format!(
            "{} has {} body layers, {} has {}",
            file.display(),
            body.len(),
            file0.display(),
            body0.len()
        )));
    }
    for ((name, s), s0) in body.iter().zip(body0.values()) {
        if s != s0 {
            return Err(Error::Mismatch(format!(
                "tensor `{name}` is {s:?} in {} but {s0:?} in {}",
                file.display(),
                file0.display()
            )));
        }
    }
    Ok(())
}

/// `merged.safetensors` + `merged.json`, written as the tensors come.
pub struct MlpWriter {
    out: PathBuf,
    shards: ShardedWriter,
    left: BTreeSet<String>,
    config: MergedConfig,
}

/// The merged MLP's writer into `out`.
pub fn writer(job: &JobConfig, models_dir: &Path, out: &Path) -> Result<Box<dyn MergedWriter>> {
    let original = MlpPart::load(models_dir, &job.tasks[0].name, 0..0, false)?.config;
    let mut left = BTreeSet::new();
    for l in 0..original.hidden.len() {
        left.extend([body_weight(l), body_bias(l)]);
    }
    for t in &job.tasks {
        left.extend([head_weight(Some(&t.name)), head_bias(Some(&t.name))]);
    }
    let config = MergedConfig {
        format: MERGED_FORMAT.into(),
        input_dim: original.input_dim,
        hidden: original.hidden,
        tasks: (job.tasks.iter())
            .map(|t| MergedTask {
                name: t.name.clone(),
                classes: t.classes.clone(),
            })
            .collect(),
        method: "fs-merge".into(),
        variant: serde_json::Value::Null,
    };
    // One file whatever its size: fsmerge's own MLP layout is not sharded.
    let shards = ShardedWriter::new(&out.join(".merged"), u64::MAX)?;
    Ok(Box::new(MlpWriter {
        out: out.to_path_buf(),
        shards,
        left,
        config,
    }))
}

impl MergedWriter for MlpWriter {
    fn add(&mut self, name: String, t: HostTensor) -> Result<()> {
        if !self.left.remove(&name) {
            return Err(Error::Protocol(format!(
                "the merged MLP has no tensor `{name}`, or it came twice"
            )));
        }
        self.shards.add(name, t)
    }

    fn finish(self: Box<Self>, variant: &BTreeMap<String, serde_json::Value>) -> Result<()> {
        let me = *self;
        if let Some(name) = me.left.iter().next() {
            return Err(Error::Protocol(format!(
                "no worker sent the folded tensor `{name}`"
            )));
        }
        let files = me.shards.finish()?;
        let file = me.out.join("merged.safetensors");
        std::fs::rename(&files[0], &file).map_err(|e| Error::io(&file, e))?;
        let tmp = me.out.join(".merged");
        std::fs::remove_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let config = MergedConfig {
            variant: serde_json::to_value(variant)
                .map_err(|e| Error::Compute(format!("variant to JSON: {e}")))?,
            ..me.config
        };
        write_json(&me.out.join("merged.json"), &config)
    }
}
