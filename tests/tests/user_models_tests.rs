//! A user's own checkpoints and data: two ViTs fine-tuned by Python `transformers` (different
//! seeds, Fashion-MNIST classes 0–4 and 5–9 as 3-channel 32×32 pictures that their
//! `ViTImageProcessor` resizes and normalizes), saved with `save_pretrained`, their merge data
//! as Hub Parquet and their test data as an ImageFolder. fsmerge merges them from a
//! `[[models]]` config alone; transformers loads `merged/` with `AutoModelForImageClassification`
//! and `AutoImageProcessor` and gets fsmerge's per-task accuracies. The same for two BERTs with
//! their own fast tokenizer (`tokenizer.json`), JSON Lines merge data and CSV test data. Bad
//! input is named.

use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::{mean_of, Metrics};
use fsmerge_tests::{fsmerge, python_fixture, stderr};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const TASKS: [&str; 2] = ["fmnist-a", "fmnist-b"];
const TEXT_TASKS: [&str; 2] = ["spam", "names"];

type Fixture = (PathBuf, BTreeMap<String, f64>);

/// The ViT fixture (models, data, transformers' accuracies), made once per test binary.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| make_fixture("make_user_vits.py", "user_vits", &["300"]))
}

/// The BERT fixture, made once per test binary.
fn text_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| make_fixture("make_user_berts.py", "user_berts", &["200"]))
}

/// The Llama fixture (the same tokenizer, tasks and data as the BERTs'), made once per test
/// binary.
fn llama_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| make_fixture("make_user_berts.py", "user_llamas", &["200", "llama"]))
}

/// The same as Qwen2 models (biases on q, k, v), made once per test binary.
fn qwen2_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| make_fixture("make_user_berts.py", "user_qwen2", &["200", "qwen2"]))
}

/// Run fixture `script` into a folder of the target dir (rewritten on every run); returns the
/// folder and the accuracies transformers printed.
fn make_fixture(script: &str, name: &str, args: &[&str]) -> Fixture {
    {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut all = vec![dir.as_path()];
        all.extend(args.iter().map(Path::new));
        let out = python_fixture(script, &all);
        let acc = out
            .lines()
            .filter_map(|l| {
                let (task, rest) = l.split_once(": test accuracy ")?;
                Some((task.to_string(), rest.trim().parse().ok()?))
            })
            .collect();
        (dir, acc)
    }
}

/// A `[[models]]` config over the ViT fixture (Parquet merge data, ImageFolder test data),
/// each model's entry edited by `entry`.
fn config(dir: &Path, root: &Path, name: &str, entry: &dyn Fn(usize, String) -> String) -> PathBuf {
    let data = |d: &Path| {
        format!(
            "merge_data = {{ format = \"parquet\", path = \"{0}/train-*.parquet\" }}\neval_data = {{ format = \"imagefolder\", path = \"{0}/test\" }}\n",
            d.display()
        )
    };
    write_config(dir, root, name, (&TASKS, ""), &data, entry)
}

/// A `[[models]]` config over the BERT fixture (JSON Lines merge data, CSV test data).
fn text_config(
    dir: &Path,
    root: &Path,
    name: &str,
    entry: &dyn Fn(usize, String) -> String,
) -> PathBuf {
    let data = |d: &Path| {
        format!(
            "merge_data = {{ format = \"jsonl\", path = \"{0}/merge.jsonl\" }}\neval_data = {{ format = \"csv\", path = \"{0}/test.csv\" }}\n",
            d.display()
        )
    };
    let header = "[data]\nmax_tokens = 32\n";
    write_config(dir, root, name, (&TEXT_TASKS, header), &data, entry)
}

