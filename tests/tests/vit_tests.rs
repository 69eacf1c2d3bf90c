//! ViT merging end to end with the real binary (tiny HF ViTs on the 8×8 digits): originals
//! trained by `fsmerge train`, every baseline, FS-Merge local-then-global with the local
//! SuperNet vs folded rows, a merged checkpoint that Python `transformers` loads and that
//! reproduces fsmerge's outputs and its reported accuracy; then the other paths (global,
//! att_heads M/U, literal steps, inner-feature terms) on the same originals.

use fsmerge_common::checkpoint::{read_json, write_tensors};
use fsmerge_common::metrics::Metrics;
use fsmerge_common::workdir::WorkDir;
use fsmerge_tests::{
    fsmerge, launch_config, max_rel_diff, python_fixture, root, scores, stderr, wait_for,
};
use fsmerge_worker::core::eval::{evaluate, EvalSet};
use fsmerge_worker::core::tensor::to_host;
use fsmerge_worker::data;
use fsmerge_worker::families::vit::merge::images;
use fsmerge_worker::families::vit::model::Vit;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn merge(out: &Path, models: &Path, extra: &[&str]) -> Metrics {
    let mut args = vec![
        "merge".to_string(),
        root().join("configs/digits-vit.toml").display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--set".into(),
        format!("train.models_dir=\"{}\"", models.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    read_json(&out.join("metrics.json")).unwrap()
}

#[test]
fn vit_merge_end_to_end_and_transformers_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let out = dir.path().join("run");
    // Shards of 30 kB: the merged folder is written as save_pretrained writes a large model.
    let m = merge(&out, &models, &["--set", "output.max_shard_mb=0.03"]);
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
            "local supernet",
            "local folded",
            "fs-merge"
        ]
    );
    let get = |name: &str| m.results.iter().find(|r| r.method == name).unwrap();
    assert!(get("original:digits-0-4").mean_task_acc > 0.9);
    assert!(get("original:digits-5-9").mean_task_acc > 0.9);
    // `first` reads task 2 through model 1's encoder; FS-Merge must do much better.
    let fs = get("fs-merge");
    assert!(
        fs.mean_task_acc > get("first").mean_task_acc + 0.15,
        "{fs:?}"
    );
    for png in ["loss_curves.png", "accuracy.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5000, "{png}");
    }
    let report = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(report.contains("![accuracy.png](accuracy.png)"));

    let index: serde_json::Value =
        read_json(&out.join("merged/model.safetensors.index.json")).unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    assert!(!out.join("merged/model.safetensors").exists());

    // The merged checkpoint alone (fsmerge's loader) reproduces the reported accuracies: task t
    // reads its slice of the stacked classifier.
    let merged = Vit::load(&out.join("merged")).unwrap();
    let mut cfg: fsmerge_common::config::JobConfig = read_json(&out.join("config.json")).unwrap();
    cfg.data.path = Some(root().join(data::default_path(cfg.data.dataset)));
    let splits = data::load(&cfg.data).unwrap();
    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let logits = |x: &tch::Tensor| {
        let all = merged.logits(&images(x, 1)).unwrap();
        vec![all.narrow(1, 0, 5), all.narrow(1, 5, 5)]
    };
    let scores = tch::no_grad(|| evaluate(&test, &logits));
    assert!(
        (scores.mean() - fs.mean_task_acc).abs() < 1e-9,
        "{scores:?}"
    );
    assert!((scores.joint - fs.joint_acc.unwrap()).abs() < 1e-9);

    // transformers loads it (no missing or unexpected tensors) and gives the same logits.
    let x = images(&test.tasks[1].0.narrow(0, 0, 16), 1);
    let want = tch::no_grad(|| merged.logits(&x).unwrap());
    let mut reference = BTreeMap::new();
    reference.insert("pixel_values".to_string(), to_host(&x).unwrap());
    reference.insert("logits".to_string(), to_host(&want).unwrap());
    let ref_file = dir.path().join("reference.safetensors");
    write_tensors(&ref_file, &reference).unwrap();
    println!(
        "{}",
        python_fixture("check_vit_merged.py", &[&out.join("merged"), &ref_file])
    );

    // The other paths on the same originals: global mode with att_heads M/U, literal steps and
    // an inner-feature term, then local alone.
    let g = merge(
        &dir.path().join("global"),
        &models,
        &[
            "--set",
            "merge.mode=\"global\"",
            "--set",
            "merge.mu_type=\"att_heads\"",
            "--set",
            "merge.step_form=\"literal\"",
            "--set",
            "merge.inner_layers=[1]",
            "--set",
            "merge.epochs=10",
            "--set",
            "baselines.methods=[]",
        ],
    );
    let fs = g.results.iter().find(|r| r.method == "fs-merge").unwrap();
    assert_eq!(fs.variant["mu_type"], "att_heads");
    assert!(fs.mean_task_acc > get("first").mean_task_acc, "{fs:?}");
    let l = merge(
        &dir.path().join("local"),
        &models,
        &[
            "--set",
            "merge.mode=\"local\"",
            "--set",
            "baselines.methods=[]",
        ],
    );
    let methods: Vec<&str> = l.results.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods[2..],
        ["local supernet", "fs-merge"],
        "local mode reports the local SuperNet beside the folded model"
    );
}

