//! Hostile or careless input fed to the real binary: each case is one clean error naming the
//! file, tensor or field, a non-zero exit, no hang, and nothing written outside the models.

use fsmerge_common::checkpoint::{read_tensors, tensor_names, write_tensors};
use fsmerge_tests::{digits_config, fsmerge, root, stderr};
use fsmerge_worker::families::vit::model::Vit;
use std::path::Path;
use std::process::Output;

const TASKS: [&str; 2] = ["digits-0-4", "digits-5-9"];

/// Two random (untrained) digits ViTs, one per task of `configs/digits-vit.toml`.
fn vit_models(models: &Path) {
    let shape = fsmerge_common::config::VitShape {
        patch_size: 4,
        width: 32,
        layers: 2,
        heads: 4,
        mlp_dim: 64,
    };
    let cfg = fsmerge_common::hf::VitConfig::for_images(&shape, 8);
    let labels: Vec<String> = (0..5).map(|c| format!("{c}")).collect();
    for task in TASKS {
        Vit::init(cfg.clone(), 5)
            .save(&models.join(task), &labels)
            .unwrap();
    }
}

/// `fsmerge merge` of the digits ViT job on `models` into `<dir>/run`, expected to fail
/// without leaving an output; returns its stderr.
fn vit_merge_fails(dir: &Path, models: &Path, extra: &[&str]) -> String {
    let run = dir.join("run");
    let mut args = vec![
        "merge".to_string(),
        root().join("configs/digits-vit.toml").display().to_string(),
        "--out".into(),
        run.display().to_string(),
        "--set".into(),
        format!("train.models_dir=\"{}\"", models.display()),
        "--set".into(),
        "merge.epochs=1".into(),
        "--set".into(),
        "merge.global_epochs=1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run_bounded(&args);
    assert!(!o.status.success(), "the merge should have failed");
    assert!(!run.exists(), "a failed job left {}", run.display());
    stderr(&o)
}

/// A plan that does not fit `cluster.memory_gb` fails before any work, naming the stage and
/// the missing GB; `fsmerge check` says the same. (The estimate's floor is an idle process's
/// 0.46 GB, so 0.3 GB fits no stage.)
#[test]
fn a_plan_over_the_memory_budget_fails_up_front_naming_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    vit_models(&models);
    let budget = [
        "--set",
        "cluster.memory_gb=0.3",
        "--set",
        "cluster.stages=2",
    ];
    let e = vit_merge_fails(dir.path(), &models, &budget);
    for want in [
        "stage 0 (units 0..",
        "cluster.memory_gb` = 0.3",
        "GB missing",
    ] {
        assert!(e.contains(want), "`{want}` not in: {e}");
    }
    assert!(!e.contains("worker rank"), "workers started: {e}");
    let config = root().join("configs/digits-vit.toml").display().to_string();
    let models_dir = format!("train.models_dir=\"{}\"", models.display());
    let check =
        |extra: &[&str]| fsmerge(&[&["check", &config, "--set", &models_dir][..], extra].concat());
    let o = check(&budget);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("GB missing"), "{}", stderr(&o));
    // A budget the estimate fits passes; one out of range is named.
    let o = check(&["--set", "cluster.memory_gb=4", "--set", "cluster.stages=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(in memory)"), "{}", stdout(&o));
    // A budget that fits only without the teacher features in memory (470 MiB of process,
    // 0.1 MiB of weights, 1.5–2.2 MiB of features per stage) sends them to disk, mapped.
    let o = check(&[
        "--set",
        "cluster.memory_gb=0.46",
        "--set",
        "cluster.stages=2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).matches("(on disk, memory-mapped)").count(),
        2,
        "{}",
        stdout(&o)
    );
    let e = vit_merge_fails(dir.path(), &models, &["--set", "cluster.memory_gb=1e9"]);
    assert!(e.contains("cluster.memory_gb"), "{e}");
}

