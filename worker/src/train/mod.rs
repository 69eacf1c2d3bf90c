//! Training: AdamW + OneCycle (`optim`), the merge settings of a job (`settings`), progress
//! reporting, and mid-phase checkpoints (`resume`).

pub mod optim;
pub mod originals;
pub mod progress;
pub mod resume;
pub mod settings;
