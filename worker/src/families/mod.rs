//! The model families, one folder each: model (HF or fsmerge layout), SuperNet, teacher and
//! training (`merge`), baselines, pipeline stage. A family never imports another; what two
//! share lives in `core`. `crate::family` maps `model.arch` to one of them.

pub mod bert;
pub mod llama;
pub mod mlp;
pub mod vit;
