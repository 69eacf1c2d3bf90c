//! The rows of a job's results table: evaluation of a method on the test and validation
//! splits, the variants that tell runs apart, and the local phase's rows.

use fsmerge_common::config::{MergeConfig, Mode};
use fsmerge_common::metrics::{mean_of, Evaluation, MethodResult};
use fsmerge_worker::train::progress::LogRow;
use fsmerge_worker::train::settings::TrainSettings;
use serde_json::json;
use std::collections::BTreeMap;

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

/// KD's row variant: its initialisation and training settings (`TrainSettings::kd`).
pub fn kd_variant(m: &MergeConfig, seed: u64) -> BTreeMap<String, serde_json::Value> {
    let s = TrainSettings::kd(m, seed);
    variant(&[
        ("init", json!("first")),
        ("epochs", json!(s.epochs)),
        ("lr", json!(s.lr)),
    ])
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

pub fn variant(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The models the workers evaluated, as rows of the results table.
pub struct Evaluated<'a> {
    by_method: BTreeMap<&'a str, &'a Evaluation>,
    names: Vec<String>,
    /// Whether each task has labels (else it is scored by fidelity alone).
    labeled: Vec<bool>,
}

impl<'a> Evaluated<'a> {
    /// Index the workers' evaluations; one that does not score every task of the job is an
    /// error naming it.
    pub fn new(
        evaluations: &'a [Evaluation],
        names: Vec<String>,
        labeled: Vec<bool>,
    ) -> anyhow::Result<Self> {
        for e in evaluations {
            for (split, s) in [("test", &e.test), ("validation", &e.val)] {
                let lens = [s.per_task.len(), s.fidelity.len(), s.logit_error.len()];
                if lens.iter().any(|&l| l != names.len()) {
                    anyhow::bail!(
                        "the workers evaluated `{}` on {} tasks of the {split} split; the job has {}",
                        e.method,
                        s.per_task.len(),
                        names.len()
                    );
                }
            }
        }
        let by_method = evaluations.iter().map(|e| (e.method.as_str(), e)).collect();
        Ok(Self {
            by_method,
            names,
            labeled,
        })
    }

    /// Seconds the workers spent on the originals and the baselines (not FS-Merge's own rows).
    pub fn seconds_of_others(&self) -> f64 {
        (self.by_method.iter())
            .filter(|(m, _)| !["fs-merge", "local supernet", "local folded"].contains(m))
            .map(|(_, e)| e.seconds)
            .sum()
    }

    /// The row of a merged model `method` (a baseline or FS-Merge), when the workers sent it.
    pub fn row(
        &self,
        method: &str,
        variant: BTreeMap<String, serde_json::Value>,
    ) -> Option<MethodResult> {
        let name = if method == "ensemble" {
            "originals"
        } else {
            method
        };
        let e = self.by_method.get(name)?;
        let per_task_acc = self.labeled_only(&e.test.per_task);
        let any_labels = !per_task_acc.is_empty();
        let fidelity = self.per_task(&e.test.fidelity);
        tracing::info!(
            "{method}: mean task accuracy {}, joint {}; mean fidelity {:.2}%",
            percent(any_labels.then(|| mean_of(&per_task_acc))),
            percent(any_labels.then_some(e.test.joint)),
            100.0 * mean_of(&fidelity)
        );
        // Causal LMs have no joint prediction over the heads.
        let lm = !e.test.perplexity.is_empty();
        Some(MethodResult {
            method: method.to_string(),
            variant,
            mean_task_acc: mean_of(&per_task_acc),
            per_task_acc,
            joint_acc: (any_labels && !lm).then_some(e.test.joint),
            per_task_fidelity: fidelity,
            per_task_logit_error: self.per_task(&e.test.logit_error),
            per_task_perplexity: self.perplexity(&e.test.perplexity, None),
            val_mean_task_acc: mean_of(&self.labeled_only(&e.val.per_task)),
            seconds: if method == "ensemble" { 0.0 } else { e.seconds },
        })
    }

    /// The training log of `method` (KD's), empty when it has none.
    pub fn log(&self, method: &str) -> Vec<LogRow> {
        self.by_method
            .get(method)
            .map_or_else(Vec::new, |e| e.log.clone())
    }

    /// The row of every task's original (its own task only; no joint accuracy).
    pub fn originals(&self) -> anyhow::Result<Vec<MethodResult>> {
        let Some(e) = self.by_method.get("originals") else {
            anyhow::bail!("the workers sent no evaluation of the originals");
        };
        Ok((self.names.iter().enumerate())
            .map(|(t, name)| {
                let own = |v: &[f64]| BTreeMap::from([(name.clone(), v[t])]);
                let labeled = self.labeled[t];
                MethodResult {
                    method: format!("original:{name}"),
                    variant: BTreeMap::new(),
                    per_task_acc: if labeled {
                        own(&e.test.per_task)
                    } else {
                        BTreeMap::new()
                    },
                    mean_task_acc: if labeled { e.test.per_task[t] } else { 0.0 },
                    joint_acc: None,
                    per_task_fidelity: own(&e.test.fidelity),
                    per_task_logit_error: own(&e.test.logit_error),
                    per_task_perplexity: self.perplexity(&e.test.perplexity, Some(t)),
                    val_mean_task_acc: if labeled { e.val.per_task[t] } else { 0.0 },
                    seconds: 0.0,
                }
            })
            .collect())
    }

    /// A causal LM's perplexity of each head (only head `only`'s, when given) on each
    /// domain, by task names, from `ppl[domain][head]`; empty for classifiers.
    fn perplexity(
        &self,
        ppl: &[Vec<f64>],
        only: Option<usize>,
    ) -> BTreeMap<String, BTreeMap<String, f64>> {
        (self.names.iter().enumerate())
            .filter(|(h, _)| only.is_none_or(|o| o == *h) && !ppl.is_empty())
            .map(|(h, head)| {
                let by_domain = (self.names.iter().zip(ppl))
                    .filter_map(|(d, row)| row.get(h).map(|&p| (d.clone(), p)))
                    .collect();
                (head.clone(), by_domain)
            })
            .collect()
    }

    /// Every task's value of `v`, by task name.
    fn per_task(&self, v: &[f64]) -> BTreeMap<String, f64> {
        self.names.iter().cloned().zip(v.iter().copied()).collect()
    }

    /// The labeled tasks' values of `v` (accuracies), by task name.
    fn labeled_only(&self, v: &[f64]) -> BTreeMap<String, f64> {
        (self.names.iter().zip(v).zip(&self.labeled))
            .filter(|(_, &l)| l)
            .map(|((n, &x), _)| (n.clone(), x))
            .collect()
    }
}

/// A share as a percentage for the log, `–` when there is none.
fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{:.2}%", 100.0 * v))
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
