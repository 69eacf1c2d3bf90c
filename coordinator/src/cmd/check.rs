//! `fsmerge check CONFIG`: the dry run a cluster user does before spending GPU hours. It reads
//! every model's `config.json` and safetensors headers (no weights), says whether they can be
//! merged, counts each task's data (reading it as the workers will, labels and processors
//! included), prints the plan and an estimate of each worker's memory, and exits 0, or with the
//! first problem.

use crate::job::memory;
use crate::job::originals::missing;
use crate::job::prepare::task_data;
use crate::job::Job;
use crate::JobArgs;
use anyhow::{Context, Result};
use fsmerge_common::plan::FeaturesAt;
use fsmerge_common::precision::Precision;
use fsmerge_worker::family::family;

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
    let precision = Precision::for_job(cfg, &job.models_dir)?;
    let plan = memory::plan(cfg, family.unit_costs(cfg, &job.models_dir)?, precision)?;
    println!(
        "plan: {}; originals and features in {}",
        plan.describe(precision),
        precision.torch_dtype()
    );
    for s in memory::estimate(cfg, &plan, precision) {
        println!(
            "stage {}: units {:?}, weights {:.1} MiB + teacher features {:.1} MiB ({}); estimated peak RSS per worker ≈ {:.0} MiB",
            s.index,
            s.units,
            s.weights_mib,
            s.features_mib,
            match s.features_at {
                FeaturesAt::Memory => "in memory",
                FeaturesAt::Disk => "on disk, memory-mapped",
                FeaturesAt::Recompute => "recomputed each batch; the input stream in memory",
            },
            s.peak_mib
        );
    }
    memory::check_fits(cfg, &plan, precision)?;
    println!("ok: `fsmerge merge` or `fsmerge coordinator` can run this job");
    Ok(())
}
