//! Results of a job: one entry per method, written as `metrics.json` and a Markdown table.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    /// `original:<task>`, `ensemble`, `first`, `average`, `regmean`, `kd`, `fs-merge`, and for
    /// transformers in local modes `local supernet` / `local folded` (after the local phase).
    pub method: String,
    /// Mode, M/U type, rank, init, targets (FS-Merge); empty for baselines without options.
    pub variant: BTreeMap<String, serde_json::Value>,
    /// Test accuracy per task, each task read out through its own head.
    pub per_task_acc: BTreeMap<String, f64>,
    pub mean_task_acc: f64,
    /// Argmax over all heads' concatenated logits (labels offset per task); None for a single
    /// original model, which has only its own head.
    pub joint_acc: Option<f64>,
    /// Per task: the share of test inputs on which the task's head agrees with its original's
    /// prediction (held-out merge inputs for a task without labels).
    #[serde(default)]
    pub per_task_fidelity: BTreeMap<String, f64>,
    /// Per task: ‖z − z_orig‖ / ‖z_orig‖ over the test inputs, z the task head's logits (the
    /// last features every merged model exposes in the original's space: FS-Merge folds its
    /// final unmerge into the heads).
    #[serde(default)]
    pub per_task_logit_error: BTreeMap<String, f64>,
    /// Causal LMs: test perplexity of each task's head (outer key) on each task's text domain
    /// (inner key); empty for classifiers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_task_perplexity: BTreeMap<String, BTreeMap<String, f64>>,
    /// Validation-split mean task accuracy (used to choose defaults).
    pub val_mean_task_acc: f64,
    /// Wall time of the method (merge/training, not evaluation).
    pub seconds: f64,
}

/// A model's accuracies on one split: each task on its own head, and joint (argmax over every
/// head's logits, averaged over the tasks' rows task by task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitScores {
    pub per_task: Vec<f64>,
    /// Over the labeled tasks only.
    pub joint: f64,
    /// Per task: agreement with the original's predictions (1 for the originals).
    pub fidelity: Vec<f64>,
    /// Per task: relative error of the task head's logits against the original's.
    pub logit_error: Vec<f64>,
    /// Causal LMs: perplexity[d][h] of task h's head on domain d's texts (empty for
    /// classifiers).
    #[serde(default)]
    pub perplexity: Vec<Vec<f64>>,
}

/// Mean of a per-task map's values (0 when it is empty).
pub fn mean_of(per_task: &BTreeMap<String, f64>) -> f64 {
    per_task.values().sum::<f64>() / per_task.len().max(1) as f64
}

impl MethodResult {
    /// Mean fidelity over the tasks (0 for metrics of runs before fidelity existed).
    pub fn mean_fidelity(&self) -> f64 {
        mean_of(&self.per_task_fidelity)
    }

    /// A causal LM's perplexity of each head on its own domain, averaged over the heads
    /// (None for classifiers).
    pub fn mean_own_perplexity(&self) -> Option<f64> {
        let own: Vec<f64> = (self.per_task_perplexity.iter())
            .filter_map(|(head, by_domain)| by_domain.get(head).copied())
            .collect();
        (!own.is_empty()).then(|| own.iter().sum::<f64>() / own.len() as f64)
    }
}

/// A model evaluated on the workers (pipelined over the stages), as the last stage reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// `originals` (every task's original on its own head: the original rows and the
    /// ensemble), a baseline's name, `local supernet`, `local folded` or `fs-merge`.
    pub method: String,
    /// Wall time of the method on the last stage (merge or training, and evaluation).
    pub seconds: f64,
    pub test: SplitScores,
    pub val: SplitScores,
    /// Training log of a method that trains (KD).
    pub log: Vec<LogRow>,
}

/// One row of a training log (written as JSON lines, sent by workers to the coordinator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub phase: String,
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
}