#[test]
fn vit_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    // A model folder whose classifier has the wrong number of classes.
    std::fs::create_dir_all(models.join("digits-0-4")).unwrap();
    std::fs::create_dir_all(models.join("digits-5-9")).unwrap();
    let shape = fsmerge_common::config::VitShape {
        patch_size: 4,
        width: 32,
        layers: 2,
        heads: 4,
        mlp_dim: 64,
    };
    let cfg = fsmerge_common::hf::VitConfig::for_images(&shape, 8);
    let labels: Vec<String> = (0..5).map(|c| format!("{c}")).collect();
    Vit::init(cfg.clone(), 5)
        .save(&models.join("digits-0-4"), &labels)
        .unwrap();
    Vit::init(cfg, 3)
        .save(&models.join("digits-5-9"), &labels[..3])
        .unwrap();
    let args = [
        "merge".to_string(),
        root().join("configs/digits-vit.toml").display().to_string(),
        "--out".into(),
        dir.path().join("run").display().to_string(),
        "--set".into(),
        format!("train.models_dir=\"{}\"", models.display()),
    ];
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("digits-5-9") && e.contains("classifier.weight") && e.contains('3'),
        "{e}"
    );
    assert!(
        !dir.path().join("run").exists(),
        "a failed job leaves no output"
    );

    // A ViT's plan units are its embeddings and blocks: 2 blocks give at most 3 stages.
    let mut args = args.to_vec();
    args.extend(["--set".into(), "cluster.stages=4".into()]);
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("cluster.stages") && e.contains("3 units"), "{e}");
}