/// `<dir>/<name>.toml`: `header`, one `[[models]]` entry per task of `tasks` (its folder under
/// `<root>/models/`, its data lines from `data(<root>/data/<task>)`, edited by `entry`), and the
/// test's merge schedule.
fn write_config(
    dir: &Path,
    root: &Path,
    name: &str,
    (tasks, header): (&[&str], &str),
    data: &dyn Fn(&Path) -> String,
    entry: &dyn Fn(usize, String) -> String,
) -> PathBuf {
    let mut text = format!("name = \"{name}\"\nthreads = 2\n{header}");
    for (t, task) in tasks.iter().enumerate() {
        let m = root.join("models").join(task);
        let lines = data(&root.join("data").join(task));
        text += &entry(
            t,
            format!("[[models]]\npath = \"{}\"\n{lines}", m.display()),
        );
    }
    text += "[merge]\nmode = \"local-then-global\"\nrank = 8\nbatch_size = 64\nepochs = 20\nglobal_epochs = 20\nn_originals = 256\nn_augmented = 0\n";
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    file
}

fn merge(config: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "merge",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    fsmerge(&args)
}

/// Merge the fixture's models with `cfg`; the originals score what transformers measured, and
/// transformers reads `merged/` alone (weights, config, processor) to fsmerge's per-task
/// accuracies. Returns the metrics.
fn merge_and_load_back(cfg: &Path, fixture: &Fixture, tasks: &[&str], max_tokens: &str) -> Metrics {
    let (root, python_acc) = fixture;
    let out = cfg.with_extension("run");
    let o = merge(cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
    for task in tasks {
        let ours = row(&m, &format!("original:{task}")).per_task_acc[*task];
        assert!(
            (ours - python_acc[*task]).abs() < 1e-9,
            "{task}: {ours} vs {}",
            python_acc[*task]
        );
    }
    let merged = out.join("merged");
    let printed = python_fixture(
        "check_user_merged.py",
        &[&merged, &root.join("data"), Path::new(max_tokens)],
    );
    let theirs: BTreeMap<String, f64> = serde_json::from_str(printed.trim()).unwrap();
    let fs = row(&m, "fs-merge");
    for task in tasks {
        assert!(
            (fs.per_task_acc[*task] - theirs[*task]).abs() < 1e-9,
            "{task}: fsmerge {} vs transformers {}",
            fs.per_task_acc[*task],
            theirs[*task]
        );
    }
    eprintln!(
        "originals (transformers) {python_acc:?}; fs-merge {:?} (transformers on merged/: {theirs:?}); kd {:.4}, regmean {:.4}, average {:.4}",
        fs.per_task_acc,
        row(&m, "kd").mean_task_acc,
        row(&m, "regmean").mean_task_acc,
        row(&m, "average").mean_task_acc
    );
    fidelity_ranks_as_accuracy(&m);
    m
}

const MERGES: [&str; 5] = ["first", "average", "regmean", "kd", "fs-merge"];

/// On a job with labels, fidelity ranks the merged models as accuracy does: every pair of
/// methods more than 3 accuracy points apart is ordered alike by mean fidelity (a closer pair
/// may swap), and the originals agree with themselves exactly.
fn fidelity_ranks_as_accuracy(m: &Metrics) {
    for r in m
        .results
        .iter()
        .filter(|r| r.method.starts_with("original:"))
    {
        assert_eq!(mean_of(&r.per_task_fidelity), 1.0, "{}", r.method);
        assert_eq!(mean_of(&r.per_task_logit_error), 0.0, "{}", r.method);
    }
    let scores: Vec<(&str, f64, f64)> = MERGES
        .iter()
        .map(|&name| {
            let r = row(m, name);
            (name, r.mean_task_acc, mean_of(&r.per_task_fidelity))
        })
        .collect();
    eprintln!("(method, mean accuracy, mean fidelity): {scores:?}");
    for a in &scores {
        for b in &scores {
            if a.1 > b.1 + 0.03 {
                assert!(
                    a.2 > b.2,
                    "{} above {} by accuracy, not by fidelity: {scores:?}",
                    a.0,
                    b.0
                );
            }
        }
    }
}

fn row<'a>(m: &'a Metrics, method: &str) -> &'a fsmerge_common::metrics::MethodResult {
    m.results
        .iter()
        .find(|r| r.method == method)
        .unwrap_or_else(|| panic!("no row {method}"))
}

