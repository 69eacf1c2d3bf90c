//! What the step benchmarks share: environment knobs, the Python of the venv, running a
//! PyTorch reference script and reading its `step_ms`, medians.

use std::process::Command;

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn python() -> String {
    if let Ok(p) = std::env::var("FSMERGE_PYTHON") {
        return p;
    }
    if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python".into()
    } else {
        "python3".into()
    }
}

/// Run `bench/<script>` with `args` and return the median step time it prints (ms).
pub fn pytorch_step_ms(script: &str, args: &[String]) -> Result<f64, String> {
    let path = format!("{}/../bench/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| format!("running {}: {e}", python()))?;
    if !out.status.success() {
        return Err(format!(
            "reference script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad output `{line}`: {e}"))?;
    v["step_ms"]
        .as_f64()
        .ok_or_else(|| format!("no step_ms in `{line}`"))
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `cargo test --benches` runs benchmarks without `--bench`; they then only say how to run.
pub fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}
