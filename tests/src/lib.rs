//! Helpers for the cross-crate integration tests: run the real `fsmerge` binary on the small
//! digits job in a temporary directory.

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
