//! Hugging Face BERTs (`BertForSequenceClassification`): post-LN encoder blocks and a pooler.

pub mod eval;
pub mod merge;
pub mod model;
pub mod output;
pub mod stage;
pub mod supernet;

use crate::data::rows::Splits;
use crate::data::text::CLASSES;
use crate::data::wordpiece::WordPiece;
use crate::dist::stage::WorkerStage;
use crate::family::{Family, MergedWriter, StageSpec};
use crate::train::originals::train_each;
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::config::JobConfig;
use fsmerge_common::hf::BertConfig;
use fsmerge_common::plan::{UnitCost, MU_COST_PER_FEATURE};
use fsmerge_common::{Error, Result};
use std::path::{Path, PathBuf};

pub struct BertFamily;

impl Family for BertFamily {
    fn unit_costs(&self, job: &JobConfig, models_dir: &Path) -> Result<Vec<UnitCost>> {
        let cfg = BertConfig::load(&job.original_dir(models_dir, 0))?;
        Ok(bert_unit_costs(&cfg, job.tasks.len(), job.data.max_tokens))
    }
    fn every_stage_reads_rows(&self) -> bool {
        true
    }
    fn load_stage(&self, spec: &StageSpec) -> Result<Box<dyn WorkerStage>> {
        let (j, tasks) = (spec.job, spec.tasks());
        let rows = spec
            .rows
            .ok_or_else(|| Error::Compute("a BERT stage needs the merge rows".into()))?;
        let stage = stage::BertStage::load(
            &spec.original_dirs(),
            &tasks,
            spec.units.clone(),
            &j.merge,
            j.seed,
            rows,
            spec.precision()?,
        )?;
        Ok(Box::new(stage))
    }
    fn original_files(&self, models_dir: &Path, task: &str) -> [PathBuf; 2] {
        let dir = models_dir.join(task);
        [dir.join("model.safetensors"), dir.join("config.json")]
    }
    fn train_originals(
        &self,
        job: &JobConfig,
        tasks: &[(usize, u64)],
        splits: &Splits,
        out: &Path,
        progress: &dyn Progress,
    ) -> Result<Vec<LogRow>> {
        // The vocabulary's size sets the embedding tables: read it once.
        let vocab = WordPiece::load_first(&job.data.vocab, job.data.vocab_size)?;
        let config = BertConfig::for_text(&job.model.bert, vocab.vocab_size(), job.data.max_tokens);
        train_each(job, tasks, splits, &mut |task, spec, (train, val)| {
            let (bert, val_acc, rows) =
                merge::train_original(config.clone(), spec, train, val, progress)?;
            let labels: Vec<String> = task
                .classes
                .iter()
                .map(|&c| {
                    CLASSES
                        .get(c)
                        .map_or(format!("class {c}"), |s| s.to_string())
                })
                .collect();
            bert.save_sharded(&out.join(&task.name), &labels, job.output.max_shard_bytes())?;
            Ok((val_acc, rows))
        })
    }
    fn check(&self, job: &JobConfig, models_dir: &Path) -> Result<()> {
        output::check(job, models_dir)
    }
    fn writer(
        &self,
        job: &JobConfig,
        models_dir: &Path,
        out: &Path,
    ) -> Result<Box<dyn MergedWriter>> {
        output::writer(job, models_dir, out)
    }
}

/// BERT units (embeddings, each block) for texts of `tokens` tokens: the embedding tables'
/// merge per token, and per block T·(4d² + 2dh) through the n branches plus the M/U work;
/// bytes of the n models' tensors of the unit (the pooler rides with the last block).
fn bert_unit_costs(cfg: &BertConfig, n_models: usize, tokens: usize) -> Vec<UnitCost> {
    let (d, h) = (cfg.hidden_size, cfg.intermediate_size);
    let tables = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d;
    let block_params = 4 * (d * d + d) + 2 * d * h + h + d + 4 * d;
    let mut units = vec![UnitCost {
        name: "embeddings".into(),
        flops: (n_models * tokens * d * MU_COST_PER_FEATURE) as u64,
        bytes: (n_models * tables * 4) as u64,
        stream: (tokens * d) as u64,
    }];
    for l in 0..cfg.num_hidden_layers {
        let mu = (6 * d + h) * MU_COST_PER_FEATURE;
        let pooler = if l + 1 == cfg.num_hidden_layers {
            d * d + d
        } else {
            0
        };
        units.push(UnitCost {
            name: format!("block{l}"),
            flops: (n_models * tokens * (4 * d * d + 2 * d * h + mu)) as u64,
            bytes: (n_models * (block_params + pooler) * 4) as u64,
            stream: (tokens * d) as u64,
        });
    }
    units
}
