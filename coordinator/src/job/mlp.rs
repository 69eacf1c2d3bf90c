//! The whole job of architecture.md §2: validate → plan → baselines → FS-Merge on the workers
//! (teacher features, train M/U, fold; `cluster`) → assemble → evaluate → report. `fsmerge
//! merge` runs it with embedded workers, `fsmerge coordinator` with worker processes.

use crate::cluster::Launch;
use crate::job::prepare::{prepare, take_heads};
use crate::job::rows::{fs_merge_variant, kd_settings, variant, warn_if_global_rose, Evaluator};
use crate::job::Job;
use crate::report::progress::Reporter;
use crate::{cluster, report};
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::{
    body_bias, body_weight, check_same_architecture, HostTensor, MlpCheckpoint,
};
use fsmerge_common::config::Baseline;
use fsmerge_common::plan::Plan;
use fsmerge_common::Error;
use fsmerge_worker::core::eval::EvalSet;
use fsmerge_worker::core::linear::Linear;
use fsmerge_worker::core::tensor::to_tch;
use fsmerge_worker::families::mlp::model::{ensemble_logits, MergedModel, Mlp};
use fsmerge_worker::families::mlp::{baselines, merge as train_merge};
use fsmerge_worker::family::family;
use fsmerge_worker::train::progress::LogRow;
use fsmerge_worker::train::settings::TrainSettings;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;
use tch::Tensor;

/// Load the originals of every task and check they can be merged: same body architecture, input
/// size of the data, and a head with one output per class of its task.
pub fn load_models(job: &Job, input_dim: usize) -> Result<Vec<Mlp>> {
    let mut cks = Vec::new();
    for task in &job.cfg.tasks {
        let ck = MlpCheckpoint::load(&job.models_dir, &task.name)?;
        if ck.config.classes.len() != task.classes.len() || ck.head.0.shape[0] != task.classes.len()
        {
            return Err(Error::Tensor {
                file: ck.file.clone(),
                tensor: "head.weight".into(),
                msg: format!(
                    "head has {} outputs but task `{}` has {} classes {:?}",
                    ck.head.0.shape[0],
                    task.name,
                    task.classes.len(),
                    task.classes
                ),
            }
            .into());
        }
        if ck.config.input_dim != input_dim {
            return Err(Error::Tensor {
                file: ck.file.clone(),
                tensor: "body.0.weight".into(),
                msg: format!(
                    "input size {} but the data has {input_dim} pixels",
                    ck.config.input_dim
                ),
            }
            .into());
        }
        cks.push(ck);
    }
    check_same_architecture(&cks)?;
    Ok(cks.iter().map(Mlp::from_checkpoint).collect())
}

/// Run the MLP merge job.
pub fn run(job: &Job, launch: &Launch, resume: bool) -> Result<()> {
    let started = Instant::now();
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let (splits, set) = prepare(job)?;
    let models = load_models(job, splits.train.dim)?;
    let refs: Vec<&Mlp> = models.iter().collect();
    let hidden: Vec<usize> = models[0]
        .body
        .iter()
        .map(|l| l.w.size()[0] as usize)
        .collect();
    if let Some(&w) = hidden.iter().min() {
        if m.rank > w {
            bail!(Error::field(
                "merge.rank",
                format!(
                    "{} is larger than the models' smallest layer width {w}",
                    m.rank
                )
            ));
        }
    }

    let plan = Plan::balanced(
        family(cfg.model.arch).unit_costs(cfg, &job.models_dir)?,
        cfg.cluster.stages,
        cfg.cluster.replicas,
    )?;
    tracing::info!("plan: {}", plan.describe());

    let feats = train_merge::teacher_features(&refs, &set.x);
    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let val = EvalSet::new(&splits.val, &cfg.tasks);
    let ev = Evaluator::new(&test, &val, job.task_names());
    let reporter = Reporter::new();
    let mut results = Vec::new();
    let mut log: Vec<LogRow> = Vec::new();

    for (t, model) in models.iter().enumerate() {
        results.push(ev.original(t, &|x| model.logits(x)));
    }
    let settings = TrainSettings::of(m, cfg.seed);
    for b in &cfg.baselines.methods {
        let clock = Instant::now();
        let r = match b {
            Baseline::Ensemble => ev.result("ensemble", BTreeMap::new(), 0.0, &|x| {
                ensemble_logits(&refs, x)
            }),
            Baseline::First => ev.merged("first", BTreeMap::new(), 0.0, &baselines::first(&refs)),
            Baseline::Average => {
                let merged = baselines::average(&refs);
                ev.merged(
                    "average",
                    BTreeMap::new(),
                    clock.elapsed().as_secs_f64(),
                    &merged,
                )
            }
            Baseline::Regmean => {
                let merged = baselines::regmean(&refs, &set, &feats, cfg.baselines.regmean_alpha)?;
                let v = variant(&[("alpha", json!(cfg.baselines.regmean_alpha))]);
                ev.merged("regmean", v, clock.elapsed().as_secs_f64(), &merged)
            }
            Baseline::Kd => {
                let (s, v) = kd_settings(m, &settings);
                let (merged, rows) = baselines::kd(
                    &refs,
                    &set,
                    &feats,
                    cfg.baselines.kd_target_scale,
                    &s,
                    &reporter,
                )?;
                log.extend(rows);
                ev.merged("kd", v, clock.elapsed().as_secs_f64(), &merged)
            }
        };
        results.push(r);
    }

    let clock = Instant::now();
    let outcome = cluster::run(job, &plan, launch, resume)?;
    warn_if_global_rose(&outcome.log, m.lr);
    log.extend(outcome.log);
    let merged = assemble(job, outcome.tensors, hidden.len())?;
    let seconds = clock.elapsed().as_secs_f64();
    let v = fs_merge_variant(m);
    results.push(ev.merged("fs-merge", v.clone(), seconds, &merged));

    report::write(job, &plan, results, &log, started, outcome.workers, &|st| {
        report::write_mlp_model(st, job, &merged, &v)
    })
}

/// The merged model from the stages' folded tensors.
fn assemble(
    job: &Job,
    mut tensors: BTreeMap<String, HostTensor>,
    depth: usize,
) -> Result<MergedModel> {
    let heads = take_heads(job, &mut tensors)?;
    let get = |name: String| -> Result<Tensor> {
        tensors
            .get(&name)
            .map(to_tch)
            .with_context(|| format!("no worker sent the folded tensor `{name}`"))
    };
    let body = (0..depth)
        .map(|l| {
            Ok(Linear {
                w: get(body_weight(l))?,
                b: get(body_bias(l))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(MergedModel { body, heads })
}
