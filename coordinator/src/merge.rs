//! The whole job of architecture.md §2: validate → plan → baselines → FS-Merge on the workers
//! (teacher features, train M/U, fold; `cluster`) → assemble → evaluate → report. `fsmerge
//! merge` runs it with embedded workers, `fsmerge coordinator` with worker processes.

use crate::cluster::{self, Launch};
use crate::job::Job;
use crate::progress::Reporter;
use crate::{report, train};
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::{
    body_bias, body_weight, check_same_architecture, head_bias, head_weight, read_tensors,
    tensor_names, HostTensor, MlpCheckpoint,
};
use fsmerge_common::config::{Arch, Baseline, MergeConfig, Mode, TaskConfig};
use fsmerge_common::metrics::MethodResult;
use fsmerge_common::plan::{mlp_unit_costs, Plan};
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::Error;
use fsmerge_worker::baselines;
use fsmerge_worker::data;
use fsmerge_worker::eval::{ensemble_logits, evaluate, EvalSet, MergedModel};
use fsmerge_worker::merge_data;
use fsmerge_worker::mlp::{accuracy, Linear, Mlp};
use fsmerge_worker::progress::LogRow;
use fsmerge_worker::tensor::{assign, to_tch};
use fsmerge_worker::train_merge::{self, TrainSettings};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
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

/// After a transformer's local training: log the rows of the local SuperNet as trained
/// (`chain`) and of its fold, add them to the results (the fold's only when a global phase
/// follows: in `local` mode it is the FS-Merge row) and their gap to the FS-Merge variant.
pub fn report_local_phase(
    (chain, folded): (MethodResult, MethodResult),
    mode: Mode,
    v: &mut BTreeMap<String, serde_json::Value>,
    results: &mut Vec<MethodResult>,
) {
    tracing::info!(
        "local phase: local SuperNet {:.2}% mean task / {:.2}% joint, folded {:.2}% / {:.2}%",
        100.0 * chain.mean_task_acc,
        100.0 * chain.joint_acc.unwrap_or(0.0),
        100.0 * folded.mean_task_acc,
        100.0 * folded.joint_acc.unwrap_or(0.0)
    );
    // Local SuperNet minus folded model, in accuracy points (positive: folding lost).
    let gap = 100.0 * (chain.mean_task_acc - folded.mean_task_acc);
    v.insert(
        "local_gap_points".into(),
        json!((gap * 100.0).round() / 100.0),
    );
    results.push(chain);
    if mode == Mode::LocalThenGlobal {
        results.push(folded);
    }
}

/// The rows of a transformer's local phase: the local SuperNet as trained (`chain`: its read-out
/// [n, N, d] of inputs, through each task's original head) and the folded model (`folded`: every
/// task's logits).
pub fn local_gap(
    ev: &Evaluator,
    heads: &[&Linear],
    chain: &dyn Fn(&Tensor) -> Tensor,
    folded: &dyn Fn(&Tensor) -> Vec<Tensor>,
) -> (MethodResult, MethodResult) {
    let chain = ev.result("local supernet", BTreeMap::new(), 0.0, &|x| {
        let pred = chain(x);
        heads
            .iter()
            .enumerate()
            .map(|(t, h)| h.forward(&pred.get(t as i64)))
            .collect()
    });
    (
        chain,
        ev.result("local folded", BTreeMap::new(), 0.0, folded),
    )
}

/// The labels of a merged transformer's stacked classifier (`task:class`, with `class_name`)
/// and, per task, its slice of the logits (`merged/fsmerge.json`).
pub fn stacked_labels(
    job: &Job,
    class_name: &dyn Fn(usize) -> String,
) -> (Vec<String>, Vec<serde_json::Value>) {
    let mut labels = Vec::new();
    let mut tasks = Vec::new();
    for t in &job.cfg.tasks {
        let start = labels.len();
        labels.extend(
            t.classes
                .iter()
                .map(|&c| format!("{}:{}", t.name, class_name(c))),
        );
        tasks.push(json!({"name": t.name, "classes": t.classes, "logits": [start, labels.len()]}));
    }
    (labels, tasks)
}

/// KD's training settings (FS-Merge's, for all its epochs: the same budget) and its row's
/// variant.
pub fn kd_settings(
    m: &MergeConfig,
    settings: &TrainSettings,
) -> (TrainSettings, BTreeMap<String, serde_json::Value>) {
    let s = TrainSettings {
        epochs: m.total_epochs(),
        ..settings.clone()
    };
    let v = variant(&[
        ("init", json!("first")),
        ("epochs", json!(s.epochs)),
        ("lr", json!(s.lr)),
    ]);
    (s, v)
}

/// The FS-Merge row's variant: the settings that tell its runs apart.
pub fn fs_merge_variant(m: &MergeConfig) -> BTreeMap<String, serde_json::Value> {
    variant(&[
        ("mode", json!(m.mode)),
        ("mu_type", json!(m.mu_type)),
        ("rank", json!(m.rank)),
        ("init", json!(m.init)),
        ("targets", json!(m.targets)),
    ])
}