/// What one worker of a distributed run measured about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub rank: u32,
    pub host: String,
    pub stage: u32,
    pub replica: u32,
    /// Where the worker's tensors lived (`cpu`, `cuda:0`, …).
    pub device: String,
    /// Optimizer steps per training phase (for step times).
    pub phase_steps: std::collections::BTreeMap<String, u64>,
    /// Peak resident memory of the worker process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Bytes of the original models' frozen tensors the worker holds.
    pub weight_bytes: u64,
    /// Wall time per training phase (`local`, `global`).
    pub phase_seconds: std::collections::BTreeMap<String, f64>,
    /// Time spent inside replica all-reduces, and how many there were.
    pub allreduce_seconds: f64,
    pub allreduce_calls: u64,
    /// Time spent in optimizer steps (compute + communication), for the all-reduce share.
    pub step_seconds: f64,
    /// Loading the stage's units of every model, and computing (or mapping) its teacher
    /// features.
    #[serde(default)]
    pub load_seconds: f64,
    #[serde(default)]
    pub features_seconds: f64,
    /// Time the stage waited on its pipeline neighbours in the global phase (the bubble, plus
    /// the transfers): against `phase_seconds["global"]`, the measured bubble fraction.
    #[serde(default)]
    pub pipeline_wait_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub job: String,
    pub seed: u64,
    pub n_originals: usize,
    pub n_augmented: usize,
    pub plan: serde_json::Value,
    pub results: Vec<MethodResult>,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    pub total_seconds: f64,
    /// Per-worker measurements (one entry per worker process or embedded worker).
    #[serde(default)]
    pub workers: Vec<WorkerStats>,
}

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

impl Metrics {
    /// The Markdown results table: one row per method, accuracies in percent.
    pub fn markdown(&self, tasks: &[String]) -> String {
        let lm = self
            .results
            .iter()
            .any(|r| !r.per_task_perplexity.is_empty());
        let measure = if lm {
            "test next-token accuracy (%) of each task's head on its own domain's texts"
        } else {
            "test accuracy (%)"
        };
        let mut s = format!(
            "# fsmerge results: {}\n\nseed {}, merge data {} originals + {} augmented per task; {measure}.\n\n",
            self.job, self.seed, self.n_originals, self.n_augmented
        );
        s.push_str("| method | variant |");
        for t in tasks {
            s.push_str(&format!(" {t} |"));
        }
        s.push_str(" mean task | joint | val mean | seconds |\n|---|---|");
        for _ in tasks {
            s.push_str("---:|");
        }
        s.push_str("---:|---:|---:|---:|\n");
        for r in &self.results {
            let variant: Vec<String> = r
                .variant
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    )
                })
                .collect();
            s.push_str(&format!("| {} | {} |", r.method, variant.join(" ")));
            for t in tasks {
                s.push_str(&format!(
                    " {} |",
                    r.per_task_acc
                        .get(t)
                        .map(|&v| pct(v))
                        .unwrap_or_else(|| "–".into())
                ));
            }
            let labeled = !r.per_task_acc.is_empty();
            s.push_str(&format!(
                " {} | {} | {} | {:.1} |\n",
                if labeled {
                    pct(r.mean_task_acc)
                } else {
                    "–".into()
                },
                r.joint_acc.map(pct).unwrap_or_else(|| "–".into()),
                pct(r.val_mean_task_acc),
                r.seconds
            ));
        }
        s.push_str(&self.fidelity_markdown(tasks));
        s.push_str(&self.perplexity_markdown(tasks));
        s.push_str(&format!(
            "\npeak RSS {:.0} MiB, total {:.1} s\n",
            self.peak_rss_mib, self.total_seconds
        ));
        s
    }

    /// The causal LMs' perplexity table: each task's head on each task's test texts (the
    /// mean over the heads on their own domains last); empty for classifiers.
    fn perplexity_markdown(&self, tasks: &[String]) -> String {
        let rows: Vec<&MethodResult> = (self.results.iter())
            .filter(|r| !r.per_task_perplexity.is_empty())
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let mut columns: Vec<String> = (tasks.iter())
            .flat_map(|h| tasks.iter().map(move |d| format!("{h} @ {d}")))
            .collect();
        columns.push("mean own".into());
        let mut s = table_head(
            "Perplexity of each task's head on each task's test texts (`head @ domain`; lower is better; an original has only its own head).",
            &columns,
        );
        for r in rows {
            s.push_str(&format!("| {} |", r.method));
            let at = |h: &String, d: &String| r.per_task_perplexity.get(h)?.get(d).copied();
            for h in tasks {
                for d in tasks {
                    let cell = at(h, d).map_or_else(|| "–".into(), |p| format!("{p:.2}"));
                    s.push_str(&format!(" {cell} |"));
                }
            }
            let mean = r.mean_own_perplexity().unwrap_or(0.0);
            s.push_str(&format!(" {mean:.2} |\n"));
        }
        s
    }

    /// The fidelity table: per task, agreement with the original's predictions (%) and the
    /// relative logit error; empty when no row has them (metrics of older runs).
    fn fidelity_markdown(&self, tasks: &[String]) -> String {
        let rows: Vec<&MethodResult> = (self.results.iter())
            .filter(|r| !r.per_task_fidelity.is_empty())
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let mut columns = tasks.to_vec();
        columns.push("mean".into());
        let mut s = table_head(
            "Fidelity: agreement of each task's head with its original's predictions (%) / relative logit error, on the test inputs (held-out merge inputs for a task without labels).",
            &columns,
        );
        let cell = |f: f64, e: f64| format!("{} / {e:.3}", pct(f));
        for r in rows {
            s.push_str(&format!("| {} |", r.method));
            for t in tasks {
                let c = match (r.per_task_fidelity.get(t), r.per_task_logit_error.get(t)) {
                    (Some(&f), Some(&e)) => cell(f, e),
                    _ => "–".into(),
                };
                s.push_str(&format!(" {c} |"));
            }
            s.push_str(&format!(
                " {} |\n",
                cell(r.mean_fidelity(), mean_of(&r.per_task_logit_error))
            ));
        }
        s
    }
}