/// With `cluster.memory_gb`, stages are cut so that each fits when the compute-balanced cut
/// does not. A digits MLP 2048-64-64-64 (2 models, 500 merge rows, features counted in memory,
/// each boundary 8 MB by the widest layer): by compute, layer 0 alone is stage 0 and stage 1
/// holds 4 boundaries (≈ 510 MiB estimated); cut 0..2 | 2..4 both stages need ≈ 500–502 MiB.
#[test]
fn a_memory_budget_moves_the_stage_cut() {
    let dir = tempfile::tempdir().unwrap();
    let models = format!(
        "train.models_dir=\"{}\"",
        dir.path().join("models").display()
    );
    let config = digits_config();
    let sets = [
        "--set",
        &models,
        "--set",
        "model.hidden=[2048,64,64,64]",
        "--set",
        "cluster.stages=2",
        "--set",
        "merge.features=\"memory\"",
    ];
    let o = fsmerge(&[&["train", &config][..], &sets].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let check = |extra: &[&str]| fsmerge(&[&["check", &config][..], &sets, extra].concat());
    let o = check(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("stage 0: units 0..1,"),
        "{}",
        stdout(&o)
    );
    let o = check(&["--set", "cluster.memory_gb=0.4932"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("stage 0: units 0..2,"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("stage 1: units 2..4,"),
        "{}",
        stdout(&o)
    );
    // Tighter than any cut: the compute-balanced plan's stage is named.
    let o = check(&["--set", "cluster.memory_gb=0.47"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("GB missing"), "{}", stderr(&o));
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run the binary, killed after 120 s: an input that hangs it fails the test.
fn run_bounded(args: &[String]) -> Output {
    let mut child = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status =
        fsmerge_tests::wait_for(&mut child, std::time::Duration::from_secs(120), "fsmerge");
    let mut o = child.wait_with_output().unwrap();
    o.status = status;
    o
}

/// Give model `task` an index naming `shard` for every tensor (the names of the other task's
/// model, which has the same).
fn index_naming(models: &Path, task: &str, shard: &str) {
    let dir = models.join(task);
    let names = tensor_names(&models.join(TASKS[0]).join("model.safetensors")).unwrap();
    let map: serde_json::Map<String, serde_json::Value> =
        names.into_iter().map(|n| (n, shard.into())).collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
}

#[test]
fn shards_outside_the_model_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    vit_models(&models);
    // A real model outside the folder, reached by `..` or by an absolute path.
    let outside = dir.path().join("x");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::rename(
        models.join("digits-5-9/model.safetensors"),
        outside.join("model.safetensors"),
    )
    .unwrap();
    for shard in [
        "../../x/model.safetensors".to_string(),
        outside.join("model.safetensors").display().to_string(),
    ] {
        index_naming(&models, "digits-5-9", &shard);
        let e = vit_merge_fails(dir.path(), &models, &[]);
        assert!(
            e.contains("model.safetensors.index.json") && e.contains("not a file name inside"),
            "{shard}: {e}"
        );
    }
}

#[test]
fn a_fifo_shard_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    vit_models(&models);
    let fifo = models.join("digits-5-9/model-00001-of-00001.safetensors");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::remove_file(models.join("digits-5-9/model.safetensors")).unwrap();
    index_naming(&models, "digits-5-9", "model-00001-of-00001.safetensors");
    let e = vit_merge_fails(dir.path(), &models, &[]);
    assert!(
        e.contains("model-00001-of-00001.safetensors") && e.contains("not a regular file"),
        "{e}"
    );
}

#[test]
fn a_non_finite_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    vit_models(&models);
    let file = models.join("digits-0-4/model.safetensors");
    let names = tensor_names(&file).unwrap();
    let mut tensors = read_tensors(&file, &names).unwrap();
    let name = "vit.encoder.layer.1.output.dense.weight";
    tensors.get_mut(name).unwrap().data[3] = f32::NAN;
    write_tensors(&file, &tensors).unwrap();
    let e = vit_merge_fails(dir.path(), &models, &[]);
    assert!(
        e.contains(name) && e.contains("non-finite") && !e.contains("learning rate"),
        "{e}"
    );
}

#[test]
fn counts_durations_and_names_out_of_range_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    vit_models(&models);
    for (set, field) in [
        ("merge.epochs=0", "merge.epochs"),
        ("merge.n_augmented=1000000000", "merge.n_augmented"),
        ("cluster.heartbeat_secs=1e300", "cluster.heartbeat_secs"),
        ("cluster.heartbeat_secs=1e-9", "cluster.heartbeat_secs"),
        (
            "cluster.register_timeout_secs=1e19",
            "cluster.register_timeout_secs",
        ),
        ("threads=100000", "threads"),
        ("model.vit.width=0", "model.vit.width"),
        ("model.vit.mlp_dim=0", "model.vit.mlp_dim"),
    ] {
        let e = vit_merge_fails(dir.path(), &models, &["--set", set]);
        assert!(e.contains(field), "{set}: {e}");
    }
}

#[test]
fn a_task_named_dotdot_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("a/models");
    let config = dir.path().join("dotdot.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(digits_config()).unwrap().replacen(
            "name = \"digits-0-4\"",
            "name = \"..\"",
            1,
        ),
    )
    .unwrap();
    let o = fsmerge(&[
        "train",
        &config.display().to_string(),
        "--set",
        &format!("train.models_dir=\"{}\"", models.display()),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("tasks[0].name"), "{e}");
    assert!(
        !dir.path().join("a").exists(),
        "train wrote {:?}",
        dir.path()
    );
}

#[test]
fn worker_wait_out_of_range_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let rendezvous = dir.path().join("rendezvous.json").display().to_string();
    for wait in ["NaN", "-1", "1e300"] {
        let o = fsmerge(&[
            "worker",
            "--rendezvous",
            &rendezvous,
            &format!("--wait={wait}"),
        ]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("--wait"), "{wait}: {e}");
    }
}

