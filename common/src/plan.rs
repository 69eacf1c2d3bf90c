//! The partition plan: the SuperNet's units (a family's layers or blocks, each with the cost its
//! family gives it: `Family::unit_costs`) are cut into S contiguous stages of near-equal cost,
//! each with R data-parallel replicas. The single-machine job uses one stage
//! and one replica through the same types the distributed runtime uses.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Cost of one SuperNet unit for n models, per training sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitCost {
    pub name: String,
    /// Multiply-add equivalents per sample: the n frozen branches plus the unit's M/U work.
    pub flops: u64,
    /// Bytes of the n models' frozen tensors of this unit.
    pub bytes: u64,
    /// Floats per sample of one model's stream after this unit (a transformer's tokens ×
    /// width, an MLP layer's width), from the model's own config: what its teacher features
    /// weigh.
    #[serde(default)]
    pub stream: u64,
}

/// Per-sample cost of a unit's merge/unmerge, element-wise passes and optimizer step, in
/// multiply-add equivalents per model and output feature. Calibrated on CPU (784-256-256-256-256,
/// n = 2, batch 128, rank 12): a layer's step time fits branch MACs + n·out·512 within 10%,
/// while branch MACs alone under-weight narrow layers by 2–3×, which unbalances stages.
pub const MU_COST_PER_FEATURE: usize = 512;

/// MLP units: layer l costs n·in·out branch multiply-adds plus its M/U work (see
/// `MU_COST_PER_FEATURE`) and holds n·(in·out + out) floats.
pub fn mlp_unit_costs(input_dim: usize, hidden: &[usize], n_models: usize) -> Vec<UnitCost> {
    let mut fan_in = input_dim;
    hidden
        .iter()
        .enumerate()
        .map(|(l, &w)| {
            let c = UnitCost {
                name: format!("layer{l}"),
                flops: (n_models * (fan_in * w + w * MU_COST_PER_FEATURE)) as u64,
                bytes: (n_models * (fan_in * w + w) * 4) as u64,
                stream: w as u64,
            };
            fan_in = w;
            c
        })
        .collect()
}

/// The widest stream a stage of units `range` of `units` holds features of: its input (the
/// previous unit's stream) and each of its units' outputs.
pub fn widest(units: &[UnitCost], range: Range<usize>) -> u64 {
    let from = range.start.saturating_sub(1);
    (units.get(from..range.end).unwrap_or_default().iter())
        .map(|u| u.stream)
        .max()
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    pub units: Range<usize>,
    pub flops: u64,
    pub bytes: u64,
    /// The widest stream the stage keeps features of (`widest`).
    #[serde(default)]
    pub stream: u64,
    /// Where the stage's workers keep their teacher features (chosen after the partition,
    /// from `merge.features` and the memory budget).
    #[serde(default)]
    pub features: FeaturesAt,
}

/// Where a stage keeps its teacher features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeaturesAt {
    /// In RAM, as tensors.
    #[default]
    Memory,
    /// In a safetensors file of the work directory, memory-mapped: the kernel pages in the
    /// rows a batch reads and may drop them again, so RAM holds no whole `[n, N, ..]` stream.
    Disk,
    /// Not kept: only the stage's input stream is (stage 0: the merge rows), and each batch's
    /// features are recomputed from it by the frozen originals (one teacher forward per step).
    Recompute,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub units: Vec<UnitCost>,
    pub stages: Vec<StagePlan>,
    pub replicas: usize,
}

impl Plan {
    /// Cut `units` into `stages` contiguous stages minimising the largest stage's FLOPs.
    pub fn balanced(units: Vec<UnitCost>, stages: usize, replicas: usize) -> Result<Plan> {
        Plan::balanced_within(units, stages, replicas, &|_| true)
    }

    /// Cut `units` into `stages` contiguous stages minimising the largest stage's FLOPs among
    /// the cuts whose every stage `fits` (a worker's memory, say; a range of units that fits
    /// must fit when it shrinks). Without such a cut, the FLOP-balanced one.
    pub fn balanced_within(
        units: Vec<UnitCost>,
        stages: usize,
        replicas: usize,
        fits: &dyn Fn(Range<usize>) -> bool,
    ) -> Result<Plan> {
        if stages == 0 || replicas == 0 {
            return Err(Error::Plan(format!(
                "stages ({stages}) and replicas ({replicas}) must be ≥ 1"
            )));
        }
        if stages > units.len() {
            return Err(Error::Plan(format!(
                "{stages} stages requested but the SuperNet has only {} units",
                units.len()
            )));
        }
        let costs: Vec<u64> = units.iter().map(|u| u.flops.max(1)).collect();
        let bounds = cut(&costs, stages, fits).unwrap_or_else(|| {
            cut(&costs, stages, &|_| true).expect("a cut by FLOPs alone always exists")
        });
        let stages = bounds
            .windows(2)
            .enumerate()
            .map(|(index, w)| StagePlan {
                index,
                units: w[0]..w[1],
                flops: units[w[0]..w[1]].iter().map(|u| u.flops).sum(),
                bytes: units[w[0]..w[1]].iter().map(|u| u.bytes).sum(),
                stream: widest(&units, w[0]..w[1]),
                features: FeaturesAt::Memory,
            })
            .collect();
        Ok(Plan {
            units,
            stages,
            replicas,
        })
    }

