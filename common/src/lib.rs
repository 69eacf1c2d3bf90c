//! Shared vocabulary of fsmerge: the job config schema, errors, model specs and checkpoint IO,
//! the partition plan, metrics and atomic output. This crate does not link libtorch, so the
//! coordinator's planning and IO stay usable without it.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fsio;
pub mod metrics;
pub mod plan;

pub use error::{Error, Result};
