//! The coordinator holds no model: a ViT job with 2 stages as worker processes (two 28 MB
//! models: width 384, MLP 1536, 4 blocks) leaves the coordinator's peak RSS within 64 MiB of
//! what any `fsmerge` process holds once libtorch is loaded (`fsmerge doctor`'s peak). Before
//! the redesign it was +254 MiB here; the benchmark `coordinator_memory` shows it flat across
//! widths.

use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge, launch_config, root, stderr};
use std::time::Duration;

/// `fsmerge doctor`'s own peak RSS (MiB): the baseline of every fsmerge process.
fn baseline_rss_mib() -> f64 {
    let o = fsmerge(&["doctor"]);
    assert!(o.status.success(), "doctor failed: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix("peak RSS: "))
        .and_then(|v| v.trim_end_matches(" MiB").parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in doctor's output: {out}"))
}

#[test]
fn coordinator_of_a_two_stage_vit_job_holds_no_model() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let config = root().join("configs/digits-vit.toml").display().to_string();
    let sets: Vec<String> = [
        format!("train.models_dir=\"{}\"", models.display()),
        "model.vit.width=384".into(),
        "model.vit.mlp_dim=1536".into(),
        "model.vit.layers=4".into(),
        "train.epochs=1".into(),
        "merge.epochs=1".into(),
        "merge.global_epochs=1".into(),
        "merge.n_originals=100".into(),
        "merge.n_augmented=0".into(),
        "threads=1".into(),
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.clone()])
    .collect();
    let mut train = vec!["train", config.as_str()];
    train.extend(sets.iter().map(String::as_str));
    let o = fsmerge(&train);
    assert!(
        o.status.success(),
        "training the originals failed: {}",
        stderr(&o)
    );

    let job = launch_config(&config, dir.path(), "vit", 2, 1, &sets, false);
    let log = job.log.clone();
    let out = job.out.clone();
    assert!(
        job.finish(Duration::from_secs(900)),
        "the job failed: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
    let weights: u64 = m.workers.iter().map(|w| w.weight_bytes).sum();
    assert!(
        weights > 50_000_000,
        "the models are {weights} bytes, not 2 × 28 MB"
    );
    let base = baseline_rss_mib();
    let growth = m.peak_rss_mib - base;
    eprintln!(
        "coordinator peak RSS {:.0} MiB = doctor's {base:.0} MiB {growth:+.0} MiB; workers {:?} MiB; weights {:.1} MB",
        m.peak_rss_mib,
        m.workers.iter().map(|w| w.peak_rss_mib.round()).collect::<Vec<_>>(),
        weights as f64 / 1e6
    );
    assert!(
        growth < 64.0,
        "coordinator peak RSS {:.0} MiB = baseline {base:.0} + {growth:.0} MiB (limit +64)",
        m.peak_rss_mib
    );
    assert!(out.join("merged/model.safetensors").exists());
}