    /// The single-machine plan: one stage holding every unit, one replica.
    pub fn single(units: Vec<UnitCost>) -> Plan {
        Plan::balanced(units, 1, 1).expect("one stage always fits")
    }

    /// One line per stage: its units, compute, the frozen weights it holds in `precision` (the
    /// unit costs count fp32 bytes), where its teacher features live.
    pub fn describe(&self, precision: crate::precision::Precision) -> String {
        let mut s = format!(
            "{} stage(s) × {} replica(s)",
            self.stages.len(),
            self.replicas
        );
        for st in &self.stages {
            let names: Vec<&str> = self.units[st.units.clone()]
                .iter()
                .map(|u| u.name.as_str())
                .collect();
            s.push_str(&format!(
                "\n  stage {}: {} ({:.2} MFLOP/sample, {:.2} MB frozen in {}, teacher features {})",
                st.index,
                names.join(", "),
                st.flops as f64 / 1e6,
                st.bytes as f64 / 4.0 * precision.bytes() as f64 / 1e6,
                precision.torch_dtype(),
                match st.features {
                    FeaturesAt::Memory => "in memory",
                    FeaturesAt::Disk => "in a memory-mapped file",
                    FeaturesAt::Recompute => "recomputed each batch from the stage input",
                }
            ));
        }
        s
    }
}

/// The stage bounds (0, …, units) of `stages` contiguous stages of `costs` with the smallest
/// bottleneck cost whose stages all `fit`, or None when no cut into `stages` fits: a binary
/// search on the bottleneck, greedy packing checking each cap (optimal for contiguous cuts
/// under constraints that hold for every sub-range of a range that satisfies them).
fn cut(costs: &[u64], stages: usize, fits: &dyn Fn(Range<usize>) -> bool) -> Option<Vec<usize>> {
    // Greedy packing under `cap`: the bounds, or None when a unit alone exceeds it or does not
    // fit.
    let pack = |cap: u64| -> Option<Vec<usize>> {
        let mut bounds = vec![0];
        let mut acc = 0;
        for (i, &c) in costs.iter().enumerate() {
            let start = bounds[bounds.len() - 1];
            if i > start && (acc + c > cap || !fits(start..i + 1)) {
                bounds.push(i);
                acc = 0;
            }
            let start = bounds[bounds.len() - 1];
            if c > cap || !fits(start..i + 1) {
                return None;
            }
            acc += c;
        }
        bounds.push(costs.len());
        Some(bounds)
    };
    let feasible = |cap: u64| pack(cap).is_some_and(|b| b.len() - 1 <= stages);
    let (mut lo, mut hi) = (*costs.iter().max()?, costs.iter().sum::<u64>());
    if !feasible(hi) {
        return None;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if feasible(mid) {
            hi = mid
        } else {
            lo = mid + 1
        }
    }
    // Pack with cap `lo`, keeping at least one unit for every remaining stage.
    let mut bounds = vec![0];
    let mut acc = 0;
    for (i, &c) in costs.iter().enumerate() {
        let stages_left = stages - bounds.len();
        let units_left = costs.len() - i;
        let start = bounds[bounds.len() - 1];
        if i > start
            && (acc + c > lo || units_left == stages_left || !fits(start..i + 1))
            && stages_left > 0
        {
            bounds.push(i);
            acc = 0;
        }
        acc += c;
    }
    bounds.push(costs.len());
    bounds
        .windows(2)
        .all(|w| fits(w[0]..w[1]))
        .then_some(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_stage_holds_everything() {
        let p = Plan::single(mlp_unit_costs(784, &[256, 256, 256], 2));
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].units, 0..3);
    }

    #[test]
    fn a_memory_bound_moves_units_off_a_full_stage() {
        let units = mlp_unit_costs(784, &[256, 256, 256, 256], 2);
        let by_flops = Plan::balanced(units.clone(), 2, 1).unwrap();
        assert_eq!(by_flops.stages[0].units, 0..2);
        // Stage bytes capped just under what stage 0 holds by FLOPs.
        let cap = by_flops.stages[0].bytes - 1;
        let bytes = |r: Range<usize>| units[r].iter().map(|u| u.bytes).sum::<u64>();
        let p = Plan::balanced_within(units.clone(), 2, 1, &|r| bytes(r) <= cap).unwrap();
        assert_eq!(p.stages[0].units, 0..1);
        assert!(p.stages.iter().all(|s| s.bytes <= cap));
        // Nothing fits: the FLOP-balanced cut (the memory check names the stage).
        let none = Plan::balanced_within(units.clone(), 2, 1, &|_| false).unwrap();
        assert_eq!(none.stages, by_flops.stages);
        // More stages than the packing needs: every stage still gets a unit.
        let four = Plan::balanced_within(units, 4, 1, &|_| true).unwrap();
        assert!(four.stages.iter().all(|s| s.units.len() == 1));
    }

    #[test]
    fn balanced_splits_contiguously() {
        let p = Plan::balanced(mlp_unit_costs(784, &[256, 256, 256], 2), 2, 1).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert_eq!(p.stages[0].units, 0..1);
        assert_eq!(p.stages[1].units, 1..3);
        assert!(Plan::balanced(mlp_unit_costs(784, &[256], 2), 2, 1).is_err());
    }
}
