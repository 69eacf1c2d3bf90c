//! Distributed-runtime benchmarks, measured side by side in one run with the real binary and
//! real worker processes on loopback (run: `cargo bench -p fsmerge-tests --bench distributed`):
//!
//! 1. the `local` training phase with 2 workers (2 stages, one thread each) against 1 worker
//!    (one thread), same job: wall-time ratio (target ≤ 0.6);
//! 2. the same with 2 replicas (1 stage) against 1 worker (target: faster), and the
//!    all-reduce's share of the step time with 2 replicas (target < 10%);
//! 3. peak RSS per worker with 2 stages against the single-process run's peak, and the share of
//!    the original weights each worker holds (target ≤ 0.6).
//!
//! The job: Fashion-MNIST halves, MLPs 784-256-256-256-256 (four layers, so two stages can be
//! balanced), `local` mode. `FSMERGE_BENCH_EPOCHS` (default 20) and `FSMERGE_BENCH_ROUNDS`
//! (default 2; the best round of each setting is reported) size it.

use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge_bin, root, spawn_worker, wait_for};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sets(dir: &Path, epochs: usize, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        format!("train.models_dir=\"{}\"", dir.join("models").display()),
        "model.hidden=[256,256,256,256]".into(),
        "merge.mode=\"local\"".into(),
        format!("merge.epochs={epochs}"),
        "baselines.methods=[]".into(),
        "threads=1".into(),
        "cluster.worker_threads=1".into(),
    ];
    v.extend(extra.iter().cloned());
    v.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

fn config() -> String {
    root().join("configs/fmnist-mlp.toml").display().to_string()
}

/// Run the job with `stages × replicas` worker processes; returns its metrics.
fn distributed(dir: &Path, name: &str, stages: usize, replicas: usize, epochs: usize) -> Metrics {
    let out = dir.join(name);
    let rdv = dir.join(format!("{name}.work/rendezvous.json"));
    let extra = [
        format!("cluster.stages={stages}"),
        format!("cluster.replicas={replicas}"),
    ];
    let mut coordinator = Command::new(fsmerge_bin())
        .args(["coordinator", &config(), "--listen", "127.0.0.1:0", "--out"])
        .arg(&out)
        .args(sets(dir, epochs, &extra))
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut workers: Vec<_> = (0..stages * replicas)
        .map(|r| spawn_worker(&rdv, r))
        .collect();
    let ok = wait_for(&mut coordinator, Duration::from_secs(1800), "coordinator").success();
    for w in &mut workers {
        wait_for(w, Duration::from_secs(60), "worker");
    }
    assert!(ok, "{name} failed");
    read_json(&out.join("metrics.json")).unwrap()
}

fn local_seconds(m: &Metrics) -> f64 {
    m.workers
        .iter()
        .map(|w| w.phase_seconds["local"])
        .fold(0.0, f64::max)
}

fn main() {
    let epochs = env_or("FSMERGE_BENCH_EPOCHS", 20);
    let rounds = env_or("FSMERGE_BENCH_ROUNDS", 2);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Originals (and the single-process reference run for memory).
    let o = Command::new(fsmerge_bin())
        .args(["merge", &config(), "--out"])
        .arg(dir.join("single"))
        .args(sets(dir, epochs, &[]))
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(o.success());
    let single: Metrics = read_json(&dir.join("single/metrics.json")).unwrap();

    let (mut one, mut two, mut share) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut two_replicas = f64::INFINITY;
    let mut two_stage = None;
    for round in 0..rounds {
        let a = distributed(dir, &format!("one-{round}"), 1, 1, epochs);
        let b = distributed(dir, &format!("two-{round}"), 2, 1, epochs);
        let c = distributed(dir, &format!("replicas-{round}"), 1, 2, epochs);
        one = one.min(local_seconds(&a));
        two = two.min(local_seconds(&b));
        two_replicas = two_replicas.min(local_seconds(&c));
        let s = c
            .workers
            .iter()
            .map(|w| w.allreduce_seconds / w.phase_seconds["local"])
            .fold(0.0, f64::max);
        share = share.min(s);
        let per = |m: &Metrics| {
            m.workers
                .iter()
                .map(|w| format!("{:.2}", w.phase_seconds["local"]))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let w = &c.workers[0];
        println!(
            "round {round}: local phase 1 worker {} s, 2 stages {} s, 2 replicas {} s; all-reduce share {:.1}% ({} calls, {:.2} ms each)",
            per(&a),
            per(&b),
            per(&c),
            100.0 * s,
            w.allreduce_calls,
            1e3 * w.allreduce_seconds / w.allreduce_calls.max(1) as f64
        );
        two_stage = Some(b);
    }
    println!("\n## distributed runtime, {epochs} local epochs, best of {rounds} round(s)");
    println!(
        "local phase: 1 worker {one:.2} s, 2 workers (2 stages) {two:.2} s → ratio {:.2} (target ≤ 0.60)",
        two / one
    );
    println!(
        "local phase: 1 worker {one:.2} s, 2 replicas {two_replicas:.2} s → ratio {:.2} (target < 1)",
        two_replicas / one
    );
    println!(
        "all-reduce share of the step time, 2 replicas: {:.1}% (target < 10%)",
        100.0 * share
    );
    let b = two_stage.expect("at least one round");
    let total_weights: u64 = b.workers.iter().map(|w| w.weight_bytes).sum();
    for w in &b.workers {
        println!(
            "worker rank {} (stage {}): peak RSS {:.0} MiB = {:.2} × the single-process peak {:.0} MiB; holds {:.2} MB of weights = {:.2} of the models' (target ≤ 0.60)",
            w.rank,
            w.stage,
            w.peak_rss_mib,
            w.peak_rss_mib / single.peak_rss_mib,
            single.peak_rss_mib,
            w.weight_bytes as f64 / 1e6,
            w.weight_bytes as f64 / total_weights as f64
        );
    }
}
