//! The merge job, one for every model family (architecture.md §2): prepare (originals trained
//! if missing, checked from their headers) → plan → the workers evaluate the originals and the
//! baselines, run FS-Merge (teacher features, train M/U, fold) and evaluate it, sending the
//! folded tensors, which go to disk as they arrive → report. The coordinator holds no model
//! weights; the family is seen only through `fsmerge_worker::family`. `fsmerge merge` runs it
//! with embedded workers, `fsmerge coordinator` with worker processes.

use crate::cluster::{self, Launch};
use crate::job::memory;
use crate::job::prepare::prepare;
use crate::job::rows::{
    fs_merge_variant, kd_variant, report_local_phase, variant, warn_if_global_rose, Evaluated,
};
use crate::job::Job;
use crate::report;
use anyhow::{Context, Result};
use fsmerge_common::config::{Baseline, Mode};
use fsmerge_common::fsio::Staging;
use fsmerge_common::precision::Precision;
use fsmerge_worker::family::family;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;

/// Run the merge job of `job`: FS-Merge on the workers `launch` gives (threads of this process
/// for `fsmerge merge`, processes for `fsmerge coordinator`), whatever the family.
pub fn run(job: &Job, launch: &Launch, resume: bool) -> Result<()> {
    let started = Instant::now();
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let family = family(cfg.model.arch);
    prepare(job)?;
    let precision = Precision::for_job(cfg, &job.models_dir)?;
    let plan = memory::plan(cfg, family.unit_costs(cfg, &job.models_dir)?, precision)?;
    tracing::info!(
        "plan: {}; originals and features in {}",
        plan.describe(precision),
        precision.torch_dtype()
    );
    memory::check_fits(cfg, &plan, precision)?;

    let staging = Staging::new(&job.out)?;
    let mut writer = family.writer(cfg, &job.models_dir, &staging.path(""))?;
    let clock = Instant::now();
    let outcome = cluster::run(job, &plan, launch, resume, writer.as_mut())?;
    let evaluated = Evaluated::new(&outcome.evaluations, job.task_names(), job.labeled())?;
    // FS-Merge's time: the workers' run without the originals' and baselines' evaluations.
    let fs_seconds = (clock.elapsed().as_secs_f64() - evaluated.seconds_of_others()).max(0.0);
    warn_if_global_rose(&outcome.log, m.lr);

    let mut results = evaluated.originals()?;
    let mut log = Vec::new();
    for &b in &cfg.baselines.methods {
        let v = match b {
            Baseline::Regmean => variant(&[("alpha", json!(cfg.baselines.regmean_alpha))]),
            Baseline::Kd => kd_variant(m, cfg.seed),
            _ => BTreeMap::new(),
        };
        let row = evaluated
            .row(b.name(), v)
            .with_context(|| format!("the workers sent no evaluation of `{}`", b.name()))?;
        log.extend(evaluated.log(b.name()));
        results.push(row);
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
    writer
        .finish(&v)
        .context("writing the merged model from the workers' folded tensors")?;
    report::write(job, staging, &plan, results, &log, started, outcome.workers)
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
