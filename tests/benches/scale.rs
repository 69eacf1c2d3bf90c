//! The scale benchmark (not in CI): N full-size models — ViT-B/16's shape (86 M parameters, 12
//! blocks, width 768, 197 tokens) and BERT-base's (110 M, 128 tokens) — written by
//! `transformers` in shards (`tests/fixtures/make_scale_models.py`, random init, one seed per
//! model, 10 classes each), merged by a coordinator and S worker processes on loopback for a
//! few steps of `local` then `global`, S = 1, 2, 4, with the teacher features in memory and
//! (S = 1) on disk, memory-mapped, and (S = 1) with the originals and features in bf16.
//!
//! Run: `cargo bench -p fsmerge-tests --bench scale`. Sized by `FSMERGE_SCALE_RUNS`
//! (`vit:1,vit:2,vit:4,vit:1:disk,vit:1:memory:bf16,bert:1,bert:4`: family, stages, where the
//! features live, `merge.precision`, and `ckpt` for `merge.checkpoint_activations`),
//! `FSMERGE_SCALE_MODELS` (8), `FSMERGE_SCALE_INPUTS` (merge inputs per task, 4: on 2 cores the
//! teacher pass of 8 ViT-B/16s over 8 × 4 images takes ~2.5 min, so the 64 per task is
//! for a bigger machine), `FSMERGE_SCALE_DIR` (keep the fixtures there between runs; default: a
//! temporary folder).
//!
//! Per run it prints, per worker: peak RSS (VmHWM, which counts mapped file pages a batch
//! touched) and the peak of its own (anonymous) memory, sampled every 100 ms, both above an
//! idle `fsmerge` worker's, against the target 1.2 × (the stage's weights of every model + its
//! features in memory); load and teacher-feature time; step time per phase; the global phase's
//! pipeline wait (the bubble fraction measured); the all-reduce share; and the coordinator's
//! peak RSS.

