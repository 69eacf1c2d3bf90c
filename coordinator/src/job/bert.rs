//! The merge job for Hugging Face BERTs on the text tasks (`model.arch = "bert"`): originals
//! (trained if missing), baselines (ensemble, first, average, RegMean, KD), FS-Merge (local / global /
//! local-then-global) in this process or on the workers of the plan (`cluster`), fold, evaluate,
//! and write the merged model as one standard `BertForSequenceClassification` whose classifier
//! stacks every task's head.

use crate::cluster::Launch;
use crate::job::checks::{check_classifier, check_rank};
use crate::job::originals;
use crate::job::prepare::{prepare, restore_local_phase, take_heads};
use crate::job::rows::{
    fs_merge_variant, kd_settings, local_gap, report_local_phase, stacked_labels, variant,
    warn_if_global_rose, Evaluator,
};
use crate::job::Job;
use crate::report::progress::Reporter;
use crate::{cluster, report};
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::{write_json, HostTensor};
use fsmerge_common::config::{Baseline, Mode};
use fsmerge_common::fsio::Staging;
use fsmerge_common::hf::BertConfig;
use fsmerge_common::metrics::MethodResult;
use fsmerge_common::plan::Plan;
use fsmerge_common::Error;
use fsmerge_worker::core::eval::EvalSet;
use fsmerge_worker::core::linear::Linear;
use fsmerge_worker::core::mu::with_mu_seed;
use fsmerge_worker::core::tensor::{chunked, to_tch};
use fsmerge_worker::data::text::CLASSES;
use fsmerge_worker::families::bert::merge::{
    original_logits, tokens, BertLoss, BertTeacher, MergedBert,
};
use fsmerge_worker::families::bert::model::{Bert, BertPart};
use fsmerge_worker::families::bert::supernet::BertSuperNet;
use fsmerge_worker::families::bert::{baselines as bert_baselines, merge as bert_merge};
use fsmerge_worker::family::family;
use fsmerge_worker::train::settings::TrainSettings;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;
use tch::Tensor;

/// Load every task's original BERT and check it can be merged: a pooler, a classifier with one
/// output per class of its task, positions for the data's `max_tokens`.
fn load_models(job: &Job) -> Result<Vec<Bert>> {
    let max_tokens = job.cfg.data.max_tokens;
    let mut models = Vec::new();
    for task in &job.cfg.tasks {
        let dir = originals::hf_model_dir(job, &task.name);
        let bert = Bert::load(&dir)?;
        check_classifier(
            &dir,
            task,
            bert.classifier.as_ref().map(|c| c.w.size()[0] as usize),
        )?;
        if bert.pooler.is_none() {
            bail!(Error::Tensor {
                file: dir,
                tensor: "bert.pooler.dense.weight".into(),
                msg: "FS-Merge reconstructs the pooler's output, which this BERT lacks".into(),
            });
        }
        if bert.cfg.max_position_embeddings < max_tokens {
            bail!(Error::Checkpoint {
                file: dir.join("config.json"),
                msg: format!(
                    "max_position_embeddings {} is below data.max_tokens {max_tokens}",
                    bert.cfg.max_position_embeddings
                ),
            });
        }
        models.push(bert);
    }
    Ok(models)
}

