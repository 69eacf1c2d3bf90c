//! Each worker's memory, estimated from the plan before any work starts: the stage's frozen
//! weights of every model, its teacher features (every model's stream at each of the stage's
//! boundaries, for every merge row), 20% on top for activations, M/U and the optimiser, and
//! the resident floor of an idle `fsmerge` process. Features kept on disk (memory-mapped) count
//! nothing: the kernel pages in what a batch reads and may evict it. `fsmerge check` prints it;
//! `merge.features = "auto"` puts a stage's features on disk when they would not fit
//! `cluster.memory_gb`, and a stage that fits neither way fails up front, naming the stage.

use anyhow::Result;
use fsmerge_common::config::{Features, JobConfig};
use fsmerge_common::plan::{FeaturesAt, Plan, StagePlan, UnitCost};
use fsmerge_common::precision::Precision;
use std::ops::Range;

/// Resident memory of an idle `fsmerge` process (libtorch linked), MiB: the floor of every
/// worker's estimate.
const PROCESS_BASELINE_MIB: f64 = 470.0;

/// Share added to weights and features for activations, M/U and Adam's moments.
const WORKING_SHARE: f64 = 0.2;

const MIB: f64 = (1u64 << 20) as f64;

/// One stage's estimate, in MiB.
pub struct StageMemory {
    pub index: usize,
    pub units: Range<usize>,
    pub weights_mib: f64,
    /// The teacher features' size, wherever they are kept.
    pub features_mib: f64,
    pub features_at: FeaturesAt,
    /// Estimated peak resident memory of each of the stage's workers.
    pub peak_mib: f64,
}

/// Every stage's estimate under `plan`, with its features where the plan keeps them.
/// Weights and features count in the job's `precision` (the plan's unit bytes are fp32's).
pub fn estimate(cfg: &JobConfig, plan: &Plan, precision: Precision) -> Vec<StageMemory> {
    (plan.stages.iter())
        .map(|s| stage_estimate(cfg, s, s.features, precision))
        .collect()
}

fn stage_estimate(
    cfg: &JobConfig,
    s: &StagePlan,
    at: FeaturesAt,
    precision: Precision,
) -> StageMemory {
    let rows = cfg.tasks.len() * (cfg.merge.n_originals + cfg.merge.n_augmented);
    let value = precision.bytes();
    let weights = (s.bytes as f64 / 4.0) * value as f64 / MIB;
    let boundaries = (s.units.len() + 1) as f64;
    // The models' own stream size; the config's shape for a plan from before it was recorded.
    let stream = match s.stream {
        0 => cfg.stream_floats(),
        floats => floats as usize,
    };
    let features = boundaries * (cfg.tasks.len() * rows * stream * value) as f64 / MIB;
    let resident = match at {
        FeaturesAt::Memory => features,
        FeaturesAt::Disk => 0.0,
        // The input stream alone.
        FeaturesAt::Recompute => features / boundaries,
    };
    StageMemory {
        index: s.index,
        units: s.units.clone(),
        weights_mib: weights,
        features_mib: features,
        features_at: at,
        peak_mib: PROCESS_BASELINE_MIB + (1.0 + WORKING_SHARE) * (weights + resident),
    }
}

