//! A short pass of the fuzzer (`src/fuzz.rs`) over every target: no input may panic. Long runs:
//! `scripts/fuzz.sh N`.

use fsmerge_tests::fuzz::{run, TARGETS};

/// Inputs per target in CI; the closing note reports a long run.
const INPUTS: u64 = 3_000;

#[test]
fn no_reader_of_untrusted_input_panics() {
    let scratch = tempfile::tempdir().unwrap();
    let mut found = Vec::new();
    for target in TARGETS {
        let report = run(target, INPUTS, 7, scratch.path()).unwrap();
        eprintln!("{report}");
        assert_eq!(report.inputs, INPUTS);
        assert!(
            report.accepted > 0,
            "{target}: no input accepted, not even the seeds"
        );
        for (msg, input) in &report.panics {
            found.push(format!(
                "{target}: {msg}\n  input: {:?}",
                String::from_utf8_lossy(input)
            ));
        }
    }
    assert!(
        found.is_empty(),
        "{} panics:\n{}",
        found.len(),
        found.join("\n")
    );
}
