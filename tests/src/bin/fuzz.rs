//! `fuzz N [TARGET…] [--seed S] [--crashes DIR]`: N mutated inputs per target (all targets by
//! default) through the readers of untrusted input; prints one line per target and saves each
//! panicking input under DIR (default `fuzz-crashes/`). Exit 1 when anything panicked.
//! `scripts/fuzz.sh N` builds and runs it.

use fsmerge_tests::fuzz::{self, TARGETS};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut n: Option<u64> = None;
    let mut seed = 1u64;
    let mut crashes = PathBuf::from("fuzz-crashes");
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = |it: &mut std::slice::Iter<String>| it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--seed" => match value(&mut it).parse() {
                Ok(s) => seed = s,
                Err(_) => return usage("--seed takes a number"),
            },
            "--crashes" => crashes = PathBuf::from(value(&mut it)),
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            x => match x.parse() {
                Ok(v) if n.is_none() => n = Some(v),
                _ => return usage(&format!("unknown argument `{x}`")),
            },
        }
    }
    let Some(n) = n else {
        return usage("how many inputs per target?");
    };
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let scratch = match tempfile_dir() {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let mut panics = 0;
    for t in &targets {
        let report = match fuzz::run(t, n, seed, &scratch) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        println!("{report}");
        for (i, (msg, input)) in report.panics.iter().enumerate() {
            let file = crashes.join(format!("{t}-{i}.bin"));
            let saved =
                std::fs::create_dir_all(&crashes).and_then(|_| std::fs::write(&file, input));
            let note = saved.map_or_else(
                |e| format!("not saved: {e}"),
                |_| file.display().to_string(),
            );
            println!("  panic: {msg} (input: {note})");
        }
        panics += report.panics.len();
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if panics > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A fresh folder for the file-based targets.
fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("fsmerge-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "error: {why}\nusage: fuzz N [{}…] [--seed S] [--crashes DIR]",
        TARGETS.join("|")
    );
    ExitCode::from(2)
}

fn fail(why: &str) -> ExitCode {
    eprintln!("error: {why}");
    ExitCode::FAILURE
}