#[test]
fn user_vits_merge_from_their_folders_and_load_back_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = &fixture().0;
    let cfg = config(tmp.path(), root, "user-vits", &|_, e| e);
    let m = merge_and_load_back(&cfg, fixture(), &TASKS, "0");
    let merged = cfg.with_extension("run").join("merged");
    assert!(merged.join("preprocessor_config.json").is_file());

    // Model b fine-tuned under another normalization (mean = std = 0.5, weights rewritten to
    // the same function of the raw image): fsmerge folds the difference into its patch
    // embedding, so the job reads model a's pixels and merges as before.
    let orig_b = root.join("models/fmnist-b");
    let renormalized = tmp.path().join("renormalized/fmnist-b");
    eprintln!(
        "{}",
        python_fixture("renormalize_vit.py", &[&orig_b, &renormalized]).trim()
    );
    let cfg = config(tmp.path(), root, "renormalized", &|t, e| {
        if t == 1 {
            e.replace(
                &orig_b.display().to_string(),
                &renormalized.display().to_string(),
            )
        } else {
            e
        }
    });
    let again = merge_and_load_back(&cfg, fixture(), &TASKS, "0");
    for method in MERGES {
        for task in TASKS {
            let (before, after) = (
                row(&m, method).per_task_acc[task],
                row(&again, method).per_task_acc[task],
            );
            assert!(
                (before - after).abs() <= 0.02,
                "{method} on {task}: {before} with equal processors, {after} renormalized"
            );
        }
    }
}

#[test]
fn user_berts_merge_with_their_tokenizer_and_load_back_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = &text_fixture().0;
    let cfg = text_config(tmp.path(), root, "user-berts", &|_, e| e);
    merge_and_load_back(&cfg, text_fixture(), &TEXT_TASKS, "32");
    assert!(cfg
        .with_extension("run")
        .join("merged/tokenizer.json")
        .is_file());

    // A model whose tokenizer maps tokens to other ids cannot share the merged embeddings.
    let names = copy_model(root, "names", &tmp.path().join("other-vocab"));
    std::fs::copy(
        fsmerge_tests::root().join("data/all-MiniLM-L6-v2/tokenizer.json"),
        names.join("tokenizer.json"),
    )
    .unwrap();
    let orig = root.join("models/names");
    let cfg = text_config(tmp.path(), root, "other-vocab", &|t, e| {
        if t == 1 {
            e.replace(&orig.display().to_string(), &names.display().to_string())
        } else {
            e
        }
    });
    fails(
        &cfg,
        tmp.path(),
        &["names/tokenizer.json", "the vocabulary differs"],
    );
    std::fs::remove_file(names.join("tokenizer.json")).unwrap();
    fails(&cfg, tmp.path(), &["names/tokenizer.json", "missing"]);
}

