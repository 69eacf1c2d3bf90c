//! `--resume`: the work directory of an interrupted job, checked to belong to the same job and
//! plan, and which phases of each stage are restored instead of retrained.

use crate::job::Job;
use anyhow::{bail, Context, Result};
use fsmerge_common::plan::Plan;
use fsmerge_common::workdir::{Manifest, WorkDir};

/// Prepare the work directory: fresh, or (with `resume`) the previous run's, checked to belong
/// to the same job and plan.
pub fn open_work(job: &Job, plan: &Plan, resume: bool) -> Result<(WorkDir, Manifest)> {
    let work = WorkDir::of_output(&job.out);
    let previous = if resume { work.read_manifest()? } else { None };
    let mut manifest = match previous {
        Some(m) => {
            if m.plan != *plan || m.seed != job.cfg.seed || m.job != job.cfg.name {
                bail!(
                    "--resume: {} belongs to another job or plan (job `{}`, seed {}, {} stage(s) × {} replica(s)); \
                     run without --resume to start over",
                    work.manifest().display(),
                    m.job,
                    m.seed,
                    m.plan.stages.len(),
                    m.plan.replicas
                );
            }
            for d in &m.done {
                tracing::info!(
                    "resume: stage {} phase `{}` was finished in run {} ({:.1} s); it will be restored, not retrained",
                    d.stage, d.phase, d.run, d.seconds
                );
            }
            m
        }
        None => {
            if resume {
                tracing::warn!(
                    "--resume: no manifest at {}; starting from the beginning",
                    work.manifest().display()
                );
            }
            if work.root.exists() {
                std::fs::remove_dir_all(&work.root)
                    .with_context(|| format!("removing {}", work.root.display()))?;
            }
            Manifest {
                job: job.cfg.name.clone(),
                seed: job.cfg.seed,
                plan: plan.clone(),
                runs: 0,
                features: false,
                done: Vec::new(),
            }
        }
    };
    // A rendezvous file left by an earlier run names a dead address; workers must not find it.
    let _ = std::fs::remove_file(work.rendezvous());
    manifest.runs += 1;
    manifest.features = (0..plan.stages.len()).all(|s| work.features(s).exists());
    work.write_manifest(&manifest)?;
    Ok((work, manifest))
}

/// Phases of `stage` to restore: its own finished phases, and `global` only if every stage
/// finished it (the global phase is one pipeline).
pub fn done_phases(manifest: &Manifest, stage: usize, stages: usize) -> Vec<String> {
    let mut v = Vec::new();
    if manifest.is_done(stage, "local") {
        v.push("local".to_string());
    }
    if (0..stages).all(|s| manifest.is_done(s, "global")) {
        v.push("global".to_string());
    }
    v
}

/// The step each unfinished phase continues from: the latest mid-phase checkpoint that every
/// stage retraining the phase holds (stages are coupled within a phase, so they must all
/// restart at one step); phases without one are absent and start over.
pub fn resume_steps(
    work: &WorkDir,
    manifest: &Manifest,
    stages: usize,
) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for phase in ["local", "global"] {
        let retrain: Vec<usize> = (0..stages)
            .filter(|&s| !done_phases(manifest, s, stages).iter().any(|p| p == phase))
            .collect();
        let mut common: Option<Vec<u64>> = None;
        for &s in &retrain {
            let steps: Vec<u64> = work
                .read_partial(s, phase)?
                .map(|r| r.steps.iter().map(|p| p.step).collect())
                .unwrap_or_default();
            common = Some(match common {
                None => steps,
                Some(c) => c.into_iter().filter(|x| steps.contains(x)).collect(),
            });
        }
        if let Some(&step) = common.unwrap_or_default().iter().max() {
            tracing::info!(
                "resume: phase `{phase}` continues from its checkpoint at step {step} on stage(s) {retrain:?}"
            );
            out.push((phase.to_string(), step));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsmerge_common::plan::mlp_unit_costs;
    use fsmerge_common::workdir::DoneEntry;

    #[test]
    fn global_is_restored_only_when_every_stage_finished_it() {
        let plan = Plan::balanced(mlp_unit_costs(4, &[3, 3], 2), 2, 1).unwrap();
        let entry = |stage: usize, phase: &str| DoneEntry {
            stage,
            phase: phase.into(),
            run: 1,
            seconds: 0.0,
        };
        let mut m = Manifest {
            job: "j".into(),
            seed: 0,
            plan,
            runs: 1,
            features: true,
            done: vec![entry(0, "local"), entry(1, "local"), entry(0, "global")],
        };
        assert_eq!(done_phases(&m, 0, 2), vec!["local"]);
        m.done.push(entry(1, "global"));
        assert_eq!(done_phases(&m, 1, 2), vec!["local", "global"]);
    }
}
