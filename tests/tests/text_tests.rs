//! The text tasks of the BERT merge: fsmerge's WordPiece tokenizer against transformers' on the
//! real corpus (SpamAssassin mails, first names) and on hard cases; the BERT merge end to end
//! (originals trained by fsmerge from their own seeds, baselines, FS-Merge global and
//! local-then-global, a merged checkpoint that transformers loads and that reproduces the
//! reported accuracy); the distributed merge against the single-process one; refused settings.

use fsmerge_common::checkpoint::{read_json, write_tensors};
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge, launch_config, max_rel_diff, python_fixture, root, scores, stderr};
use fsmerge_worker::core::eval::evaluate;
use fsmerge_worker::core::tensor::to_host;
use fsmerge_worker::data::preprocess::text::TextProcessor;
use fsmerge_worker::data::text;
use fsmerge_worker::data::text::tokens;
use fsmerge_worker::data::wordpiece::WordPiece;
use fsmerge_worker::families::bert::model::Bert;
use std::collections::BTreeMap;
use std::path::Path;

const MAX_TOKENS: usize = 64;

#[test]
fn wordpiece_matches_transformers_on_the_corpus() {
    let model = root().join("data/all-MiniLM-L6-v2");
    let vocab = WordPiece::load(&model.join("vocab.txt")).unwrap();
    let all = text::texts(&root().join("data")).unwrap();
    assert!(all.len() > 14_000, "{} texts", all.len());
    let mut texts: Vec<String> = all.iter().step_by(23).map(|(t, _)| t.clone()).collect();
    texts.extend(
        [
            "Héllo, WORLD!\tdon't stop",
            "naïve café — “quoted” … 中文字 and emoji 🙂",
            "zero\u{200b}width soft\u{ad}hyphen",
            "a_very_long_identifier_with_underscores_and_numbers_12345678901234567890",
            &"x".repeat(150),
            "",
        ]
        .map(String::from),
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("texts.json");
    std::fs::write(&file, serde_json::to_string(&texts).unwrap()).unwrap();
    let out = python_fixture(
        "wordpiece_ids.py",
        &[&model, &file, Path::new(&MAX_TOKENS.to_string())],
    );
    let want: Vec<Vec<u32>> = serde_json::from_str(&out).unwrap();
    assert_eq!(want.len(), texts.len());
    // The model's own tokenizer.json through the `tokenizers` crate, as user models are read.
    let fast = TextProcessor::load(&model, MAX_TOKENS).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens = fast.encode(&refs).unwrap();
    let mut differ = 0;
    for (i, (text, ids)) in texts.iter().zip(&want).enumerate() {
        let got = vocab.encode(text, MAX_TOKENS);
        let row = &tokens.ids[i * MAX_TOKENS..(i + 1) * MAX_TOKENS];
        let want_mask: Vec<i64> = ids.iter().map(|&id| i64::from(id != 0)).collect();
        let mask = &tokens.attention_mask[i * MAX_TOKENS..(i + 1) * MAX_TOKENS];
        let wide: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
        if &got != ids || row != wide.as_slice() || mask != want_mask.as_slice() {
            differ += 1;
            eprintln!(
                "{text:?}\n  fsmerge      {got:?}\n  tokenizers   {row:?}\n  transformers {ids:?}"
            );
        }
    }
    assert!(tokens.type_ids.iter().all(|&t| t == 0));
    assert_eq!(
        differ,
        0,
        "{differ} of {} texts tokenized differently",
        texts.len()
    );
}

/// The BERT merge of the spam and names tasks, small enough for CI: 32 tokens, 2 epochs of
/// originals, 12 of FS-Merge (at a higher peak lr than the config).
fn merge(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "merge".to_string(),
        root()
            .join("configs/spam-names-bert.toml")
            .display()
            .to_string(),
        "--out".into(),
        out.display().to_string(),
        "--threads".into(),
        "1".into(),
    ];
    for s in [
        "data.max_tokens=32",
        "train.epochs=2",
        "merge.epochs=12",
        "merge.lr=1e-2",
        "merge.n_originals=800",
    ]
    .iter()
    .chain(extra)
    {
        args.push("--set".into());
        args.push(s.to_string());
    }
    fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn bert_merge_on_text_and_transformers_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = merge(&out, &["merge.mode=\"global\""]);
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
    let methods: Vec<&str> = m.results.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "original:spam",
            "original:names",
            "ensemble",
            "first",
            "average",
            "regmean",
            "kd",
            "fs-merge"
        ]
    );
    let get = |name: &str| m.results.iter().find(|r| r.method == name).unwrap();
    assert!(get("original:spam").mean_task_acc > 0.9);
    assert!(get("original:names").mean_task_acc > 0.7);
    // `first` reads the names through the spam model, averaging mixes unrelated weights:
    // FS-Merge must beat both clearly and come near the ensemble of the two originals.
    let fs = get("fs-merge");
    for base in ["first", "average"] {
        assert!(
            fs.mean_task_acc > get(base).mean_task_acc + 0.05,
            "{fs:?} vs {base}"
        );
    }
    assert!(
        fs.mean_task_acc > get("ensemble").mean_task_acc - 0.04,
        "{fs:?}"
    );

    // The merged checkpoint alone (fsmerge's loader) reproduces the reported accuracies: task t
    // reads its slice of the stacked classifier.
    let merged = Bert::load(&out.join("merged")).unwrap();
    let test = fsmerge_tests::job_test_split(&out);
    let logits_of = |x: &tch::Tensor| {
        let (ids, mask) = tokens(x);
        merged.logits(&ids, &mask).unwrap()
    };
    let scores = tch::no_grad(|| {
        evaluate(&test, &|x| {
            let all = logits_of(x);
            vec![all.narrow(1, 0, 2), all.narrow(1, 2, 2)]
        })
    });
    assert!(
        (scores.mean() - fs.mean_task_acc).abs() < 1e-9,
        "{scores:?}"
    );
    assert!((scores.joint - fs.joint_acc.unwrap()).abs() < 1e-9);

    // transformers loads it as a BertForSequenceClassification and gives the same logits, on
    // mails and names.
    let x = tch::Tensor::cat(
        &[
            test.tasks[0].0.narrow(0, 0, 8),
            test.tasks[1].0.narrow(0, 0, 8),
        ],
        0,
    );
    let (ids, mask) = tokens(&x);
    let want = tch::no_grad(|| logits_of(&x));
    let mut reference = BTreeMap::new();
    reference.insert(
        "input_ids".to_string(),
        to_host(&ids.to_kind(tch::Kind::Float)).unwrap(),
    );
    reference.insert(
        "attention_mask".to_string(),
        to_host(&mask.to_kind(tch::Kind::Float)).unwrap(),
    );
    reference.insert("logits".to_string(), to_host(&want).unwrap());
    let ref_file = dir.path().join("reference.safetensors");
    write_tensors(&ref_file, &reference).unwrap();
    println!(
        "{}",
        python_fixture("check_bert_merged.py", &[&out.join("merged"), &ref_file])
    );

    // Local then global on the same originals: the unit problems alone already merge (the
    // local SuperNet and its fold agree within a point), and the global phase keeps that.
    let out2 = dir.path().join("local-then-global");
    let models = format!("train.models_dir=\"{}\"", out.join("originals").display());
    let o = merge(
        &out2,
        &[
            &models,
            "merge.mode=\"local-then-global\"",
            "merge.epochs=5",
            "merge.global_epochs=3",
            "baselines.methods=[\"first\"]",
        ],
    );
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    let m: Metrics = read_json(&out2.join("metrics.json")).unwrap();
    let get = |name: &str| m.results.iter().find(|r| r.method == name).unwrap();
    let (chain, folded, fs) = (get("local supernet"), get("local folded"), get("fs-merge"));
    assert!((chain.mean_task_acc - folded.mean_task_acc).abs() < 0.01);
    assert!(fs.variant.contains_key("local_gap_points"), "{fs:?}");
    for r in [folded, fs] {
        assert!(r.mean_task_acc > get("first").mean_task_acc + 0.05, "{r:?}");
    }
}

