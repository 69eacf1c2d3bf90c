//! The Llama merge on the text tasks end to end: two tiny Llama sequence classifiers trained by
//! fsmerge from their own seeds (GQA: 4 query / 2 key-value heads, RoPE), every baseline and
//! FS-Merge, a merged `LlamaForSequenceClassification` that fsmerge's loader and transformers
//! both read back to the reported accuracy and logits; the same decoders as causal LMs, merged
//! into one `LlamaForCausalLM` per task sharing one body, scored by per-domain perplexity; the
//! distributed merge against the single-process one.

use fsmerge_common::checkpoint::{read_json, write_tensors};
use fsmerge_common::metrics::Metrics;
use fsmerge_tests::{fsmerge, launch_config, max_rel_diff, python_fixture, root, scores, stderr};
use fsmerge_worker::core::eval::evaluate;
use fsmerge_worker::core::tensor::to_host;
use fsmerge_worker::data::text::tokens;
use fsmerge_worker::families::llama::model::Llama;
use std::collections::BTreeMap;
use std::path::Path;

/// The Llama merge of the spam and names tasks, small enough for CI: 32 tokens, 2 epochs of
/// originals, 10 of FS-Merge (at a higher peak lr than the config).
fn merge(out: &Path, extra: &[&str]) -> std::process::Output {
    merge_config("spam-names-llama.toml", out, extra)
}

