//! Llama-family decoders (Llama, Mistral, Qwen2: RMSNorm, RoPE, grouped-query attention,
//! SwiGLU) as sequence classifiers on text, issue 16's fourth family: the HF config, the
//! model's forward (checked against transformers, `tests/tests/llama_tests.rs`), the SuperNet
//! with its exact fold, the loss, the pipeline stage, evaluation and the merged model's
//! writer; the same decoders as causal LMs of their task's texts (`model.llama.objective =
//! "lm"`), scored by per-domain perplexity and written as one `…ForCausalLM` per task.

pub mod config;
pub mod eval;
pub mod merge;
pub mod model;
pub mod output;
pub mod part;
pub mod stage;
pub mod supernet;

use crate::data::rows::Splits;
use crate::data::text::CLASSES;
use crate::data::wordpiece::WordPiece;
use crate::dist::stage::WorkerStage;
use crate::family::{Family, MergedWriter, StageSpec};
use crate::train::originals::train_each;
use crate::train::progress::{LogRow, Progress};
use config::LlamaConfig;
use fsmerge_common::config::{JobConfig, Objective};
use fsmerge_common::plan::{UnitCost, MU_COST_PER_FEATURE};
use fsmerge_common::{Error, Result};
use std::path::{Path, PathBuf};

pub struct LlamaFamily;

impl Family for LlamaFamily {
    fn unit_costs(&self, job: &JobConfig, models_dir: &Path) -> Result<Vec<UnitCost>> {
        let cfg = LlamaConfig::load(&job.original_dir(models_dir, 0))?;
        Ok(unit_costs(&cfg, job.tasks.len(), job.data.max_tokens))
    }
    fn every_stage_reads_rows(&self) -> bool {
        true
    }
    fn load_stage(&self, spec: &StageSpec) -> Result<Box<dyn WorkerStage>> {
        let j = spec.job;
        let rows = spec
            .rows
            .ok_or_else(|| Error::Compute("a Llama stage needs the merge rows".into()))?;
        let stage = stage::LlamaStage::load(
            &spec.original_dirs(),
            &spec.tasks(),
            spec.units.clone(),
            &j.merge,
            j.seed,
            rows,
            spec.precision()?,
            j.objective().into(),
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
        let vocab = WordPiece::load_first(&job.data.vocab, job.data.vocab_size)?;
        let config = merge::config_for_text(&job.model.llama, vocab.vocab_size());
        let lm = job.objective() == Objective::Lm;
        train_each(job, tasks, splits, &mut |task, spec, (train, val)| {
            let (model, val_acc, rows) = if lm {
                merge::train_language_model(config.clone(), spec, train.0, val.0, progress)?
            } else {
                merge::train_original(config.clone(), spec, train, val, progress)?
            };
            let labels: Vec<String> = (task.classes.iter())
                .map(|&c| {
                    CLASSES
                        .get(c)
                        .map_or(format!("class {c}"), |s| s.to_string())
                })
                .collect();
            model.save_labeled(&out.join(&task.name), &labels, job.output.max_shard_bytes())?;
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

/// Llama units (embeddings, each block) for texts of `tokens` tokens: the table's merge per
/// token, and per block T·(2d·q + 2d·kv + 3d·h) through the n branches plus the M/U work;
/// bytes of the n models' tensors of the unit (the final norm rides with the last block).
fn unit_costs(cfg: &LlamaConfig, n_models: usize, tokens: usize) -> Vec<UnitCost> {
    let (d, h) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let block_params = 2 * d * q + 2 * d * kv + 3 * d * h + 2 * d;
    let mut units = vec![UnitCost {
        name: "embeddings".into(),
        flops: (n_models * tokens * d * MU_COST_PER_FEATURE) as u64,
        bytes: (n_models * cfg.vocab_size * d * 4) as u64,
        stream: (tokens * d) as u64,
    }];
    for l in 0..cfg.num_hidden_layers {
        let mu = (4 * d + 2 * q + 2 * kv + 3 * h) * MU_COST_PER_FEATURE;
        let norm = if l + 1 == cfg.num_hidden_layers { d } else { 0 };
        units.push(UnitCost {
            name: format!("block{l}"),
            flops: (n_models * tokens * (block_params + mu)) as u64,
            bytes: (n_models * (block_params + norm) * 4) as u64,
            stream: (tokens * d) as u64,
        });
    }
    units
}
