//! How long-running phases report progress; the coordinator supplies bars or log lines and the
//! JSON-lines metrics file.

pub use fsmerge_common::metrics::LogRow;

pub trait Progress: Sync {
    /// A phase with `total` steps begins.
    fn start(&self, phase: &str, total: u64);
    /// One optimizer step finished.
    fn step(&self, phase: &str, step: u64, loss: f64, lr: f64);
    fn finish(&self, phase: &str);
}

/// Reports nothing (tests, benchmarks).
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn step(&self, _: &str, _: u64, _: f64, _: f64) {}
    fn finish(&self, _: &str) {}
}