/// `merge` of `configs/<config>`.
fn merge_config(config: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "merge".to_string(),
        root().join("configs").join(config).display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--threads".into(),
        "1".into(),
    ];
    for s in [
        "data.max_tokens=32",
        "train.epochs=2",
        "merge.epochs=10",
        "merge.lr=1e-2",
        "merge.n_originals=400",
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
fn llama_merge_on_text_and_transformers_reproduces_it() {
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
    assert!(get("original:names").mean_task_acc > 0.65);
    // `first` reads the names through the spam model: FS-Merge must beat it clearly and come
    // near the ensemble of the two originals.
    let fs = get("fs-merge");
    assert!(
        fs.mean_task_acc > get("first").mean_task_acc + 0.05,
        "{fs:?}"
    );
    assert!(
        fs.mean_task_acc > get("ensemble").mean_task_acc - 0.04,
        "{fs:?}"
    );

    // The merged checkpoint alone (fsmerge's loader) reproduces the reported accuracies: task t
    // reads its slice of the stacked `score`.
    let merged = Llama::load(&out.join("merged")).unwrap();
    assert_eq!(merged.score.as_ref().unwrap().size(), [4, 64]);
    let test = fsmerge_tests::job_test_split(&out);
    let logits_of = |x: &tch::Tensor| {
        let (ids, mask) = tokens(x);
        merged.sequence_logits(&ids, &mask).unwrap()
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

    // transformers loads it as a LlamaForSequenceClassification and gives the same logits, on
    // mails and names (padded to different lengths).
    let x = tch::Tensor::cat(
        &[
            test.tasks[0].0.narrow(0, 0, 8),
            test.tasks[1].0.narrow(0, 0, 8),
        ],
        0,
    );
    let (ids, mask) = tokens(&x);
    let want = tch::no_grad(|| logits_of(&x));
    transformers_gives(dir.path(), &out.join("merged"), (&ids, &mask), &want);
    // An original fsmerge trained is a transformers Llama too (its own reported logits).
    let original = Llama::load(&out.join("originals/spam")).unwrap();
    let want = tch::no_grad(|| original.sequence_logits(&ids, &mask).unwrap());
    transformers_gives(
        dir.path(),
        &out.join("originals/spam"),
        (&ids, &mask),
        &want,
    );
}

/// transformers loads the HF folder `model` (check_llama_merged.py) and gives `logits` on
/// token ids and attention mask `input` (the reference is written into `tmp`).
fn transformers_gives(
    tmp: &Path,
    model: &Path,
    input: (&tch::Tensor, &tch::Tensor),
    logits: &tch::Tensor,
) {
    let mut reference = BTreeMap::new();
    for (name, t) in [("input_ids", input.0), ("attention_mask", input.1)] {
        reference.insert(
            name.to_string(),
            to_host(&t.to_kind(tch::Kind::Float)).unwrap(),
        );
    }
    reference.insert("logits".to_string(), to_host(logits).unwrap());
    let ref_file = tmp.join("reference.safetensors");
    write_tensors(&ref_file, &reference).unwrap();
    println!(
        "{}",
        python_fixture("check_llama_merged.py", &[model, &ref_file])
    );
}

/// Causal LMs of the mails and of the names merged: every method's perplexity of each head on
/// each domain, FS-Merge's own-domain perplexity far below `first`'s and `average`'s; one
/// `LlamaForCausalLM` per task whose body is one file on disk (hard links), which fsmerge's
/// loader reads back to the reported perplexity and transformers to the same logits.
#[test]
fn causal_lm_merge_scores_perplexity_and_writes_one_lm_per_task() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = merge_config("spam-names-llama-lm.toml", &out, &["merge.mode=\"global\""]);
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
    let get = |name: &str| m.results.iter().find(|r| r.method == name).unwrap();
    let ppl = |method: &str, head: &str, domain: &str| -> f64 {
        get(method).per_task_perplexity[head][domain]
    };
    let own = |method: &str| (ppl(method, "spam", "spam") + ppl(method, "names", "names")) / 2.0;
    eprintln!(
        "mean own-domain perplexity: ensemble {:.2}, first {:.2}, average {:.2}, regmean {:.2}, kd {:.2}, fs-merge {:.2}",
        own("ensemble"), own("first"), own("average"), own("regmean"), own("kd"), own("fs-merge")
    );
    // An original has only its own head, on both domains; the ensemble is the originals.
    assert_eq!(get("original:spam").per_task_perplexity.len(), 1);
    assert_eq!(
        ppl("ensemble", "names", "names"),
        ppl("original:names", "names", "names")
    );
    assert!(get("fs-merge").joint_acc.is_none());
    // Each original models its own domain better than the other's.
    assert!(ppl("ensemble", "spam", "spam") < ppl("ensemble", "spam", "names"));
    assert!(ppl("ensemble", "names", "names") < ppl("ensemble", "names", "spam"));
    // `first` reads the names through the mails model, `average` mixes unrelated weights:
    // FS-Merge stays near the originals.
    let fs = own("fs-merge");
    assert!(fs < 0.5 * own("first") && fs < 0.5 * own("average"), "{fs}");
    assert!(fs < 2.0 * own("ensemble"), "{fs}");

    // One folder per task; the body is written once and hard-linked.
    let merged = out.join("merged");
    let inode = |task: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(merged.join(task).join("model-body.safetensors"))
            .unwrap()
            .ino()
    };
    assert_eq!(inode("spam"), inode("names"));
    assert!(!merged.join(".body").exists());

    // fsmerge's loader reads each task's folder back to the reported perplexity on its domain.
    let test = fsmerge_tests::job_test_split(&out);
    for (t, task) in ["spam", "names"].into_iter().enumerate() {
        let model = Llama::load(&merged.join(task)).unwrap();
        assert!(model.score.is_none() && model.lm_head.is_some());
        let (ids, mask) = tokens(&test.tasks[t].0);
        let logits = tch::no_grad(|| model.lm_logits(&ids, &mask).unwrap());
        let n = ids.size()[1];
        let target = ids.narrow(1, 1, n - 1);
        let nll = -logits
            .narrow(1, 0, n - 1)
            .log_softmax(-1, tch::Kind::Float)
            .gather(2, &target.unsqueeze(-1), false)
            .squeeze_dim(-1);
        let real = target.ne(0).to_kind(tch::Kind::Double);
        let mean = (nll.to_kind(tch::Kind::Double) * &real)
            .sum(tch::Kind::Double)
            .double_value(&[])
            / real.sum(tch::Kind::Double).double_value(&[]);
        let reported = ppl("fs-merge", task, task);
        assert!(
            (mean.exp() - reported).abs() < 1e-4 * reported,
            "{task}: {} vs reported {reported}",
            mean.exp()
        );
        // transformers loads it as a LlamaForCausalLM (the body from the shared file) and
        // gives the same logits.
        let rows = test.tasks[t].0.narrow(0, 0, 8);
        let (ids, mask) = tokens(&rows);
        let want = tch::no_grad(|| model.lm_logits(&ids, &mask).unwrap());
        transformers_gives(dir.path(), &merged.join(task), (&ids, &mask), &want);
    }
}