/// A results table's caption and header: `| method |` then `columns`, right-aligned.
fn table_head(caption: &str, columns: &[String]) -> String {
    let mut s = format!("\n{caption}\n\n| method |");
    for c in columns {
        s.push_str(&format!(" {c} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(columns.len()));
    s.push('\n');
    s
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(method: &str, ppl: &[(&str, &str, f64)]) -> MethodResult {
        let mut per_task_perplexity: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for &(h, d, p) in ppl {
            per_task_perplexity
                .entry(h.into())
                .or_default()
                .insert(d.into(), p);
        }
        MethodResult {
            method: method.into(),
            variant: BTreeMap::new(),
            per_task_acc: BTreeMap::from([("a".to_string(), 0.5)]),
            mean_task_acc: 0.5,
            joint_acc: None,
            per_task_fidelity: BTreeMap::new(),
            per_task_logit_error: BTreeMap::new(),
            per_task_perplexity,
            val_mean_task_acc: 0.5,
            seconds: 1.0,
        }
    }

    /// Causal LMs get the perplexity matrix (an original only its own head) and say their
    /// accuracy is next-token accuracy; classifiers get neither.
    #[test]
    fn causal_lms_get_a_perplexity_table() {
        let tasks = ["a".to_string(), "b".to_string()];
        let mut m = Metrics {
            job: "j".into(),
            seed: 0,
            n_originals: 1,
            n_augmented: 0,
            plan: serde_json::Value::Null,
            results: vec![
                result("original:a", &[("a", "a", 10.0), ("a", "b", 90.0)]),
                result(
                    "fs-merge",
                    &[
                        ("a", "a", 12.0),
                        ("a", "b", 80.0),
                        ("b", "a", 70.0),
                        ("b", "b", 14.0),
                    ],
                ),
            ],
            peak_rss_mib: 0.0,
            total_seconds: 0.0,
            workers: Vec::new(),
        };
        let md = m.markdown(&tasks);
        assert!(md.contains("next-token accuracy"), "{md}");
        assert!(
            md.contains("| a @ a | a @ b | b @ a | b @ b | mean own |"),
            "{md}"
        );
        assert!(
            md.contains("| original:a | 10.00 | 90.00 | – | – | 10.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| fs-merge | 12.00 | 80.00 | 70.00 | 14.00 | 13.00 |"),
            "{md}"
        );
        for r in &mut m.results {
            r.per_task_perplexity.clear();
        }
        let md = m.markdown(&tasks);
        assert!(
            !md.contains("Perplexity") && md.contains("test accuracy (%)"),
            "{md}"
        );
    }
}