/// Check that `merge.rank` fits the transformers' width.
pub fn check_rank(rank: usize, width: usize) -> Result<()> {
    if rank > width {
        bail!(Error::field(
            "merge.rank",
            format!("{rank} is larger than the models' width {width}")
        ));
    }
    Ok(())
}

/// Check that task `task`'s original in `dir` has a classifier with one output per class.
pub fn check_classifier(dir: &Path, task: &TaskConfig, outputs: Option<usize>) -> Result<()> {
    if outputs != Some(task.classes.len()) {
        bail!(Error::Tensor {
            file: dir.to_path_buf(),
            tensor: "classifier.weight".into(),
            msg: format!(
                "task `{}` has {} classes but the model's classifier has {:?} outputs",
                task.name,
                task.classes.len(),
                outputs
            ),
        });
    }
    Ok(())
}

pub fn variant(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

pub struct Evaluator<'a> {
    test: &'a EvalSet,
    val: &'a EvalSet,
    names: Vec<String>,
}

impl<'a> Evaluator<'a> {
    pub fn new(test: &'a EvalSet, val: &'a EvalSet, names: Vec<String>) -> Self {
        Self { test, val, names }
    }

    pub fn result(
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

    /// The row of task t's original model (its own task only; no joint accuracy).
    pub fn original(&self, t: usize, logits: &dyn Fn(&Tensor) -> Tensor) -> MethodResult {
        let acc_on = |e: &EvalSet| tch::no_grad(|| accuracy(&logits(&e.tasks[t].0), &e.tasks[t].1));
        let name = &self.names[t];
        let acc = acc_on(self.test);
        MethodResult {
            method: format!("original:{name}"),
            variant: BTreeMap::new(),
            per_task_acc: [(name.clone(), acc)].into(),
            mean_task_acc: acc,
            joint_acc: None,
            val_mean_task_acc: acc_on(self.val),
            seconds: 0.0,
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

/// What every merge job starts with: the data splits and the merge set (originals + augmented
/// copies per task), and the original models trained where they are missing.
pub fn prepare(job: &Job) -> Result<(data::Splits, merge_data::MergeSet)> {
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
    Ok((splits, set))
}

pub fn run(job: &Job, launch: &Launch, resume: bool) -> Result<()> {
    match job.cfg.model.arch {
        Arch::Vit => return crate::vit_job::run(job, launch, resume),
        Arch::Bert => return crate::bert_job::run(job, launch, resume),
        Arch::Mlp => {}
    }
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
        mlp_unit_costs(splits.train.dim, &hidden, models.len()),
        cfg.cluster.stages,
        cfg.cluster.replicas,
    )?;
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

/// Each task's head from the stages' folded tensors (removed from `tensors`).
pub fn take_heads(job: &Job, tensors: &mut BTreeMap<String, HostTensor>) -> Result<Vec<Linear>> {
    let mut take = |name: String| -> Result<Tensor> {
        tensors
            .remove(&name)
            .map(|h| to_tch(&h))
            .with_context(|| format!("no worker sent the folded tensor `{name}`"))
    };
    job.cfg
        .tasks
        .iter()
        .map(|t| {
            Ok(Linear {
                w: take(head_weight(Some(&t.name)))?,
                b: take(head_bias(Some(&t.name)))?,
            })
        })
        .collect()
}

/// Set `params` (a whole SuperNet's named parameters) to what the stages checkpointed after
/// their local phase: each name from the first stage whose checkpoint holds it (the shared
/// M_res/U_res are in every stage's, equal). A name in no checkpoint is an error.
pub fn restore_local_phase(job: &Job, plan: &Plan, params: Vec<(String, Tensor)>) -> Result<()> {
    let work = WorkDir::of_output(&job.out);
    let mut left: BTreeMap<String, Tensor> = params.into_iter().collect();
    for st in &plan.stages {
        let (file, _) = work.checkpoint(st.index, "local");
        let held = tensor_names(&file)?;
        let names: Vec<String> = held.into_iter().filter(|n| left.contains_key(n)).collect();
        for (name, value) in read_tensors(&file, &names)? {
            if let Some(p) = left.remove(&name) {
                assign(&[p], &[to_tch(&value)])?;
            }
        }
    }
    if let Some(name) = left.keys().next() {
        bail!("no stage's local checkpoint holds the SuperNet tensor `{name}`");
    }
    Ok(())
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

/// Warn when the global phase ended with a higher batch loss than it began with (the OneCycle
/// peak was too high for the job).
pub fn warn_if_global_rose(log: &[LogRow], lr: f64) {
    let global: Vec<f64> = log
        .iter()
        .filter(|r| r.phase == "global")
        .map(|r| r.loss)
        .collect();
    let k = (global.len() / 20).max(1);
    if global.len() < 2 * k {
        return;
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (before, after) = (mean(&global[..k]), mean(&global[global.len() - k..]));
    if after > before {
        tracing::warn!(
            "global training ended with a higher loss than it started ({before:.4e} → {after:.4e}): \
             the OneCycle peak lr is too high for this job; lower `merge.lr` (now {lr})"
        );
    }
}