use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge_bin, python_fixture, root, spawn_worker};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(key: &str, default: &str) -> Vec<String> {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A field of /proc/<pid>/status in MiB (0 once the process is gone).
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident memory of an idle worker process (libtorch loaded, waiting for a rendezvous that
/// never comes), MiB.
fn idle_worker_mib(dir: &Path) -> f64 {
    let mut w = Command::new(fsmerge_bin())
        .args(["worker", "--rank", "0", "--wait", "30", "--rendezvous"])
        .arg(dir.join("nobody/rendezvous.json"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let rss = status_mib(w.id(), "VmRSS:");
    let _ = w.kill();
    let _ = w.wait();
    rss
}

/// The fixture and config of `family`: N models, `inputs` merge inputs per task.
fn fixture(base: &Path, family: &str, n: usize, inputs: usize) -> PathBuf {
    let dir = base.join(format!("{family}-{n}x{inputs}"));
    if !dir.join("models").exists() {
        let clock = Instant::now();
        let out = python_fixture(
            "make_scale_models.py",
            &[
                &dir,
                Path::new(family),
                Path::new(&n.to_string()),
                Path::new(&inputs.to_string()),
            ],
        );
        print!("{out}");
        println!(
            "fixture: {n} {family} checkpoints in {:.0} s",
            clock.elapsed().as_secs_f64()
        );
    }
    let mut text = format!("name = \"scale-{family}\"\n");
    for k in 0..n {
        let m = dir.join(format!("models/m{k}"));
        let d = dir.join(format!("data/m{k}"));
        let data = match family {
            "vit" => format!(
                "{{ format = \"imagefolder\", path = \"{}\" }}",
                d.join("merge").display()
            ),
            _ => format!(
                "{{ format = \"jsonl\", path = \"{}\" }}",
                d.join("merge.jsonl").display()
            ),
        };
        text += &format!(
            "[[models]]\npath = \"{}\"\nmerge_data = {data}\n",
            m.display()
        );
    }
    text += &format!(
        "[data]\nmax_tokens = 128\n[merge]\nmode = \"local-then-global\"\nepochs = 1\nglobal_epochs = 1\n\
         batch_size = 16\nn_originals = {inputs}\nn_augmented = 0\n[baselines]\nmethods = []\n"
    );
    let config = dir.join("scale.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// One run: the coordinator and `stages` worker processes (one thread each); returns the
/// metrics, each worker's sampled peak anonymous memory (MiB) and the wall time.
fn run(
    config: &Path,
    out: &Path,
    stages: usize,
    (features, precision, checkpoint): (&str, &str, bool),
    threads: usize,
) -> (Metrics, Vec<f64>, f64) {
    let work = PathBuf::from(format!("{}.work", out.display()));
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(&work);
    let rdv = work.join("rendezvous.json");
    let sets = [
        format!("cluster.stages={stages}"),
        format!("merge.features=\"{features}\""),
        format!("merge.precision=\"{precision}\""),
        format!("merge.checkpoint_activations={checkpoint}"),
        format!("cluster.worker_threads={threads}"),
        "cluster.micro_batches=4".to_string(),
    ];
    let clock = Instant::now();
    let mut coordinator = Command::new(fsmerge_bin())
        .args(["coordinator"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--out"])
        .arg(out)
        .args(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]))
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut workers: Vec<Child> = (0..stages).map(|r| spawn_worker(&rdv, r)).collect();
    let mut anon = vec![0.0f64; stages];
    let status = loop {
        for (w, peak) in workers.iter().zip(&mut anon) {
            *peak = peak.max(status_mib(w.id(), "RssAnon:"));
        }
        if let Some(s) = coordinator.try_wait().unwrap() {
            break s;
        }
        assert!(
            clock.elapsed() < Duration::from_secs(3600),
            "the run did not finish within an hour"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for w in &mut workers {
        let _ = w.wait();
    }
    assert!(status.success(), "{} failed", out.display());
    let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
    (m, anon, clock.elapsed().as_secs_f64())
}

/// Floats per input of one model's stream between blocks.
fn stream_floats(family: &str) -> f64 {
    match family {
        "vit" => 197.0 * 768.0,
        _ => 128.0 * 768.0,
    }
}

/// The runs `FSMERGE_SCALE_RUNS` lists, `family:stages[:features[:precision[:ckpt]]]` each.
fn runs() -> Vec<(String, usize, String, String, bool)> {
    env_list(
        "FSMERGE_SCALE_RUNS",
        "vit:1,vit:2,vit:4,vit:1:disk,vit:1:memory:bf16,bert:1,bert:4",
    )
    .iter()
    .map(|r| {
        let f: Vec<&str> = r.split(':').collect();
        let stages = f.get(1).and_then(|s| s.parse().ok());
        match (f.first(), stages) {
            (Some(&family @ ("vit" | "bert")), Some(stages)) => (
                family.to_string(),
                stages,
                f.get(2).unwrap_or(&"memory").to_string(),
                f.get(3).unwrap_or(&"fp32").to_string(),
                f.get(4) == Some(&"ckpt"),
            ),
            _ => panic!(
                "FSMERGE_SCALE_RUNS: `{r}` is not family:stages[:memory|disk[:fp32|bf16|fp16[:ckpt]]]"
            ),
        }
    })
    .collect()
}

fn main() {
    let n: usize = env_or("FSMERGE_SCALE_MODELS", 8);
    let inputs: usize = env_or("FSMERGE_SCALE_INPUTS", 4);
    let tmp = tempfile::tempdir().unwrap();
    let base = std::env::var("FSMERGE_SCALE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let idle = idle_worker_mib(&base);
    println!("idle worker process: {idle:.0} MiB resident; {n} models, {inputs} merge inputs per task, local then global (1 epoch each, batch 16)");
    let mib = (1u64 << 20) as f64;
    for (family, stages, features, precision, checkpoint) in runs() {
        let config = fixture(&base, &family, n, inputs);
        let rows = (n * inputs) as f64;
        let ckpt = if checkpoint { "-ckpt" } else { "" };
        let name = format!("{family}-s{stages}-{features}-{precision}{ckpt}");
        let threads = (2 / stages).max(1);
        let at = (features.as_str(), precision.as_str(), checkpoint);
        let (m, anon, wall) = run(&config, &base.join(&name), stages, at, threads);
        let value_bytes = if precision == "fp32" { 4.0 } else { 2.0 };
        let plan_stages = m.plan["stages"].as_array().cloned().unwrap_or_default();
        println!(
            "\n### {n} × {family}, S = {stages}, features in {features}, {precision}{ckpt}: {wall:.0} s wall, coordinator peak RSS {:.0} MiB",
            m.peak_rss_mib
        );
        for (w, anon) in m.workers.iter().zip(&anon) {
            let units = &plan_stages[w.stage as usize]["units"];
            let boundaries = units["end"].as_u64().unwrap_or(0) as f64
                - units["start"].as_u64().unwrap_or(0) as f64
                + 1.0;
            let feats = match features.as_str() {
                "memory" => {
                    boundaries * n as f64 * rows * stream_floats(&family) * value_bytes / mib
                }
                _ => 0.0,
            };
            let weights = w.weight_bytes as f64 / mib;
            let target = 1.2 * (weights + feats);
            let step = |p: &str| {
                w.phase_seconds.get(p).copied().unwrap_or(0.0)
                    / w.phase_steps.get(p).copied().unwrap_or(1).max(1) as f64
            };
            let global = w.phase_seconds.get("global").copied().unwrap_or(0.0);
            println!(
                "stage {}: weights {weights:.0} MiB + features in memory {feats:.0} MiB → target ≤ {target:.0} MiB; \
                 above idle: peak RSS {:.0} MiB ({:.2} × target), own memory {:.0} MiB ({:.2} ×); \
                 load {:.1} s, features {:.1} s; step local {:.1} s, global {:.1} s; \
                 pipeline wait {:.0}% of global; all-reduce {:.1}% of steps",
                w.stage,
                w.peak_rss_mib - idle,
                (w.peak_rss_mib - idle) / target,
                anon - idle,
                (anon - idle) / target,
                w.load_seconds,
                w.features_seconds,
                step("local"),
                step("global"),
                100.0 * w.pipeline_wait_seconds / global.max(1e-9),
                100.0 * w.allreduce_seconds / w.step_seconds.max(1e-9),
            );
        }
    }
}