/// Two Llama sequence classifiers fine-tuned by transformers (GQA, RoPE, their own tokenizer)
/// merge from their folders, and two Qwen2 ones (biases on q, k, v); transformers reads
/// `merged/` back to fsmerge's accuracies.
#[test]
fn user_llamas_merge_with_their_tokenizer_and_load_back_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    for (fixture, name, class) in [
        (
            llama_fixture(),
            "user-llamas",
            "LlamaForSequenceClassification",
        ),
        (
            qwen2_fixture(),
            "user-qwen2",
            "Qwen2ForSequenceClassification",
        ),
    ] {
        let cfg = text_config(tmp.path(), &fixture.0, name, &|_, e| e);
        let m = merge_and_load_back(&cfg, fixture, &TEXT_TASKS, "32");
        let merged = cfg.with_extension("run").join("merged");
        assert!(merged.join("tokenizer.json").is_file());
        let config: serde_json::Value = read_json(&merged.join("config.json")).unwrap();
        assert_eq!(config["architectures"][0], class);
        assert_eq!(config["num_key_value_heads"], 2);
        let fs = row(&m, "fs-merge").mean_task_acc;
        assert!(fs > row(&m, "first").mean_task_acc + 0.05, "{name}: {fs}");
    }
    let shapes = fsmerge_common::checkpoint::tensor_shapes(
        &tmp.path().join("user-qwen2.run/merged/model.safetensors"),
    )
    .unwrap();
    assert_eq!(shapes["model.layers.0.self_attn.k_proj.bias"], [32]);
    assert!(!shapes.contains_key("model.layers.0.self_attn.o_proj.bias"));
}

