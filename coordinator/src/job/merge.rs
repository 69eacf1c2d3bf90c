//! The merge job, one for every model family (architecture.md §2): prepare (data, merge set,
//! originals trained if missing) → plan → originals → baselines → FS-Merge on the workers
//! (teacher features, train M/U, fold) → assemble → report. The family is seen only through
//! `fsmerge_worker::family`. `fsmerge merge` runs it with embedded workers, `fsmerge
//! coordinator` with worker processes.

use crate::cluster::{self, Launch};
use crate::job::prepare::prepare;
use crate::job::rows::{
    fs_merge_variant, kd_variant, report_local_phase, variant, warn_if_global_rose, Evaluated,
    Evaluator,
};
use crate::job::Job;
use crate::report;
use crate::report::progress::Reporter;
use anyhow::{Context, Result};
use fsmerge_common::config::{Baseline, Mode};
use fsmerge_common::plan::Plan;
use fsmerge_worker::core::eval::EvalSet;
use fsmerge_worker::family::{family, BaselineInputs, Originals};
use fsmerge_worker::train::settings::TrainSettings;
use serde_json::json;
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// Run the merge job of `job`: FS-Merge on the workers `launch` gives (threads of this process
/// for `fsmerge merge`, processes for `fsmerge coordinator`), whatever the family.
pub fn run(job: &Job, launch: &Launch, resume: bool) -> Result<()> {
    let started = Instant::now();
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let family = family(cfg.model.arch);
    let (splits, set) = prepare(job)?;
    let plan = Plan::balanced(
        family.unit_costs(cfg, &job.models_dir)?,
        cfg.cluster.stages,
        cfg.cluster.replicas,
    )?;
    tracing::info!("plan: {}", plan.describe());

    let clock = Instant::now();
    let outcome = cluster::run(job, &plan, launch, resume)?;
    let evaluated = Evaluated::new(&outcome.evaluations, job.task_names())?;
    // FS-Merge's time: the workers' run without the evaluations of other models.
    let fs_seconds = (clock.elapsed().as_secs_f64() - evaluated.seconds_of_others()).max(0.0);
    warn_if_global_rose(&outcome.log, m.lr);

    // What the workers do not compute yet (RegMean, KD, the local rows) still needs the
    // originals here.
    let originals = OnceCell::new();
    let open = || -> Result<&Box<dyn Originals>> {
        if originals.get().is_none() {
            let _ = originals.set(family.open(cfg, &job.models_dir, splits.train.dim)?);
        }
        Ok(originals.get().expect("just set"))
    };
    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let val = EvalSet::new(&splits.val, &cfg.tasks);
    let ev = Evaluator::new(&test, &val, job.task_names());
    let mut results = evaluated.originals()?;
    let mut log = Vec::new();
    let reporter = Reporter::new();
    let kd = TrainSettings::kd(m, cfg.seed);
    for &b in &cfg.baselines.methods {
        let v = match b {
            Baseline::Regmean => variant(&[("alpha", json!(cfg.baselines.regmean_alpha))]),
            Baseline::Kd => kd_variant(m, cfg.seed),
            _ => BTreeMap::new(),
        };
        if let Some(row) = evaluated.row(b.name(), v.clone()) {
            log.extend(evaluated.log(b.name()));
            results.push(row);
            continue;
        }
        let clock = Instant::now();
        let inputs = BaselineInputs {
            set: &set,
            job: cfg,
            kd: &kd,
            progress: &reporter,
        };
        let (merged, rows) = open()?.baseline(b, &inputs)?;
        log.extend(rows);
        let seconds = clock.elapsed().as_secs_f64();
        results.push(ev.result(b.name(), v, seconds, &|x| merged.logits(x)));
    }

    let mut v = fs_merge_variant(m);
    if !m.inner_layers.is_empty() {
        v.insert("inner_layers".into(), json!(m.inner_layers));
    }
    log.extend(outcome.log);
    if m.mode != Mode::Global {
        local_rows(&evaluated, m.mode, &mut v, &mut results);
    }
    let mut fs_merge = evaluated
        .row("fs-merge", v.clone())
        .context("the workers sent no evaluation of the merged model")?;
    fs_merge.seconds = fs_seconds;
    results.push(fs_merge);
    let merged = open()?
        .assemble(cfg, outcome.tensors)
        .context("assembling the merged model from the workers' folded tensors")?;

    report::write(job, &plan, results, &log, started, outcome.workers, &|st| {
        Ok(merged.write(&st.path(""), cfg, &v)?)
    })
}

/// After a local phase: the rows of the local SuperNet as trained and of its fold (for a family
/// whose local problems share a residual merge, the workers evaluate both), and their gap in
/// the FS-Merge variant.
fn local_rows(
    evaluated: &Evaluated,
    mode: Mode,
    v: &mut BTreeMap<String, serde_json::Value>,
    results: &mut Vec<fsmerge_common::metrics::MethodResult>,
) {
    let row = |name| {
        evaluated.row(name, BTreeMap::new()).map(|mut r| {
            r.seconds = 0.0;
            r
        })
    };
    if let (Some(chain), Some(folded)) = (row("local supernet"), row("local folded")) {
        report_local_phase((chain, folded), mode, v, results);
    }
}
