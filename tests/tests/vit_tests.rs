//! ViT merging end to end with the real binary (tiny HF ViTs on the 8×8 digits): originals
//! trained by `fsmerge train`, every baseline, FS-Merge local-then-global with the local
//! SuperNet vs folded rows, a merged checkpoint that Python `transformers` loads and that
//! reproduces fsmerge's outputs and its reported accuracy; then the other paths (global,
//! att_heads M/U, literal steps, inner-feature terms) on the same originals.

use fsmerge_common::checkpoint::{read_json, write_tensors};
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge, python_fixture, root, stderr};
use fsmerge_worker::data;
use fsmerge_worker::eval::{evaluate, EvalSet};
use fsmerge_worker::tensor::to_host;
use fsmerge_worker::vit::Vit;
use fsmerge_worker::vit_merge::images;
use std::collections::BTreeMap;
use std::path::Path;

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
    let m = merge(&out, &models, &[]);
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

    // The merged checkpoint alone (fsmerge's loader) reproduces the reported accuracies: task t
    // reads its slice of the stacked classifier.
    let merged = Vit::load(&out.join("merged")).unwrap();
    let mut cfg: fsmerge_common::config::JobConfig = read_json(&out.join("config.json")).unwrap();
    cfg.data.path = Some(root().join(data::default_path(cfg.data.dataset)));
    let splits = data::load(&cfg.data).unwrap();
    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let logits = |x: &tch::Tensor| {
        let all = merged.logits(&images(x)).unwrap();
        vec![all.narrow(1, 0, 5), all.narrow(1, 5, 5)]
    };
    let scores = tch::no_grad(|| evaluate(&test, &logits));
    assert!(
        (scores.mean() - fs.mean_task_acc).abs() < 1e-9,
        "{scores:?}"
    );
    assert!((scores.joint - fs.joint_acc.unwrap()).abs() < 1e-9);

    // transformers loads it (no missing or unexpected tensors) and gives the same logits.
    let x = images(&test.tasks[1].0.narrow(0, 0, 16));
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

    // ViT merges do not run distributed yet: said, not ignored.
    let mut args = args.to_vec();
    args.extend(["--set".into(), "cluster.stages=2".into()]);
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cluster"), "{}", stderr(&o));
}
