//! `fsmerge check CONFIG`: the dry run a cluster user does before spending GPU hours. It reads
//! every model's `config.json` and safetensors headers (no weights), says whether they can be
//! merged, counts each task's data (reading it as the workers will, labels and processors
//! included), prints the plan and an estimate of each worker's memory, and exits 0, or with the
//! first problem.

use crate::job::originals::missing;
use crate::job::prepare::task_data;
use crate::job::Job;
use crate::JobArgs;
use anyhow::{Context, Result};
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::plan::Plan;
use fsmerge_worker::family::family;

/// Resident memory of an idle `fsmerge` process (libtorch linked), MiB: the floor of every
/// worker's estimate.
const PROCESS_BASELINE_MIB: f64 = 470.0;

pub fn run(args: &JobArgs) -> Result<()> {
    let job = Job::open(args)?;
    let cfg = &job.cfg;
    let family = family(cfg.model.arch);
    let arch = format!("{:?}", cfg.model.arch).to_lowercase();
    let untrained = !missing(&job).is_empty();
    if untrained {
        println!(
            "models: not trained yet in {} (`fsmerge merge` trains them first); no plan without them",
            job.models_dir.display()
        );
    } else {
        family
            .check(cfg, &job.models_dir)
            .context("the models cannot be merged")?;
        println!(
            "models: {} {arch} models, mergeable (configs and safetensors headers agree)",
            cfg.tasks.len()
        );
    }
    for d in task_data(&job)? {
        let eval = if d.labeled {
            "labeled eval inputs"
        } else {
            "held-out merge inputs (no eval_data: fidelity only)"
        };
        println!(
            "task {}: {} merge inputs, {} {eval}",
            d.task, d.merge_rows, d.eval_rows
        );
    }
    if untrained {
        println!("ok: `fsmerge merge` can run this job (it trains the originals first)");
        return Ok(());
    }
    let plan = Plan::balanced(
        family.unit_costs(cfg, &job.models_dir)?,
        cfg.cluster.stages,
        cfg.cluster.replicas,
    )?;
    println!("plan: {}", plan.describe());
    let rows = cfg.tasks.len() * (cfg.merge.n_originals + cfg.merge.n_augmented);
    let stream = stream_floats(cfg);
    for s in &plan.stages {
        let weights = s.bytes as f64;
        // Teacher features: every model's stream at the stage's boundaries, for every row.
        let boundaries = (s.units.len() + 1) as f64;
        let features = boundaries * (cfg.tasks.len() * rows * stream * 4) as f64;
        let mib = |b: f64| b / (1 << 20) as f64;
        println!(
            "stage {}: units {:?}, weights {:.1} MiB + teacher features {:.1} MiB; estimated peak RSS per worker ≈ {:.0} MiB",
            s.index,
            s.units,
            mib(weights),
            mib(features),
            PROCESS_BASELINE_MIB + 1.2 * mib(weights + features)
        );
    }
    println!("ok: `fsmerge merge` or `fsmerge coordinator` can run this job");
    Ok(())
}

/// Floats per sample of one model's stream between units (a transformer's tokens × width, an
/// MLP's widest layer).
fn stream_floats(cfg: &JobConfig) -> usize {
    match cfg.model.arch {
        Arch::Mlp => cfg.model.hidden.iter().copied().max().unwrap_or(0),
        Arch::Vit => {
            let v = &cfg.model.vit;
            let side = cfg.data.image_side() / v.patch_size.max(1);
            (side * side + 1) * v.width
        }
        Arch::Bert => cfg.data.max_tokens * cfg.model.bert.width,
    }
}
