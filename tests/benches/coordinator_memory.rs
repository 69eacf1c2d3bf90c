//! The coordinator's memory against the models' size (run: `cargo bench -p fsmerge-tests
//! --bench coordinator_memory`): the fmnist ViT job with 2 stages as worker processes, at width
//! 64 and 256 (MLP 2× the width, 4 blocks), every baseline; prints the coordinator's and each
//! worker's peak RSS (VmHWM) and the weights each worker holds. Every `fsmerge` process starts
//! at ~470 MiB resident (the binary links libtorch_cuda), so what matters is the growth between
//! the widths: the target of the redesign is a coordinator that stays flat (it holds no model)
//! while the workers grow with their stages.
//!
//! Sized by `FSMERGE_BENCH_WIDTHS` (default `64,256`); training is one epoch of everything, as
//! only memory is measured.

use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge_bin, launch_config, root};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn run(dir: &Path, width: usize) -> Metrics {
    let out = dir.join(format!("w{width}"));
    let sets = [
        format!(
            "train.models_dir=\"{}\"",
            dir.join(format!("models-{width}")).display()
        ),
        format!("model.vit.width={width}"),
        format!("model.vit.mlp_dim={}", 2 * width),
        "train.epochs=1".into(),
        "merge.epochs=1".into(),
        "merge.global_epochs=1".into(),
        "merge.n_augmented=100".into(),
        "threads=1".into(),
    ];
    let config = root().join("configs/fmnist-vit.toml");
    let set_args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".to_string(), s.clone()])
        .collect();
    // The originals first, so the workers do not wait for the coordinator to train them.
    let trained = Command::new(fsmerge_bin())
        .arg("train")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .args(&set_args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        trained.success(),
        "training the width-{width} originals failed"
    );
    let name = format!("w{width}");
    let config = config.display().to_string();
    let job = launch_config(&config, dir, &name, 2, 1, &set_args, false);
    assert!(
        job.finish(Duration::from_secs(3600)),
        "width {width} failed: {}",
        std::fs::read_to_string(dir.join(format!("{name}.coordinator.log"))).unwrap_or_default()
    );
    read_json(&out.join("metrics.json")).unwrap()
}

fn main() {
    let widths: Vec<usize> = std::env::var("FSMERGE_BENCH_WIDTHS")
        .unwrap_or_else(|_| "64,256".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    println!("| width | models (MB) | coordinator peak RSS (MiB) | workers' peak RSS (MiB) | weights per worker (MB) |");
    println!("|---:|---:|---:|---|---|");
    let mut coordinator = Vec::new();
    for &w in &widths {
        let m = run(dir.path(), w);
        let total: u64 = m.workers.iter().map(|w| w.weight_bytes).sum();
        let rss: Vec<String> = m
            .workers
            .iter()
            .map(|w| format!("{:.0}", w.peak_rss_mib))
            .collect();
        let held: Vec<String> = m
            .workers
            .iter()
            .map(|w| format!("{:.1}", w.weight_bytes as f64 / 1e6))
            .collect();
        println!(
            "| {w} | {:.1} | {:.0} | {} | {} |",
            total as f64 / 1e6,
            m.peak_rss_mib,
            rss.join(" / "),
            held.join(" / ")
        );
        coordinator.push(m.peak_rss_mib);
    }
    if let (Some(first), Some(last)) = (coordinator.first(), coordinator.last()) {
        println!(
            "\ncoordinator growth from width {} to {}: {:+.0} MiB (target: flat; it must hold no model)",
            widths[0],
            widths[widths.len() - 1],
            last - first
        );
    }
}
