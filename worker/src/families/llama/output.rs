//! What the coordinator needs of the Llama family without its weights: the originals checked
//! from their configs and safetensors headers, and the merged model written as the stages send
//! it, one `LlamaForSequenceClassification` whose `score` stacks every task's head.

use crate::core::checks::{check_classifier, check_rank, check_shapes};
use crate::core::merged_output::{HfClassifierWriter, HfLayout};
use crate::data::text::CLASSES;
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::model::{config_json, Head};
use crate::families::llama::part::{LlamaPart, BODY_PREFIX};
use crate::family::MergedWriter;
use fsmerge_common::checkpoint::{head_bias, head_weight, write_json, HostTensor};
use fsmerge_common::config::{JobConfig, Objective};
use fsmerge_common::hf::WeightFiles;
use fsmerge_common::hf_writer::ShardedWriter;
use fsmerge_common::precision::Precision;
use fsmerge_common::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The body tensors of a Llama of `cfg` (HF names) and their shapes; a bias where `has` says
/// the model has one.
fn expected_shapes(cfg: &LlamaConfig, has: &dyn Fn(&str) -> bool) -> Vec<(String, Vec<usize>)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let units = 0..cfg.num_hidden_layers + 1;
    LlamaPart::names(cfg, &units, has)
        .into_iter()
        .map(|name| {
            let shape = if name == "embed_tokens.weight" {
                vec![cfg.vocab_size, d]
            } else if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
                vec![d]
            } else {
                let (out, inp) = match name.split('.').nth(3).unwrap_or("") {
                    "q_proj" => (q, d),
                    "k_proj" | "v_proj" => (kv, d),
                    "o_proj" => (d, q),
                    "gate_proj" | "up_proj" => (i, d),
                    _ => (d, i),
                };
                if name.ends_with(".bias") {
                    vec![out]
                } else {
                    vec![out, inp]
                }
            };
            (format!("{BODY_PREFIX}{name}"), shape)
        })
        .collect()
}

/// Every task's original is a Llama-family sequence classifier of one shape, with a `score` of
/// one output per class of its task (a causal LM: its own `lm_head`) and the job's vocabulary;
/// `merge.rank` fits the width.
pub fn check(job: &JobConfig, models_dir: &Path) -> Result<()> {
    let mut first: Option<(LlamaConfig, std::path::PathBuf)> = None;
    for (task, dir) in job.tasks.iter().zip(job.original_dirs(models_dir)) {
        let cfg = LlamaConfig::load(&dir)?;
        cfg.window_fits(job.data.max_tokens, &dir.join("config.json"))?;
        let files = WeightFiles::open(&dir)?;
        // Full HF names, no optional prefix: fsmerge reads a Llama's body under `model.`.
        let expected = expected_shapes(&cfg, &|n| files.contains(n));
        let blocks = format!("{BODY_PREFIX}layers.");
        check_shapes(
            &dir,
            &files,
            "",
            &expected,
            (&blocks, cfg.num_hidden_layers),
        )?;
        if job.objective() == Objective::Lm {
            check_lm_head(&dir, &cfg, &files)?;
        } else {
            let outputs = files
                .shape("score.weight")?
                .and_then(|s| s.first().copied());
            check_classifier(&dir, task, outputs).map_err(|e| match e {
                Error::Tensor { file, msg, .. } => Error::Tensor {
                    file,
                    tensor: "score.weight".into(),
                    msg,
                },
                other => other,
            })?;
        }
        match &first {
            None => first = Some((cfg, dir)),
            Some((c0, d0)) => {
                if c0.vocab_size != cfg.vocab_size {
                    return Err(Error::Checkpoint {
                        file: dir.join("config.json"),
                        msg: format!(
                            "vocab_size {} differs from {}'s {}: FS-Merge of decoders needs one vocabulary and tokenizer",
                            cfg.vocab_size,
                            d0.display(),
                            c0.vocab_size
                        ),
                    });
                }
                same_tokenizer(d0, &dir)?;
            }
        }
    }
    let width = first.map_or(usize::MAX, |(c, _)| c.hidden_size);
    check_rank(job.merge.rank, width)
}

/// A causal LM's own `lm_head` [vocab_size, hidden_size]: a tied one (its read-out is the
/// embedding table, which U_final cannot fold into per task) is refused by name.
fn check_lm_head(dir: &Path, cfg: &LlamaConfig, files: &WeightFiles) -> Result<()> {
    let err = |msg: String| Error::Tensor {
        file: dir.to_path_buf(),
        tensor: "lm_head.weight".into(),
        msg,
    };
    match files.shape("lm_head.weight")? {
        None if cfg.tie_word_embeddings => Err(err(
            "absent: tie_word_embeddings = true (a tied LM head cannot take each task's folded read-out; untie it: copy embed_tokens into lm_head.weight)".into(),
        )),
        None => Err(err(
            "absent: model.llama.objective = \"lm\" merges causal LMs, each with its own LM head"
                .into(),
        )),
        Some(s) if s != [cfg.vocab_size, cfg.hidden_size] => Err(err(format!(
            "shape {s:?}, expected [vocab_size, hidden_size] = [{}, {}]",
            cfg.vocab_size, cfg.hidden_size
        ))),
        Some(_) => Ok(()),
    }
}

