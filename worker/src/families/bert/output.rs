//! What the coordinator needs of the BERT family without its weights: the originals checked
//! from their configs and safetensors headers, and the merged model written as the stages send
//! it, one `BertForSequenceClassification` whose classifier stacks every task's head.

use crate::core::checks::{block_shapes, check_classifier, check_rank, check_shapes};
use crate::core::merged_output::{HfClassifierWriter, HfLayout};
use crate::data::text::CLASSES;
use crate::families::bert::model::{config_json, BERT_BLOCK, TABLE_NAMES};
use crate::family::MergedWriter;
use fsmerge_common::config::JobConfig;
use fsmerge_common::hf::{BertConfig, WeightFiles};
use fsmerge_common::{Error, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// Every task's original has a pooler and a classifier with one output per class of its
/// task, and positions for `data.max_tokens`; `merge.rank` fits the width.
pub fn check(job: &JobConfig, models_dir: &Path) -> Result<()> {
    let max_tokens = job.data.max_tokens;
    let mut width = usize::MAX;
    for (task, dir) in job.tasks.iter().zip(job.original_dirs(models_dir)) {
        let cfg = BertConfig::load(&dir)?;
        let files = WeightFiles::open(&dir)?;
        check_shapes(
            &dir,
            &files,
            "bert.",
            &expected_shapes(&cfg),
            ("encoder.layer.", cfg.num_hidden_layers),
        )?;
        let outputs = files
            .shape("classifier.weight")?
            .and_then(|s| s.first().copied());
        check_classifier(&dir, task, outputs)?;
        if !["bert.pooler.dense.weight", "pooler.dense.weight"]
            .iter()
            .any(|n| files.contains(n))
        {
            return Err(Error::Tensor {
                file: dir,
                tensor: "bert.pooler.dense.weight".into(),
                msg: "FS-Merge reconstructs the pooler's output, which this BERT lacks".into(),
            });
        }
        if cfg.max_position_embeddings < max_tokens {
            return Err(Error::Checkpoint {
                file: dir.join("config.json"),
                msg: format!(
                    "max_position_embeddings {} is below data.max_tokens {max_tokens}",
                    cfg.max_position_embeddings
                ),
            });
        }
        width = width.min(cfg.hidden_size);
    }
    check_rank(job.merge.rank, width)
}

/// The encoder tensors of a BERT of `cfg` with its pooler (HF names without the `bert.`
/// prefix) and their shapes.
fn expected_shapes(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let [word, position, token_type] = TABLE_NAMES.map(String::from);
    let mut out = vec![
        (word, vec![cfg.vocab_size, d]),
        (position, vec![cfg.max_position_embeddings, d]),
        (token_type, vec![cfg.type_vocab_size, d]),
        ("embeddings.LayerNorm.weight".into(), vec![d]),
        ("embeddings.LayerNorm.bias".into(), vec![d]),
    ];
    for l in 0..cfg.num_hidden_layers {
        out.extend(block_shapes(l, &BERT_BLOCK, d, cfg.intermediate_size));
    }
    out.push(("pooler.dense.weight".into(), vec![d, d]));
    out.push(("pooler.dense.bias".into(), vec![d]));
    out
}

/// The encoder tensors of a BERT of `cfg` with its pooler (merged names, no `bert.` prefix).
fn encoder_names(cfg: &BertConfig) -> BTreeSet<String> {
    expected_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// `merged/`: config.json + the weights (one classifier of every task's classes) and
/// `merged/fsmerge.json` (each task's slice of the logits).
pub fn writer(job: &JobConfig, models_dir: &Path, out: &Path) -> Result<Box<dyn MergedWriter>> {
    let cfg = BertConfig::load(&job.original_dir(models_dir, 0))?;
    let outputs = job.tasks.iter().map(|t| t.classes.len() as i64).sum();
    let layout = HfLayout {
        prefix: "bert.",
        head: ("classifier", true),
        encoder: encoder_names(&cfg),
        config: Box::new(move |labels| config_json(&cfg, labels, Some(outputs))),
        class_name: |c| CLASSES.get(c).unwrap_or(&"?").to_string(),
        input: "WordPiece ids of data.vocab (BERT uncased), [CLS] text [SEP] padded with [PAD] to data.max_tokens",
        processor_files: &[
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ],
    };
    Ok(Box::new(HfClassifierWriter::new(
        out, job, models_dir, layout,
    )?))
}
