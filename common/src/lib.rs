//! Shared vocabulary of fsmerge: the job config schema, errors, model specs and checkpoint IO,
//! the partition plan, metrics, atomic output, rank/world discovery, the wire protocol and its
//! QUIC transport. This crate does not link libtorch, so the coordinator's planning, IO and
//! networking stay usable without it.

pub mod checkpoint;
pub mod config;
pub mod data_source;
pub mod discovery;
pub mod error;
pub mod fsio;
pub mod hf;
pub mod hf_writer;
pub mod mapped;
pub mod metrics;
pub mod models;
pub mod plan;
pub mod precision;
pub mod transport;
pub mod wire;
pub mod workdir;

pub use error::{Error, Result};