#[test]
fn text_settings_a_bert_merge_cannot_run_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (set, field) in [
        ("merge.targets=\"nope\"", "targets"),
        ("merge.n_augmented=10", "merge.n_augmented"),
        ("cluster.stages=4", "cluster.stages"),
        ("merge.inner_layers=[0]", "merge.inner_layers"),
        ("baselines.methods=[\"nope\"]", "baselines"),
        ("model.arch=\"vit\"", "model.arch"),
        ("data.max_tokens=4", "data.max_tokens"),
        (
            "data.path=\"/nonexistent\"",
            "/nonexistent/spam-assassin/easy-ham-1",
        ),
        (
            "data.vocab=\"/nonexistent/vocab.txt\"",
            "/nonexistent/vocab.txt",
        ),
    ] {
        let o = merge(&dir.path().join("x"), &[set]);
        assert!(!o.status.success(), "{set} was accepted");
        let err = stderr(&o);
        assert!(err.contains(field), "{set}: {err}");
    }
    assert!(!dir.path().join("x").exists());
}

/// The distributed BERT merge gives the single-process one: embedded workers on 3 stages
/// (embeddings, block 0, block 1 + pooler) × 2 replicas with 3 micro-batches, and worker
/// processes (`fsmerge coordinator` + 2 × `fsmerge worker`) on 2 stages; local-then-global, so
/// the shared M_res/U_res, the local SuperNet rebuilt from the stages' checkpoints and the
/// pipeline all take part.
#[test]
fn distributed_bert_merge_equals_the_single_process_merge() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let small = [
        "merge.n_originals=200",
        "merge.mode=\"local-then-global\"",
        "merge.epochs=4",
        "merge.global_epochs=3",
        "baselines.methods=[]",
    ];
    let o = merge(&dir.join("single"), &small);
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    let models = format!(
        "train.models_dir=\"{}\"",
        dir.join("single/originals").display()
    );
    let metrics =
        |name: &str| -> Metrics { read_json(&dir.join(name).join("metrics.json")).unwrap() };
    let merged = |name: &str| dir.join(name).join("merged/model.safetensors");
    let reference = metrics("single");
    let phases = |name: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(name).join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["phase"].to_string())
            .collect()
    };
    // 3 stages × 2 replicas with the teacher features on disk, memory-mapped.
    let mut sets: Vec<&str> = small.to_vec();
    sets.extend([
        models.as_str(),
        "cluster.stages=3",
        "cluster.replicas=2",
        "cluster.micro_batches=3",
        "merge.features=\"disk\"",
    ]);
    let o = merge(&dir.join("3x2"), &sets);
    assert!(o.status.success(), "3x2 failed: {}", stderr(&o));
    let diff = max_rel_diff(&merged("3x2"), &merged("single"));
    println!("3x2: folded weights differ by {diff:.2e} (relative)");
    assert!(diff <= 1e-4, "3x2: folded weights differ by {diff:e}");
    let m = metrics("3x2");
    assert_eq!(scores(&m), scores(&reference));
    assert!(scores(&m)
        .iter()
        .any(|(method, _, _)| method == "local folded"));
    assert_eq!(m.workers.len(), 6, "worker stats");
    assert_eq!(
        phases("3x2"),
        phases("single"),
        "one log row per step and phase"
    );

    // Features recomputed each batch (2 stages; RegMean reads them materialized): the same
    // merge within float tolerance, nothing but each stage's input cached.
    let mut sets: Vec<&str> = small.to_vec();
    sets.extend([
        models.as_str(),
        "cluster.stages=2",
        "merge.features=\"recompute\"",
        "baselines.methods=[\"regmean\"]",
    ]);
    let o = merge(&dir.join("recompute"), &sets);
    assert!(o.status.success(), "recompute failed: {}", stderr(&o));
    let diff = max_rel_diff(&merged("recompute"), &merged("single"));
    println!("recompute: folded weights differ by {diff:.2e} (relative)");
    assert!(diff <= 1e-4, "recompute: folded weights differ by {diff:e}");
    let fs = |m: &Metrics| scores(m).into_iter().find(|r| r.0 == "fs-merge");
    assert_eq!(fs(&metrics("recompute")), fs(&reference));
    assert!(scores(&metrics("recompute"))
        .iter()
        .any(|r| r.0 == "regmean"));
    let cached = fsmerge_common::checkpoint::tensor_names(
        &dir.join("recompute.work/features/stage1.safetensors"),
    )
    .unwrap();
    assert_eq!(cached, ["input", "task"], "only the stage input is kept");

    // Worker processes, started apart from the coordinator.
    let mut sets: Vec<String> = [
        "data.max_tokens=32",
        "train.epochs=2",
        "merge.lr=1e-2",
        models.as_str(),
    ]
    .iter()
    .chain(&small)
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect();
    sets.extend(["--threads".into(), "1".into()]);
    let config = root().join("configs/spam-names-bert.toml");
    let job = launch_config(
        &config.display().to_string(),
        dir,
        "processes",
        2,
        1,
        &sets,
        false,
    );
    let log = job.log.clone();
    assert!(
        job.finish(std::time::Duration::from_secs(300)),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let diff = max_rel_diff(&merged("processes"), &merged("single"));
    println!("processes 2x1: folded weights differ by {diff:.2e} (relative)");
    assert!(diff <= 1e-4, "processes: folded weights differ by {diff:e}");
    assert_eq!(scores(&metrics("processes")), scores(&reference));
}