/// The job's plan: stages balanced by compute and each stage's features placed
/// (`place_features`); with `cluster.memory_gb`, when a stage would not fit, the cut is made
/// again among those whose every stage fits (its features on disk where `merge.features`
/// allows), the slowest stage as fast as that allows. A plan that fits no way is returned as
/// balanced by compute, for `check_fits` to name the stage.
pub fn plan(
    cfg: &JobConfig,
    units: Vec<UnitCost>,
    precision: Precision,
) -> fsmerge_common::Result<Plan> {
    let (stages, replicas) = (cfg.cluster.stages, cfg.cluster.replicas);
    let mut plan = Plan::balanced(units.clone(), stages, replicas)?;
    place_features(cfg, &mut plan, precision);
    let Some(budget_mib) = cfg.cluster.memory_gb.map(|gb| gb * 1024.0) else {
        return Ok(plan);
    };
    if estimate(cfg, &plan, precision)
        .iter()
        .all(|s| s.peak_mib <= budget_mib)
    {
        return Ok(plan);
    }
    let leanest = match cfg.merge.features {
        Features::Memory => FeaturesAt::Memory,
        Features::Auto | Features::Disk => FeaturesAt::Disk,
        Features::Recompute => FeaturesAt::Recompute,
    };
    let fits = |r: Range<usize>| {
        let s = StagePlan {
            index: 0,
            flops: 0,
            bytes: units[r.clone()].iter().map(|u| u.bytes).sum(),
            stream: fsmerge_common::plan::widest(&units, r.clone()),
            units: r,
            features: leanest,
        };
        stage_estimate(cfg, &s, leanest, precision).peak_mib <= budget_mib
    };
    let mut within = Plan::balanced_within(units.clone(), stages, replicas, &fits)?;
    place_features(cfg, &mut within, precision);
    if within
        .stages
        .iter()
        .map(|s| &s.units)
        .ne(plan.stages.iter().map(|s| &s.units))
    {
        tracing::info!(
            "plan: stages cut again so that each fits `cluster.memory_gb` = {:.2} (the compute-balanced cut did not)",
            budget_mib / 1024.0
        );
    }
    Ok(within)
}

/// Decide where each stage keeps its teacher features (`merge.features`; `auto`: in memory
/// unless the stage would then exceed `cluster.memory_gb`), logging every stage sent to disk.
fn place_features(cfg: &JobConfig, plan: &mut Plan, precision: Precision) {
    let budget_mib = cfg.cluster.memory_gb.map(|gb| gb * 1024.0);
    for s in &mut plan.stages {
        s.features = match cfg.merge.features {
            Features::Memory => FeaturesAt::Memory,
            Features::Disk => FeaturesAt::Disk,
            Features::Recompute => FeaturesAt::Recompute,
            Features::Auto => {
                let in_memory = stage_estimate(cfg, s, FeaturesAt::Memory, precision);
                match budget_mib {
                    Some(b) if in_memory.peak_mib > b => {
                        tracing::info!(
                            "stage {}: teacher features ({:.2} GB) on disk, memory-mapped: with them in memory \
                             the stage would need ≈ {:.2} GB per worker, over `cluster.memory_gb` = {:.2}",
                            s.index,
                            in_memory.features_mib / 1024.0,
                            in_memory.peak_mib / 1024.0,
                            b / 1024.0
                        );
                        FeaturesAt::Disk
                    }
                    _ => FeaturesAt::Memory,
                }
            }
        };
    }
}

/// With `cluster.memory_gb` set, the first stage whose estimate exceeds it is an error naming
/// the stage and the missing GB.
pub fn check_fits(cfg: &JobConfig, plan: &Plan, precision: Precision) -> Result<()> {
    let Some(budget_gb) = cfg.cluster.memory_gb else {
        return Ok(());
    };
    let gb = |mib: f64| mib / 1024.0;
    for s in estimate(cfg, plan, precision) {
        if gb(s.peak_mib) > budget_gb {
            anyhow::bail!(
                "stage {} (units {:?}) needs ≈ {:.2} GB per worker (weights {:.2} GB, teacher features {:.2} GB{}, \
                 process {:.2} GB, +{:.0}% working memory) but `cluster.memory_gb` = {budget_gb}: {:.2} GB missing; \
                 use more stages (`cluster.stages`){}",
                s.index,
                s.units,
                gb(s.peak_mib),
                gb(s.weights_mib),
                gb(s.features_mib),
                match s.features_at {
                    FeaturesAt::Memory => "",
                    FeaturesAt::Disk => " on disk, not counted",
                    FeaturesAt::Recompute => " recomputed, only the input stream counted",
                },
                gb(PROCESS_BASELINE_MIB),
                100.0 * WORKING_SHARE,
                gb(s.peak_mib) - budget_gb,
                match s.features_at {
                    FeaturesAt::Memory => ", fewer merge inputs or `merge.features = \"disk\"`",
                    FeaturesAt::Disk | FeaturesAt::Recompute => "",
                }
            );
        }
    }
    Ok(())
}
