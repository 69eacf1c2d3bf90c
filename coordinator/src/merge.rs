//! `fsmerge merge`: the whole job of architecture.md §2 on one machine (one stage, one replica):
//! validate → plan → teacher features → baselines → train M/U → fold → evaluate → report.

use crate::job::Job;
use crate::progress::Reporter;
use crate::{report, train};
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::{check_same_architecture, MlpCheckpoint};
use fsmerge_common::config::{Baseline, Mode, Targets};
use fsmerge_common::metrics::MethodResult;
use fsmerge_common::plan::{mlp_unit_costs, Plan};
use fsmerge_common::Error;
use fsmerge_worker::baselines;
use fsmerge_worker::data;
use fsmerge_worker::eval::{ensemble_logits, evaluate, original_accuracy, EvalSet, MergedModel};
use fsmerge_worker::merge_data::{self, MergeSet};
use fsmerge_worker::mlp::Mlp;
use fsmerge_worker::progress::LogRow;
use fsmerge_worker::supernet::SuperNet;
use fsmerge_worker::train_merge::{self, TrainSettings};
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

fn variant(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

struct Evaluator<'a> {
    test: &'a EvalSet,
    val: &'a EvalSet,
    names: Vec<String>,
}

impl Evaluator<'_> {
    fn result(
        &self,
        method: &str,
        variant: BTreeMap<String, serde_json::Value>,
        seconds: f64,
        predict: &dyn Fn(&Tensor) -> Vec<Tensor>,
    ) -> MethodResult {
        let test = evaluate(self.test, predict);
        let val = evaluate(self.val, predict);
        tracing::info!(
            "{method}: mean task accuracy {:.2}%, joint {:.2}%",
            100.0 * test.mean(),
            100.0 * test.joint
        );
        MethodResult {
            method: method.to_string(),
            variant,
            per_task_acc: self
                .names
                .iter()
                .cloned()
                .zip(test.per_task.iter().copied())
                .collect(),
            mean_task_acc: test.mean(),
            joint_acc: Some(test.joint),
            val_mean_task_acc: val.mean(),
            seconds,
        }
    }

    fn merged(
        &self,
        method: &str,
        variant: BTreeMap<String, serde_json::Value>,
        seconds: f64,
        m: &MergedModel,
    ) -> MethodResult {
        self.result(method, variant, seconds, &|x| m.logits(x))
    }
}

pub fn run(job: &Job) -> Result<()> {
    let started = Instant::now();
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let splits = data::load(&cfg.data)?;
    let set = merge_data::build(
        &splits,
        &cfg.tasks,
        m.n_originals,
        m.n_augmented,
        &m.augment,
        cfg.seed,
    )?;
    tracing::info!(
        "merge data: {} inputs ({} per task)",
        set.len(),
        set.per_task[0]
    );
    train::ensure_originals(job, &splits, false)?;
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

    let plan = Plan::single(mlp_unit_costs(splits.train.dim, &hidden, models.len()));
    tracing::info!("plan: {}", plan.describe());

    let feats = train_merge::teacher_features(&refs, &set.x);
    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let val = EvalSet::new(&splits.val, &cfg.tasks);
    let ev = Evaluator {
        test: &test,
        val: &val,
        names: job.task_names(),
    };
    let reporter = Reporter::new();
    let mut results = Vec::new();
    let mut log: Vec<LogRow> = Vec::new();

    for (t, model) in models.iter().enumerate() {
        let name = &cfg.tasks[t].name;
        let acc = original_accuracy(&test, t, model);
        results.push(MethodResult {
            method: format!("original:{name}"),
            variant: BTreeMap::new(),
            per_task_acc: [(name.clone(), acc)].into(),
            mean_task_acc: acc,
            joint_acc: None,
            val_mean_task_acc: original_accuracy(&val, t, model),
            seconds: 0.0,
        });
    }
    let settings = TrainSettings {
        epochs: m.epochs,
        lr: m.lr,
        weight_decay: m.weight_decay,
        batch_size: m.batch_size,
        targets: m.targets,
        form: m.step_form,
        seed: cfg.seed,
    };
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
                let s = TrainSettings {
                    epochs: m.total_epochs(),
                    ..settings.clone()
                };
                let (merged, rows) = baselines::kd(
                    &refs,
                    &set,
                    &feats,
                    cfg.baselines.kd_target_scale,
                    &s,
                    &reporter,
                )?;
                log.extend(rows);
                let v = variant(&[
                    ("init", json!("first")),
                    ("epochs", json!(s.epochs)),
                    ("lr", json!(s.lr)),
                ]);
                ev.merged("kd", v, clock.elapsed().as_secs_f64(), &merged)
            }
        };
        results.push(r);
    }

    let clock = Instant::now();
    let (sn, rows) = fs_merge(job, &plan, &refs, &set, &feats, &settings, &reporter)?;
    log.extend(rows);
    let heads: Vec<&fsmerge_worker::mlp::Linear> = refs.iter().map(|m| &m.head).collect();
    let (body, heads) = sn.fold_to_mlp(&heads);
    let merged = MergedModel { body, heads };
    let seconds = clock.elapsed().as_secs_f64();
    let v = variant(&[
        ("mode", json!(m.mode)),
        ("mu_type", json!(m.mu_type)),
        ("rank", json!(m.rank)),
        ("init", json!(m.init)),
        ("targets", json!(m.targets)),
    ]);
    results.push(ev.merged("fs-merge", v.clone(), seconds, &merged));

    report::write(job, &plan, &merged, &v, results, &log, started)
}

