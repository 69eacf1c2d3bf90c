//! Helpers for the cross-crate integration tests: run the real `fsmerge` binary on the small
//! digits job in a temporary directory.

pub mod fuzz;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (configs/ and data/ live there).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `fsmerge` binary of the same profile as the running test (cargo builds the workspace's
/// binaries before its tests).
pub fn fsmerge_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/fsmerge
    exe.parent()
        .and_then(Path::parent)
        .map(|p| p.join("fsmerge"))
        .unwrap_or_default()
}

/// Run `fsmerge ARGS` in the workspace root (so config-relative data paths resolve).
pub fn fsmerge(args: &[&str]) -> Output {
    Command::new(fsmerge_bin())
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", fsmerge_bin().display()))
}

/// Run `tests/fixtures/<script>` with the venv's Python (transformers installed by setup); panics
/// with its output unless it succeeds; returns its stdout.
pub fn python_fixture(script: &str, args: &[&Path]) -> String {
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/fixtures").join(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{script} failed: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The digits config, absolute path.
pub fn digits_config() -> String {
    root().join("configs/digits-mlp.toml").display().to_string()
}

/// Overrides that make the digits job fast and keep its originals in `models`.
pub fn fast(models: &Path) -> Vec<String> {
    [
        format!("train.models_dir=\"{}\"", models.display()),
        "merge.epochs=20".into(),
        "merge.global_epochs=20".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// Largest relative difference (max |a−b| / max |b|) over the tensors of two merged models.
/// Largest difference between the tensors of two merged outputs (an MLP's `merged.safetensors`
/// or an HF folder's `model.safetensors`), relative to each tensor's largest magnitude.
pub fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    use fsmerge_common::checkpoint::{read_json, read_tensors, MergedConfig};
    let names = |p: &Path| -> Vec<String> {
        let merged_json = p.with_file_name("merged.json");
        if !merged_json.exists() {
            // An HF model folder: every tensor of its model.safetensors.
            let dir = p.parent().unwrap();
            let files = fsmerge_common::hf::WeightFiles::open(dir).unwrap();
            return files.map.into_keys().collect();
        }
        let cfg: MergedConfig = read_json(&merged_json).unwrap();
        let mut n: Vec<String> = (0..cfg.hidden.len())
            .flat_map(|l| {
                [
                    fsmerge_common::checkpoint::body_weight(l),
                    fsmerge_common::checkpoint::body_bias(l),
                ]
            })
            .collect();
        for t in &cfg.tasks {
            n.push(fsmerge_common::checkpoint::head_weight(Some(&t.name)));
            n.push(fsmerge_common::checkpoint::head_bias(Some(&t.name)));
        }
        n
    };
    let ta = read_tensors(a, &names(a)).unwrap();
    let tb = read_tensors(b, &names(b)).unwrap();
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .map(|(k, x)| {
            let y = &tb[k];
            assert_eq!(x.shape, y.shape, "{k}");
            let diff = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            let scale = y.data.iter().map(|q| q.abs()).fold(1e-12f32, f32::max);
            (diff / scale) as f64
        })
        .fold(0.0, f64::max)
}

/// A coordinator and its worker processes on loopback.
pub struct Launched {
    pub coordinator: std::process::Child,
    pub workers: Vec<std::process::Child>,
    /// The coordinator's stderr (log) file.
    pub log: PathBuf,
    pub out: PathBuf,
}

/// Start `fsmerge coordinator` on the digits config with `stages × replicas` workers, each a
/// process of its own (`fsmerge worker --rendezvous …`), logs in `dir`.
pub fn launch(
    dir: &Path,
    name: &str,
    stages: usize,
    replicas: usize,
    sets: &[String],
    resume: bool,
) -> Launched {
    launch_config(&digits_config(), dir, name, stages, replicas, sets, resume)
}

/// `launch` for the job config `config`.
pub fn launch_config(
    config: &str,
    dir: &Path,
    name: &str,
    stages: usize,
    replicas: usize,
    sets: &[String],
    resume: bool,
) -> Launched {
    launch_job(config, dir, name, (stages, replicas), sets, resume, None)
}

/// `launch` with the environment variable `fault.1 = fault.2` set for worker rank `fault.0`
/// only (an injected fault).
pub fn launch_with_fault(
    dir: &Path,
    name: &str,
    (stages, replicas): (usize, usize),
    sets: &[String],
    fault: (usize, &str, &str),
) -> Launched {
    let config = digits_config();
    launch_job(
        &config,
        dir,
        name,
        (stages, replicas),
        sets,
        false,
        Some(fault),
    )
}

fn launch_job(
    config: &str,
    dir: &Path,
    name: &str,
    (stages, replicas): (usize, usize),
    sets: &[String],
    resume: bool,
    fault: Option<(usize, &str, &str)>,
) -> Launched {
    use std::fs::File;
    use std::process::Stdio;
    let out = dir.join(name);
    let log = dir.join(format!("{name}.coordinator.log"));
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        config.to_string(),
        "--out".into(),
        out.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--set".into(),
        format!("cluster.stages={stages}"),
        "--set".into(),
        format!("cluster.replicas={replicas}"),
    ];
    if resume {
        args.push("--resume".into());
    }
    args.extend(sets.iter().cloned());
    let rendezvous = dir.join(format!("{name}.work/rendezvous.json"));
    let _ = std::fs::remove_file(&rendezvous);
    let coordinator = Command::new(fsmerge_bin())
        .args(&args)
        .current_dir(root())
        .env("RUST_LOG", "info")
        .env_remove("FSMERGE_TOKEN")
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let workers = (0..stages * replicas)
        .map(|r| {
            let mut worker = Command::new(fsmerge_bin());
            if let Some((_, key, value)) = fault.filter(|f| f.0 == r) {
                worker.env(key, value);
            }
            worker
                .args([
                    "worker",
                    "--rendezvous",
                    &rendezvous.display().to_string(),
                    "--rank",
                    &r.to_string(),
                    "--wait",
                    "60",
                ])
                .current_dir(root())
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(File::create(dir.join(format!("{name}.worker{r}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    Launched {
        coordinator,
        workers,
        log,
        out,
    }
}

/// A quiet `fsmerge worker` process of rank `rank`, waiting up to 10 min for the rendezvous
/// file `rendezvous` (the benchmarks' workers).
pub fn spawn_worker(rendezvous: &Path, rank: usize) -> std::process::Child {
    Command::new(fsmerge_bin())
        .args(["worker", "--rank", &rank.to_string(), "--wait", "600"])
        .arg("--rendezvous")
        .arg(rendezvous)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

/// Wait for a child up to `limit`; kill it and panic past that (tests never hang).
pub fn wait_for(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl Launched {
    /// Wait for the coordinator and every worker; returns whether all of them succeeded.
    pub fn finish(mut self, limit: std::time::Duration) -> bool {
        let mut ok = wait_for(&mut self.coordinator, limit, "the coordinator").success();
        for (r, w) in self.workers.iter_mut().enumerate() {
            ok &= wait_for(
                w,
                std::time::Duration::from_secs(30),
                &format!("worker {r}"),
            )
            .success();
        }
        ok
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Every result row's method with its mean-task and joint accuracy to two decimals (what two
/// runs that should agree are compared on).
pub fn scores(m: &fsmerge_common::metrics::Metrics) -> Vec<(String, String, String)> {
    m.results
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                format!("{:.2}", 100.0 * r.mean_task_acc),
                format!("{:.2}", 100.0 * r.joint_acc.unwrap_or(0.0)),
            )
        })
        .collect()
}

/// The test split of the job that ran into `out` (its `config.json`), read as the job read
/// it (data and vocabulary from the repository).
pub fn job_test_split(out: &Path) -> fsmerge_worker::core::eval::EvalSet {
    let cfg: fsmerge_common::config::JobConfig =
        fsmerge_common::checkpoint::read_json(&out.join("config.json")).unwrap();
    let mut data_cfg = cfg.data.clone();
    data_cfg.path = Some(root().join("data"));
    data_cfg.vocab = root().join(&cfg.data.vocab);
    let splits = fsmerge_worker::data::load(&data_cfg).unwrap();
    fsmerge_worker::core::eval::EvalSet::new(&splits.test, &cfg.tasks)
}
