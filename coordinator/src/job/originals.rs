//! `fsmerge train`: the original models, one per task, each from its own seed.

use crate::job::Job;
use crate::report::progress::Reporter;
use anyhow::Result;
use fsmerge_common::checkpoint::model_paths;
use fsmerge_common::config::Arch;
use fsmerge_common::fsio::Staging;
use fsmerge_common::hf::{BertConfig, VitConfig};
use fsmerge_worker::data::rows::Splits;
use fsmerge_worker::data::text;
use fsmerge_worker::data::wordpiece::WordPiece;
use fsmerge_worker::families::bert::merge as bert_merge;
use fsmerge_worker::families::mlp::model::{train_original, TrainSpec};
use fsmerge_worker::families::vit::merge as vit_merge;
use fsmerge_worker::train::optim::OriginalSpec;
use std::path::PathBuf;

/// Seed of task t's original model: distinct per task and per job seed.
pub fn model_seed(job_seed: u64, t: usize) -> u64 {
    job_seed.wrapping_mul(1000).wrapping_add(t as u64 + 1)
}

/// Train the originals that are missing (all of them with `force`), written atomically into the
/// models directory.
pub fn ensure_originals(job: &Job, splits: &Splits, force: bool) -> Result<()> {
    let missing: Vec<usize> = (0..job.cfg.tasks.len())
        .filter(|&t| {
            let name = &job.cfg.tasks[t].name;
            let (st, js) = match job.cfg.model.arch {
                Arch::Mlp => model_paths(&job.models_dir, name),
                Arch::Vit | Arch::Bert => {
                    let dir = hf_model_dir(job, name);
                    (dir.join("model.safetensors"), dir.join("config.json"))
                }
            };
            // Only a model with neither file is missing; a lone file is an error for the loader.
            force || (!st.exists() && !js.exists())
        })
        .collect();
    if missing.is_empty() {
        tracing::info!("originals present in {}", job.models_dir.display());
        return Ok(());
    }
    train_missing(job, splits, &missing)
}

/// The HF folder of task `name`'s original transformer (ViT or BERT).
pub fn hf_model_dir(job: &Job, name: &str) -> PathBuf {
    job.models_dir.join(name)
}

fn train_missing(job: &Job, splits: &Splits, missing: &[usize]) -> Result<()> {
    let cfg = &job.cfg;
    let staging = Staging::new(&job.models_dir)?;
    let reporter = Reporter::new();
    let mut log = Vec::new();
    // The vocabulary's size sets the BERTs' embedding tables: read it once.
    let bert_config = if cfg.model.arch == Arch::Bert {
        let vocab = WordPiece::load(&cfg.data.vocab)?;
        Some(BertConfig::for_text(
            &cfg.model.bert,
            vocab.vocab_size(),
            cfg.data.max_tokens,
        ))
    } else {
        None
    };
    for &t in missing {
        let task = &cfg.tasks[t];
        let train = splits.train.task_tensors(&task.classes);
        let val = splits.val.task_tensors(&task.classes);
        if cfg.model.arch != Arch::Mlp {
            let spec = OriginalSpec {
                task: &task.name,
                classes: task.classes.len(),
                epochs: cfg.train.epochs,
                lr: cfg.train.lr,
                batch_size: cfg.train.batch_size,
                seed: model_seed(cfg.seed, t),
            };
            let (train, val) = ((&train.0, &train.1), (&val.0, &val.1));
            let dir = staging.path(&task.name);
            // `bert_config` is set exactly for BERT jobs; otherwise this is a ViT.
            let val_acc = if let Some(config) = &bert_config {
                let (bert, val_acc, rows) =
                    bert_merge::train_original(config.clone(), &spec, train, val, &reporter)?;
                let labels: Vec<String> = task
                    .classes
                    .iter()
                    .map(|&c| {
                        text::CLASSES
                            .get(c)
                            .map_or(format!("class {c}"), |s| s.to_string())
                    })
                    .collect();
                bert.save(&dir, &labels)?;
                log.extend(rows);
                val_acc
            } else {
                let config = VitConfig::for_images(&cfg.model.vit, cfg.data.dataset.image_side());
                let (vit, val_acc, rows) =
                    vit_merge::train_original(config, &spec, train, val, &reporter)?;
                let labels: Vec<String> =
                    task.classes.iter().map(|c| format!("class {c}")).collect();
                vit.save(&dir, &labels)?;
                log.extend(rows);
                val_acc
            };
            tracing::info!(
                "original {:?} `{}` (seed {}): validation accuracy {:.2}%",
                cfg.model.arch,
                task.name,
                spec.seed,
                100.0 * val_acc
            );
            continue;
        }
        let spec = TrainSpec {
            input_dim: splits.train.dim,
            hidden: &cfg.model.hidden,
            task: &task.name,
            classes: &task.classes,
            epochs: cfg.train.epochs,
            lr: cfg.train.lr,
            batch_size: cfg.train.batch_size,
            seed: model_seed(cfg.seed, t),
        };
        let (ck, val_acc, rows) =
            train_original(&spec, (&train.0, &train.1), (&val.0, &val.1), &reporter)?;
        tracing::info!(
            "original `{}` (seed {}): validation accuracy {:.2}%",
            task.name,
            spec.seed,
            100.0 * val_acc
        );
        ck.save(&staging.path(""))?;
        log.extend(rows);
    }
    crate::report::write_jsonl(&staging.path("train_log.jsonl"), &log)?;
    let dir = staging.commit()?;
    tracing::info!("originals written to {}", dir.display());
    Ok(())
}
