//! Training: AdamW + OneCycle (`optim`), the merge settings of a job (`settings`), and progress
//! reporting.

pub mod optim;
pub mod originals;
pub mod progress;
pub mod settings;
