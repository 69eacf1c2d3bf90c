//! End-to-end: the real binary trains the originals on the sklearn digits, merges them with
//! every baseline, and writes a merged model that reproduces the reported accuracy.

use fsmerge_common::checkpoint::{read_json, read_tensors, MergedConfig};
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{digits_config, fast, fsmerge, stderr};
use fsmerge_worker::core::eval::{evaluate, EvalSet};
use fsmerge_worker::core::linear::Linear;
use fsmerge_worker::core::tensor::to_tch;
use fsmerge_worker::data;
use fsmerge_worker::families::mlp::model::MergedModel;

fn run(dir: &std::path::Path, out: &str, extra: &[&str]) -> Metrics {
    let out = dir.join(out);
    let mut args = vec![
        "merge".to_string(),
        digits_config(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(fast(&dir.join("models")));
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    read_json(&out.join("metrics.json")).unwrap()
}

#[test]
fn digits_pipeline_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let m = run(dir.path(), "run", &[]);
    let methods: Vec<&str> = m.results.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "original:digits-0-4",
            "original:digits-5-9",
            "ensemble",
            "first",
            "average",
            "regmean",
            "kd",
            "fs-merge"
        ]
    );
    let get = |name: &str| m.results.iter().find(|r| r.method == name).unwrap();
    for r in &m.results {
        assert!(
            (0.0..=1.0).contains(&r.mean_task_acc),
            "{}: {}",
            r.method,
            r.mean_task_acc
        );
    }
    assert!(get("original:digits-0-4").mean_task_acc > 0.9);
    assert!(get("original:digits-5-9").mean_task_acc > 0.9);
    // `first` reads task 2 through model 1's features; FS-Merge must do much better.
    assert!(
        get("fs-merge").mean_task_acc > get("first").mean_task_acc + 0.1,
        "{:?}",
        get("fs-merge")
    );
    let fs = get("fs-merge");
    for key in ["mode", "mu_type", "rank", "init", "targets"] {
        assert!(fs.variant.contains_key(key), "variant lacks {key}");
    }
    for f in [
        "merged.safetensors",
        "merged.json",
        "results.md",
        "train_log.jsonl",
        "plan.json",
    ] {
        assert!(dir.path().join("run").join(f).exists(), "{f} missing");
    }
    assert!(m.peak_rss_mib > 0.0);
    assert!(
        dir.path().join("models/train_log.jsonl").exists(),
        "originals' training log missing"
    );

    // The merged model on disk reproduces the reported accuracies.
    let cfg: MergedConfig = read_json(&dir.path().join("run/merged.json")).unwrap();
    let mut names = Vec::new();
    for l in 0..cfg.hidden.len() {
        names.push(format!("body.{l}.weight"));
        names.push(format!("body.{l}.bias"));
    }
    for t in &cfg.tasks {
        names.push(format!("heads.{}.weight", t.name));
        names.push(format!("heads.{}.bias", t.name));
    }
    let tensors = read_tensors(&dir.path().join("run/merged.safetensors"), &names).unwrap();
    let lin = |w: &str, b: &str| Linear {
        w: to_tch(&tensors[w]),
        b: to_tch(&tensors[b]),
    };
    let model = MergedModel {
        body: (0..cfg.hidden.len())
            .map(|l| lin(&format!("body.{l}.weight"), &format!("body.{l}.bias")))
            .collect(),
        heads: cfg
            .tasks
            .iter()
            .map(|t| {
                lin(
                    &format!("heads.{}.weight", t.name),
                    &format!("heads.{}.bias", t.name),
                )
            })
            .collect(),
    };
    let mut job =
        fsmerge_common::config::JobConfig::load(std::path::Path::new(&digits_config())).unwrap();
    job.data.path = Some(fsmerge_tests::root().join("data/digits.csv.gz"));
    let splits = data::load(&job.data).unwrap();
    let scores = evaluate(&EvalSet::new(&splits.test, &job.tasks), &|x| {
        model.logits(x)
    });
    assert!((scores.mean() - fs.mean_task_acc).abs() < 1e-9);
    assert!((scores.joint - fs.joint_acc.unwrap()).abs() < 1e-9);

    // Same seed, same machine, same threads: the same numbers.
    let again = run(dir.path(), "run2", &[]);
    for (a, b) in m.results.iter().zip(&again.results) {
        assert_eq!(
            (a.mean_task_acc, a.joint_acc),
            (b.mean_task_acc, b.joint_acc),
            "{} not deterministic",
            a.method
        );
    }
}

/// Phases of a run's train_log.jsonl, in order.
fn phases(run: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in std::fs::read_to_string(run.join("train_log.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let p = v["phase"].as_str().unwrap().to_string();
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Mean loss of the first and last tenth of a phase's steps in a run's train_log.jsonl.
fn loss_ends(run: &std::path::Path, phase: &str) -> (f64, f64) {
    let text = std::fs::read_to_string(run.join("train_log.jsonl")).unwrap();
    let losses: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["phase"].as_str().unwrap() == phase)
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    let tenth = (losses.len() / 10).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (
        mean(&losses[..tenth]),
        mean(&losses[losses.len() - tenth..]),
    )
}

#[test]
fn every_mode_type_and_target_runs() {
    let dir = tempfile::tempdir().unwrap();
    // (overrides, whether the init starts from the originals and must beat chance clearly)
    let combos: [(&[&str], bool); 4] = [
        (
            &[
                "merge.mode=local",
                "merge.mu_type=diagonal",
                "merge.targets=own",
                "merge.init=average",
            ],
            true,
        ),
        (
            &[
                "merge.mode=global",
                "merge.mu_type=full",
                "merge.targets=all",
                "merge.init=first",
            ],
            true,
        ),
        (
            &[
                "merge.mode=global",
                "merge.mu_type=low_rank",
                "merge.rank=64",
                "merge.targets=own",
                "merge.init=random",
            ],
            false,
        ),
        (
            &[
                "merge.mode=local-then-global",
                "merge.mu_type=diagonal_and_low_rank",
                "merge.targets=all",
                "merge.init=random",
            ],
            false,
        ),
    ];
    for (i, (sets, from_originals)) in combos.iter().enumerate() {
        let mut extra = vec!["--set", "baselines.methods=[]"];
        for s in sets.iter() {
            extra.push("--set");
            extra.push(s);
        }
        let m = run(dir.path(), &format!("run{i}"), &extra);
        let fs = m.results.iter().find(|r| r.method == "fs-merge").unwrap();
        assert!(fs.mean_task_acc.is_finite() && fs.joint_acc.unwrap().is_finite());
        if *from_originals {
            assert!(fs.mean_task_acc > 0.5, "{sets:?}: {}", fs.mean_task_acc);
        }
        // Random inits start from chance and need far more steps than a test affords; what
        // must hold is that every phase lowers its loss.
        let run = dir.path().join(format!("run{i}"));
        let phases = phases(&run);
        assert!(!phases.is_empty());
        for phase in phases {
            let (first, last) = loss_ends(&run, &phase);
            assert!(last < first, "{sets:?} {phase}: loss {first} → {last}");
        }
    }
}