/// The distributed Llama merge gives the single-process one: 3 stages (embeddings, block 0,
/// block 1 + final norm) × 2 replicas with 3 micro-batches and the features on disk, 2
/// stages recomputing the teacher each batch (with RegMean, which reads them materialized),
/// worker processes (`fsmerge coordinator` + 2 × `fsmerge worker`) on 2 stages, bf16
/// originals within a point of fp32, and activation checkpointing bit for bit;
/// local-then-global, so the shared M_res/U_res, the local chain and the pipeline all take
/// part. Diagonal + low-rank M/U: with `att_heads` the replicas' rounding (per-step losses
/// equal within 3e-7) grows to 4.6e-4 in the weights over the run, along directions the loss
/// hardly sees, where Adam's normalised steps amplify it.
#[test]
fn distributed_llama_merge_equals_the_single_process_merge() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let small = [
        "merge.n_originals=200",
        "merge.mode=\"local-then-global\"",
        "merge.epochs=4",
        "merge.global_epochs=3",
        "baselines.methods=[\"regmean\"]",
        "merge.mu_type=\"diagonal_and_low_rank\"",
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
    for (name, extra) in [
        (
            "3x2",
            [
                "cluster.stages=3",
                "cluster.replicas=2",
                "cluster.micro_batches=3",
                "merge.features=\"disk\"",
            ]
            .as_slice(),
        ),
        (
            "recompute",
            ["cluster.stages=2", "merge.features=\"recompute\""].as_slice(),
        ),
    ] {
        let mut sets: Vec<&str> = small.to_vec();
        sets.push(models.as_str());
        sets.extend(extra);
        let o = merge(&dir.join(name), &sets);
        assert!(o.status.success(), "{name} failed: {}", stderr(&o));
        let diff = max_rel_diff(&merged(name), &merged("single"));
        println!("{name}: folded weights differ by {diff:.2e} (relative)");
        assert!(diff <= 1e-4, "{name}: folded weights differ by {diff:e}");
        assert_eq!(scores(&metrics(name)), scores(&reference), "{name}");
    }

    // The originals stored and run in bf16 on 2 stages (M/U, their training and the fold in
    // fp32, the merged model written in bf16): within a point of the fp32 merge.
    let mut sets: Vec<&str> = small.to_vec();
    sets.extend([
        models.as_str(),
        "cluster.stages=2",
        "merge.features=\"disk\"",
        "merge.precision=\"bf16\"",
    ]);
    let o = merge(&dir.join("bf16"), &sets);
    assert!(o.status.success(), "bf16 failed: {}", stderr(&o));
    let fs = |m: &Metrics| {
        let r = m.results.iter().find(|r| r.method == "fs-merge").unwrap();
        r.mean_task_acc
    };
    let (half, full) = (fs(&metrics("bf16")), fs(&reference));
    println!("bf16: fs-merge mean task accuracy {half:.4} (fp32 {full:.4})");
    assert!((half - full).abs() < 0.01, "bf16 {half} vs fp32 {full}");
    let written: serde_json::Value = read_json(&dir.join("bf16/merged/config.json")).unwrap();
    assert_eq!(written["torch_dtype"], "bfloat16");

    // Activation checkpointing (each block's input kept, the block recomputed in the
    // backward) changes nothing: the same weights bit for bit on 2 stages × 2 micro-batches.
    for (name, on) in [("ckpt-off", "false"), ("ckpt-on", "true")] {
        let ckpt = format!("merge.checkpoint_activations={on}");
        let mut sets: Vec<&str> = small.to_vec();
        sets.extend([
            models.as_str(),
            "cluster.stages=2",
            "cluster.micro_batches=2",
            &ckpt,
        ]);
        let o = merge(&dir.join(name), &sets);
        assert!(o.status.success(), "{name} failed: {}", stderr(&o));
    }
    assert_eq!(max_rel_diff(&merged("ckpt-on"), &merged("ckpt-off")), 0.0);

    // Worker processes, started apart from the coordinator.
    let mut sets: Vec<String> = [
        "data.max_tokens=32",
        "train.epochs=2",
        "merge.epochs=10",
        "merge.lr=1e-2",
        models.as_str(),
    ]
    .iter()
    .chain(&small)
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect();
    sets.extend(["--threads".into(), "1".into()]);
    let config = root().join("configs/spam-names-llama.toml");
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

    // Originals whose tokenizers differ are refused before any work, naming the file.
    let odd = dir.join("odd-originals");
    for (task, text) in [("spam", "{\"a\": 1}"), ("names", "{\"a\": 2}")] {
        let to = odd.join(task);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(dir.join("single/originals").join(task).join(f), to.join(f)).unwrap();
        }
        std::fs::write(to.join("tokenizer.json"), text).unwrap();
    }
    let odd_models = format!("train.models_dir=\"{}\"", odd.display());
    let o = fsmerge(&["check", config.to_str().unwrap(), "--set", &odd_models]);
    assert!(!o.status.success(), "different tokenizers were accepted");
    let err = stderr(&o);
    assert!(
        err.contains("names/tokenizer.json") && err.contains("tokenizer"),
        "{err}"
    );
}