/// Run the BERT merge job: FS-Merge on the workers of the plan when the job is distributed
/// (`cluster::is_distributed`), else in this process.
pub fn run(job: &Job, launch: &Launch, resume: bool) -> Result<()> {
    let started = Instant::now();
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let distributed = cluster::is_distributed(cfg, launch);
    if resume && !distributed {
        tracing::warn!(
            "--resume: a BERT merge in one process keeps no checkpoints; the job starts over"
        );
    }
    let (splits, set) = prepare(job)?;
    let models = load_models(job)?;
    let refs: Vec<&Bert> = models.iter().collect();
    check_rank(m.rank, models[0].cfg.hidden_size)?;
    let plan = Plan::balanced(
        family(cfg.model.arch).unit_costs(cfg, &job.models_dir)?,
        cfg.cluster.stages,
        cfg.cluster.replicas,
    )?;
    tracing::info!("plan: {}", plan.describe());

    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let val = EvalSet::new(&splits.val, &cfg.tasks);
    let ev = Evaluator::new(&test, &val, job.task_names());
    let reporter = Reporter::new();
    let mut results = Vec::new();
    for (t, model) in models.iter().enumerate() {
        results.push(ev.original(t, &|x| original_logits(model, x)));
    }

    // In this process FS-Merge trains on the teacher; distributed, the workers build their own
    // and KD needs only the pooled outputs here.
    let local = m.mode != Mode::Global;
    let clock = Instant::now();
    let teacher = BertTeacher::new(&refs, &set, local && !distributed);
    let teacher_seconds = if distributed {
        0.0
    } else {
        clock.elapsed().as_secs_f64()
    };
    let settings = TrainSettings::of(m, cfg.seed);
    let mut log = Vec::new();
    for b in &cfg.baselines.methods {
        let clock = Instant::now();
        let merged_row = |name: &str, v, merged: &MergedBert| {
            let seconds = clock.elapsed().as_secs_f64();
            ev.result(name, v, seconds, &|x| merged.logits(x))
        };
        results.push(match b {
            Baseline::Ensemble => ev.result("ensemble", BTreeMap::new(), 0.0, &|x| {
                refs.iter().map(|m| original_logits(m, x)).collect()
            }),
            Baseline::First => merged_row("first", BTreeMap::new(), &bert_baselines::first(&refs)),
            Baseline::Average => {
                merged_row("average", BTreeMap::new(), &bert_baselines::average(&refs))
            }
            Baseline::Regmean => {
                let alpha = cfg.baselines.regmean_alpha;
                let merged = bert_baselines::regmean(&refs, &set, alpha)?;
                merged_row("regmean", variant(&[("alpha", json!(alpha))]), &merged)
            }
            Baseline::Kd => {
                let (s, v) = kd_settings(m, &settings);
                let (merged, rows) = bert_baselines::kd(
                    &refs,
                    &set,
                    &teacher.pooled,
                    cfg.baselines.kd_target_scale,
                    &s,
                    &reporter,
                )?;
                log.extend(rows);
                merged_row("kd", v, &merged)
            }
        });
    }

    let clock = Instant::now();
    let mut v = fs_merge_variant(m);
    let heads: Vec<&Linear> = models
        .iter()
        .filter_map(|m| m.classifier.as_ref())
        .collect();
    let new_supernet = || {
        with_mu_seed(cfg.seed, || {
            BertSuperNet::new(&refs, m.mu_type, m.init, m.rank)
        })
    };
    let (merged, workers) = if distributed {
        let outcome = cluster::run(job, &plan, launch, resume)?;
        warn_if_global_rose(&outcome.log, m.lr);
        log.extend(outcome.log);
        if local {
            let sn = new_supernet()?;
            restore_local_phase(job, &plan, sn.named_params())?;
            report_local_phase(local_rows(&sn, &heads, &ev)?, m.mode, &mut v, &mut results);
        }
        let merged = assemble(job, &models[0].cfg, outcome.tensors)?;
        (merged, outcome.workers)
    } else {
        let sn = new_supernet()?;
        let loss = BertLoss {
            sn: &sn,
            teacher: &teacher,
            set: &set,
            targets: m.targets,
            form: m.step_form,
            res_consistency: m.res_consistency,
        };
        if local {
            log.extend(bert_merge::train_local(&loss, &settings, &reporter)?);
            report_local_phase(local_rows(&sn, &heads, &ev)?, m.mode, &mut v, &mut results);
        }
        if m.mode != Mode::Local {
            let s = settings.global_phase(m);
            log.extend(bert_merge::train_global(&loss, &s, &reporter)?);
            warn_if_global_rose(&log, m.lr);
        }
        let (bert, heads) = sn.merged(&heads)?;
        (MergedBert { bert, heads }, Vec::new())
    };
    let seconds = clock.elapsed().as_secs_f64() + teacher_seconds;
    results.push(ev.result("fs-merge", v.clone(), seconds, &|x| merged.logits(x)));

    report::write(job, &plan, results, &log, started, workers, &|st| {
        write_model(st, job, &merged, &v)
    })
}

/// The merged BERT from the stages' folded tensors (HF `BertModel` names, and each task's
/// head).
fn assemble(
    job: &Job,
    cfg: &BertConfig,
    mut tensors: BTreeMap<String, HostTensor>,
) -> Result<MergedBert> {
    let heads = take_heads(job, &mut tensors)?;
    let units = 0..cfg.num_hidden_layers + 1;
    let tensors = tensors.into_iter().map(|(n, h)| (n, to_tch(&h))).collect();
    let bert = BertPart::from_tensors(cfg.clone(), units, "", tensors)
        .and_then(BertPart::into_bert)
        .context("assembling the merged BERT from the workers' folded tensors")?;
    Ok(MergedBert { bert, heads })
}

/// After local training: the rows of the local SuperNet as trained (U_res/M_res round trip
/// after every unit) and of the folded model it yields.
fn local_rows(
    sn: &BertSuperNet,
    heads: &[&Linear],
    ev: &Evaluator,
) -> Result<(MethodResult, MethodResult)> {
    let (bert, merged_heads) = sn.merged(heads)?;
    let folded = MergedBert {
        bert,
        heads: merged_heads,
    };
    let chain = |x: &Tensor| {
        chunked(x, 1, |c| {
            let (ids, mask) = tokens(c);
            sn.forward_local_chain(&ids, &mask)
        })
    };
    Ok(local_gap(ev, heads, &chain, &|x| folded.logits(x)))
}

/// The merged BERT in HF layout (`merged/`: config.json + model.safetensors, one classifier of
/// every task's classes) and `merged/fsmerge.json` (each task's slice of the logits).
fn write_model(
    st: &Staging,
    job: &Job,
    merged: &MergedBert,
    v: &BTreeMap<String, serde_json::Value>,
) -> Result<()> {
    let (labels, tasks) = stacked_labels(job, &|c| CLASSES.get(c).unwrap_or(&"?").to_string());
    let dir = st.path("merged");
    merged.joint_checkpoint().save(&dir, &labels)?;
    write_json(
        &dir.join("fsmerge.json"),
        &json!({"method": "fs-merge", "variant": v, "tasks": tasks, "input": "WordPiece ids of data.vocab (BERT uncased), [CLS] text [SEP] padded with [PAD] to data.max_tokens"}),
    )?;
    Ok(())
}
