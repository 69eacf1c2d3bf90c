//! The merged model written as the stages send its folded tensors, never whole in memory: an
//! HF sequence/image classifier folder (`merged/`) whose encoder tensors go straight to
//! safetensors shards and whose classifier stacks every task's head (small, held to the end),
//! with `config.json` and `fsmerge.json` (each task's slice of the logits).

use crate::core::linear::stacked_labels;
use crate::family::MergedWriter;
use fsmerge_common::checkpoint::{head_bias, head_weight, write_json, HostTensor};
use fsmerge_common::config::{JobConfig, TaskConfig};
use fsmerge_common::hf_writer::ShardedWriter;
use fsmerge_common::precision::Precision;
use fsmerge_common::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A family's `config.json` for the stacked classifier's labels.
pub type ConfigJson = Box<dyn Fn(&[String]) -> serde_json::Value>;

/// What a family tells the writer about its HF layout.
pub struct HfLayout {
    /// Prefix of the encoder's tensors in the classification model (`vit.`, `bert.`).
    pub prefix: &'static str,
    /// The encoder tensors (merged names, no prefix) the stages must send.
    pub encoder: BTreeSet<String>,
    /// The stacked classifier's name (`classifier`; a Llama's `score`) and whether it has a
    /// bias (a Llama's has none: the folded heads' zero biases are checked and dropped).
    pub head: (&'static str, bool),
    /// `config.json` for the classifier's labels.
    pub config: ConfigJson,
    /// How a built-in dataset's class is named in the labels (a `[[models]]` job's classes
    /// keep their models' `id2label` names).
    pub class_name: fn(usize) -> String,
    /// What the model reads, for `fsmerge.json` (a `[[models]]` job: its processor files).
    pub input: &'static str,
    /// A `[[models]]` job's preprocessing files, copied from the first model's folder when it
    /// has them (`preprocessor_config.json`, tokenizer files): every model preprocesses
    /// alike or was adapted to the first's input, and the merged model is loaded with them.
    pub processor_files: &'static [&'static str],
}

/// The name of every class of the job (task t's after task t-1's): the models' `id2label`
/// names for a `[[models]]` job, else `class_name`'s.
fn class_names(job: &JobConfig, class_name: fn(usize) -> String) -> Result<Vec<String>> {
    if job.models.is_empty() {
        return Ok((0..job.data.num_classes()).map(class_name).collect());
    }
    let mut names = Vec::new();
    for m in &job.models {
        names.extend(fsmerge_common::models::ModelFacts::read(&m.path)?.labels);
    }
    Ok(names)
}

pub struct HfClassifierWriter {
    dir: PathBuf,
    class_names: Vec<String>,
    /// Files to copy into the folder (a `[[models]]` job's processor files).
    copies: Vec<PathBuf>,
    shards: ShardedWriter,
    layout: HfLayout,
    tasks: Vec<TaskConfig>,
    heads: BTreeMap<String, HostTensor>,
    left: BTreeSet<String>,
    precision: Precision,
}

impl HfClassifierWriter {
    /// Write into `<out>/merged`, in the job's precision (`merge.precision`, else that of the
    /// originals in `models_dir`).
    pub fn new(out: &Path, job: &JobConfig, models_dir: &Path, layout: HfLayout) -> Result<Self> {
        let precision = Precision::for_job(job, models_dir)?;
        let dir = out.join("merged");
        let mut left = layout.encoder.clone();
        for t in &job.tasks {
            left.insert(head_weight(Some(&t.name)));
            left.insert(head_bias(Some(&t.name)));
        }
        let copies = match job.models.first() {
            Some(m) => layout
                .processor_files
                .iter()
                .map(|f| m.path.join(f))
                .filter(|p| p.is_file())
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            shards: ShardedWriter::new(&dir, job.output.max_shard_bytes())?
                .with_precision(precision),
            precision,
            class_names: class_names(job, layout.class_name)?,
            copies,
            dir,
            layout,
            tasks: job.tasks.clone(),
            heads: BTreeMap::new(),
            left,
        })
    }
}

impl MergedWriter for HfClassifierWriter {
    fn add(&mut self, name: String, t: HostTensor) -> Result<()> {
        if !self.left.remove(&name) {
            return Err(Error::Protocol(format!(
                "the merged model has no tensor `{name}`, or it came twice"
            )));
        }
        if name.starts_with("heads.") {
            self.heads.insert(name, t);
            return Ok(());
        }
        self.shards.add(format!("{}{name}", self.layout.prefix), t)
    }

    fn finish(self: Box<Self>, variant: &BTreeMap<String, serde_json::Value>) -> Result<()> {
        let mut me = *self;
        if let Some(name) = me.left.iter().next() {
            return Err(Error::Protocol(format!(
                "no worker sent the folded tensor `{name}`"
            )));
        }
        let (w, b) = stacked(&me.tasks, &mut me.heads)?;
        let (head, with_bias) = me.layout.head;
        me.shards.add(format!("{head}.weight"), w)?;
        if with_bias {
            me.shards.add(format!("{head}.bias"), b)?;
        } else if b.data.iter().any(|&v| v != 0.0) {
            return Err(Error::Protocol(format!(
                "the folded heads have a bias, which `{head}` does not"
            )));
        }
        me.shards.finish()?;
        let names = &me.class_names;
        let (labels, tasks) = stacked_labels(&me.tasks, &|c| {
            names
                .get(c)
                .cloned()
                .unwrap_or_else(|| format!("class {c}"))
        });
        let mut config = (me.layout.config)(&labels);
        config["torch_dtype"] = me.precision.torch_dtype().into();
        write_json(&me.dir.join("config.json"), &config)?;
        let mut input = me.layout.input.to_string();
        for file in &me.copies {
            let name = file.file_name().unwrap_or_default();
            std::fs::copy(file, me.dir.join(name)).map_err(|e| Error::io(file, e))?;
            input = "the first model's preprocessing (its files are copied here)".into();
        }
        write_json(
            &me.dir.join("fsmerge.json"),
            &serde_json::json!({"method": "fs-merge", "variant": variant, "tasks": tasks, "input": input}),
        )
    }
}

/// Every task's head stacked into one classifier (task order): weight [Σ classes, d], bias.
fn stacked(
    tasks: &[TaskConfig],
    heads: &mut BTreeMap<String, HostTensor>,
) -> Result<(HostTensor, HostTensor)> {
    let mut take = |name: String| {
        heads
            .remove(&name)
            .ok_or_else(|| Error::Protocol(format!("no worker sent the folded tensor `{name}`")))
    };
    let (mut w, mut b) = (Vec::new(), Vec::new());
    let (mut rows, mut width) = (0, None);
    for t in tasks {
        let hw = take(head_weight(Some(&t.name)))?;
        let hb = take(head_bias(Some(&t.name)))?;
        let d = hw.shape.get(1).copied().unwrap_or(0);
        if hw.shape.len() != 2 || *width.get_or_insert(d) != d || hb.data.len() != hw.shape[0] {
            return Err(Error::Protocol(format!(
                "task `{}`'s folded head has shape {:?} (bias {:?})",
                t.name, hw.shape, hb.shape
            )));
        }
        rows += hw.shape[0];
        w.extend(hw.data);
        b.extend(hb.data);
    }
    Ok((
        HostTensor::new(vec![rows, width.unwrap_or(0)], w),
        HostTensor::new(vec![rows], b),
    ))
}
