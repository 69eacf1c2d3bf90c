//! `fsmerge summarize`: mean and standard deviation of each method's accuracies (and mean
//! fidelity; causal LMs: mean own-domain perplexity) over runs.

use anyhow::{Context, Result};
use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::Metrics;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Per method: mean task accuracies, joint accuracies, per-task accuracies and mean fidelities
/// (one per run that has them).
#[derive(Default)]
struct Collected {
    mean: Vec<f64>,
    joint: Vec<f64>,
    per_task: BTreeMap<String, Vec<f64>>,
    fidelity: Vec<f64>,
    /// Causal LMs: the mean over the method's heads of each head's perplexity on its own
    /// domain.
    perplexity: Vec<f64>,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, s) = mean_std(v);
    format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s)
}

pub fn run(runs: &[PathBuf]) -> Result<()> {
    anyhow::ensure!(
        !runs.is_empty(),
        "summarize needs at least one run directory"
    );
    let mut order: Vec<String> = Vec::new();
    let mut per: BTreeMap<String, Collected> = BTreeMap::new();
    let mut tasks: Vec<String> = Vec::new();
    for dir in runs {
        let m: Metrics = read_json(&dir.join("metrics.json"))
            .with_context(|| format!("run {}", dir.display()))?;
        for r in m.results {
            let key = r.method.clone();
            if !order.contains(&key) {
                order.push(key.clone());
            }
            let e = per.entry(key).or_default();
            if !r.per_task_acc.is_empty() {
                e.mean.push(r.mean_task_acc);
            }
            if !r.per_task_fidelity.is_empty() {
                e.fidelity.push(r.mean_fidelity());
            }
            if let Some(j) = r.joint_acc {
                e.joint.push(j);
            }
            if let Some(p) = r.mean_own_perplexity() {
                e.perplexity.push(p);
            }
            for (t, a) in r.per_task_acc {
                if !tasks.contains(&t) {
                    tasks.push(t.clone());
                }
                e.per_task.entry(t).or_default().push(a);
            }
        }
    }
    let mut s = format!(
        "{} run(s); test accuracy %, mean ± std\n\n| method |",
        runs.len()
    );
    for t in &tasks {
        s.push_str(&format!(" {t} |"));
    }
    let lm = per.values().any(|c| !c.perplexity.is_empty());
    s.push_str(" mean task | joint | mean fidelity |");
    if lm {
        s.push_str(" mean own-domain perplexity |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(tasks.len() + 3 + usize::from(lm)));
    s.push('\n');
    for key in &order {
        let Collected {
            mean,
            joint,
            per_task: pt,
            fidelity,
            perplexity,
        } = &per[key];
        s.push_str(&format!("| {key} |"));
        for t in &tasks {
            s.push_str(&format!(" {} |", pt.get(t).map_or("–".into(), |v| cell(v))));
        }
        s.push_str(&format!(
            " {} | {} | {} |",
            cell(mean),
            cell(joint),
            cell(fidelity)
        ));
        if lm {
            let (m, sd) = mean_std(perplexity);
            s.push_str(&format!(" {m:.2} ± {sd:.2} |"));
        }
        s.push('\n');
    }
    println!("{s}");
    Ok(())
}