/// Two models' tokenizers (`tokenizer.json` when both have one) must be the same file.
fn same_tokenizer(a: &Path, b: &Path) -> Result<()> {
    let (fa, fb) = (a.join("tokenizer.json"), b.join("tokenizer.json"));
    if !(fa.is_file() && fb.is_file()) {
        return Ok(());
    }
    let read = |f: &Path| std::fs::read(f).map_err(|e| Error::io(f, e));
    if read(&fa)? != read(&fb)? {
        return Err(Error::Checkpoint {
            file: fb,
            msg: format!(
                "differs from {}: FS-Merge of decoders needs one vocabulary and tokenizer",
                fa.display()
            ),
        });
    }
    Ok(())
}

/// `merged/`: config.json + the weights (one `score` of every task's classes) and
/// `merged/fsmerge.json` (each task's slice of the logits); for causal LMs one folder per task
/// (`CausalLmWriter`).
pub fn writer(job: &JobConfig, models_dir: &Path, out: &Path) -> Result<Box<dyn MergedWriter>> {
    if job.objective() == Objective::Lm {
        return Ok(Box::new(CausalLmWriter::new(job, models_dir, out)?));
    }
    let (cfg, encoder) = merged_body(job, models_dir)?;
    let layout = HfLayout {
        prefix: BODY_PREFIX,
        head: ("score", false),
        encoder,
        config: Box::new(move |labels| config_json(&cfg, &Head::Classifier(labels.to_vec()))),
        class_name: |c| CLASSES.get(c).unwrap_or(&"?").to_string(),
        input: "WordPiece ids of data.vocab (BERT uncased), [CLS] text [SEP] padded with [PAD] = 0 to data.max_tokens; the classifier reads the last real token",
        processor_files: &[
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            "tokenizer.model",
        ],
    };
    Ok(Box::new(HfClassifierWriter::new(
        out, job, models_dir, layout,
    )?))
}

/// The first original's config and the merged body's tensors (merged names, a bias where that
/// model has one), which the stages send.
fn merged_body(job: &JobConfig, models_dir: &Path) -> Result<(LlamaConfig, BTreeSet<String>)> {
    let dir = job.original_dir(models_dir, 0);
    let cfg = LlamaConfig::load(&dir)?;
    let files = WeightFiles::open(&dir)?;
    let units = 0..cfg.num_hidden_layers + 1;
    let names = LlamaPart::names(&cfg, &units, &|n| files.contains(n));
    Ok((cfg, names.into_iter().collect()))
}

/// `merged/<task>/` for every task of a causal-LM job: one `…ForCausalLM` each, task t's
/// `lm_head` (its U_final⁽ᵗ⁾ folded in) in `lm_head.safetensors` and the one merged body in
/// shards that every task's folder hard-links (copies where the file system cannot), indexed
/// by `model.safetensors.index.json` as transformers loads sharded checkpoints.
pub struct CausalLmWriter {
    dir: PathBuf,
    cfg: LlamaConfig,
    tasks: Vec<String>,
    body: Option<ShardedWriter>,
    /// The body's tensors (HF names) as written, and their bytes (the index's
    /// `total_size`, with a head's).
    body_names: Vec<String>,
    body_bytes: u64,
    precision: Precision,
    left: BTreeSet<String>,
}

/// Where the body's shards are written before every task's folder links them.
const BODY_STAGING: &str = ".body";

impl CausalLmWriter {
    pub fn new(job: &JobConfig, models_dir: &Path, out: &Path) -> Result<Self> {
        let (cfg, mut left) = merged_body(job, models_dir)?;
        for t in &job.tasks {
            left.insert(head_weight(Some(&t.name)));
            left.insert(head_bias(Some(&t.name)));
        }
        let precision = Precision::for_job(job, models_dir)?;
        let dir = out.join("merged");
        let body = ShardedWriter::new(&dir.join(BODY_STAGING), job.output.max_shard_bytes())?
            .with_precision(precision);
        Ok(Self {
            dir,
            cfg,
            tasks: job.tasks.iter().map(|t| t.name.clone()).collect(),
            body: Some(body),
            body_names: Vec::new(),
            body_bytes: 0,
            precision,
            left,
        })
    }

    /// Task `task`'s folded head: its weight to `merged/<task>/lm_head.safetensors`; its bias
    /// (an `lm_head` has none) must be zero.
    fn add_head(&mut self, task: &str, bias: bool, t: HostTensor) -> Result<()> {
        if bias {
            if t.data.iter().any(|&v| v != 0.0) {
                return Err(Error::Protocol(format!(
                    "task {task}'s folded LM head has a bias, which `lm_head` does not"
                )));
            }
            return Ok(());
        }
        let staging = self.dir.join(BODY_STAGING).join("heads").join(task);
        let mut w = ShardedWriter::new(&staging, u64::MAX)?.with_precision(self.precision);
        w.add("lm_head.weight".into(), t)?;
        let written = w.finish()?;
        let task_dir = self.dir.join(task);
        std::fs::create_dir_all(&task_dir).map_err(|e| Error::io(&task_dir, e))?;
        let to = task_dir.join("lm_head.safetensors");
        std::fs::rename(&written[0], &to).map_err(|e| Error::io(&to, e))
    }
}

