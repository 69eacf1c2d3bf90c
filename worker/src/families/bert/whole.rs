//! The BERT family's originals loaded whole (the coordinator's job): checks, evaluation, the
//! baselines, the local phase's rows, and the merged model assembled from the stages' folded
//! tensors and written as one `BertForSequenceClassification` whose classifier stacks every
//! task's head.

use crate::core::checks::{check_classifier, check_rank};
use crate::core::linear::{stacked_labels, take_heads, Linear};
use crate::core::mu::with_mu_seed;
use crate::core::tensor::{chunked, to_tch};
use crate::data::text::CLASSES;
use crate::dist::restore::restore_phase;
use crate::families::bert::baselines;
use crate::families::bert::merge::{original_logits, teacher_pooled, tokens, MergedBert};
use crate::families::bert::model::{Bert, BertPart};
use crate::families::bert::supernet::BertSuperNet;
use crate::family::{
    encoder_baseline, BaselineInputs, HeadsReadOut, LocalPhase, MergedNet, Originals, Predictor,
};
use crate::train::progress::LogRow;
use fsmerge_common::checkpoint::{write_json, HostTensor};
use fsmerge_common::config::{Baseline, JobConfig};
use fsmerge_common::plan::Plan;
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub struct BertOriginals {
    models: Vec<Bert>,
}

/// Load every task's original BERT and check it can be merged: a pooler, a classifier with one
/// output per class of its task, positions for the data's `max_tokens`, width ≥ `merge.rank`.
pub fn open(job: &JobConfig, models_dir: &Path) -> Result<BertOriginals> {
    let max_tokens = job.data.max_tokens;
    let mut models = Vec::new();
    for task in &job.tasks {
        let dir = models_dir.join(&task.name);
        let bert = Bert::load(&dir)?;
        check_classifier(
            &dir,
            task,
            bert.classifier.as_ref().map(|c| c.w.size()[0] as usize),
        )?;
        if bert.pooler.is_none() {
            return Err(Error::Tensor {
                file: dir,
                tensor: "bert.pooler.dense.weight".into(),
                msg: "FS-Merge reconstructs the pooler's output, which this BERT lacks".into(),
            });
        }
        if bert.cfg.max_position_embeddings < max_tokens {
            return Err(Error::Checkpoint {
                file: dir.join("config.json"),
                msg: format!(
                    "max_position_embeddings {} is below data.max_tokens {max_tokens}",
                    bert.cfg.max_position_embeddings
                ),
            });
        }
        models.push(bert);
    }
    check_rank(job.merge.rank, models[0].cfg.hidden_size)?;
    Ok(BertOriginals { models })
}

impl BertOriginals {
    fn refs(&self) -> Vec<&Bert> {
        self.models.iter().collect()
    }
    fn heads(&self) -> Vec<&Linear> {
        self.models
            .iter()
            .filter_map(|m| m.classifier.as_ref())
            .collect()
    }
}

impl Originals for BertOriginals {
    fn logits(&self, t: usize, x: &Tensor) -> Tensor {
        original_logits(&self.models[t], x)
    }

    fn baseline(
        &self,
        method: Baseline,
        inputs: &BaselineInputs,
    ) -> Result<(Box<dyn MergedNet>, Vec<LogRow>)> {
        let (refs, set, b) = (self.refs(), inputs.set, &inputs.job.baselines);
        encoder_baseline(
            &refs,
            method,
            |bert, heads| MergedBert { bert, heads },
            || baselines::regmean(&refs, set, b.regmean_alpha),
            || {
                baselines::kd(
                    &refs,
                    set,
                    &teacher_pooled(&refs, &set.x),
                    b.kd_target_scale,
                    inputs.kd,
                    inputs.progress,
                )
            },
        )
    }

    fn local_phase(
        &self,
        job: &JobConfig,
        work: &WorkDir,
        plan: &Plan,
    ) -> Result<Option<LocalPhase>> {
        let m = &job.merge;
        let sn = with_mu_seed(job.seed, || {
            BertSuperNet::new(&self.refs(), m.mu_type, m.init, m.rank)
        })?;
        restore_phase(work, plan, "local", sn.named_params())?;
        let heads = self.heads();
        let (bert, merged_heads) = sn.merged(&heads)?;
        let folded = MergedBert {
            bert,
            heads: merged_heads,
        };
        let chain = HeadsReadOut::new(&heads, move |x: &Tensor| {
            chunked(x, 1, |c| {
                let (ids, mask) = tokens(c);
                sn.forward_local_chain(&ids, &mask)
            })
        });
        Ok(Some(LocalPhase {
            chain: Box::new(chain),
            folded: Box::new(folded),
        }))
    }

    fn assemble(
        &self,
        job: &JobConfig,
        mut tensors: BTreeMap<String, HostTensor>,
    ) -> Result<Box<dyn MergedNet>> {
        let heads = take_heads(&job.tasks, &mut tensors)?;
        let cfg = self.models[0].cfg.clone();
        let units = 0..cfg.num_hidden_layers + 1;
        let tensors = tensors.into_iter().map(|(n, h)| (n, to_tch(&h))).collect();
        let bert = BertPart::from_tensors(cfg, units, "", tensors).and_then(BertPart::into_bert)?;
        Ok(Box::new(MergedBert { bert, heads }))
    }
}

impl Predictor for MergedBert {
    fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        MergedBert::logits(self, x)
    }
}

impl MergedNet for MergedBert {
    /// `merged/`: config.json + model.safetensors (one classifier of every task's classes) and
    /// `merged/fsmerge.json` (each task's slice of the logits).
    fn write(
        &self,
        out: &Path,
        job: &JobConfig,
        variant: &BTreeMap<String, serde_json::Value>,
    ) -> Result<()> {
        let (labels, tasks) =
            stacked_labels(&job.tasks, &|c| CLASSES.get(c).unwrap_or(&"?").to_string());
        let dir = out.join("merged");
        self.joint_checkpoint()
            .save_sharded(&dir, &labels, job.output.max_shard_bytes())?;
        write_json(
            &dir.join("fsmerge.json"),
            &serde_json::json!({"method": "fs-merge", "variant": variant, "tasks": tasks, "input": "WordPiece ids of data.vocab (BERT uncased), [CLS] text [SEP] padded with [PAD] to data.max_tokens"}),
        )
    }
}
