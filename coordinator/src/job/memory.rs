//! Each worker's memory, estimated from the plan before any work starts: the stage's frozen
//! weights of every model, its teacher features (every model's stream at each of the stage's
//! boundaries, for every merge row), 20% on top for activations, M/U and the optimiser, and
//! the resident floor of an idle `fsmerge` process. `fsmerge check` prints it; a job with
//! `cluster.memory_gb` fails up front when a stage does not fit, naming the stage.

use anyhow::Result;
use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::plan::Plan;
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
    pub features_mib: f64,
    /// Estimated peak resident memory of each of the stage's workers.
    pub peak_mib: f64,
}

/// Every stage's estimate under `plan`.
pub fn estimate(cfg: &JobConfig, plan: &Plan) -> Vec<StageMemory> {
    let rows = cfg.tasks.len() * (cfg.merge.n_originals + cfg.merge.n_augmented);
    let stream = stream_floats(cfg);
    (plan.stages.iter())
        .map(|s| {
            let weights = s.bytes as f64 / MIB;
            let boundaries = (s.units.len() + 1) as f64;
            let features = boundaries * (cfg.tasks.len() * rows * stream * 4) as f64 / MIB;
            StageMemory {
                index: s.index,
                units: s.units.clone(),
                weights_mib: weights,
                features_mib: features,
                peak_mib: PROCESS_BASELINE_MIB + (1.0 + WORKING_SHARE) * (weights + features),
            }
        })
        .collect()
}

/// With `cluster.memory_gb` set, the first stage whose estimate exceeds it is an error naming
/// the stage and the missing GB.
pub fn check_fits(cfg: &JobConfig, plan: &Plan) -> Result<()> {
    let Some(budget_gb) = cfg.cluster.memory_gb else {
        return Ok(());
    };
    let gb = |mib: f64| mib / 1024.0;
    for s in estimate(cfg, plan) {
        if gb(s.peak_mib) > budget_gb {
            anyhow::bail!(
                "stage {} (units {:?}) needs ≈ {:.2} GB per worker (weights {:.2} GB, teacher features {:.2} GB, \
                 process {:.2} GB, +{:.0}% working memory) but `cluster.memory_gb` = {budget_gb}: {:.2} GB missing; \
                 use more stages (`cluster.stages`) or fewer merge inputs",
                s.index,
                s.units,
                gb(s.peak_mib),
                gb(s.weights_mib),
                gb(s.features_mib),
                gb(PROCESS_BASELINE_MIB),
                100.0 * WORKING_SHARE,
                gb(s.peak_mib) - budget_gb
            );
        }
    }
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
