//! Bad input: each case gives one clear error naming the file, tensor or field, a non-zero exit,
//! and no output directory.

use fsmerge_tests::{digits_config, fast, fsmerge, stderr};
use std::path::Path;

fn train(models: &Path, extra: &[&str]) {
    let mut args = vec![
        "train".to_string(),
        digits_config(),
        "--set".into(),
        format!("train.models_dir=\"{}\"", models.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "train failed: {}", stderr(&o));
}

/// A copy of the digits config, edited, written as `dir/name`; returns its path.
fn config_variant(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        edit(std::fs::read_to_string(digits_config()).unwrap()),
    )
    .unwrap();
    path.display().to_string()
}

/// Run a merge expected to fail; return its stderr after checking exit code and output.
fn merge_fails(dir: &Path, config: &str, extra: &[&str]) -> String {
    let out = dir.join("out");
    let mut args = vec![
        "merge".to_string(),
        config.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(fast(&dir.join("models")));
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success(), "merge should have failed");
    assert!(!out.exists(), "a failed job left {}", out.display());
    let hidden: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".out"))
        .collect();
    assert!(hidden.is_empty(), "staging left behind");
    let err = stderr(&o);
    assert_eq!(
        err.matches("error:").count(),
        1,
        "expected one error line: {err}"
    );
    err
}

#[test]
fn missing_safetensors_is_named() {
    let dir = tempfile::tempdir().unwrap();
    train(&dir.path().join("models"), &[]);
    std::fs::remove_file(dir.path().join("models/digits-5-9.safetensors")).unwrap();
    // A missing model is retrained only when both its files are gone; a lone JSON is an error.
    let err = merge_fails(dir.path(), &digits_config(), &[]);
    assert!(err.contains("digits-5-9.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = tempfile::tempdir().unwrap();
    train(&dir.path().join("models"), &[]);
    let f = dir.path().join("models/digits-0-4.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = merge_fails(dir.path(), &digits_config(), &[]);
    assert!(err.contains("digits-0-4.safetensors"), "{err}");
}

#[test]
fn different_architectures_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    train(&models, &[]);
    let other = dir.path().join("other");
    train(&other, &["--set", "model.hidden=[64, 32, 64]"]);
    for ext in ["safetensors", "json"] {
        std::fs::copy(
            other.join(format!("digits-5-9.{ext}")),
            models.join(format!("digits-5-9.{ext}")),
        )
        .unwrap();
    }
    let err = merge_fails(dir.path(), &digits_config(), &[]);
    assert!(
        err.contains("body.1.weight") && err.contains("digits-5-9.safetensors"),
        "{err}"
    );
}

#[test]
fn head_task_count_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    train(&dir.path().join("models"), &[]);
    let cfg = config_variant(dir.path(), "four.toml", |t| {
        t.replace("classes = [5, 6, 7, 8, 9]", "classes = [5, 6, 7, 8]")
    });
    let err = merge_fails(dir.path(), &cfg, &[]);
    assert!(
        err.contains("head.weight") && err.contains("digits-5-9"),
        "{err}"
    );
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 8] = [
        (&["--set", "merge.rnak=3"], "rnak"),
        (&["--set", "merge.precision=\"int8\""], "int8"),
        // The MLP family merges in fp32 and keeps its (small) features.
        (&["--set", "merge.precision=\"bf16\""], "merge.precision"),
        (&["--set", "merge.features=\"recompute\""], "merge.features"),
        (&["--set", "merge.rank=100"], "merge.rank"),
        (&["--set", "merge.n_originals=100000"], "merge.n_originals"),
        (&["--set", "merge.mu_type=low_rank"], "merge.init"),
        (&["--set", "output.max_shard_mb=0"], "output.max_shard_mb"),
    ];
    for (extra, needle) in cases {
        let err = merge_fails(dir.path(), &digits_config(), extra);
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
    let bad = config_variant(dir.path(), "bad.toml", |t| t + "\nunknown_key = 1\n");
    let err = merge_fails(dir.path(), &bad, &[]);
    assert!(
        err.contains("unknown_key") && err.contains("bad.toml"),
        "{err}"
    );
}
