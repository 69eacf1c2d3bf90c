//! The job's output, staged and committed atomically: merged model (safetensors + JSON config),
//! metrics.json, results.md, plan.json and the training log (JSON lines).

pub mod plots;
pub mod progress;

use crate::job::Job;
use anyhow::Result;
use fsmerge_common::checkpoint::write_json;
use fsmerge_common::fsio::{write_atomic, Staging};
use fsmerge_common::metrics::{peak_rss_mib, MethodResult, Metrics, WorkerStats};
use fsmerge_common::plan::Plan;
use fsmerge_worker::train::progress::LogRow;
use std::time::Instant;

/// Write the job's outputs into `staging` (which already holds the merged model): plan,
/// config, training log, metrics, charts and the Markdown report; all committed at once.
pub fn write(
    job: &Job,
    staging: Staging,
    plan: &Plan,
    results: Vec<MethodResult>,
    log: &[LogRow],
    started: Instant,
    workers: Vec<WorkerStats>,
) -> Result<()> {
    let cfg = &job.cfg;
    write_json(&staging.path("plan.json"), plan)?;
    write_json(&staging.path("config.json"), cfg)?;
    write_jsonl(&staging.path("train_log.jsonl"), log)?;
    let metrics = Metrics {
        job: cfg.name.clone(),
        seed: cfg.seed,
        n_originals: cfg.merge.n_originals,
        n_augmented: cfg.merge.n_augmented,
        plan: serde_json::to_value(plan)?,
        results,
        peak_rss_mib: peak_rss_mib(),
        total_seconds: started.elapsed().as_secs_f64(),
        workers,
    };
    write_json(&staging.path("metrics.json"), &metrics)?;
    let mut table = metrics.markdown(&job.task_names());
    let charts = crate::report::plots::write(&staging.path(""), log, &metrics.results)?;
    if !charts.is_empty() {
        table.push('\n');
        for c in &charts {
            table.push_str(&format!("![{c}]({c})\n"));
        }
    }
    write_atomic(&staging.path("results.md"), table.as_bytes())?;
    let dir = staging.commit()?;
    println!("{table}");
    tracing::info!("results written to {}", dir.display());
    Ok(())
}

/// Write training-log rows as JSON lines, atomically.
pub fn write_jsonl(path: &std::path::Path, rows: &[LogRow]) -> Result<()> {
    let mut lines = String::new();
    for row in rows {
        lines.push_str(&serde_json::to_string(row)?);
        lines.push('\n');
    }
    write_atomic(path, lines.as_bytes())?;
    Ok(())
}