/// Train the SuperNet's M/U in the configured mode. Local problems are run stage by stage, each
/// stage's layers independently; global runs on the single stage holding every layer.
fn fs_merge(
    job: &Job,
    plan: &Plan,
    models: &[&Mlp],
    set: &MergeSet,
    feats: &[Tensor],
    settings: &TrainSettings,
    reporter: &Reporter,
) -> Result<(SuperNet, Vec<LogRow>)> {
    let m = &job.cfg.merge;
    tch::manual_seed(job.cfg.seed.wrapping_add(0x4d55) as i64);
    let sn = SuperNet::new(models, m.mu_type, m.init, m.rank)?;
    let mut log = Vec::new();
    let targets: Targets = m.targets;
    if matches!(m.mode, Mode::Local | Mode::LocalThenGlobal) {
        for stage in &plan.stages {
            for l in stage.units.clone() {
                let before = train_merge::local_loss_full(&sn, l, set, feats, targets);
                log.extend(train_merge::train_local_layer(
                    &sn, l, set, feats, settings, reporter,
                )?);
                let after = train_merge::local_loss_full(&sn, l, set, feats, targets);
                tracing::info!("local layer{l}: reconstruction loss {before:.4e} → {after:.4e}");
            }
        }
    }
    if matches!(m.mode, Mode::Global | Mode::LocalThenGlobal) {
        if plan.stages.len() != 1 {
            bail!(
                "global training across {} stages needs the distributed runtime",
                plan.stages.len()
            );
        }
        let before = train_merge::global_loss_full(&sn, set, feats, targets);
        let s = match m.mode {
            Mode::LocalThenGlobal => TrainSettings {
                epochs: m.global_epochs,
                ..settings.clone()
            },
            _ => settings.clone(),
        };
        log.extend(
            train_merge::train_global(&sn, set, feats, &s, reporter).context("global training")?,
        );
        let after = train_merge::global_loss_full(&sn, set, feats, targets);
        tracing::info!("global: reconstruction loss {before:.4e} → {after:.4e}");
        if after > before {
            tracing::warn!(
                "global training ended with a higher loss than it started ({before:.4e} → {after:.4e}): \
                 the OneCycle peak lr is too high for this job; lower `merge.lr` (now {})",
                m.lr
            );
        }
    } else {
        tracing::info!(
            "local SuperNet, global reconstruction loss {:.4e}",
            train_merge::global_loss_full(&sn, set, feats, targets)
        );
    }
    Ok((sn, log))
}
