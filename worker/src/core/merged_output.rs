//! The merged model written as the stages send its folded tensors, never whole in memory: an
//! HF sequence/image classifier folder (`merged/`) whose encoder tensors go straight to
//! safetensors shards and whose classifier stacks every task's head (small, held to the end),
//! with `config.json` and `fsmerge.json` (each task's slice of the logits).

use crate::core::linear::stacked_labels;
use crate::family::MergedWriter;
use fsmerge_common::checkpoint::{head_bias, head_weight, write_json, HostTensor};
use fsmerge_common::config::{JobConfig, TaskConfig};
use fsmerge_common::hf_writer::ShardedWriter;
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
    /// `config.json` for the classifier's labels.
    pub config: ConfigJson,
    /// How a dataset class is named in the labels.
    pub class_name: fn(usize) -> String,
    /// What the model reads, for `fsmerge.json`.
    pub input: &'static str,
}

pub struct HfClassifierWriter {
    dir: PathBuf,
    shards: ShardedWriter,
    layout: HfLayout,
    tasks: Vec<TaskConfig>,
    heads: BTreeMap<String, HostTensor>,
    left: BTreeSet<String>,
}

impl HfClassifierWriter {
    /// Write into `<out>/merged`.
    pub fn new(out: &Path, job: &JobConfig, layout: HfLayout) -> Result<Self> {
        let dir = out.join("merged");
        let mut left = layout.encoder.clone();
        for t in &job.tasks {
            left.insert(head_weight(Some(&t.name)));
            left.insert(head_bias(Some(&t.name)));
        }
        Ok(Self {
            shards: ShardedWriter::new(&dir, job.output.max_shard_bytes())?,
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
        me.shards.add("classifier.weight".into(), w)?;
        me.shards.add("classifier.bias".into(), b)?;
        me.shards.finish()?;
        let (labels, tasks) = stacked_labels(&me.tasks, &|c| (me.layout.class_name)(c));
        write_json(&me.dir.join("config.json"), &(me.layout.config)(&labels))?;
        write_json(
            &me.dir.join("fsmerge.json"),
            &serde_json::json!({"method": "fs-merge", "variant": variant, "tasks": tasks, "input": me.layout.input}),
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
