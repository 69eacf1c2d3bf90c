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
use fsmerge_common::config::JobConfig;
use fsmerge_common::hf::WeightFiles;
use fsmerge_common::{Error, Result};
use std::path::Path;

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
/// one output per class of its task and the job's vocabulary; `merge.rank` fits the width.
pub fn check(job: &JobConfig, models_dir: &Path) -> Result<()> {
    let mut first: Option<(LlamaConfig, std::path::PathBuf)> = None;
    for (task, dir) in job.tasks.iter().zip(job.original_dirs(models_dir)) {
        let cfg = LlamaConfig::load(&dir)?;
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
/// `merged/fsmerge.json` (each task's slice of the logits).
pub fn writer(job: &JobConfig, models_dir: &Path, out: &Path) -> Result<Box<dyn MergedWriter>> {
    let dir = job.original_dir(models_dir, 0);
    let cfg = LlamaConfig::load(&dir)?;
    let files = WeightFiles::open(&dir)?;
    let units = 0..cfg.num_hidden_layers + 1;
    let encoder = LlamaPart::names(&cfg, &units, &|n| files.contains(n))
        .into_iter()
        .collect();
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