#[test]
fn a_zero_width_mlp_layer_is_refused_by_train() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let o = fsmerge(&[
        "train",
        &digits_config(),
        "--set",
        &format!("train.models_dir=\"{}\"", models.display()),
        "--set",
        "model.hidden=[64, 0]",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("model.hidden"), "{e}");
    assert!(!models.exists(), "train wrote {}", models.display());
}

#[test]
fn a_huge_slurm_node_list_is_refused_not_expanded() {
    let o = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .args(["worker", "--wait=1"])
        .current_dir(root())
        .env("SLURM_JOB_NODELIST", "gpu[0-99999999999]")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_PROCID", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("SLURM_JOB_NODELIST") && e.contains("hosts (at most"),
        "{e}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_named() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("intermediate_size", 96.into(), "intermediate.dense.weight"),
        ("patch_size", 2.into(), "patch_embeddings.projection.weight"),
        (
            "num_hidden_layers",
            1_000_000_000u64.into(),
            "num_hidden_layers",
        ),
        ("num_hidden_layers", 1.into(), "encoder.layer.1."),
    ];
    for (field, value, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        vit_models(&models);
        let file = models.join("digits-5-9/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&file, cfg.to_string()).unwrap();
        let e = vit_merge_fails(dir.path(), &models, &[]);
        assert!(
            e.contains("digits-5-9") && e.contains(needle),
            "{field}: {e}"
        );
    }
}

/// Send `sig` to `child` once `ready` holds (polled), then wait for it to exit.
fn signal_when(
    child: &mut std::process::Child,
    sig: &str,
    ready: impl Fn() -> bool,
) -> std::process::ExitStatus {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process ended before it was signalled"
        );
        assert!(std::time::Instant::now() < until, "never became ready");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let sent = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    fsmerge_tests::wait_for(
        child,
        std::time::Duration::from_secs(30),
        "the signalled process",
    )
}

/// Entries of `dir` whose name starts with `prefix`.
fn entries(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_signal_removes_the_runs_staging_and_rendezvous() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    // `fsmerge train`, stopped while it trains into its staging folder.
    let models = dir.path().join("models");
    let mut train = Command::new(fsmerge_tests::fsmerge_bin())
        .args([
            "train",
            &digits_config(),
            "--set",
            &format!("train.models_dir=\"{}\"", models.display()),
            "--set",
            "train.epochs=10000",
        ])
        .current_dir(root())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = signal_when(&mut train, "-TERM", || {
        !entries(dir.path(), ".models.staging-").is_empty()
    });
    assert_eq!(status.code(), Some(143));
    assert!(entries(dir.path(), ".models").is_empty(), "staging left");
    assert!(!models.exists());

    // `fsmerge coordinator`, interrupted while it waits for its workers.
    let out = dir.path().join("run");
    let mut coordinator = Command::new(fsmerge_tests::fsmerge_bin())
        .args([
            "coordinator",
            &digits_config(),
            "--out",
            &out.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--set",
            &format!("train.models_dir=\"{}\"", models.display()),
            "--set",
            "train.epochs=1",
        ])
        .current_dir(root())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rendezvous = dir.path().join("run.work/rendezvous.json");
    let status = signal_when(&mut coordinator, "-INT", || rendezvous.exists());
    assert_eq!(status.code(), Some(130));
    assert!(
        !rendezvous.exists(),
        "the rendezvous file (job token) is left"
    );
    assert!(
        entries(dir.path(), ".run.staging-").is_empty(),
        "staging left"
    );
    assert!(!out.exists());
}

#[test]
fn a_damaged_feature_cache_on_resume_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = vec![
        "merge".to_string(),
        digits_config(),
        "--out".into(),
        out.display().to_string(),
        "--set".into(),
        "cluster.stages=2".into(),
    ];
    args.extend(fsmerge_tests::fast(&dir.path().join("models")));
    let o = run_bounded(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read(out.join("metrics.json")).unwrap();
    // Stage 1's cached input, one feature too narrow.
    let file = dir.path().join("run.work/features/stage1.safetensors");
    let names = tensor_names(&file).unwrap();
    let mut tensors = read_tensors(&file, &names).unwrap();
    let input = tensors.get_mut("input").unwrap();
    let last = input.shape.len() - 1;
    let width = input.shape[last];
    input.data = input
        .data
        .chunks(width)
        .flat_map(|row| row[..width - 1].to_vec())
        .collect();
    input.shape[last] -= 1;
    write_tensors(&file, &tensors).unwrap();
    args.push("--resume".into());
    let o = run_bounded(&args);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("stage1.safetensors") && e.contains("input") && !e.contains("silent"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("metrics.json")).unwrap(), metrics);
}
