//! The distributed runtime: what a stage is to it (`stage`), the pipeline and local phases over
//! stages and replicas (`pipeline`), the worker process (`runtime`), the teacher-feature cache,
//! and the collectives (QUIC, NCCL).

pub mod collective;
pub mod distill;
pub mod evaluate;
pub mod feature_cache;
pub mod pipeline;
pub mod runtime;
pub mod stage;