/// A `[[models]]` entry without its `eval_data` line.
fn without_eval_data(entry: String) -> String {
    (entry.lines())
        .filter(|l| !l.starts_with("eval_data"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Models without labeled data: each task is scored by fidelity to its original on every fifth
/// merge input, held out (51 of 256), and FS-Merge keeps its lead over the baselines there.
#[test]
fn user_berts_without_eval_data_are_scored_by_fidelity() {
    let tmp = tempfile::tempdir().unwrap();
    let root = &text_fixture().0;
    let cfg = text_config(tmp.path(), root, "unlabeled", &|_, e| without_eval_data(e));
    let few = ["--set", "merge.n_originals=200"];
    let o = fsmerge(&[&["check", cfg.to_str().unwrap()][..], &few].concat());
    let printed = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{printed}{}", stderr(&o));
    for task in TEXT_TASKS {
        let want = format!("task {task}: 205 merge inputs, 51 held-out merge inputs");
        assert!(printed.contains(&want), "`{want}` not in:\n{printed}");
    }

    let out = cfg.with_extension("run");
    let o = merge(&cfg, &out, &few);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
    let fs = row(&m, "fs-merge");
    assert!(
        fs.per_task_acc.is_empty() && fs.joint_acc.is_none(),
        "{fs:?}"
    );
    for task in TEXT_TASKS {
        let own = row(&m, &format!("original:{task}"));
        assert_eq!(own.per_task_fidelity[task], 1.0);
        assert!(fs.per_task_fidelity[task] > 0.5, "{fs:?}");
        assert!(fs.per_task_logit_error[task] > 0.0, "{fs:?}");
    }
    let fidelity = |name: &str| mean_of(&row(&m, name).per_task_fidelity);
    for b in ["first", "average", "regmean"] {
        assert!(
            fidelity("fs-merge") > fidelity(b),
            "fs-merge {} vs {b} {}",
            fidelity("fs-merge"),
            fidelity(b)
        );
    }
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("Fidelity: agreement"), "{table}");

    // Resumed, the job reads its preprocessed inputs from the work directory and reports the
    // same fidelity.
    let o = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .args([
            "merge",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--resume",
        ])
        .args(few)
        .current_dir(fsmerge_tests::root())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("inputs: preprocessed inputs read from the cache"),
        "{log}"
    );
    let resumed: Metrics = read_json(&out.join("metrics.json")).unwrap();
    assert_eq!(
        row(&resumed, "fs-merge").per_task_fidelity,
        row(&m, "fs-merge").per_task_fidelity
    );
    eprintln!(
        "{}",
        MERGES.map(|n| format!("{n} {:.4}", fidelity(n))).join(", ")
    );
}

/// A job's preprocessed inputs are cached in its work directory: the second load reads them
/// back equal, and a changed data file is preprocessed again (the stale file removed).
#[test]
fn preprocessed_inputs_are_cached_until_the_data_changes() {
    use fsmerge_common::config::JobConfig;
    use fsmerge_common::workdir::WorkDir;
    use fsmerge_worker::data::{input_cache, models};
    let (root, _) = text_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("spam");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["merge.jsonl", "test.csv"] {
        std::fs::copy(root.join("data/spam").join(f), data.join(f)).unwrap();
    }
    let from = root.join("data/spam").display().to_string();
    let cfg = text_config(tmp.path(), root, "cached", &|t, e| {
        if t == 0 {
            e.replace(&from, &data.display().to_string())
        } else {
            e
        }
    });
    let work = WorkDir::new(tmp.path().join("work"));
    let load = || {
        let job = JobConfig::load(&cfg).unwrap();
        input_cache::load_or_build(&job, &work, || models::load(&job, true)).unwrap()
    };
    let (first, cached) = load();
    assert!(!cached);
    let (again, cached) = load();
    assert!(cached, "the second load preprocessed again");
    assert_eq!(again.train.pixels, first.train.pixels);
    assert_eq!(again.test.labels, first.test.labels);
    assert_eq!(again.val.pixels, first.test.pixels);

    let merge = data.join("merge.jsonl");
    let mut text = std::fs::read_to_string(&merge).unwrap();
    text.push_str("{\"text\": \"one more mail\"}\n");
    std::fs::write(&merge, text).unwrap();
    let (changed, cached) = load();
    assert!(!cached, "a changed data file was read from the cache");
    assert_eq!(changed.train.labels.len(), first.train.labels.len() + 1);
    let files = std::fs::read_dir(tmp.path().join("work/inputs"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "the stale inputs were kept");
}

/// Copy model `task` of the fixture into `dir` (to damage it there).
fn copy_model(root: &Path, task: &str, dir: &Path) -> PathBuf {
    let to = dir.join(task);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(root.join("models").join(task)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

/// The job fails with one error line containing every `want`, and writes nothing.
fn fails(cfg: &Path, tmp: &Path, want: &[&str]) {
    let out = tmp.join("bad-run");
    let o = merge(cfg, &out, &[]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{}: should fail", cfg.display());
    for w in want {
        assert!(e.contains(w), "{}: `{w}` not in: {e}", cfg.display());
    }
    assert!(!out.exists(), "a failed job wrote {}", out.display());
    eprintln!("{}", e.trim_end().lines().last().unwrap_or_default());
}

#[test]
fn bad_models_and_data_are_named() {
    let (root, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let swap_path = |e: String, from: &Path, to: &Path| {
        e.replace(&from.display().to_string(), &to.display().to_string())
    };

    // A processor that resizes to another size than the other model's (a normalization that
    // differs is adapted: the ViT test).
    let b = copy_model(root, "fmnist-b", &tmp.join("other-size"));
    let p = b.join("preprocessor_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"height\": 28", "\"height\": 24")).unwrap();
    let orig_b = root.join("models/fmnist-b");
    let cfg = config(tmp, root, "other-size", &|t, e| {
        if t == 1 {
            swap_path(e, &orig_b, &b)
        } else {
            e
        }
    });
    fails(
        &cfg,
        tmp,
        &[
            "other-size/fmnist-b/preprocessor_config.json",
            "size differs",
        ],
    );

    // A model without a processor config.
    let b = copy_model(root, "fmnist-b", &tmp.join("no-processor"));
    std::fs::remove_file(b.join("preprocessor_config.json")).unwrap();
    let cfg = config(tmp, root, "no-processor", &|t, e| {
        if t == 1 {
            swap_path(e, &orig_b, &b)
        } else {
            e
        }
    });
    fails(&cfg, tmp, &["preprocessor_config.json", "missing"]);

    // An ImageFolder class the model does not know.
    let test_a = root.join("data/fmnist-a/test");
    let extra = tmp.join("extra-class");
    std::fs::create_dir_all(extra.join("Unicorn")).unwrap();
    for class in std::fs::read_dir(&test_a).unwrap() {
        let class = class.unwrap().path();
        let to = extra.join(class.file_name().unwrap());
        std::fs::create_dir_all(&to).unwrap();
        let first = std::fs::read_dir(&class)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::copy(&first, to.join(first.file_name().unwrap())).unwrap();
        std::fs::copy(&first, extra.join("Unicorn/u.png")).unwrap();
    }
    let cfg = config(tmp, root, "unknown-class", &|t, e| {
        if t == 0 {
            swap_path(e, &test_a, &extra)
        } else {
            e
        }
    });
    fails(&cfg, tmp, &["Unicorn/u.png", "label `Unicorn`", "label2id"]);

    // An undecodable image, named by file.
    let broken = tmp.join("broken");
    std::fs::create_dir_all(broken.join("Trouser")).unwrap();
    std::fs::write(broken.join("Trouser/x.png"), b"not a png").unwrap();
    let cfg = config(tmp, root, "broken-image", &|t, e| {
        if t == 0 {
            swap_path(e, &test_a, &broken)
        } else {
            e
        }
    });
    fails(&cfg, tmp, &["Trouser/x.png"]);

    // A missing column, a glob that matches nothing, no eval data.
    let cfg = config(tmp, root, "no-column", &|t, e| {
        if t == 0 {
            e.replace(
                "format = \"parquet\",",
                "format = \"parquet\", image_column = \"img\",",
            )
        } else {
            e
        }
    });
    fails(
        &cfg,
        tmp,
        &["train-00000-of-00001.parquet", "no column `img`"],
    );
    let cfg = config(tmp, root, "no-files", &|t, e| {
        if t == 0 {
            e.replace("train-*", "nothing-*")
        } else {
            e
        }
    });
    fails(&cfg, tmp, &["nothing-*.parquet", "no file matches"]);
    // Without eval_data, every fifth merge input is held out: 4 are too few.
    let cfg = config(tmp, root, "no-eval", &|t, e| {
        if t == 1 {
            without_eval_data(e).replace(".parquet\"", ".parquet\", limit = 4")
        } else {
            e
        }
    });
    fails(
        &cfg,
        tmp,
        &["models[1].merge_data", "4 inputs", "at least 5"],
    );

    // Tasks given beside [[models]], and a model folder without config.json.
    let cfg = config(tmp, root, "with-tasks", &|t, e| {
        if t == 0 {
            format!("[[tasks]]\nname = \"x\"\nclasses = [0, 1]\n{e}")
        } else {
            e
        }
    });
    fails(&cfg, tmp, &["[[tasks]]"]);
    let cfg = config(tmp, root, "no-config", &|t, e| {
        if t == 1 {
            swap_path(e, &orig_b, &tmp.join("nowhere"))
        } else {
            e
        }
    });
    fails(&cfg, tmp, &["nowhere/config.json"]);
}

#[test]
fn check_reports_models_data_plan_and_memory_without_running() {
    let (root, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), root, "checked", &|_, e| e);
    let o = fsmerge(&["check", cfg.to_str().unwrap(), "--set", "cluster.stages=2"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    for want in [
        "models: 2 vit models, mergeable",
        "task fmnist-a: 256 merge inputs, 200 labeled eval inputs",
        "task fmnist-b: 256 merge inputs, 200 labeled eval inputs",
        "plan: 2 stage(s) × 1 replica(s)",
        "stage 1: units",
        "estimated peak RSS per worker",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
    assert!(
        !fsmerge_tests::root().join("runs/checked").exists(),
        "check wrote output"
    );
    // Asking for more merge inputs than the data has is the first problem, named.
    let o = fsmerge(&[
        "check",
        cfg.to_str().unwrap(),
        "--set",
        "merge.n_originals=300",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("task fmnist-a: merge.n_originals = 300 but its merge data has 256 inputs"),
        "{e}"
    );
    eprintln!("{out}");
}