impl MergedWriter for CausalLmWriter {
    fn add(&mut self, name: String, t: HostTensor) -> Result<()> {
        if !self.left.remove(&name) {
            return Err(Error::Protocol(format!(
                "the merged model has no tensor `{name}`, or it came twice"
            )));
        }
        if let Some(rest) = name.strip_prefix("heads.") {
            let (task, kind) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let task = task.to_string();
            return self.add_head(&task, kind == "bias", t);
        }
        self.body_bytes += (self.precision.bytes() * t.data.len()) as u64;
        let hf = format!("{BODY_PREFIX}{name}");
        self.body_names.push(hf.clone());
        match &mut self.body {
            Some(b) => b.add(hf, t),
            None => Err(Error::Protocol("the merged body is already written".into())),
        }
    }

    fn finish(self: Box<Self>, variant: &BTreeMap<String, serde_json::Value>) -> Result<()> {
        let mut me = *self;
        if let Some(name) = me.left.iter().next() {
            return Err(Error::Protocol(format!(
                "no worker sent the folded tensor `{name}`"
            )));
        }
        let body = me.body.take().map(ShardedWriter::finish).transpose()?;
        let staging = me.dir.join(BODY_STAGING);
        // The body's shards under the names every task's index gives them (a lone
        // `model.safetensors` would hide the index from transformers).
        let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
        let mut shards = Vec::new();
        for file in body.unwrap_or_default() {
            let name = file
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if name.ends_with(".json") {
                let index = fsmerge_common::checkpoint::read_json::<serde_json::Value>(&file)?;
                for (tensor, shard) in index["weight_map"].as_object().into_iter().flatten() {
                    let shard = shard.as_str().unwrap_or_default().to_string();
                    weight_map.insert(tensor.clone(), shard);
                }
                continue;
            }
            let linked = if name == "model.safetensors" {
                "model-body.safetensors".to_string()
            } else {
                name
            };
            shards.push((file, linked));
        }
        if weight_map.is_empty() {
            for n in &me.body_names {
                weight_map.insert(n.clone(), "model-body.safetensors".into());
            }
        }
        weight_map.insert("lm_head.weight".into(), "lm_head.safetensors".into());
        let head_bytes = me.cfg.vocab_size * me.cfg.hidden_size * me.precision.bytes();
        let mut config = config_json(&me.cfg, &Head::CausalLm { tied: false });
        config["torch_dtype"] = me.precision.torch_dtype().into();
        for task in &me.tasks {
            let dir = me.dir.join(task);
            for (file, name) in &shards {
                link_or_copy(file, &dir.join(name))?;
            }
            write_json(
                &dir.join("model.safetensors.index.json"),
                &serde_json::json!({
                    "metadata": {"total_size": me.body_bytes + head_bytes as u64},
                    "weight_map": weight_map,
                }),
            )?;
            write_json(&dir.join("config.json"), &config)?;
            write_json(
                &dir.join("fsmerge.json"),
                &serde_json::json!({"method": "fs-merge", "variant": variant, "task": task,
                    "input": "WordPiece ids of data.vocab (BERT uncased), [CLS] text [SEP]; the model predicts each next token",
                    "shared_body": shards.iter().map(|(_, n)| n).collect::<Vec<_>>()}),
            )?;
        }
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))
    }
}

/// `to` as a hard link of `from` (one copy on disk), else a copy.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::llama::merge::config_for_text;
    use crate::families::llama::model::Llama;
    use fsmerge_common::config::LlamaShape;

    /// A causal LM's head: its own `lm_head` passes; a tied one, and a classifier's lack of
    /// one, are named.
    #[test]
    fn an_lm_head_is_checked_and_a_tied_one_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_for_text(&LlamaShape::default(), 50);
        let check = |model: &Llama, name: &str| {
            let d = dir.path().join(name);
            model.save(&d).unwrap();
            let c = LlamaConfig::load(&d).unwrap();
            check_lm_head(&d, &c, &WeightFiles::open(&d).unwrap()).map_err(|e| e.to_string())
        };
        let mut model = Llama::init(cfg);
        assert!(check(&model, "own").is_ok());
        model.lm_head = None;
        model.cfg.tie_word_embeddings = true;
        let e = check(&model, "tied").unwrap_err();
        assert!(
            e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
            "{e}"
        );
        model.score = Some(tch::Tensor::zeros([2, 64], crate::core::tensor::F32));
        model.cfg.tie_word_embeddings = false;
        let e = check(&model, "classifier").unwrap_err();
        assert!(
            e.contains("lm_head.weight") && e.contains("objective"),
            "{e}"
        );
    }
}
