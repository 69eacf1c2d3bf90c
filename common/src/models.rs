//! `[[models]]`: the Hugging Face checkpoints a job merges, listed by folder, each with its own
//! data (`merge_data`, unlabeled is fine; optional `eval_data`). Resolving them fills what a
//! built-in job writes by hand: one task per model (its classes numbered after the previous
//! models'), the architecture and its shape from `config.json`, and the input the data becomes.

use crate::data_source::DataSource;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// An HF folder (`config.json`, single or sharded safetensors, the preprocessor or
    /// tokenizer files); relative paths are relative to the working directory.
    pub path: PathBuf,
    /// The task's name; default: the folder's name.
    #[serde(default)]
    pub task: Option<String>,
    /// Inputs FS-Merge reconstructs the model's features on (labels unused).
    pub merge_data: DataSource,
    /// Labeled inputs for the per-task accuracies; without them every fifth `merge_data` input
    /// is held out (not merged on) to measure the task's fidelity.
    #[serde(default)]
    pub eval_data: Option<DataSource>,
}

/// What a job learns of one model from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    pub model_type: String,
    /// Class names by class id (`id2label`).
    pub labels: Vec<String>,
    pub config: serde_json::Value,
}

/// The input every model of a `[[models]]` job reads, from the first model's `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsInput {
    /// Images: side of the square image and channels (ViT); 0 and 0 for text.
    pub image_side: usize,
    pub channels: usize,
    /// Classes of all tasks together (task t's are numbered after task t-1's).
    pub classes: usize,
}

impl ModelFacts {
    /// Read `dir/config.json`: `model_type` and the classes (`id2label`, else `num_labels`).
    pub fn read(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let bad = |msg: String| Error::Checkpoint {
            file: file.clone(),
            msg,
        };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let model_type = config["model_type"]
            .as_str()
            .ok_or_else(|| bad("no `model_type`".into()))?
            .to_string();
        let labels: Vec<String> = match config["id2label"].as_object() {
            Some(map) => {
                let mut by_id = BTreeMap::new();
                for (k, v) in map {
                    let id: usize = k
                        .parse()
                        .map_err(|_| bad(format!("id2label key {k:?} is not a class id")))?;
                    let name = v
                        .as_str()
                        .ok_or_else(|| bad(format!("id2label[{k}] is not a string")))?;
                    by_id.insert(id, name.to_string());
                }
                if by_id.keys().copied().ne(0..by_id.len()) {
                    return Err(bad("id2label's ids are not 0..n".into()));
                }
                by_id.into_values().collect()
            }
            None => {
                let n = config["num_labels"]
                    .as_u64()
                    .ok_or_else(|| bad("neither `id2label` nor `num_labels`".into()))?;
                (0..n).map(|i| format!("LABEL_{i}")).collect()
            }
        };
        if labels.len() < 2 || labels.len() > 1 << 16 {
            return Err(bad(format!(
                "{} classes: a task needs 2 to 65536",
                labels.len()
            )));
        }
        Ok(ModelFacts {
            model_type,
            labels,
            config,
        })
    }

    /// `label2id` of the model: class name → class id.
    pub fn label2id(&self) -> BTreeMap<String, usize> {
        self.labels
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect()
    }
}

impl ModelEntry {
    /// The task name: `task`, else the folder's name.
    pub fn task_name(&self) -> String {
        self.task.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }
}