/// Every result row as (method, mean task %, joint %), rounded as the report prints them.
/// The same ViT merge (local-then-global, so both phases and the shared M_res/U_res) in one
/// process and on the distributed runtime: embedded workers over 2 stages and over 3 stages ×
/// 2 replicas with 3 micro-batches (a stage of embeddings alone, a middle stage), a global
/// merge with inner-feature terms on every block, and worker processes whose stage-1 worker is
/// killed in the global phase, then resumed from the local checkpoints. Every run folds to the same merged ViT and reports the same rows.
#[test]
fn distributed_vit_merge_equals_the_single_process_merge() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let models = dir.join("models");
    let sets = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("train.models_dir=\"{}\"", models.display()),
            "baselines.methods=[]".into(),
            "merge.epochs=10".into(),
            "merge.global_epochs=30".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.into_iter()
            .flat_map(|s| ["--set".to_string(), s])
            .collect()
    };
    let run = |name: &str, extra: &[&str]| -> Metrics {
        let s = sets(extra);
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        merge(&dir.join(name), &models, &s)
    };
    let reference = run("single", &[]);
    let merged = |name: &str| dir.join(name).join("merged/model.safetensors");
    for (name, stages, replicas, micro) in [("2x1", 2, 1, 1), ("3x2", 3, 2, 3)] {
        let m = run(
            name,
            &[
                &format!("cluster.stages={stages}"),
                &format!("cluster.replicas={replicas}"),
                &format!("cluster.micro_batches={micro}"),
            ],
        );
        let diff = max_rel_diff(&merged(name), &merged("single"));
        println!("{name}: folded weights differ by {diff:.2e} (relative)");
        assert!(diff <= 1e-4, "{name}: folded weights differ by {diff:e}");
        // Every row, the local SuperNet and its fold (rebuilt from the stages' checkpoints)
        // included.
        assert_eq!(scores(&m), scores(&reference), "{name}");
        assert_eq!(m.workers.len(), stages * replicas, "{name}: worker stats");
        let phases = |run: &str| -> Vec<String> {
            std::fs::read_to_string(dir.join(run).join("train_log.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["phase"].to_string())
                .collect()
        };
        assert_eq!(
            phases(name),
            phases("single"),
            "{name}: one log row per step and phase, as in one process"
        );
    }

    // Teacher features on disk, memory-mapped (replica 1's in a scratch file): the same run.
    run(
        "disk-3x2",
        &[
            "cluster.stages=3",
            "cluster.replicas=2",
            "cluster.micro_batches=3",
            "merge.features=\"disk\"",
        ],
    );
    assert_eq!(max_rel_diff(&merged("disk-3x2"), &merged("3x2")), 0.0);

    // The inner-feature terms (global): each stage adds those of its inner blocks.
    let inner = ["merge.mode=\"global\"", "merge.inner_layers=[0, 1]"];
    let reference = run("single-inner", &inner);
    let m = run(
        "inner-3x2",
        &[inner[0], inner[1], "cluster.stages=3", "cluster.replicas=2"],
    );
    let diff = max_rel_diff(&merged("inner-3x2"), &merged("single-inner"));
    println!("inner-3x2: folded weights differ by {diff:.2e} (relative)");
    assert!(diff <= 1e-4, "inner-3x2: folded weights differ by {diff:e}");
    assert_eq!(scores(&m), scores(&reference), "inner-3x2");

    // Worker processes, features on disk; kill stage 1's once the local phase is checkpointed
    // (the resumed workers map the features the first ones wrote).
    let config = root().join("configs/digits-vit.toml").display().to_string();
    let s = sets(&["cluster.micro_batches=1", "merge.features=\"disk\""]);
    let mut job = launch_config(&config, dir, "job", 2, 1, &s, false);
    let work = WorkDir::new(dir.join("job.work"));
    let until = Instant::now() + Duration::from_secs(120);
    let local_done = |work: &WorkDir| {
        let done = work.read_manifest().ok().flatten().map(|m| m.done);
        done.is_some_and(|d| d.iter().filter(|d| d.phase == "local").count() == 2)
    };
    while !local_done(&work) {
        assert!(Instant::now() < until, "no local phase: {}", job.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    job.workers[1].kill().unwrap();
    let status = wait_for(&mut job.coordinator, Duration::from_secs(60), "coordinator");
    assert!(!status.success(), "the job succeeded without worker 1");
    let _ = job.workers[0].wait();
    assert!(!dir.join("job").exists(), "a failed job left an output");
    let resumed = launch_config(&config, dir, "job", 2, 1, &s, true);
    let log = resumed.log.clone();
    assert!(resumed.finish(Duration::from_secs(180)));
    let log = std::fs::read_to_string(log).unwrap();
    for stage in 0..2 {
        assert!(
            log.contains(&format!(
                "stage {stage}: phase `local` restored from its checkpoint"
            )),
            "{log}"
        );
    }
    let diff = max_rel_diff(&merged("job"), &merged("2x1"));
    assert!(diff <= 1e-6, "resumed output differs by {diff:e}");
}

/// The dtype of every tensor in a safetensors file.
fn dtypes(file: &Path) -> std::collections::BTreeSet<String> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(_, v)| format!("{:?}", v.dtype()))
        .collect()
}

/// `merge.precision`: bf16 originals and features (2 stages, features on disk) and fp16
/// checkpoints (their `torch_dtype` the default) merge within tolerance of fp32, and the merged
/// model is written in that precision, loadable by `transformers`; `merge.features =
/// "recompute"` (bf16, 2 stages) within tolerance of the stored features; checkpointed
/// activations give the same merge.
#[test]
fn half_precision_and_recomputed_features_stay_within_tolerance() {
    use fsmerge_common::hf_writer::ShardedWriter;
    use fsmerge_common::precision::Precision;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let models = dir.join("models");
    let base = [
        "baselines.methods=[]",
        "merge.epochs=10",
        "merge.global_epochs=30",
    ];
    let run = |name: &str, models: &Path, extra: &[&str]| -> Metrics {
        let sets: Vec<String> = (base.iter().chain(extra))
            .flat_map(|s| ["--set".to_string(), s.to_string()])
            .collect();
        merge(
            &dir.join(name),
            models,
            &sets.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let acc = |m: &Metrics| {
        (m.results.iter().find(|r| r.method == "fs-merge"))
            .unwrap()
            .mean_task_acc
    };
    let merged = |name: &str| dir.join(name).join("merged/model.safetensors");
    let fp32 = run("fp32", &models, &[]);

    let bf16 = run(
        "bf16",
        &models,
        &[
            "merge.precision=\"bf16\"",
            "cluster.stages=2",
            "merge.features=\"disk\"",
        ],
    );
    let diff = max_rel_diff(&merged("bf16"), &merged("fp32"));
    println!(
        "bf16: accuracy {:.4} vs fp32 {:.4}; folded weights differ by {diff:.2e}",
        acc(&bf16),
        acc(&fp32)
    );
    assert!((acc(&bf16) - acc(&fp32)).abs() <= 0.02);
    assert!(diff > 0.0 && diff < 0.1, "{diff:e}");
    assert_eq!(dtypes(&merged("bf16")), ["BF16".to_string()].into());
    let features = dir.join("bf16.work/features/stage1.safetensors");
    assert!(
        dtypes(&features).contains("BF16"),
        "features stored in bf16"
    );
    let cfg: serde_json::Value = read_json(&dir.join("bf16/merged/config.json")).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");

    // The same with every batch's features recomputed by the originals instead of stored.
    let recomputed = run(
        "bf16-recompute",
        &models,
        &[
            "merge.precision=\"bf16\"",
            "cluster.stages=2",
            "merge.features=\"recompute\"",
        ],
    );
    let diff = max_rel_diff(&merged("bf16-recompute"), &merged("bf16"));
    println!("bf16, recomputed features: folded weights differ by {diff:.2e} from stored ones");
    assert!(diff <= 1e-3, "{diff:e}");
    assert!((acc(&recomputed) - acc(&bf16)).abs() <= 0.005);

    // Activations checkpointed per block in the global phase: the same step, recomputed.
    run(
        "bf16-checkpointed",
        &models,
        &[
            "merge.precision=\"bf16\"",
            "cluster.stages=2",
            "merge.features=\"disk\"",
            "merge.checkpoint_activations=true",
        ],
    );
    assert_eq!(
        max_rel_diff(&merged("bf16-checkpointed"), &merged("bf16")),
        0.0
    );

    // The originals as fp16 checkpoints: their torch_dtype is the job's precision.
    let models16 = dir.join("models16");
    for task in ["digits-0-4", "digits-5-9"] {
        let (from, to) = (models.join(task), models16.join(task));
        let file = from.join("model.safetensors");
        let names = fsmerge_common::checkpoint::tensor_names(&file).unwrap();
        let mut w = ShardedWriter::new(&to, u64::MAX)
            .unwrap()
            .with_precision(Precision::Fp16);
        for (name, t) in fsmerge_common::checkpoint::read_tensors(&file, &names).unwrap() {
            w.add(name, t).unwrap();
        }
        w.finish().unwrap();
        let mut cfg: serde_json::Value = read_json(&from.join("config.json")).unwrap();
        cfg["torch_dtype"] = "float16".into();
        fsmerge_common::checkpoint::write_json(&to.join("config.json"), &cfg).unwrap();
    }
    let fp16 = run("fp16", &models16, &[]);
    println!("fp16 originals: accuracy {:.4}", acc(&fp16));
    assert!((acc(&fp16) - acc(&fp32)).abs() <= 0.02);
    assert_eq!(dtypes(&merged("fp16")), ["F16".to_string()].into());
    // fsmerge's loader and transformers read it alike.
    let m = Vit::load(&dir.join("fp16/merged")).unwrap();
    let x = images(
        &tch::Tensor::rand([8, 64], fsmerge_worker::core::tensor::F32),
        1,
    );
    let mut reference = BTreeMap::new();
    reference.insert("pixel_values".to_string(), to_host(&x).unwrap());
    let logits = tch::no_grad(|| m.logits(&x).unwrap());
    reference.insert("logits".to_string(), to_host(&logits).unwrap());
    let ref_file = dir.join("reference.safetensors");
    write_tensors(&ref_file, &reference).unwrap();
    println!(
        "{}",
        python_fixture(
            "check_vit_merged.py",
            &[&dir.join("fp16/merged"), &ref_file]
        )
    );
}
